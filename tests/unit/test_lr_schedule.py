"""The learning-rate schedule: warmup, then linear decay to the final fraction at the last step."""

from __future__ import annotations

import pytest

from pipeline.config import LrDecay, OptimizerConfig
from pipeline.distributed.sharding import lr_factor


def test_constant_without_warmup_or_decay() -> None:
    cfg = OptimizerConfig()
    assert [lr_factor(cfg, 100, s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_warmup_rises_linearly_to_one() -> None:
    cfg = OptimizerConfig(warmup_steps=4)
    assert [lr_factor(cfg, 100, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_from_start_fraction_to_final() -> None:
    cfg = OptimizerConfig(decay=LrDecay.linear, decay_start=0.5, final_lr_fraction=0.1)
    assert lr_factor(cfg, 100, 49) == 1.0
    assert lr_factor(cfg, 100, 50) == 1.0
    assert lr_factor(cfg, 100, 75) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.1)
