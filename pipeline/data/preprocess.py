"""Raw Criteo TSV -> columnar binary splits + ``manifest.json``.

Output folder (``data.processed_dir``)::

    manifest.json          rows per split, files with dtype/shape/sha256, table sizes, id settings,
                           the dense transform, the source files, the generator's optimum if known
    vocab.npz              id_mode=vocab: per feature, the sorted raw hashes that own a table row
    <split>/dense.bin      float32 [rows, 13], already transformed
    <split>/sparse.bin     int32 [rows, 26] table row ids (int64 when a cap exceeds 2^31)
    <split>/labels.bin     uint8 [rows]

Ids: row 0 of every table is "missing", row 1 (vocab mode) is "rare or unseen"; vocab ids follow by
descending training frequency. In hash mode an id is ``1 + hash % (cap - 1)``. Table sizes are
written to the manifest and the model reads them from there.

The manifest is written last, after every split file is complete, so a present manifest whose
settings match means the outputs are finished and can be reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES, DataConfig, IdMode, SplitMode
from pipeline.data.criteo import RawBlock, RawDataError, read_blocks

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DENSE_TRANSFORM = "log1p(max(x, 0)), missing -> 0"  # the DLRM reference's transform
MISSING_ID = 0
RARE_ID = 1
SPLITS = ("train", "val", "test")


@dataclass
class _Part:
    """A slice of one raw file's rows assigned to a split."""

    path: Path
    split: str
    row_start: int = 0  # first row (0-based) of the slice
    row_end: int | None = None  # end (exclusive); None = end of file
    random_split: bool = False  # rows are assigned per row by the seeded random split instead


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(64 << 20):
            n += chunk.count(b"\n")
    return n


def _plan_parts(cfg: DataConfig) -> list[_Part]:
    raw = Path(cfg.raw_dir)
    if cfg.split == SplitMode.files:
        return [_Part(raw / f"{s}.tsv", s) for s in SPLITS]
    path = Path(cfg.raw_files[0])
    if cfg.split == SplitMode.kaggle:
        # train.txt holds 7 days in order; the DLRM reference takes days 0-5 for training and
        # halves day 6 into validation and test.
        n = _count_lines(path)
        train_end = n * 6 // 7
        val_end = train_end + (n - train_end) // 2
        return [_Part(path, "train", 0, train_end), _Part(path, "val", train_end, val_end), _Part(path, "test", val_end, n)]
    return [_Part(path, s, random_split=True) for s in SPLITS]


