"""The MLflow backend against a real tracking server (SQLite store) started here, read back through MlflowClient:
params, metric history per step, artifacts, a resumed run, credentials, mlflow missing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from pipeline.config import LoggerBackend, LoggerConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.metrics.loggers import RunWriter, scalars_of
from pipeline.metrics.tracking import RUN_FILE, end_run, flatten, log_export
from tests.conftest import ROOT
from tests.mlflow_server import mlflow_server

BACKENDS = [LoggerBackend.jsonl, LoggerBackend.mlflow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _config(uri: str, **logger) -> TrainConfig:
    cfg = TrainConfig()
    cfg.logger = LoggerConfig(backends=BACKENDS, mlflow_tracking_uri=uri, **logger)
    return cfg


def _container(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def _train(step: int, loss: float) -> dict:
    return {
        "event": "train",
        "step": step,
        "epoch": 0,
        "samples": step * 64,
        "train/loss": loss,
        "train/samples_per_s": 1000.0 + step,
        "train/lr": 0.01,
        "time_s": 1.0,
        "memory/rss_mib": 100.0,
    }


def _eval(step: int, auc: float) -> dict:
    return {"event": "eval", "step": step, "samples": step * 64, "partial": False, "eval/val/auc": auc}


def _run(client, run_dir):
    return client.get_run(json.loads((run_dir / RUN_FILE).read_text())["run_id"])


def test_a_run_logs_its_config_as_params_its_events_per_step_and_its_report(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-a")
    run_dir = tmp_path / "run-a"
    run_dir.mkdir()
    cfg = _config(server)
    writer = RunWriter(run_dir, True, cfg.logger)
    writer.config(_container(cfg))
    events = [_train(10, 0.6), _train(20, 0.5), _eval(20, 0.71), {"event": "checkpoint", "step": 20}]
    for e in events:
        writer.event(e)
    writer.close()
    for name in ("report.md", "summary.json"):
        (run_dir / name).write_text(f"{name}\n")
    (run_dir / "report.png").write_bytes(b"\x89PNG\r\n")
    end_run(cfg.logger, run_dir)

    client = _client(server)
    run = _run(client, run_dir)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == cfg.data.name and run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params == flatten(_container(cfg))  # the whole config, dotted keys
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.data.params["logger.backends"] == '["jsonl", "mlflow"]'
    # The same keys as metrics.jsonl's events, each at its training step.
    jsonl_keys = set().union(*(scalars_of(e)[1] for e in map(json.loads, (run_dir / "metrics.jsonl").open())))
    assert set(run.data.metrics) == jsonl_keys
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.6), (20, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/val/auc")] == [(20, 0.71)]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "report.md",
        "report.png",
        "summary.json",
        "config.yaml",
    }
    local = client.download_artifacts(run.info.run_id, "report.png", str(tmp_path / "dl"))
    assert open(local, "rb").read() == b"\x89PNG\r\n"

    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text("{}\n")
    assert log_export(run_dir, export)  # config.yaml names the server
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == ["export/export.json"]


def test_a_resumed_run_continues_the_same_mlflow_run(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-b")
    run_dir = tmp_path / "run-b"
    run_dir.mkdir()
    cfg = _config(server, mlflow_experiment="resumes")
    for steps in ((10, 20), (20, 30)):  # killed after step 20, resumed from its checkpoint at step 10
        writer = RunWriter(run_dir, True, cfg.logger)
        writer.config(_container(cfg))
        if steps[0] == 20:
            writer.event({"event": "resume", "step": 10, "samples": 640})
        for step in steps:
            writer.event(_train(step, 1.0 / step))
        writer.close()
        end_run(cfg.logger, run_dir, "KILLED" if steps[0] == 10 else "FINISHED")

    client = _client(server)
    experiment = client.get_experiment_by_name("resumes")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run-b"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [10, 20, 30]


def test_credentials_in_the_tracking_uri_stay_out_of_the_run_folder_params_and_logs(
    server, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-c")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")  # sent to the server, never written
    run_dir = tmp_path / "run-c"
    run_dir.mkdir()
    uri = server.replace("http://", "http://alice:pa55word@")
    cfg = _config(uri)
    caplog.set_level(logging.INFO)
    writer = RunWriter(run_dir, True, cfg.logger)
    writer.config(_container(cfg))
    writer.event(_train(1, 0.5))
    writer.close()
    end_run(cfg.logger, run_dir)

    for path in run_dir.iterdir():
        text = path.read_text()
        assert "pa55word" not in text and "alice" not in text and "tok-0123456789" not in text, path.name
    assert "http://***@127.0.0.1" in (run_dir / "config.yaml").read_text()
    assert "pa55word" not in caplog.text and "MLflow run" in caplog.text
    run = _run(_client(server), run_dir)
    assert run.data.params["logger.mlflow_tracking_uri"].startswith("http://***@127.0.0.1")
    assert not any("pa55word" in v or "tok-0123456789" in v for v in run.data.params.values())


def test_mlflow_selected_but_not_installed_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec and import both fail as when not installed
    with pytest.raises(ConfigError, match="mlflow is not installed: run ./launch.sh setup"):
        LoggerConfig(backends=BACKENDS)
    LoggerConfig()  # not selected: nothing needed


def test_launch_sh_train_without_mlflow_stops_with_one_line(tmp_path) -> None:
    """The entry point's check, before any process or run folder: a short message, exit code 2, no traceback."""
    code = (
        "import sys; sys.modules['mlflow'] = None; from pipeline.cli import main; "
        "sys.exit(main(['train', 'model=tiny', 'data=tiny', 'logger.backends=[jsonl,mlflow]']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PIPELINE_RUN_ID": "no-mlflow", "NPROC": "1"},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "mlflow is not installed" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_export_of_a_tracked_run_uploads_it_to_the_run(tmp_path, monkeypatch) -> None:
    """./launch.sh export <run folder or one of its checkpoints> --out DIR: the export goes to the run's MLflow run."""
    from pipeline import cli
    from pipeline.metrics import tracking

    run_dir = tmp_path / "run-d"
    (run_dir / "checkpoints" / "step_5").mkdir(parents=True)
    (run_dir / RUN_FILE).write_text('{"run_id": "abc"}\n')
    calls = []
    monkeypatch.setattr(cli, "_tool", lambda module, args: 0)
    monkeypatch.setattr(tracking, "log_export", lambda run, out: calls.append((run, out)))
    args = ["--checkpoint", "latest", str(run_dir / "checkpoints" / "step_5"), "--out", str(tmp_path / "e")]
    assert cli.main(["export", *args]) == 0
    assert calls == [(run_dir, str(tmp_path / "e"))]
    calls.clear()
    (run_dir / RUN_FILE).unlink()  # not tracked: nothing to upload
    assert cli.main(["export", *args]) == 0 and calls == []
