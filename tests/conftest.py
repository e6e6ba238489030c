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
CONF_DIR = ROOT / "conf"

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


def run_training(run_dir: Path, overrides: list[str], nproc: int = 1, timeout: int = 300) -> TrainRun:
    """Run pipeline/train.py under torchrun with ``nproc`` ranks into ``run_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), str(ROOT / "pipeline" / "train.py"),
           f"hydra.run.dir={run_dir}", "logger.progress_bar=false", *overrides]
    env = {**os.environ, "PIPELINE_RUN_ID": run_dir.name}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return TrainRun(run_dir, proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def tiny_data_overrides(tmp_path_factory) -> list[str]:
    """Overrides that point data=tiny at a session-wide folder (generated on first use)."""
    root = tmp_path_factory.mktemp("tiny_data")
    return ["model=tiny", "data=tiny", f"data.raw_dir={root}/raw", f"data.processed_dir={root}/processed"]
