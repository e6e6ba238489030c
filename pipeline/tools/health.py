"""A training job's liveness, for container health checks.

While a job trains, the first rank on each node touches the file named by ``PIPELINE_HEARTBEAT`` (when
set; the image sets it) after a step or an evaluation batch, at most every ``BEAT_EVERY_S`` seconds.
``python -m pipeline.tools.health`` (the image's HEALTHCHECK) exits 1 when that file is older than
``--max-age`` seconds: a rank stuck in a collective, a dead data loader, a hung disk. Before the first
step (installing, preprocessing, waiting for the other nodes) there is no file yet and the job counts as
healthy. No torch import: it runs every minute beside the job.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ENV = "PIPELINE_HEARTBEAT"
BEAT_EVERY_S = 5.0


class Heartbeat:
    """Touches ``path`` at most every ``every_s`` seconds; does nothing without a path."""

    def __init__(self, path: str | os.PathLike | None, every_s: float = BEAT_EVERY_S) -> None:
        self.path = Path(path) if path else None
        self.every_s = every_s
        self._last = float("-inf")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, local_rank: int) -> Heartbeat:
        """The node's heartbeat: ``$PIPELINE_HEARTBEAT`` on local rank 0, none elsewhere."""
        return cls(os.environ.get(ENV) if local_rank == 0 else None)

    def beat(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self.path.touch()
            self._last = now


def check(path: Path, max_age_s: float, now: float | None = None) -> tuple[bool, str]:
    """(healthy, why) for the heartbeat file at ``path``."""
    if not path.exists():
        return True, f"no heartbeat yet ({path}): not training yet"
    age = (time.time() if now is None else now) - path.stat().st_mtime
    if age > max_age_s:
        return False, f"no training progress for {age:.0f} s (heartbeat {path}, limit {max_age_s:.0f} s)"
    return True, f"last progress {age:.0f} s ago"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.health", description=__doc__.split("\n")[0])
    parser.add_argument("--file", default=os.environ.get(ENV), help=f"heartbeat file (default ${ENV})")
    parser.add_argument(
        "--max-age",
        type=float,
        default=float(os.environ.get("PIPELINE_HEALTH_MAX_AGE_S", 600)),
        help="seconds without progress before the job is unhealthy (default $PIPELINE_HEALTH_MAX_AGE_S or 600)",
    )
    args = parser.parse_args(argv)
    if not args.file:
        print(f"no heartbeat file: set {ENV} or pass --file", file=sys.stderr)
        return 2
    healthy, why = check(Path(args.file), args.max_age)
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
