"""Run folders for the contenders' training jobs."""

from __future__ import annotations

import shutil
from pathlib import Path


def fresh_run_dir(path: Path) -> Path:
    """``path``, emptied: a run folder left by an earlier invocation holds checkpoints, and the job would resume
    from them (and append to their metrics) instead of training from the start."""
    shutil.rmtree(path, ignore_errors=True)
    return path
