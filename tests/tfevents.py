"""Reading TensorBoard event files back, for tests: the scalars a run wrote, as TensorBoard shows them."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipeline.metrics.loggers import EVENT_FILE_GLOB


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
        yield data[pos + 12 : pos + 12 + length]
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
