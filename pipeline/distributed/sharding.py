"""Sharding the model: table precision, the plan (pipeline.distributed.planner), DistributedModelParallel and
the fused optimizers: the one place the model is placed.

Hybrid parallelism as in the DLRM paper: the tables are model-parallel (sharded by TorchRec's planner,
looked up by FBGEMM's fused table-batched kernels, all-to-all for the pooled embeddings) and the MLPs
are data-parallel (DDP all-reduce).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from pipeline.config import (
    EmbeddingDtype,
    OptimizerConfig,
    ShardingConfig,
)
from pipeline.distributed import planner
from pipeline.distributed.env import DistEnv
from pipeline.optim.optimizers import dense_optimizer_factory, fused_table_optimizer

logger = logging.getLogger(__name__)


_DATA_TYPES = {
    EmbeddingDtype.fp32: DataType.FP32,
    EmbeddingDtype.fp16: DataType.FP16,
    EmbeddingDtype.bf16: DataType.BF16,
}


def set_embedding_dtype(model: nn.Module, dtype: EmbeddingDtype) -> None:
    """Store every table in ``dtype``: the sharder builds FBGEMM's kernels from each table config's
    ``data_type`` (weights and optimizer state in that precision; pooled outputs stay fp32), and the
    planner sizes the tables by it. Called before planning, while the tables are still on meta."""
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for config in module.embedding_bag_configs():
                config.data_type = _DATA_TYPES[dtype]


def describe_plan(plan: ShardingPlan) -> list[str]:
    """One line per table: sharding type, kernel, ranks."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            lines.append(f"{module_path}.{table}: {ps.sharding_type} / {ps.compute_kernel} on ranks {ps.ranks}")
    return lines


def shard_model(
    model: nn.Module,
    sharding: ShardingConfig,
    optimizer: OptimizerConfig,
    env: DistEnv,
    device: torch.device,
    local_batch_size: int,
    pooling_factors: dict[str, float] | None = None,
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Fuse the table optimizer into backward, plan, wrap in DMP; return the model and its optimizer.
    ``pooling_factors``: feature name -> mean ids per sample (the manifest's), for the planner's costs.

    FBGEMM applies the sparse update inside backward; the dense optimizer must skip those parameters,
    which ``in_backward_optimizer_filter`` does.
    """
    opt_cls, opt_kwargs = fused_table_optimizer(optimizer)
    embedding_params = [p for n, p in model.named_parameters() if "embedding_bags" in n]
    apply_optimizer_in_backward(opt_cls, embedding_params, opt_kwargs)
    set_embedding_dtype(model, sharding.embedding_dtype)
    plan = planner.plan_sharding(
        model, sharding, env, device, local_batch_size, optimizer.embedding.value, pooling_factors
    )
    if sharding.print_plan and env.is_rank_zero:
        logger.info("sharding plan (%d ranks):\n  %s", env.world_size, "\n  ".join(describe_plan(plan)))
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), dense_optimizer_factory(optimizer)
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


@torch.no_grad()
def reset_tables(model: DistributedModelParallel) -> None:
    """Re-initialise every sharded embedding table as at the start and clear the fused optimizer's state for
    them (e.g. RowWiseAdagrad's accumulated squared gradients); the dense part is untouched.

    Each sharded collection re-draws its tables with their ``init_fn`` (data-parallel tables are
    broadcast from rank 0, so replicas stay equal); caching kernels drop their cached rows, whose
    content would be stale.
    """
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            module.reset_parameters()
        emb = getattr(module, "emb_module", None)
        if emb is not None and hasattr(emb, "reset_cache_states"):
            emb.reset_cache_states()
    for entry in model.fused_optimizer.state_dict()["state"].values():
        for value in entry.values():
            shards = value.local_shards() if hasattr(value, "local_shards") else [value]
            for shard in shards:
                getattr(shard, "tensor", shard).zero_()
