"""The vocabulary of vocab mode: every categorical value seen in training with its count, most frequent first.

A first pass over the training rows counts the values (:class:`IdCounter`, merged as it grows to bound
memory); ``vocab.npz`` keeps per column the values (``C<j>``) and their counts (``count_C<j>``). Ids
follow the counts, so the values seen at least ``data.min_id_frequency`` times are the first ones: the
threshold is a prefix, applied when batches are read.

A vocabulary can grow from an earlier one (``data.vocab_from``: yesterday's processed folder), so a model
trained on it can start the next day's run (``trainer.init_from``): the earlier values that own a row keep
their ids, in order, and the values new in this data's training rows that pass ``data.min_id_frequency``
follow, most frequent first, up to the cap. Every value of a grown vocabulary owns a row (the threshold was
applied as it grew). The manifest records the line of vocabularies it grew from (:class:`VocabBase`), each
with its digest and table sizes, so a checkpoint's tables can be matched to the rows they fill.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


def vocab_digest(processed_dir: str | Path) -> str | None:
    """The sha256 of ``vocab.npz`` that preprocessing recorded (``vocab.json``), or None without one."""
    try:
        return json.loads((Path(processed_dir) / "vocab.json").read_text()).get("sha256")
    except (OSError, ValueError):
        return None


@dataclass
class VocabBase:
    """The vocabulary a new one grows from: per column the values that own a row there, in id order, and the
    line of vocabularies it came from, itself last (``{"processed_dir", "vocab_sha256", "rows"}``, rows per
    table with the two reserved ones)."""

    keys: list[np.ndarray]
    generations: list[dict]

    @classmethod
    def load(cls, processed_dir: str | Path, num_sparse: int, min_frequency: int) -> VocabBase:
        """The vocabulary of an earlier preprocessing in vocab mode, as a model trained on it with
        ``min_frequency`` has its rows (a grown one: every value).

        Raises:
            DataError: the folder holds no finished vocab-mode preprocessing, or has another column count.
        """
        generations = cls.lineage(processed_dir, num_sparse, min_frequency)
        keys = load_vocab(processed_dir, num_sparse)
        return cls([k[: r - 2] for k, r in zip(keys, generations[-1]["rows"], strict=True)], generations)

    @staticmethod
    def lineage(processed_dir: str | Path, num_sparse: int, min_frequency: int) -> list[dict]:
        """:attr:`generations` of the vocabulary in ``processed_dir``, without reading its values."""
        from pipeline.data.manifest import Manifest

        manifest = Manifest.load(processed_dir)  # MissingDataError / DataError name the folder
        if manifest.id_mode != "vocab":
            raise DataError(
                f"data.vocab_from={processed_dir}: preprocessed with data.id_mode={manifest.id_mode}, which has no "
                "vocabulary to grow"
            )
        if manifest.num_sparse != num_sparse:
            raise DataError(
                f"data.vocab_from={processed_dir}: {manifest.num_sparse} categorical columns there, {num_sparse} here"
            )
        rows = list(manifest.num_embeddings_per_feature)
        if not manifest.vocab_generations:  # the threshold applies when read: a prefix of each column
            counts = vocab_counts(processed_dir, num_sparse)
            rows = [min(n, vocab_rows(c, min_frequency) + 2) for n, c in zip(rows, counts, strict=True)]
        record = {"processed_dir": str(processed_dir), "vocab_sha256": vocab_digest(processed_dir), "rows": rows}
        return [*(manifest.vocab_generations or []), record]

    def grow(
        self, counter: IdCounter, min_frequency: int, caps: list[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per column: these values, then the counted ones new to them seen at least ``min_frequency`` times
        (most frequent first, ties by value), at most ``cap - 2`` in all; and each one's count in ``counter``."""
        keys, counts = [], []
        counter.num_distinct()  # merges what is pending
        for j, old in enumerate(self.keys):
            seen, seen_counts = counter.keys[j], counter.counts[j]  # sorted by value
            new = ~np.isin(seen, old) & (seen_counts >= max(1, min_frequency))
            order = np.argsort(-seen_counts[new], kind="stable")[: max(0, caps[j] - 2 - len(old))]
            grown = np.concatenate([old, seen[new][order]]).astype(np.result_type(old.dtype, seen.dtype))
            at = np.clip(np.searchsorted(seen, grown), 0, max(len(seen) - 1, 0))
            found = (at < len(seen)) & (seen[at] == grown) if len(seen) else np.zeros(len(grown), bool)
            keys.append(grown)
            counts.append(np.where(found, seen_counts[at] if len(seen) else 0, 0).astype(np.int64))
        return keys, counts
