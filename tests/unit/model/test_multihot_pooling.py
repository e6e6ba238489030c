"""Bags of several ids: the tables' pooled output (sum, mean, weighted; empty bags included) against the
table rows summed by hand, unsharded and through DistributedModelParallel with FBGEMM's fused kernel on a
one-rank gloo group; every model variant on bags; the pooling through the export's config round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import ConfigError, Interaction, ModelConfig, ModelName, Pooling
from pipeline.model.dlrm import WeightedMeanEmbeddingBag, build_model, embedding_bag_collection, table_configs

KEYS = ["user_id", "item_id", "history", "tags"]  # two one-hot features, two multi-hot
ROWS = [7, 11, 13, 5]
# Ids per row (batch of 5) per feature: one-hot features one each, multi-hot ones 0 to 4, empty bags included.
LENGTHS = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [3, 0, 1, 4, 2], [0, 2, 0, 1, 3]]
B = 5
SMALL = {"embedding_dim": 8, "dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [16, 1]}


def _kjt(weighted: bool, seed: int = 0) -> KeyedJaggedTensor:
    """The bags above with random ids; weights (one-hot features 1.0, as the loader writes them) if weighted."""
    g = torch.Generator().manual_seed(seed)
    values, weights = [], []
    for rows, lengths, multi in zip(ROWS, LENGTHS, [False, False, True, True], strict=True):
        n = sum(lengths)
        values.append(torch.randint(0, rows, (n,), generator=g))
        weights.append(torch.rand(n, generator=g) * 2 + 0.1 if multi else torch.ones(n))
    return KeyedJaggedTensor(
        keys=KEYS,
        values=torch.cat(values),
        lengths=torch.tensor(sum(LENGTHS, []), dtype=torch.int32),
        weights=torch.cat(weights) if weighted else None,
        stride=B,
    )


def _direct(kjt: KeyedJaggedTensor, tables: dict[str, torch.Tensor], pooling: dict[str, Pooling]) -> torch.Tensor:
    """[B, F, D] pooled by hand: each bag's rows times their weights, summed; divided by the number of ids
    under mean pooling; zeros for an empty bag."""
    out = []
    per_feature = kjt.to_dict()
    for f in tables:
        jt = per_feature[f]
        weights = jt.weights_or_none()
        rows = []
        for i, (s, e) in enumerate(zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist(), strict=True)):
            bag = tables[f][jt.values()[s:e]]
            if weights is not None:
                bag = bag * weights[s:e].unsqueeze(1)
            v = bag.sum(0) if e > s else torch.zeros(tables[f].shape[1])
            rows.append(v / max(e - s, 1) if pooling[f] == Pooling.mean else v)
            assert i < B
        out.append(torch.stack(rows))
    return torch.stack(out, dim=1)


def _materialise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the meta-device tables CPU storage and random rows for an unsharded forward."""
    ebc = model.model.sparse_arch.embedding_bag_collection
    ebc.to_empty(device="cpu")
    torch.manual_seed(seed)
    for p in ebc.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    ebc._device = torch.device("cpu")  # noqa: SLF001
    return model


def _table_rows(ebc) -> dict[str, torch.Tensor]:
    return {t.feature_names[0]: ebc.embedding_bags[t.name].weight.detach() for t in ebc.embedding_bag_configs()}


POOLINGS = {
    "sum": (Pooling.sum, {}),
    "mean": (Pooling.mean, {}),
    "mixed": (Pooling.sum, {"history": Pooling.mean, "user_id": Pooling.mean}),
}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_pooled_bags_are_the_table_rows_summed_or_averaged(pooling: str, weighted: bool) -> None:
    default, per_table = POOLINGS[pooling]
    cfg = ModelConfig(**SMALL, pooling=default, table_pooling=per_table)
    model = _materialise(build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=weighted))
    ebc = model.model.sparse_arch.embedding_bag_collection
    assert ebc.is_weighted() == weighted
    kjt = _kjt(weighted)
    want = {f: Pooling(per_table.get(f, default)) for f in KEYS}
    pooled = ebc(kjt).values().view(B, len(KEYS), 8)
    torch.testing.assert_close(pooled, _direct(kjt, _table_rows(ebc), want))
    assert not pooled[1, 2].any() and not pooled[0, 3].any()  # empty bags pool to zeros, sum or mean


def test_table_pooling_overrides_the_default_per_feature() -> None:
    cfg = ModelConfig(**SMALL, pooling=Pooling.mean, table_pooling={"tags": Pooling.sum})
    tables = table_configs(cfg, ROWS, KEYS)
    assert [t.pooling for t in tables] == [PoolingType.MEAN] * 3 + [PoolingType.SUM]
    # Matrix factorisation keeps two of the tables, each with its own pooling.
    mf = ModelConfig(name=ModelName.mf, embedding_dim=8, table_pooling={"item_id": Pooling.mean})
    assert [(t.name, t.pooling) for t in table_configs(mf, ROWS, KEYS)] == [
        ("t_user_id", PoolingType.SUM),
        ("t_item_id", PoolingType.MEAN),
    ]


