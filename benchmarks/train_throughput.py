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
from benchmarks._machine import describe, gemm_rate  # noqa: E402

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


def flops_per_sample(dim: int, bottom: list[int], top: list[int], tables: int = 26) -> tuple[float, float]:
    """(training, inference) FLOPs per sample of the MLPs and the dot interaction."""
    macs = 0
    for a, b in zip([13, *bottom[:-1]], bottom, strict=True):
        macs += a * b
    n = tables + 1
    top_in = dim + n * (n - 1) // 2
    for a, b in zip([top_in, *top[:-1]], top, strict=True):
        macs += a * b
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
) -> dict:
    run_dir = work / f"{name}_{tag}"
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
        "model=dlrm_criteo",
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
    work: Path, tag: str, who: str, batch: int, nproc: int, rows: int, warmup: int, steps: int, profile_steps: int = 0
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
    p.add_argument("--batch-sizes", default="512,2048,8192")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--rows", type=int, default=100_000, help="rows per table (26 tables, dim 128)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--eval-batches",
        type=int,
        default=16,
        help="validation (and test) split size in batches of the largest batch size: ours' inference pass",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat each contender, alternating")
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
    batches = [int(x) for x in a.batch_sizes.split(",")]
    ranks = [int(x) for x in a.ranks.split(",")]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    train_rows = max(batches) * (a.warmup + a.steps + 2)
    print(f"preparing {train_rows:,} training rows hashed into 26 x {a.rows:,} tables in {work} ...", flush=True)
    data = prepare_data(work, a.rows, train_rows, max(batches) * a.eval_batches)
    rate = gemm_rate()
    print(f"machine: {describe(rate)}", flush=True)
    train_flops, infer_flops = flops_per_sample(128, [512, 256, 128], [512, 256, 1])
    print(
        f"GEMM {rate / 1e9:.0f} GFLOP/s fp32 on {os.cpu_count()} cores; "
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
                results["ours"].append(run_ours(work, tag, data, batch, nproc, a.warmup, a.steps, a.profile))
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
                        )
                    )
                results["torchrec"].append(
                    run_baseline(work, tag, "torchrec", batch, nproc, a.rows, a.warmup, a.steps, a.profile)
                )
                if nproc == 1:
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
