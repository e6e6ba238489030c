"""Model quality on your own click logs, as a new user gets it: validation AUC, logloss and calibration of

- (a) this pipeline with its defaults (``./launch.sh train data=files ...``, nothing else), 1 and 2 ranks,
- (b) the fixed settings it used before its defaults followed the data (global batch 2048, one epoch, 100
  warm-up steps, every training value its own row, the last state reported), 1 rank,
- (c) ``+tuned=<name>``: the best setting a ``./launch.sh tune`` search found (``--tuned``), 1 rank,
- (d) a hashed logistic regression (per field, 2^20 buckets, Adagrad, the best of 3 epochs on val),

in one run, each training job a fresh ``./launch.sh train`` (torchrun), with the constant-rate logloss
(predicting the training click rate everywhere) for scale::

    .venv/bin/python benchmarks/own_data_quality.py --train data/own/train.tsv.gz --val data/own/val.tsv.gz
    .venv/bin/python benchmarks/own_data_quality.py --train ... --val ... --tuned real_tune1 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import cpu_model, describe  # noqa: E402
from pipeline.metrics.keys import of_split  # noqa: E402

BEFORE = [
    "data.global_batch_size=2048",
    "trainer.num_epochs=1",
    "optimizer.warmup_steps=100",
    "data.min_id_frequency=1",
    "trainer.restore_best=false",
    "trainer.eval_every_steps=200",
]


def train(name: str, args: argparse.Namespace, overrides: list[str], nproc: int) -> dict:
    run_dir = Path(args.workdir) / name
    cmd = [
        "bash",
        str(ROOT / "launch.sh"),
        "train",
        "data=files",
        f"data.train_files=[{args.train}]",
        f"data.val_files=[{args.val}]",
        f"data.processed_dir={args.workdir}/processed",
        f"hydra.run.dir={run_dir}",
        "logger.progress_bar=false",
        "logger.report=false",
        "trainer.run_doctor=false",
        *overrides,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "NPROC": str(nproc), "PIPELINE_RUN_ID": name}, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        **of_split(summary["final"], "val"),
        "seconds": time.perf_counter() - t0,
        "steps": summary["steps"],
        "batch": summary["global_batch_size"],
        "epochs": round(summary["epochs"], 2),
    }


def _read(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, dense [n, 13] (log1p, missing 0) and categorical hashes [n, 26] (missing 0) of a raw file."""
    opener = gzip.open if path.endswith(".gz") else open
    labels, dense, cats = [], [], []
    with opener(path, "rt") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            labels.append(int(p[0]))
            dense.append([np.log1p(max(int(v), 0)) if v else 0.0 for v in p[1:14]])
            cats.append([int(v, 16) if v else 0 for v in p[14:40]])
    return np.array(labels, np.float32), np.array(dense, np.float32), np.array(cats, np.int64)


def logistic_regression(args: argparse.Namespace, epochs: int = 3, buckets: int = 1 << 20) -> dict:
    """Hashed logistic regression: one weight per (field, value) bucket and per dense-value bucket."""
    import torch

    from pipeline.metrics.functional import binary_metrics

    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = {}
    for split, path in (("train", args.train), ("val", args.val)):
        y, dense, cats = _read(path)
        dense_ids = np.floor(dense * 4).astype(np.int64)  # quarter-log buckets of each count
        fields = np.concatenate([cats, dense_ids], axis=1)
        keys = (fields * 1_000_003 + np.arange(fields.shape[1]) * 7_919) % buckets
        data[split] = (torch.from_numpy(keys), torch.from_numpy(y))
    bag = torch.nn.EmbeddingBag(buckets, 1, mode="sum")
    torch.nn.init.zeros_(bag.weight)
    bias = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adagrad([bag.weight, bias], lr=0.05)
    keys, y = data["train"]
    best = None
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(128):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(bag(keys[idx]).squeeze(1) + bias, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            vk, vy = data["val"]
            m = binary_metrics(torch.sigmoid(bag(vk).squeeze(1) + bias), vy)
        if best is None or m.logloss < best.logloss:
            best = m
    return {
        "auc": best.auc,
        "logloss": best.logloss,
        "calibration": best.calibration,
        "seconds": time.perf_counter() - t0,
        "steps": None,
        "batch": 128,
        "epochs": None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training file (raw Criteo layout, .gz ok)")
    p.add_argument("--val", required=True, help="validation file")
    p.add_argument("--tuned", default=None, help="a configs/tuned/<name>.yaml written by ./launch.sh tune")
    p.add_argument("--seeds", default="0", help="comma-separated trainer.seed values for (a) at 1 rank")
    p.add_argument("--workdir", default="/tmp/own_data_quality")
    a = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, dict]] = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        rows.append(
            (f"(a) defaults, 1 rank, seed {seed}", train(f"defaults_1r_s{seed}", a, [f"trainer.seed={seed}"], 1))
        )
    rows.append(("(a) defaults, 2 ranks", train("defaults_2r", a, [], 2)))
    rows.append(("(b) before: batch 2048, 1 epoch", train("before_1r", a, BEFORE, 1)))
    if a.tuned:
        rows.append((f"(c) +tuned={a.tuned}", train(f"tuned_{a.tuned}", a, [f"+tuned={a.tuned}"], 1)))
    rows.append(("(d) hashed logistic regression", logistic_regression(a)))
    y = _read(a.train)[0]
    vy = _read(a.val)[0]
    rate = float(y.mean())
    constant = float(-(vy * np.log(rate) + (1 - vy) * np.log(1 - rate)).mean())
    print(
        f"{cpu_model()}, {os.cpu_count()} vCPUs; {time.strftime('%Y-%m-%d')}; "
        f"train {a.train} ({len(y):,} rows, click rate {rate:.3f}), "
        f"val {a.val} ({len(vy):,} rows)"
    )
    print(f"constant-rate val logloss {constant:.4f}")
    print(
        f"{'contender':40s} {'val auc':>8s} {'logloss':>8s} {'gain':>7s} {'calib':>6s} {'batch':>6s} "
        f"{'epochs':>6s} {'seconds':>8s}"
    )
    for name, r in rows:
        print(
            f"{name:40s} {r['auc']:8.4f} {r['logloss']:8.4f} {constant - r['logloss']:7.4f} {r['calibration']:6.3f} "
            f"{r['batch']:>6} {str(r['epochs'] or '-'):>6s} {r['seconds']:8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
