"""Metric correctness against direct computations on known inputs."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.metrics.functional import binary_metrics


def _auc_by_pairs(probs: list[float], labels: list[int]) -> float:
    """AUC as the fraction of (positive, negative) pairs ranked right, ties counting one half."""
    pos = [p for p, y in zip(probs, labels, strict=True) if y == 1]
    neg = [p for p, y in zip(probs, labels, strict=True) if y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    probs = (torch.randint(0, 20, (400,), generator=g) / 20).tolist()  # many ties
    labels = (torch.rand(400, generator=g) < 0.3).int().tolist()
    m = binary_metrics(torch.tensor(probs), torch.tensor(labels))
    assert m.auc == pytest.approx(_auc_by_pairs(probs, labels), abs=1e-6)


def test_auc_known_values() -> None:
    assert binary_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])).auc == pytest.approx(0.75)
    assert binary_metrics(torch.tensor([0.9, 0.8, 0.2]), torch.tensor([0, 0, 1])).auc == pytest.approx(0.0)


def test_logloss_ne_accuracy_calibration_direct() -> None:
    probs = [0.9, 0.2, 0.6, 0.4, 0.7]
    labels = [1, 0, 0, 1, 1]
    m = binary_metrics(torch.tensor(probs), torch.tensor(labels))
    logloss = -sum(math.log(p) if y else math.log(1 - p) for p, y in zip(probs, labels, strict=True)) / 5
    ctr = 3 / 5
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert m.logloss == pytest.approx(logloss)
    assert m.normalized_entropy == pytest.approx(logloss / entropy)
    assert m.accuracy == pytest.approx(3 / 5)  # 0.9 right, 0.2 right, 0.6 wrong, 0.4 wrong, 0.7 right
    assert m.calibration == pytest.approx((sum(probs) / 5) / ctr)
    assert m.ctr == pytest.approx(ctr)
    assert m.num_samples == 5


def test_constant_prediction_at_base_rate_has_ne_one() -> None:
    labels = torch.tensor([1, 0, 0, 0] * 25)
    m = binary_metrics(torch.full((100,), 0.25), labels)
    assert m.normalized_entropy == pytest.approx(1.0, abs=1e-6)
    assert m.auc == pytest.approx(0.5)
