"""Hydra resolvers every entry point registers before composing: ``${run_id:}``, ``${rank_zero_only:a[,b]}``,
``${jobs_side_by_side:N}``.

Hydra resolves ``${now:...}`` separately in each rank, so ranks started a second apart would write to
different folders. The run id comes from the launcher instead (see :func:`run_id`), and only rank 0
writes Hydra's ``.hydra/`` folder.
"""

from __future__ import annotations

import datetime as _dt
import os

from omegaconf import OmegaConf


def run_id() -> str:
    """One id per job, equal on every rank and node.

    ``PIPELINE_RUN_ID`` (set by launch.sh) wins; else torchrun's rendezvous id (the TorchX app id,
    or a UUID with ``--standalone``); else the local time, for a single process.
    """
    explicit = os.environ.get("PIPELINE_RUN_ID")
    if explicit:
        return explicit
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        return elastic
    return _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _rank_zero_only(value: str, other: str | None = None) -> str | None:
    return value if int(os.environ.get("RANK", "0")) == 0 else other  # torchrun's global rank


def jobs_side_by_side(nproc_per_job: int | str) -> int:
    """How many jobs of ``nproc_per_job`` ranks this machine runs at once: one rank per core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(nproc_per_job)))


def register_resolvers() -> None:
    """Register ``${run_id:}``, ``${rank_zero_only:a[,b]}`` and ``${jobs_side_by_side:N}``; call before Hydra
    composes."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("rank_zero_only"):
        OmegaConf.register_new_resolver("rank_zero_only", _rank_zero_only)
    if not OmegaConf.has_resolver("jobs_side_by_side"):
        OmegaConf.register_new_resolver("jobs_side_by_side", jobs_side_by_side)
