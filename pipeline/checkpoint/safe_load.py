"""Loading a DCP checkpoint without unpickling arbitrary objects: DCP's metadata through an allow-list of
DCP's own types, tensors only. Training's resume and export both load through here, from a folder or an
object-store URL (DCP's fsspec reader, the same allow-list).
"""

from __future__ import annotations

import enum
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # not re-exported by the package in 2.13
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from pipeline import storage
from pipeline.errors import CheckpointError

# -- safe loading --------------------------------------------------------------------------------
_SAFE_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)


_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


def _enum_member(cls: Any, name: str) -> enum.Enum:
    """``getattr`` as some Python releases (3.11.2, for one) pickle an enum member: members of enums only."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls[name]
    raise CheckpointError(f"checkpoint metadata asks for {cls!r}.{name}, which is not an enum member: refusing it")


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and refuses any class outside DCP's own metadata types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"checkpoint metadata refers to {module}.{name}, which is not a checkpoint type: refusing to unpickle it"
        )


class _SafeMetadata:
    """``read_metadata`` through :class:`MetadataUnpickler` (for DCP's file and fsspec readers)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not DCP metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """DCP's file reader with an allow-listed unpickler for the metadata."""


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """DCP's fsspec reader (object stores) with an allow-listed unpickler for the metadata."""


def safe_reader(path: str | Path) -> FileSystemReader:
    """The safe DCP reader of a checkpoint folder or object-store URL."""
    if storage.is_remote(path):
        url = str(path)
        return SafeFsspecReader(url, **storage.storage_options(url))
    return SafeFileSystemReader(path)


def load_tensor_file(path: str | Path, error: type[Exception] = CheckpointError, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only; anything else (a crafted
    pickle, an arbitrary object) is refused with ``error`` naming the file, and nothing in it runs."""
    try:
        if storage.is_remote(path):
            with storage.open_binary(str(path)) as f:
                return torch.load(f, weights_only=True, **kwargs)
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # torch's message: advice to load with weights_only=False (never right here), then the reason.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise error(f"{path} is not a plain tensor file; refusing to unpickle it ({reason})") from None


def plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each DCP ``Stateful`` value replaced by its ``state_dict()``."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}


def load_tensors(path: str | Path, target: dict[str, Any], no_dist: bool = False) -> None:
    """Fill the tensors of ``target`` (DCP keys -> tensors, nested dicts or ``Stateful`` objects) from checkpoint
    ``path`` in place, resharding as needed; every entry asked for must be a tensor in the checkpoint.

    ``no_dist``: load in this process only, without a process group (export).

    Raises:
        CheckpointError: an entry is not a tensor (it would be unpickled).
    """
    try:
        reader = safe_reader(path)
        metadata = reader.read_metadata()
    except OSError as e:
        if not storage.is_remote(path):
            raise
        raise CheckpointError(f"cannot read checkpoint {storage.display(path)} ({storage.describe_error(e)})") from None
    plain = plain_state(target)
    # A part with no tensors (plain SGD keeps no optimizer state) has nothing to load; DCP would ask the
    # checkpoint for its empty dict as a key of its own and fail on more than one rank.
    target = {k: v for k, v in target.items() if not _empty(plain[k])}
    wanted: dict[str, Any] = {}
    flatten("", {k: plain[k] for k in target}, wanted)
    for key in wanted:
        entry = metadata.state_dict_metadata.get(key)
        if isinstance(entry, BytesStorageMetadata) or (
            entry is not None and not isinstance(entry, TensorStorageMetadata)
        ):
            raise CheckpointError(f"checkpoint {path}: entry {key} is not a tensor; refusing to unpickle it")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load(target, storage_reader=reader, no_dist=no_dist)
        except (OSError, dcp.CheckpointException) as e:
            if not storage.is_remote(path):
                raise
            raise CheckpointError(f"cannot read checkpoint {storage.display(path)} ({_first_cause(e)})") from None


def _first_cause(error: BaseException) -> str:
    """One line for a failed DCP load: the first rank's cause (DCP wraps them in a CheckpointException)."""
    if isinstance(error, dcp.CheckpointException):
        for failure in error.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, BaseException):
                return storage.describe_error(cause)
    return storage.describe_error(error)


def _empty(tree: Any) -> bool:
    """A (nested) dict without any leaf."""
    return isinstance(tree, dict) and all(_empty(v) for v in tree.values())


def flatten(prefix: str, tree: Any, out: dict[str, Any]) -> None:
    """DCP's flat keys (``a.b.c``) of a nested dict of tensors, into ``out``."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = tree
