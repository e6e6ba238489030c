"""Metric backends beside metrics.jsonl: TensorBoard event files, process memory, and a reader for both.

Rank 0's :class:`pipeline.trainer.RunWriter` writes every event to ``metrics.jsonl`` (always on: the run
report, sweep results and resume read it) and hands the same records to the backends selected by
``logger.backends``. The TensorBoard backend writes event files (tensorboardX: only protobuf and numpy,
no TensorFlow or tensorboard server needed to write) into the run folder, beside metrics.jsonl, with
these scalar tags:

- ``train/loss``: mean training BCE of the log window, over ranks
- ``train/samples_per_s``: training throughput of the log window (evaluation excluded)
- ``train/lr``: learning rate of the dense optimizer
- ``memory/rss_mib``, ``memory/peak_rss_mib``: process resident memory now and at its peak, MiB
  (largest over ranks); ``memory/cuda_max_allocated_mib``: ``torch.cuda.max_memory_allocated`` (CUDA only)
- ``progress/samples``: samples seen (``progress/step`` when the x axis is samples)
- ``eval/<split>/<metric>``: ``eval/val/auc``, ``eval/val/logloss``, ``eval/test/auc``, ... for auc,
  logloss, normalized_entropy, accuracy, calibration, ctr, num_samples, seconds

The x axis (TensorBoard's step) is the training step, or samples seen with
``logger.tensorboard_step=samples`` (to compare runs of different batch sizes). TensorBoard stores
scalars as float32: values read back equal ``float(numpy.float32(v))`` of metrics.jsonl's ``v``.
Each record is flushed to disk when logged (as metrics.jsonl's line is), so a killed run keeps its
points; a resumed run opens a new event file with ``purge_step`` = the step after the resumed one, so
TensorBoard drops the points the killed run had logged after its last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from pipeline.redact import redact_config

logger = logging.getLogger(__name__)

EVENT_FILE_GLOB = "events.out.tfevents.*"
_FILE_NUMBERS = itertools.count()  # this process's event files, for unique names


class MetricBackend(Protocol):
    """One destination of rank 0's metric events (the records written to metrics.jsonl)."""

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


def _numeric(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def scalars_of(record: dict, x_axis: str = "step") -> tuple[int | None, dict[str, float]]:
    """The TensorBoard (x, {tag: value}) of one metrics.jsonl record; x is None for non-metric events."""
    kind = record.get("event")
    if kind not in ("train", "eval"):
        return None, {}
    step, samples = record.get("step"), record.get("samples")
    x = samples if x_axis == "samples" else step
    if x is None:
        return None, {}
    out: dict[str, float] = {}
    if kind == "train":
        for key, value in record.items():
            if _numeric(value) and key.startswith(("train/", "memory/")):
                out[key] = float(value)
        if x_axis == "samples" and step is not None:
            out["progress/step"] = float(step)
        elif samples is not None:
            out["progress/samples"] = float(samples)
    else:
        for key, value in record.items():
            if _numeric(value) and key.startswith("eval/"):
                out[key] = float(value)
    return int(x), out


class TensorBoardBackend:
    """TensorBoard event files in ``log_dir`` (tensorboardX's SummaryWriter, opened on first use)."""

    def __init__(self, log_dir: str | Path, x_axis: str = "step", flush_secs: int = 10):
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:  # the lock files pin it; a hand-made venv may lack it
            raise ImportError(
                "logger.backends includes tensorboard but tensorboardX is not installed: run ./launch.sh setup "
                "(or pip install -r requirements/cpu.txt), or use logger.backends=[jsonl]"
            ) from e
        self.log_dir = Path(log_dir)
        self.x_axis = x_axis
        self.flush_secs = flush_secs
        self._writer = None

    def _open(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        if self._writer is not None:
            self._writer.close()
        # Event file names carry the time in seconds: the suffix keeps two files of one second apart.
        self._writer = SummaryWriter(
            logdir=str(self.log_dir),
            purge_step=purge_step,
            flush_secs=self.flush_secs,
            filename_suffix=f".{os.getpid()}.{next(_FILE_NUMBERS):06d}",
        )
        return self._writer

    def log(self, record: dict) -> None:
        if record.get("event") == "resume":
            # Points a killed run logged after its last checkpoint are superseded: TensorBoard drops
            # everything at or after purge_step that came before this marker.
            x = record.get("samples") if self.x_axis == "samples" else record.get("step", 0)
            self._open(purge_step=None if x is None else int(x) + 1)
            return
        x, values = scalars_of(record, self.x_axis)
        if not values:
            return
        writer = self._writer or self._open()
        for tag, value in values.items():
            writer.add_scalar(tag, value, x)
        writer.flush()  # on disk at each log step, like metrics.jsonl: a killed run keeps its points

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def make_backends(
    names: Iterable, run_dir: str | Path, tensorboard_step: str = "step", logger_cfg=None
) -> list[MetricBackend]:
    """Backends for ``logger.backends`` other than jsonl (which RunWriter always writes itself)."""
    backends: list[MetricBackend] = []
    for name in names:
        name = getattr(name, "value", name)
        if name == "jsonl":
            continue
        if name == "tensorboard":
            backends.append(TensorBoardBackend(run_dir, getattr(tensorboard_step, "value", tensorboard_step)))
        elif name == "mlflow":
            from pipeline.metrics.tracking import MlflowBackend  # imports mlflow: only where selected

            backends.append(MlflowBackend(run_dir, logger_cfg))
        else:
            raise ValueError(f"unknown logger backend {name!r}; known: jsonl, tensorboard, mlflow")
    return backends


# -- memory ----------------------------------------------------------------------------------------
def process_memory_mib(device=None) -> dict[str, float]:
    """This process's resident memory now and at its peak, in MiB; on CUDA also torch's max allocated.

    The same keys on every rank of a job (a rank that cannot read /proc reports 0), so they can be
    all-reduced.
    """
    mib = float(2**20)
    rss = 0.0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / mib
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mib = peak / mib if sys.platform == "darwin" else peak / 1024.0
    out = {"memory/rss_mib": rss, "memory/peak_rss_mib": max(peak_mib, rss)}
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        out["memory/cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / mib
    return out


class RunWriter:
    """Rank 0's files in the run folder: config.yaml, metrics.jsonl (one event per line), summary.json and the
    other ``logger.backends`` (TensorBoard event files, MLflow)."""

    def __init__(self, run_dir: Path, enabled: bool, logger_cfg=None):
        self.run_dir = run_dir
        self.enabled = enabled
        self._metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self._backends = (
            make_backends(logger_cfg.backends, run_dir, logger_cfg.tensorboard_step, logger_cfg)
            if enabled and logger_cfg is not None
            else []
        )

    def config(self, config: dict) -> None:
        """config.yaml (the resolved config as a container), credentials masked; the backends that record a
        run's config (MLflow's params) get the same."""
        if not self.enabled:
            return
        from omegaconf import OmegaConf

        clean = redact_config(config)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(clean)))
        for backend in self._backends:
            if hasattr(backend, "log_config"):
                backend.log_config(clean)

    def event(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        for backend in self._backends:
            backend.log(record)

    def summary(self, record: dict) -> None:
        if self.enabled:
            (self.run_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for backend in self._backends:
            backend.close()
        self._backends = []
