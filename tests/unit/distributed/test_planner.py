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


# -- pooling factors: multi-hot tables look up several ids per sample -------------------------------------------
def _four_tables() -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_f{i}", embedding_dim=64, num_embeddings=100_000, feature_names=[f"f{i}"])
            for i in range(4)
        ],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    return ebc


def test_constraints_carry_each_tables_pooling_factor() -> None:
    from pipeline.config import ShardingConfig

    tables = ["t_f0", "t_f1", "t_f2"]
    any_kernel = ShardingConfig(compute_kernels=[])
    out = planner.constraints_from_config(any_kernel, tables, "cpu", {"t_f0": 50.0, "t_f1": 1.0})
    assert out["t_f0"].pooling_factors == [50.0] and out["t_f1"].pooling_factors == [1.0]
    assert out["t_f0"].compute_kernels is None and out["t_f0"].sharding_types is None
    assert "t_f2" not in out  # no factor and no constraint: the planner's default (one id per sample)
    fused = planner.constraints_from_config(ShardingConfig(), tables, "cpu", {"t_f0": 7.5})
    assert fused["t_f0"].pooling_factors == [7.5] and fused["t_f0"].compute_kernels == ["fused"]
    assert fused["t_f2"].pooling_factors == [1.0]
    # The trainer gives them per feature (the manifest's order); the tables are found by their feature.
    assert planner.table_pooling_factors(_four_tables(), {"f0": 50.0, "f3": 2.0, "other": 9.0}) == {
        "t_f0": 50.0,
        "t_f3": 2.0,
    }


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_a_table_with_50_ids_per_sample_costs_more_and_gets_a_rank_to_itself(device_type: str) -> None:
    """Four equal tables on two ranks: two per rank, until one of them looks up 50 ids per sample."""
    from pipeline.config import ShardingConfig

    def per_rank(factors: dict[str, float] | None) -> tuple[list[float], list[list[str]]]:
        memory = Memory(8 * GIB if device_type == "cuda" else None, 8 * GIB, "given")
        req = PlanRequest(2, 2, device_type, memory, 512, 0.15)
        sharding = ShardingConfig(sharding_types=["table_wise"])
        constraints = planner.constraints_from_config(sharding, [f"t_f{i}" for i in range(4)], device_type, factors)
        _, best = planner.plan(_four_tables(), req, constraints, collective=False)
        cost, tables = [0.0, 0.0], [[], []]
        for option in best._best_plan:
            for shard in option.shards:
                cost[shard.rank] += shard.perf.total
                tables[shard.rank].append(option.name)
        return cost, [sorted(t) for t in tables]

    one_hot_cost, one_hot_tables = per_rank(None)
    assert one_hot_cost[0] == pytest.approx(one_hot_cost[1]) and sorted(map(len, one_hot_tables)) == [2, 2]
    assert per_rank({f"t_f{i}": 1.0 for i in range(4)})[0] == pytest.approx(one_hot_cost)  # 1.0 = the default
    cost, tables = per_rank({"t_f0": 50.0})
    heavy = next(r for r in (0, 1) if "t_f0" in tables[r])
    assert tables[heavy] == ["t_f0"] and sorted(tables[1 - heavy]) == ["t_f1", "t_f2", "t_f3"]
    assert cost[heavy] > 5 * max(one_hot_cost) and cost[heavy] > cost[1 - heavy]


def test_plan_sharding_passes_the_manifests_factors_to_the_planner(monkeypatch) -> None:
    from pipeline.config import ShardingConfig
    from pipeline.distributed.env import DistEnv

    seen = {}

    def spy(model, req, constraints, kernels=None, collective=True):
        seen.update(constraints or {})
        return real(model, req, constraints, kernels, collective)

    real = planner.plan
    monkeypatch.setattr(planner, "plan", spy)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)
    planner.plan_sharding(_four_tables(), ShardingConfig(), env, torch.device("cpu"), 512, pooling_factors={"f2": 12.5})
    assert seen["t_f2"].pooling_factors == [12.5] and seen["t_f0"].pooling_factors == [1.0]
