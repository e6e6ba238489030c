"""Loader speed against training speed: the loader must never be what training waits for.

In one run: prepares a synthetic dataset (generator -> raw TSV -> preprocess, as the main job does),
measures the loader alone (memory-mapped split -> TorchRec ``Batch`` with a 26-key KJT, the exact
path training uses) at the training batch size, then trains the paper's model (``model=dlrm_criteo``)
on one rank for ``--steps`` steps through the real ``Trainer``, and prints both samples/s and the
ratio. Training throughput is the median of its log windows after the first (warm-up).

    .venv/bin/python benchmarks/loader_vs_training.py
    .venv/bin/python benchmarks/loader_vs_training.py --batch-size 8192 --steps 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="training rows to generate")
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch size (1 rank)")
    parser.add_argument("--steps", type=int, default=40, help="training steps to time")
    parser.add_argument("--loader-batches", type=int, default=100, help="loader batches to time")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import register_configs
    from pipeline.data.loader import BinarySplit, train_batches
    from pipeline.data.prepare import prepare_data
    from pipeline.resolvers import register_resolvers
    from pipeline.trainer import Trainer

    register_resolvers()
    register_configs()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    overrides = [
        "model=dlrm_criteo",
        "data=synthetic",
        f"data.raw_dir={work}/raw",
        f"data.processed_dir={work}/processed",
        f"data.synthetic.num_train_rows={args.rows}",
        "data.synthetic.num_val_rows=8192",
        "data.synthetic.num_test_rows=8192",
        f"data.global_batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every_steps=0",
        "trainer.run_doctor=false",
        "logger.progress_bar=false",
        "logger.log_every_steps=5",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "pipeline" / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    t = time.perf_counter()
    manifest = prepare_data(cfg.data)
    print(f"data ready in {time.perf_counter() - t:.1f}s: {manifest.splits['train'].num_rows:,} training rows")

    split = BinarySplit(cfg.data.processed_dir, "train", manifest)
    batches = train_batches(split, args.batch_size, 0, 1, seed=0, shuffle=True)
    for _ in range(5):
        next(batches)
    t = time.perf_counter()
    for _ in range(args.loader_batches):
        b = next(batches)
    loader_rate = args.loader_batches * args.batch_size / (time.perf_counter() - t)
    assert b.labels.numel() == args.batch_size

    torch.set_num_threads(os.cpu_count())
    (work / "run").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, work / "run")
    try:
        trainer.train()
    finally:
        trainer.close()
    events = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [e["train/samples_per_s"] for e in events if e["event"] == "train"][1:]
    train_rate = statistics.median(windows)
    print(f"\nbatch {args.batch_size}, 1 rank, {os.cpu_count()} threads")
    print(f"loader    {loader_rate:>12,.0f} samples/s  ({args.loader_batches} batches, shuffled rows, KJT built)")
    print(f"training  {train_rate:>12,.0f} samples/s  (dlrm_criteo, median of {len(windows)} windows of 5 steps)")
    print(f"ratio     {loader_rate / train_rate:>12.1f}x")


if __name__ == "__main__":
    main()
