"""One-hot lookups as row gathers from the tables in place (evaluation on one CPU rank): the same logits as
the sharded collection's kernel, bit for bit, and no gather where a bag is not one id."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import ModelConfig, Pooling
from pipeline.model.dlrm import build_model
from pipeline.model.one_hot import RowGather, one_hot_ids, whole_local_tables
from tests.unit.model.test_multihot_pooling import _shard, one_rank_group  # noqa: F401 - a fixture

KEYS = ["a", "b", "c"]
ROWS = [50, 7, 300]
B = 6
SMALL = {"embedding_dim": 8, "dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [16, 1]}


def _one_hot(keys: list[str] = KEYS, seed: int = 0, batch: int = B) -> KeyedJaggedTensor:
    """One id per bag for ``keys`` (each of KEYS, drawn below its table's ROWS)."""
    g = torch.Generator().manual_seed(seed)
    rows = dict(zip(KEYS, ROWS, strict=True))
    values = torch.cat([torch.randint(0, rows[k], (batch,), generator=g) for k in keys])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=values, lengths=torch.ones(len(keys) * batch, dtype=torch.int32)
    )


@pytest.mark.parametrize("pooling", [Pooling.sum, Pooling.mean])
@pytest.mark.parametrize(("sharding_type", "kernel"), [("table_wise", "fused"), ("data_parallel", "dense")])
@pytest.mark.usefixtures("one_rank_group")
def test_gathered_rows_give_the_sharded_models_logits_bit_for_bit(
    sharding_type: str, kernel: str, pooling: Pooling
) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, pooling=pooling)
    dmp = _shard(build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2), sharding_type, kernel)
    net = dmp.module.model
    names = net.sparse_arch.sparse_feature_names
    tables = whole_local_tables(net.sparse_arch.embedding_bag_collection, names)
    assert tables is not None and [t.shape for t in tables] == [(r, 8) for r in ROWS]
    # Views of the weights the kernels train: a training step's update is seen without a copy.
    state = net.sparse_arch.embedding_bag_collection.state_dict()
    for name, table in zip(names, tables, strict=True):
        weight = state[f"embedding_bags.t_{name}.weight"]
        held = weight.local_shards()[0].tensor if hasattr(weight, "local_shards") else weight
        assert table.data_ptr() == held.data_ptr()
    gather = RowGather(tables)
    with torch.no_grad():
        for seed in range(3):  # the buffer is reused between batches
            kjt, dense = _one_hot(seed=seed), torch.randn(B, 2)
            torch.testing.assert_close(
                net.forward_pooled(dense, gather(one_hot_ids(kjt, names))), net(dense, kjt), rtol=0, atol=0
            )


def test_ids_follow_the_models_feature_order_whatever_the_batchs() -> None:
    kjt = _one_hot(keys=["c", "a", "b"])
    ids = one_hot_ids(kjt, KEYS)
    per_key = kjt.to_dict()
    for f, name in enumerate(KEYS):
        assert torch.equal(ids[f], per_key[name].values())


def test_no_ids_where_a_bag_is_not_one_id_or_carries_a_weight() -> None:
    multi = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.arange(3 * B), lengths=torch.tensor([1] * B + [2, 0] + [1] * (B - 2) + [1] * B)
    )
    assert one_hot_ids(multi, KEYS) is None
    weighted = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS,
        values=torch.zeros(3 * B, dtype=torch.long),
        lengths=torch.ones(3 * B, dtype=torch.int32),
        weights=torch.ones(3 * B),
    )
    assert one_hot_ids(weighted, KEYS) is None
    assert one_hot_ids(_one_hot(), ["a", "b", "x"]) is None


def test_a_batch_larger_than_the_buffer_gets_a_new_one() -> None:
    tables = [torch.randn(r, 4) for r in ROWS]
    gather = RowGather(tables)
    for batch in (3, 5, 2):
        ids = torch.stack([torch.randint(0, r, (batch,)) for r in ROWS])
        got = gather(ids)
        assert got.shape == (batch, 3, 4)
        for f, t in enumerate(tables):
            assert torch.equal(got[:, f], t[ids[f]])


def test_no_tables_where_one_is_not_held_whole_or_not_float32() -> None:
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2)
    ebc = model.model.sparse_arch.embedding_bag_collection.to_empty(device="cpu")
    assert whole_local_tables(ebc, KEYS) is not None
    assert whole_local_tables(ebc, [*KEYS, "d"]) is None
    ebc.embedding_bags["t_b"].half()
    assert whole_local_tables(ebc, KEYS) is None


def _spied_gathered(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Small slices (4 rows), and a count of the calls of the slice-wise gather."""
    import pipeline.model.dlrm as dlrm_module

    calls: list[int] = []
    inner = dlrm_module.pairwise_dot_gathered

    def spy(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(dlrm_module, "GATHER_CHUNK_ROWS", 4)
    monkeypatch.setattr(dlrm_module, "pairwise_dot_gathered", spy)
    return calls


@pytest.mark.parametrize("self_interaction", [False, True])
def test_rows_gathered_slice_by_slice_into_the_interaction_give_the_same_logits(
    monkeypatch: pytest.MonkeyPatch, self_interaction: bool
) -> None:
    calls = _spied_gathered(monkeypatch)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, self_interaction=self_interaction), ROWS, KEYS, num_dense_features=2)
    net = model.model
    net.sparse_arch.embedding_bag_collection.to_empty(device="cpu")
    for bag in net.sparse_arch.embedding_bag_collection.embedding_bags.values():
        torch.nn.init.normal_(bag.weight)
    net.eval()
    gather = RowGather(whole_local_tables(net.sparse_arch.embedding_bag_collection, KEYS))
    with torch.no_grad():
        for batch in (11, 4, 1):  # two full slices and a part, one slice, one row
            ids = one_hot_ids(_one_hot(batch=batch), KEYS)
            dense = torch.randn(batch, 2)
            torch.testing.assert_close(
                net.forward_gathered(dense, ids, gather), net.forward_pooled(dense, gather(ids)), rtol=0, atol=0
            )
    assert len(calls) == 3
    # With gradients on, or under bf16 autocast, the rows are gathered first and forward_pooled runs.
    ids, dense = one_hot_ids(_one_hot(batch=7), KEYS), torch.randn(7, 2)
    torch.testing.assert_close(net.forward_gathered(dense, ids, gather), net.forward_pooled(dense, gather(ids)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = net.forward_gathered(dense, ids, gather)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, net.forward_pooled(dense, gather(ids)), rtol=0, atol=0)
    assert len(calls) == 3


def test_rows_gathered_into_given_slots() -> None:
    tables = [torch.randn(r, 4) for r in ROWS]
    ids = torch.stack([torch.randint(0, r, (5,)) for r in ROWS])
    stacked = torch.zeros(5, 6, 4)
    RowGather(tables).into(ids, stacked[:, 2:5])
    for f, t in enumerate(tables):
        assert torch.equal(stacked[:, 2 + f], t[ids[f]])
    assert not stacked[:, :2].any() and not stacked[:, 5:].any()
    with pytest.raises(ValueError, match="for 3 tables"):
        RowGather(tables).into(ids[:2], stacked[:, 2:4])
