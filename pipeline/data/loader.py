"""Memory-mapped binary splits -> TorchRec ``Batch``es for one rank.

The batch size in the config is global: global batch ``i`` is the same set of rows whatever the world
size, and rank ``r`` takes the ``r``-th slice of it, so 1 and 2 ranks see the same data per step.
Every rank yields the same number of batches (training drops the last partial global batch;
evaluation pads it and marks the padding with weight 0), so no rank waits alone in a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from pipeline.data.features import FeatureTransform
from pipeline.data.jagged import concat, feature_major, take_rows
from pipeline.data.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass
class EvalBatch:
    """An evaluation batch and which of its rows are real (padding has weight 0)."""

    batch: Batch
    weights: torch.Tensor  # [local_batch_size] float32, 1 for real rows
    rows: torch.Tensor  # [local_batch_size] int64, the split's row of each sample (padding repeats row 0)


def _map(path: Path, f: dict) -> np.ndarray:
    """A part's column group, memory-mapped (an empty file, e.g. dense with no dense columns, cannot be)."""
    if 0 in f["shape"]:
        return np.zeros(f["shape"], dtype=f["dtype"])
    return np.memmap(path, dtype=f["dtype"], mode="r", shape=tuple(f["shape"]))


class BinarySplit:
    """One preprocessed split (train/val/test), memory-mapped part by part: only touched pages are read.

    A split is the concatenation of its parts (one per raw input file that feeds it); row ``i`` of
    the split is found by the parts' cumulative row counts. ``features`` (default: the stored ids as
    they are) reads the ids under ``data.min_id_frequency`` and builds the batches' KJT.
    """

    def __init__(
        self,
        processed_dir: str | Path,
        split: str,
        manifest: Manifest | None = None,
        features: FeatureTransform | None = None,
    ):
        self.dir = Path(processed_dir)
        self.manifest = manifest or Manifest.load(processed_dir)
        if split not in self.manifest.splits:
            raise KeyError(f"split {split!r} not in {Manifest.path(self.dir)}")
        info = self.manifest.splits[split]
        self.split = split
        self.features = features or FeatureTransform.from_manifest(self.manifest, self.dir)
        self.num_rows: int = info.num_rows
        self.parts: list[dict[str, np.ndarray]] = []
        for part in info.parts:
            if part["num_rows"] == 0:
                continue
            self.parts.append({key: _map(self.dir / f["path"], f) for key, f in part["files"].items()})
        self.starts = np.cumsum([0] + [len(p["labels"]) for p in self.parts])
        if self.starts[-1] != self.num_rows:
            raise ValueError(
                f"{Manifest.path(self.dir)}: split {split} lists {self.num_rows} rows but its parts "
                f"hold {self.starts[-1]}"
            )

    def __len__(self) -> int:
        return self.num_rows

    def gather(self, key: str, rows: np.ndarray) -> np.ndarray:
        """``rows`` of one column group (dense, sparse or labels) across parts, in the given order."""
        if len(self.parts) == 1:
            return self.parts[0][key][rows]
        part = np.searchsorted(self.starts, rows, side="right") - 1
        first = self.parts[0][key]
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][key][rows[sel] - self.starts[p]]
        return out

    def column(self, key: str) -> np.ndarray:
        """A whole column group (dense, sparse or labels) of the split, read into memory."""
        return self.gather(key, np.arange(self.num_rows))

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """One-hot table row ids [len(rows), num_one_hot] of ``rows``; values below data.min_id_frequency read
        as the shared rare-or-unseen id."""
        return self.features.fold(self.gather("sparse", rows))

    def lists(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """The list columns of ``rows``, feature-major as the KJT wants them: (ids, lengths [M, b], weights);
        None without list columns. One compiled pass over the memory-mapped part(s)."""
        if not self.manifest.schema.multi_hot:
            return None
        part = np.searchsorted(self.starts, rows, side="right") - 1
        if len(self.parts) == 1 or (part == part[0]).all():
            p = self.parts[int(part[0]) if len(rows) else 0]
            local = rows - self.starts[int(part[0]) if len(rows) else 0]
            values, lengths, weights = feature_major(p["values"], p.get("weights"), p["lengths"], p["offsets"], local)
        else:  # rows from several parts: each part's rows cut out row-major, then laid out in the given order
            pieces, where = [], np.empty(len(rows), np.int64)
            done = 0
            for q in np.unique(part):
                sel = np.flatnonzero(part == q)
                p = self.parts[q]
                pieces.append(
                    take_rows(p["values"], p.get("weights"), p["lengths"], p["offsets"], rows[sel] - self.starts[q])
                )
                where[sel] = done + np.arange(len(sel))
                done += len(sel)
            joined = concat(pieces)
            values, lengths, weights = feature_major(
                joined.values, joined.weights, joined.lengths, joined.starts(), where
            )
        return self.features.fold_feature_major(values, lengths), lengths, weights

    def make_batch(self, rows: np.ndarray) -> Batch:
        """Gather ``rows`` into a Batch: dense [b, num_dense], the KJT of every feature, labels [b]."""
        return self.features.batch(
            self.gather("dense", rows), self.ids(rows), self.gather("labels", rows), self.lists(rows)
        )


def num_train_batches(num_rows: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the last partial one is dropped)."""
    return num_rows // global_batch_size


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order rows are visited in an epoch; depends only on (seed, epoch), never on the rank."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def train_batches(
    split: BinarySplit,
    global_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    start_epoch: int = 0,
    num_epochs: int | None = None,
    start_step: int = 0,
) -> Iterator[Batch]:
    """This rank's training batches, epoch after epoch (forever when ``num_epochs`` is None).

    ``start_step`` skips that many batches of the first epoch (resuming mid-epoch): the batches
    that follow are exactly those an uninterrupted run would see.
    """
    local = global_batch_size // world_size
    steps = num_train_batches(len(split), global_batch_size)
    if steps == 0:
        raise ValueError(
            f"split {split.split!r} has {len(split)} rows, fewer than one global batch "
            f"(data.global_batch_size={global_batch_size})"
        )
    epoch = start_epoch
    while num_epochs is None or epoch < start_epoch + num_epochs:
        order = epoch_order(len(split), seed, epoch, shuffle)
        for i in range(start_step if epoch == start_epoch else 0, steps):
            lo = i * global_batch_size + rank * local
            # Sorted rows read the memory map sequentially; the loss is a mean, so order within a
            # batch does not matter.
            yield split.make_batch(np.sort(order[lo : lo + local]))
        epoch += 1


def eval_batches(
    split: BinarySplit, global_batch_size: int, rank: int, world_size: int, max_batches: int | None = None
) -> Iterator[EvalBatch]:
    """This rank's evaluation batches in file order; together the ranks cover every row once."""
    local = global_batch_size // world_size
    n = len(split)
    num_batches = -(-n // global_batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for i in range(num_batches):
        rows = np.arange(i * global_batch_size + rank * local, i * global_batch_size + (rank + 1) * local)
        real = rows < n
        rows = np.where(real, rows, 0)  # padding repeats row 0 and is weighted out
        yield EvalBatch(split.make_batch(rows), torch.from_numpy(real.astype(np.float32)), torch.from_numpy(rows))
