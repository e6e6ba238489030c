"""How long training stalls per checkpoint: synchronous saves against ``checkpoint.async_save=true``.

In one run: generates a synthetic dataset hashed into 26 tables of ``--table-rows`` rows, then trains the paper's
model with ``model.embedding_dim=--dim`` on ``--nproc`` ranks as users run it, alternating, ``--repeats`` times:

- ``none``: no checkpoint during training (the baseline);
- ``sync``: a checkpoint every ``--every`` steps, written before training goes on;
- ``async``: the same with ``checkpoint.async_save=true`` (the state copied in memory, written in the background).

Per save it prints the stall, the wall time a run took beyond the same repeat's baseline divided by its saves (median
over repeats; it includes what the background write takes from training on shared cores), and the time rank 0's
training thread was blocked in the save (from its log: the whole save, or the copy plus any wait for the save
before), then the async/sync ratio of both. The target is an async stall at most 20% of the sync one.

    .venv/bin/python benchmarks/checkpoint_stall.py
    .venv/bin/python benchmarks/checkpoint_stall.py --table-rows 500000 --dim 128 --steps 400 --every 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402
from benchmarks._runs import fresh_run_dir  # noqa: E402

PY = sys.executable
SETTINGS = {
    "none": ["checkpoint.every_steps=0"],
    "sync": ["checkpoint.async_save=false"],
    "async": ["checkpoint.async_save=true"],
}


def writer_cpu_seconds(log: str) -> float:
    """CPU seconds the writing thread spent per save (rank 0)."""
    cpu = [float(s) for s in re.findall(r"saved in [\d.]+s \(([\d.]+)s of CPU", log)]
    return statistics.mean(cpu) if cpu else float("nan")


def blocked_seconds(log: str) -> tuple[float, int]:
    """Rank 0's time blocked in saves (whole synchronous saves; async copies and waits) and the number of saves."""
    copied = [float(s) for s in re.findall(r"state copied in ([\d.]+)s", log)]
    waited = [float(s) for s in re.findall(r"waited ([\d.]+)s for checkpoint", log)]
    if copied:
        return sum(copied) + sum(waited), len(copied)
    saved = [float(s) for s in re.findall(r"checkpoint \S+ saved in ([\d.]+)s", log)]
    return sum(saved), len(saved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-rows", type=int, default=200_000, help="rows of each of the 26 tables")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--steps", type=int, default=320, help="training steps per run (batch 2048)")
    parser.add_argument("--every", type=int, default=80, help="steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="data and runs (default: a temporary folder)")
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    gb = 26 * args.table_rows * args.dim * 4 / 1e9
    num_saves = (args.steps - 1) // args.every
    print(
        f"26 tables x {args.table_rows:,} rows x dim {args.dim}, fp32: {gb:.2f} GB of weights plus RowWiseAdagrad's "
        f"state, on {args.nproc} rank(s); {args.steps} steps of batch 2048, a save every {args.every} "
        f"({num_saves} per run)",
        flush=True,
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    data = [
        "data=synthetic",
        f"data.raw_dir={work}/raw",
        f"data.processed_dir={work}/processed",
        "data.id_mode=hash",
        f"data.max_ids_per_feature={args.table_rows}",
        f"data.synthetic.num_train_rows={args.steps * 2048 + 4096}",
        "data.synthetic.num_val_rows=8192",
        "data.synthetic.num_test_rows=4096",
        "data.synthetic.max_cardinality=1000000",
    ]
    t0 = time.perf_counter()
    cmd = [PY, "-m", "pipeline.preprocess", *data, f"hydra.run.dir={work}/prep"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    print(f"data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    base = [
        *data,
        "model=dlrm_criteo",
        f"model.embedding_dim={args.dim}",
        "data.global_batch_size=2048",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every_steps=0",
        "trainer.restore_best=false",
        "trainer.run_doctor=false",
        f"checkpoint.every_steps={args.every}",
        "checkpoint.save_at_end=false",
        "logger.progress_bar=false",
        "logger.report=false",
        "logger.log_every_steps=1000000",
    ]
    stalls: dict[str, list[float]] = {k: [] for k in SETTINGS}
    blocked: dict[str, list[float]] = {k: [] for k in SETTINGS}
    writer_cpu: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for rep in range(args.repeats):
        for name, extra in SETTINGS.items():
            run_dir = fresh_run_dir(work / f"{name}_{rep}")
            cmd = [
                PY,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(args.nproc),
                str(ROOT / "pipeline" / "train.py"),
                f"hydra.run.dir={run_dir}",
                *base,
                *extra,
            ]
            env = {**os.environ, "PIPELINE_RUN_ID": run_dir.name}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            wall = json.loads((run_dir / "summary.json").read_text())["wall_seconds"]
            log = (run_dir / "rank0.log").read_text()
            seconds, saves = blocked_seconds(log)
            if name == "none":
                baseline = wall
                print(f"  {name:<5} repeat {rep}: training loop {wall:.1f}s", flush=True)
            else:
                assert saves == num_saves, f"{name}: {saves} saves, expected {num_saves}"
                stalls[name].append((wall - baseline) / saves)
                blocked[name].append(seconds / saves)
                writer_cpu[name].append(writer_cpu_seconds(log))
                print(
                    f"  {name:<5} repeat {rep}: training loop {wall:.1f}s; per save: stall {stalls[name][-1]:.2f}s, "
                    f"blocked {seconds / saves:.2f}s, writing thread's CPU {writer_cpu[name][-1]:.2f}s",
                    flush=True,
                )
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    stall = {k: statistics.median(stalls[k]) for k in ("sync", "async")}
    block = {k: statistics.median(blocked[k]) for k in ("sync", "async")}
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cpu = {k: statistics.median(writer_cpu[k]) for k in ("sync", "async")}
    print(f"\n{'per save':<8} {'stall':>8} {'blocked':>8} {'writer CPU':>11}   (rank 0, median of {args.repeats})")
    for k in ("sync", "async"):
        print(f"{k:<8} {stall[k]:>7.2f}s {block[k]:>7.2f}s {cpu[k]:>10.2f}s")
    ratio = stall["async"] / stall["sync"] if stall["sync"] > 0 else float("nan")
    print(f"async / sync: stall {ratio:.1%}, blocked {block['async'] / block['sync']:.1%} (target: stall <= 20%)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
