"""Daily retraining: day 1 starts from day 0's model (trainer.init_from) on a vocabulary grown from day 0's
(data.vocab_from): the old rows arrive exactly, the new rows start as initialised, and the warm start beats a
cold start on day 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import find_checkpoint, load_tensors, read_meta
from tests.conftest import run_training

pytestmark = pytest.mark.distributed

DAY0 = {"num_train_rows": 20_000, "num_val_rows": 4_000, "num_test_rows": 2_000}
DAY1 = {"num_train_rows": 3_000, "num_val_rows": 4_000, "num_test_rows": 2_000}
LOG = {"max_cardinality": 500, "seed": 7, "new_id_share": 0.05}
TABLE = "model.model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"


def _data(root: Path, day: int, processed: str, *extra: str) -> list[str]:
    rows = DAY0 if day == 0 else DAY1
    spec = [f"data.synthetic.{k}={v}" for k, v in {**rows, **LOG, "day": day}.items()]
    return [
        "model=tiny",
        "data=tiny",
        f"data.raw_dir={root}/raw{day}",
        f"data.processed_dir={root}/{processed}",
        *spec,
        *extra,
    ]


COMMON = ["trainer.num_epochs=1", "trainer.eval_every_steps=0", "logger.log_every_steps=10"]


@pytest.fixture(scope="module")
def day0(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("days")
    run = run_training(root / "day0", [*_data(root, 0, "processed0"), *COMMON], nproc=2)
    assert run.returncode == 0, run.output[-3000:]
    return root, run.run_dir


def _tables(checkpoint: Path, names: list[str]) -> dict[str, torch.Tensor]:
    shapes = read_meta(checkpoint)["shapes"]
    target = {TABLE.format(n): torch.empty(shapes[TABLE.format(n)]) for n in names}
    load_tensors(checkpoint, target, no_dist=True)
    return target


def test_day_one_starts_from_day_zero_and_beats_a_cold_start(day0) -> None:
    root, run0 = day0
    grown = _data(root, 1, "grown1", f"data.vocab_from={root}/processed0")
    cold = run_training(root / "cold", [*grown, *COMMON], nproc=2)
    assert cold.returncode == 0, cold.output[-3000:]
    warm = run_training(root / "warm", [*grown, *COMMON, f"trainer.init_from={run0}"], nproc=2)
    assert warm.returncode == 0, warm.output[-3000:]
    [event] = warm.events("init_from")
    assert event["path"] == str(find_checkpoint(run0)) and event["new_table_rows"] > 0
    cold_auc, warm_auc = cold.summary["final"]["eval/val/auc"], warm.summary["final"]["eval/val/auc"]
    assert warm_auc > cold_auc + 0.02, (warm_auc, cold_auc)
    manifest = json.loads((root / "grown1" / "manifest.json").read_text())
    assert manifest["vocab_generations"][0]["vocab_sha256"] == read_meta(find_checkpoint(run0))["data"]["vocab_sha256"]


def test_old_rows_arrive_exactly_and_new_rows_start_as_initialised(day0) -> None:
    """With no learning (lr 1e-30: below float32 resolution) day 1's last checkpoint holds what it loaded, also
    after the second epoch's fresh tables (trainer.reset_tables_each_epoch), which start from it again."""
    root, run0 = day0
    still = [
        "optimizer.lr=1e-30",
        "optimizer.embedding_lr=1e-30",
        "optimizer.warmup_steps=0",
        "trainer.num_epochs=2",
        "trainer.restore_best=false",
    ]
    grown = _data(root, 1, "grown1", f"data.vocab_from={root}/processed0")
    warm = run_training(
        root / "still", [*grown, *still, f"trainer.init_from={run0}", "trainer.eval_every_steps=0"], nproc=1
    )
    assert warm.returncode == 0, warm.output[-3000:]
    before = _tables(find_checkpoint(run0), ["cat_0", "cat_13"])
    after_path = find_checkpoint(warm.run_dir, "latest")
    after = _tables(after_path, ["cat_0", "cat_13"])
    grew = False
    for key, old in before.items():
        new = after[key]
        assert torch.equal(new[: len(old)], old), key
        grew |= len(new) > len(old)
        if len(new) > len(old):  # fresh rows: the table's initial distribution, not zeros or copies
            assert new[len(old) :].abs().sum() > 0
    assert grew, "day 1 brought new values to at least one of the tables looked at"
    assert "epoch 1 starts from the trainer.init_from tables" in (warm.run_dir / "rank0.log").read_text()
    assert read_meta(after_path)["data"]["table_rows"] != read_meta(find_checkpoint(run0))["data"]["table_rows"]


def test_a_checkpoint_whose_rows_do_not_line_up_is_refused_naming_the_fix(day0) -> None:
    root, run0 = day0
    own_vocab = _data(root, 1, "own1")  # day 1 with a vocabulary of its own: ids mean other values
    run = run_training(root / "mismatch", [*own_vocab, *COMMON, f"trainer.init_from={run0}"], nproc=1)
    assert run.returncode != 0
    assert f"grow this data's vocabulary from it with data.vocab_from={root}/processed0" in run.output
    assert "cannot resume" not in run.output and "Traceback" not in (run.run_dir / "rank0.log").read_text()
    missing = run_training(root / "nowhere", [*own_vocab, *COMMON, f"trainer.init_from={root}/none"], nproc=1)
    assert (
        missing.returncode != 0 and "trainer.init_from=" in missing.output and "no checkpoint there" in missing.output
    )


def test_the_optimizer_state_comes_along_when_asked(day0) -> None:
    """trainer.init_optimizer=true: the tables' row-wise Adagrad state of the old rows arrives (after one step it
    has only grown where the step touched a row), the new rows' starts at zero."""
    root, run0 = day0
    grown = _data(root, 1, "grown1", f"data.vocab_from={root}/processed0")
    run = run_training(
        root / "with_optim",
        [*grown, "trainer.max_steps=1", "trainer.restore_best=false", "trainer.eval_every_steps=0"]
        + [f"trainer.init_from={run0}", "trainer.init_optimizer=true"],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-3000:]
    assert run.events("init_from")[0]["optimizer"] is True
    key = "optim." + TABLE.format("cat_0")[len("model.") :] + ".t_cat_0.momentum1"
    before, after = find_checkpoint(run0), find_checkpoint(run.run_dir, "latest")
    old = {key: torch.empty(read_meta(before)["shapes"][key])}
    new = {key: torch.empty(read_meta(after)["shapes"][key])}
    load_tensors(before, old, no_dist=True)
    load_tensors(after, new, no_dist=True)
    o, n = old[key], new[key]
    assert len(n) > len(o) and o.sum() > 0
    assert (n[: len(o)] >= o).all() and (n[: len(o)] == o).float().mean() > 0.5
    assert (n[len(o) :] >= 0).all() and (n[len(o) :] == 0).float().mean() > 0.5
