"""Preprocessing's output on disk, one part per input file: the split writers, sha256 checks, atomic JSON
records, and the fingerprints that tell whether a finished part can be reused.

``parts/<NNN>/<split>/{dense,sparse,labels}.bin`` hold the rows (with list columns also
``{lengths,offsets,values}.bin`` and ``weights.bin``, see :mod:`pipeline.data.jagged`);
``parts/<NNN>/done.json`` is written (atomically, after its files are synced) only when the part is
complete, so a killed run resumes at the file it was on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.data.jagged import Lists
from pipeline.data.schema import Schema
from pipeline.data.splits import Unit

logger = logging.getLogger(__name__)


DONE = "done.json"


_HASH_CHUNK = 8 << 20


_SYNC_EVERY = 8 << 20  # bytes written between background fdatasyncs


class SplitWriter:
    """Appends blocks to one part's binary files of a split, hashing them as they are written.

    Written data is flushed to disk in the background (an ``fdatasync`` on a helper thread every
    ``_SYNC_EVERY`` bytes) while parsing goes on, so the final ``fsync`` at ``close`` finds little
    left to write instead of the whole part. A failed background sync (disk full, I/O error) is
    raised by ``close``.
    """

    def __init__(self, root: Path, rel_dir: str, sparse_dtype: np.dtype, schema: Schema):
        self.root = root
        self.rel_dir = rel_dir
        self.widths = {"dense": [schema.num_dense], "sparse": [schema.num_one_hot], "labels": []}
        (root / rel_dir).mkdir(parents=True, exist_ok=True)
        self.dtypes = {"dense": np.dtype(np.float32), "sparse": np.dtype(sparse_dtype), "labels": np.dtype(np.uint8)}
        self.num_lists = len(schema.multi_hot)
        if schema.multi_hot:  # row-major jagged lists: per row, its ids' count per list column and where they start
            self.widths |= {"lengths": [self.num_lists], "offsets": []}
            self.dtypes |= {
                "lengths": np.dtype(np.int32),
                "offsets": np.dtype(np.int64),
                "values": np.dtype(sparse_dtype),
            }
            if schema.weighted:
                self.dtypes["weights"] = np.dtype(np.float32)
        self.num_values = 0
        self.list_sums = np.zeros(self.num_lists, np.int64)
        self.list_max = np.zeros(self.num_lists, np.int64)
        self.files = {k: open(root / rel_dir / f"{k}.bin", "wb") for k in self.dtypes}
        self.hashes = {k: hashlib.sha256() for k in self.dtypes}
        self.num_rows = 0
        self.unsynced = 0
        self.syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-sync")
        self.syncing: Future | None = None  # the latest background sync
        self.final: Future | None = None  # the final fsync, once closing has started

    def write(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, lists: Lists | None = None) -> None:
        arrays = [("dense", dense), ("sparse", sparse), ("labels", labels)]
        if self.num_lists:
            arrays += [
                ("lengths", lists.lengths),
                ("offsets", lists.starts() + self.num_values),
                ("values", lists.values),
            ]
            if "weights" in self.dtypes:
                arrays.append(("weights", lists.weights))
            self.num_values += len(lists.values)
            if len(lists):
                self.list_sums += lists.lengths.sum(axis=0, dtype=np.int64)
                self.list_max = np.maximum(self.list_max, lists.lengths.max(axis=0))
        for key, arr in arrays:
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
            self.syncing = self.syncer.submit(
                lambda fds: [os.fdatasync(fd) for fd in fds], [f.fileno() for f in self.files.values()]
            )
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
        record = {
            "num_rows": self.num_rows,
            "files": {
                k: {
                    "path": f"{self.rel_dir}/{k}.bin",
                    "dtype": self.dtypes[k].name,
                    "shape": [self.num_values] if k in ("values", "weights") else [self.num_rows, *self.widths[k]],
                    "sha256": self.hashes[k].hexdigest(),
                }
                for k in self.dtypes
            },
        }
        if self.num_lists:  # per list column: ids over all rows, and the longest list (the planner's inputs)
            record["list_lengths"] = {"sum": self.list_sums.tolist(), "max": self.list_max.tolist()}
        return record


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_files(root: Path, files: dict) -> str | None:
    """None when every file exists with its recorded size and sha256, else what is wrong."""
    for info in files.values():
        path = root / info["path"]
        size = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or not {size} bytes"
        if sha256_file(path) != info["sha256"]:
            return f"{path} does not match its sha256"
    return None


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def source_records(files: list[Path]) -> list[dict]:
    """The raw files with size and mtime: outputs built from other files are stale."""
    out = []
    for path in files:
        st = path.stat()
        out.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def fingerprint(settings: dict, source: dict, extra: str = "") -> str:
    return hashlib.sha256(json.dumps([settings, source, extra], sort_keys=True).encode()).hexdigest()[:16]


def finished_part(unit: Unit, out: Path, key: str) -> dict | None:
    """The done record of a finished, intact part made with the same settings and source, else None."""
    path = out / "parts" / unit.name / DONE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != key or record.get("source") != source_records([unit.path])[0]:
        logger.info("part %s was made from other settings or another version of %s: redoing it", unit.name, unit.path)
        return None
    for split, info in record["splits"].items():
        problem = verify_files(out, info["files"])
        if problem is not None:
            logger.warning("part %s (%s): %s: redoing it", unit.name, split, problem)
            return None
    logger.info("part %s (%s) already done and verified by sha256: skipped", unit.name, unit.path)
    return record
