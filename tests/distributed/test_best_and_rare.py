"""Training keeps the best checkpoint and reports from it; values rare in training train the shared
rare-or-unseen row, so unseen values get a calibrated prediction; user errors end in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import run_training

pytestmark = pytest.mark.distributed


def test_final_metrics_and_export_come_from_the_best_checkpoint(tmp_path, tiny_data_overrides) -> None:
    """Four epochs over the same tables overfit (no fresh tables): the best validation logloss comes early, and
    the final metrics are that evaluation's, from its checkpoint, not the last state's."""
    run = run_training(
        tmp_path / "run",
        [
            *tiny_data_overrides,
            "trainer.num_epochs=4",
            "trainer.eval_every_steps=20",
            "trainer.reset_tables_each_epoch=false",
            "optimizer.decay=none",
        ],
    )
    assert run.returncode == 0, run.output[-3000:]
    s = run.summary
    mid = [e for e in run.events("eval") if "eval/val/auc" in e and "model_step" not in e]
    best = min(mid, key=lambda e: e["eval/val/logloss"])
    assert s["final_model_step"] == best["step"] == s["best"]["step"] < s["steps"] == 312
    assert s["best"]["metric"] == "logloss" and s["best"]["value"] == best["eval/val/logloss"]
    for key in ("auc", "logloss", "calibration", "num_samples"):  # the restored weights score val as they did
        assert s["final"][f"eval/val/{key}"] == best[f"eval/val/{key}"], key
    last = [e for e in mid if e["step"] == s["steps"]][0]
    assert last["eval/val/logloss"] > best["eval/val/logloss"] and s["final"]["eval/test/num_samples"] == 4000
    root = run.run_dir / "checkpoints"
    assert (root / "best").read_text().strip() == f"step_{best['step']:08d}"
    assert (root / f"step_{best['step']:08d}").is_dir() and (root / "latest").read_text().strip() == "step_00000312"

    from pipeline.serving.export import export

    spec = export(run.run_dir, tmp_path / "export")
    assert spec["source"]["step"] == best["step"]  # the run's best, not its latest
    assert export(run.run_dir, tmp_path / "export_latest", which="latest")["source"]["step"] == 312


def _rare_value_log(path, rows: int, rng: np.random.Generator, frequent: np.ndarray) -> float:
    """Criteo-layout rows whose label depends on C1 only: one of 20 frequent values clicks 10% of the time, a value
    seen once 60%; every other column is a frequent value or a singleton at random. Returns the click rate of
    rows with a singleton C1."""
    rare = rng.random((rows, 26)) < 0.5
    values = np.where(
        rare,
        rng.integers(1, 2**32, size=(rows, 26), dtype=np.uint64),
        frequent[np.arange(26), rng.integers(0, 20, size=(rows, 26))],
    )
    labels = (rng.random(rows) < np.where(rare[:, 0], 0.6, 0.1)).astype(int)
    with open(path, "w") as f:
        for y, row in zip(labels, values, strict=True):
            f.write(f"{y}\t" + "\t" * 13 + "\t".join(f"{int(v):08x}" for v in row) + "\n")
    return float(labels[rare[:, 0]].mean())


def test_unseen_values_share_a_trained_row_and_get_a_calibrated_probability(tmp_path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from pipeline.serving.export import export, load_exported

    rng = np.random.default_rng(0)
    frequent = rng.integers(1, 2**32, size=(26, 20), dtype=np.uint64)  # per column, shared by train and val
    rare_rate = _rare_value_log(tmp_path / "train.tsv", 20_000, rng, frequent)
    _rare_value_log(tmp_path / "val.tsv", 4_000, rng, frequent)
    run = run_training(
        tmp_path / "run",
        [
            "model=tiny",
            "data=files",
            f"data.train_files=[{tmp_path}/train.tsv]",
            f"data.val_files=[{tmp_path}/val.tsv]",
            f"data.processed_dir={tmp_path}/processed",
            "data.min_id_frequency=2",
            "data.global_batch_size=256",
            "trainer.num_epochs=1",
            "sharding=table_wise",
        ],
    )
    assert run.returncode == 0, run.output[-3000:]
    assert run.summary["final"]["eval/val/auc"] > 0.7

    # The rare-or-unseen row (id 1) of C1's table received gradients: its row-wise Adagrad state grew.
    dcp_to_torch_save(run.run_dir / "checkpoints" / "step_00000078", tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    momentum = [v for entry in state["optim"].values() for k, v in entry.items() if k == "t_cat_0.momentum1"]
    assert len(momentum) == 1 and len(momentum[0]) == 22  # 20 values seen twice or more, missing, rare-or-unseen
    assert momentum[0][1] > 0

    # Rows of values never seen in training score the click rate of the rare values (C1's signal).
    export(run.run_dir, tmp_path / "export")
    model = load_exported(tmp_path / "export")
    unseen = rng.integers(1, 2**32, size=(500, 26), dtype=np.uint64)
    from pipeline.data.tsv import RawBlock

    block = RawBlock(
        np.zeros(500, np.int8),
        np.zeros((500, 13), np.int64),
        np.ones((500, 13), bool),
        unseen.astype(np.uint32),
        np.zeros((500, 26), bool),
        np.arange(500),
    )
    ids = model.features.map_ids(block)
    assert (ids == 1).all(), "unseen values map to the shared row"
    probs = model.predict(np.zeros((500, 13), np.float32), ids)
    assert abs(float(probs.mean()) - rare_rate) < 0.05, (probs.mean(), rare_rate)


def test_tables_that_do_not_fit_stop_the_job_in_one_message(tmp_path, tiny_data_overrides) -> None:
    overrides = [o for o in tiny_data_overrides if not o.startswith("data.processed_dir")]
    run = run_training(
        tmp_path / "run",
        [
            *overrides,
            f"data.processed_dir={tmp_path}/hashed",
            "data.id_mode=hash",
            "data.max_ids_per_feature=500000000",
        ],
    )
    log = (run.run_dir / "rank0.log").read_text()
    assert run.returncode != 0 and "exitcode  : 3" in run.output, run.output[-3000:]  # TrainingError's code
    assert "no sharding plan fits: the tables need" in log and "Fix: data.max_ids_per_feature=" in log
    assert "Traceback" not in log


def test_training_on_too_few_rows_for_a_batch_fails_in_one_line(tmp_path, tiny_data_overrides) -> None:
    run = run_training(tmp_path / "run", [*tiny_data_overrides, "data.global_batch_size=40000"])
    log = (run.run_dir / "rank0.log").read_text()
    assert run.returncode != 0 and "exitcode  : 4" in run.output, run.output[-3000:]  # DataError's code
    assert "the train split of" in log and "fewer than one global batch (data.global_batch_size=40000)" in log
    assert "Traceback" not in log and "ZeroDivisionError" not in run.output
