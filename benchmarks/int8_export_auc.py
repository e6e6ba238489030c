"""What int8 tables cost: the same trained model exported in float32 and with ``--quantize int8``, scored
on the same rows, side by side.

In one run: generates a synthetic dataset (``data=synthetic``, a known optimum), trains the paper's model
(``model=dlrm_criteo``) on it as users run it (``./launch.sh train``), exports the final checkpoint twice
(``./launch.sh export``: float32 tables, then int8 row-wise tables) and scores the preprocessed
test split with each export (``pipeline.predict``). Prints each export's test AUC and logloss, their
difference, the weights file size and the scoring rate, and the largest per-row probability difference.

    .venv/bin/python benchmarks/int8_export_auc.py
    .venv/bin/python benchmarks/int8_export_auc.py --rows 1000000 --nproc 2
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="training rows to generate (one epoch is trained)")
    parser.add_argument("--eval-rows", type=int, default=50_000, help="val and test rows each")
    parser.add_argument("--nproc", type=int, default=1, help="training ranks")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_int8_"))
    run_dir = work / "run"
    train = [
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
        "trainer.resume=none",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "NPROC": str(args.nproc), "PIPELINE_RUN_ID": "int8_bench"}
    proc = subprocess.run(["./launch.sh", "train", *train], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"training failed (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
        return 1

    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    results = {}
    for name, quantize in (("float32", "none"), ("int8", "int8")):
        out = work / f"export_{name}"
        spec = export(run_dir, out, quantize=quantize, dense_program=False)
        model = load_exported(out)
        t = time.perf_counter()
        res = run(model, str(work / f"test_{name}.npy"), split="test")
        seconds = time.perf_counter() - t
        results[name] = {
            "auc": res.metrics["auc"],
            "logloss": res.metrics["logloss"],
            "mib": spec["weights"]["bytes"] / 2**20,
            "rows_per_s": res.scored / seconds,
            "probs": np.load(work / f"test_{name}.npy"),
        }
    optimum = json.loads((work / "raw" / "optimum.json").read_text())["optimum"]["test"]
    print(
        f"model=dlrm_criteo data=synthetic, {args.rows:,} training rows (1 epoch), {args.eval_rows:,} test rows, "
        f"{args.nproc} rank(s); data optimum test AUC {optimum['auc']:.4f}"
    )
    print(
        f"{'tables':8s} {'test AUC':>9s} {'logloss':>8s} {'d AUC':>8s} {'d logloss':>10s} {'weights':>9s} "
        f"{'rows/s':>9s}"
    )
    base = results["float32"]
    for name, r in results.items():
        print(
            f"{name:8s} {r['auc']:9.4f} {r['logloss']:8.4f} {r['auc'] - base['auc']:+8.5f} "
            f"{r['logloss'] - base['logloss']:+10.5f} {r['mib']:7.1f}Mi {r['rows_per_s']:9,.0f}"
        )
    diff = np.abs(results["int8"]["probs"] - base["probs"])
    print(
        f"per-row |p_int8 - p_float32|: max {diff.max():.4f}, mean {diff.mean():.5f}; weights "
        f"{base['mib'] / results['int8']['mib']:.2f}x smaller"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
