"""The learning-rate schedule: linear warm-up, then optionally linear decay, sized to the run.

Warm-up and the start of the decay are given as fractions of the run's total steps
(``optimizer.warmup_fraction``, ``optimizer.decay_start``) or as absolute steps
(``optimizer.warmup_steps``, ``optimizer.decay_start_step``, which win when set). They are resolved
once the run's length is known; a configured step count the run does not reach is clipped to the
run with a one-line warning, so a short run (or a sweep point with a small ``trainer.max_steps``)
still reaches its nominal learning rate.

When each epoch starts from fresh tables (``trainer.reset_tables_each_epoch`` over several epochs), the
tables keep their full rate after warm-up and the MLPs' rate decays within every epoch instead of once
over the run: every epoch then ends at a low rate, so each epoch's end, where the best checkpoint is
usually found, is a settled (calibrated) model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import LrDecay, OptimizerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule in steps of one run."""

    total_steps: int
    warmup_steps: int = 0
    decay: LrDecay = LrDecay.none
    decay_start_step: int = 0
    final_lr_fraction: float = 0.0
    decay_tables: bool = True  # False: the tables keep their rate after warm-up (they restart each epoch)
    decay_period: int = 0  # steps the decay repeats over (an epoch); 0 = the whole run, once

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rates at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == LrDecay.linear:
            period = self.decay_period or self.total_steps
            step = min(step, self.total_steps)  # past the end: the rate of the last step
            origin = step - step % period  # where this decay period (the run, or an epoch) starts
            if origin >= self.total_steps:
                origin -= period
            start = origin + max(self.decay_start_step, self.warmup_steps - origin)
            end = min(origin + period, self.total_steps)
            if step >= start and end > start:
                progress = min(1.0, (step - start) / (end - start))
                return 1.0 - (1.0 - self.final_lr_fraction) * progress
        return 1.0

    def table_factor(self, step: int) -> float:
        """Multiplier of the tables' learning rate: :meth:`factor`, or warm-up only without ``decay_tables``."""
        if self.decay_tables or step < self.warmup_steps:
            return self.factor(step)
        return 1.0

    def describe(self) -> str:
        if self.decay != LrDecay.linear:
            decay = "no decay"
        elif self.decay_period:
            decay = (
                f"linear decay of the MLPs' rate from step {self.decay_start_step} of each {self.decay_period}-step "
                f"epoch to {self.final_lr_fraction:g} x lr at its end (the tables restart each epoch)"
            )
        else:
            decay = (
                f"linear decay from step {max(self.warmup_steps, self.decay_start_step)} to "
                f"{self.final_lr_fraction:g} x lr at step {self.total_steps}"
            )
        return f"warm-up {self.warmup_steps} of {self.total_steps} steps, {decay}"


def resolve_schedule(
    cfg: OptimizerConfig, total_steps: int, epoch_steps: int | None = None
) -> tuple[Schedule, list[str]]:
    """The schedule of a run of ``total_steps`` steps, and a warning per configured value the run does not fit.

    Fractions are rounded to whole steps; absolute steps beyond the run are clipped to it. ``epoch_steps``
    (tables re-initialised every epoch of that many steps): the tables keep their rate after warm-up and the
    MLPs' decay repeats within each epoch, ``decay_start`` then being a fraction of an epoch.
    """
    warnings: list[str] = []
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
        if warmup > total_steps:
            warnings.append(
                f"optimizer.warmup_steps={warmup} exceeds this run's {total_steps} steps: warming up over "
                f"{total_steps} (the learning rate reaches its nominal value only at the last step); "
                f"optimizer.warmup_fraction sizes warm-up to the run"
            )
            warmup = total_steps
    else:
        warmup = round(cfg.warmup_fraction * total_steps)
    period = epoch_steps if epoch_steps and epoch_steps < total_steps and cfg.decay_start_step is None else 0
    if cfg.decay_start_step is not None:
        start = cfg.decay_start_step
        if cfg.decay == LrDecay.linear and start >= total_steps:
            warnings.append(
                f"optimizer.decay_start_step={start} is not before this run's last step ({total_steps}): "
                "the learning rate does not decay; optimizer.decay_start sizes it to the run"
            )
            start = total_steps
    else:
        start = int(cfg.decay_start * (period or total_steps))
    return Schedule(
        total_steps,
        warmup,
        cfg.decay,
        start,
        cfg.final_lr_fraction,
        decay_tables=epoch_steps is None,
        decay_period=period,
    ), warnings


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, num_table_groups: int = 0) -> LambdaLR:
    """The schedule over the combined optimizer, whose first ``num_table_groups`` param groups are the tables'.

    TorchRec's fused optimizer hands its param group's lr to FBGEMM on every step, so scaling the combined
    param groups also drives the tables' learning rate.
    """
    n = len(optimizer.param_groups)
    return LambdaLR(optimizer, [schedule.table_factor] * num_table_groups + [schedule.factor] * (n - num_table_groups))
