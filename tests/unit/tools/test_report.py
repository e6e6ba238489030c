"""The run report (pipeline/tools/report.py) and the metric backends (pipeline/metrics/loggers.py) on run
folders made by hand: no training, a few seconds in all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.metrics import loggers
from pipeline.tools import report
from tests.tfevents import float32, read_scalars

ROOT = Path(__file__).resolve().parents[3]
PNG_SIZE = (int(report.FIG_SIZE[0] * report.DPI), int(report.FIG_SIZE[1] * report.DPI))
OPTIMUM = {"val": {"auc": 0.80, "logloss": 0.44}, "test": {"auc": 0.81, "logloss": 0.43}}


def _train(step: int, loss: float, gbs: int = 256) -> dict:
    return {
        "event": "train",
        "step": step,
        "epoch": 0,
        "samples": step * gbs,
        "train/loss": loss,
        "train/samples_per_s": 5000.0 + step,
        "train/lr": 0.01,
        "time_s": step * 0.1,
        "memory/rss_mib": 500.0,
        "memory/peak_rss_mib": 512.5,
    }


def _eval(step: int, split: str, auc: float, logloss: float, gbs: int = 256) -> dict:
    values = {
        "auc": auc,
        "logloss": logloss,
        "normalized_entropy": 0.9,
        "accuracy": 0.77,
        "calibration": 1.01,
        "ctr": 0.25,
        "num_samples": 4000,
        "seconds": 0.2,
    }
    return {
        "event": "eval",
        "step": step,
        "samples": step * gbs,
        "partial": False,
        **{f"eval/{split}/{k}": v for k, v in values.items()},
    }


def make_run(
    path: Path,
    events: list[dict],
    summary: dict | None = None,
    overrides: list[str] | None = None,
    config: str | None = None,
) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config is not None:
        (path / "config.yaml").write_text(config)
    return path


def finished_run(path: Path, lr: float = 0.01, auc: float = 0.7712) -> Path:
    events = [_train(s, 0.6 - s / 1000) for s in range(10, 110, 10)]
    events += [_eval(50, "val", auc - 0.02, 0.47), _eval(100, "val", auc, 0.46), _eval(100, "test", auc + 0.001, 0.459)]
    final = {
        f"eval/{s}/{k}": v
        for s in ("val", "test")
        for k, v in {
            "auc": auc + (0.001 if s == "test" else 0),
            "logloss": 0.46,
            "normalized_entropy": 0.9,
            "accuracy": 0.77,
            "calibration": 1.01,
            "ctr": 0.25,
            "num_samples": 4000,
        }.items()
    }
    summary = {
        "world_size": 2,
        "backend": "gloo",
        "device": "cpu",
        "data": "tiny",
        "model": "dlrm",
        "steps": 100,
        "epochs": 1.28,
        "samples": 25600,
        "global_batch_size": 256,
        "train_samples_per_s": 5123.4,
        "train_seconds": 5.0,
        "wall_seconds": 9.5,
        "final": final,
        "optimum": OPTIMUM,
        "data_rows": {"train": 20000, "val": 4000, "test": 4000},
    }
    config = (
        "model:\n  name: dlrm\n  embedding_dim: 8\n  dense_arch_layer_sizes: [16, 8]\n"
        "  over_arch_layer_sizes: [16, 1]\n"
        f"data:\n  name: tiny\n  global_batch_size: 256\n  id_mode: vocab\noptimizer:\n  name: row_wise_adagrad\n"
        f"  embedding: row_wise_adagrad\n  dense: adagrad\n  lr: {lr}\n  embedding_lr: null\n  warmup_steps: 0\n"
        "  decay: none\nsharding:\n  name: auto\n"
    )
    return make_run(
        path, events, summary, ["model=tiny", "data=tiny", f"optimizer.lr={lr}", f"hydra.run.dir={path}"], config
    )


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.size == PNG_SIZE


def test_one_finished_run(tmp_path) -> None:
    run = finished_run(tmp_path / "run")
    png, md = report.write_report([run])
    assert png == run / "report.png" and md == run / "report.md"
    _check_png(png)
    text = md.read_text()
    assert "| val | 0.7712 | 0.4600 |" in text and "0.8000" in text  # final AUC, logloss, optimum
    assert "0.0288" in text  # the AUC gap to the optimum
    for fact in (
        "tiny (20,000 train, 4,000 val, 4,000 test rows)",
        "world size 2 (gloo, cpu)",
        "5,123 samples/s",
        "wall 9.5 s",
        "peak RSS 512 MiB",
        "`optimizer.lr=0.01`",
        "embedding_dim 8",
    ):
        assert fact in text, fact


def test_two_runs_are_labelled_by_the_overrides_that_differ(tmp_path) -> None:
    a, b = finished_run(tmp_path / "sweep" / "0", lr=0.01), finished_run(tmp_path / "sweep" / "1", lr=0.1, auc=0.75)
    runs = [report.load_run(a), report.load_run(b)]
    report.label_runs(runs)
    assert [r.label for r in runs] == ["0: optimizer.lr=0.01", "1: optimizer.lr=0.1"]  # hydra.* keys ignored
    # A sweep folder stands for its runs; the report goes into it.
    png, md = report.write_report([tmp_path / "sweep"])
    assert png.parent == tmp_path / "sweep"
    _check_png(png)
    text = md.read_text()
    assert "| 0: optimizer.lr=0.01 | val | 0.7712 |" in text and "| 1: optimizer.lr=0.1 | val | 0.7500 |" in text


def test_labels_fall_back_to_config_differences(tmp_path) -> None:
    a, b = finished_run(tmp_path / "a", lr=0.01), finished_run(tmp_path / "b", lr=0.2)
    (b / ".hydra" / "overrides.yaml").unlink()
    runs = [report.load_run(a), report.load_run(b)]
    report.label_runs(runs)
    assert [r.label for r in runs] == ["a: optimizer.lr=0.01", "b: optimizer.lr=0.2"]


def test_no_eval_events_and_no_summary_still_renders(tmp_path) -> None:
    run = make_run(tmp_path / "killed", [_train(s, 0.6) for s in (10, 20, 30)])
    png, md = report.write_report([run], tmp_path / "out")
    _check_png(png)
    text = md.read_text()
    assert "No evaluation in metrics.jsonl yet" in text and "not finished (no summary.json)" in text


def test_empty_metrics_still_renders(tmp_path) -> None:
    run = make_run(tmp_path / "empty", [])
    png, _ = report.write_report([run])
    _check_png(png)


def test_resume_drops_the_work_after_the_checkpoint(tmp_path) -> None:
    events = [
        _train(10, 0.6),
        _train(20, 0.5),
        _train(30, 0.4),
        {"event": "resume", "step": 20, "samples": 5120},
        _train(30, 0.45),
        _eval(30, "val", 0.7, 0.5),
        _eval(30, "val", 0.71, 0.49),
    ]
    path = make_run(tmp_path / "r", events)
    (path / "metrics.jsonl").open("a").write('{"event": "train", "step": 4')  # a line cut by a kill
    run = report.load_run(path)
    assert [(e["step"], e["train/loss"]) for e in run.train] == [(10, 0.6), (20, 0.5), (30, 0.45)]
    assert [e["eval/val/auc"] for e in run.evals] == [0.71]


def test_cli(tmp_path) -> None:
    run = finished_run(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.report", str(run), "--out", str(tmp_path / "rep")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'rep' / 'report.png'}" in out.stdout
    _check_png(tmp_path / "rep" / "report.png")
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.report", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


# -- metric backends ---------------------------------------------------------------------------------
def test_scalar_tags_by_phase() -> None:
    x, train = loggers.scalars_of(_train(10, 0.5))
    assert x == 10 and train == {
        "train/loss": 0.5,
        "train/samples_per_s": 5010.0,
        "train/lr": 0.01,
        "memory/rss_mib": 500.0,
        "memory/peak_rss_mib": 512.5,
        "progress/samples": 2560.0,
    }
    x, ev = loggers.scalars_of(_eval(10, "test", 0.7, 0.5), x_axis="samples")
    assert x == 2560 and ev["eval/test/auc"] == 0.7 and ev["eval/test/logloss"] == 0.5 and "partial" not in str(ev)
    assert loggers.scalars_of({"event": "checkpoint", "step": 3, "path": "x"}) == (None, {})


def test_tensorboard_round_trip_and_resume_purge(tmp_path) -> None:
    tb = loggers.TensorBoardBackend(tmp_path)
    for s in (1, 2, 3, 4):
        tb.log(_train(s, 0.1 * s + 1 / 3))
    tb.log(_eval(4, "val", 0.7, 0.5))
    tb.close()
    # A resumed run (checkpoint at step 2) logs steps 3.. again: TensorBoard keeps the new ones.
    tb = loggers.TensorBoardBackend(tmp_path)
    tb.log({"event": "resume", "step": 2, "samples": 512})
    tb.log(_train(3, 9.0))
    tb.close()
    assert len(list(tmp_path.glob(loggers.EVENT_FILE_GLOB))) == 2
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, float32(0.1 + 1 / 3)), (2, float32(0.2 + 1 / 3)), (3, 9.0)]
    assert "eval/val/auc" not in scalars  # step 4 was purged
    assert scalars["progress/samples"][-1] == (3, 768.0)


def test_process_memory() -> None:
    mem = loggers.process_memory_mib()
    assert 10 < mem["memory/rss_mib"] <= mem["memory/peak_rss_mib"] < 1e6
    assert "memory/cuda_max_allocated_mib" not in mem


def test_jsonl_is_required() -> None:
    from pipeline.config import ConfigError, LoggerBackend, TrainConfig, validate

    cfg = TrainConfig()
    cfg.logger.backends = [LoggerBackend.tensorboard]
    with pytest.raises(ConfigError, match="must include jsonl"):
        validate(cfg, 1)
    with pytest.raises(ValueError, match="unknown logger backend"):
        loggers.make_backends(["wandb"], ".")


def test_a_failing_report_only_warns(tmp_path, monkeypatch, caplog) -> None:
    from pipeline import train
    from pipeline.config import TrainConfig

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report, "write_report", broken)
    monkeypatch.setenv("RANK", "0")
    train._report(TrainConfig(), tmp_path)  # does not raise
    assert "run report not written: RuntimeError: no fonts" in caplog.text


def test_tensorboard_samples_axis(tmp_path) -> None:
    tb = loggers.TensorBoardBackend(tmp_path, x_axis="samples")
    for s in (1, 2, 3):
        tb.log(_train(s, 0.5))
    tb.log({"event": "resume", "step": 2, "samples": 512})  # steps 3.. are redone
    tb.log(_train(3, 0.25))
    tb.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(256, 0.5), (512, 0.5), (768, 0.25)]
    assert scalars["progress/step"] == [(256, 1.0), (512, 2.0), (768, 3.0)]


def test_event_files_are_read_in_the_order_they_were_opened(tmp_path) -> None:
    """Names resolve only to the second: a resumed run's file opened in the same second must still count
    as the later one, whatever its name sorts as (the bug: '.10' sorted before '.9')."""
    import shutil

    first = loggers.TensorBoardBackend(tmp_path / "a")
    first.log(_train(1, 1.0))
    first.log(_train(2, 2.0))
    first.close()
    second = loggers.TensorBoardBackend(tmp_path / "b")
    second.log({"event": "resume", "step": 1, "samples": 256})
    second.log(_train(2, 5.0))
    second.close()
    (old,), (new,) = (
        list((tmp_path / "a").glob(loggers.EVENT_FILE_GLOB)),
        list((tmp_path / "b").glob(loggers.EVENT_FILE_GLOB)),
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(old, merged / "events.out.tfevents.100.host.9")  # the older file gets the later-sorting name
    shutil.copy(new, merged / "events.out.tfevents.100.host.10")
    assert read_scalars(merged)["train/loss"] == [(1, 1.0), (2, 5.0)]
