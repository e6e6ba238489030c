"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): save, find the latest, load with resharding.

Layout, inside ``checkpoint.dir`` (default ``<run dir>/checkpoints``)::

    step_00000120/              one complete checkpoint
        .metadata, __<r>_0.distcp   DCP: the sharded tables, the fused table optimizer's state
                                    (e.g. RowWiseAdagrad's momentum), the MLPs and their optimizer
        meta.json               step, epoch, loader position, LR schedule, world size, the resolved
                                config, the table/parameter shapes (written by rank 0)
        rng_rank<r>.pt          rank r's torch/numpy/python RNG states (tensors only)
    latest                      the name of the newest complete checkpoint
    best                        the name of the one with the best validation metric (trainer.restore_best)

A checkpoint is written into ``step_<N>.tmp/`` and renamed when every rank has finished; ``latest``
is replaced atomically after that. A save that is killed or fails midway leaves the previous
checkpoint as ``latest``, intact.

``checkpoint.dir`` may be an object-store URL (``s3://bucket/prefix``, :mod:`pipeline.storage`). An object store
has no folder rename, so a save writes ``step_<N>/`` in place (DCP's fsspec writer) and commits with two small
PUTs, each atomic: ``meta.json`` once every rank's files are written (a step folder without it is incomplete:
ignored, and deleted by the next save), then ``latest``. A save that fails (after the store's retries) or is
killed leaves ``latest`` naming the previous checkpoint.

With ``checkpoint.async_save`` training pauses only to copy the state into host buffers kept between saves;
a background thread writes the copy (DCP, fsynced files), has every rank agree it succeeded, then renames
the folder, moves ``latest`` and prunes, exactly as a synchronous save does. One save is in flight at a
time: the next save, the end of training and a stop signal wait for it first.

Loading reads tensors only (:mod:`.safe_load`); DCP reshards on load, so a checkpoint from N ranks (or
another sharding plan) loads into M ranks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from pipeline import storage
from pipeline.checkpoint.safe_load import flatten, load_tensor_file, load_tensors, plain_state
from pipeline.errors import CheckpointError
from pipeline.storage import Location

logger = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"  # names the checkpoint with the best validation metric so far (trainer.restore_best)
META = "meta.json"
PREFIX = "step_"


# -- what a checkpoint holds ----------------------------------------------------------------------
@dataclass
class TrainState:
    """The loop's position, saved as JSON beside the tensors."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    train_seconds: float = 0.0
    samples: int = 0


class ModelState(Stateful):
    """The model's tensors for DCP (``model.<name>``): the live tensors, so loading fills them in place and
    then hands them to ``load_state_dict``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)


class OptimizerState(Stateful):
    """Both optimizers' state for DCP (``optim.<param>.<name>``): the fused table optimizers' (sharded with
    their tables) and the MLPs'; hyper-parameters come from the config, not the checkpoint."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()["state"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict({"state": state_dict})


def app_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Stateful]:
    """What DCP saves and loads: the model and its optimizers, as :class:`Stateful` objects."""
    state = {"model": ModelState(model), "optim": OptimizerState(optimizer)}
    flat: dict[str, Any] = {}
    flatten("", plain_state(state), flat)
    not_tensors = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"state holds non-tensor entries, which DCP would pickle: {not_tensors[:5]}")
    return state


def _shapes(state: dict[str, Any]) -> dict[str, list[int]]:
    """Global shape of every entry (a ShardedTensor's size is the whole table's)."""
    flat: dict[str, Any] = {}
    flatten("", plain_state(state), flat)
    with warnings.catch_warnings():  # ShardedTensor.size() warns that ShardedTensor is being replaced by DTensor
        warnings.simplefilter("ignore", FutureWarning)
        return {k: list(v.size()) for k, v in flat.items()}


def _rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": torch.tensor([py_state[0]], dtype=torch.int64),
    }


def _set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["torch"])
    pos, has_gauss = (int(x) for x in s["numpy_pos"])
    np.random.set_state(
        ("MT19937", s["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(s["numpy_gauss"][0]))
    )
    random.setstate((int(s["python_version"][0]), tuple(int(x) for x in s["python"]), None))


# -- finding checkpoints --------------------------------------------------------------------------
def latest_checkpoint(root: str | Location, pointer_name: str = LATEST) -> Location | None:
    """The complete checkpoint under ``root`` (a folder or an object-store URL) its ``latest`` (or ``best``) pointer
    names, or None."""
    root = storage.location(root)
    pointer = storage.join(root, pointer_name)
    try:
        if not storage.is_file(pointer):
            return None
        path = storage.join(root, storage.read_text(pointer).strip())
        complete = _complete(path)
    except OSError as e:
        if isinstance(root, Path):
            raise
        raise CheckpointError(f"cannot read {storage.display(pointer)} ({storage.describe_error(e)})") from None
    if not complete:
        raise CheckpointError(
            f"{storage.display(pointer)} names {storage.display(path)}, which is not a complete checkpoint"
        )
    return path


def best_checkpoint(root: str | Location) -> Location | None:
    """The checkpoint with the best validation metric under ``root`` (its ``best`` pointer), or None."""
    return latest_checkpoint(root, BEST)


def find_checkpoint(path: str | Location, which: str = "best") -> Location | None:
    """A ``step_<N>`` folder, or the checkpoint a checkpoints folder (or a run folder's) points at: ``best`` (the
    best validation metric, what the run's final metrics and export came from; its latest when it kept no best)
    or ``latest``; None when there is none."""
    path = storage.location(path)
    if _complete(path):
        return path
    pointers = (BEST, LATEST) if which == "best" else (LATEST,)
    for root in (path, storage.join(path, "checkpoints")):
        for pointer in pointers:
            found = latest_checkpoint(root, pointer)  # None when there is no such pointer
            if found is not None:
                return found
    return None


def _complete(path: Location) -> bool:
    """A finished checkpoint folder: its meta.json and DCP's .metadata are both there."""
    return storage.is_file(storage.join(path, META)) and storage.is_file(storage.join(path, ".metadata"))


def resolve_resume(resume: str, root: Location) -> Location | None:
    """``trainer.resume``: ``auto`` = the latest in the run's checkpoint folder if any, ``none``, or a path or URL."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = storage.location(resume)
    try:
        if storage.is_file(storage.join(path, LATEST)):
            return latest_checkpoint(path)
        found = storage.is_file(storage.join(path, META))
    except OSError as e:
        if isinstance(path, Path):
            raise
        raise CheckpointError(f"trainer.resume={storage.display(resume)}: {storage.describe_error(e)}") from None
    if not found:
        raise CheckpointError(
            f"trainer.resume={storage.display(resume)}: no checkpoint there (expected "
            f"{storage.display(storage.join(path, META))} or {storage.display(storage.join(path, LATEST))})"
        )
    return path


# -- save -----------------------------------------------------------------------------------------
@dataclass
class _InFlight:
    """A save whose writing runs in the background thread."""

    path: Location
    future: Future


class Checkpointer:
    """Saves every N steps and/or minutes (in the background with ``async_save``), keeps the last K, loads
    with resharding."""

    def __init__(
        self,
        root: str | Location,
        rank: int,
        world_size: int,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        keep_last: int = 2,
        async_save: bool = False,
    ):
        self.root = storage.location(root)  # a Path, or an object-store URL (see the module docstring)
        self.remote = not isinstance(self.root, Path)
        if async_save and self.remote:  # the config check says so first; this guards other callers
            raise CheckpointError(f"async saves need a local checkpoint.dir, not {storage.display(self.root)}")
        self.rank = rank
        self.world_size = world_size
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.keep_last = keep_last
        self.async_save = async_save
        self._last_save = time.monotonic()
        self._in_flight: _InFlight | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # the host copies of the state, reused by every async save
        # The background thread's collectives (DCP's plan and gather, the agreement) run on a gloo group of their
        # own: on the training's group they could pair up with the training thread's all-reduces.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def due(self, step: int) -> bool:
        """Whether a save is due after ``step`` (the time rule is decided on rank 0 and shared)."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.every_minutes
        if self.every_minutes > 0 and dist.is_initialized() and self.world_size > 1:
            flag = torch.tensor([int(by_time)])
            dist.broadcast(flag, src=0)
            by_time = bool(flag.item())
        return by_steps or by_time

    def save(self, state: dict[str, Any], train_state: TrainState, extra_meta: dict, best: bool = False) -> Location:
        """Write a checkpoint of ``state`` (:func:`app_state`; collective: every rank calls it). Returns its folder.

        ``best``: it also becomes the ``best`` checkpoint, which pruning keeps beside the last K. With
        ``async_save`` this returns once the state is copied; the folder (and ``latest``) appear when the
        background write has finished on every rank (:meth:`wait`).

        Raises:
            CheckpointError: the folder cannot be written (permissions, full disk), by this save or by the one
                still in flight; the previous checkpoint is left as it was.
        """
        self.wait()  # one save in flight at a time
        name = f"{PREFIX}{train_state.step:08d}"
        t0 = time.perf_counter()
        if self.remote:
            return self._save_remote(state, train_state, extra_meta, name, best, t0)
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        error = None
        try:
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
        except OSError as e:
            error = e
        self._agree(error, f"create {tmp}")
        rng, meta = self._rng_and_meta(train_state, extra_meta)
        if not self.async_save:
            self._write(state, name, rng, meta, best, None, t0)
            return final
        staged = self._stage(state)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, "checkpoint-writer", initializer=_lower_priority)
        future = self._writer.submit(self._write, staged, name, rng, meta, best, self._group, t0)
        self._in_flight = _InFlight(final, future)
        logger.info("checkpoint %s: state copied in %.2fs, writing in the background", final, time.perf_counter() - t0)
        return final

    def _rng_and_meta(self, train_state: TrainState, extra_meta: dict) -> tuple[bytes, dict]:
        """This rank's RNG states as torch.save bytes, and meta.json's content (without the shapes)."""
        # Serialised in memory, then written as plain bytes: a full disk then raises OSError (ENOSPC,
        # "No space left on device") instead of torch.save's zip-writer "unexpected pos" error.
        rng = io.BytesIO()
        torch.save(_rng_state(), rng)
        meta = {
            "train_state": asdict(train_state),
            "world_size": self.world_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra_meta,
        }
        self._last_save = time.monotonic()
        return rng.getvalue(), meta

    def _save_remote(
        self, state: dict[str, Any], train_state: TrainState, extra_meta: dict, name: str, best: bool, t0: float
    ) -> Location:
        """:meth:`save` into an object store: write ``step_<N>/`` in place, then commit with ``meta.json`` and
        ``latest`` (see the module docstring)."""
        final = storage.join(self.root, name)
        error = None
        try:
            # A folder of this name that no pointer names is what a killed or failed save left: start it afresh.
            # One a pointer names holds this very step (a resumed run saving the step it resumed at): its files
            # are overwritten with the same state.
            if self.rank == 0 and name not in self._pointed():
                storage.remove_tree(final)
        except OSError as e:
            error = e
        self._agree(error, f"clear {storage.display(final)}")
        rng, meta = self._rng_and_meta(train_state, extra_meta)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter  # not re-exported in torch 2.13

        try:
            # No fsync: a finished PUT is durable (DCP's writer would call os.sync for a stream without a file number).
            writer = FsspecWriter(final, sync_files=False, **storage.storage_options(final))
            dcp.save(state, storage_writer=writer)
            storage.write_bytes(storage.join(final, f"rng_rank{self.rank}.pt"), rng)
        except (Exception, DCPCheckpointException) as e:  # noqa: BLE001 - any failure of any rank fails the save
            error = _root_cause(e)
        self._agree(error, f"write {storage.display(final)}")  # past here every rank's objects are stored
        shapes = self._all_shapes(state, None)
        try:
            if self.rank == 0:
                text = json.dumps({**meta, "shapes": dict(sorted(shapes.items()))}, indent=2) + "\n"
                storage.write_bytes(storage.join(final, META), text.encode())  # the step is complete
                storage.write_bytes(storage.join(self.root, LATEST), (name + "\n").encode())  # the commit
                if best:
                    storage.write_bytes(storage.join(self.root, BEST), (name + "\n").encode())
                self._prune_remote(keep=name)
        except OSError as e:
            error = e
        self._agree(error, f"finish {storage.display(final)}")
        logger.info("checkpoint %s saved in %.2fs", storage.display(final), time.perf_counter() - t0)
        return final

    def _pointed(self) -> set[str]:
        """The checkpoint names ``latest`` and ``best`` point at (remote root)."""
        names = set()
        for pointer in (LATEST, BEST):
            loc = storage.join(self.root, pointer)
            if storage.is_file(loc):
                names.add(storage.read_text(loc).strip())
        return names

    def _prune_remote(self, keep: str) -> None:
        """:meth:`_prune` in an object store: keep the last ``keep_last`` complete checkpoints (``meta.json`` present)
        and the best one; delete the rest and the incomplete step folders that failed or killed saves left."""
        best_pointer = storage.join(self.root, BEST)
        best = storage.read_text(best_pointer).strip() if storage.is_file(best_pointer) else None
        steps = [d for d in storage.list_dirs(self.root) if d.startswith(PREFIX)]
        done = [d for d in steps if storage.is_file(storage.join(self.root, d, META))]
        drop = [d for d in done[: max(0, len(done) - self.keep_last)] if d not in (keep, best)]
        drop += [d for d in steps if d not in done and d != keep]
        for old in drop:
            storage.remove_tree(storage.join(self.root, old))

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state``'s tensors copied into host buffers kept between saves: the background write reads the copy
        while training changes the originals."""
        plain = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
        with torch.no_grad():
            return _copy_tree(plain, "", self._buffers)

    def _write(
        self,
        state: dict[str, Any],
        name: str,
        rng: bytes,
        meta: dict,
        best: bool,
        group: dist.ProcessGroup | None,
        t0: float,
    ) -> None:
        """Write, agree, then publish: rename the folder, move ``latest`` (and ``best``), prune. Collectives on
        ``group`` (None: the default group)."""
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        cpu0, error = time.thread_time(), None
        try:
            dcp.save(state, checkpoint_id=tmp, process_group=group)  # FileSystemWriter fsyncs every file
            with open(tmp / f"rng_rank{self.rank}.pt", "wb") as f:
                f.write(rng)
                f.flush()
                os.fsync(f.fileno())
        except (Exception, DCPCheckpointException) as e:  # noqa: BLE001 - any failure of any rank fails the save
            error = _root_cause(e)
        self._agree(error, f"write {tmp}", group)  # past here every rank's files are on disk
        shapes = self._all_shapes(state, group)
        try:
            if self.rank == 0:
                _write_atomic(tmp / META, json.dumps({**meta, "shapes": dict(sorted(shapes.items()))}, indent=2) + "\n")
                _fsync_dir(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _write_atomic(self.root / LATEST, name + "\n")
                if best:
                    _write_atomic(self.root / BEST, name + "\n")
                _fsync_dir(self.root)
                self._prune(keep=name)
        except OSError as e:
            error = e
        self._agree(error, f"finish {final}", group)
        logger.info(
            "checkpoint %s saved in %.2fs (%.2fs of CPU in the writing thread)",
            final,
            time.perf_counter() - t0,
            time.thread_time() - cpu0,
        )

    def _all_shapes(self, state: dict[str, Any], group: dist.ProcessGroup | None) -> dict[str, list[int]]:
        """Every entry's global shape over all ranks: each rank holds the optimizer state of its own tables only."""
        shapes = _shapes(state)
        if dist.is_initialized() and self.world_size > 1:
            everyone: list[dict] = [{} for _ in range(self.world_size)]
            dist.all_gather_object(everyone, shapes, group=group)
            shapes = {k: v for d in everyone for k, v in d.items()}
        return shapes

    def wait(self) -> Location | None:
        """Block until the save in flight, if any, is complete on every rank (``latest`` names it); return its
        folder.

        Raises:
            CheckpointError: that save failed (on every rank alike); the checkpoint before it is ``latest``.
        """
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        t0 = time.perf_counter()
        in_flight.future.result()
        if time.perf_counter() - t0 > 0.01:
            logger.info("waited %.2fs for checkpoint %s to be written", time.perf_counter() - t0, in_flight.path)
        return in_flight.path

    def drain(self) -> None:
        """Finish the save in flight and save synchronously from now on (the end of training, a stop signal:
        what follows needs the checkpoints on disk)."""
        self.wait()
        self.async_save = False
        self._buffers.clear()

    def close(self) -> None:
        """Finish the save in flight (a run failing elsewhere still publishes it; its own error is logged)."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - closing must not hide the error the run is ending with
            logger.error("the checkpoint written in the background failed: %s: %s", type(e).__name__, e)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def _agree(self, error: BaseException | None, what: str, group: dist.ProcessGroup | None = None) -> None:
        """Fail on every rank if any rank failed (so no rank waits alone in the next collective)."""
        failed = torch.tensor([int(error is not None)])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(failed, group=group)
        if failed.item():
            if self.remote:
                self._fail_remote(error, what)
            latest = self.root / LATEST
            prev = latest.read_text().strip() if latest.is_file() else "none"
            reason = f"{type(error).__name__}: {error}" if error is not None else "another rank failed"
            reason += _space_note(self.root)
            raise CheckpointError(
                f"checkpoint save failed to {what} ({reason}); the previous checkpoint ({prev}) "
                "is untouched. Check checkpoint.dir is writable and has space."
            ) from error

    def _fail_remote(self, error: BaseException | None, what: str) -> None:
        """The one-line error of a failed save into an object store (after its retries)."""
        try:
            pointed = storage.join(self.root, LATEST)
            prev = storage.read_text(pointed).strip() if storage.is_file(pointed) else "none"
        except OSError:
            prev = "unknown: latest could not be read either"
        reason = storage.describe_error(error) if error is not None else "another rank failed"
        raise CheckpointError(
            f"checkpoint save failed to {what} ({reason}); latest still names the previous checkpoint ({prev}). "
            "Check that checkpoint.dir is reachable and writable (AWS_ENDPOINT_URL, credentials)."
        ) from None

    def mark_best(self, path: Location) -> None:
        """Point ``best`` at an existing checkpoint (rank 0 writes; every rank calls)."""
        self.wait()
        if self.rank == 0 and self.remote:
            storage.write_bytes(storage.join(self.root, BEST), (storage.name(path) + "\n").encode())
        elif self.rank == 0:
            _write_atomic(self.root / BEST, path.name + "\n")
            _fsync_dir(self.root)

    def _prune(self, keep: str) -> None:
        """Keep the last ``keep_last`` complete checkpoints and the best one; drop the rest and stale tmp folders
        (runs after ``latest`` names ``keep``, and no other save is in flight then)."""
        best = (self.root / BEST).read_text().strip() if (self.root / BEST).is_file() else None
        done = sorted(p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old.name not in (keep, best):
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def _lower_priority() -> None:
    """Give the calling thread (the background writer) a lower CPU priority, nice +10: where ranks share few cores,
    training's threads come first and the write takes the cycles left over."""
    if sys.platform == "linux":  # a thread id is a process id to Linux's setpriority; elsewhere it would be the process
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


def _copy_tree(obj: Any, key: str, buffers: dict[str, torch.Tensor]) -> Any:
    """A copy of a state dict whose tensors live in ``buffers`` (by entry; reallocated when a shape changes)."""
    if isinstance(obj, dict):
        return {k: _copy_tree(v, f"{key}.{k}", buffers) for k, v in obj.items()}
    if isinstance(obj, ShardedTensor):  # torchrec's tables and their fused optimizer state: copy the local shards
        # The copies live on the host: every shard is placed on its rank's CPU (DCP records offsets and sizes only).
        shards = [
            Shard(_copy_into(s.tensor, f"{key}#{i}", buffers), _on_cpu(s.metadata))
            for i, s in enumerate(obj.local_shards())
        ]
        meta = obj.metadata()
        meta = replace(meta, shards_metadata=[_on_cpu(m) for m in meta.shards_metadata])
        return ShardedTensor._init_from_local_shards_and_global_metadata(  # noqa: SLF001 - no collective, unlike the public one
            shards,
            meta,
            process_group=obj._process_group,  # noqa: SLF001
        )
    if isinstance(obj, DTensor):
        local = _copy_into(obj.to_local(), key, buffers)
        return DTensor.from_local(
            local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
        )
    if isinstance(obj, torch.Tensor):
        return _copy_into(obj, key, buffers)
    raise CheckpointError(f"state entry {key} is a {type(obj).__name__}, not a tensor")


def _on_cpu(shard: ShardMetadata) -> ShardMetadata:
    """The same shard placed on its rank's CPU."""
    return replace(shard, placement=f"rank:{shard.placement.rank()}/cpu")


def _copy_into(tensor: torch.Tensor, key: str, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """``tensor`` copied into the host buffer kept for ``key``."""
    buf = buffers.get(key)
    if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
        buf = buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return buf.copy_(tensor.detach())


def _space_note(root: Path) -> str:
    """'; the filesystem ... is full' when it is: a full disk does not always surface as ENOSPC (DCP's
    writer reports torch.save's zip error 'unexpected pos' when a write comes up short)."""
    try:
        usage = shutil.disk_usage(root if root.exists() else root.parent)
    except OSError:
        return ""
    if usage.free < max(16 * 1024**2, usage.total // 1000):
        return f"; the filesystem of checkpoint.dir is full: {usage.free:,} bytes free of {usage.total:,}"
    return ""


def _root_cause(error: BaseException) -> BaseException:
    """DCP wraps each rank's failure in a CheckpointException (a BaseException); keep the first cause."""
    if isinstance(error, DCPCheckpointException):
        for failure in error.failures.values():  # rank -> (exception, traceback summary)
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, BaseException):
                return cause
    return error


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- load -----------------------------------------------------------------------------------------
def read_meta(path: str | Location) -> dict:
    """A checkpoint's meta.json."""
    return json.loads(storage.read_text(storage.join(storage.location(path), META)))


def check_compatible(path: Location, meta: dict, state: dict[str, Any], load_optimizer: bool) -> None:
    """Fail naming the tables/parameters whose shapes differ or that are missing, before loading.

    Only global shapes are compared, so another world size or sharding plan is fine.
    """
    saved = meta["shapes"]
    ours = _shapes(state)
    keys = [k for k in ours if load_optimizer or k.startswith("model.")]
    missing = [k for k in keys if k not in saved]
    differ = [f"{k}: checkpoint {saved[k]} vs model {ours[k]}" for k in keys if k in saved and saved[k] != ours[k]]
    if missing or differ:
        lines = [*(f"  shape differs  {d}" for d in differ[:20]), *(f"  not in checkpoint  {k}" for k in missing[:20])]
        more = len(differ) + len(missing) - len(lines)
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({len(differ)} shapes differ, "
            f"{len(missing)} missing):\n" + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
        )


def load(
    path: Location, state: dict[str, Any], rank: int, load_optimizer: bool = True, restore_rng: bool = True
) -> dict:
    """Load a checkpoint into ``state`` (:func:`app_state`: in place, resharding as needed, then each part's
    ``load_state_dict``); returns its meta.json.

    Raises:
        CheckpointError: shapes differ (named), an entry is not a tensor, or an object store cannot be read.
    """
    try:
        meta = read_meta(path)
        check_compatible(path, meta, state, load_optimizer)
        load_tensors(path, state if load_optimizer else {"model": state["model"]})
        rng = storage.join(storage.location(path), f"rng_rank{rank}.pt")
        if restore_rng and meta["world_size"] > rank and storage.is_file(rng):
            _set_rng_state(load_tensor_file(rng))
    except OSError as e:
        if not storage.is_remote(path):
            raise
        raise CheckpointError(f"cannot read checkpoint {storage.display(path)} ({storage.describe_error(e)})") from None
    return meta
