"""Reduced precision against fp32: eval AUC of the same training run in each precision, side by side.

In one run: generates one synthetic dataset (``data=synthetic``, a known optimum), then trains the
paper's model (``model=dlrm_criteo``) on it once per setting with the same seed, as users run it
(``./launch.sh train``), and prints each setting's val/test AUC, its difference to fp32 and whether it
is within the target (0.002), with samples/s:

- ``fp32``: the default;
- ``fp16 tables``: ``sharding.embedding_dtype=fp16`` (FBGEMM stores and updates the tables in fp16);
- ``bf16 autocast``: ``trainer.precision=bf16`` (MLPs and interaction under ``torch.autocast``);
  on a CPU without AVX-512 BF16/AMX this runs emulated and is slow, but its AUC is what it is.

    .venv/bin/python benchmarks/precision_auc.py
    .venv/bin/python benchmarks/precision_auc.py --rows 1000000 --nproc 2 --settings fp32,fp16_tables
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402
from benchmarks._runs import fresh_run_dir  # noqa: E402

SETTINGS = {
    "fp32": [],
    "fp16_tables": ["sharding.embedding_dtype=fp16"],
    "bf16_autocast": ["trainer.precision=bf16"],
}
TARGET = 0.002


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="training rows to generate (one epoch is trained)")
    parser.add_argument("--eval-rows", type=int, default=50_000, help="val and test rows each")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_precision_"))
    data = [
        "model=dlrm_criteo",
        "data=synthetic",
        f"data.raw_dir={work}/raw",
        f"data.processed_dir={work}/processed",
        f"data.synthetic.num_train_rows={args.rows}",
        f"data.synthetic.num_val_rows={args.eval_rows}",
        f"data.synthetic.num_test_rows={args.eval_rows}",
        "trainer.eval_every_steps=0",
        "logger.progress_bar=false",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        "trainer.resume=none",
    ]
    results = {}
    for name in settings:
        run_dir = fresh_run_dir(work / name)
        env = {**os.environ, "NPROC": str(args.nproc), "PIPELINE_RUN_ID": name}
        t = time.perf_counter()
        proc = subprocess.run(
            ["./launch.sh", "train", *data, *SETTINGS[name], f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"{name}: failed (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
            return 1
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = {
            "val": summary["final"]["eval/val/auc"],
            "test": summary["final"]["eval/test/auc"],
            "samples_per_s": summary.get("train_samples_per_s"),
            "wall_s": time.perf_counter() - t,
        }
    optimum = json.loads((work / "raw" / "optimum.json").read_text())
    print(
        f"model=dlrm_criteo data=synthetic, {args.rows:,} training rows (1 epoch), {args.eval_rows:,} val/test rows, "
        f"{args.nproc} rank(s); data optimum val AUC {optimum['optimum']['val']['auc']:.4f}"
    )
    print(
        f"{'setting':15s} {'val AUC':>8s} {'test AUC':>9s} {'d val':>8s} {'d test':>8s} {'within':>7s} "
        f"{'samples/s':>10s} {'wall s':>7s}"
    )
    base = results.get("fp32")
    for name, r in results.items():
        dv = r["val"] - base["val"] if base else float("nan")
        dt = r["test"] - base["test"] if base else float("nan")
        ok = "-" if not base or name == "fp32" else ("yes" if max(abs(dv), abs(dt)) <= TARGET else "NO")
        sps = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "?"
        print(
            f"{name:15s} {r['val']:8.4f} {r['test']:9.4f} {dv:+8.4f} {dt:+8.4f} {ok:>7s} {sps:>10s} {r['wall_s']:7.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