def test_table_pooling_of_a_feature_the_data_lacks_names_the_key_and_the_features() -> None:
    cfg = ModelConfig(**SMALL, table_pooling={"histroy": Pooling.mean})
    with pytest.raises(ConfigError, match=r"model\.table_pooling names \['histroy'\].*'history'"):
        build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2)


def test_only_weighted_mean_tables_get_the_weighted_mean_bag() -> None:
    cfg = ModelConfig(**SMALL, table_pooling={"history": Pooling.mean})
    bags = embedding_bag_collection(table_configs(cfg, ROWS, KEYS), True, torch.device("meta")).embedding_bags
    assert [type(bags[f"t_{f}"]) is WeightedMeanEmbeddingBag for f in KEYS] == [False, False, True, False]
    plain = embedding_bag_collection(table_configs(cfg, ROWS, KEYS), False, torch.device("meta")).embedding_bags
    assert not any(isinstance(b, WeightedMeanEmbeddingBag) for b in plain.values())


VARIANTS = {
    "dot": {},
    "dot_self": {"self_interaction": True},
    "dcn": {"interaction": Interaction.dcn, "dcn_num_layers": 2, "dcn_low_rank_dim": 4},
    "projection": {
        "interaction": Interaction.projection,
        "projection_branch1_layer_sizes": [16, 32],
        "projection_branch2_layer_sizes": [16, 24],
    },
    "sparse_mlp": {"sparse_arch_layer_sizes": [16, 8]},
}


@pytest.mark.parametrize("variant", [*VARIANTS, "mf"])
def test_each_variant_scores_and_learns_from_weighted_mean_bags(variant: str) -> None:
    pooling = {"pooling": Pooling.mean, "table_pooling": {"tags": Pooling.sum}}
    if variant == "mf":
        cfg = ModelConfig(name=ModelName.mf, embedding_dim=8, **pooling)
    else:
        cfg = ModelConfig(**SMALL, **VARIANTS[variant], **pooling)
    model = _materialise(build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=True))
    kjt = _kjt(weighted=True)
    dense, labels = torch.randn(B, 2), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    net = model.model
    ebc = net.sparse_arch.embedding_bag_collection
    names = [t.feature_names[0] for t in ebc.embedding_bag_configs()]
    want = {f: Pooling.sum if f == "tags" else Pooling.mean for f in KEYS}
    pooled = _direct(kjt, {f: _table_rows(ebc)[f] for f in names}, want)
    # The model's logits are its dense part applied to the bags pooled by hand.
    torch.testing.assert_close(net(dense, kjt), net.forward_pooled(dense, pooled))
    loss, _ = model(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
    loss.backward()
    for f in names:
        grad = ebc.embedding_bags[f"t_{f}"].weight.grad
        used = torch.zeros(grad.shape[0], dtype=torch.bool)
        used[kjt[f].values()] = True
        assert grad[used].abs().sum() > 0 and not grad[~used].any(), f  # only the looked-up rows learn


# -- through DistributedModelParallel ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo process group in this process (the in-process store the trainer uses for a world of one)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(module: torch.nn.Module, sharding_type: str, kernel: str):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import ParameterConstraints

    from pipeline.distributed import planner

    tables = [t for m in module.modules() if hasattr(m, "embedding_bag_configs") for t in m.embedding_bag_configs()]
    constraints = {
        t.name: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[kernel]) for t in tables
    }
    req = planner.PlanRequest(1, 1, "cpu", planner.Memory(None, 4 * planner.GIB, "test"), B, 0.15)
    plan, _ = planner.plan(module, req, constraints, collective=False)
    assert {ps.compute_kernel for p in plan.plan.values() for ps in p.values()} == {kernel}
    return DistributedModelParallel(module, device=torch.device("cpu"), plan=plan)


def _full_tables(dmp) -> dict[str, torch.Tensor]:
    """feature -> the whole table, from a one-rank DMP's state dict (sharded or replicated)."""
    out = {}
    for key, v in dmp.state_dict().items():
        if ".embedding_bags.t_" in f".{key}" and key.endswith(".weight"):
            feature = key.split("embedding_bags.t_", 1)[1][: -len(".weight")]
            out[feature] = (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).detach().clone()
    assert sorted(out) == sorted(KEYS)
    return {f: out[f] for f in KEYS}


class _Pooled(torch.nn.Module):
    """The collection's pooled output as [B, F*D] (DMP returns the KeyedTensor of a top-level collection lazily)."""

    def __init__(self, ebc) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(kjt)
        return torch.cat([kt[f] for f in KEYS], dim=1)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("pooling", ["sum", "mean", "mixed"])
