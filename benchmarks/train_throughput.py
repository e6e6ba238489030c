"""Training and inference throughput of the paper's model: this pipeline vs the baselines a user would run.

In one run, alternating the contenders, for each batch size and rank count:

    (a) ours      pipeline/train.py under torchrun, as users run it (our loader, planner, fused SGD,
                  TrainPipelineSparseDist, logging, final evaluation), on a preprocessed synthetic
                  dataset hashed into 26 tables of --rows rows
    (b) torchrec  the minimal idiomatic TorchRec loop (benchmarks/_contenders.py) at the same config
    (c) plain     a plain-PyTorch DLRM in the style of facebookresearch/dlrm dlrm_s_pytorch.py (1 process)
    (a') ours_bf16 with --bf16: (a) with trainer.precision=bf16 (MLPs and interaction under bf16
                  autocast; fast on CPUs with AMX or AVX-512 BF16), beside fp32 (a); (b) and (c) stay fp32

Training samples/s is the median over --steps steps after --warmup (min and max too); inference is
forward only: the baselines' median over 30 batches after --warmup; ours, the final evaluation pass over
the validation split (--eval-batches batches at the same batch size: rows over the pass's seconds, its
first batch, loss, metric updates and the all-gather of predictions included).
Peak memory is the largest process's max RSS. The compute bound is the model's FLOPs per sample
(MLP GEMMs + interaction, x3 for training) over the GEMM rate measured here, and each contender's
fraction of it is printed.

    .venv/bin/python benchmarks/train_throughput.py                          # 512,2048,8192 x 1,2 ranks
    .venv/bin/python benchmarks/train_throughput.py --batch-sizes 2048 --ranks 1 --rounds 2
    .venv/bin/python benchmarks/train_throughput.py --batch-sizes 2048 --ranks 1 --profile 10 --workdir /tmp/b
    .venv/bin/python benchmarks/train_throughput.py --batch-sizes 2048,8192 --ranks 1 --bf16
    .venv/bin/python benchmarks/train_throughput.py --mlperf                 # multi-hot: batch 2048, 1 rank

``--mlperf``: MLPerf-shaped multi-hot data and model, (a) against (b) only. The raw rows are written by
benchmarks/_mlperf_data.py (every categorical field a bag of MLPerf DLRM-DCNv2's sizes 3,2,1,...,100,...,
214 ids a row; ``--lengths variable``: uniform in 1..those sizes), preprocessed with every column in
``data.multi_hot_columns`` and hashed into 26 tables of --rows rows; (b) trains on random KJTs of the same
bags. The model is DCNv2 for both (``model=dcn_criteo``; TorchRec's ``DLRM_DCN``): 3 low-rank cross layers,
sum-pooled bags, at dimensions a 2-core CPU trains in minutes (--dim 64, --dcn-rank 128, bottom
512-256-dim, top 512-256-1); MLPerf's own are ``--dim 128 --dcn-rank 512 --top 1024,1024,512,256,1``.
(c) is left out: its model has the dot interaction only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe, gemm_rate, gpu_model  # noqa: E402
from benchmarks._mlperf_data import LENGTHS, MLPERF_BAG_SIZES, mean_ids_per_row, multi_hot_override, write_raw  # noqa: E402
from benchmarks._runs import fresh_run_dir  # noqa: E402

PY = sys.executable
_WRAP = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    """Run ``cmd`` (a job that may start child processes); return its exit code and largest process RSS (MiB)."""
    with open(log, "w") as f:
        proc = subprocess.run([PY, "-c", _WRAP, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    f_out = proc.stdout
    peak = [int(line.split()[1]) for line in f_out.splitlines() if line.startswith("PEAK_RSS_KIB")]
    with open(log, "a") as f:
        f.write(f_out)
    return proc.returncode, (peak[-1] / 1024 if peak else float("nan"))


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc)]


def flops_per_sample(
    dim: int, bottom: list[int], top: list[int], tables: int = 26, dcn: tuple[int, int] | None = None
) -> tuple[float, float]:
    """(training, inference) FLOPs per sample of the MLPs and the interaction: the dot interaction, or with
    ``dcn=(layers, rank)`` DCNv2's low-rank cross layers over the 27 concatenated vectors."""
    macs = 0
    for a, b in zip([13, *bottom[:-1]], bottom, strict=True):
        macs += a * b
    n = tables + 1
    top_in = n * dim if dcn else dim + n * (n - 1) // 2
    for a, b in zip([top_in, *top[:-1]], top, strict=True):
        macs += a * b
    if dcn:
        layers, rank = dcn
        macs += layers * 2 * top_in * rank  # x0 * (U (V^T x) + b) + x per layer
    else:
        macs += n * n * dim  # the batched Gram matrix
    fwd = 2.0 * macs
    return 3.0 * fwd, fwd


