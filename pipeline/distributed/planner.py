"""TorchRec's EmbeddingShardingPlanner, set up one way for the training job and for ``./launch.sh plan``.

The topology carries the memory each rank really has (host memory available on this node shared by
its ranks; the GPU's memory on CUDA) unless given, the constraints come from the sharding config, and a
plan that cannot fit is refused before anything is allocated, with the sizes and the fix, instead of
the planner's raw error or an allocator failure minutes later.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.constants import POOLING_FACTOR
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, PlannerError, TopologyFactory
from torchrec.distributed.planner.types import TrainerConfig as PlannerTrainerConfig
from torchrec.distributed.types import CacheParams, ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipeline.config import ShardingConfig
from pipeline.distributed.env import DistEnv
from pipeline.errors import TrainingError

logger = logging.getLogger(__name__)

GIB = 1024**3
DTYPE_BYTES = {DataType.FP32: 4, DataType.FP16: 2, DataType.BF16: 2}
_DTYPE_NAMES = {DataType.FP32: "fp32", DataType.FP16: "fp16", DataType.BF16: "bf16"}


class PlanDoesNotFit(TrainingError):
    """The tables cannot be placed on the given topology; the message says by how much, which, and the fix."""


@dataclass(frozen=True)
class Memory:
    """Memory one rank may plan for, in bytes, and where the figures came from."""

    hbm: int | None  # None: no GPU
    ddr: int
    source: str


def host_memory_available() -> int:
    """Bytes this node can still allocate: MemAvailable, or less under a cgroup (container) limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                available = min(available, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(0, available)


def detect_memory(device: torch.device, local_world_size: int, hbm_cap_gb: float | None = None) -> Memory:
    """What one rank of this node may plan for: its share of the host memory available now, and on CUDA its
    GPU's memory (or ``hbm_cap_gb``)."""
    ddr = host_memory_available() // max(1, local_world_size)
    if device.type != "cuda":
        return Memory(None, ddr, f"host memory available here / {local_world_size} rank(s)")
    if hbm_cap_gb:
        return Memory(int(hbm_cap_gb * GIB), ddr, "sharding.hbm_cap_gb; host memory available here")
    total = torch.cuda.get_device_properties(device).total_memory
    return Memory(total, ddr, f"{torch.cuda.get_device_name(device)} memory; host memory available here")


def _types_for_kernels(kernels: list[str] | None, device_type: str) -> list[str] | None:
    """Sharding types that can run the allowed kernels (None: any).

    Data-parallel tables only have the dense kernel; left in, the planner warns once per table that
    it found no kernel for them before choosing a sharded type anyway.
    """
    if not kernels or "dense" in kernels:
        return None
    types = ["table_wise", "column_wise", "table_column_wise"]
    if device_type == "cuda":  # TorchRec 1.8 shards row-wise on CUDA only
        types += ["row_wise", "table_row_wise"]
    return types


def constraints_from_config(
    cfg: ShardingConfig,
    tables: list[str],
    device_type: str = "cpu",
    pooling_factors: dict[str, float] | None = None,
) -> dict[str, ParameterConstraints]:
    """Planner constraints: the group-wide allowed types/kernels, then per-table overrides; and each table's
    pooling factor (mean ids per sample, from the data's manifest) where given: the planner's cost
    estimates scale the lookups and the input all-to-all by it (TorchRec assumes one id per sample).

    Raises:
        ValueError: a per-table key names no table of the model.
    """
    for key, per_table in (
        ("table_sharding_types", cfg.table_sharding_types),
        ("table_compute_kernels", cfg.table_compute_kernels),
    ):
        unknown = sorted(set(per_table) - set(tables))
        if unknown:
            raise ValueError(f"sharding.{key} names unknown table(s) {unknown}; the model's tables are {tables}")
    out = {}
    for name in tables:
        kernels = cfg.table_compute_kernels.get(name) or cfg.compute_kernels or None
        sharding_types = (
            cfg.table_sharding_types.get(name) or cfg.sharding_types or _types_for_kernels(kernels, device_type)
        )
        cache = (
            CacheParams(load_factor=cfg.cache_load_factor)
            if cfg.cache_load_factor is not None and (not kernels or "fused_uvm_caching" in kernels)
            else None
        )
        factor = (pooling_factors or {}).get(name)
        if sharding_types or kernels or cache or factor is not None:
            out[name] = ParameterConstraints(
                sharding_types=sharding_types,
                compute_kernels=kernels,
                cache_params=cache,
                pooling_factors=[POOLING_FACTOR if factor is None else float(factor)],  # one feature per table
            )
    return out


def table_pooling_factors(model: nn.Module, per_feature: dict[str, float]) -> dict[str, float]:
    """Table name -> pooling factor of its feature, for the model's tables (``per_feature``: KJT key -> factor)."""
    return {
        t.name: per_feature[t.feature_names[0]]
        for m in model.modules()
        if isinstance(m, EmbeddingBagCollection)
        for t in m.embedding_bag_configs()
        if len(t.feature_names) == 1 and t.feature_names[0] in per_feature
    }


def _tables(model: nn.Module) -> list[tuple[str, int, int, DataType]]:
    """(name, rows, dim, dtype) of every table of the model's collections."""
    return [
        (t.name, t.num_embeddings, t.embedding_dim, t.data_type)
        for m in model.modules()
        if isinstance(m, EmbeddingBagCollection)
        for t in m.embedding_bag_configs()
    ]


def bytes_per_row(dim: int, optimizer: str, dtype: DataType = DataType.FP32) -> int:
    """Weights in the table's precision plus the fused optimizer's state per row (stored in the weights'
    precision, except row-wise Adagrad's one fp32 value per row)."""
    b = DTYPE_BYTES[dtype]
    state = {"sgd": 0, "row_wise_adagrad": 4, "adagrad": b * dim, "adam": 2 * b * dim}[optimizer]
    return b * dim + state


def _cap_that_fits(rows: list[int], row_bytes: list[int], capacity: float) -> int | None:
    """The largest per-table row cap under which the tables fit in ``capacity`` bytes (None: none does)."""

    def need(cap: int) -> int:
        return sum(min(n, cap) * b for n, b in zip(rows, row_bytes, strict=True))

    lo, hi = 0, max(rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= capacity else (lo, mid - 1)
    if lo < 2:
        return None
    digits = 10 ** max(0, len(str(lo)) - 2)
    return lo // digits * digits  # two significant digits, rounded down


@dataclass
class PlanRequest:
    """One planning problem: a topology, its memory, and how the caller spells the fixes."""

    world_size: int
    local_world_size: int
    device_type: str
    memory: Memory
    batch_size: int  # per rank
    reservation: float
    optimizer: str = "row_wise_adagrad"
    cap_fix: str = "data.max_ids_per_feature={cap}"  # how to cap the tables (the plan tool says --cap)
    other_fixes: tuple[str, ...] = (
        "a smaller model.embedding_dim",
        "sharding.embedding_dtype=fp16",
        "more ranks or nodes",
    )
    cache_fix: str = "tables in host memory behind an HBM cache: sharding.compute_kernels=[fused,fused_uvm_caching]"


def make_planner(req: PlanRequest, constraints: dict[str, ParameterConstraints] | None) -> EmbeddingShardingPlanner:
    topology = TopologyFactory.create_topology(
        PlannerTrainerConfig(
            world_size=req.world_size,
            local_world_size=req.local_world_size,
            hbm_cap_bytes=req.memory.hbm,
            ddr_cap_bytes=req.memory.ddr,
        ),
        kernel_config=KernelConfig(compute_device=req.device_type),
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=req.batch_size,
        constraints=constraints or None,
        storage_reservation=FixedPercentageStorageReservation(req.reservation),
    )


def explain_refusal(
    req: PlanRequest, tables: list[tuple[str, int, int, DataType]], kernels: list[str] | None, planner_error: str
) -> str:
    """Why no plan fits: the tables' total against the usable memory, the largest tables, and the fixes."""
    need = [n * bytes_per_row(d, req.optimizer, dt) for _, n, d, dt in tables]
    uvm = req.device_type == "cuda" and (not kernels or bool({"fused_uvm", "fused_uvm_caching"} & set(kernels)))
    m = req.memory
    if req.device_type == "cuda":
        per_rank = (m.hbm + m.ddr) if uvm else m.hbm
        where = f"{m.hbm / GIB:.3g} GiB HBM + {m.ddr / GIB:.3g} GiB host" if uvm else f"{m.hbm / GIB:.3g} GiB HBM"
    else:
        per_rank, where = m.ddr, f"{m.ddr / GIB:.3g} GiB host memory"
    capacity = per_rank * req.world_size * (1 - req.reservation)
    total = sum(need)
    over = total - capacity
    largest = sorted(range(len(tables)), key=lambda i: -need[i])[:5]
    lines = [
        f"  {tables[i][0]}: {tables[i][1]:,} rows x {tables[i][2]} {_DTYPE_NAMES[tables[i][3]]} = "
        f"{need[i] / GIB:.1f} GiB"
        for i in largest
    ]
    ranks = f"{req.world_size} rank{'s' if req.world_size > 1 else ''}"
    why = (
        f"the tables need {total / GIB:.1f} GiB with {req.optimizer} state, {abs(over) / GIB:.1f} GiB "
        f"{'more than' if over > 0 else 'less than'} the {capacity / GIB:.1f} GiB usable on {ranks} x ({where}), "
        f"{req.reservation:.0%} reserved (memory per rank: {m.source})"
    )
    if over <= 0:
        why += "; in total they would fit, but not under these sharding constraints and per-device limits"
    fixes = []
    cap = _cap_that_fits(
        [t[1] for t in tables], [bytes_per_row(d, req.optimizer, dt) for _, _, d, dt in tables], capacity * 0.9
    )
    if cap is not None and cap < max(t[1] for t in tables):
        fixes.append(req.cap_fix.format(cap=cap))
    fixes += [f for f in req.other_fixes if not (f.endswith("fp16") and all(t[3] != DataType.FP32 for t in tables))]
    if req.device_type == "cuda" and not uvm:
        fixes.append(req.cache_fix)
    return (
        f"no sharding plan fits: {why}. Largest tables:\n"
        + "\n".join(lines)
        + "\nFix: "
        + ", or ".join(fixes)
        + f". Planner: {planner_error.splitlines()[0][:300] if planner_error else '-'}"
    )


def plan(
    model: nn.Module,
    req: PlanRequest,
    constraints: dict[str, ParameterConstraints] | None,
    kernels: list[str] | None = None,
    collective: bool = True,
) -> tuple[ShardingPlan, EmbeddingShardingPlanner]:
    """Plan ``model``'s tables (rank 0 plans and every rank gets its plan or its refusal).

    Raises:
        PlanDoesNotFit: on every rank, with :func:`explain_refusal`'s message.
    """
    from torchrec.distributed.model_parallel import get_default_sharders

    planner = make_planner(req, constraints)
    result: ShardingPlan | str
    if not collective or not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = planner.plan(model, get_default_sharders())
        except PlannerError as e:
            result = explain_refusal(req, _tables(model), kernels, str(e))
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        box = [result if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, str):
        raise PlanDoesNotFit(result)
    return result, planner


def plan_sharding(
    model: nn.Module,
    cfg: ShardingConfig,
    env: DistEnv,
    device: torch.device,
    local_batch_size: int,
    optimizer: str = "row_wise_adagrad",
    pooling_factors: dict[str, float] | None = None,
) -> ShardingPlan:
    """Run TorchRec's planner for this job with the memory each rank really has (rank 0 plans, every rank
    gets its plan). ``pooling_factors``: feature name -> mean ids per sample (the manifest's; None: one each).

    Raises:
        PlanDoesNotFit: the tables do not fit; the message names the sizes and the fix.
    """
    memory = detect_memory(device, env.local_world_size, cfg.hbm_cap_gb)
    req = PlanRequest(
        env.world_size, env.local_world_size, device.type, memory, local_batch_size, cfg.storage_reservation, optimizer
    )
    factors = table_pooling_factors(model, pooling_factors) if pooling_factors else None
    constraints = constraints_from_config(cfg, [t[0] for t in _tables(model)], device.type, factors)
    sharding_plan, _ = plan(model, req, constraints, cfg.compute_kernels or None)
    return sharding_plan
