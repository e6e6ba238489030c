"""Raw TSV (Criteo's layout or the one ``data.*_columns`` declare) -> columnar binary splits +
``manifest.json``, restartable per input file.

Output folder (``data.processed_dir``)::

    manifest.json                 written last: rows per split and their parts (files, dtype, shape,
                                  sha256), the schema (dense_columns, sparse_columns, feature_names =
                                  the KJT keys, categorical_format), table sizes, id settings, dense
                                  transform, sources with sizes, bad-row counts by kind, the
                                  generator's optimum if known
    vocab.npz, vocab.json         id_mode=vocab: per sparse column (arrays C1..CF by position), the raw
                                  hashes or ids that own a table row
    parts/<NNN>/<split>/dense.bin     float32 [rows, num_dense], already transformed
    parts/<NNN>/<split>/sparse.bin    int32 [rows, num_sparse] table row ids (int64 when a cap exceeds 2^31)
    parts/<NNN>/<split>/labels.bin    uint8 [rows]
    parts/<NNN>/done.json         input file NNN is finished: its outputs' sha256s, rows, bad rows

One part per input file (raw file NNN in order), holding that file's rows of each split it feeds. A
part's ``done.json`` is written (atomically, after its files are synced) only when it is complete,
so a killed run resumes at the file it was on: finished parts whose settings and source match are
verified by checksum and skipped. The manifest is written after every part is done, so a present
manifest whose settings and sources match means the data can be used as is.

Ids: row 0 of every table is "missing", row 1 (vocab mode) is "rare or unseen"; vocab ids follow by
descending training frequency. In hash mode an id is ``1 + hash % (cap - 1)``. Table sizes are
written to the manifest and the model reads them from there.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import (
    DataConfig,
    DenseTransform,
    IdMode,
    SplitMode,
)
from pipeline.errors import DataError, MissingDataError
from pipeline.data.criteo import (
    CRITEO,
    BadRows,
    RawBlock,
    RawDataError,
    Schema,
    compile_scanner,
    compiled,
    count_lines,
    read_blocks,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 3  # 3: vocab.npz holds the counts; data.min_id_frequency applies when batches are read
DONE = "done.json"
DENSE_TRANSFORMS = {
    DenseTransform.log1p: "log(1 + max(x, 0)), missing -> 0 (the DLRM reference)",
    DenseTransform.torchrec: "log(x - min + 2) in float32 with min over the whole input file, missing -> 0 "
                             "(torchrec BinaryCriteoUtils.tsv_to_npys)",
}
MISSING_ID = 0
RARE_ID = 1
SPLITS = ("train", "val", "test")
_HASH_CHUNK = 8 << 20


@dataclass
class _Unit:
    """One input file and which of its lines go to which split."""

    index: int
    path: Path
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> [first line, end line)
    random_split: bool = False  # lines are assigned by the seeded random split instead

    @property
    def name(self) -> str:
        return f"{self.index:03d}"

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.random_split else tuple(s for s in SPLITS if s in self.ranges)


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _expand(key: str, entries: list[str]) -> list[Path]:
    """Files and glob patterns of one config key, patterns expanded in natural order (day_2 before day_10).

    Raises:
        MissingDataError: a pattern matches nothing, or a file is not there (the key is named).
    """
    paths = []
    for entry in entries:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry), key=_natural_key)
            if not matches:
                raise MissingDataError(f"{key}: pattern {entry!r} matches no file")
            paths.extend(Path(m) for m in matches if Path(m).is_file())
        else:
            paths.append(Path(entry))
    for path in paths:
        if not path.is_file():
            raise MissingDataError(f"raw file {path} not found ({key}={entries})")
    return paths


def split_files(cfg: DataConfig) -> dict[str, list[Path]]:
    """``data.split=files``: each split's input files. An empty list means ``<raw_dir>/<split>.tsv``; for
    test, that file is optional (no test split without it).

    Raises:
        MissingDataError: a file or pattern is not there, or train/val have none (the key is named).
        DataError: one file is listed for two splits.
    """
    out: dict[str, list[Path]] = {}
    for split in SPLITS:
        key = f"data.{split}_files"
        entries = list(getattr(cfg, f"{split}_files"))
        if entries:
            out[split] = _expand(key, entries)
            continue
        default = Path(cfg.raw_dir) / f"{split}.tsv"
        if default.is_file():
            out[split] = [default]
        elif split != "test":
            raise MissingDataError(f"no {split} data: {key} is empty and {default} does not exist. Name your "
                                   f"files, e.g. {key}=[clicks/{split}_*.tsv.gz] (data.raw_dir={cfg.raw_dir})")
    seen: dict[Path, str] = {}
    for split, paths in out.items():
        for path in paths:
            other = seen.setdefault(path.resolve(), split)
            if other != split:
                raise DataError(f"{path} is listed for both {other} and {split} (data.{other}_files, "
                                f"data.{split}_files): a file feeds one split")
    return out


def raw_files(cfg: DataConfig) -> list[Path]:
    """The input files in order (``split=files``: train, then val, then test files).

    Raises:
        MissingDataError: a file or pattern matches nothing (the config key is named).
    """
    if cfg.split == SplitMode.files:
        return [p for paths in split_files(cfg).values() for p in paths]
    return _expand("data.raw_files", list(cfg.raw_files))


def _plan_units(cfg: DataConfig, files: list[Path]) -> list[_Unit]:
    if cfg.split == SplitMode.files:
        per_split = [(p, s) for s, paths in split_files(cfg).items() for p in paths]
        return [_Unit(i, p, {s: (0, 2**62)}) for i, (p, s) in enumerate(per_split)]
    if cfg.split == SplitMode.random:
        return [_Unit(0, files[0], random_split=True)]
    if cfg.split == SplitMode.kaggle:
        # train.txt holds 7 days in order; the DLRM reference takes days 0-5 for training and
        # halves day 6 into validation and test.
        n = count_lines(files[0])
        train_end = n * 6 // 7
        val_end = train_end + (n - train_end) // 2
        return [_Unit(0, files[0], {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n)})]
    # days: every file but the last is training; the last day is halved into validation and test.
    if len(files) < 2:
        raise DataError(f"data.split=days needs at least 2 day files, got {[str(f) for f in files]}")
    n = count_lines(files[-1])
    units = [_Unit(i, p, {"train": (0, 2**62)}) for i, p in enumerate(files[:-1])]
    units.append(_Unit(len(files) - 1, files[-1], {"val": (0, n // 2), "test": (n // 2, n)}))
    return units


_WINDOW = 1 << 20


@functools.lru_cache(maxsize=2)
def _window_draws(seed: int, window: int) -> np.ndarray:
    """The uniform draws of one 1M-line window (blocks are smaller: consecutive blocks reuse them)."""
    return np.random.default_rng([seed, window]).random(_WINDOW)


def _random_assignment(cfg: DataConfig, lines: np.ndarray) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each line, seeded per line (never by block size)."""
    out = np.empty(len(lines), dtype=np.int8)
    w = lines // _WINDOW
    for wi in np.unique(w):
        sel = w == wi
        u = _window_draws(cfg.split_seed, int(wi))[lines[sel] - wi * _WINDOW]
        out[sel] = np.where(u < cfg.val_fraction, 1, np.where(u < cfg.val_fraction + cfg.test_fraction, 2, 0))
    return out