def prepare_data(work: Path, rows: int, train_rows: int, eval_rows: int) -> list[str]:
    """A synthetic dataset hashed into tables of ``rows`` rows; returns the data overrides."""
    over = [
        "data=synthetic",
        f"data.raw_dir={work}/raw",
        f"data.processed_dir={work}/processed",
        "data.id_mode=hash",
        f"data.max_ids_per_feature={rows}",
        f"data.synthetic.num_train_rows={train_rows}",
        f"data.synthetic.num_val_rows={eval_rows}",
        f"data.synthetic.num_test_rows={eval_rows}",
        "data.synthetic.max_cardinality=100000",
    ]
    cmd = [PY, "-m", "pipeline.preprocess", *over, f"hydra.run.dir={work}/prep"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return over


def prepare_mlperf_data(work: Path, rows: int, train_rows: int, eval_rows: int, lengths: str) -> list[str]:
    """MLPerf-shaped multi-hot raw files (benchmarks/_mlperf_data.py) preprocessed with every column a list and
    hashed into tables of ``rows`` rows; returns the data overrides."""
    raw = work / "raw"
    files = {
        split: write_raw(raw / f"{split}.tsv", n, seed=seed, lengths=lengths)
        for split, n, seed in (("train", train_rows, 0), ("val", eval_rows, 1), ("test", eval_rows, 2))
    }
    over = [
        "data=files",
        f"data.raw_dir={raw}",
        f"data.processed_dir={work}/processed",
        *(f"data.{split}_files=[{path}]" for split, path in files.items()),
        "data.id_mode=hash",
        f"data.max_ids_per_feature={rows}",
        multi_hot_override(),
    ]
    cmd = [PY, "-m", "pipeline.preprocess", *over, f"hydra.run.dir={work}/prep"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return over


def run_ours(
    work: Path,
    tag: str,
    data: list[str],
    batch: int,
    nproc: int,
    warmup: int,
    steps: int,
    profile_steps: int = 0,
    name: str = "ours",
    extra: tuple[str, ...] = (),
    model: tuple[str, ...] = ("model=dlrm_criteo",),
    device: str = "cpu",
) -> dict:
    run_dir = fresh_run_dir(work / f"{name}_{tag}")
    # Profiled steps (if any) come after the measured ones and are not counted.
    profile = (
        [f"trainer.profile_steps={profile_steps}", f"trainer.profile_wait_steps={warmup + steps}"]
        if profile_steps
        else []
    )
    cmd = [
        *torchrun(nproc),
        "pipeline/train.py",
        f"hydra.run.dir={run_dir}",
        *data,
        *model,
        "optimizer=sgd",
        "optimizer.lr=0.01",
        "optimizer.warmup_steps=0",
        f"data.global_batch_size={batch}",
        f"data.eval_global_batch_size={batch}",
        f"trainer.max_steps={warmup + steps + (profile_steps + 1 if profile_steps else 0)}",
        "trainer.eval_every_steps=0",
        "logger.log_every_steps=1",
        "logger.progress_bar=false",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        f"trainer.device={device}",
        *profile,
        *extra,
    ]
    env = {**os.environ, "PIPELINE_RUN_ID": run_dir.name, "OMP_NUM_THREADS": "1"}
    rc, peak = run_measured(cmd, env, work / f"{name}_{tag}.log")
    if rc:
        raise RuntimeError(f"{name} failed (rc {rc}): see {work / f'{name}_{tag}.log'}")
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [e["train/samples_per_s"] for e in events if e["event"] == "train"][warmup : warmup + steps]
    val = next(e for e in events if e["event"] == "eval" and "eval/val/auc" in e)
    return {
        "train": {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "steps": len(rates)},
        "infer": {"median": val["eval/val/num_samples"] / val["eval/val/seconds"]},
        "peak_rss_mib": peak,
    }


def run_baseline(
    work: Path,
    tag: str,
    who: str,
    batch: int,
    nproc: int,
    rows: int,
    warmup: int,
    steps: int,
    profile_steps: int = 0,
    model: tuple[str, ...] = (),
    device: str = "cpu",
) -> dict:
    out = work / f"{who}_{tag}.json"
    script = [
        str(ROOT / "benchmarks" / "_contenders.py"),
        who,
        f"--batch={batch}",
        f"--rows={rows}",
        f"--warmup={warmup}",
        f"--steps={steps}",
        f"--out={out}",
        *model,
        *([f"--device={device}"] if device != "cpu" else []),
    ]
    if profile_steps:
        script += [f"--profile={work / f'profile_{tag}'}", f"--profile-steps={profile_steps}"]
    cmd = [*torchrun(nproc), *script] if who == "torchrec" else [PY, *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    rc, peak = run_measured(cmd, env, work / f"{who}_{tag}.log")
    if rc:
        raise RuntimeError(f"{who} failed (rc {rc}): see {work / f'{who}_{tag}.log'}")
    result = json.loads(out.read_text())
    result["peak_rss_mib"] = peak
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default=None, help="default 512,2048,8192 (2048 with --mlperf)")
    p.add_argument("--ranks", default=None, help="default 1,2 (1 with --mlperf)")
    p.add_argument("--rows", type=int, default=100_000, help="rows per table (26 tables, dim 128)")
    p.add_argument(
        "--mlperf",
        action="store_true",
        help="MLPerf-shaped multi-hot bags and DCNv2 (ours vs torchrec); see the module docstring",
    )
    p.add_argument("--lengths", choices=LENGTHS, default="fixed", help="--mlperf: the bags' lengths")
    p.add_argument("--dim", type=int, default=64, help="--mlperf: embedding dimension (bottom MLP's last)")
    p.add_argument("--dcn-rank", type=int, default=128, help="--mlperf: rank of each of the 3 cross layers")
    p.add_argument("--top", default="512,256,1", help="--mlperf: top MLP")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--eval-batches",
        type=int,
        default=16,
        help="validation (and test) split size in batches of the largest batch size: ours' inference pass",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat each contender, alternating")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: (a) and (b) on the GPU (one per rank), fused TBE tables on the card; (c) is left out",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also torch.profiler STEPS steps of each contender after the measured ones (not counted): "
        "ours in <workdir>/ours_<tag>/profile/, the baselines in <workdir>/profile_<tag>/",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also run ours with trainer.precision=bf16 (contender ours_bf16; the baselines stay fp32)",
    )
    a = p.parse_args()
    batches = [int(x) for x in (a.batch_sizes or ("2048" if a.mlperf else "512,2048,8192")).split(",")]
    ranks = [int(x) for x in (a.ranks or ("1" if a.mlperf else "1,2")).split(",")]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    # One epoch holds every step run, profiled ones too: an epoch's end re-initialises the tables (ours).
    train_rows = max(batches) * (a.warmup + a.steps + 2 + (a.profile + 1 if a.profile else 0))
    print(f"preparing {train_rows:,} training rows hashed into 26 x {a.rows:,} tables in {work} ...", flush=True)
    if a.mlperf:
        dim, bottom, top = a.dim, [512, 256, a.dim], [int(x) for x in a.top.split(",")]
        data = prepare_mlperf_data(work, a.rows, train_rows, max(batches) * a.eval_batches, a.lengths)
        ours_model: tuple[str, ...] = (
            "model=dcn_criteo",
            f"model.embedding_dim={dim}",
            f"model.over_arch_layer_sizes=[{a.top}]",
            "model.dcn_num_layers=3",
            f"model.dcn_low_rank_dim={a.dcn_rank}",
        )
        baseline_model: tuple[str, ...] = (
            f"--dim={dim}",
            f"--bottom={','.join(map(str, bottom))}",
            f"--top={a.top}",
            "--interaction=dcn",
            "--dcn-layers=3",
            f"--dcn-rank={a.dcn_rank}",
            f"--bag-sizes={','.join(map(str, MLPERF_BAG_SIZES))}",
            f"--bag-lengths={a.lengths}",
        )
        flops = flops_per_sample(dim, bottom, top, dcn=(3, a.dcn_rank))
    else:
        data = prepare_data(work, a.rows, train_rows, max(batches) * a.eval_batches)
        ours_model, baseline_model = ("model=dlrm_criteo",), ()
        flops = flops_per_sample(128, [512, 256, 128], [512, 256, 1])
    rate = gemm_rate(a.device)
    print(f"machine: {describe(gemm_rate() if a.device == 'cuda' else rate)}", flush=True)
    if a.device == "cuda":
        print(f"gpu: {gpu_model()} | fp32 GEMM {rate / 1e9:,.0f} GFLOP/s (the bound below is the GPU's)", flush=True)
    if a.mlperf:
        print(
            f"MLPerf-shaped: 26 multi-hot tables of {a.rows:,} rows, bags of {a.lengths} lengths "
            f"({mean_ids_per_row(a.lengths):.0f} ids a sample), DCNv2 dim {dim}, 3 cross layers of rank "
            f"{a.dcn_rank}, bottom {'-'.join(map(str, [13, *bottom]))}, "
            f"top {'-'.join(map(str, [27 * dim, *top]))}, fused SGD, sum pooling",
            flush=True,
        )
    train_flops, infer_flops = flops
    print(
        f"GEMM {rate / 1e9:.0f} GFLOP/s fp32 on {'the GPU' if a.device == 'cuda' else f'{os.cpu_count()} cores'}; "
        f"the model needs {train_flops / 1e6:.2f} MFLOP per "
        f"training sample, {infer_flops / 1e6:.2f} per inference sample -> compute bound "
        f"{rate / train_flops:,.0f} train / {rate / infer_flops:,.0f} infer samples/s\n",
        flush=True,
    )
    rows = []
    for batch in batches:
        for nproc in ranks:
            results: dict[str, list[dict]] = {
                "ours": [],
                **({"ours_bf16": []} if a.bf16 else {}),
                "torchrec": [],
                "plain": [],
            }
            for r in range(a.rounds):
                tag = f"b{batch}_r{nproc}_{r}"
                results["ours"].append(
                    run_ours(
                        work, tag, data, batch, nproc, a.warmup, a.steps, a.profile, model=ours_model, device=a.device
                    )
                )
                if a.bf16:
                    results["ours_bf16"].append(
                        run_ours(
                            work,
                            tag,
                            data,
                            batch,
                            nproc,
                            a.warmup,
                            a.steps,
                            a.profile,
                            "ours_bf16",
                            ("trainer.precision=bf16",),
                            ours_model,
                            a.device,
                        )
                    )
                results["torchrec"].append(
                    run_baseline(
                        work,
                        tag,
                        "torchrec",
                        batch,
                        nproc,
                        a.rows,
                        a.warmup,
                        a.steps,
                        a.profile,
                        baseline_model,
                        a.device,
                    )
                )
                if nproc == 1 and not a.mlperf and a.device == "cpu":
                    results["plain"].append(
                        run_baseline(work, tag, "plain", batch, nproc, a.rows, a.warmup, a.steps, a.profile)
                    )
            agg = {}
            for who, rs in results.items():
                if rs:
                    agg[who] = {
                        "train": statistics.median(x["train"]["median"] for x in rs),
                        "train_min": min(x["train"]["min"] for x in rs),
                        "train_max": max(x["train"]["max"] for x in rs),
                        "infer": statistics.median(x["infer"]["median"] for x in rs),
                        "rss": max(x["peak_rss_mib"] for x in rs),
                    }
            rows.append((batch, nproc, agg))
            print(f"batch {batch:>5d}, {nproc} rank(s)")
            print(
                f"  {'':9s} {'train/s median':>14s} {'min':>8s} {'max':>8s} {'of bound':>8s} {'infer/s':>9s} "
                f"{'peak RSS':>9s}"
            )
            for who, v in agg.items():
                print(
                    f"  {who:9s} {v['train']:>14,.0f} {v['train_min']:>8,.0f} {v['train_max']:>8,.0f} "
                    f"{v['train'] * train_flops / rate:>8.0%} {v['infer']:>9,.0f} {v['rss']:>7,.0f}Mi"
                )
            for who in ("ours", "ours_bf16"):
                if who not in agg:
                    continue
                ours, label = agg[who], "ratios" if who == "ours" else "ratios (bf16)"
                line = f"  {label}: train a/b {ours['train'] / agg['torchrec']['train']:.2f}x"
                if "plain" in agg:
                    line += f", a/c {ours['train'] / agg['plain']['train']:.2f}x"
                line += f"; infer a/b {ours['infer'] / agg['torchrec']['infer']:.2f}x"
                if "plain" in agg:
                    line += f", a/c {ours['infer'] / agg['plain']['infer']:.2f}x"
                print(line, flush=True)
            print(flush=True)
    for batch in batches:
        per = {n: agg["ours"]["train"] for b, n, agg in rows if b == batch}
        if 1 in per and 2 in per:
            print(f"batch {batch}: ours 2 ranks / 1 rank = {per[2] / per[1]:.2f}x samples/s")
    (work / "results.json").write_text(json.dumps([{"batch": b, "ranks": n, **agg} for b, n, agg in rows], indent=2))
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
