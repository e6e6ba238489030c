"""End-to-end training through the real entry point on 1 and 2 gloo ranks (tiny preset)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from pipeline.metrics.keys import splits_in
from tests.conftest import run_training

pytestmark = pytest.mark.distributed

_EVAL_LINE = re.compile(r"eval (val|test) step \d+: .*")


def _eval_lines(log_text: str) -> list[str]:
    return [m.group(0) for m in _EVAL_LINE.finditer(log_text)]


def test_two_ranks_loss_falls_and_ranks_agree(tmp_path, tiny_data_overrides) -> None:
    run = run_training(
        tmp_path / "run2",
        [*tiny_data_overrides, "trainer.num_epochs=2", "logger.log_every_steps=10", "trainer.eval_every_steps=25"],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-4000:]
    train = run.events("train")
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.02, [e["train/loss"] for e in train]
    # Throughput windows exclude the evaluations inside them (eval at step 25 falls mid-window) and
    # add up to the run's training time.
    steps = [e["step"] for e in train]
    window_seconds = sum(
        (s - p) * 256 / e["train/samples_per_s"] for p, s, e in zip([0, *steps], steps, train, strict=False)
    )
    assert window_seconds == pytest.approx(run.summary["train_seconds"], rel=0.01)
    # Both ranks computed the same exact metrics over all ranks' predictions.
    rank0, rank1 = (_eval_lines((run.run_dir / f"rank{r}.log").read_text()) for r in (0, 1))
    assert rank0 and rank0 == rank1
    summary = run.summary
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert 0 < summary["bookkeeping_fraction"] < 0.5, "the loop's own per-step code is timed, and is not training"
    assert summary["final"]["eval/val/num_samples"] == 4000, "every val row scored exactly once"
    assert summary["final"]["eval/val/auc"] > 0.65
    assert summary["optimum"]["val"]["auc"] > summary["final"]["eval/val/auc"]
    # One run folder for the job: config, per-rank logs, metrics, summary, a single .hydra.
    names = {p.name for p in run.run_dir.iterdir()}
    assert {"config.yaml", "rank0.log", "rank1.log", "metrics.jsonl", "summary.json", ".hydra"} <= names
    assert {s for e in run.events("eval") for s in splits_in(e)} == {"val", "test"}
    assert "beside the data's optimum" in run.output


def test_one_rank_same_data_per_step_as_two(tmp_path, tiny_data_overrides) -> None:
    common = [
        *tiny_data_overrides,
        "trainer.max_steps=20",
        "logger.log_every_steps=1",
        "trainer.eval_every_steps=0",
        "sharding=table_wise",
    ]
    one = run_training(tmp_path / "one", common, nproc=1)
    assert one.returncode == 0, one.output[-4000:]
    assert one.summary["world_size"] == 1
    assert len(one.events("train")) == 20
    # The global batch is fixed: 20 steps of 256 samples whatever the world size.
    assert one.events("train")[-1]["samples"] == 20 * 256


def test_bad_override_fails_at_start_naming_the_key(tmp_path, tiny_data_overrides) -> None:
    run = run_training(tmp_path / "bad", [*tiny_data_overrides, "model.embeding_dim=4"], nproc=1, timeout=120)
    assert run.returncode != 0
    assert "model.embeding_dim" in run.output


def test_batch_not_divisible_fails_naming_the_fix(tmp_path, tiny_data_overrides) -> None:
    run = run_training(tmp_path / "odd", [*tiny_data_overrides, "data.global_batch_size=255"], nproc=2, timeout=120)
    assert run.returncode != 0
    assert "data.global_batch_size=255 must be divisible by world_size=2" in run.output


def test_trains_on_one_real_format_file_with_a_random_split(tmp_path) -> None:
    """data=tsv on one raw file in the Criteo layout (missing values, negatives, upper- and lower-case hex,
    a malformed line and an unterminated last line), split at random, bad rows skipped and counted."""
    from pipeline.config import SyntheticConfig
    from pipeline.data.generators import synthetic

    synthetic.generate(
        SyntheticConfig(num_train_rows=6000, num_val_rows=10, num_test_rows=10, max_cardinality=300, seed=11),
        tmp_path / "gen",
    )
    lines = (tmp_path / "gen" / "train.tsv").read_text().splitlines()
    lines[10] = lines[10].upper()  # hex digits in upper case are the same hashes
    lines.insert(500, "1\t2\t3")  # a malformed row
    sample = tmp_path / "sample.tsv"
    sample.write_text("\n".join(lines))  # no final newline
    processed = tmp_path / "processed"
    run = run_training(
        tmp_path / "run",
        [
            "model=tiny",
            "data=tsv",
            f"data.raw_files=[{sample}]",
            f"data.processed_dir={processed}",
            "data.bad_rows=skip",
            "data.global_batch_size=256",
            "data.eval_global_batch_size=512",
            "trainer.max_steps=15",
        ],
        nproc=1,
    )
    assert run.returncode == 0, run.output[-4000:]
    manifest = json.loads((processed / "manifest.json").read_text())
    assert manifest["bad_rows"]["by_kind"]["wrong_field_count"] == 1 and manifest["bad_rows"]["total"] == 1
    rows = {s: v["num_rows"] for s, v in manifest["splits"].items()}
    assert sum(rows.values()) == 6000 and min(rows.values()) > 200
    assert run.summary["final"]["eval/test/num_samples"] == rows["test"]


def test_early_stop_on_target_auc_and_on_patience(tmp_path, tiny_data_overrides) -> None:
    common = [
        *tiny_data_overrides,
        "trainer.max_steps=200",
        "trainer.eval_every_steps=10",
        "trainer.eval_max_batches=2",
        "checkpoint.save_at_end=false",
    ]
    target = run_training(tmp_path / "target", [*common, "trainer.early_stop_auc=0.6"])
    assert target.returncode == 0, target.output[-3000:]
    s = target.summary
    assert s["steps"] < 200 and s["steps"] % 10 == 0 and "reached trainer.early_stop_auc=0.6" in s["stopped_early"]
    evals = [e for e in target.events("eval") if e["partial"]]
    assert evals[-1]["eval/val/auc"] >= 0.6 and all(e["eval/val/auc"] < 0.6 for e in evals[:-1])
    assert s["final"]["eval/val/num_samples"] == 4000, "the final evaluation still covers the whole split"

    patience = run_training(
        tmp_path / "patience", [*common, "trainer.early_stop_patience=2", "trainer.early_stop_min_delta=1.0"]
    )  # no gain can count
    assert patience.returncode == 0, patience.output[-3000:]
    assert patience.summary["steps"] == 30, "first eval sets the best, the next two bring no gain"
    assert "trainer.early_stop_patience=2" in patience.summary["stopped_early"]


def test_settings_left_null_are_chosen_from_the_rows_logged_and_recorded(tmp_path, tiny_data_overrides) -> None:
    """20,000 training rows, batch and epochs unset: batch 64 (the smallest), the tables' Adagrad rate scaled
    with it, 4 epochs; each choice in the log, config.yaml and summary.json."""
    run = run_training(
        tmp_path / "run",
        [
            *tiny_data_overrides,
            "data.global_batch_size=null",
            "trainer.num_epochs=null",
            "trainer.max_steps=20",
            "checkpoint.save_at_end=false",
        ],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-3000:]
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert (cfg["data"]["global_batch_size"], cfg["trainer"]["num_epochs"]) == (64, 4)
    assert cfg["optimizer"]["embedding_lr"] == 0.05  # 0.1 x sqrt(64 / 256)
    chosen = run.summary["chosen_from_data"]
    assert [c.split(":")[0] for c in chosen] == [
        "data.global_batch_size=64",
        "optimizer.embedding_lr=0.05",
        "trainer.num_epochs=4",
    ]
    assert all(f"chosen from the data: {c}" in run.output for c in chosen)
    assert run.summary["global_batch_size"] == 64 and run.summary["steps"] == 20
