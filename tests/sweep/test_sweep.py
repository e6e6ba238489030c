"""Sweeps (-m): every point is its own torchrun job, started by the project's Hydra launcher
(hydra_plugins/pipeline_torchrun_launcher); the sweep folder gets one table of all points."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf

from hydra_plugins.pipeline_torchrun_launcher.torchrun_launcher import (
    SweepPoint,
    TorchrunLauncher,
    write_results,
)
from pipeline.metrics.keys import splits_in
from tests.conftest import ROOT

# A few dozen rows' worth of steps: enough to train and evaluate, quick to start.
QUICK = ["trainer.max_steps=10", "trainer.eval_every_steps=0", "trainer.run_doctor=false", "logger.progress_bar=false"]


def _sweep(args: list[str], env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.distributed
@pytest.mark.slow
def test_launch_sh_sweep_runs_every_point_and_writes_one_table(tmp_path, tiny_data_overrides) -> None:
    sweep_dir = tmp_path / "sweep"
    out = _sweep(
        [
            "bash",
            "launch.sh",
            "train",
            "-m",
            *tiny_data_overrides,
            *QUICK,
            "optimizer.lr=0.01,0.1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        env={"NPROC": "1", "PIPELINE_RUN_ID": "sweep-test"},
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    rows = _rows(sweep_dir)
    assert [(r["num"], r["status"], r["exit_code"], r["optimizer.lr"]) for r in rows] == [
        ("0", "ok", "0", "0.01"),
        ("1", "ok", "0", "0.1"),
    ]
    for num, row in enumerate(rows):
        point = sweep_dir / str(num)
        summary = json.loads((point / "summary.json").read_text())
        # The table holds each point's final metrics from its own summary.json.
        assert float(row["val_auc"]) == pytest.approx(summary["final"]["eval/val/auc"])
        assert float(row["test_logloss"]) == pytest.approx(summary["final"]["eval/test/logloss"])
        assert summary["world_size"] == 1 and summary["steps"] == 10
        # Its own run folder: config with that point's value, rank log, launcher log, one .hydra.
        assert yaml.safe_load((point / "config.yaml").read_text())["optimizer"]["lr"] == float(row["optimizer.lr"])
        names = {p.name for p in point.iterdir()}
        assert {"config.yaml", "rank0.log", "metrics.jsonl", "torchrun.log", ".hydra"} <= names
    assert rows[0]["val_auc"] != rows[1]["val_auc"]

    doc = json.loads((sweep_dir / "results.json").read_text())
    assert doc["swept"] == ["optimizer.lr"] and doc["num_failed"] == 0
    assert doc["points"][1]["overrides"][-1] == "optimizer.lr=0.1"
    assert splits_in(doc["points"][0]["final"]) == ["val", "test"]
    # The table is printed too, and Hydra's multirun.yaml records the sweep.
    assert "sweep results" in out.stdout and "optimizer.lr" in out.stdout
    assert (sweep_dir / "multirun.yaml").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_failed_point_is_reported_and_the_others_still_run_on_two_ranks(tmp_path, tiny_data_overrides) -> None:
    """255 rows do not split over 2 ranks: point #0's config is refused before it starts; 40,000 rows a step
    are more than the training split holds: #1 fails at start (a data error); #2 trains on 2 ranks."""
    sweep_dir = tmp_path / "sweep"
    out = _sweep(
        [
            sys.executable,
            "pipeline/train.py",
            "-m",
            *tiny_data_overrides,
            *QUICK,
            "data.global_batch_size=255,40000,256",
            "hydra.launcher.nproc_per_node=2",
            f"hydra.sweep.dir={sweep_dir}",
        ]
    )
    assert out.returncode != 0, "a sweep with a failed point exits non-zero"
    assert "2 of 3 points failed" in out.stderr

    invalid, failed, ok = _rows(sweep_dir)
    assert (invalid["status"], invalid["data.global_batch_size"], invalid["exit_code"]) == ("invalid", "255", "")
    assert not (sweep_dir / "0").exists(), "an invalid point starts nothing"
    assert "must be divisible by world_size=2" in out.stdout + out.stderr
    assert (failed["status"], failed["exit_code"], failed["val_auc"]) == ("failed", "1", "")
    assert "fewer than one global batch" in (sweep_dir / "1" / "torchrun.log").read_text()
    assert (ok["status"], ok["exit_code"], ok["world_size"]) == ("ok", "0", "2")
    assert float(ok["val_auc"]) > 0
    assert {"rank0.log", "rank1.log", "summary.json"} <= {p.name for p in (sweep_dir / "2").iterdir()}


