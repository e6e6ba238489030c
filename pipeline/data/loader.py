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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.data.criteo import SPARSE_FEATURE_NAMES
from pipeline.data.preprocess import load_manifest

logger = logging.getLogger(__name__)


@dataclass
class EvalBatch:
    """An evaluation batch and which of its rows are real (padding has weight 0)."""

    batch: Batch
    weights: torch.Tensor  # [local_batch_size] float32, 1 for real rows


class BinarySplit:
    """One preprocessed split (train/val/test), memory-mapped: only touched pages are read."""

    def __init__(self, processed_dir: str | Path, split: str, manifest: dict | None = None):
        self.dir = Path(processed_dir)
        self.manifest = manifest or load_manifest(processed_dir)
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in {self.dir / 'manifest.json'}")
        info = self.manifest["splits"][split]
        self.split = split
        self.num_rows: int = info["num_rows"]
        self.arrays = {}
        for key, f in info["files"].items():
            shape = tuple(f["shape"])
            if self.num_rows == 0:
                self.arrays[key] = np.zeros(shape, dtype=f["dtype"])
            else:
                self.arrays[key] = np.memmap(self.dir / f["path"], dtype=f["dtype"], mode="r", shape=shape)

    def __len__(self) -> int:
        return self.num_rows

    def make_batch(self, rows: np.ndarray) -> Batch:
        """Gather ``rows`` into a Batch: dense [b, 13], KJT of 26 one-id features, labels [b]."""
        dense = torch.from_numpy(np.ascontiguousarray(self.arrays["dense"][rows]))
        ids = self.arrays["sparse"][rows]  # [b, 26]
        labels = torch.from_numpy(self.arrays["labels"][rows].astype(np.float32))
        b = len(rows)
        # KJT values are feature-major: all of feature 0's ids, then feature 1's, ...
        values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1).astype(np.int64))
        kjt = KeyedJaggedTensor(
            keys=SPARSE_FEATURE_NAMES,
            values=values,
            lengths=torch.ones(len(SPARSE_FEATURE_NAMES) * b, dtype=torch.int32),
            stride=b,
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


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
) -> Iterator[Batch]:
    """This rank's training batches, epoch after epoch (forever when ``num_epochs`` is None)."""
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
        for i in range(steps):
            lo = i * global_batch_size + rank * local
            # Sorted rows read the memory map sequentially; the loss is a mean, so order within a
            # batch does not matter.
            yield split.make_batch(np.sort(order[lo : lo + local]))
        epoch += 1


def eval_batches(split: BinarySplit, global_batch_size: int, rank: int, world_size: int,
                 max_batches: int | None = None) -> Iterator[EvalBatch]:
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
        yield EvalBatch(split.make_batch(rows), torch.from_numpy(real.astype(np.float32)))
