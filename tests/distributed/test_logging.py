"""TensorBoard event files and the run report of real tiny training runs (1 gloo rank)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from pipeline.metrics.loggers import EVENT_FILE_GLOB
from pipeline.tools import report
from tests.conftest import ROOT, TrainRun, run_training
from tests.tfevents import float32, read_scalars

pytestmark = pytest.mark.distributed

PNG_SIZE = (int(report.FIG_SIZE[0] * report.DPI), int(report.FIG_SIZE[1] * report.DPI))
QUICK = ["trainer.run_doctor=false", "logger.log_every_steps=5", "trainer.eval_max_batches=2"]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, tiny_data_overrides) -> TrainRun:
    """40 steps with TensorBoard (the default backends) and the automatic report, evaluating every 20."""
    run = run_training(
        tmp_path_factory.mktemp("logging") / "lr0.01",
        [*tiny_data_overrides, *QUICK, "trainer.max_steps=40", "trainer.eval_every_steps=20", "optimizer.lr=0.01"],
        nproc=1,
    )
    assert run.returncode == 0, run.output[-4000:]
    return run


def _check_png(path) -> None:
    assert path.stat().st_size > 10_000
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.size == PNG_SIZE


def test_tensorboard_scalars_equal_metrics_jsonl(tb_run) -> None:
    assert len(list(tb_run.run_dir.glob(EVENT_FILE_GLOB))) == 1, "event files beside metrics.jsonl"
    scalars = read_scalars(tb_run.run_dir)
    train = tb_run.events("train")
    assert [e["step"] for e in train] == list(range(5, 45, 5))
    for key in ("train/loss", "train/samples_per_s", "train/lr", "memory/rss_mib", "memory/peak_rss_mib"):
        assert scalars[key] == [(e["step"], float32(e[key])) for e in train], key
    assert scalars["progress/samples"] == [(e["step"], float(e["samples"])) for e in train]
    assert train[-1]["memory/peak_rss_mib"] >= train[-1]["memory/rss_mib"] > 50
    assert "memory/cuda_max_allocated_mib" not in scalars  # CPU run
    # Evaluations by split: val at steps 20 (partial) and 40 (final, whole split), test at the end.
    val = [e for e in tb_run.events("eval") if "eval/val/auc" in e]
    assert scalars["eval/val/auc"] == [(e["step"], float32(e["eval/val/auc"])) for e in val]
    assert [s for s, _ in scalars["eval/val/logloss"]] == [20, 40]
    assert scalars["eval/test/auc"] == [(40, float32(tb_run.summary["final"]["eval/test/auc"]))]


def test_automatic_report_after_training(tb_run) -> None:
    _check_png(tb_run.run_dir / "report.png")
    md = (tb_run.run_dir / "report.md").read_text()
    auc = tb_run.summary["final"]["eval/val/auc"]
    assert f"| val | {auc:.4f} |" in md
    assert "run report:" in (tb_run.run_dir / "rank0.log").read_text()


def test_report_cli_and_two_run_comparison(tb_run, tiny_data_overrides, tmp_path) -> None:
    # A second run without TensorBoard nor automatic report, at another learning rate.
    other = run_training(
        tb_run.run_dir.parent / "lr0.05",
        [
            *tiny_data_overrides,
            *QUICK,
            "trainer.max_steps=10",
            "trainer.eval_every_steps=0",
            "optimizer.lr=0.05",
            "logger.backends=[jsonl]",
            "logger.report=false",
        ],
        nproc=1,
    )
    assert other.returncode == 0, other.output[-4000:]
    assert not list(other.run_dir.glob(EVENT_FILE_GLOB)) and not (other.run_dir / "report.png").exists()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.tools.report",
            str(tb_run.run_dir),
            str(other.run_dir),
            "--out",
            str(tmp_path / "cmp"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    _check_png(tmp_path / "cmp" / "report.png")
    md = (tmp_path / "cmp" / "report.md").read_text()
    # Each run is labelled by its name and the overrides that differ (not the shared data paths).
    runs = [report.load_run(tb_run.run_dir), report.load_run(other.run_dir)]
    report.label_runs(runs)
    for run, loaded, lr in ((tb_run, runs[0], "0.01"), (other, runs[1], "0.05")):
        assert loaded.label.startswith(f"{run.run_dir.name}: ") and f"optimizer.lr={lr}" in loaded.label
        assert "data.raw_dir" not in loaded.label
        auc = run.summary["final"]["eval/val/auc"]
        assert f"| {loaded.label} | val | {auc:.4f} |" in md, md


def test_report_of_a_run_without_evaluations(tb_run, tmp_path) -> None:
    """A run killed before its first evaluation: train events only, no summary.json."""
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tb_run.run_dir / "config.yaml", killed)
    lines = (tb_run.run_dir / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["event"] == "train") + "\n")
    png, md = report.write_report([killed])
    _check_png(png)
    assert "No evaluation in metrics.jsonl yet" in md.read_text()


def test_resumed_run_supersedes_the_points_after_its_checkpoint(tmp_path, tiny_data_overrides) -> None:
    """A run that stopped at step 15 with its last checkpoint at step 10, resumed and run to step 20:
    TensorBoard (purge_step) and the report (metrics.jsonl's resume event) keep the resumed points."""
    run_dir = tmp_path / "resumed"
    common = [
        *tiny_data_overrides,
        *QUICK,
        "trainer.eval_every_steps=0",
        "checkpoint.every_steps=10",
        "checkpoint.save_at_end=false",
        "trainer.restore_best=false",
        "logger.report=false",
    ]
    first = run_training(run_dir, [*common, "trainer.max_steps=15"], nproc=1)
    assert first.returncode == 0, first.output[-4000:]
    second = run_training(run_dir, [*common, "trainer.max_steps=20"], nproc=1)
    assert second.returncode == 0, second.output[-4000:]
    assert [e["step"] for e in second.events("resume")] == [10]
    events = report.load_events(run_dir / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [5, 10, 15, 20]
    scalars = read_scalars(run_dir)
    assert len(list(run_dir.glob(EVENT_FILE_GLOB))) == 2
    assert scalars["train/loss"] == [(e["step"], float32(e["train/loss"])) for e in train]
    assert [s for s, _ in scalars["eval/val/auc"]] == [20]  # the first run's final eval at 15 is superseded
