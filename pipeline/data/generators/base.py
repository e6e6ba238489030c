"""What every generator shares: writing the splits in chunks, the Bayes-optimal metrics, ``optimum.json``.

A generator supplies its ground truth and ``chunk_table(truth, rng, n) -> Chunk`` (the rows, their true
probabilities and drawn labels, optionally the Bayes-optimal probabilities of a model denied some columns);
:func:`generate` writes ``train.tsv``, ``val.tsv`` and ``test.tsv`` (each split's chunks drawn from
their own seeded generator, so a split does not depend on the chunk size of another), then
``optimum.json`` last, which marks the folder complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

logger = logging.getLogger(__name__)

OPTIMUM_FILE = "optimum.json"
SPLITS = ("train", "val", "test")
CHUNK_ROWS = 200_000
_EPS = 1e-7


@dataclass
class Chunk:
    """One chunk of generated rows."""

    table: pa.Table  # the columns to write, label first
    prob: np.ndarray  # [n] the true click probability each label was drawn from
    labels: np.ndarray  # [n] int8 0/1
    # name -> [n] the best probability without the columns ``name`` (optimum.json's optimum_without.<name>)
    without: dict[str, np.ndarray] = field(default_factory=dict)


ChunkTable = Callable[[Any, np.random.Generator, int], Chunk]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def optimal_metrics(prob: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics of the true click probabilities on the drawn labels: the Bayes-optimal values, under the
    definitions of :mod:`pipeline.metrics.functional` (exact AUC with ties counting one half; logloss of
    probabilities clipped to [1e-7, 1 - 1e-7]; NE = logloss / entropy of the observed rate)."""
    p = np.asarray(prob, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    clipped = np.clip(p, _EPS, 1 - _EPS)
    logloss = float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean())
    ctr = float(y.mean())
    c = min(max(ctr, _EPS), 1 - _EPS)
    entropy = -(c * np.log(c) + (1 - c) * np.log(1 - c))
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks of tied probabilities
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    ends = np.r_[starts[1:], len(p)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    positives = y.sum()
    negatives = len(y) - positives
    auc = (
        float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
        if positives and negatives
        else float("nan")
    )
    return {
        "auc": auc,
        "logloss": logloss,
        "normalized_entropy": logloss / entropy,
        "accuracy": float(((p > 0.5) == (y == 1)).mean()),
        "calibration": float(p.mean() / ctr) if ctr > 0 else float("nan"),
        "ctr": ctr,
        "num_samples": len(p),
    }


def write_split(chunk_table: ChunkTable, truth: Any, seed: int, split_index: int, path: Path, num_rows: int) -> Chunk:
    """Write one split's TSV (to a temporary name, renamed when complete); return its true probabilities and
    drawn labels (``table`` empty)."""
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    chunks: list[Chunk] = []
    tmp = path.with_suffix(path.suffix + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink:
        writer = None
        for index, start in enumerate(range(0, num_rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, num_rows - start)
            chunk = chunk_table(truth, np.random.default_rng([seed, 2, split_index, index]), n)
            if writer is None:
                writer = pacsv.CSVWriter(sink, chunk.table.schema, write_options=options)
            writer.write_table(chunk.table)
            chunks.append(Chunk(chunk.table.slice(0, 0), chunk.prob, chunk.labels, chunk.without))
        if writer is not None:
            writer.close()
    os.replace(tmp, path)  # a killed run never leaves a half-written split under the final name
    names = chunks[0].without if chunks else {}
    return Chunk(
        pa.table({}),
        np.concatenate([np.zeros(0), *(c.prob for c in chunks)]),
        np.concatenate([np.zeros(0, np.int8), *(c.labels for c in chunks)]),
        {k: np.concatenate([c.without[k] for c in chunks]) for k in names},
    )


def generate(
    generator: str, cfg: Any, out_dir: str | Path, truth: Any, chunk_table: ChunkTable, extra: dict | None = None
) -> dict:
    """Write the three splits and ``optimum.json`` (last) into ``out_dir``; return the optimum record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / OPTIMUM_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    sizes = {"train": cfg.num_train_rows, "val": cfg.num_val_rows, "test": cfg.num_test_rows}
    optimum: dict = {}
    without: dict[str, dict] = {}
    for i, split in enumerate(SPLITS):
        written = write_split(chunk_table, truth, cfg.seed, i, out / f"{split}.tsv", sizes[split])
        labels = written.labels
        if split != "train" and len(labels):
            optimum[split] = optimal_metrics(written.prob, labels)
            for name, prob in written.without.items():
                without.setdefault(name, {})[split] = optimal_metrics(prob, labels)
        logger.info(
            "wrote %s rows to %s (click rate %.4f)",
            f"{sizes[split]:,}",
            out / f"{split}.tsv",
            labels.mean() if len(labels) else float("nan"),
        )
    record = {
        "generator": generator,
        "config": asdict(cfg),
        **(extra or {}),
        "optimum": optimum,
        **({"optimum_without": without} if without else {}),  # one-hot layouts keep the record they had
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / OPTIMUM_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def is_complete(generator: str, cfg: Any, out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished generation by ``generator`` with exactly this config."""
    path = Path(out_dir) / OPTIMUM_FILE
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    # A record written before a config field existed holds that field's default (new fields leave the output
    # of the old configs unchanged), so data generated then is still complete.
    written = {**asdict(type(cfg)()), **(record.get("config") or {})}
    return (
        record.get("generator") == generator
        and written == asdict(cfg)
        and all((Path(out_dir) / f"{s}.tsv").exists() for s in SPLITS)
    )
