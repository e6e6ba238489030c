"""Multi-hot data is learnt: a tiny DLRM sharded over 2 gloo ranks, one epoch of data=synthetic_multihot as
shipped (500k rows; bags, a weighted bag and a capped sequence), ends within 0.01 AUC of the generator's
Bayes optimum, far above the best any model ignoring the list columns can do."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_training

pytestmark = pytest.mark.distributed


def test_two_ranks_reach_the_optimum_of_multihot_data_within_a_hundredth(tmp_path) -> None:
    data = tmp_path / "data"
    run = run_training(
        tmp_path / "run",
        [
            "model=tiny",
            "data=synthetic_multihot",
            f"data.raw_dir={data}/raw",
            f"data.processed_dir={data}/processed",
            "trainer.num_epochs=1",
            "trainer.eval_every_steps=0",
            "logger.log_every_steps=100",
        ],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-4000:]
    for name in ("L1", "L2", "W1", "S1"):
        assert f"embedding_bag_collection.t_{name}:" in run.output, f"the plan shards the list table t_{name}"
    summary = run.summary
    assert summary["world_size"] == 2
    without = json.loads((data / "raw" / "optimum.json").read_text())["optimum_without"]["lists"]
    for split in ("val", "test"):
        auc, optimum = summary["final"][f"eval/{split}/auc"], summary["optimum"][split]["auc"]
        assert optimum - 0.01 < auc < optimum, (split, auc, optimum)
        assert auc > without[split]["auc"] + 0.2, "the list columns carry most of the signal and are learnt"