def _random_assignment(cfg: DataConfig, first_row: int, n: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of rows [first_row, first_row + n), seeded per row."""
    # Drawn per 1M-row window so the assignment never depends on the parser's block size.
    out = np.empty(n, dtype=np.int8)
    window = 1 << 20
    row = first_row
    while row < first_row + n:
        w = row // window
        u = np.random.default_rng([cfg.split_seed, w]).random(window)
        lo = row - w * window
        hi = min(window, first_row + n - w * window)
        seg = u[lo:hi]
        out[row - first_row : row - first_row + len(seg)] = np.where(
            seg < cfg.val_fraction, 1, np.where(seg < cfg.val_fraction + cfg.test_fraction, 2, 0)
        )
        row += len(seg)
    return out


def _split_blocks(parts: list[_Part], cfg: DataConfig, only: tuple[str, ...] = SPLITS,
                  sparse_only: bool = False) -> Iterator[tuple[str, RawBlock]]:
    """(split, rows of a block) for the parts' splits in ``only``; each raw file is parsed once.

    A single file split by rows (kaggle) or at random feeds all three splits in one pass, and stops
    reading once every wanted row range has ended.
    """
    by_file: dict[Path, list[_Part]] = {}
    for part in parts:
        if part.split in only:
            by_file.setdefault(part.path, []).append(part)
    for path, file_parts in by_file.items():
        random_split = any(p.random_split for p in file_parts)
        last_row = None if random_split or any(p.row_end is None for p in file_parts) else max(p.row_end for p in file_parts)
        row = 0
        for block in read_blocks(path, cfg.block_size_mb, sparse_only=sparse_only):
            n = len(block)
            if random_split:
                assigned = _random_assignment(cfg, row, n)
            else:
                assigned = np.full(n, -1, dtype=np.int8)
                idx = np.arange(row, row + n)
                for p in file_parts:
                    end = p.row_end if p.row_end is not None else row + n
                    assigned[(idx >= p.row_start) & (idx < end)] = SPLITS.index(p.split)
            row += n
            for p in file_parts:
                keep = assigned == SPLITS.index(p.split)
                if keep.all():
                    yield p.split, block
                elif keep.any():
                    yield p.split, RawBlock(block.labels[keep], block.dense[keep], block.dense_missing[keep],
                                            block.sparse[keep], block.sparse_missing[keep], block.first_line)
            if last_row is not None and row >= last_row:
                break


def transform_dense(block: RawBlock) -> np.ndarray:
    """The DLRM reference's dense transform: log(1 + max(x, 0)), missing -> 0."""
    return np.log1p(np.maximum(block.dense, 0)).astype(np.float32)


def _build_vocab(parts: list[_Part], cfg: DataConfig) -> list[np.ndarray]:
    """Per feature, the training hashes that get their own row, most frequent first (<= cap - 2)."""
    keys: list[list[np.ndarray]] = [[] for _ in range(NUM_SPARSE_FEATURES)]
    counts: list[list[np.ndarray]] = [[] for _ in range(NUM_SPARSE_FEATURES)]
    for _, block in _split_blocks(parts, cfg, only=("train",), sparse_only=True):
        for j in range(NUM_SPARSE_FEATURES):
            k, c = np.unique(block.sparse[~block.sparse_missing[:, j], j], return_counts=True)
            keys[j].append(k)
            counts[j].append(c)
    vocab = []
    for j in range(NUM_SPARSE_FEATURES):
        if not keys[j]:
            vocab.append(np.zeros(0, dtype=np.uint32))
            continue
        k, inv = np.unique(np.concatenate(keys[j]), return_inverse=True)
        c = np.bincount(inv, weights=np.concatenate(counts[j]).astype(np.float64)).astype(np.int64)
        order = np.argsort(-c, kind="stable")  # most frequent first, ties by hash value
        order = order[c[order] >= cfg.min_id_frequency][: cfg.max_ids_per_feature - 2]
        vocab.append(k[order])
    return vocab


class _IdMapper:
    """Raw hashes -> table row ids, in vocab or hash mode."""

    def __init__(self, cfg: DataConfig, vocab: list[np.ndarray] | None):
        self.mode = cfg.id_mode
        self.cap = cfg.max_ids_per_feature
        if vocab is not None:
            self.sorted_keys = []
            self.sorted_ids = []
            for v in vocab:
                order = np.argsort(v)
                self.sorted_keys.append(v[order])
                self.sorted_ids.append((order + 2).astype(np.int64))  # 0 missing, 1 rare
            self.num_embeddings = [len(v) + 2 for v in vocab]
        else:
            self.num_embeddings = [self.cap] * NUM_SPARSE_FEATURES
        self.dtype = np.int32 if max(self.num_embeddings) < 2**31 else np.int64

    def __call__(self, block: RawBlock) -> np.ndarray:
        out = np.empty(block.sparse.shape, dtype=self.dtype)
        for j in range(NUM_SPARSE_FEATURES):
            h = block.sparse[:, j]
            if self.mode == IdMode.hash:
                ids = 1 + h.astype(np.int64) % (self.cap - 1)
            else:
                keys = self.sorted_keys[j]
                pos = np.searchsorted(keys, h)
                pos_c = np.minimum(pos, max(len(keys) - 1, 0))
                found = (pos < len(keys)) & (keys[pos_c] == h) if len(keys) else np.zeros(len(h), bool)
                ids = np.where(found, self.sorted_ids[j][pos_c] if len(keys) else RARE_ID, RARE_ID)
            ids[block.sparse_missing[:, j]] = MISSING_ID
            out[:, j] = ids
        return out


class _SplitWriter:
    """Appends blocks to one split's binary files, hashing them as they are written."""

    def __init__(self, out_dir: Path, split: str, sparse_dtype: np.dtype):
        self.dir = out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = {"dense": np.float32, "sparse": sparse_dtype, "labels": np.uint8}
        self.files = {k: open(self.dir / f"{k}.bin", "wb") for k in self.names}
        self.hashes = {k: hashlib.sha256() for k in self.names}
        self.num_rows = 0

    def write(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> None:
        for key, arr in (("dense", dense), ("sparse", sparse), ("labels", labels)):
            buf = np.ascontiguousarray(arr, dtype=self.names[key]).tobytes()
            self.files[key].write(buf)
            self.hashes[key].update(buf)
        self.num_rows += len(labels)

    def close(self) -> dict:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        widths = {"dense": [NUM_DENSE_FEATURES], "sparse": [NUM_SPARSE_FEATURES], "labels": []}
        return {
            "num_rows": self.num_rows,
            "files": {
                k: {"path": f"{self.dir.name}/{k}.bin", "dtype": np.dtype(self.names[k]).name,
                    "shape": [self.num_rows, *widths[k]], "sha256": self.hashes[k].hexdigest()}
                for k in self.names
            },
        }


def _settings(cfg: DataConfig) -> dict:
    """The inputs that determine the output; a manifest with other settings is rebuilt."""
    return {
        "split": cfg.split.value,
        "raw_files": list(cfg.raw_files),
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_seed": cfg.split_seed,
        "id_mode": cfg.id_mode.value,
        "max_ids_per_feature": cfg.max_ids_per_feature,
        "min_id_frequency": cfg.min_id_frequency,
        "dense_transform": DENSE_TRANSFORM,
    }


def _input_files(cfg: DataConfig) -> list[Path]:
    if cfg.split == SplitMode.files:
        return [Path(cfg.raw_dir) / f"{s}.tsv" for s in SPLITS]
    return [Path(cfg.raw_files[0])]


def _sources(cfg: DataConfig) -> list[dict]:
    """The raw files with size and mtime: a manifest built from other files is stale."""
    out = []
    for path in _input_files(cfg):
        st = path.stat()
        out.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


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
        sources = _sources(cfg)
    except FileNotFoundError:
        return False
    return m.get("version") == MANIFEST_VERSION and m.get("settings") == _settings(cfg) and m.get("sources") == sources


def preprocess(cfg: DataConfig) -> dict:
    """Convert the raw files named by ``cfg`` into binary splits; return the manifest.

    Raises:
        RawDataError: a malformed raw row (file, line and field named).
        FileNotFoundError: a raw file is missing.
    """
    t0 = time.perf_counter()
    out = Path(cfg.processed_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for path in _input_files(cfg):
        if not path.exists():
            raise FileNotFoundError(f"raw file {path} not found (data.raw_dir={cfg.raw_dir}, data.raw_files={cfg.raw_files})")
    parts = _plan_parts(cfg)
    vocab = _build_vocab(parts, cfg) if cfg.id_mode == IdMode.vocab else None
    if vocab is not None:
        np.savez(out / "vocab.npz", **{f"C{j + 1}": v for j, v in enumerate(vocab)})
    mapper = _IdMapper(cfg, vocab)
    writers = {s: _SplitWriter(out, s, mapper.dtype) for s in SPLITS}
    for split, block in _split_blocks(parts, cfg):
        writers[split].write(transform_dense(block), mapper(block), block.labels)
    splits = {s: w.close() for s, w in writers.items()}
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": _settings(cfg),
        "sources": _sources(cfg),
        "splits": splits,
        "num_dense_features": NUM_DENSE_FEATURES,
        "num_sparse_features": NUM_SPARSE_FEATURES,
        "num_embeddings_per_feature": mapper.num_embeddings,
        "reserved_ids": {"missing": MISSING_ID, **({"rare_or_unseen": RARE_ID} if vocab is not None else {})},
        "optimum": _optimum(cfg),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    logger.info(
        "preprocessed %s -> %s in %.1fs: %s", cfg.raw_dir, out, manifest["seconds"],
        ", ".join(f"{s} {v['num_rows']:,} rows" for s, v in splits.items()),
    )
    return manifest


def _optimum(cfg: DataConfig) -> dict | None:
    """The synthetic generator's Bayes-optimal metrics, when the raw data came from it."""
    from pipeline.data.synthetic import OPTIMUM_FILE

    path = Path(cfg.raw_dir) / OPTIMUM_FILE
    if cfg.split == SplitMode.files and path.exists():
        return json.loads(path.read_text())["optimum"]
    return None


__all__ = ["RawDataError", "preprocess", "load_manifest", "is_current", "MANIFEST"]
