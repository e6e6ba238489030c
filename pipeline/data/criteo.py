"""The raw Criteo click-log layout and a vectorised parser for it.

One row per line, tab-separated, no header: label (0/1), 13 integer features I1..I13 (empty =
missing, may be negative), 26 categorical features C1..C26 as 8-hex-digit hashes (empty = missing).
Parsing uses pyarrow's multithreaded CSV reader and numpy; no Python loop touches a row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES

LABEL = "label"
DENSE_COLUMNS = [f"I{i + 1}" for i in range(NUM_DENSE_FEATURES)]
SPARSE_COLUMNS = [f"C{i + 1}" for i in range(NUM_SPARSE_FEATURES)]
COLUMNS = [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS]
# Feature names seen by the model (TorchRec's Criteo naming).
SPARSE_FEATURE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE_FEATURES)]

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)


class RawDataError(ValueError):
    """A malformed raw row; the message names the file, line and field."""


@dataclass
class RawBlock:
    """One parsed block of raw rows."""

    labels: np.ndarray  # [n] int8
    dense: np.ndarray  # [n, 13] int64, 0 where missing
    dense_missing: np.ndarray  # [n, 13] bool
    sparse: np.ndarray  # [n, 26] uint32 hash values, 0 where missing
    sparse_missing: np.ndarray  # [n, 26] bool
    first_line: int  # 1-based line number of the block's first row in its file

    def __len__(self) -> int:
        return len(self.labels)


def _hex_to_uint32(col: pa.Array, path: Path, first_line: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """8-hex-digit strings -> uint32 values and a missing mask (null or empty = missing)."""
    col = col.cast(pa.large_string()) if col.type != pa.string() else col
    n = len(col)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32 if col.type == pa.string() else np.int64)
    offsets = offsets[col.offset : col.offset + n + 1]
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8) if col.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    missing = lengths == 0
    if col.null_count:
        missing |= ~np.asarray(col.is_valid())
    bad = ~missing & (lengths != 8)
    if bad.any():
        row = int(np.argmax(bad))
        raise RawDataError(
            f"{path}:{first_line + row}: field {name} has {int(lengths[row])} characters, expected 8 hex digits"
        )
    starts = offsets[:-1][~missing]
    digits = _HEX_LUT[data[starts[:, None] + np.arange(8)]]
    if (digits == 255).any():
        row = int(np.flatnonzero(~missing)[np.argmax((digits == 255).any(axis=1))])
        raise RawDataError(f"{path}:{first_line + row}: field {name} is not 8 hex digits")
    values = np.zeros(n, dtype=np.uint32)
    values[~missing] = (digits.astype(np.uint32) << _NIBBLE_SHIFTS).sum(axis=1, dtype=np.uint32)
    return values, missing


def read_blocks(path: str | Path, block_size_mb: int = 64, sparse_only: bool = False) -> Iterator[RawBlock]:
    """Stream a raw Criteo file as parsed blocks of bounded size.

    ``sparse_only`` skips converting the label and dense columns (left zero), for passes that only
    count categorical values.

    Raises:
        RawDataError: on a malformed row, naming the file, line and field.
    """
    path = Path(path)
    convert = pacsv.ConvertOptions(
        column_types={LABEL: pa.int8(), **{c: pa.int64() for c in DENSE_COLUMNS}, **{c: pa.string() for c in SPARSE_COLUMNS}},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        include_columns=SPARSE_COLUMNS if sparse_only else None,
    )
    read = pacsv.ReadOptions(column_names=COLUMNS, block_size=block_size_mb << 20)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False, escape_char=False)
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        raise RawDataError(f"{path}: {e}") from None
    line = 1
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as e:
            raise RawDataError(f"{path} (after line {line - 1}): {e}") from None
        n = batch.num_rows
        if sparse_only:
            sparse = np.zeros((n, NUM_SPARSE_FEATURES), dtype=np.uint32)
            sparse_missing = np.zeros((n, NUM_SPARSE_FEATURES), dtype=bool)
            for j, name in enumerate(SPARSE_COLUMNS):
                sparse[:, j], sparse_missing[:, j] = _hex_to_uint32(batch.column(j), path, line, name)
            yield RawBlock(np.zeros(n, np.int8), np.zeros((n, NUM_DENSE_FEATURES), np.int64),
                           np.zeros((n, NUM_DENSE_FEATURES), bool), sparse, sparse_missing, line)
            line += n
            continue
        labels = batch.column(0)
        if labels.null_count:
            row = int(np.argmax(~np.asarray(labels.is_valid())))
            raise RawDataError(f"{path}:{line + row}: field {LABEL} is empty, expected 0 or 1")
        labels = labels.to_numpy()
        if ((labels != 0) & (labels != 1)).any():
            row = int(np.argmax((labels != 0) & (labels != 1)))
            raise RawDataError(f"{path}:{line + row}: field {LABEL} is {labels[row]}, expected 0 or 1")
        dense = np.zeros((n, NUM_DENSE_FEATURES), dtype=np.int64)
        dense_missing = np.zeros((n, NUM_DENSE_FEATURES), dtype=bool)
        for j in range(NUM_DENSE_FEATURES):
            col = batch.column(1 + j)
            dense_missing[:, j] = ~np.asarray(col.is_valid()) if col.null_count else False
            dense[:, j] = col.fill_null(0).to_numpy()
        sparse = np.zeros((n, NUM_SPARSE_FEATURES), dtype=np.uint32)
        sparse_missing = np.zeros((n, NUM_SPARSE_FEATURES), dtype=bool)
        for j, name in enumerate(SPARSE_COLUMNS):
            sparse[:, j], sparse_missing[:, j] = _hex_to_uint32(batch.column(1 + NUM_DENSE_FEATURES + j), path, line, name)
        yield RawBlock(labels, dense, dense_missing, sparse, sparse_missing, line)
        line += n