def _assignment(unit: _Unit, cfg: DataConfig, lines: np.ndarray) -> np.ndarray:
    """Split index of each line of a block: 0 train, 1 val, 2 test, -1 none."""
    if unit.random_split:
        return _random_assignment(cfg, lines)
    assigned = np.full(len(lines), -1, dtype=np.int8)
    for s, (lo, hi) in unit.ranges.items():
        assigned[(lines >= lo) & (lines < hi)] = SPLITS.index(s)
    return assigned


def _assigned_blocks(unit: _Unit, cfg: DataConfig, counter: BadRows, only: tuple[str, ...] = SPLITS,
                     then: Callable[[RawBlock, np.ndarray], Any] | None = None,
                     ) -> Iterator[tuple[RawBlock, np.ndarray, Any]]:
    """(block, split index of each row: 0 train, 1 val, 2 test, -1 none, ``then(block, split index)``)
    of one input file; the split indices and ``then`` are computed in the reader's worker threads.
    Stops reading once every wanted line range (of the splits in ``only``) has ended."""
    wanted = [s for s in unit.splits if s in only]
    last_line = None if unit.random_split else max(unit.ranges[s][1] for s in wanted)

    def assign(block: RawBlock) -> tuple[np.ndarray, Any]:
        assigned = _assignment(unit, cfg, block.line_index)
        return assigned, None if then is None else then(block, assigned)

    for block, (assigned, extra) in read_blocks(unit.path, cfg.block_size_mb, cfg.bad_rows.value, counter,
                                                schema=Schema.from_config(cfg), then=assign):
        lines = block.line_index
        yield block, assigned, extra
        if last_line is not None and len(lines) and lines[-1] + 1 >= last_line:
            break


