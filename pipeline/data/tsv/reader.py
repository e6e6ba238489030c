"""Stream a raw file as parsed, validated blocks: line-aligned chunks read by one thread and parsed by a pool.

Files may be plain or gzip-compressed (``.gz``, decompressed while streaming). The file is read in
line-aligned chunks of ``block_size_mb`` raw bytes by one thread, and a pool of worker threads (one
per core, up to 4) turns each chunk into typed arrays (:mod:`.scanner`, else :mod:`.arrow`), plus
whatever per-block work the caller hands over. Blocks come out in file order; memory stays a small
multiple of the chunk size whatever the file size. A chunk both fast paths reject is checked line by
line (:mod:`.checks`): policy ``error`` raises :class:`RawDataError` naming file, line and field;
``skip`` drops the bad lines and counts them by kind in :class:`BadRows`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.schema import CRITEO, Schema
from pipeline.data.tsv.arrow import SlowPath, convert, parse
from pipeline.data.tsv.block import Chunk, RawBlock
from pipeline.data.tsv.checks import BadRows, RawDataError, bad_lines
from pipeline.data.tsv.scanner import scan_chunk


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


def _iter_chunks(path: Path, chunk_bytes: int, taper: int = 0) -> Iterator[Chunk]:
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
            yield Chunk(view[:cut], line, n, False, last=got < want and not tail)
            line += n
    if tail:
        yield Chunk(tail, line, 1, True, last=True)


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


def read_blocks(
    path: str | Path,
    block_size_mb: float = 64,
    bad_rows: str = "error",
    counter: BadRows | None = None,
    labelled: bool = True,
    schema: Schema = CRITEO,
    then: Callable[[RawBlock], Any] | None = None,
) -> Iterator[RawBlock] | Iterator[tuple[RawBlock, Any]]:
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

    def parse_and_convert(chunk: Chunk) -> RawBlock | pa.Table | Exception:
        """The chunk's RawBlock, or what the slow path needs: the parsed table or pyarrow's error."""
        block = scan_chunk(chunk, labelled, schema)
        if block is not None:
            return block if then is None else (block, then(block))
        try:
            # One thread per chunk while chunks are parsed side by side; the last one may be alone.
            table = parse(chunk.data, labelled, schema, threads=workers == 1 or chunk.last)
        except pa.ArrowInvalid as e:
            return e
        lines = np.arange(chunk.first_line, chunk.first_line + chunk.num_lines, dtype=np.int64)
        try:
            block = convert(table, lines, labelled, schema)
        except SlowPath:
            return table
        return block if then is None else (block, then(block))

    # One thread reads chunks (in order: one read in flight at a time) while up to ``depth`` chunks
    # are parsed (pyarrow, one thread each) and converted (numpy, which releases the GIL) in the pool;
    # blocks come out in file order. Memory: about ``depth`` + 1 chunks and their columns.
    depth = workers + 1
    with ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="criteo-read") as pool:
        read = pool.submit(next, chunks, None)
        pending: deque[tuple[Chunk, Future]] = deque()

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
            bad = bad_lines(chunk, path, labelled, schema)
            if not bad:
                raise RawDataError(
                    f"{path} (lines {chunk.first_line + 1}-{chunk.first_line + chunk.num_lines}): "
                    f"pyarrow rejected the block but no line is malformed: {table}"
                )
            if bad_rows == "error":
                i, kind, detail = bad[0]
                raise RawDataError(
                    f"{path}:{chunk.first_line + i + 1}: {detail} [{kind}; data.bad_rows=skip drops "
                    "and counts such rows]"
                )
            for i, kind, detail in bad:
                counter.add(kind, f"{path}:{chunk.first_line + i + 1}: {detail}")
            drop = np.zeros(chunk.num_lines, dtype=bool)
            drop[[i for i, _, _ in bad]] = True
            if drop.all():
                continue
            kept = [ln for ln, d in zip(bytes(chunk.data).split(b"\n")[: chunk.num_lines], drop, strict=True) if not d]
            try:
                table = parse(b"\n".join(kept) + b"\n", labelled, schema)
                block = convert(table, lines[~drop], labelled, schema)
            except (pa.ArrowInvalid, SlowPath) as e:
                raise RawDataError(
                    f"{path} (lines {chunk.first_line + 1}-{chunk.first_line + chunk.num_lines}): "
                    f"rows still rejected after dropping {len(bad)} malformed lines: {e}"
                ) from None
            yield block if then is None else (block, then(block))
