"""Line-by-line checks of raw rows, the kinds of malformed rows, and how they are counted.

The fast paths (the compiled scanner, pyarrow) accept a subset of what these checks accept; a chunk
they reject is checked line by line here, so every bad line is found, named and counted exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import CategoricalFormat
from pipeline.data.schema import CRITEO, LABEL, Schema
from pipeline.data.tsv.block import Chunk
from pipeline.data.tsv.lists import parse_list_field
from pipeline.errors import DataError

# Kinds of malformed rows, as counted in the manifest.
BAD_ROW_KINDS = ("wrong_field_count", "bad_label", "bad_dense", "bad_categorical", "truncated_last_line")


_HEX_CHARS = frozenset(b"0123456789abcdefABCDEF")


_INT_RE = re.compile(rb"-?[0-9]+")  # as pyarrow and the scanner read integers: no "+"


_UINT_RE = re.compile(rb"[0-9]+")


_MAX_EXAMPLES = 10


class RawDataError(DataError):
    """A malformed raw row; the message names the file, line and field."""


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
    lists = dict(schema.multi_hot)
    sep = schema.list_separator.encode()
    for name, v in zip(schema.sparse_columns, fields[1 + num_dense :], strict=True):
        if not v:
            continue
        if name in lists:
            weighted = name in schema.weighted
            try:
                parse_list_field(v, hex_ids, sep, weighted)
            except ValueError as e:
                ids = "8 hex digits" if hex_ids else "decimal ids"
                return "bad_categorical", (
                    f"field {name} is {v[:40]!r}: {e}; expected {ids} separated by {schema.list_separator!r}"
                    f"{', each as id:weight' if weighted else ''}, or empty"
                )
            continue
        if hex_ids and (len(v) != 8 or not _HEX_CHARS.issuperset(v)):
            return "bad_categorical", f"field {name} is {v[:20]!r}, expected 8 hex digits or empty"
        if not hex_ids and (not _UINT_RE.fullmatch(v) or int(v) >= 2**63):
            return "bad_categorical", f"field {name} is {v[:20]!r}, expected a decimal integer id in [0, 2^63) or empty"
    return None


def bad_lines(chunk: Chunk, path: Path, labelled: bool = True, schema: Schema = CRITEO) -> list[tuple[int, str, str]]:
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
                kind, detail = (
                    "truncated_last_line",
                    f"the file ends without a newline inside a malformed row ({detail})",
                )
            bad.append((i, kind, detail))
    return bad