def _unit_blocks(unit: _Unit, cfg: DataConfig, counter: BadRows,
                 only: tuple[str, ...] = SPLITS) -> Iterator[tuple[str, RawBlock]]:
    """(split, rows of a block) of one input file, for the splits in ``only``."""
    wanted = [s for s in unit.splits if s in only]
    for block, assigned, _ in _assigned_blocks(unit, cfg, counter, only):
        for s in wanted:
            keep = assigned == SPLITS.index(s)
            if keep.all():
                yield s, block
            elif keep.any():
                yield s, block.take(keep)


_LOG1P_TABLE = np.log1p(np.arange(1 << 16, dtype=np.float64)).astype(np.float32)


def transform_dense(block: RawBlock, transform: DenseTransform = DenseTransform.log1p,
                    file_min: int | None = None) -> np.ndarray:
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


class _IdCounter:
    """Per column, the training hashes and how often each occurs; merged as it grows to bound memory."""

    def __init__(self, num_sparse: int) -> None:
        self.num_sparse = num_sparse
        self.keys = [np.zeros(0, np.uint32) for _ in range(num_sparse)]
        self.counts = [np.zeros(0, np.int64) for _ in range(num_sparse)]
        self.pending: list[list[np.ndarray]] = [[] for _ in range(num_sparse)]
        self.pending_len = [0] * num_sparse

    def add(self, block: RawBlock) -> None:
        for j in range(self.num_sparse):
            values = block.sparse[~block.sparse_missing[:, j], j]
            self.pending[j].append(values)
            self.pending_len[j] += len(values)
            if self.pending_len[j] > max(4 * len(self.keys[j]), 1 << 22):
                self._merge(j)

    def _merge(self, j: int) -> None:
        if not self.pending[j]:
            return
        new, cnt = np.unique(np.concatenate(self.pending[j]), return_counts=True)
        keys, inv = np.unique(np.concatenate([self.keys[j], new]), return_inverse=True)
        self.counts[j] = np.bincount(inv, weights=np.concatenate([self.counts[j], cnt]).astype(np.float64),
                                     minlength=len(keys)).astype(np.int64)
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
def _lookup_ids(sparse, missing, table_keys, table_ids, offsets, bits, rare, out):  # pragma: no cover
    """``out[i, j]``: the id of ``sparse[i, j]`` in column ``j``'s table, ``rare`` if it has none, 0 if missing."""
    for j in range(sparse.shape[1]):
        off = offsets[j]
        b = bits[j]
        mask = (1 << b) - 1
        for i in range(sparse.shape[0]):
            if missing[i, j]:
                out[i, j] = 0
                continue
            k = sparse[i, j]
            s = np.int64((np.uint64(k) * _FIB) >> np.uint64(64 - b))
            while True:
                v = table_ids[off + s]
                if v == 0:
                    out[i, j] = rare
                    break
                if table_keys[off + s] == k:
                    out[i, j] = v
                    break
                s = (s + 1) & mask


