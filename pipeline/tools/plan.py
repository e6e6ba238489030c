"""Plan the sharding of a cluster you don't have: TorchRec's planner, offline, on this machine.

    ./launch.sh plan -j 2x8 --device cuda --hbm-gb 80 --data criteo_1tb --cap 40000000
    ./launch.sh plan -j 1x2 --device cpu --data processed:data/synthetic/processed
    ./launch.sh plan experiment=mlperf_dlrmv2 -j 1x8 --device cuda --hbm-gb 80

Config overrides (``experiment=...``, ``data=...``, ``model.embedding_dim=64``, ...) plan the tables of that
training config: its table sizes (``data.num_embeddings_per_feature`` or ``data.max_ids_per_feature``, else
its processed data's manifest), pooling factors (the manifest, else ``data.materialize.sizes``), embedding
dimension and dtype, table optimizer, sharding constraints and per-rank batch (the global batch over the
ranks); a flag given as well wins.

Builds the model on the meta device (no memory), runs ``EmbeddingShardingPlanner.plan`` for a
``Topology`` of ``nodes x devices`` (HBM and host memory per device as given), and prints each table's
sharding and the memory per rank (HBM and host). A plan that cannot fit is refused: the message says
how much memory is missing and which tables are the largest, instead of the planner's raw error.

Multi-hot tables look up several ids per sample: each table's pooling factor (mean ids per sample: a
processed folder's manifest, or ``--pooling-factors``; 1 for one-hot) goes to the planner, which
scales its cost of the lookups and of the ids' all-to-all by it. The table lists it beside the plan
(with the most ids in a row when the manifest has it), and each rank's estimated embedding time per
step (the planner's cost model: forward and backward lookups and communication, in ms).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.schema import CARDINALITIES
from pipeline.distributed.planner import GIB, PlanDoesNotFit


def table_sizes(data: str, cap: int | None) -> list[int]:
    """Rows per table: a known dataset's cardinalities (capped), or ``processed:<dir>`` (its manifest)."""
    if data.startswith("processed:"):
        from pipeline.data.manifest import Manifest

        sizes = Manifest.load(data.split(":", 1)[1]).num_embeddings_per_feature
    elif data in CARDINALITIES:
        sizes = [c + 1 for c in CARDINALITIES[data]]  # + the "missing" row
    else:
        raise SystemExit(f"--data {data}: expected one of {sorted(CARDINALITIES)} or processed:<folder>")
    return [min(s, cap) for s in sizes] if cap else list(sizes)


def table_lengths(data: str) -> tuple[list[float] | None, list[int] | None]:
    """Mean and most ids per sample of each table: ``processed:<dir>``'s manifest (None when the data is
    one-hot or a known dataset, whose features are)."""
    if not data.startswith("processed:"):
        return None, None
    from pipeline.data.manifest import Manifest

    manifest = Manifest.load(data.split(":", 1)[1])
    return manifest.pooling_factors, manifest.max_lengths


