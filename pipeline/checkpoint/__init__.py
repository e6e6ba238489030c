"""Checkpoints with ``torch.distributed.checkpoint``: the manager (save, keep, find, load with resharding)
and the safe loading it shares with export."""

from pipeline.checkpoint.manager import (
    BEST,
    LATEST,
    META,
    PREFIX,
    Checkpointer,
    TrainState,
    app_state,
    best_checkpoint,
    check_compatible,
    find_checkpoint,
    latest_checkpoint,
    load,
    read_meta,
    resolve_resume,
)
from pipeline.checkpoint.safe_load import SafeFileSystemReader, load_tensors
from pipeline.errors import CheckpointError

__all__ = [
    "BEST",
    "LATEST",
    "META",
    "PREFIX",
    "Checkpointer",
    "TrainState",
    "best_checkpoint",
    "check_compatible",
    "find_checkpoint",
    "latest_checkpoint",
    "load",
    "read_meta",
    "resolve_resume",
    "app_state",
    "SafeFileSystemReader",
    "load_tensors",
    "CheckpointError",
]