class _IdMapper:
    """Raw hashes -> table row ids, in vocab or hash mode.

    Vocab mode looks ids up in one open-addressing hash table per column (compiled, at most half full):
    a probe or two per value, where a binary search over a sorted vocabulary of millions of keys cost
    a cache miss per step. The tables take 2-4 slots of key + id per vocabulary entry (16-32 bytes for
    hex hashes and int32 ids; a 10M-entry column: 256 MiB at most).
    """

    def __init__(self, cfg: DataConfig, vocab: list[np.ndarray] | None, caps: list[int] | None = None):
        self.mode = cfg.id_mode
        self.caps = list(caps or configured_caps(cfg) or [NO_CAP] * len(cfg.sparse_columns))
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
        if self.mode == IdMode.hash:
            # All columns at once, in the hashes' own width (uint32 division is several times int64's).
            h = block.sparse
            wide = h.dtype != np.uint32 or max(self.caps) - 1 > np.iinfo(np.uint32).max
            ids = h % np.asarray([c - 1 for c in self.caps], dtype=h.dtype if not wide else np.int64)
            # A missing value's hash is 0: adding "present" (1 or 0) gives 1 + hash % (cap - 1), or MISSING_ID.
            np.add(ids, ~block.sparse_missing, out=ids, casting="unsafe")
            return ids.astype(self.dtype, order="C")  # rows are written whole
        out = np.empty(block.sparse.shape, dtype=self.dtype)
        _lookup_ids(block.sparse.astype(self.table_keys.dtype, copy=False), block.sparse_missing, self.table_keys,
                    self.table_ids, self.offsets, self.bits, RARE_ID, out)
        return out


def compile_kernels() -> None:
    """Compile (or load from the cache) the raw-row scanner and the vocabulary lookup, e.g. while
    building a container image."""
    compile_scanner()
    num_sparse = len(CRITEO.sparse_columns)
    mapper = _IdMapper(DataConfig(id_mode=IdMode.vocab), [np.array([7, 3], np.uint32)] * num_sparse, [NO_CAP] * num_sparse)
    block = RawBlock(np.zeros(1, np.int8), np.zeros((1, 13), np.int64), np.zeros((1, 13), bool),
                     np.full((1, 26), 3, np.uint32), np.zeros((1, 26), bool), np.zeros(1, np.int64))
    if mapper(block).tolist() != [[3] * 26]:
        raise RuntimeError("the compiled vocabulary lookup gave a wrong id")


_SYNC_EVERY = 8 << 20  # bytes written between background fdatasyncs


