"""pyarrow's path: a chunk the scanner does not take is parsed by pyarrow's CSV reader straight into typed
columns (labels int8, dense int64, categoricals as fixed-size 8-byte binary or text) and converted in
numpy (8 hex digits -> uint32 through a 64K-entry table of digit pairs; decimal ids checked by pyarrow's
regex kernel and cast to int64).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.config import CategoricalFormat
from pipeline.data.jagged import Lists, interleave
from pipeline.data.schema import CRITEO, LABEL, Schema
from pipeline.data.tsv.block import NO_LABEL, RawBlock
from pipeline.data.tsv.lists import parse_column
from pipeline.data.tsv.scanner import NIBBLE

_ARROW_BLOCK = 4 << 20  # pyarrow parses each chunk in 4 MiB blocks, in parallel


class SlowPath(Exception):
    """The fast path found a problem; the chunk is re-checked line by line."""


def parse(data: bytes | memoryview, labelled: bool = True, schema: Schema = CRITEO, threads: bool = True) -> pa.Table:
    """pyarrow's typed parse of a chunk (raises pa.ArrowInvalid on a bad field or field count).

    ``threads=False`` parses on the calling thread only: cheaper per row (no hand-offs between
    pyarrow's threads) when several chunks are parsed at once anyway.
    """
    # Decimal ids are read as text: pyarrow's integer parser also takes " 7" and "0x1f", which are not ids.
    cat_type = pa.binary(8) if schema.categorical_format == CategoricalFormat.hex else pa.string()
    lists = set(schema.multi_hot_columns)
    types = {
        **({LABEL: pa.int8()} if labelled else {}),
        **{c: pa.int64() for c in schema.dense_columns},
        **{c: pa.binary() if c in lists else cat_type for c in schema.sparse_columns},
    }
    return pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(
            column_names=schema.columns if labelled else schema.columns[1:],
            block_size=_ARROW_BLOCK,
            use_threads=threads,
        ),
        # Empty lines are rows (of nulls), so they are caught as bad rows instead of vanishing.
        parse_options=pacsv.ParseOptions(
            delimiter="\t", quote_char=False, double_quote=False, escape_char=False, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True
        ),
    )


def _pair_lut() -> np.ndarray:
    """Two hex characters (as a little-endian uint16) -> their byte value; 0xFFFF if either isn't hex."""
    first, second = np.meshgrid(NIBBLE.astype(np.uint16), NIBBLE.astype(np.uint16), indexing="ij")
    lut = (first << 4) | second  # first char = low byte of the uint16
    lut[(first > 15) | (second > 15)] = 0xFFFF
    return lut.T.ravel()  # index = first | second << 8


_PAIR_LUT = _pair_lut()


_ZEROS8 = np.frombuffer(b"00000000", dtype="<u8")[0]


def _hex8_to_uint32(values: np.ndarray) -> np.ndarray | None:
    """8 hex characters, each value one little-endian uint64 -> uint32; None if a character isn't hex.

    Looks up two characters at a time in a 64K-entry table (L2-resident), then reads the four bytes
    as one big-endian uint32.
    """
    pairs = np.take(_PAIR_LUT, values.view("<u2"))
    if pairs.max(initial=0) > 0xFF:
        return None
    return pairs.astype(np.uint8).view(">u4").astype(np.uint32)


def _validity(arr: pa.Array) -> np.ndarray | None:
    """Boolean validity of an arrow array (None when it has no nulls), from its bitmap."""
    if not arr.null_count:
        return None
    bits = np.frombuffer(arr.buffers()[0], dtype=np.uint8)
    return np.unpackbits(bits, bitorder="little", count=arr.offset + len(arr))[arr.offset :].astype(bool)


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """A column as one contiguous arrow array (pyarrow parses in 4 MiB blocks: several chunks)."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _hex8_columns(table: pa.Table, schema: Schema = CRITEO) -> tuple[np.ndarray, np.ndarray]:
    """The fixed_size_binary(8) hex columns -> (uint32 [n, F], missing [n, F]).

    Column by column, so every temporary stays small (large temporaries are fresh mmaps whose
    page faults would cost more than the arithmetic). Raises SlowPath on a non-hex character.
    """
    n = table.num_rows
    # Column-major: each column is written (and later hashed) as one contiguous run, not 26-strided.
    sparse = np.zeros((n, schema.num_one_hot), dtype=np.uint32, order="F")
    missing = np.zeros((n, schema.num_one_hot), dtype=bool, order="F")
    if n == 0:
        return sparse, missing
    for j, name in enumerate(schema.sparse_columns[k] for k in schema.one_hot_index):
        arr = _one_chunk(table.column(name))
        x = np.frombuffer(arr.buffers()[1], dtype="<u8", count=n, offset=arr.offset * 8)
        valid = _validity(arr)
        if valid is not None:
            x = np.where(valid, x, _ZEROS8)
            missing[:, j] = ~valid
        v = _hex8_to_uint32(x)
        if v is None:
            raise SlowPath
        sparse[:, j] = v  # a missing value was decoded from "00000000": 0
    return sparse, missing


_DECIMAL_ID = r"^[0-9]{1,19}$"  # the cast below rejects 19 digits >= 2^63


def _decimal_id_columns(table: pa.Table, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """The decimal-id text columns -> (int64 [n, F], missing [n, F]); raises SlowPath on a bad id."""
    n = table.num_rows
    sparse = np.zeros((n, schema.num_one_hot), dtype=np.int64)
    missing = np.zeros((n, schema.num_one_hot), dtype=bool)
    for j, name in enumerate(schema.sparse_columns[k] for k in schema.one_hot_index):
        col = _one_chunk(table.column(name))
        if n == 0:
            break
        ok = pc.match_substring_regex(col, _DECIMAL_ID)
        if pc.any(pc.invert(ok)).as_py():  # nulls (missing) stay null and do not count
            raise SlowPath
        try:
            values, missing[:, j] = _int_column(pa.chunked_array([pc.cast(col, pa.int64())]))
        except pa.ArrowInvalid:  # out of int64 range
            raise SlowPath from None
        sparse[:, j] = values
    return sparse, missing


def _int_column(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """int64 column -> (values with missing as 0, missing mask), read straight from the arrow buffers."""
    arr = _one_chunk(col)
    n = len(arr)
    values = (
        np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n, offset=arr.offset * 8) if n else np.zeros(0, np.int64)
    )
    valid = _validity(arr)
    if valid is None:
        return values, np.zeros(n, dtype=bool)
    return np.where(valid, values, 0), ~valid


def convert(table: pa.Table, chunk_lines: np.ndarray, labelled: bool = True, schema: Schema = CRITEO) -> RawBlock:
    """Typed columns -> RawBlock; raises SlowPath on a null or out-of-range label or a bad categorical."""
    n = table.num_rows
    if labelled:
        col = table.column(LABEL)
        if col.null_count:
            raise SlowPath
        labels = np.asarray(col, dtype=np.int8)
        if ((labels != 0) & (labels != 1)).any():
            raise SlowPath
    else:
        labels = np.full(n, NO_LABEL, dtype=np.int8)
    dense = np.empty((n, schema.num_dense), np.int64)
    dense_missing = np.empty((n, schema.num_dense), bool)
    for j, name in enumerate(schema.dense_columns):
        dense[:, j], dense_missing[:, j] = _int_column(table.column(name))
    if schema.categorical_format == CategoricalFormat.hex:
        sparse, sparse_missing = _hex8_columns(table, schema)
    else:
        sparse, sparse_missing = _decimal_id_columns(table, schema)
    return RawBlock(labels, dense, dense_missing, sparse, sparse_missing, chunk_lines, _list_columns(table, schema))


def _list_columns(table: pa.Table, schema: Schema) -> Lists | None:
    """The multi-hot columns -> row-major :class:`Lists`; raises SlowPath on a malformed list."""
    if not schema.multi_hot:
        return None
    hex_ids = schema.categorical_format == CategoricalFormat.hex
    sep = schema.list_separator.encode()
    n = table.num_rows
    columns = []
    for (name, cap), weighted in zip(schema.multi_hot, schema.weighted_mask, strict=True):
        arr = _one_chunk(table.column(name)) if n else pa.array([], pa.binary())
        offsets = (
            np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
            if n
            else np.zeros(1, np.int32)
        )
        data = (
            np.frombuffer(arr.buffers()[2], dtype=np.uint8)
            if n and arr.buffers()[2] is not None
            else np.zeros(0, np.uint8)
        )
        valid = _validity(arr)
        parsed = parse_column(data, offsets, np.ones(n, bool) if valid is None else valid, hex_ids, sep, weighted, cap)
        if isinstance(parsed, int):
            raise SlowPath
        columns.append(parsed)
    return interleave(columns, bool(schema.weighted))
