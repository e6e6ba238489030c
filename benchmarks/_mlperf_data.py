"""MLPerf-shaped multi-hot raw data for the benchmarks: Criteo's layout (label, 13 integer columns, 26
categorical columns) where every categorical field is a list of 8-hex-digit ids, of MLPerf DLRM-DCNv2's bag
sizes (``--lengths fixed``, 214 ids a row) or of lengths uniform in 1..that size (``variable``, 120 ids a row
on average). Ids are uniform over 2^32, labels and integers random: a speed benchmark's data, not a model's.

Written with numpy (hex digits from a table, separators set in place), about 50 MB/s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# MLPerf Training's DLRM-DCNv2 multi-hot sizes, per categorical column C1..C26 (pipeline/conf/experiment).
MLPERF_BAG_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
NUM_DENSE = 13
LENGTHS = ("fixed", "variable")

_HEX_PAIRS = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint8).reshape(256, 2)


def multi_hot_override() -> str:
    """The Hydra override declaring C1..C26 multi-hot, every id kept (``+``: keys join the empty default)."""
    return "+data.multi_hot_columns={" + ",".join(f"C{j + 1}:0" for j in range(len(MLPERF_BAG_SIZES))) + "}"


def mean_ids_per_row(lengths: str) -> float:
    sizes = np.asarray(MLPERF_BAG_SIZES)
    return float(sizes.sum() if lengths == "fixed" else ((sizes + 1) / 2).sum())


def _rows(rng: np.random.Generator, n: int, lengths: str) -> bytes:
    """``n`` raw lines."""
    sizes = np.asarray(MLPERF_BAG_SIZES)
    lens = (
        np.broadcast_to(sizes, (n, len(sizes))) if lengths == "fixed" else rng.integers(1, sizes + 1, (n, len(sizes)))
    )
    lens = np.ascontiguousarray(lens, dtype=np.int64)
    total = int(lens.sum())
    ids = rng.integers(0, 2**32, total, dtype=np.uint32)
    # Each id as 8 hex digits and its separator: ',' inside a list, a tab after a list, a newline after a row.
    text = np.empty((total, 9), np.uint8)
    text[:, :8] = _HEX_PAIRS[ids.astype(">u4").view(np.uint8)].reshape(total, 8)
    text[:, 8] = ord(",")
    text[np.cumsum(lens.reshape(-1)) - 1, 8] = ord("\t")
    row_ends = np.cumsum(lens.sum(axis=1))
    text[row_ends - 1, 8] = ord("\n")
    flat = text.tobytes()
    labels = rng.integers(0, 2, n)
    dense = rng.geometric(0.05, (n, NUM_DENSE)) - 1
    missing = rng.random((n, NUM_DENSE)) < 0.1
    out = []
    start = 0
    for r in range(n):
        fields = [str(labels[r])] + ["" if missing[r, j] else str(dense[r, j]) for j in range(NUM_DENSE)]
        out.append(("\t".join(fields) + "\t").encode())
        out.append(flat[9 * start : 9 * row_ends[r]])
        start = row_ends[r]
    return b"".join(out)


def write_raw(path: str | Path, num_rows: int, seed: int = 0, lengths: str = "fixed", chunk_rows: int = 20_000) -> Path:
    """Write ``num_rows`` MLPerf-shaped raw lines to ``path`` (seeded: the same bytes every time)."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths={lengths!r}: expected one of {LENGTHS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for lo in range(0, num_rows, chunk_rows):
            f.write(_rows(rng, min(chunk_rows, num_rows - lo), lengths))
    return path
