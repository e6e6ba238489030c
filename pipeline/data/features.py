"""The feature contract: how a raw row becomes model input, for preprocessing, training and serving alike.

The dense transform (``data.dense_transform``), the id mapping (vocab or hash mode, caps, the reserved
ids 0 = missing and 1 = rare or unseen), the frequency threshold (``data.min_id_frequency``, as table
sizes) and the column layout, in one object (:class:`FeatureTransform`) built from a manifest or from an
export. Preprocessing maps raw blocks with it, the loader builds its batches with it, and predict
scores raw rows with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import (
    DataConfig,
    DenseTransform,
    IdMode,
)
from pipeline.data.jagged import Lists, feature_major
from pipeline.data.manifest import Manifest
from pipeline.data.schema import Schema
from pipeline.data.tsv import BadRows, RawBlock, compiled, read_blocks
from pipeline.data.vocab import vocab_counts, vocab_rows

if TYPE_CHECKING:
    import torch

    from pipeline.data.materialize import BagRule

DENSE_TRANSFORMS = {
    DenseTransform.log1p: "log(1 + max(x, 0)), missing -> 0 (the DLRM reference)",
    DenseTransform.torchrec: "log(x - min + 2) in float32 with min over the whole input file, missing -> 0 "
    "(torchrec BinaryCriteoUtils.tsv_to_npys)",
}


MISSING_ID = 0


RARE_ID = 1


_LOG1P_TABLE = np.log1p(np.arange(1 << 16, dtype=np.float64)).astype(np.float32)


def transform_dense(
    block: RawBlock, transform: DenseTransform = DenseTransform.log1p, file_min: int | None = None
) -> np.ndarray:
    """The integer features -> float32 [n, num_dense] (missing is 0 before the transform)."""
    if transform == DenseTransform.log1p:
        x = block.dense
        # Most counts are small: a table of float32(log1p(float64(k))) gives the same bits as computing.
        out = np.take(_LOG1P_TABLE, np.clip(x, 0, len(_LOG1P_TABLE) - 1))
        if x.max(initial=0) >= len(_LOG1P_TABLE):
            large = x >= len(_LOG1P_TABLE)
            out[large] = np.log1p(x[large]).astype(np.float32)
        return out
    # TorchRec's converter, operation for operation: int32, shift by the file's min, float32 log.
    shifted = (block.dense - (file_min - 2)).astype(np.int32)
    return np.log(shifted, dtype=np.float32)


NO_CAP = 2**62  # vocab mode without data.max_ids_per_feature: every value seen in training gets a row


def configured_caps(cfg: DataConfig) -> list[int] | None:
    """Rows per table the config fixes (``data.num_embeddings_per_feature`` or ``data.max_ids_per_feature``); None
    when the data decides: every training value in vocab mode, :func:`auto_hash_cap` in hash mode."""
    if cfg.num_embeddings_per_feature:
        return list(cfg.num_embeddings_per_feature)
    if cfg.max_ids_per_feature is not None:
        return [cfg.max_ids_per_feature] * len(cfg.sparse_columns)
    return None


def auto_hash_cap(num_distinct: int) -> int:
    """Hash mode's table size for a column with ``num_distinct`` training values: ``1 +`` the next power of two
    at or above twice that (at most about two fifths of the values share a row with another)."""
    return 1 + (1 << max(1, 2 * num_distinct - 1).bit_length())


_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: Fibonacci hashing spreads consecutive keys


@compiled
def _fill_table(keys, ids, bits, table_keys, table_ids):  # pragma: no cover - compiled
    """Insert ``keys`` -> ``ids`` (all ids > 0; 0 marks an empty slot) into an open-addressing table of
    ``2**bits`` slots with linear probing."""
    mask = (1 << bits) - 1
    for i in range(keys.shape[0]):
        s = np.int64((np.uint64(keys[i]) * _FIB) >> np.uint64(64 - bits))  # the top bits: < 2^bits
        while table_ids[s] != 0:
            s = (s + 1) & mask
        table_keys[s] = keys[i]
        table_ids[s] = ids[i]


@compiled
def _probe(k, off, b, table_keys, table_ids, rare):  # pragma: no cover - compiled
    """The id of key ``k`` in the table of ``2**b`` slots at ``off``; ``rare`` if it has none."""
    mask = (1 << b) - 1
    s = np.int64((np.uint64(k) * _FIB) >> np.uint64(64 - b))
    while True:
        v = table_ids[off + s]
        if v == 0:
            return rare
        if table_keys[off + s] == k:
            return v
        s = (s + 1) & mask


@compiled
def _lookup_ids(sparse, missing, tables, table_keys, table_ids, offsets, bits, rare, out):  # pragma: no cover
    """``out[i, j]``: the id of ``sparse[i, j]`` in table ``tables[j]``, ``rare`` if it has none, 0 if missing."""
    for j in range(sparse.shape[1]):
        off = offsets[tables[j]]
        b = bits[tables[j]]
        for i in range(sparse.shape[0]):
            out[i, j] = 0 if missing[i, j] else _probe(sparse[i, j], off, b, table_keys, table_ids, rare)


@compiled
def _lookup_values(keys, tables, table_keys, table_ids, offsets, bits, rare, out):  # pragma: no cover
    """``out[i]``: the id of ``keys[i]`` in table ``tables[i]``, ``rare`` if it has none."""
    for i in range(keys.shape[0]):
        t = tables[i]
        out[i] = _probe(keys[i], offsets[t], bits[t], table_keys, table_ids, rare)


class IdMapper:
    """Raw hashes -> table row ids, in vocab or hash mode.

    Vocab mode looks ids up in one open-addressing hash table per column (compiled, at most half full):
    a probe or two per value, where a binary search over a sorted vocabulary of millions of keys cost
    a cache miss per step. The tables take 2-4 slots of key + id per vocabulary entry (16-32 bytes for
    hex hashes and int32 ids; a 10M-entry column: 256 MiB at most).
    """

    def __init__(
        self, mode: IdMode, caps: list[int], vocab: list[np.ndarray] | None = None, multi_index: list[int] = ()
    ):
        """``caps``: rows per table (hash mode's modulus + 1; in vocab mode only a bound, see ``NO_CAP``);
        ``vocab``: vocab mode's values per column, most frequent first (id ``2 + position``);
        ``multi_index``: the list columns' tables (the others' ids are ``RawBlock.sparse``'s columns)."""
        self.mode = IdMode(mode)
        self.caps = list(caps)
        self.multi_index = np.asarray(multi_index, dtype=np.int64)
        self.one_hot_index = np.asarray([j for j in range(len(caps)) if j not in set(multi_index)], dtype=np.int64)
        self.num_embeddings = [len(v) + 2 for v in vocab] if vocab is not None else list(self.caps)
        self.dtype = np.int32 if max(self.num_embeddings) < 2**31 else np.int64
        if vocab is not None:
            # Slots per column: a power of two at least twice the vocabulary (16 at least).
            self.bits = np.array([max(4, int(2 * len(v) - 1).bit_length()) for v in vocab], dtype=np.int64)
            sizes = 1 << self.bits
            self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            key_dtype = np.result_type(np.uint32, *(v.dtype for v in vocab))
            self.table_keys = np.zeros(int(sizes.sum()), dtype=key_dtype)
            self.table_ids = np.zeros(int(sizes.sum()), dtype=self.dtype)
            for j, v in enumerate(vocab):
                span = slice(self.offsets[j], self.offsets[j] + sizes[j])
                ids = np.arange(2, len(v) + 2, dtype=self.dtype)  # 0 missing, 1 rare; by descending frequency
                _fill_table(v.astype(key_dtype), ids, self.bits[j], self.table_keys[span], self.table_ids[span])

    def __call__(self, block: RawBlock) -> np.ndarray:
        """The one-hot columns' ids [n, num_one_hot]."""
        caps = [self.caps[j] for j in self.one_hot_index]
        if self.mode == IdMode.hash:
            # All columns at once, in the hashes' own width (uint32 division is several times int64's).
            h = block.sparse
            wide = h.dtype != np.uint32 or max(caps, default=2) - 1 > np.iinfo(np.uint32).max
            ids = h % np.asarray([c - 1 for c in caps], dtype=h.dtype if not wide else np.int64)
            # A missing value's hash is 0: adding "present" (1 or 0) gives 1 + hash % (cap - 1), or MISSING_ID.
            np.add(ids, ~block.sparse_missing, out=ids, casting="unsafe")
            return ids.astype(self.dtype, order="C")  # rows are written whole
        out = np.empty(block.sparse.shape, dtype=self.dtype)
        _lookup_ids(
            block.sparse.astype(self.table_keys.dtype, copy=False),
            block.sparse_missing,
            self.one_hot_index,
            self.table_keys,
            self.table_ids,
            self.offsets,
            self.bits,
            RARE_ID,
            out,
        )
        return out

    def map_lists(self, lists: Lists) -> Lists:
        """The list columns' raw ids -> table row ids (an id is never missing: an empty list has none)."""
        tables = self.multi_index[lists.columns()]
        if self.mode == IdMode.hash:
            caps = np.asarray(self.caps, dtype=np.int64)[tables] - 1
            ids = lists.values.astype(np.int64) % caps + 1
            return lists.with_values(ids.astype(self.dtype))
        out = np.empty(len(lists.values), dtype=self.dtype)
        _lookup_values(
            lists.values.astype(self.table_keys.dtype, copy=False),
            tables,
            self.table_keys,
            self.table_ids,
            self.offsets,
            self.bits,
            RARE_ID,
            out,
        )
        return lists.with_values(out)


def table_sizes(manifest: Manifest, processed_dir: str | Path, min_frequency: int) -> list[int]:
    """Rows of each feature's table for training on this data with ``data.min_id_frequency``.

    Vocab mode: the ids of values seen fewer than ``min_frequency`` times in training are folded into the
    shared "rare or unseen" row (id 1) when batches are read, so one preprocessing serves every threshold
    (a tuner can search it); the table holds the values above it plus the two reserved rows. Hash mode: the
    manifest's sizes.
    """
    sizes = list(manifest.num_embeddings_per_feature)
    if manifest.vocab_generations:  # grown: the threshold was applied as it grew (the settings hold it), and
        return sizes  # every value owns a row
    if manifest.id_mode != IdMode.vocab.value or min_frequency <= 1:
        return sizes
    counts = vocab_counts(processed_dir, len(sizes))
    return [min(n, vocab_rows(c, min_frequency) + 2) for n, c in zip(sizes, counts, strict=True)]


def file_dense_min(
    path: str | Path, schema: Schema, labelled: bool = True, block_size_mb: float = 8, bad_rows: str = "error"
) -> int:
    """The smallest integer feature in a raw file (missing counts as 0): the minimum of TorchRec's converter,
    which ``data.dense_transform=torchrec`` shifts by."""
    lo = None
    for block in read_blocks(path, block_size_mb, bad_rows, BadRows(), labelled, schema):
        if block.dense.size:
            m = int(block.dense.min())
            lo = m if lo is None else min(lo, m)
    return 0 if lo is None else lo


class FeatureTransform:
    """Raw rows -> model input: dense features, table row ids, the ``KeyedJaggedTensor`` of one id per feature.

    Args:
        schema: the column layout (its ``feature_names`` are the KJT keys).
        dense_transform: the integer features' transform.
        table_sizes: rows of each feature's table; an id at or above it reads as the rare-or-unseen id.
        ids: maps raw values to ids (None where the ids are stored already: the loader's batches).
        bags: one-hot raw rows become these bags (a model trained on ``data.materialize`` data).
    """

    def __init__(
        self,
        schema: Schema,
        dense_transform: DenseTransform,
        table_sizes: list[int],
        ids: IdMapper | None = None,
        bags: BagRule | None = None,
    ) -> None:
        self.schema = schema
        self.bags = bags
        self.dense_transform = DenseTransform(dense_transform)
        self.table_sizes = list(table_sizes)
        self.ids = ids
        stored = ids.num_embeddings if ids is not None else None
        self._limits = np.asarray(self.table_sizes, dtype=np.int64)
        self._fold = stored is None or list(stored) != self.table_sizes

    @classmethod
    def from_manifest(cls, manifest: Manifest, processed_dir: str | Path, min_frequency: int = 1) -> FeatureTransform:
        """For the ids preprocessing stored, read under ``data.min_id_frequency``."""
        dense = next(
            (t for t, text in DENSE_TRANSFORMS.items() if text == manifest.dense_transform), DenseTransform.log1p
        )
        return cls(manifest.schema, dense, table_sizes(manifest, processed_dir, min_frequency))

    def dense(self, block: RawBlock, file_min: int | None = None) -> np.ndarray:
        """The block's integer features, transformed: float32 [n, num_dense]."""
        return transform_dense(block, self.dense_transform, file_min)

    def map_ids(self, block: RawBlock) -> np.ndarray:
        """The block's raw one-hot categorical values -> table row ids [n, num_one_hot]."""
        if self.ids is None:
            raise ValueError("this transform reads stored ids: it has no id mapping")
        if self.bags is not None:  # every column is a bag (see map_lists)
            return np.zeros((len(block), 0), dtype=self.ids.dtype)
        return self.fold(self.ids(block))

    def map_lists(self, block: RawBlock) -> Lists | None:
        """The block's raw list columns -> table row ids (row-major), or None without list columns."""
        if self.ids is None and (block.lists is not None or self.bags is not None):
            raise ValueError("this transform reads stored ids: it has no id mapping")
        if self.bags is not None:  # one-hot rows made into bags as data.materialize made the training data's
            lists = self.bags.bags(self.ids(block))
        elif block.lists is None:
            return None
        else:
            lists = self.ids.map_lists(block.lists)
        if not self._fold:
            return lists
        limits = self._limits[self.schema.multi_index][lists.columns()]
        return lists.with_values(np.where(lists.values >= limits, RARE_ID, lists.values).astype(lists.values.dtype))

    def fold(self, ids: np.ndarray) -> np.ndarray:
        """One-hot ids at or above their table's size (values below the frequency threshold) -> the
        rare-or-unseen id."""
        if not self._fold:
            return ids
        return np.where(ids >= self._limits[self.schema.one_hot_index], RARE_ID, ids)

    def fold_feature_major(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """:meth:`fold` for list ids laid out feature-major (``lengths`` [M, b])."""
        if not self._fold:
            return values
        limits = np.repeat(self._limits[self.schema.multi_index], lengths.sum(axis=1))
        return np.where(values >= limits, RARE_ID, values)

    def kjt(self, ids: np.ndarray | torch.Tensor, lists: Lists | tuple | None = None):
        """A ``KeyedJaggedTensor`` (values feature-major, as TorchRec wants): one id per row for one-hot
        features, the row's ids for list features (``lists``: row-major :class:`Lists`, or feature-major
        ``(values, lengths [M, b], weights)`` as :func:`feature_major` gives them), weights when the
        schema has weighted columns (1.0 for every other id)."""
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        ids = np.asarray(ids)
        b = ids.shape[0]
        names = list(self.schema.feature_names)
        if not self.schema.multi_hot:
            values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1).astype(np.int64))
            return KeyedJaggedTensor(
                keys=names, values=values, lengths=torch.ones(len(names) * b, dtype=torch.int32), stride=b
            )
        if isinstance(lists, Lists):
            lists = feature_major(lists.values, lists.weights, lists.lengths, lists.starts(), np.arange(len(lists)))
        list_values, list_lengths, list_weights = lists
        bounds = np.concatenate([[0], np.cumsum(list_lengths.sum(axis=1, dtype=np.int64))])
        kind = {j: ("one", k) for k, j in enumerate(self.schema.one_hot_index)}
        kind |= {j: ("list", m) for m, j in enumerate(self.schema.multi_index)}
        lengths = np.ones((len(names), b), np.int32)
        values, weights = [], []
        weighted = bool(self.schema.weighted)
        for j in range(len(names)):
            what, k = kind[j]
            if what == "one":
                values.append(ids[:, k].astype(np.int64))
                if weighted:
                    weights.append(np.ones(b, np.float32))
            else:
                lengths[j] = list_lengths[k]
                values.append(list_values[bounds[k] : bounds[k + 1]].astype(np.int64, copy=False))
                if weighted:
                    weights.append(list_weights[bounds[k] : bounds[k + 1]])
        return KeyedJaggedTensor(
            keys=names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(lengths.reshape(-1)),
            weights=torch.from_numpy(np.concatenate(weights)) if weighted else None,
            stride=b,
        )

    def batch(self, dense: np.ndarray, ids: np.ndarray, labels: np.ndarray, lists: Lists | tuple | None = None):
        """A TorchRec ``Batch``: dense [b, num_dense] float32, the KJT, labels [b] float32."""
        import torch
        from torchrec.datasets.utils import Batch

        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            sparse_features=self.kjt(ids, lists),
            labels=torch.from_numpy(np.asarray(labels, dtype=np.float32)),
        )
