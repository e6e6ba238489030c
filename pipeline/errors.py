"""Errors a user can cause and fix (a bad config value, a bad or missing input, a checkpoint that does not
fit): entry points print their message in a few lines, without a traceback, and exit with the kind's code."""

from __future__ import annotations


class UserError(Exception):
    """An expected error whose message names what is wrong, where, and the fix."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A configuration that composes but cannot be run; the message names the key and the fix."""

    exit_code = 2


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be saved, loaded or resumed from; the message says which and why."""

    exit_code = 3


class WarmStartError(CheckpointError):
    """``trainer.init_from``'s checkpoint cannot start this run (not there, or its rows or shapes do not fit)."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, a plan that does not fit); the message says why and what to try."""

    exit_code = 3


class DataError(UserError, ValueError):
    """Input data that cannot be used: a malformed row, an empty file or split, a missing file."""

    exit_code = 4


class MissingDataError(DataError, FileNotFoundError):
    """A raw file, pattern or processed folder that is not there."""


class ServingError(UserError):
    """A model cannot be exported, loaded or used to score the input given; the message says why."""

    exit_code = 5


class ExportError(ServingError, RuntimeError):
    """The checkpoint or data cannot be exported, or an export cannot be loaded."""


class PredictError(ServingError, ValueError):
    """The input cannot be scored with this model."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM or SIGUSR1): it saved a checkpoint at the step it reached and exits
    with ``exit_code`` (128 + SIGTERM, what schedulers report for a terminated job); the same command resumes."""

    exit_code = 143
