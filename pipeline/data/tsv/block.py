"""What the reader hands on: chunks of whole lines, and parsed blocks of rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.data.jagged import Lists

NO_LABEL = -1  # RawBlock.labels of rows read with labelled=False


@dataclass
class RawBlock:
    """One parsed block of raw rows."""

    labels: np.ndarray  # [n] int8 (NO_LABEL = -1 for rows read with labelled=False)
    dense: np.ndarray  # [n, num_dense] int64, 0 where missing
    dense_missing: np.ndarray  # [n, num_dense] bool
    sparse: np.ndarray  # [n, num_one_hot] uint32 hashes (hex) or int64 ids (int), 0 where missing
    sparse_missing: np.ndarray  # [n, num_one_hot] bool
    line_index: np.ndarray  # [n] int64, 0-based line of each row in its file (bad lines leave gaps)
    lists: Lists | None = None  # the multi-hot columns' raw ids (schema.multi_hot), capped; None without any

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, keep: np.ndarray) -> RawBlock:
        return RawBlock(
            self.labels[keep],
            self.dense[keep],
            self.dense_missing[keep],
            self.sparse[keep],
            self.sparse_missing[keep],
            self.line_index[keep],
            None if self.lists is None else self.lists.take(keep),
        )


@dataclass
class Chunk:
    data: bytes | memoryview  # whole lines; the last one may lack its newline when unterminated
    first_line: int  # 0-based line index of the chunk's first line in its file
    num_lines: int
    unterminated: bool  # the file ends inside this chunk without a final newline
    last: bool = False  # no data follows (as far as the reader could tell: a short read)
