"""Multi-hot data through the rest of the pipeline: a SIGKILLed 2-rank run on list columns resumes bit for
bit, its checkpoint reshards onto 1 rank with the same predictions, and the export (float and int8) scores
the raw rows with their lists as the sharded model scored the preprocessed split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import kill_job, losses, run_training, start_training, wait_for_step

pytestmark = pytest.mark.distributed

STEPS = 40


@pytest.fixture(scope="module")
def multihot_data(tmp_path_factory) -> list[str]:
    """data=synthetic_multihot made small: bags L1, L2, a weighted bag W1 and a capped sequence S1."""
    root = tmp_path_factory.mktemp("multihot_data")
    return [
        "model=tiny",
        "data=synthetic_multihot",
        f"data.raw_dir={root}/raw",
        f"data.processed_dir={root}/processed",
        "data.synthetic.num_train_rows=12000",
        "data.synthetic.num_val_rows=3000",
        "data.synthetic.num_test_rows=3000",
    ]


def _overrides(data: list[str], *extra: str) -> list[str]:
    return [
        *data,
        f"trainer.max_steps={STEPS}",
        "logger.log_every_steps=1",
        "trainer.eval_every_steps=0",
        "checkpoint.every_steps=10",
        "sharding=table_wise",
        "+model.table_pooling.S1=mean",  # the sequence mean-pooled, L1 and L2 summed,
        "+model.table_pooling.W1=mean",  # the weighted bag's weighted sum over its count (FBGEMM's weighted mean)
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, multihot_data) -> Path:
    run = run_training(
        tmp_path_factory.mktemp("mh_ref") / "ref",
        [*_overrides(multihot_data), "trainer.save_predictions=true"],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-3000:]
    return run.run_dir


def test_multihot_run_killed_resumes_bit_for_bit_and_reshards(tmp_path, multihot_data, reference) -> None:
    manifest = json.loads((Path(multihot_data[3].split("=", 1)[1]) / "manifest.json").read_text())
    assert manifest["multi_hot_columns"] == {"L1": 0, "L2": 0, "W1": 0, "S1": 10}
    assert manifest["pooling_factors"][-1] > 1 and manifest["max_lengths"][-1] == 10

    run_dir = tmp_path / "killed"
    proc = start_training(run_dir, _overrides(multihot_data), nproc=2)
    seen = wait_for_step(run_dir, 17, proc)
    kill_job(proc, run_dir, 2)
    assert seen < STEPS and not (run_dir / "summary.json").exists()
    resumed = run_training(run_dir, _overrides(multihot_data), nproc=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output
    assert losses(run_dir) == losses(reference), "every step's loss equals the uninterrupted run's"

    # 2 ranks table-wise -> 1 rank: load the final checkpoint and predict val again.
    one = run_training(
        tmp_path / "one",
        [
            *multihot_data,
            f"trainer.max_steps={STEPS}",
            "trainer.save_predictions=true",
            "trainer.eval_every_steps=0",
            "checkpoint.save_at_end=false",
            "+model.table_pooling.S1=mean",
            "+model.table_pooling.W1=mean",
            f"trainer.resume={reference / 'checkpoints'}",
        ],
        nproc=1,
    )
    assert one.returncode == 0, one.output[-3000:]
    assert f"saved by 2 rank(s)) at step {STEPS}" in one.output
    np.testing.assert_allclose(
        np.load(one.run_dir / "predictions_val.npy"), np.load(reference / "predictions_val.npy"), rtol=1e-5, atol=1e-6
    )


def test_export_scores_raw_rows_with_lists_like_the_sharded_model(tmp_path, multihot_data, reference) -> None:
    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    raw = Path(multihot_data[2].split("=", 1)[1])
    spec = export(reference, tmp_path / "float")
    assert spec["schema"]["multi_hot_columns"] == {"L1": 0, "L2": 0, "W1": 0, "S1": 10}
    model = load_exported(tmp_path / "float")
    want = np.load(reference / "predictions_val.npy")
    res = run(model, str(tmp_path / "val.npy"), input_path=str(raw / "val.tsv"), batch_size=700)
    np.testing.assert_allclose(np.load(tmp_path / "val.npy"), want, rtol=1e-5, atol=1e-7)
    summary = json.loads((reference / "summary.json").read_text())["final"]
    assert res.metrics["auc"] == pytest.approx(summary["eval/val/auc"], abs=1e-6)
    run(model, str(tmp_path / "split.npy"), split="val")
    np.testing.assert_allclose(np.load(tmp_path / "split.npy"), want, rtol=1e-5, atol=1e-7)

    run(load_exported(tmp_path / "float", "bf16"), str(tmp_path / "bf16.npy"), input_path=str(raw / "val.tsv"))
    gap = np.abs(np.load(tmp_path / "bf16.npy") - want)  # lists through the KJT path, the dense part in bf16
    assert gap.max() < 0.02 and gap.mean() < 0.002, (gap.max(), gap.mean())

    export(reference, tmp_path / "int8", quantize="int8", dense_program=False)
    q = run(load_exported(tmp_path / "int8"), str(tmp_path / "q.npy"), input_path=str(raw / "val.tsv"))
    assert np.abs(np.load(tmp_path / "q.npy") - want).max() < 0.02
    assert abs(q.metrics["auc"] - res.metrics["auc"]) < 0.005


def test_model_on_materialised_bags_scores_raw_one_hot_rows(tmp_path, tiny_data_overrides) -> None:
    """experiment=mlperf_dlrmv2_small (data=tiny made into MLPerf's bags) with rare values folded: the export
    reads one-hot raw rows, draws each id's bag as the materialisation did, and scores as the trained model."""
    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    raw = next(o.split("=", 1)[1] for o in tiny_data_overrides if o.startswith("data.raw_dir="))
    onehot = next(o.split("=", 1)[1] for o in tiny_data_overrides if o.startswith("data.processed_dir="))
    trained = run_training(
        tmp_path / "run",
        [
            "experiment=mlperf_dlrmv2_small",
            "model=tiny",
            f"data.raw_dir={raw}",
            f"data.materialize.source_dir={onehot}",
            f"data.processed_dir={tmp_path}/bags",
            "data.min_id_frequency=3",
            "trainer.max_steps=15",
            "trainer.save_predictions=true",
            "trainer.eval_every_steps=0",
        ],
        nproc=1,
    )
    assert trained.returncode == 0, trained.output[-3000:]
    spec = export(trained.run_dir, tmp_path / "export")
    assert spec["input"]["materialize"]["sizes"][20] == 100 and spec["input"]["vocab"]["min_id_frequency"] == 1
    res = run(load_exported(tmp_path / "export"), str(tmp_path / "val.npy"), input_path=f"{raw}/val.tsv")
    assert res.scored == 4000
    np.testing.assert_allclose(
        np.load(tmp_path / "val.npy"), np.load(trained.run_dir / "predictions_val.npy"), rtol=1e-5, atol=1e-7
    )
