"""Checkpoints in an S3 store, in this process (one rank): the commit through ``meta.json`` and ``latest``, keep-last-K
pruning and the clean-up of what failed saves left, loading back, and a store that fails requests: a share of them
(the retries get through) or all of them (a one-line error naming the URL and the operation; the previous checkpoint
stays latest and loads)."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import Checkpointer, CheckpointError, TrainState, latest_checkpoint, load, read_meta
from pipeline.checkpoint.manager import ModelState
from tests.storage.conftest import ACCESS_KEY, SECRET_KEY

# One process without a process group: DCP says it saves and loads in a single process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(value: float) -> tuple[dict, torch.nn.Linear]:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return {"model": ModelState(model)}, model


def _save(ck: Checkpointer, step: int, best: bool = False):
    state, _ = _state(float(step))
    return ck.save(state, TrainState(step=step), {"note": "test"}, best=best)


def _names(s3, root: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in s3.fs().ls(root, refresh=True))


def _loaded(root: str) -> float:
    state, model = _state(0.0)
    load(latest_checkpoint(root), state, rank=0)
    return float(model.weight[0, 0].detach())


def test_saves_commit_through_latest_and_keep_the_last_k_and_the_best(s3) -> None:
    root = s3.bucket() + "/run/checkpoints"
    ck = Checkpointer(root, rank=0, world_size=1, keep_last=2)
    for step in (10, 20, 30, 40):
        assert _save(ck, step, best=step == 20) == f"{root}/step_{step:08d}"
    assert _names(s3, root) == ["best", "latest", "step_00000020", "step_00000030", "step_00000040"]
    assert s3.fs().cat_file(f"{root}/latest").decode().strip() == "step_00000040"
    assert latest_checkpoint(root) == f"{root}/step_00000040"
    assert read_meta(latest_checkpoint(root))["note"] == "test"
    assert sorted(_names(s3, f"{root}/step_00000040")) == [".metadata", "__0_0.distcp", "meta.json", "rng_rank0.pt"]
    assert _loaded(root) == 40.0


def test_a_step_folder_no_pointer_names_is_ignored_and_cleared_by_the_next_save(s3) -> None:
    """What a killed save leaves (objects without meta.json, latest not moved) is never loaded; the next save clears it,
    and a leftover of the very step being saved does not survive into the new checkpoint."""
    root = s3.bucket() + "/checkpoints"
    ck = Checkpointer(root, rank=0, world_size=1, keep_last=3)
    _save(ck, 10)
    fs = s3.fs()
    fs.pipe_file(f"{root}/step_00000015/__0_0.distcp", b"half written")
    fs.pipe_file(f"{root}/step_00000020/stale.bin", b"from a save that was killed")
    assert latest_checkpoint(root) == f"{root}/step_00000010" and _loaded(root) == 10.0
    _save(ck, 20)
    assert _names(s3, root) == ["latest", "step_00000010", "step_00000020"]
    assert "stale.bin" not in _names(s3, f"{root}/step_00000020")
    assert _loaded(root) == 20.0


def test_a_store_failing_a_share_of_requests_is_retried_through(s3, faults) -> None:
    root = s3.bucket() + "/checkpoints"
    ck = Checkpointer(root, rank=0, world_size=1, keep_last=2)
    faults.set(0.2, status=503)
    for step in (10, 20):
        _save(ck, step)
    faults.set(0.2, status=0)  # dropped connections
    _save(ck, 30)
    assert faults.failed > 0, "the proxy failed some requests"
    faults.set(0.0)
    assert _names(s3, root) == ["latest", "step_00000020", "step_00000030"]
    assert _loaded(root) == 30.0


def test_a_store_failing_every_request_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(
    s3, faults, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the retry budget, as botocore reads it: the test fails sooner
    root = s3.bucket() + "/checkpoints"
    ck = Checkpointer(root, rank=0, world_size=1, keep_last=2)
    _save(ck, 10)
    faults.set(1.0, status=500)
    with pytest.raises(CheckpointError) as failed:
        _save(ck, 20)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint save failed to clear {root}/step_00000020 (") or message.startswith(
        f"checkpoint save failed to write {root}/step_00000020 ("
    ), message
    assert "checkpoint.dir is reachable and writable" in message
    assert SECRET_KEY not in message and ACCESS_KEY not in message
    # A resume asking while the store fails must not take "no latest" for an answer and start over.
    with pytest.raises(CheckpointError, match=rf"^cannot read {root}/latest \("):
        latest_checkpoint(root)
    with pytest.raises(CheckpointError, match=rf"^cannot read checkpoint {root}/step_00000010 \("):
        load(f"{root}/step_00000010", _state(0.0)[0], rank=0)
    faults.set(0.0)
    assert latest_checkpoint(root) == f"{root}/step_00000010"
    assert _loaded(root) == 10.0


def test_async_saves_to_an_object_store_are_refused_by_the_config() -> None:
    from pipeline.config import CheckpointConfig, ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint.async_save=true writes to a local folder only"):
        CheckpointConfig(dir="s3://bucket/checkpoints", async_save=True)
    CheckpointConfig(dir="/tmp/checkpoints", async_save=True)
