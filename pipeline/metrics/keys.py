"""One metric-key scheme for ``metrics.jsonl``, TensorBoard and ``summary.json``.

``train/<name>`` for training (``train/loss``, ``train/samples_per_s``, ``train/lr``), ``eval/<split>/<name>``
for evaluation (``eval/val/auc``, ``eval/test/logloss``), ``memory/<name>`` and ``progress/<name>``. The
same key names the same number in all three places.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

SPLITS = ("val", "test")


def eval_key(split: str, name: str) -> str:
    return f"eval/{split}/{name}"


def eval_metrics(split: str, metrics: Any) -> dict[str, Any]:
    """A :class:`~pipeline.metrics.functional.BinaryMetrics` (or a dict of its fields) under ``eval/<split>/``."""
    values = asdict(metrics) if not isinstance(metrics, dict) else metrics
    return {eval_key(split, k): v for k, v in values.items()}


def of_split(record: dict, split: str) -> dict[str, Any]:
    """``{name: value}`` of one split's ``eval/<split>/<name>`` entries of a record (an event, or a summary's
    ``final``)."""
    prefix = f"eval/{split}/"
    return {k[len(prefix) :]: v for k, v in (record or {}).items() if k.startswith(prefix)}


def splits_in(record: dict) -> list[str]:
    """The splits a record has evaluation keys for, in ``val, test`` order first."""
    found = {k.split("/")[1] for k in record or {} if k.startswith("eval/") and k.count("/") >= 2}
    return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))
