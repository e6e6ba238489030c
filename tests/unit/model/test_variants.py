"""Model variants from config: DCNv2 cross net, projection interaction, sparse-feature MLPs and
matrix factorisation: shapes, config errors, and a few optimiser steps that lower the loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.modules.mlp import Perceptron
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import SPARSE_FEATURE_NAMES, ConfigError, Interaction, ModelConfig, ModelName, check_model
from pipeline.model.dlrm import FeatureMLPs, build_model

CRITEO = ModelConfig()  # the paper's Criteo configuration: D = 128, 26 tables


def _materialise(model: torch.nn.Module) -> torch.nn.Module:
    """Tables are built on the meta device for DMP; give them CPU storage for a plain forward."""
    ebc = model.model.sparse_arch.embedding_bag_collection
    ebc.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in ebc.parameters():
        torch.nn.init.uniform_(p, -0.1, 0.1)
    ebc._device = torch.device("cpu")  # noqa: SLF001
    return model


def _batch(b: int, keys: list[str], num_dense: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.randint(0, rows, (len(keys) * b,), generator=g),
        lengths=torch.ones(len(keys) * b, dtype=torch.int32),
        stride=b,
    )
    return torch.randn(b, num_dense, generator=g), kjt, torch.randint(0, 2, (b,), generator=g).float()


@pytest.mark.parametrize(
    ("overrides", "top_in"),
    [
        ({"interaction": Interaction.dcn}, 27 * 128),  # the cross net keeps the 27 concatenated vectors
        ({"interaction": Interaction.projection}, 128 + 8 * 8),  # F1 = F2 = 1024 / 128 = 8 projected vectors
        ({"sparse_arch_layer_sizes": [64, 128]}, 479),  # per-table MLPs keep D, so the dot interaction is unchanged
    ],
)
def test_criteo_variant_top_mlp_input_width(overrides, top_in) -> None:
    dlrm = build_model(ModelConfig(**overrides), [100] * 26).model
    assert dlrm.top_in_features == top_in


def test_dcn_is_torchrecs_low_rank_cross_net() -> None:
    dlrm = build_model(
        ModelConfig(interaction=Interaction.dcn, dcn_num_layers=2, dcn_low_rank_dim=16), [100] * 26
    ).model
    crossnet = dlrm.inter_arch.crossnet
    assert type(crossnet).__name__ == "LowRankCrossNet" and crossnet._num_layers == 2
    assert crossnet.V_kernels[0].shape == (16, 27 * 128)  # W = U V of rank 16
    assert crossnet.W_kernels[0].shape == (27 * 128, 16)


def test_feature_mlps_are_one_mlp_per_table() -> None:
    mlps = FeatureMLPs(num_features=3, in_dim=4, layer_sizes=[5, 4])
    x = torch.randn(2, 3, 4)
    out = mlps(x)
    assert out.shape == (2, 3, 4)
    for f in range(3):  # feature f's output depends on feature f's embedding and weights only
        h = torch.relu(x[:, f] @ mlps.weights[0][f] + mlps.biases[0][f])
        torch.testing.assert_close(out[:, f], h @ mlps.weights[1][f] + mlps.biases[1][f])


def test_matrix_factorisation_is_a_dot_product_of_two_tables() -> None:
    keys = ["user_id", "item_id", "genre"]
    cfg = ModelConfig(name=ModelName.mf, embedding_dim=4)
    model = _materialise(build_model(cfg, [10, 20, 5], feature_names=keys, num_dense_features=1))
    mf = model.model
    assert [t.name for t in mf.sparse_arch.embedding_bag_collection.embedding_bag_configs()] == [
        "t_user_id",
        "t_item_id",
    ]
    assert [n for n, _ in mf.named_parameters() if "embedding_bags" not in n] == ["bias"]  # no MLPs
    dense, kjt, _ = _batch(6, keys, 1, rows=5)
    logits = mf(dense, kjt)
    tables = mf.sparse_arch.embedding_bag_collection.embedding_bags
    ids = kjt.to_dict()
    u, v = tables["t_user_id"].weight[ids["user_id"].values()], tables["t_item_id"].weight[ids["item_id"].values()]
    torch.testing.assert_close(logits.squeeze(1), (u * v).sum(1) + mf.bias)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]),
        ModelConfig(
            embedding_dim=8,
            dense_arch_layer_sizes=[16, 8],
            over_arch_layer_sizes=[16, 1],
            interaction=Interaction.dcn,
            dcn_num_layers=2,
            dcn_low_rank_dim=4,
        ),
        ModelConfig(
            embedding_dim=8,
            dense_arch_layer_sizes=[16, 8],
            over_arch_layer_sizes=[16, 1],
            interaction=Interaction.projection,
            projection_branch1_layer_sizes=[16, 32],
            projection_branch2_layer_sizes=[16, 24],
        ),
        ModelConfig(
            embedding_dim=8,
            dense_arch_layer_sizes=[16, 8],
            over_arch_layer_sizes=[16, 1],
            sparse_arch_layer_sizes=[16, 8],
            self_interaction=True,
        ),
        ModelConfig(name=ModelName.mf, embedding_dim=8, user_feature="cat_0", item_feature="cat_1"),
    ],
    ids=["dot", "dcn", "projection", "sparse_mlp", "mf"],
)
def test_each_variant_trains_one_batch_down(cfg) -> None:
    check_model(cfg)
    model = _materialise(build_model(cfg, [50] * 26))
    dense, kjt, labels = _batch(64, SPARSE_FEATURE_NAMES, 13, rows=50)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        loss, (_, logits, _) = _step(model, dense, kjt, labels)
        assert logits.shape == (64,)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _step(model, dense, kjt, labels):
    from torchrec.datasets.utils import Batch

    return model(Batch(dense_features=dense, sparse_features=kjt, labels=labels))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"sparse_arch_layer_sizes": [64, 32]}, "model.sparse_arch_layer_sizes"),
        ({"interaction": Interaction.dcn, "self_interaction": True}, "model.self_interaction"),
        (
            {"interaction": Interaction.projection, "projection_branch1_layer_sizes": [512, 100]},
            "model.projection_branch1_layer_sizes",
        ),
        ({"interaction": Interaction.dcn, "dcn_low_rank_dim": 0}, "model.dcn_low_rank_dim"),
        ({"name": ModelName.mf, "user_feature": "cat_0", "item_feature": "cat_0"}, "model.user_feature"),
    ],
)
def test_inconsistent_variant_config_names_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_model(ModelConfig(**overrides))


def test_mf_feature_that_the_data_lacks_is_named() -> None:
    with pytest.raises(ValueError, match="model.user_feature='user_id' is not one of the data's sparse features"):
        build_model(ModelConfig(name=ModelName.mf), [100] * 26)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"interaction": Interaction.dcn},
        {"interaction": Interaction.projection, "projection_branch1_layer_sizes": [16, 32]},
        {"sparse_arch_layer_sizes": [16, 8], "self_interaction": True},
    ],
    ids=["dot", "dcn", "projection", "sparse_mlp"],
)
def test_in_place_relu_gives_the_same_logits_and_gradients(overrides) -> None:
    cfg = ModelConfig(
        embedding_dim=8,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        projection_branch2_layer_sizes=[16, 24],
        **overrides,
    )
    in_place = _materialise(build_model(cfg, [50] * 26))
    perceptrons = [m for m in in_place.modules() if isinstance(m, Perceptron)]
    assert perceptrons and all(m._activation_fn is torch.relu_ for m in perceptrons)  # noqa: SLF001
    out_of_place = copy.deepcopy(in_place)
    for m in out_of_place.modules():
        if isinstance(m, Perceptron):
            m._activation_fn = torch.relu  # noqa: SLF001

    dense, kjt, labels = _batch(64, SPARSE_FEATURE_NAMES, 13, rows=50)
    results = []
    for model in (in_place, out_of_place):
        loss, (_, logits, _) = _step(model, dense, kjt, labels)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.equal(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 4
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
