"""Shared fixtures: a tiny synthetic dataset made once per session, and a helper that runs the
real training entry point on N gloo ranks with torchrun, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "pipeline" / "conf"

TINY_SYNTHETIC = {"num_train_rows": 20_000, "num_val_rows": 4_000, "num_test_rows": 4_000, "max_cardinality": 500}


@dataclass
class TrainRun:
    """Outcome of one training job: its folder, exit code and output."""

    run_dir: Path
    returncode: int
    output: str

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def events(self, kind: str) -> list[dict]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == kind]


def _train_cmd(run_dir: Path, overrides: list[str], nproc: int, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        *torchrun_args,
        str(ROOT / "pipeline" / "train.py"),
        f"hydra.run.dir={run_dir}",
        "logger.progress_bar=false",
        *overrides,
    ]


def run_training(
    run_dir: Path, overrides: list[str], nproc: int = 1, timeout: int = 300, torchrun_args: tuple[str, ...] = ()
) -> TrainRun:
    """Run pipeline/train.py under torchrun with ``nproc`` ranks into ``run_dir``."""
    env = {**os.environ, "PIPELINE_RUN_ID": run_dir.name}
    proc = subprocess.run(
        _train_cmd(run_dir, overrides, nproc, torchrun_args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return TrainRun(run_dir, proc.returncode, proc.stdout + proc.stderr)


def start_training(
    run_dir: Path, overrides: list[str], nproc: int = 1, torchrun_args: tuple[str, ...] = ()
) -> subprocess.Popen:
    """Start a training job in its own process group (so a test can SIGKILL all of it)."""
    env = {**os.environ, "PIPELINE_RUN_ID": run_dir.name}
    return subprocess.Popen(
        _train_cmd(run_dir, overrides, nproc, torchrun_args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Block until metrics.jsonl shows a training step >= ``step``; return the step seen."""
    import time

    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            steps = [e["step"] for e in map(json.loads, path.read_text().splitlines()) if e["event"] == "train"]
            if steps and steps[-1] >= step:
                return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-3000:]}"
            )
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="session")
def tiny_data_overrides(tmp_path_factory) -> list[str]:
    """Overrides that point data=tiny at a session-wide folder (generated on first use)."""
    root = tmp_path_factory.mktemp("tiny_data")
    return ["model=tiny", "data=tiny", f"data.raw_dir={root}/raw", f"data.processed_dir={root}/processed"]


def rank_pids(run_dir: Path, nproc: int) -> list[int]:
    """The worker pids the ranks logged at start (the latest start of each rank)."""
    pids = []
    for r in range(nproc):
        log = (run_dir / f"rank{r}.log").read_text()
        pids.append(int(log.rsplit("(pid ", 1)[1].split(")")[0]))
    return pids


def kill_job(proc: subprocess.Popen, run_dir: Path, nproc: int) -> None:
    """SIGKILL a training job as a machine loss would: the launcher and every rank (torchrun starts
    the ranks in sessions of their own, so killing the launcher's group alone leaves them running)."""
    import signal

    pids = rank_pids(run_dir, nproc)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def losses(run_dir: Path) -> dict[int, float]:
    """Each logged step's training loss; a step logged twice (before a kill and after resuming) keeps the
    last; none before the run folder has any."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {e["step"]: e["train/loss"] for e in events if e["event"] == "train"}


_REALLOCATION_FAULTS = """
import resource, sys, torch
{setup}
faults = []
for _ in range(16):  # 64 MiB blocks: above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20); del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def reallocation_faults(setup: str, *args: str) -> list[int]:
    """Minor page faults of each of 16 allocations of a 64 MiB block, each freed before the next, in a fresh
    Python process that first runs ``setup`` (``sys.argv[1:]`` = ``args``). glibc's defaults unmap such a block on
    free (16k fresh pages each time); with freed memory kept (``keep_freed_memory``) the heap settles and
    reuses it. Small objects allocated in between can pin a freed block for the first few allocations (seen
    here for up to 6, varying with the hash seed), so callers check the last three."""
    proc = subprocess.run(
        [sys.executable, "-c", _REALLOCATION_FAULTS.format(setup=setup), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(f) for f in proc.stdout.split()]
