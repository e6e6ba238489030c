"""The learning-rate schedule: warm-up, then linear decay to the final fraction at the last step; sized to
the run by fractions, or by steps that are clipped to the run with a warning."""

from __future__ import annotations

import pytest

from pipeline.config import LrDecay, OptimizerConfig
from pipeline.optim.schedule import resolve_schedule


def _factors(cfg: OptimizerConfig, total: int, steps) -> list[float]:
    schedule, _ = resolve_schedule(cfg, total)
    return [schedule.factor(s) for s in steps]


def test_constant_without_warmup_or_decay() -> None:
    assert _factors(OptimizerConfig(), 100, (0, 50, 99)) == [1.0, 1.0, 1.0]


def test_warmup_steps_rise_linearly_to_one() -> None:
    assert _factors(OptimizerConfig(warmup_steps=4), 100, range(6)) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_fraction_follows_the_run_length() -> None:
    cfg = OptimizerConfig(warmup_fraction=0.1)
    short, _ = resolve_schedule(cfg, 60)
    long, _ = resolve_schedule(cfg, 2000)
    assert (short.warmup_steps, long.warmup_steps) == (6, 200)
    assert short.factor(5) == 1.0 and short.factor(4) == pytest.approx(5 / 6)


def test_warmup_steps_win_over_the_fraction() -> None:
    schedule, warnings = resolve_schedule(OptimizerConfig(warmup_fraction=0.5, warmup_steps=3), 100)
    assert schedule.warmup_steps == 3 and warnings == []


def test_warmup_steps_beyond_the_run_are_clipped_with_one_warning() -> None:
    schedule, warnings = resolve_schedule(OptimizerConfig(warmup_steps=100), 61)
    assert schedule.warmup_steps == 61
    assert schedule.factor(60) == 1.0  # the nominal rate is reached at the last step, not never
    assert len(warnings) == 1 and "optimizer.warmup_steps=100 exceeds this run's 61 steps" in warnings[0]
    assert "\n" not in warnings[0]


def test_linear_decay_from_start_fraction_to_final() -> None:
    cfg = OptimizerConfig(decay=LrDecay.linear, decay_start=0.5, final_lr_fraction=0.1)
    f = _factors(cfg, 100, (49, 50, 75, 100))
    assert f[:2] == [1.0, 1.0]
    assert f[2] == pytest.approx(1 - 0.9 * 0.5)
    assert f[3] == pytest.approx(0.1)


def test_decay_start_step_wins_and_is_clipped_to_the_run() -> None:
    cfg = OptimizerConfig(decay=LrDecay.linear, decay_start_step=80)
    schedule, warnings = resolve_schedule(cfg, 100)
    assert schedule.decay_start_step == 80 and warnings == []
    assert schedule.factor(79) == 1.0 and schedule.factor(90) == pytest.approx(0.5)
    schedule, warnings = resolve_schedule(cfg, 50)
    assert [schedule.factor(s) for s in (0, 49)] == [1.0, 1.0]
    assert len(warnings) == 1 and "optimizer.decay_start_step=80" in warnings[0]


def test_decay_starts_after_warmup() -> None:
    cfg = OptimizerConfig(warmup_steps=60, decay=LrDecay.linear, decay_start=0.2)
    schedule, _ = resolve_schedule(cfg, 100)
    assert schedule.factor(59) == 1.0 and schedule.factor(60) == 1.0
    assert schedule.factor(80) == pytest.approx(0.5)


def test_with_fresh_tables_each_epoch_tables_keep_their_rate_and_the_mlps_decay_per_epoch() -> None:
    cfg = OptimizerConfig(warmup_steps=10, decay=LrDecay.linear, decay_start=0.5)
    schedule, _ = resolve_schedule(cfg, 400, epoch_steps=100)
    assert schedule.table_factor(4) == schedule.factor(4) == 0.5  # warm-up is shared, once
    assert [schedule.table_factor(s) for s in (60, 99, 150, 399)] == [1.0] * 4
    # each 100-step epoch: full rate to its middle, then down to 0 at its end
    assert [schedule.factor(s) for s in (49, 50, 75, 100, 149, 175, 375)] == pytest.approx(
        [1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 0.5]
    )
    assert schedule.factor(99) < 0.03 and schedule.factor(399) < 0.03
    whole, _ = resolve_schedule(cfg, 400)  # without restarts: one decay over the run, tables too
    assert whole.factor(300) == whole.table_factor(300) == pytest.approx(0.5)
