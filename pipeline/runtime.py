"""Process-level facts every rank agrees on: rank, world size, the run id, the run folder.

Hydra resolves ``${now:...}`` separately in each rank, so ranks started a second apart would write
to different folders. The run id comes from the launcher instead (see :func:`run_id`), and only rank 0
writes Hydra's ``.hydra/`` folder.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

from omegaconf import OmegaConf


def env_rank() -> int:
    """Global rank from the launcher's environment (0 when not launched by torchrun/TorchX)."""
    return int(os.environ.get("RANK", "0"))


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
    return value if env_rank() == 0 else other


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


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process, read once from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(
            rank=env_rank(),
            world_size=world_size,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
        )


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS; True if applied.

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
    and unmaps it on free, and trims the heap's free top: a training step's large activations and
    gradients (the [B, 27, D] interaction input, pooled embeddings, the top MLP's input) are then
    page-faulted and zero-filled again every step, and preprocessing's per-block columns likewise
    every block (about 10% of its time here). With ``mmap`` off for blocks and trimming off, they
    come from pages the process already has. Peak memory is unchanged (the same blocks are live at the
    peak); memory freed after the peak stays with the process until it exits. Not glibc (macOS,
    musl): nothing to do.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
