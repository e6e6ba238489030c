"""The vocabulary of vocab mode: every categorical value seen in training with its count, most frequent first.

A first pass over the training rows counts the values (:class:`IdCounter`, merged as it grows to bound
memory); ``vocab.npz`` keeps per column the values (``C<j>``) and their counts (``count_C<j>``). Ids
follow the counts, so the values seen at least ``data.min_id_frequency`` times are the first ones: the
threshold is a prefix, applied when batches are read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.data.tsv import RawBlock
from pipeline.errors import DataError

logger = logging.getLogger(__name__)


class IdCounter:
    """Per column, the training hashes and how often each occurs; merged as it grows to bound memory."""

    def __init__(self, num_sparse: int, multi_index: list[int] = ()) -> None:
        """``multi_index``: the list columns (their values come from ``RawBlock.lists``, the others from
        ``RawBlock.sparse``'s columns in order)."""
        self.num_sparse = num_sparse
        self.multi_index = list(multi_index)
        self.one_hot_index = [j for j in range(num_sparse) if j not in set(multi_index)]
        self.keys = [np.zeros(0, np.uint32) for _ in range(num_sparse)]
        self.counts = [np.zeros(0, np.int64) for _ in range(num_sparse)]
        self.pending: list[list[np.ndarray]] = [[] for _ in range(num_sparse)]
        self.pending_len = [0] * num_sparse

    def add(self, block: RawBlock) -> None:
        columns = [(j, block.sparse[~block.sparse_missing[:, k], k]) for k, j in enumerate(self.one_hot_index)]
        if self.multi_index:
            which = block.lists.columns()
            columns += [(j, block.lists.values[which == m]) for m, j in enumerate(self.multi_index)]
        for j, values in columns:
            self.pending[j].append(values)
            self.pending_len[j] += len(values)
            if self.pending_len[j] > max(4 * len(self.keys[j]), 1 << 22):
                self._merge(j)

    def _merge(self, j: int) -> None:
        if not self.pending[j]:
            return
        new, cnt = np.unique(np.concatenate(self.pending[j]), return_counts=True)
        keys, inv = np.unique(np.concatenate([self.keys[j], new]), return_inverse=True)
        self.counts[j] = np.bincount(
            inv, weights=np.concatenate([self.counts[j], cnt]).astype(np.float64), minlength=len(keys)
        ).astype(np.int64)
        self.keys[j] = keys
        self.pending[j], self.pending_len[j] = [], 0

    def num_distinct(self) -> list[int]:
        """Distinct values per column."""
        for j in range(self.num_sparse):
            self._merge(j)
        return [len(k) for k in self.keys]

    def vocab(self, caps: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per column, the hashes that get their own row, most frequent first (at most cap - 2), and their counts."""
        keys, counts = [], []
        for j in range(self.num_sparse):
            self._merge(j)
            k, c = self.keys[j], self.counts[j]
            order = np.argsort(-c, kind="stable")[: caps[j] - 2]  # most frequent first, ties by hash value
            keys.append(k[order])
            counts.append(c[order])
        return keys, counts


def vocab_counts(processed_dir: str | Path, num_sparse: int) -> list[np.ndarray]:
    """Per column, the training count of each vocabulary entry (descending, as the ids are assigned)."""
    path = Path(processed_dir) / "vocab.npz"
    with np.load(path) as z:  # one array at a time: the counts only, not the keys
        missing = [j for j in range(num_sparse) if f"count_C{j + 1}" not in z]
        if missing:
            raise DataError(f"{path} has no counts (written by an older version): preprocess again")
        return [z[f"count_C{j + 1}"] for j in range(num_sparse)]


def vocab_rows(counts: np.ndarray, min_frequency: int) -> int:
    """Vocabulary entries seen at least ``min_frequency`` times: the first ones, since ids follow the counts."""
    return int(np.count_nonzero(counts >= max(1, min_frequency)))


def load_vocab(processed_dir: str | Path, num_sparse: int, min_frequency: int = 1) -> list[np.ndarray]:
    """Per column, the raw values that own a table row under ``min_frequency`` (id ``2 + position``)."""
    path = Path(processed_dir) / "vocab.npz"
    try:
        with np.load(path) as z:  # allow_pickle=False: an object array is refused, nothing in it runs
            keys = [z[f"C{j + 1}"] for j in range(num_sparse)]
    except ValueError as e:
        raise DataError(
            f"{path}: {e}; the vocabulary holds numbers only (rebuild it with ./launch.sh preprocess)"
        ) from None
    if min_frequency <= 1:
        return keys
    counts = vocab_counts(processed_dir, num_sparse)
    return [k[: vocab_rows(c, min_frequency)] for k, c in zip(keys, counts, strict=True)]