@pytest.mark.parametrize(("sharding_type", "kernel"), [("table_wise", "fused"), ("data_parallel", "dense")])
def test_sharded_kernels_pool_bags_as_the_plain_collection(
    one_rank_group, sharding_type: str, kernel: str, pooling: str, weighted: bool
) -> None:
    """FBGEMM's CPU kernels: weighted mean = weighted sum / number of ids, an empty bag = zeros (mean too)."""
    default, per_table = POOLINGS[pooling]
    cfg = ModelConfig(**SMALL, pooling=default, table_pooling=per_table)
    ebc = embedding_bag_collection(table_configs(cfg, ROWS, KEYS), weighted, torch.device("meta"))
    dmp = _shard(_Pooled(ebc), sharding_type, kernel)
    kjt = _kjt(weighted, seed=1)
    pooled = dmp(kjt).view(B, len(KEYS), 8)
    tables = _full_tables(dmp)
    assert tables["history"].abs().sum() > 0
    want = {f: Pooling(per_table.get(f, default)) for f in KEYS}
    torch.testing.assert_close(pooled, _direct(kjt, tables, want))
    assert not pooled[1, 2].any() and not pooled[0, 3].any()
    # The unsharded collection (what export and predict run) with the same rows gives the same numbers.
    plain = _materialise(build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=weighted))
    plain_ebc = plain.model.sparse_arch.embedding_bag_collection
    with torch.no_grad():
        for f in KEYS:
            plain_ebc.embedding_bags[f"t_{f}"].weight.copy_(tables[f])
    torch.testing.assert_close(plain_ebc(kjt).values().view(B, len(KEYS), 8), pooled)


def test_sharded_dlrm_scores_bags_as_the_unsharded_one(one_rank_group) -> None:
    cfg = ModelConfig(**SMALL, pooling=Pooling.mean, table_pooling={"tags": Pooling.sum})
    torch.manual_seed(3)
    sharded = _shard(
        build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=True), "table_wise", "fused"
    )
    torch.manual_seed(3)  # the same MLPs
    plain = _materialise(build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=True))
    tables = _full_tables(sharded)
    with torch.no_grad():
        for f in KEYS:
            plain.model.sparse_arch.embedding_bag_collection.embedding_bags[f"t_{f}"].weight.copy_(tables[f])
    kjt, dense = _kjt(weighted=True, seed=2), torch.randn(B, 2)
    batch = Batch(dense_features=dense, sparse_features=kjt, labels=torch.zeros(B))
    _, (_, sharded_logits, _) = sharded(batch)
    _, (_, plain_logits, _) = plain(batch)
    torch.testing.assert_close(sharded_logits, plain_logits)


# -- export ---------------------------------------------------------------------------------------------------
def test_pooling_survives_the_checkpoint_and_export_json_round_trip() -> None:
    """The checkpoint's meta.json holds the config with enums as strings and export.json copies its model
    section: rebuilt from that JSON, the tables pool as trained and take the ids' weights."""
    from pipeline.serving.export import build_dlrm

    cfg = ModelConfig(**SMALL, pooling=Pooling.mean, table_pooling={"tags": Pooling.sum})
    saved = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)))
    assert saved["pooling"] == "mean" and saved["table_pooling"] == {"tags": "sum"}
    dlrm = build_dlrm(saved, ROWS, KEYS, 2, weighted=True)
    ebc = dlrm.sparse_arch.embedding_bag_collection
    assert ebc.is_weighted()
    assert [t.pooling for t in ebc.embedding_bag_configs()] == [PoolingType.MEAN] * 3 + [PoolingType.SUM]
    kjt = _kjt(weighted=True)
    torch.nn.init.uniform_(ebc.embedding_bags["t_history"].weight, -0.5, 0.5)
    pooled = ebc(kjt).values().view(B, len(KEYS), 8)
    want = {f: Pooling.sum if f == "tags" else Pooling.mean for f in KEYS}
    torch.testing.assert_close(pooled[:, 2], _direct(kjt, _table_rows(ebc), want)[:, 2])


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_int8_tables_pool_as_the_float_tables(weighted: bool) -> None:
    from pipeline.serving.int8 import quantize_tables, use_int8_tables

    cfg = ModelConfig(**SMALL, pooling=Pooling.mean, table_pooling={"tags": Pooling.sum})
    model = _materialise(build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=weighted))
    dlrm = model.model.eval()
    kjt, dense = _kjt(weighted), torch.randn(B, 2)
    with torch.no_grad():
        want_pooled = dlrm.sparse_arch.embedding_bag_collection(kjt).values()
        want_logits = dlrm(dense, kjt)
        state = quantize_tables(dlrm.state_dict())
        use_int8_tables(dlrm)
        dlrm.load_state_dict(state, strict=True)
        pooled = dlrm.sparse_arch.embedding_bag_collection(kjt).values()
        torch.testing.assert_close(pooled, want_pooled, atol=0.02, rtol=0.0)  # 8-bit rows over a range of 1
        torch.testing.assert_close(dlrm(dense, kjt), want_logits, atol=0.02, rtol=0.0)
    assert not pooled.view(B, len(KEYS), 8)[1, 2].any()
