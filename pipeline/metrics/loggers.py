"""Metric backends beside metrics.jsonl: TensorBoard event files, process memory, and a reader for both.

Rank 0's :class:`pipeline.trainer.RunWriter` writes every event to ``metrics.jsonl`` (always on: the run
report, sweep results and resume read it) and hands the same records to the backends selected by
``logger.backends``. The TensorBoard backend writes event files (tensorboardX: only protobuf and numpy,
no TensorFlow or tensorboard server needed to write) into the run folder, beside metrics.jsonl, with
these scalar tags:

- ``train/loss``: mean training BCE of the log window, over ranks
- ``train/samples_per_s``: training throughput of the log window (evaluation excluded)
- ``lr``: learning rate of the dense optimizer
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
import logging
import math
import os
import resource
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

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
            if _numeric(value) and (key.startswith(("train/", "memory/")) or key == "lr"):
                out[key] = float(value)
        if x_axis == "samples" and step is not None:
            out["progress/step"] = float(step)
        elif samples is not None:
            out["progress/samples"] = float(samples)
    else:
        split = record.get("split", "val")
        for key, value in record.items():
            if _numeric(value) and key.startswith("eval/"):
                out[f"eval/{split}/{key[len('eval/'):]}"] = float(value)
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
        self._writer = SummaryWriter(logdir=str(self.log_dir), purge_step=purge_step, flush_secs=self.flush_secs,
                                     filename_suffix=f".{os.getpid()}.{next(_FILE_NUMBERS):06d}")
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


def make_backends(names: Iterable, run_dir: str | Path, tensorboard_step: str = "step") -> list[MetricBackend]:
    """Backends for ``logger.backends`` other than jsonl (which RunWriter always writes itself)."""
    backends: list[MetricBackend] = []
    for name in names:
        name = getattr(name, "value", name)
        if name == "jsonl":
            continue
        if name == "tensorboard":
            backends.append(TensorBoardBackend(run_dir, getattr(tensorboard_step, "value", tensorboard_step)))
        else:
            raise ValueError(f"unknown logger backend {name!r}; known: jsonl, tensorboard")
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


# -- reading event files back ----------------------------------------------------------------------
def _records(path: Path) -> Iterable[bytes]:
    """The payloads of a TFRecord file (length, masked crc, data, masked crc); stops at a torn tail."""
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            break
        yield data[pos + 12: pos + 12 + length]
        pos = end


def read_scalars(log_dir: str | Path, files: Sequence[Path] | None = None) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the event files in ``log_dir``: {tag: [(step, value), ...]} in step order.

    Files are read in the order they were opened (the wall time of their first event; names only
    resolve to the second); a SessionLog START at step S (a resumed run's ``purge_step``) drops the
    points at or after S written before it, as TensorBoard does.
    """
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    def opened(path: Path) -> tuple[float, str]:
        event = Event()
        for payload in _records(path):
            event.ParseFromString(payload)
            break
        return event.wall_time, path.name

    paths = list(files) if files is not None else list(Path(log_dir).glob(EVENT_FILE_GLOB))
    paths.sort(key=opened)
    series: dict[str, list[tuple[int, float]]] = {}
    for path in paths:
        for payload in _records(path):
            event = Event()
            event.ParseFromString(payload)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for tag, points in series.items():
                    series[tag] = [p for p in points if p[0] < event.step]
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    series.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return {tag: sorted(points, key=lambda p: p[0]) for tag, points in series.items() if points}


def float32(value: float) -> float:
    """``value`` rounded as TensorBoard stores it (float32), for comparing with read_scalars()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return float("nan")
    return struct.unpack("<f", struct.pack("<f", value))[0]
