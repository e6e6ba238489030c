"""The memory guard: the planner plans for the memory each rank really has and refuses, before anything is
allocated, tables that do not fit, naming the sizes and the fix."""

from __future__ import annotations

import pytest
import torch
from torchrec import optim as trec_optim
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from pipeline.distributed import planner
from pipeline.distributed.planner import GIB, Memory, PlanDoesNotFit, PlanRequest

HOST = Memory(None, 24 * GIB, "host memory available here / 1 rank(s)")


def _tables(rows: int, num: int = 26) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=128, num_embeddings=rows, feature_names=[f"cat_{i}"])
            for i in range(num)
        ],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    return ebc


def test_host_memory_is_read_from_this_machine() -> None:
    available = planner.host_memory_available()
    assert 64 * 1024**2 < available < 64 * 1024**4
    one, two = planner.detect_memory(torch.device("cpu"), 1), planner.detect_memory(torch.device("cpu"), 2)
    assert one.hbm is None and abs(two.ddr * 2 - one.ddr) <= 2 * 1024**3 and "available here" in one.source


def test_tables_that_do_not_fit_are_refused_with_sizes_and_the_cap_that_fits() -> None:
    """26 tables of 10M rows (hash mode's old fixed cap) need about 125 GiB with their optimizer state."""
    req = PlanRequest(1, 1, "cpu", HOST, 2048, 0.15)
    with pytest.raises(PlanDoesNotFit) as e:
        planner.plan(_tables(10_000_000), req, None, collective=False)
    msg = str(e.value)
    assert "the tables need 124.9 GiB with row_wise_adagrad state" in msg
    assert "usable on 1 rank x (24 GiB host memory), 15% reserved (memory per rank: host memory available" in msg
    assert "t_cat_0: 10,000,000 rows x 128 fp32 = 4.8 GiB" in msg
    cap = int(msg.split("data.max_ids_per_feature=")[1].split(",")[0].split()[0])
    assert 1_000_000 < cap < 2_000_000 and "sharding.embedding_dtype=fp16" in msg
    plan, _ = planner.plan(_tables(cap), req, None, collective=False)  # the suggested cap fits
    assert len(plan.plan[""]) == 26


def test_the_same_tables_fit_where_the_memory_is() -> None:
    big = PlanRequest(2, 8, "cpu", Memory(None, 64 * GIB, "given"), 2048, 0.15)
    plan, _ = planner.plan(_tables(10_000_000), big, None, collective=False)
    assert len(plan.plan[""]) == 26
