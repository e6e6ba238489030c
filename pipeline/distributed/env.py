"""The process's place in the job and its setup: rank layout, device, process-group backend and group,
intra-op threads, and the allocator.

Every rank runs the same setup; rank-specific side effects go through :class:`DistEnv` (``env.is_rank_zero``).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.config import (
    Backend,
    Device,
    LauncherConfig,
    TrainerConfig,
)

logger = logging.getLogger(__name__)


def env_rank() -> int:
    """Global rank from the launcher's environment (0 when not launched by torchrun/TorchX)."""
    return int(os.environ.get("RANK", "0"))


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
    def from_environ(cls) -> DistEnv:
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


def select_device(cfg: TrainerConfig, env: DistEnv) -> torch.device:
    """cuda:<local_rank> when CUDA is there (or asked for), else cpu."""
    if cfg.device == Device.cuda or (cfg.device == Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available here: use trainer.device=auto or cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def backend_for(cuda: bool, nccl_available: bool = True, gloo_available: bool = True) -> str | None:
    """The process-group backend a job picks (``launcher.backend=auto``): nccl with CUDA, else gloo; the doctor
    reports the same choice."""
    if cuda and nccl_available:
        return "nccl"
    if gloo_available:
        return "gloo"
    return None


def select_backend(cfg: LauncherConfig, device: torch.device) -> str:
    if cfg.backend != Backend.auto:
        return cfg.backend.value
    return backend_for(device.type == "cuda") or "gloo"


def init_process_group(cfg: LauncherConfig, env: DistEnv, device: torch.device) -> str:
    """Join the job's process group (a group of one without a launcher); return the backend."""
    backend = select_backend(cfg, device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if env.world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # Without a launcher (python pipeline/train.py, a submitit sweep point): a world of one on an
            # in-process store, so no port is opened and none inherited from the environment can clash.
            dist.init_process_group(backend=backend, rank=0, world_size=1, timeout=timeout, store=dist.HashStore())
            return backend
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            store=_restart_safe_store(timeout),
        )
    return backend


def _restart_safe_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store for ``init_process_group``: None (torch's own env:// rendezvous) except where that is
    unsafe after a restart.

    torchrun's c10d rendezvous lends the workers its own TCPStore by default
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that store across restarts, so the keys the
    previous attempt's ranks wrote (gloo's and NCCL's addresses) are still there: a restarted rank can
    read its peer's old address and wait on a dead socket until ``launcher.timeout_s``
    (pytorch/pytorch#135712). On one node every worker comes from the same agent and agrees on
    ``TORCHELASTIC_RESTART_COUNT``, so each attempt gets keys of its own. Across nodes the agents'
    counts can differ, so there our launchers (launch.sh, the TorchX component, the sweep launcher)
    set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every attempt a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts == 0:
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        logger.warning(
            "torchrun may restart this %s-node job (--max-restarts %d) but shares its rendezvous store with "
            "the workers, so restarted ranks can read the previous attempt's addresses and hang "
            "(pytorch/pytorch#135712): launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch.sh and "
            "the TorchX component do)",
            os.environ["GROUP_WORLD_SIZE"],
            restarts,
        )
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"pipeline/attempt_{attempt}", store)


def set_num_threads(num_threads: int | None, env: DistEnv) -> int:
    """Intra-op threads: the configured number, else this node's cores shared by its ranks.

    torchrun sets OMP_NUM_THREADS=1 for every rank; on a CPU-only node that leaves cores idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = num_threads or max(1, cores // max(1, env.local_world_size))
    torch.set_num_threads(n)
    return n
