"""The raw click-log layout (Criteo's, or one declared in config) and a fast, streaming, validating parser.

One row per line, tab-separated, no header: label (0/1), the integer (dense) columns (empty =
missing, may be negative), then the categorical (sparse) columns (empty = missing). Criteo's layout
(:data:`CRITEO`, the default) has 13 integer features I1..I13 and 26 categorical features C1..C26 as
8-hex-digit hashes; a :class:`Schema` built from ``data.dense_columns``, ``data.sparse_columns`` and
``data.categorical_format`` declares any other (e.g. decimal user and item ids). Files may be plain or
gzip-compressed (``.gz``, decompressed while streaming). ``labelled=False`` reads the same layout
without the label column (39 fields for Criteo, the Kaggle ``test.txt`` layout).

How it is fast: the file is read in line-aligned chunks of ``block_size_mb`` raw bytes by one thread,
and a pool of worker threads (one per core, up to 4) turns each chunk into typed arrays, plus
whatever per-block work the caller hands over (preprocessing's dense transform and id mapping).
Chunks of the hex layout go through a compiled scanner (:func:`_scan_hex_rows`, numba, no GIL): one
pass over the bytes, about 0.25 us per Criteo row here against 1.6 us for pyarrow's CSV reader and
the conversion of its columns. It accepts only plain well-formed rows; any other chunk (and the
decimal-id layouts) is parsed by pyarrow's CSV reader straight into typed columns (labels int8,
dense int64, categoricals as fixed-size 8-byte binary) and converted in numpy (8 hex digits -> uint32
through a 64K-entry table of digit pairs; decimal ids are checked by pyarrow's regex kernel and cast
to int64). Blocks come out in file order. No Python loop touches a row, and memory stays a small
multiple of the chunk size whatever the file size.

How it is exact about bad rows: a chunk the scanner rejects goes through pyarrow's path, and a chunk
that fails that too (pyarrow rejects a field, a label is not 0/1, a hash has a non-hex digit) is
re-checked line by line in Python (:func:`check_line`) to find every bad line, its kind and its
field. Policy ``error`` raises :class:`RawDataError` naming file, line and field; ``skip`` drops the
bad lines, counts them by kind in :class:`BadRows`, and parses the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES, CategoricalFormat, DataConfig
from pipeline.errors import DataError

LABEL = "label"
DENSE_COLUMNS = [f"I{i + 1}" for i in range(NUM_DENSE_FEATURES)]
SPARSE_COLUMNS = [f"C{i + 1}" for i in range(NUM_SPARSE_FEATURES)]
COLUMNS = [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS]
NUM_FIELDS = len(COLUMNS)
UNLABELLED_COLUMNS = COLUMNS[1:]  # the layout without a label column (Kaggle test.txt)
NO_LABEL = -1  # RawBlock.labels of rows read with labelled=False
# Feature names seen by the model (TorchRec's Criteo naming).
SPARSE_FEATURE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE_FEATURES)]


@dataclass(frozen=True)
class Schema:
    """A raw layout: label, then ``dense_columns``, then ``sparse_columns``; the default is Criteo's."""

    dense_columns: tuple[str, ...] = tuple(DENSE_COLUMNS)
    sparse_columns: tuple[str, ...] = tuple(SPARSE_COLUMNS)
    feature_names: tuple[str, ...] = tuple(SPARSE_FEATURE_NAMES)  # KJT keys, one per sparse column
    categorical_format: CategoricalFormat = CategoricalFormat.hex

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Schema:
        """The layout ``data.dense_columns``/``sparse_columns``/``feature_names``/``categorical_format`` declare."""
        return cls(tuple(cfg.dense_columns), tuple(cfg.sparse_columns),
                   tuple(cfg.feature_names or cfg.sparse_columns), CategoricalFormat(cfg.categorical_format))

    @classmethod
    def from_dict(cls, d: dict | None) -> Schema:
        """From a manifest, export.json or resolved data config; keys it lacks (written before columns could
        be declared) are Criteo's."""
        d = d or {}
        sparse = tuple(d.get("sparse_columns") or SPARSE_COLUMNS)
        names = d.get("feature_names") or (SPARSE_FEATURE_NAMES if "sparse_columns" not in d else sparse)
        return cls(tuple(d.get("dense_columns", DENSE_COLUMNS)), sparse, tuple(names),
                   CategoricalFormat(d.get("categorical_format", "hex")))

    def to_dict(self) -> dict:
        return {"dense_columns": list(self.dense_columns), "sparse_columns": list(self.sparse_columns),
                "feature_names": list(self.feature_names), "categorical_format": self.categorical_format.value}

    @property
    def num_dense(self) -> int:
        return len(self.dense_columns)

    @property
    def num_sparse(self) -> int:
        return len(self.sparse_columns)

    @property
    def columns(self) -> list[str]:
        return [LABEL, *self.dense_columns, *self.sparse_columns]

    @property
    def num_fields(self) -> int:
        """Fields of a labelled row."""
        return 1 + self.num_dense + self.num_sparse

    def describe(self) -> str:
        """The layout in words, for messages and export.json."""
        def span(cols: tuple[str, ...]) -> str:
            return "none" if not cols else cols[0] if len(cols) == 1 else f"{cols[0]}..{cols[-1]}"
        cats = "8-hex-digit hashes" if self.categorical_format == CategoricalFormat.hex else "decimal integer ids"
        return (f"TSV: [label], {self.num_dense} integer(s) {span(self.dense_columns)} (empty = missing), "
                f"{self.num_sparse} categorical(s) {span(self.sparse_columns)} as {cats} (empty = missing)")