@pytest.mark.distributed
def test_point_over_its_time_limit_is_stopped_with_its_ranks(tmp_path) -> None:
    # Its own data folder: the point may be stopped while it generates data.
    data = ["model=tiny", "data=tiny", f"data.raw_dir={tmp_path}/raw", f"data.processed_dir={tmp_path}/processed"]
    sweep_dir = tmp_path / "sweep"
    out = _sweep(
        [
            sys.executable,
            "pipeline/train.py",
            "-m",
            *data,
            *QUICK,
            "optimizer.lr=0.1",
            "hydra.launcher.nproc_per_node=2",
            "hydra.launcher.timeout_s=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=120,
    )
    assert out.returncode != 0
    (row,) = _rows(sweep_dir)
    assert row["status"] == "timeout" and row["val_auc"] == ""
    # torchrun and both ranks are gone (they ran in the point's own process group, stopped as one).
    if shutil.which("pgrep"):
        left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={sweep_dir}"], capture_output=True, text=True)
        assert left.stdout == "", left.stdout


@pytest.mark.distributed
def test_sigterm_to_the_sweep_stops_its_running_points(tmp_path) -> None:
    data = ["model=tiny", "data=tiny", f"data.raw_dir={tmp_path}/raw", f"data.processed_dir={tmp_path}/processed"]
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        [
            sys.executable,
            "pipeline/train.py",
            "-m",
            *data,
            "optimizer.lr=0.1,0.2",
            "hydra.launcher.nproc_per_node=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (sweep_dir / "0" / "torchrun.log").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # torchrun has started its ranks
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not (sweep_dir / "1").exists(), "no point starts after the signal"
    if shutil.which("pgrep"):
        left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={sweep_dir}"], capture_output=True, text=True)
        assert left.stdout == "", left.stdout


def test_torchrun_is_the_default_launcher_and_slurm_composes() -> None:
    def hydra_cfg(*overrides: str) -> dict:
        out = subprocess.run(
            [sys.executable, "pipeline/train.py", "--cfg", "hydra", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return yaml.safe_load(out.stdout)["hydra"]

    default = hydra_cfg()
    assert default["launcher"]["_target_"].endswith("pipeline_torchrun_launcher.torchrun_launcher.TorchrunLauncher")
    assert default["sweep"]["dir"] == "multirun/${run_id:}"
    slurm = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert slurm["launcher"]["_target_"] == "hydra_plugins.pipeline_torchrun_launcher.slurm_sweep.PipelineSlurmLauncher"
    assert (slurm["launcher"]["partition"], slurm["launcher"]["tasks_per_node"]) == ("gpu", 1)
    assert hydra_cfg("hydra/launcher=slurm", "--resolve")["launcher"]["setup"][0].startswith("export PIPELINE_RUN_ID=")


def test_plugin_is_discovered_and_refuses_to_run_inside_torchrun(monkeypatch) -> None:
    # Hydra's scanner re-executes plugin modules, so compare by name, not class identity.
    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert "hydra_plugins.pipeline_torchrun_launcher.torchrun_launcher.TorchrunLauncher" in names
    launcher = TorchrunLauncher(nproc_per_node="2")
    launcher.config, launcher.hydra_context = OmegaConf.create({}), object()
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="every rank would run the whole sweep"):
        launcher.launch([["optimizer.lr=0.1"]], initial_job_idx=0)


def test_results_table_lists_statuses_swept_values_and_metrics(tmp_path) -> None:
    final = {
        f"eval/{s}/{k}": v
        for s in ("val", "test")
        for k, v in {"auc": 0.71, "logloss": 0.5, "normalized_entropy": 0.9, "calibration": 1.0}.items()
    }
    points = [
        SweepPoint(
            0,
            ["model=tiny", "optimizer.lr=0.01"],
            tmp_path / "0",
            "ok",
            0,
            12.3,
            {"final": final, "world_size": 2, "steps": 10, "train_samples_per_s": 1000.0},
        ),
        SweepPoint(1, ["model=tiny", "optimizer.lr=0.1"], tmp_path / "1", "failed", 1, 3.0, None),
    ]
    text = write_results(tmp_path, points, ["optimizer.lr"])
    lines = text.splitlines()
    assert lines[1].split() == [
        "#",
        "status",
        "exit",
        "optimizer.lr",
        "val_auc",
        "val_logloss",
        "test_auc",
        "test_logloss",
        "seconds",
    ]
    assert lines[2].split() == ["0", "ok", "0", "0.01", "0.7100", "0.5000", "0.7100", "0.5000", "12.3"]
    assert lines[3].split() == ["1", "failed", "1", "0.1", "-", "-", "-", "-", "3.0"]
    rows = _rows(tmp_path)
    assert rows[1]["status"] == "failed" and rows[1]["val_auc"] == "" and rows[0]["world_size"] == "2"
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["num_failed"] == 1 and doc["points"][0]["swept"] == {"optimizer.lr": "0.01"}
