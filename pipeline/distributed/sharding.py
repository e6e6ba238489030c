"""Process group, sharding plan and DistributedModelParallel: the one place the model is placed.

Hybrid parallelism as in the DLRM paper: the tables are model-parallel (sharded by TorchRec's planner,
looked up by FBGEMM's fused table-batched kernels, all-to-all for the pooled embeddings) and the MLPs
are data-parallel (DDP all-reduce).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from pipeline.config import (
    Backend,
    DenseOptimizer,
    Device,
    EmbeddingDtype,
    EmbeddingOptimizer,
    LauncherConfig,
    OptimizerConfig,
    ShardingConfig,
    TrainerConfig,
)
from pipeline.distributed import planner
from pipeline.distributed.planner import PlanRequest, constraints_from_config, detect_memory  # noqa: F401
from pipeline.runtime import DistEnv

logger = logging.getLogger(__name__)


def select_device(cfg: TrainerConfig, env: DistEnv) -> torch.device:
    """cuda:<local_rank> when CUDA is there (or asked for), else cpu."""
    if cfg.device == Device.cuda or (cfg.device == Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available here: use trainer.device=auto or cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def select_backend(cfg: LauncherConfig, device: torch.device) -> str:
    if cfg.backend != Backend.auto:
        return cfg.backend.value
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(cfg: LauncherConfig, env: DistEnv, device: torch.device) -> str:
    """Join the job's process group (a group of one without a launcher); return the backend."""
    backend = select_backend(cfg, device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # run without torchrun: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                store=_restart_safe_store(timeout))
    return backend


def _restart_safe_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store for ``init_process_group``: None (torch's own env:// rendezvous) except where that is
    unsafe after a restart.

    torchrun's c10d rendezvous lends the workers its own TCPStore by default
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that store across restarts, so the keys the
    previous attempt's ranks wrote (gloo's and NCCL's addresses) are still there: a restarted rank can
    read its peer's old address and wait on a dead socket until ``launcher.timeout_s``
    (pytorch/pytorch#135712). On one node every worker comes from the same agent and agrees on
    ``TORCHELASTIC_RESTART_COUNT``, so each attempt gets keys of its own. Across nodes the agents'
    counts can differ, so there our launchers (launch.sh, the TorchX component, the sweep launcher)
    set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every attempt a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts == 0:
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        logger.warning("torchrun may restart this %s-node job (--max-restarts %d) but shares its rendezvous store with "
                       "the workers, so restarted ranks can read the previous attempt's addresses and hang "
                       "(pytorch/pytorch#135712): launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch.sh and "
                       "the TorchX component do)", os.environ["GROUP_WORLD_SIZE"], restarts)
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pipeline/attempt_{attempt}", store)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_num_threads(num_threads: int | None, env: DistEnv) -> int:
    """Intra-op threads: the configured number, else this node's cores shared by its ranks.

    torchrun sets OMP_NUM_THREADS=1 for every rank; on a CPU-only node that leaves cores idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = num_threads or max(1, cores // max(1, env.local_world_size))
    torch.set_num_threads(n)
    return n


def _fused_optimizer(cfg: OptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The table optimizer and its FBGEMM arguments.

    TorchRec's optimizer classes accept (and ignore) FBGEMM-only keyword arguments, and the kwargs
    are handed to FBGEMM's fused kernel as they are: Adam's betas must be spelled beta1/beta2.
    """
    lr = cfg.embedding_lr if cfg.embedding_lr is not None else cfg.lr
    if cfg.embedding == EmbeddingOptimizer.sgd:
        return trec_optim.SGD, {"lr": lr}
    if cfg.embedding == EmbeddingOptimizer.adagrad:
        return trec_optim.Adagrad, {"lr": lr, "eps": cfg.eps}
    if cfg.embedding == EmbeddingOptimizer.row_wise_adagrad:
        return trec_optim.RowWiseAdagrad, {"lr": lr, "eps": cfg.eps}
    return trec_optim.Adam, {"lr": lr, "eps": cfg.eps, "beta1": cfg.betas[0], "beta2": cfg.betas[1]}


def _dense_optimizer_factory(cfg: OptimizerConfig):
    if cfg.dense == DenseOptimizer.sgd:
        return lambda params: torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.dense == DenseOptimizer.adagrad:
        return lambda params: torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return lambda params: torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)


def table_names(model: nn.Module) -> list[str]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [t.name for m in model.modules() if isinstance(m, EmbeddingBagCollection) for t in m.embedding_bag_configs()]


_DATA_TYPES = {EmbeddingDtype.fp32: DataType.FP32, EmbeddingDtype.fp16: DataType.FP16, EmbeddingDtype.bf16: DataType.BF16}


def set_embedding_dtype(model: nn.Module, dtype: EmbeddingDtype) -> None:
    """Store every table in ``dtype``: the sharder builds FBGEMM's kernels from each table config's
    ``data_type`` (weights and optimizer state in that precision; pooled outputs stay fp32), and the
    planner sizes the tables by it. Called before planning, while the tables are still on meta."""
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for config in module.embedding_bag_configs():
                config.data_type = _DATA_TYPES[dtype]


def plan_sharding(model: nn.Module, cfg: ShardingConfig, env: DistEnv, device: torch.device,
                  local_batch_size: int, optimizer: str = "row_wise_adagrad") -> ShardingPlan:
    """Run TorchRec's planner for this job with the memory each rank really has (rank 0 plans, every rank
    gets its plan).

    Raises:
        PlanDoesNotFit: the tables do not fit; the message names the sizes and the fix.
    """
    memory = detect_memory(device, env.local_world_size, cfg.hbm_cap_gb)
    req = PlanRequest(env.world_size, env.local_world_size, device.type, memory, local_batch_size,
                      cfg.storage_reservation, optimizer)
    constraints = constraints_from_config(cfg, table_names(model), device.type)
    plan, _ = planner.plan(model, req, constraints, cfg.compute_kernels or None)
    return plan


def describe_plan(plan: ShardingPlan) -> list[str]:
    """One line per table: sharding type, kernel, ranks."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            lines.append(f"{module_path}.{table}: {ps.sharding_type} / {ps.compute_kernel} on ranks {ps.ranks}")
    return lines


def shard_model(model: nn.Module, sharding: ShardingConfig, optimizer: OptimizerConfig, env: DistEnv,
                device: torch.device, local_batch_size: int) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Fuse the table optimizer into backward, plan, wrap in DMP; return the model and its optimizer.

    FBGEMM applies the sparse update inside backward; the dense optimizer must skip those parameters,
    which ``in_backward_optimizer_filter`` does.
    """
    opt_cls, opt_kwargs = _fused_optimizer(optimizer)
    embedding_params = [p for n, p in model.named_parameters() if "embedding_bags" in n]
    apply_optimizer_in_backward(opt_cls, embedding_params, opt_kwargs)
    set_embedding_dtype(model, sharding.embedding_dtype)
    plan = plan_sharding(model, sharding, env, device, local_batch_size, optimizer.embedding.value)
    if sharding.print_plan and env.is_rank_zero:
        logger.info("sharding plan (%d ranks):\n  %s", env.world_size, "\n  ".join(describe_plan(plan)))
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  _dense_optimizer_factory(optimizer))
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
