"""Training with ``checkpoint.dir`` and ``data.processed_dir`` in an S3 store (moto's server): a 2-rank job that saves,
prunes to the last K, is SIGKILLed and resumes bit for bit; a 1-rank job resharding its checkpoint; export from the
store into the store and predict from there; processed data uploaded once and read through a local copy; and a save
that the store fails: a one-line error, the previous checkpoint still latest and resumable. No credential reaches
the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import kill_job, losses, run_training, start_training, wait_for_step
from tests.storage.conftest import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.distributed

STEPS = 30


def _overrides(data: list[str], *extra: str) -> list[str]:
    return [
        *data,
        f"trainer.max_steps={STEPS}",
        "logger.log_every_steps=1",
        "trainer.eval_every_steps=0",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=2",
        "sharding=table_wise",
        "logger.backends=[jsonl]",
        "logger.report=false",
        *extra,
    ]


def _option(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}="))


def _no_secrets(run_dir: Path) -> None:
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".log", ".md"):
            text = path.read_text(errors="replace")
            assert SECRET_KEY not in text and ACCESS_KEY not in text, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data_overrides) -> Path:
    """An uninterrupted 2-rank run with local checkpoints."""
    run = run_training(
        tmp_path_factory.mktemp("ref") / "ref",
        [*_overrides(tiny_data_overrides), "trainer.save_predictions=true"],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-3000:]
    return run.run_dir


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, s3, tiny_data_overrides) -> tuple[Path, str, str]:
    """A 2-rank run checkpointing into the store, SIGKILLed after step 23 and resumed by the same command; returns
    its run folder, its checkpoint URL and the latest checkpoint's name when it was killed."""
    root = s3.bucket() + "/runs/killed/checkpoints"
    run_dir = tmp_path_factory.mktemp("s3") / "killed"
    overrides = _overrides(tiny_data_overrides, f"checkpoint.dir={root}")
    proc = start_training(run_dir, overrides, nproc=2)
    wait_for_step(run_dir, 23, proc)
    kill_job(proc, run_dir, 2)
    killed_at = s3.fs().cat_file(f"{root}/latest").decode().strip()
    again = run_training(run_dir, overrides, nproc=2)
    assert again.returncode == 0, again.output[-3000:]
    assert f"resumed from {root}/{killed_at}" in again.output
    return run_dir, root, killed_at


def test_a_sigkilled_run_resumes_from_the_store_bit_for_bit(resumed, reference) -> None:
    run_dir, _, killed_at = resumed
    assert killed_at in {"step_00000010", "step_00000020"}
    assert losses(run_dir) == losses(reference), "every step's loss equals the uninterrupted local run's"
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((reference / "summary.json").read_text())["final"]
    _no_secrets(run_dir)


def test_the_store_keeps_the_last_k_checkpoints_and_latest(s3, resumed) -> None:
    _, root, _ = resumed
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in s3.fs().ls(root, refresh=True))
    assert names == ["best", "latest", "step_00000020", "step_00000030"]
    assert s3.fs().cat_file(f"{root}/latest").decode().strip() == "step_00000030"
    step = sorted(p.rsplit("/", 1)[-1] for p in s3.fs().ls(f"{root}/step_00000030", refresh=True))
    assert step == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rng_rank0.pt", "rng_rank1.pt"]


