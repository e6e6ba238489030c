"""The store a rank joins its process group with, under torchrun's restarts (pytorch/pytorch#135712)."""

from __future__ import annotations

import datetime
import logging

import pytest
import torch.distributed as dist

from pipeline.distributed.env import _restart_safe_store

TIMEOUT = datetime.timedelta(seconds=10)


@pytest.fixture
def agent_store(monkeypatch):
    """A TCPStore standing in for torchrun's, and the environment torchrun gives a worker that shares it."""
    server = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    for key, value in {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_MAX_RESTARTS": "2",
        "TORCHELASTIC_RESTART_COUNT": "1",
        "GROUP_WORLD_SIZE": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(server.port),
    }.items():
        monkeypatch.setenv(key, value)
    return server


def test_each_restart_on_one_node_writes_keys_of_its_own(agent_store) -> None:
    store = _restart_safe_store(TIMEOUT)
    store.set("rank_0", b"new address")
    assert agent_store.get("pipeline/attempt_1/rank_0") == b"new address"
    # The failed attempt's key, still in the shared store, is not what this attempt reads.
    agent_store.set("pipeline/attempt_0/stale", b"old")
    assert not store.check(["stale"])


@pytest.mark.parametrize("env", [{"TORCHELASTIC_USE_AGENT_STORE": "False"}, {"TORCHELASTIC_MAX_RESTARTS": "0"}])
def test_torchs_own_rendezvous_where_no_stale_key_can_be_read(agent_store, monkeypatch, env) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _restart_safe_store(TIMEOUT) is None


def test_several_nodes_sharing_the_store_are_warned(agent_store, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        assert _restart_safe_store(TIMEOUT) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
