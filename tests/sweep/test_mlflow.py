"""./launch.sh tune with logger.backends=[...,mlflow]: one experiment on a real MLflow server (SQLite store),
the search a parent run, each trial a nested run with its params, metrics and report; the tracking URI's
credentials nowhere in the sweep folder, the output or the params."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.mlflow_server import mlflow_server

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SECRET = "pa55word"


def test_tune_lands_in_mlflow_as_a_parent_run_with_a_nested_run_per_trial(tmp_path, tiny_data_overrides) -> None:
    from mlflow import MlflowClient

    sweep_dir = tmp_path / "tune-mlflow"
    with mlflow_server(tmp_path / "mlflow") as uri:
        out = subprocess.run(
            [
                "bash",
                "launch.sh",
                "tune",
                *tiny_data_overrides,
                "trainer.max_steps=10",
                "trainer.eval_every_steps=0",
                "trainer.run_doctor=false",
                "logger.progress_bar=false",
                "data.global_batch_size=256",
                "model.embedding_dim=8",
                "trainer.num_epochs=1",
                "optimizer.embedding=row_wise_adagrad",
                "model.interaction=dot",
                "optimizer.embedding_lr=0.1",
                "data.min_id_frequency=2",
                "logger.backends=[jsonl,mlflow]",
                f"logger.mlflow_tracking_uri={uri.replace('http://', f'http://alice:{SECRET}@')}",
                "hydra.sweeper.n_trials=2",
                "hydra.sweeper.n_jobs=1",
                f"hydra.sweep.dir={sweep_dir}",
                f"hydra.sweeper.tuned_dir={tmp_path / 'tuned'}",
            ],
            cwd=ROOT,
            env={**os.environ, "NPROC": "1", "PIPELINE_RUN_ID": "tune-mlflow"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("tiny")  # the data's name
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {"tune-mlflow", "tune-mlflow_0", "tune-mlflow_1"}
        parent = runs["tune-mlflow"]
        assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
        best = json.loads((sweep_dir / "best.json").read_text())
        assert parent.data.metrics["best/eval/val/auc"] == pytest.approx(best["value"])
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
            "results.csv",
            "results.json",
            "best.json",
            "tuned.yaml",
        }
        for n in range(2):
            child, trial = runs[f"tune-mlflow_{n}"], sweep_dir / str(n)
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
            config = yaml.safe_load((trial / "config.yaml").read_text())
            assert float(child.data.params["optimizer.lr"]) == config["optimizer"]["lr"]  # the trial's draw
            assert child.data.params["data.global_batch_size"] == "256"
            final = json.loads((trial / "summary.json").read_text())["final"]
            assert child.data.metrics["eval/val/auc"] == pytest.approx(final["eval/val/auc"])
            assert child.data.metrics["eval/test/logloss"] == pytest.approx(final["eval/test/logloss"])
            assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [10]
            assert {"report.md", "report.png", "summary.json", "config.yaml"} <= {
                a.path for a in client.list_artifacts(child.info.run_id)
            }
            assert not any(SECRET in v for v in child.data.params.values())

    assert SECRET not in out.stdout + out.stderr
    for path in sweep_dir.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".json", ".log", ".md", ".csv", ".jsonl", ""}:
            assert SECRET not in path.read_text(errors="replace"), path
