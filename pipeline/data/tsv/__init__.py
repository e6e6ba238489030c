"""Reading raw click logs: chunks of lines, a compiled scanner, pyarrow's parser, line checks.

The public surface: :func:`read_blocks` streams a file as validated :class:`RawBlock` s; :func:`check_line`
says what is wrong with one line; :class:`BadRows` counts what ``data.bad_rows=skip`` dropped.
"""

from pipeline.data.tsv.block import NO_LABEL, RawBlock
from pipeline.data.tsv.checks import BAD_ROW_KINDS, BadRows, RawDataError, check_line
from pipeline.data.tsv.reader import count_lines, open_raw, read_blocks
from pipeline.data.tsv.scanner import compile_scanner, compiled

__all__ = [
    "NO_LABEL",
    "RawBlock",
    "BAD_ROW_KINDS",
    "BadRows",
    "RawDataError",
    "check_line",
    "count_lines",
    "open_raw",
    "read_blocks",
    "compile_scanner",
    "compiled",
]
