"""The CUDA path's options, checked on CPU: table precision, UVM caching kernels and their cache, and
the errors a CPU run gets for what only CUDA has."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import DataType

from pipeline.config import ConfigError, EmbeddingDtype, ModelConfig, ShardingConfig, TrainConfig, validate
from pipeline.distributed.planner import constraints_from_config
from pipeline.distributed.sharding import set_embedding_dtype
from pipeline.model.dlrm import build_model


def _cfg(**sharding) -> TrainConfig:
    cfg = TrainConfig()
    for k, v in sharding.items():
        setattr(cfg.sharding, k, v)
    cfg.data.raw_dir = cfg.data.processed_dir = "unused"
    return cfg


@pytest.mark.parametrize(
    ("sharding", "match"),
    [
        ({"compute_kernels": ["fused_uvm_caching"]}, r"sharding.compute_kernels=\['fused_uvm_caching'\].*need CUDA"),
        ({"table_compute_kernels": {"t_cat_0": ["fused_uvm"]}}, r"sharding.table_compute_kernels.t_cat_0.*need CUDA"),
        ({"embedding_dtype": EmbeddingDtype.bf16}, r"sharding.embedding_dtype=bf16: FBGEMM's CPU embedding kernel"),
    ],
)
def test_cuda_only_options_fail_on_cpu_naming_the_key(sharding, match) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(**sharding), world_size=1, device_type="cpu")
    validate(_cfg(**sharding), world_size=8, device_type="cuda")  # the same config is fine on GPUs


def test_cache_load_factor_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"sharding.cache_load_factor=1.5 must be in \(0, 1\]"):
        validate(_cfg(cache_load_factor=1.5), world_size=8, device_type="cuda")


def test_uvm_caching_constraints_carry_the_cache_load_factor() -> None:
    cfg = ShardingConfig(
        compute_kernels=["fused", "fused_uvm_caching"],
        cache_load_factor=0.05,
        table_compute_kernels={"t_cat_1": ["fused"]},
    )
    out = constraints_from_config(cfg, ["t_cat_0", "t_cat_1"], device_type="cuda")
    assert out["t_cat_0"].compute_kernels == ["fused", "fused_uvm_caching"]
    assert out["t_cat_0"].cache_params.load_factor == 0.05
    assert out["t_cat_1"].cache_params is None  # an HBM-only table has no cache
    assert "row_wise" in out["t_cat_0"].sharding_types  # CUDA shards row-wise too


@pytest.mark.parametrize(
    ("dtype", "data_type"), [(EmbeddingDtype.fp16, DataType.FP16), (EmbeddingDtype.bf16, DataType.BF16)]
)
def test_embedding_dtype_reaches_every_table_config(dtype, data_type) -> None:
    model = build_model(
        ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1]), [10] * 26
    )
    set_embedding_dtype(model, dtype)
    configs = model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    assert {c.data_type for c in configs} == {data_type}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the MLPs stay fp32