def from_config(a: argparse.Namespace, p: argparse.ArgumentParser, world: int):
    """Tables, pooling factors and the unset flags from the training config ``a.overrides`` compose to; returns
    (sizes, pooling factors, max lengths or None, a description of the source).

    Raises:
        ConfigError: the overrides do not compose, or the config leaves the table sizes to data that is not here.
    """
    from pipeline.compose import compose_config
    from pipeline.data.manifest import Manifest
    from pipeline.data.materialize import pooling_factors

    cfg = compose_config(a.overrides)
    d = cfg.data
    manifest = Manifest.read(d.processed_dir)
    if d.num_embeddings_per_feature:
        sizes = list(d.num_embeddings_per_feature)
    elif d.max_ids_per_feature is not None:
        sizes = [d.max_ids_per_feature] * len(d.sparse_columns)
    elif manifest is not None:
        sizes = list(manifest.num_embeddings_per_feature)
    else:
        raise ConfigError(
            f"data={d.name} leaves the table sizes to its data, and {d.processed_dir} has no manifest: set "
            "data.num_embeddings_per_feature or data.max_ids_per_feature, or preprocess first"
        )
    if a.cap:
        sizes = [min(n, a.cap) for n in sizes]
    a.embedding_dim = a.embedding_dim or cfg.model.embedding_dim
    a.optimizer = a.optimizer or cfg.optimizer.embedding.value
    a.embedding_dtype = a.embedding_dtype or cfg.sharding.embedding_dtype.value
    if a.batch_size is None:
        batch = d.global_batch_size or 2048 * world
        a.batch_size = max(1, batch // world)
    if a.sharding_types is None and cfg.sharding.sharding_types:
        a.sharding_types = ",".join(cfg.sharding.sharding_types)
    if a.kernels is None and cfg.sharding.compute_kernels != ["fused"]:
        a.kernels = ",".join(cfg.sharding.compute_kernels)
    max_lengths = manifest.max_lengths if manifest is not None else None
    if max_lengths is None and d.materialize is not None:
        max_lengths = list(d.materialize.sizes)
    return sizes, pooling_factors(d), max_lengths, " ".join(a.overrides)


def parse_pooling_factors(text: str, num_tables: int) -> list[float]:
    """``--pooling-factors``: one value per table, comma-separated, or one value for every table."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--pooling-factors {text}: expected numbers, e.g. 1 or 3,2,1,...") from None
    if len(values) == 1:
        values *= num_tables
    if len(values) != num_tables or min(values) < 0:
        raise SystemExit(
            f"--pooling-factors {text}: give one value >= 0 for every table ({num_tables}), or one for all"
        )
    return values


DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DEFAULT_HBM_GB = 80  # --device cuda on a machine without a GPU: an H100's


def plan(
    nodes: int,
    devices_per_node: int,
    device: str,
    hbm_gb: float | None,
    ddr_gb: float | None,
    sizes: list[int],
    dim: int,
    batch_size: int,
    optimizer: str,
    reservation: float,
    sharding_types: list[str] | None,
    kernels: list[str] | None = None,
    dtype: str = "fp32",
    cache_load_factor: float | None = None,
    pooling_factors: list[float] | None = None,
    max_lengths: list[int] | None = None,
) -> dict:
    """Run the planner the training job runs (``pipeline.distributed.planner``) for another topology; return
    the per-table plan, per-rank memory and estimated embedding time. ``hbm_gb`` / ``ddr_gb`` None: this
    machine's (its GPU; its host memory available, shared by ``devices_per_node`` ranks).
    ``pooling_factors``: mean ids per sample per table (None: one each); ``max_lengths``: the most ids in
    a sample per table, only reported.

    Raises:
        PlanDoesNotFit: naming the shortfall, the largest tables and the fixes.
    """
    import torch
    from torchrec import optim as trec_optim
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from pipeline.config import ShardingConfig
    from pipeline.distributed import planner

    world = nodes * devices_per_node
    data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16, "bf16": DataType.BF16}[dtype]
    tables = [
        EmbeddingBagConfig(
            name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"], data_type=data_type
        )
        for i, n in enumerate(sizes)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    opt = {
        "sgd": trec_optim.SGD,
        "row_wise_adagrad": trec_optim.RowWiseAdagrad,
        "adagrad": trec_optim.Adagrad,
        "adam": trec_optim.Adam,
    }[optimizer]
    apply_optimizer_in_backward(opt, ebc.parameters(), {"lr": 0.01})
    detected = planner.detect_memory(
        torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"), devices_per_node
    )
    given = []
    if device == "cuda":
        hbm = int(hbm_gb * GIB) if hbm_gb is not None else detected.hbm or DEFAULT_HBM_GB * GIB
        given.append(
            "HBM given"
            if hbm_gb is not None
            else "HBM of this machine's GPU"
            if detected.hbm
            else f"{DEFAULT_HBM_GB} GiB HBM (no GPU here; --hbm-gb to change)"
        )
    else:
        hbm = None
    ddr = int(ddr_gb * GIB) if ddr_gb is not None else detected.ddr
    given.append("host memory given" if ddr_gb is not None else f"host memory available here / {devices_per_node}")
    memory = planner.Memory(hbm, ddr, "; ".join(given))
    sharding = ShardingConfig(
        sharding_types=list(sharding_types or []),
        compute_kernels=list(kernels or []),
        cache_load_factor=cache_load_factor,
    )
    factors = {t.name: f for t, f in zip(tables, pooling_factors, strict=True)} if pooling_factors else None
    constraints = planner.constraints_from_config(sharding, [t.name for t in tables], device, factors)
    req = planner.PlanRequest(
        world,
        devices_per_node,
        device,
        memory,
        batch_size,
        reservation,
        optimizer,
        cap_fix="--cap {cap}",
        other_fixes=("more devices (-j)", "--embedding-dtype fp16"),
        cache_fix="keep tables in host memory behind an HBM cache: --kernels fused,fused_uvm_caching",
    )
    sharding_plan, best = planner.plan(ebc, req, constraints, kernels, collective=False)
    hbm_used = [0.0] * world
    ddr_used = [0.0] * world
    perf_ms = [0.0] * world
    for option in best._best_plan or []:  # the chosen ShardingOptions, with each shard's storage and cost
        for shard in option.shards:
            hbm_used[shard.rank] += shard.storage.hbm
            ddr_used[shard.rank] += shard.storage.ddr
            perf_ms[shard.rank] += shard.perf.total if shard.perf else 0.0
    rows = []
    for module_plan in sharding_plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            j = int(table.rsplit("_", 1)[1])
            rows.append(
                {
                    "table": table,
                    "rows": sizes[j],
                    "pooling_factor": pooling_factors[j] if pooling_factors else 1.0,
                    "max_length": max_lengths[j] if max_lengths else None,
                    "sharding": ps.sharding_type,
                    "kernel": ps.compute_kernel,
                    "ranks": sorted(set(ps.ranks or [])),
                }
            )
    return {
        "world_size": world,
        "tables": rows,
        "hbm_gib": [h / GIB for h in hbm_used],
        "ddr_gib": [d / GIB for d in ddr_used],
        "perf_ms": perf_ms,
        "capacity_gib": {"hbm": hbm / GIB if hbm else 0.0, "ddr": ddr / GIB},
        "memory": memory.source,
    }


def format_plan(result: dict) -> str:
    """The per-table plan (ids per sample: mean, and the most when known) and the per-rank memory and cost."""
    tables = sorted(result["tables"], key=lambda r: int(r["table"].rsplit("_", 1)[1]))
    with_max = any(r.get("max_length") is not None for r in tables)
    ids_head = f"{'ids/sample':>10s}" + (f" {'max':>6s}" if with_max else "")
    lines = [f"{'table':10s} {'rows':>12s} {ids_head}  {'sharding':18s} {'kernel':18s} ranks"]
    for r in tables:
        ranks = r["ranks"]
        shown = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 3 and ranks == list(range(ranks[0], ranks[-1] + 1)) else ranks
        ids = f"{r.get('pooling_factor', 1.0):>10.4g}"
        if with_max:
            ids += f" {r['max_length'] if r.get('max_length') is not None else '-':>6}"
        lines.append(f"{r['table']:10s} {r['rows']:>12,d} {ids}  {r['sharding']:18s} {r['kernel']:18s} {shown}")
    lines.append("")
    lines.append(
        f"{'rank':>4s} {'HBM GiB':>9s} {'host GiB':>9s} {'est. ms':>8s}   (capacity: HBM "
        f"{result['capacity_gib']['hbm']:g}, host {result['capacity_gib']['ddr']:g} per rank)"
    )
    perf = result.get("perf_ms") or [0.0] * len(result["hbm_gib"])
    for rank, (h, d, t) in enumerate(zip(result["hbm_gib"], result["ddr_gib"], perf, strict=True)):
        lines.append(f"{rank:>4d} {h:>9.2f} {d:>9.2f} {t:>8.3g}")
    lines.append(
        "est. ms: the planner's estimate of a step's embedding lookups and their all-to-alls, forward and backward"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="./launch.sh plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-j", default="1x2", help="NODESxDEVICES, e.g. 2x8")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--hbm-gb",
        type=float,
        default=None,
        help=f"HBM per GPU; default this machine's GPU, else {DEFAULT_HBM_GB} (an H100)",
    )
    p.add_argument(
        "--ddr-gb",
        type=float,
        default=None,
        help="host memory per rank; default the host memory available here / devices per node",
    )
    p.add_argument("--data", default=None, help="criteo_1tb (default), criteo_kaggle, or processed:<folder>")
    p.add_argument("--cap", type=int, default=None, help="cap on rows per table (e.g. 40000000)")
    p.add_argument("--embedding-dim", type=int, default=None, help="default 128")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size (default 2048)")
    p.add_argument(
        "--optimizer",
        default=None,
        choices=["sgd", "row_wise_adagrad", "adagrad", "adam"],
        help="default row_wise_adagrad",
    )
    p.add_argument("--storage-reservation", type=float, default=0.15)
    p.add_argument("--sharding-types", default=None, help="comma-separated allowed types, e.g. table_wise")
    p.add_argument(
        "--kernels",
        default=None,
        help="comma-separated allowed compute kernels, e.g. fused,fused_uvm_caching (GPU: tables that do "
        "not fit in HBM stay in host memory with an HBM cache)",
    )
    p.add_argument(
        "--cache-load-factor",
        type=float,
        default=None,
        help="fused_uvm_caching: share of a table's rows cached in HBM (TorchRec's default 0.2)",
    )
    p.add_argument("--embedding-dtype", choices=sorted(DTYPE_BYTES), default=None, help="stored table precision (fp32)")
    p.add_argument(
        "--pooling-factors",
        default=None,
        help="mean ids per sample of each table (comma-separated, or one value for all), e.g. for multi-hot "
        "data you don't have; default: a processed folder's manifest, else 1 (one-hot)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. experiment=mlperf_dlrmv2")
    a = p.parse_args(argv)
    import logging

    # The planner warns per data-parallel table on the root logger: quiet while planning, as it was after.
    root = logging.getLogger()
    level = root.level
    logging.basicConfig(level=logging.ERROR)
    root.setLevel(logging.ERROR)
    try:
        return _run(a, p)
    finally:
        root.setLevel(level)


def _run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """``main`` after parsing: the plan printed, 0; 1 when it cannot fit; 2 for a bad config."""
    try:
        nodes, devices = (int(x) for x in a.j.lower().split("x"))
    except ValueError:
        p.error(f"-j {a.j}: expected NODESxDEVICES, e.g. 2x8")
    defaults = {"embedding_dim": 128, "batch_size": 2048, "optimizer": "row_wise_adagrad", "embedding_dtype": "fp32"}
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"{bad}: expected config overrides key=value, e.g. experiment=mlperf_dlrmv2")
    if a.overrides:
        try:
            sizes, factors, max_lengths, source = from_config(a, p, nodes * devices)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        a.data = source
    else:
        a.data = a.data or "criteo_1tb"
        for key, value in defaults.items():
            setattr(a, key, value if getattr(a, key) is None else getattr(a, key))
        sizes = table_sizes(a.data, a.cap)
        factors, max_lengths = table_lengths(a.data)
    if a.pooling_factors is not None:
        factors, max_lengths = parse_pooling_factors(a.pooling_factors, len(sizes)), None
    try:
        result = plan(
            nodes,
            devices,
            a.device,
            a.hbm_gb,
            a.ddr_gb,
            sizes,
            a.embedding_dim,
            a.batch_size,
            a.optimizer,
            a.storage_reservation,
            a.sharding_types.split(",") if a.sharding_types else None,
            a.kernels.split(",") if a.kernels else None,
            a.embedding_dtype,
            a.cache_load_factor,
            factors,
            max_lengths,
        )
    except PlanDoesNotFit as e:
        print(f"plan refused: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        cap_gib = result["capacity_gib"]
        hbm_text = f"{cap_gib['hbm']:.3g} GiB HBM, " if a.device == "cuda" else ""
        print(
            f"{nodes}x{devices} {a.device} ({hbm_text}{cap_gib['ddr']:.3g} GiB host per rank: {result['memory']}), "
            f"{a.data}"
            f"{f' capped at {a.cap:,}' if a.cap else ''}"
            f"{f', {sum(factors):.4g} ids per sample' if factors else ''}, dim {a.embedding_dim} {a.embedding_dtype}, "
            f"{a.optimizer}, "
            f"batch {a.batch_size}/rank\n"
        )
        print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
