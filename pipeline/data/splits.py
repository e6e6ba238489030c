"""Which raw rows go to which split: the input files of each ``data.split`` mode and the line ranges or
seeded random assignment that divide them into train, val and test.
"""

from __future__ import annotations

import functools
import glob
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import (
    DataConfig,
    SplitMode,
)
from pipeline.data.schema import Schema
from pipeline.data.tsv import BadRows, RawBlock, count_lines, read_blocks
from pipeline.errors import DataError, MissingDataError

SPLITS = ("train", "val", "test")


@dataclass
class Unit:
    """One input file and which of its lines go to which split."""

    index: int
    path: Path
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> [first line, end line)
    random_split: bool = False  # lines are assigned by the seeded random split instead

    @property
    def name(self) -> str:
        return f"{self.index:03d}"

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.random_split else tuple(s for s in SPLITS if s in self.ranges)


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _expand(key: str, entries: list[str]) -> list[Path]:
    """Files and glob patterns of one config key, patterns expanded in natural order (day_2 before day_10).

    Raises:
        MissingDataError: a pattern matches nothing, or a file is not there (the key is named).
    """
    paths = []
    for entry in entries:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry), key=_natural_key)
            if not matches:
                raise MissingDataError(f"{key}: pattern {entry!r} matches no file")
            paths.extend(Path(m) for m in matches if Path(m).is_file())
        else:
            paths.append(Path(entry))
    for path in paths:
        if not path.is_file():
            raise MissingDataError(f"raw file {path} not found ({key}={entries})")
    return paths


def split_files(cfg: DataConfig) -> dict[str, list[Path]]:
    """``data.split=files``: each split's input files. An empty list means ``<raw_dir>/<split>.tsv``; for
    test, that file is optional (no test split without it).

    Raises:
        MissingDataError: a file or pattern is not there, or train/val have none (the key is named).
        DataError: one file is listed for two splits.
    """
    out: dict[str, list[Path]] = {}
    for split in SPLITS:
        key = f"data.{split}_files"
        entries = list(getattr(cfg, f"{split}_files"))
        if entries:
            out[split] = _expand(key, entries)
            continue
        default = Path(cfg.raw_dir) / f"{split}.tsv"
        if default.is_file():
            out[split] = [default]
        elif split != "test":
            raise MissingDataError(
                f"no {split} data: {key} is empty and {default} does not exist. Name your "
                f"files, e.g. {key}=[clicks/{split}_*.tsv.gz] (data.raw_dir={cfg.raw_dir})"
            )
    seen: dict[Path, str] = {}
    for split, paths in out.items():
        for path in paths:
            other = seen.setdefault(path.resolve(), split)
            if other != split:
                raise DataError(
                    f"{path} is listed for both {other} and {split} (data.{other}_files, "
                    f"data.{split}_files): a file feeds one split"
                )
    return out


def raw_files(cfg: DataConfig) -> list[Path]:
    """The input files in order (``split=files``: train, then val, then test files).

    Raises:
        MissingDataError: a file or pattern matches nothing (the config key is named).
    """
    if cfg.split == SplitMode.files:
        return [p for paths in split_files(cfg).values() for p in paths]
    return _expand("data.raw_files", list(cfg.raw_files))


def plan_units(cfg: DataConfig, files: list[Path]) -> list[Unit]:
    if cfg.split == SplitMode.files:
        per_split = [(p, s) for s, paths in split_files(cfg).items() for p in paths]
        return [Unit(i, p, {s: (0, 2**62)}) for i, (p, s) in enumerate(per_split)]
    if cfg.split == SplitMode.random:
        return [Unit(0, files[0], random_split=True)]
    if cfg.split == SplitMode.kaggle:
        # train.txt holds 7 days in order; the DLRM reference takes days 0-5 for training and
        # halves day 6 into validation and test.
        n = count_lines(files[0])
        train_end = n * 6 // 7
        val_end = train_end + (n - train_end) // 2
        return [Unit(0, files[0], {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n)})]
    # days: every file but the last is training; the last day is halved into validation and test.
    if len(files) < 2:
        raise DataError(f"data.split=days needs at least 2 day files, got {[str(f) for f in files]}")
    n = count_lines(files[-1])
    units = [Unit(i, p, {"train": (0, 2**62)}) for i, p in enumerate(files[:-1])]
    units.append(Unit(len(files) - 1, files[-1], {"val": (0, n // 2), "test": (n // 2, n)}))
    return units


_WINDOW = 1 << 20


@functools.lru_cache(maxsize=2)
def _window_draws(seed: int, window: int) -> np.ndarray:
    """The uniform draws of one 1M-line window (blocks are smaller: consecutive blocks reuse them)."""
    return np.random.default_rng([seed, window]).random(_WINDOW)


def _random_assignment(cfg: DataConfig, lines: np.ndarray) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each line, seeded per line (never by block size)."""
    out = np.empty(len(lines), dtype=np.int8)
    w = lines // _WINDOW
    for wi in np.unique(w):
        sel = w == wi
        u = _window_draws(cfg.split_seed, int(wi))[lines[sel] - wi * _WINDOW]
        out[sel] = np.where(u < cfg.val_fraction, 1, np.where(u < cfg.val_fraction + cfg.test_fraction, 2, 0))
    return out


def _assignment(unit: Unit, cfg: DataConfig, lines: np.ndarray) -> np.ndarray:
    """Split index of each line of a block: 0 train, 1 val, 2 test, -1 none."""
    if unit.random_split:
        return _random_assignment(cfg, lines)
    assigned = np.full(len(lines), -1, dtype=np.int8)
    for s, (lo, hi) in unit.ranges.items():
        assigned[(lines >= lo) & (lines < hi)] = SPLITS.index(s)
    return assigned


def assigned_blocks(
    unit: Unit,
    cfg: DataConfig,
    counter: BadRows,
    only: tuple[str, ...] = SPLITS,
    then: Callable[[RawBlock, np.ndarray], Any] | None = None,
) -> Iterator[tuple[RawBlock, np.ndarray, Any]]:
    """(block, split index of each row: 0 train, 1 val, 2 test, -1 none, ``then(block, split index)``)
    of one input file; the split indices and ``then`` are computed in the reader's worker threads.
    Stops reading once every wanted line range (of the splits in ``only``) has ended."""
    wanted = [s for s in unit.splits if s in only]
    last_line = None if unit.random_split else max(unit.ranges[s][1] for s in wanted)

    def assign(block: RawBlock) -> tuple[np.ndarray, Any]:
        assigned = _assignment(unit, cfg, block.line_index)
        return assigned, None if then is None else then(block, assigned)

    for block, (assigned, extra) in read_blocks(
        unit.path, cfg.block_size_mb, cfg.bad_rows.value, counter, schema=Schema.from_config(cfg), then=assign
    ):
        lines = block.line_index
        yield block, assigned, extra
        if last_line is not None and len(lines) and lines[-1] + 1 >= last_line:
            break


def unit_blocks(
    unit: Unit, cfg: DataConfig, counter: BadRows, only: tuple[str, ...] = SPLITS
) -> Iterator[tuple[str, RawBlock]]:
    """(split, rows of a block) of one input file, for the splits in ``only``."""
    wanted = [s for s in unit.splits if s in only]
    for block, assigned, _ in assigned_blocks(unit, cfg, counter, only):
        for s in wanted:
            keep = assigned == SPLITS.index(s)
            if keep.all():
                yield s, block
            elif keep.any():
                yield s, block.take(keep)