CRITEO = Schema()

# Kinds of malformed rows, as counted in the manifest.
BAD_ROW_KINDS = ("wrong_field_count", "bad_label", "bad_dense", "bad_categorical", "truncated_last_line")

_HEX_CHARS = frozenset(b"0123456789abcdefABCDEF")
_INT_RE = re.compile(rb"-?[0-9]+")  # as pyarrow and the scanner read integers: no "+"
_UINT_RE = re.compile(rb"[0-9]+")
_ARROW_BLOCK = 4 << 20  # pyarrow parses each chunk in 4 MiB blocks, in parallel
_MAX_EXAMPLES = 10


class RawDataError(DataError):
    """A malformed raw row; the message names the file, line and field."""


class _SlowPath(Exception):
    """The fast path found a problem; the chunk is re-checked line by line."""


@dataclass
class BadRows:
    """Malformed rows dropped under ``bad_rows=skip``: counts by kind and the first examples."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_ROW_KINDS, 0))
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(where)

    def merge(self, other: BadRows) -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])

    def to_dict(self) -> dict:
        return {"total": self.total, "by_kind": dict(self.counts), "examples": list(self.examples)}


@dataclass
class RawBlock:
    """One parsed block of raw rows."""

    labels: np.ndarray  # [n] int8 (NO_LABEL = -1 for rows read with labelled=False)
    dense: np.ndarray  # [n, num_dense] int64, 0 where missing
    dense_missing: np.ndarray  # [n, num_dense] bool
    sparse: np.ndarray  # [n, num_sparse] uint32 hashes (hex) or int64 ids (int), 0 where missing
    sparse_missing: np.ndarray  # [n, num_sparse] bool
    line_index: np.ndarray  # [n] int64, 0-based line of each row in its file (bad lines leave gaps)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, keep: np.ndarray) -> RawBlock:
        return RawBlock(self.labels[keep], self.dense[keep], self.dense_missing[keep], self.sparse[keep],
                        self.sparse_missing[keep], self.line_index[keep])


@dataclass
class _Chunk:
    data: bytes | memoryview  # whole lines; the last one may lack its newline when unterminated
    first_line: int  # 0-based line index of the chunk's first line in its file
    num_lines: int
    unterminated: bool  # the file ends inside this chunk without a final newline
    last: bool = False  # no data follows (as far as the reader could tell: a short read)


def open_raw(path: str | Path) -> pa.NativeFile:
    """A byte stream over a raw file, gunzipped on the fly when the name ends in ``.gz``."""
    path = Path(path)
    return pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)


def count_lines(path: str | Path, chunk_bytes: int = 64 << 20) -> int:
    """Number of lines (rows) in a raw file, plain or gzip; an unterminated last line counts."""
    n, last = 0, b"\n"
    with open_raw(path) as f:
        while chunk := f.read(chunk_bytes):
            n += _count_newlines(np.frombuffer(chunk, dtype=np.uint8))
            last = chunk[-1:]
    return n + (last != b"\n")


def _iter_chunks(path: Path, chunk_bytes: int, taper: int = 0) -> Iterator[_Chunk]:
    """Line-aligned chunks of about ``chunk_bytes`` raw bytes.

    Each chunk is read straight into its own (uninitialised) buffer after the previous chunk's
    partial last line: one copy out of the page cache, none to join or cut (chunks are views of
    that buffer). ``taper`` > 0 (plain files, whose size is known): the last chunks shrink, down to
    an eighth, so that the ``taper`` workers parsing them side by side finish together instead of
    one parsing a whole chunk alone at the end.
    """
    line = 0
    tail = b""
    left = path.stat().st_size if taper and path.suffix != ".gz" else None
    with open_raw(path) as f:
        while True:
            want = chunk_bytes
            if left is not None:
                want = min(chunk_bytes, max(chunk_bytes // 8, left // (2 * taper), 1))
            buf = np.empty(len(tail) + want, dtype=np.uint8)
            buf[: len(tail)] = np.frombuffer(tail, dtype=np.uint8)
            view = memoryview(buf)
            got = f.readinto(view[len(tail) :])
            if not got:
                break
            if left is not None:
                left -= got
            end = len(tail) + got
            cut = _last_newline(buf, end) + 1
            if cut == 0:  # one line longer than a chunk: keep reading
                tail = bytes(view[:end])
                continue
            tail = bytes(view[cut:end])
            n = _count_newlines(buf[:cut])
            yield _Chunk(view[:cut], line, n, False, last=got < want and not tail)
            line += n
    if tail:
        yield _Chunk(tail, line, 1, True, last=True)


_NEWLINE = 10
_SCAN = 1 << 20  # bytes compared at a time: the comparison's temporary stays in cache


def _last_newline(buf: np.ndarray, end: int) -> int:
    """Index of the last newline in ``buf[:end]``, -1 if none."""
    hi = end
    while hi > 0:
        lo = max(0, hi - (64 << 10))
        hits = np.flatnonzero(buf[lo:hi] == _NEWLINE)
        if len(hits):
            return lo + int(hits[-1])
        hi = lo
    return -1


def _count_newlines(buf: np.ndarray) -> int:
    """Newlines in ``buf`` (uint8), counted in cache-sized slices (3x bytes.count here)."""
    return sum(int(np.count_nonzero(buf[i : i + _SCAN] == _NEWLINE)) for i in range(0, len(buf), _SCAN))


def _parse(data: bytes | memoryview, labelled: bool = True, schema: Schema = CRITEO, threads: bool = True) -> pa.Table:
    """pyarrow's typed parse of a chunk (raises pa.ArrowInvalid on a bad field or field count).

    ``threads=False`` parses on the calling thread only: cheaper per row (no hand-offs between
    pyarrow's threads) when several chunks are parsed at once anyway.
    """
    # Decimal ids are read as text: pyarrow's integer parser also takes " 7" and "0x1f", which are not ids.
    cat_type = pa.binary(8) if schema.categorical_format == CategoricalFormat.hex else pa.string()
    types = {**({LABEL: pa.int8()} if labelled else {}), **{c: pa.int64() for c in schema.dense_columns},
             **{c: cat_type for c in schema.sparse_columns}}
    return pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=schema.columns if labelled else schema.columns[1:],
                                       block_size=_ARROW_BLOCK, use_threads=threads),
        # Empty lines are rows (of nulls), so they are caught as bad rows instead of vanishing.
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                         escape_char=False, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""],
                                             strings_can_be_null=True, quoted_strings_can_be_null=True),
    )


_NIBBLE = np.full(256, 0xFF, dtype=np.uint8)  # hex character -> its value; 0xFF if not a hex digit
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _pair_lut() -> np.ndarray:
    """Two hex characters (as a little-endian uint16) -> their byte value; 0xFFFF if either isn't hex."""
    first, second = np.meshgrid(_NIBBLE.astype(np.uint16), _NIBBLE.astype(np.uint16), indexing="ij")
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
    page faults would cost more than the arithmetic). Raises _SlowPath on a non-hex character.
    """
    n = table.num_rows
    # Column-major: each column is written (and later hashed) as one contiguous run, not 26-strided.
    sparse = np.zeros((n, schema.num_sparse), dtype=np.uint32, order="F")
    missing = np.zeros((n, schema.num_sparse), dtype=bool, order="F")
    if n == 0:
        return sparse, missing
    for j, name in enumerate(schema.sparse_columns):
        arr = _one_chunk(table.column(name))
        x = np.frombuffer(arr.buffers()[1], dtype="<u8", count=n, offset=arr.offset * 8)
        valid = _validity(arr)
        if valid is not None:
            x = np.where(valid, x, _ZEROS8)
            missing[:, j] = ~valid
        v = _hex8_to_uint32(x)
        if v is None:
            raise _SlowPath
        sparse[:, j] = v  # a missing value was decoded from "00000000": 0
    return sparse, missing


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by numba without the GIL, its machine code cached in ``__pycache__`` (or the
    user's cache folder) so only the first run after an install compiles (about 0.6 s; loading the
    cache costs about 0.15 s); compiled in every process where no cache folder is writable."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(fn)


@compiled
def _scan_hex_rows(buf, labelled, nibble, labels, dense, dense_missing, sparse, sparse_missing):  # pragma: no cover
    """Parse ``len(labels)`` newline-terminated rows of the hex layout from ``buf`` (uint8, ending in a newline).

    Compiled (numba, no GIL: the reader's threads run it side by side). Accepts only what the line
    checks (:func:`check_line`) accept, and a subset of it: a label of exactly ``0``/``1``; integers
    ``-?[0-9]{1,18}`` or empty; categoricals of exactly 8 hex digits or empty. Returns the number of
    rows parsed: the index of the first row it does not accept (anything else: ``+5``, a 19-digit
    integer, a bad row), whose chunk then goes through pyarrow and the line checks instead.
    Never reads past ``buf``'s last byte, which must be a newline: every field scan stops at a
    newline at the latest, and an 8-digit read is bounds-checked.
    """
    n = buf.shape[0]
    nd = dense.shape[1]
    ns = sparse.shape[1]
    pos = 0
    for r in range(labels.shape[0]):
        if pos >= n:
            return r
        if labelled:
            c = buf[pos]
            if (c != 48 and c != 49) or buf[pos + 1] != 9:  # "0" or "1", then a tab
                return r
            labels[r] = c - 48
            pos += 2
        for j in range(nd):
            neg = buf[pos] == 45  # "-"
            if neg:
                pos += 1
            v = 0
            k = 0
            c = buf[pos]
            while 48 <= c <= 57:
                v = v * 10 + (c - 48)
                k += 1
                pos += 1
                c = buf[pos]
            if c != 9 or k > 18 or (neg and k == 0):
                return r
            pos += 1
            dense[r, j] = -v if neg else v
            dense_missing[r, j] = k == 0
        for j in range(ns):
            c = buf[pos]
            if c == 9 or c == 10:
                sparse[r, j] = 0
                sparse_missing[r, j] = True
            else:
                if pos + 8 >= n:
                    return r
                h = 0
                bad = 0
                for i in range(8):
                    d = nibble[buf[pos + i]]
                    bad |= d
                    h = (h << 4) | d
                if bad > 15:
                    return r
                pos += 8
                c = buf[pos]
                sparse[r, j] = h
                sparse_missing[r, j] = False
            if c != (9 if j < ns - 1 else 10):  # a tab between fields, a newline after the last
                return r
            pos += 1
    return labels.shape[0]


def compile_scanner() -> None:
    """Compile the scanner (or load it from the cache) now, e.g. while building a container image."""
    row = b"\t".join([b"1", *[b"-1"] * NUM_DENSE_FEATURES, *[b"0a1b2c3d"] * NUM_SPARSE_FEATURES]) + b"\n"
    if _scan_chunk(_Chunk(memoryview(row), 0, 1, False), True, CRITEO) is None:
        raise RuntimeError("the compiled scanner rejected a well-formed row")


def _scan_chunk(chunk: _Chunk, labelled: bool, schema: Schema) -> RawBlock | None:
    """A chunk of the hex layout through the compiled scanner; None when it has a row the scanner does
    not accept, or an unterminated last line (the caller then parses it with pyarrow and, if need
    be, checks it line by line)."""
    if schema.categorical_format != CategoricalFormat.hex or not schema.num_sparse or chunk.unterminated:
        return None
    buf = np.frombuffer(chunk.data, dtype=np.uint8)
    n = chunk.num_lines
    if not n or buf[-1] != 10:
        return None
    labels = np.empty(n, np.int8) if labelled else np.full(n, NO_LABEL, np.int8)
    dense = np.empty((n, schema.num_dense), np.int64)
    dense_missing = np.empty((n, schema.num_dense), bool)
    # Column-major, as pyarrow's path gives them: each column is one contiguous run for the id mapping.
    sparse = np.empty((n, schema.num_sparse), np.uint32, order="F")
    sparse_missing = np.empty((n, schema.num_sparse), bool, order="F")
    if _scan_hex_rows(buf, labelled, _NIBBLE, labels, dense, dense_missing, sparse, sparse_missing) != n:
        return None
    return RawBlock(labels, dense, dense_missing, sparse, sparse_missing,
                    np.arange(chunk.first_line, chunk.first_line + n, dtype=np.int64))


_DECIMAL_ID = r"^[0-9]{1,19}$"  # the cast below rejects 19 digits >= 2^63


def _decimal_id_columns(table: pa.Table, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """The decimal-id text columns -> (int64 [n, F], missing [n, F]); raises _SlowPath on a bad id."""
    n = table.num_rows
    sparse = np.zeros((n, schema.num_sparse), dtype=np.int64)
    missing = np.zeros((n, schema.num_sparse), dtype=bool)
    for j, name in enumerate(schema.sparse_columns):
        col = _one_chunk(table.column(name))
        if n == 0:
            break
        ok = pc.match_substring_regex(col, _DECIMAL_ID)
        if pc.any(pc.invert(ok)).as_py():  # nulls (missing) stay null and do not count
            raise _SlowPath
        try:
            values, missing[:, j] = _int_column(pa.chunked_array([pc.cast(col, pa.int64())]))
        except pa.ArrowInvalid:  # out of int64 range
            raise _SlowPath from None
        sparse[:, j] = values
    return sparse, missing


def _int_column(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """int64 column -> (values with missing as 0, missing mask), read straight from the arrow buffers."""
    arr = _one_chunk(col)
    n = len(arr)
    values = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n, offset=arr.offset * 8) if n else np.zeros(0, np.int64)
    valid = _validity(arr)
    if valid is None:
        return values, np.zeros(n, dtype=bool)
    return np.where(valid, values, 0), ~valid


def _convert(table: pa.Table, chunk_lines: np.ndarray, labelled: bool = True, schema: Schema = CRITEO) -> RawBlock:
    """Typed columns -> RawBlock; raises _SlowPath on a null or out-of-range label or a bad categorical."""
    n = table.num_rows
    if labelled:
        col = table.column(LABEL)
        if col.null_count:
            raise _SlowPath
        labels = np.asarray(col, dtype=np.int8)
        if ((labels != 0) & (labels != 1)).any():
            raise _SlowPath
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
    return RawBlock(labels, dense, dense_missing, sparse, sparse_missing, chunk_lines)


def check_line(line: bytes, labelled: bool = True, schema: Schema = CRITEO) -> tuple[str, str] | None:
    """(kind, detail) when a raw line (without its newline) is malformed, else None."""
    fields = line.split(b"\t")
    num_fields = schema.num_fields
    if not labelled:
        fields.insert(0, b"0")  # checked as a labelled row with a valid label
        if len(fields) != num_fields:
            return "wrong_field_count", f"{len(fields) - 1} tab-separated fields, expected {num_fields - 1} (no label)"
    if len(fields) != num_fields:
        return "wrong_field_count", f"{len(fields)} tab-separated fields, expected {num_fields}"
    if fields[0] not in (b"0", b"1"):
        return "bad_label", f"field {LABEL} is {fields[0][:20]!r}, expected 0 or 1"
    num_dense = schema.num_dense
    for name, v in zip(schema.dense_columns, fields[1 : 1 + num_dense], strict=True):
        if v and (not _INT_RE.fullmatch(v) or not -(2**63) <= int(v) < 2**63):
            return "bad_dense", f"field {name} is {v[:20]!r}, expected an integer or empty"
    hex_ids = schema.categorical_format == CategoricalFormat.hex
    for name, v in zip(schema.sparse_columns, fields[1 + num_dense :], strict=True):
        if not v:
            continue
        if hex_ids and (len(v) != 8 or not _HEX_CHARS.issuperset(v)):
            return "bad_categorical", f"field {name} is {v[:20]!r}, expected 8 hex digits or empty"
        if not hex_ids and (not _UINT_RE.fullmatch(v) or int(v) >= 2**63):
            return "bad_categorical", f"field {name} is {v[:20]!r}, expected a decimal integer id in [0, 2^63) or empty"
    return None


def _bad_lines(chunk: _Chunk, path: Path, labelled: bool = True, schema: Schema = CRITEO) -> list[tuple[int, str, str]]:
    """(index within chunk, kind, detail) of every malformed line of a chunk."""
    lines = bytes(chunk.data).split(b"\n")
    if not chunk.unterminated:
        lines.pop()  # after the final newline
    bad = []
    for i, line in enumerate(lines):
        problem = check_line(line, labelled, schema)
        if problem is not None:
            kind, detail = problem
            if chunk.unterminated and i == len(lines) - 1:
                kind, detail = "truncated_last_line", f"the file ends without a newline inside a malformed row ({detail})"
            bad.append((i, kind, detail))
    return bad


def read_blocks(path: str | Path, block_size_mb: float = 64, bad_rows: str = "error",
                counter: BadRows | None = None, labelled: bool = True, schema: Schema = CRITEO,
                then: Callable[[RawBlock], Any] | None = None) -> Iterator[RawBlock] | Iterator[tuple[RawBlock, Any]]:
    """Stream a raw file as parsed, validated blocks of about ``block_size_mb`` raw bytes.

    Every line is validated in full on every pass, so all passes over a file agree on its bad rows.

    Args:
        bad_rows: ``error`` raises on the first malformed line; ``skip`` drops malformed lines and
            counts them in ``counter``.
        labelled: False reads rows without the label column (39 fields); their labels are NO_LABEL.
        schema: the column layout (default Criteo's); hex categoricals come out uint32, decimal ones int64.
        then: a function of each block run in the worker threads too (e.g. the dense transform and id
            mapping); given, ``(block, then(block))`` pairs are yielded.

    Raises:
        RawDataError: a malformed row under ``bad_rows=error``, naming the file, line and field.
    """
    path = Path(path)
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows={bad_rows!r}: expected 'error' or 'skip'")
    counter = counter if counter is not None else BadRows()
    workers = max(1, min(4, os.cpu_count() or 1))
    chunks = _iter_chunks(path, max(1, int(block_size_mb * (1 << 20))), taper=workers if workers > 1 else 0)

    def parse_and_convert(chunk: _Chunk) -> RawBlock | pa.Table | Exception:
        """The chunk's RawBlock, or what the slow path needs: the parsed table or pyarrow's error."""
        block = _scan_chunk(chunk, labelled, schema)
        if block is not None:
            return block if then is None else (block, then(block))
        try:
            # One thread per chunk while chunks are parsed side by side; the last one may be alone.
            table = _parse(chunk.data, labelled, schema, threads=workers == 1 or chunk.last)
        except pa.ArrowInvalid as e:
            return e
        lines = np.arange(chunk.first_line, chunk.first_line + chunk.num_lines, dtype=np.int64)
        try:
            block = _convert(table, lines, labelled, schema)
        except _SlowPath:
            return table
        return block if then is None else (block, then(block))

    # One thread reads chunks (in order: one read in flight at a time) while up to ``depth`` chunks
    # are parsed (pyarrow, one thread each) and converted (numpy, which releases the GIL) in the pool;
    # blocks come out in file order. Memory: about ``depth`` + 1 chunks and their columns.
    depth = workers + 1
    with ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="criteo-read") as pool:
        read = pool.submit(next, chunks, None)
        pending: deque[tuple[_Chunk, Future]] = deque()

        def fill() -> None:
            nonlocal read
            while len(pending) < depth and read is not None:
                chunk = read.result()
                if chunk is None:
                    read = None
                    return
                read = pool.submit(next, chunks, None)
                pending.append((chunk, pool.submit(parse_and_convert, chunk)))

        fill()
        while pending:
            chunk, future = pending.popleft()
            fill()
            table = future.result()
            if isinstance(table, (RawBlock, tuple)):
                yield table
                continue
            lines = np.arange(chunk.first_line, chunk.first_line + chunk.num_lines, dtype=np.int64)
            bad = _bad_lines(chunk, path, labelled, schema)
            if not bad:
                raise RawDataError(f"{path} (lines {chunk.first_line + 1}-{chunk.first_line + chunk.num_lines}): "
                                   f"pyarrow rejected the block but no line is malformed: {table}")
            if bad_rows == "error":
                i, kind, detail = bad[0]
                raise RawDataError(f"{path}:{chunk.first_line + i + 1}: {detail} [{kind}; data.bad_rows=skip drops "
                                   "and counts such rows]")
            for i, kind, detail in bad:
                counter.add(kind, f"{path}:{chunk.first_line + i + 1}: {detail}")
            drop = np.zeros(chunk.num_lines, dtype=bool)
            drop[[i for i, _, _ in bad]] = True
            if drop.all():
                continue
            kept = [ln for ln, d in zip(bytes(chunk.data).split(b"\n")[: chunk.num_lines], drop, strict=True) if not d]
            try:
                table = _parse(b"\n".join(kept) + b"\n", labelled, schema)
                block = _convert(table, lines[~drop], labelled, schema)
            except (pa.ArrowInvalid, _SlowPath) as e:
                raise RawDataError(f"{path} (lines {chunk.first_line + 1}-{chunk.first_line + chunk.num_lines}): "
                                   f"rows still rejected after dropping {len(bad)} malformed lines: {e}") from None
            yield block if then is None else (block, then(block))