class _SplitWriter:
    """Appends blocks to one part's binary files of a split, hashing them as they are written.

    Written data is flushed to disk in the background (an ``fdatasync`` on a helper thread every
    ``_SYNC_EVERY`` bytes) while parsing goes on, so the final ``fsync`` at ``close`` finds little
    left to write instead of the whole part. A failed background sync (disk full, I/O error) is
    raised by ``close``.
    """

    def __init__(self, root: Path, rel_dir: str, sparse_dtype: np.dtype, schema: Schema):
        self.root = root
        self.rel_dir = rel_dir
        self.widths = {"dense": [schema.num_dense], "sparse": [schema.num_sparse], "labels": []}
        (root / rel_dir).mkdir(parents=True, exist_ok=True)
        self.dtypes = {"dense": np.dtype(np.float32), "sparse": np.dtype(sparse_dtype), "labels": np.dtype(np.uint8)}
        self.files = {k: open(root / rel_dir / f"{k}.bin", "wb") for k in self.dtypes}
        self.hashes = {k: hashlib.sha256() for k in self.dtypes}
        self.num_rows = 0
        self.unsynced = 0
        self.syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-sync")
        self.syncing: Future | None = None  # the latest background sync
        self.final: Future | None = None  # the final fsync, once closing has started

    def write(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> None:
        for key, arr in (("dense", dense), ("sparse", sparse), ("labels", labels)):
            buf = memoryview(np.ascontiguousarray(arr, dtype=self.dtypes[key]).reshape(-1)).cast("B")  # [n, 0] too
            self.files[key].write(buf)
            self.hashes[key].update(buf)
            self.unsynced += buf.nbytes
        self.num_rows += len(labels)
        if self.unsynced >= _SYNC_EVERY and (self.syncing is None or self.syncing.done()):
            if self.syncing is not None:
                self.syncing.result()  # raises a failed sync's error
            for f in self.files.values():
                f.flush()
            self.syncing = self.syncer.submit(lambda fds: [os.fdatasync(fd) for fd in fds],
                                              [f.fileno() for f in self.files.values()])
            self.unsynced = 0

    def start_close(self) -> None:
        """Flush and start the final fsync on the helper thread (``close`` waits for it)."""
        if self.final is None:
            for f in self.files.values():
                f.flush()
            self.final = self.syncer.submit(self._final_sync, self.syncing)

    def _final_sync(self, previous: Future | None) -> None:
        if previous is not None:
            previous.result()
        for f in self.files.values():
            os.fsync(f.fileno())

    def abort(self) -> None:
        """Stop the helper thread and close the files (the part is not done: a rerun redoes it)."""
        self.syncer.shutdown(wait=True)
        for f in self.files.values():
            f.close()  # a no-op on a closed file

    def close(self) -> dict:
        """Wait until every byte is on disk (raising a failed sync's error) and close the files."""
        self.start_close()
        try:
            self.final.result()
        finally:
            self.abort()
        return {
            "num_rows": self.num_rows,
            "files": {
                k: {"path": f"{self.rel_dir}/{k}.bin", "dtype": self.dtypes[k].name,
                    "shape": [self.num_rows, *self.widths[k]], "sha256": self.hashes[k].hexdigest()}
                for k in self.dtypes
            },
        }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_files(root: Path, files: dict) -> str | None:
    """None when every file exists with its recorded size and sha256, else what is wrong."""
    for info in files.values():
        path = root / info["path"]
        size = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or not {size} bytes"
        if _sha256_file(path) != info["sha256"]:
            return f"{path} does not match its sha256"
    return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _settings(cfg: DataConfig) -> dict:
    """The inputs that determine the output; outputs made with other settings are rebuilt."""
    schema = Schema.from_config(cfg)
    # Criteo's layout is left out, so data preprocessed before columns could be declared (hours for
    # Criteo 1TB) keeps its fingerprints and is reused; any other layout is part of the settings.
    layout = {} if schema == CRITEO else {"schema": schema.to_dict()}
    return {
        "split": cfg.split.value,
        "raw_files": list(cfg.raw_files),
        **({"files": {k: [str(p) for p in v] for k, v in split_files(cfg).items()}} if cfg.split == SplitMode.files else {}),
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_seed": cfg.split_seed,
        "id_mode": cfg.id_mode.value,
        "caps": configured_caps(cfg) or "auto",
        "dense_transform": cfg.dense_transform.value,
        "bad_rows": cfg.bad_rows.value,
        **layout,
    }


def _sources(files: list[Path]) -> list[dict]:
    """The raw files with size and mtime: outputs built from other files are stale."""
    out = []
    for path in files:
        st = path.stat()
        out.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _fingerprint(settings: dict, source: dict, extra: str = "") -> str:
    return hashlib.sha256(json.dumps([settings, source, extra], sort_keys=True).encode()).hexdigest()[:16]


def manifest_schema(manifest: dict) -> Schema:
    """The column layout a manifest records (Criteo's for manifests written before layouts were declared)."""
    return Schema.from_dict(manifest)


def _vocab_counts(processed_dir: str | Path, num_sparse: int) -> list[np.ndarray]:
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


def table_sizes(manifest: dict, processed_dir: str | Path, min_frequency: int) -> list[int]:
    """Rows of each feature's table for training on this data with ``data.min_id_frequency``.

    Vocab mode: the ids of values seen fewer than ``min_frequency`` times in training are folded into the
    shared "rare or unseen" row (id 1) when batches are read, so one preprocessing serves every threshold
    (a tuner can search it); the table holds the values above it plus the two reserved rows. Hash mode: the
    manifest's sizes.
    """
    sizes = list(manifest["num_embeddings_per_feature"])
    if manifest.get("settings", {}).get("id_mode") != IdMode.vocab.value or min_frequency <= 1:
        return sizes
    counts = _vocab_counts(processed_dir, len(sizes))
    return [min(n, vocab_rows(c, min_frequency) + 2) for n, c in zip(sizes, counts, strict=True)]


def load_vocab(processed_dir: str | Path, num_sparse: int, min_frequency: int = 1) -> list[np.ndarray]:
    """Per column, the raw values that own a table row under ``min_frequency`` (id ``2 + position``)."""
    path = Path(processed_dir) / "vocab.npz"
    with np.load(path) as z:
        keys = [z[f"C{j + 1}"] for j in range(num_sparse)]
    if min_frequency <= 1:
        return keys
    counts = _vocab_counts(processed_dir, num_sparse)
    return [k[: vocab_rows(c, min_frequency)] for k, c in zip(keys, counts, strict=True)]


def load_manifest(processed_dir: str | Path) -> dict:
    """Read a finished preprocessing's manifest.

    Raises:
        FileNotFoundError: naming the folder and the command that creates it.
    """
    path = Path(processed_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: preprocess first (./launch.sh preprocess data=...)")
    return json.loads(path.read_text())


def is_current(cfg: DataConfig) -> bool:
    """True when processed_dir holds a finished preprocessing of the same sources and settings."""
    path = Path(cfg.processed_dir) / MANIFEST
    if not path.exists():
        return False
    m = json.loads(path.read_text())
    try:
        sources = _sources(raw_files(cfg))
    except FileNotFoundError:
        return False
    if m.get("version") != MANIFEST_VERSION or m.get("sources") != sources:
        return False
    if manifest_schema(m) != Schema.from_config(cfg):
        logger.info("%s was preprocessed with columns %s, the config declares %s: preprocessing again", path,
                    manifest_schema(m).to_dict(), Schema.from_config(cfg).to_dict())
        return False
    return m.get("settings") == _settings(cfg)


def _count_ids(cfg: DataConfig, units: list[_Unit]) -> _IdCounter:
    """A first pass over the training rows: every categorical value and how often it occurs."""
    counter = _IdCounter(len(cfg.sparse_columns))
    ignored = BadRows()  # the main pass counts bad rows; this pass sees the same ones
    for unit in units:
        if "train" in unit.splits:
            for _, block in _unit_blocks(unit, cfg, ignored, only=("train",)):
                counter.add(block)
    return counter


def _load_or_build_vocab(cfg: DataConfig, units: list[_Unit], out: Path, settings: dict,
                         sources: list[dict]) -> tuple[list[np.ndarray], str]:
    """The vocabulary (every training value by descending count, at most the cap) from a first pass over the
    training rows, with the counts; reused when already built and intact."""
    marker, npz = out / "vocab.json", out / "vocab.npz"
    key = _fingerprint(settings, sources)
    if marker.exists() and npz.exists():
        m = json.loads(marker.read_text())
        if m.get("fingerprint") == key and _sha256_file(npz) == m.get("sha256"):
            logger.info("vocabulary in %s verified, reused", npz)
            with np.load(npz) as z:
                return [z[f"C{j + 1}"] for j in range(len(cfg.sparse_columns))], m["sha256"]
    t0 = time.perf_counter()
    counter = _count_ids(cfg, units)
    vocab, counts = counter.vocab(configured_caps(cfg) or [NO_CAP] * len(cfg.sparse_columns))
    marker.unlink(missing_ok=True)
    tmp = out / "vocab.tmp.npz"
    np.savez(tmp, **{f"C{j + 1}": v for j, v in enumerate(vocab)}, **{f"count_C{j + 1}": c for j, c in enumerate(counts)})
    os.replace(tmp, npz)
    digest = _sha256_file(npz)
    _write_json(marker, {"fingerprint": key, "sha256": digest, "sizes": [len(v) for v in vocab]})
    logger.info("built the vocabulary in %.1fs: %s ids", time.perf_counter() - t0, f"{sum(len(v) for v in vocab):,}")
    return vocab, digest


def _load_or_count_hash_caps(cfg: DataConfig, units: list[_Unit], out: Path, settings: dict,
                             sources: list[dict]) -> list[int]:
    """Hash mode without a configured cap: :func:`auto_hash_cap` of each column's distinct training values,
    from a first pass (reused from ``hash_caps.json`` when the settings and sources match)."""
    marker = out / "hash_caps.json"
    key = _fingerprint(settings, sources)
    if marker.exists():
        m = json.loads(marker.read_text())
        if m.get("fingerprint") == key:
            return m["caps"]
    t0 = time.perf_counter()
    distinct = _count_ids(cfg, units).num_distinct()
    caps = [auto_hash_cap(n) for n in distinct]
    _write_json(marker, {"fingerprint": key, "distinct": distinct, "caps": caps})
    logger.info("hash caps from %s distinct training values per column in %.1fs (data.max_ids_per_feature=null): %s",
                distinct, time.perf_counter() - t0, caps)
    return caps


def _dense_min(unit: _Unit, cfg: DataConfig) -> int:
    """The smallest integer feature in the whole file (missing counts as 0), as TorchRec's converter takes it."""
    lo = None
    for block in read_blocks(unit.path, cfg.block_size_mb, cfg.bad_rows.value, BadRows(),
                             schema=Schema.from_config(cfg)):
        if block.dense.size:
            m = int(block.dense.min())
            lo = m if lo is None else min(lo, m)
    return 0 if lo is None else lo


def _process_unit(unit: _Unit, cfg: DataConfig, out: Path, mapper: _IdMapper, key: str) -> dict:
    """Convert one input file into its part; returns the part's done record."""
    t0 = time.perf_counter()
    rel = f"parts/{unit.name}"
    file_min = _dense_min(unit, cfg) if cfg.dense_transform == DenseTransform.torchrec else None
    counter = BadRows()
    writers = {s: _SplitWriter(out, f"{rel}/{s}", mapper.dtype, Schema.from_config(cfg)) for s in unit.splits}

    def outputs(block: RawBlock, assigned: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
        """In the reader's threads: each split's rows, transformed and mapped, ready to write."""
        # The whole block is transformed and mapped, then its (narrower) outputs split: rows are independent.
        dense, ids, labels = transform_dense(block, cfg.dense_transform, file_min), mapper(block), block.labels
        rows = {}
        for split in writers:
            keep = assigned == SPLITS.index(split)
            if keep.all():
                rows[split] = dense, ids, labels
            elif keep.any():
                rows[split] = dense[keep], ids[keep], labels[keep]
        return rows

    try:
        for _, _, rows in _assigned_blocks(unit, cfg, counter, then=outputs):
            for split, (dense, ids, labels) in rows.items():
                writers[split].write(dense, ids, labels)
        for writer in writers.values():
            writer.start_close()  # the splits' final fsyncs run side by side
        closed = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record = {
        "fingerprint": key,
        "source": _sources([unit.path])[0],
        "splits": closed,
        "bad_rows": counter.to_dict(),
        "dense_min": file_min,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json(out / rel / DONE, record)
    rows = sum(v["num_rows"] for v in record["splits"].values())
    if rows == 0:
        if counter.total:
            raise DataError(f"{unit.path}: all {counter.total:,} rows are malformed and were skipped "
                            f"(data.bad_rows=skip; by kind {({k: v for k, v in counter.counts.items() if v})}); first: "
                            f"{counter.examples[0] if counter.examples else '-'}")
        raise DataError(f"{unit.path} has no rows: an empty input file")
    logger.info("part %s: %s -> %s rows in %.1fs (%s rows/s)%s", unit.name, unit.path, f"{rows:,}",
                record["seconds"], f"{rows / max(record['seconds'], 1e-9):,.0f}",
                f", skipped {counter.total} bad rows {counter.counts}" if counter.total else "")
    for example in counter.examples:
        logger.warning("skipped bad row %s", example)
    return record


def _finished_part(unit: _Unit, out: Path, key: str) -> dict | None:
    """The done record of a finished, intact part made with the same settings and source, else None."""
    path = out / "parts" / unit.name / DONE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != key or record.get("source") != _sources([unit.path])[0]:
        logger.info("part %s was made from other settings or another version of %s: redoing it", unit.name, unit.path)
        return None
    for split, info in record["splits"].items():
        problem = _verify_files(out, info["files"])
        if problem is not None:
            logger.warning("part %s (%s): %s: redoing it", unit.name, split, problem)
            return None
    logger.info("part %s (%s) already done and verified by sha256: skipped", unit.name, unit.path)
    return record


def preprocess(cfg: DataConfig) -> dict:
    """Convert the raw files named by ``cfg`` into binary splits; return the manifest.

    Restartable: parts finished by an earlier (killed) run with the same settings are verified and
    skipped.

    Raises:
        RawDataError: a malformed raw row under ``data.bad_rows=error`` (file, line and field named).
        FileNotFoundError: a raw file is missing.
    """
    t0 = time.perf_counter()
    out = Path(cfg.processed_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    files = raw_files(cfg)
    for path in files:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty (0 bytes): no rows to preprocess")
    units = _plan_units(cfg, files)
    settings = _settings(cfg)
    sources = _sources(files)
    vocab, id_key = (None, "")
    caps = configured_caps(cfg)
    if cfg.id_mode == IdMode.vocab:
        vocab, id_key = _load_or_build_vocab(cfg, units, out, settings, sources)
        caps = caps or [NO_CAP] * len(cfg.sparse_columns)
    elif caps is None:
        caps = _load_or_count_hash_caps(cfg, units, out, settings, sources)
        id_key = json.dumps(caps)
    mapper = _IdMapper(cfg, vocab, caps)
    records = []
    for unit in units:
        key = _fingerprint(settings, {"index": unit.index, "path": str(unit.path), "ranges": unit.ranges}, id_key)
        records.append(_finished_part(unit, out, key) or _process_unit(unit, cfg, out, mapper, key))
    splits = {s: {"num_rows": 0, "parts": []} for s in SPLITS}
    bad = BadRows()
    for record in records:
        for s, info in record["splits"].items():
            splits[s]["num_rows"] += info["num_rows"]
            splits[s]["parts"].append(info)
        part_bad = BadRows()
        part_bad.counts.update(record["bad_rows"]["by_kind"])
        part_bad.examples = list(record["bad_rows"]["examples"])
        bad.merge(part_bad)
    _check_splits(cfg, units, splits)
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "sources": sources,
        "splits": splits,
        **Schema.from_config(cfg).to_dict(),
        "num_dense_features": len(cfg.dense_columns),
        "num_sparse_features": len(cfg.sparse_columns),
        "num_embeddings_per_feature": mapper.num_embeddings,  # before data.min_id_frequency (see table_sizes)
        "id_caps": None if vocab is not None and configured_caps(cfg) is None else caps,
        "reserved_ids": {"missing": MISSING_ID, **({"rare_or_unseen": RARE_ID} if vocab is not None else {})},
        "dense_transform": DENSE_TRANSFORMS[cfg.dense_transform],
        "bad_rows": bad.to_dict(),
        "optimum": _optimum(cfg),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json(out / MANIFEST, manifest)
    logger.info(
        "preprocessed %d file(s) -> %s in %.1fs: %s%s", len(files), out, manifest["seconds"],
        ", ".join(f"{s} {v['num_rows']:,} rows" for s, v in splits.items()),
        f"; skipped {bad.total} bad rows {bad.counts}" if bad.total else "",
    )
    return manifest


def _check_splits(cfg: DataConfig, units: list[_Unit], splits: dict[str, dict]) -> None:
    """Every split some input feeds must have rows (train and val always do).

    Raises:
        DataError: naming the split, the files that feed it and the setting that sized it.
    """
    for split in SPLITS:
        feeding = [str(u.path) for u in units if split in u.splits]
        if (feeding or split != "test") and splits[split]["num_rows"] == 0:
            share = (f"data.{split}_fraction={getattr(cfg, f'{split}_fraction')}" if split != "train" else
                     f"1 - data.val_fraction - data.test_fraction = {1 - cfg.val_fraction - cfg.test_fraction:g}")
            how = {SplitMode.random: f"{share} of a random split",
                   SplitMode.files: f"data.{split}_files", SplitMode.kaggle: "the Kaggle day split",
                   SplitMode.days: "the day split"}[cfg.split]
            raise DataError(f"split {split} has no rows ({how}; from {feeding or 'no file'}): give it rows, "
                            "e.g. more input or a larger fraction")


def _optimum(cfg: DataConfig) -> dict | None:
    """The synthetic (or MovieLens-style) generator's Bayes-optimal metrics, when the raw data came from it."""
    from pipeline.data.synthetic import OPTIMUM_FILE

    path = Path(cfg.raw_dir) / OPTIMUM_FILE
    if cfg.split == SplitMode.files and path.exists():
        return json.loads(path.read_text())["optimum"]
    return None


__all__ = ["RawDataError", "preprocess", "load_manifest", "manifest_schema", "is_current", "raw_files", "MANIFEST",
           "table_sizes", "load_vocab", "configured_caps"]
