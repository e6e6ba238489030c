"""What logging, metrics and the progress bar cost per training step, against a run that logs nothing.

In one run: generates a synthetic dataset, then trains the paper's model (``model=dlrm_criteo``) as
users run it (``./launch.sh train``), alternating, ``--repeats`` times each:

- ``quiet``: one log event at the end only, metrics.jsonl only, no progress bar (the baseline);
- ``default``: the shipped logger config (an event every 100 steps to metrics.jsonl and TensorBoard,
  memory readings, the tqdm bar);
- ``every_step``: an event every step to both backends, with the bar (the most a user can ask for).

It prints each setting's training samples/s (median over repeats, from ``summary.json``, which counts
training time only), and its cost against ``quiet`` in percent. The target is at most 2% for ``default``.
Because this machine's run-to-run noise is larger than 2%, it also prints the direct measurement:
``summary.json``'s ``bookkeeping_fraction``, the share of training time rank 0 spent in the loop's
own per-step code (loss tracking, the non-finite check, log events with their all-reduces and memory
readings, the bar), timed in the run itself.

    .venv/bin/python benchmarks/logging_overhead.py
    .venv/bin/python benchmarks/logging_overhead.py --steps 200 --repeats 5 --nproc 2
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
from benchmarks._machine import describe  # noqa: E402
from benchmarks._runs import fresh_run_dir  # noqa: E402

SETTINGS = {
    "quiet": ["logger.log_every_steps=1000000000", "logger.backends=[jsonl]", "logger.progress_bar=false"],
    "default": [],
    "every_step": ["logger.log_every_steps=1"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="training rows to generate")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (batch 2048)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_logging_"))
    base = [
        "model=dlrm_criteo",
        "data=synthetic",
        f"data.raw_dir={work}/raw",
        f"data.processed_dir={work}/processed",
        f"data.synthetic.num_train_rows={args.rows}",
        "data.synthetic.num_val_rows=8192",
        "data.synthetic.num_test_rows=8192",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every_steps=0",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        "trainer.resume=none",
    ]
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    booked: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for r in range(args.repeats):
        for name, extra in SETTINGS.items():
            run_dir = fresh_run_dir(work / f"{name}_{r}")
            env = {**os.environ, "NPROC": str(args.nproc), "PIPELINE_RUN_ID": run_dir.name}
            proc = subprocess.run(
                ["./launch.sh", "train", *base, *extra, f"hydra.run.dir={run_dir}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(f"{name}: failed (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
                return 1
            summary = json.loads((run_dir / "summary.json").read_text())
            rates[name].append(summary["train_samples_per_s"])
            booked[name].append(summary["bookkeeping_fraction"])
    quiet = statistics.median(rates["quiet"])
    print(
        f"model=dlrm_criteo data=synthetic, batch 2048, {args.steps} steps per run, {args.nproc} rank(s), "
        f"{args.repeats} alternating repeats"
    )
    print(f"{'setting':12s} {'samples/s':>10s} {'min':>9s} {'max':>9s} {'cost vs quiet':>14s} {'bookkeeping':>12s}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(
            f"{name:12s} {med:10,.0f} {min(values):9,.0f} {max(values):9,.0f} {100 * (1 - med / quiet):13.1f}%"
            f" {100 * statistics.median(booked[name]):11.2f}%"
        )
    print("bookkeeping = the loop's own per-step code as a share of training time, timed in each run (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
