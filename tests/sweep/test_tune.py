"""./launch.sh tune: an Optuna search whose trials are torchrun jobs, resumable after a kill, ending with the
best parameters as a config file to train with."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Search the MLPs' learning rate only; fix the rest of pipeline/conf/tune/default.yaml's space so trials are quick.
FIXED = [
    "optimizer.embedding_lr=0.1",
    "data.global_batch_size=256",
    "model.embedding_dim=8",
    "trainer.num_epochs=1",
    "optimizer.embedding=row_wise_adagrad",
    "model.interaction=dot",
    "data.min_id_frequency=2",
]


def _tune_cmd(sweep_dir: Path, tuned_dir: Path, data: list[str]) -> list[str]:
    return [
        "bash",
        "launch.sh",
        "tune",
        *data,
        *FIXED,
        "trainer.max_steps=150",
        "checkpoint.every_steps=20",
        "trainer.run_doctor=false",
        "logger.progress_bar=false",
        "logger.report=false",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.tuned_dir={tuned_dir}",
        "hydra.sweeper.tuned_name=tiny_best",
    ]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if e["event"] == "train"]


def test_tune_resumes_after_a_kill_and_writes_the_best_config(tmp_path, tiny_data_overrides) -> None:
    sweep_dir, tuned_dir = tmp_path / "sweep", tmp_path / "tuned"
    env = {**os.environ, "NPROC": "1", "PIPELINE_RUN_ID": "tune-test"}
    cmd = _tune_cmd(sweep_dir, tuned_dir, tiny_data_overrides)
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (
        max(_steps(sweep_dir / "1"), default=0) >= 60 and list((sweep_dir / "1" / "checkpoints").glob("step_*"))
    ):
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.05)
    # A machine loss: the search process and trial 1's torchrun and rank, all at once.
    os.killpg(first.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", f"hydra.run.dir={sweep_dir}/1"], check=False)
    first.wait()
    assert not (sweep_dir / "2").exists() and "summary.json" not in os.listdir(sweep_dir / "1")

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]

    with sqlite3.connect(sweep_dir / "optuna.db") as db:
        states = db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    assert states == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]  # the killed trial finished, no extra one
    resumed = [
        json.loads(line) for line in (sweep_dir / "1" / "metrics.jsonl").read_text().splitlines() if '"resume"' in line
    ]
    assert len(resumed) == 1 and resumed[0]["step"] >= 20  # trial 1 went on from its checkpoint
    lrs = [yaml.safe_load((sweep_dir / str(n) / "config.yaml").read_text())["optimizer"]["lr"] for n in range(3)]
    assert len(set(lrs)) == 3, "the resumed search did not repeat the first run's draws"

    best = json.loads((sweep_dir / "best.json").read_text())
    aucs = [json.loads((sweep_dir / str(n) / "summary.json").read_text())["final"]["eval/val/auc"] for n in range(3)]
    assert best["value"] == max(aucs) and best["trial"] == aucs.index(max(aucs)) and best["trials_complete"] == 3
    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and all(",ok," in r for r in rows[1:])  # all three trials, the first run's too
    assert "best of 3 trials" in second.stdout and "./launch.sh train +tuned=tiny_best" in second.stdout

    tuned = yaml.safe_load((tuned_dir / "tiny_best.yaml").read_text())
    assert tuned == {"optimizer": {"lr": best["params"]["optimizer.lr"]}}
    job = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            "pipeline/train.py",
            "+tuned=tiny_best",
            f"hydra.searchpath=[file://{tmp_path}]",
            *tiny_data_overrides,
            "--cfg",
            "job",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert yaml.safe_load(job.stdout)["optimizer"]["lr"] == best["params"]["optimizer.lr"]