def test_a_checkpoint_in_the_store_reshards_from_two_ranks_to_one(
    tmp_path, resumed, reference, tiny_data_overrides, faults
) -> None:
    """...read while the store fails a fifth of the requests (the retries get through)."""
    _, root, _ = resumed
    faults.set(0.2, status=503)
    other = run_training(
        tmp_path / "one",
        [
            *tiny_data_overrides,
            f"trainer.max_steps={STEPS}",
            "trainer.save_predictions=true",
            "trainer.eval_every_steps=0",
            "checkpoint.save_at_end=false",
            "sharding=column_wise",
            f"trainer.resume={root}",
            "logger.backends=[jsonl]",
            "logger.report=false",
        ],
        nproc=1,
    )
    assert other.returncode == 0, other.output[-3000:]
    assert faults.failed > 0
    assert f"resumed from {root}/step_00000030 (saved by 2 rank(s)) at step {STEPS}" in other.output
    a, b = np.load(reference / "predictions_val.npy"), np.load(other.run_dir / "predictions_val.npy")
    assert a.shape == b.shape == (4000,)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_export_from_the_store_into_the_store_and_predict_from_there(
    tmp_path, s3, resumed, reference, tiny_data_overrides
) -> None:
    from tests.distributed.test_export import _cli

    _, root, _ = resumed
    out = s3.bucket() + "/exports/tiny"
    exp = _cli("pipeline.serving.export", root, "--checkpoint", "latest", "--out", out)
    assert exp.returncode == 0, exp.stderr[-3000:]
    spec = json.loads(s3.fs().cat_file(f"{out}/export.json"))
    assert spec["source"]["checkpoint"] == f"{root}/step_00000030" and spec["source"]["saved_by_world_size"] == 2
    raw = Path(_option(tiny_data_overrides, "data.raw_dir"))
    pred = _cli("pipeline.serving.predict", "--model", out, "--input", raw / "val.tsv", "--out", tmp_path / "val.tsv")
    assert pred.returncode == 0, pred.stderr[-3000:]
    got = np.loadtxt(tmp_path / "val.tsv", dtype=np.float32)
    np.testing.assert_allclose(got, np.load(reference / "predictions_val.npy"), rtol=1e-5, atol=1e-7)
    assert SECRET_KEY not in exp.stderr + pred.stderr + json.dumps(spec)


def test_processed_data_in_the_store_is_uploaded_once_and_trained_on_through_a_local_copy(
    tmp_path, s3, reference, tiny_data_overrides
) -> None:
    """Rank 0 preprocesses into its cache and uploads (manifest last); a run on another 'machine' (an empty cache)
    copies the data down, checked by sha256, and trains exactly as on the local data."""
    url = s3.bucket() + "/processed/tiny"
    data = [o for o in tiny_data_overrides if not o.startswith("data.processed_dir=")]
    data.append(f"data.processed_dir={url}")
    first = run_training(
        tmp_path / "first",
        [*_overrides(data, f"data.cache_dir={tmp_path}/cache1"), "trainer.max_steps=2", "checkpoint.save_at_end=false"],
        nproc=1,
    )
    assert first.returncode == 0, first.output[-3000:]
    assert "uploaded the processed data" in first.output
    stored = s3.fs().find(url)
    assert f"{url.removeprefix('s3://')}/manifest.json" in stored and len(stored) > 5
    second = run_training(tmp_path / "second", _overrides(data, f"data.cache_dir={tmp_path}/cache2"), nproc=2)
    assert second.returncode == 0, second.output[-3000:]
    assert f"using the preprocessed data in {url}" in second.output and "uploaded" not in second.output
    manifest = json.loads((tmp_path / "cache2" / "manifest.json").read_text())
    assert manifest == json.loads(s3.fs().cat_file(f"{url}/manifest.json"))
    assert losses(second.run_dir) == losses(reference), "the same rows and ids as the local data"


def test_a_save_the_store_fails_stops_in_one_line_and_the_previous_checkpoint_resumes(
    tmp_path, s3, faults, tiny_data_overrides
) -> None:
    """Every request for step 20's objects fails (after the retries): both ranks stop with the checkpoint error naming
    the URL; latest still names step 10, and a run resumes from it."""
    root = s3.bucket() + "/runs/failing/checkpoints"
    faults.set(1.0, status=500, match="step_00000020")
    run = run_training(tmp_path / "failing", _overrides(tiny_data_overrides, f"checkpoint.dir={root}"), nproc=2)
    assert run.returncode != 0, run.output[-3000:]  # torchrun reports 1; the ranks exit 3
    line = next(ln for ln in run.output.splitlines() if "checkpoint save failed" in ln)
    assert f"to write {root}/step_00000020 (" in line or f"to clear {root}/step_00000020 (" in line, line
    assert "latest still names the previous checkpoint (step_00000010)" in line
    assert "Traceback" not in (run.run_dir / "rank0.log").read_text() + (run.run_dir / "rank1.log").read_text()
    faults.set(0.0)
    assert s3.fs().cat_file(f"{root}/latest").decode().strip() == "step_00000010"
    again = run_training(tmp_path / "failing", _overrides(tiny_data_overrides, f"checkpoint.dir={root}"), nproc=2)
    assert again.returncode == 0, again.output[-3000:]
    assert f"resumed from {root}/step_00000010" in again.output
    _no_secrets(run.run_dir)
