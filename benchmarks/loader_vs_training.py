"""Loader speed against training speed: the loader must never be what training waits for.

In one run: prepares a dataset (as the main job does: generator -> raw TSV -> preprocess), then for each
batch size measures the loader alone (memory-mapped split -> TorchRec ``Batch`` with the KJT built, the
exact path training uses: ``BinarySplit`` + ``train_batches``, shuffled rows) and trains the model on one
rank for ``--steps`` steps through the real ``Trainer``, and prints both samples/s and the ratio.
Training throughput is the median of its log windows after the first (warm-up).

    .venv/bin/python benchmarks/loader_vs_training.py                  # synthetic Criteo, the paper's DLRM
    .venv/bin/python benchmarks/loader_vs_training.py --batch-size 2048,8192 --steps 30
    .venv/bin/python benchmarks/loader_vs_training.py --mlperf          # multi-hot, DCNv2, batch 2048 and 8192

``--mlperf``: MLPerf-shaped multi-hot rows (benchmarks/_mlperf_data.py: every categorical field a bag of
MLPerf DLRM-DCNv2's sizes, 214 ids a row; ``--lengths variable``: 1..those sizes), every column declared
in ``data.multi_hot_columns`` and hashed into 26 tables of --table-rows rows, and the model of
``train_throughput.py --mlperf`` (``model=dcn_criteo`` at --dim 64, 3 cross layers of rank --dcn-rank 128,
top --top 512-256-1, SGD): the loader then builds KJTs of 214 ids a sample.
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
from benchmarks._mlperf_data import LENGTHS, mean_ids_per_row, multi_hot_override, write_raw  # noqa: E402


def data_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """The data and model overrides (writing the MLPerf-shaped raw files first with --mlperf)."""
    if not args.mlperf:
        return [
            "model=dlrm_criteo",
            "data=synthetic",
            f"data.raw_dir={work}/raw",
            f"data.processed_dir={work}/processed",
            f"data.synthetic.num_train_rows={args.rows}",
            "data.synthetic.num_val_rows=8192",
            "data.synthetic.num_test_rows=8192",
        ]
    t = time.perf_counter()
    files = {
        split: write_raw(work / "raw" / f"{split}.tsv", n, seed=seed, lengths=args.lengths)
        for split, n, seed in (("train", args.rows, 0), ("val", 8192, 1), ("test", 8192, 2))
    }
    print(f"wrote {args.rows:,} MLPerf-shaped training rows in {time.perf_counter() - t:.1f}s", flush=True)
    return [
        "model=dcn_criteo",
        f"model.embedding_dim={args.dim}",
        f"model.over_arch_layer_sizes=[{args.top}]",
        "model.dcn_num_layers=3",
        f"model.dcn_low_rank_dim={args.dcn_rank}",
        "optimizer=sgd",
        "optimizer.lr=0.01",
        "optimizer.warmup_steps=0",
        "data=files",
        f"data.raw_dir={work}/raw",
        f"data.processed_dir={work}/processed",
        *(f"data.{split}_files=[{path}]" for split, path in files.items()),
        "data.id_mode=hash",
        f"data.max_ids_per_feature={args.table_rows}",
        multi_hot_override(),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="training rows to generate (300k; 200k --mlperf)")
    parser.add_argument(
        "--batch-size", default=None, help="global batch sizes, comma-separated, 1 rank (2048; 2048,8192 --mlperf)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps to time (40; 20 --mlperf)")
    parser.add_argument("--loader-batches", type=int, default=100, help="loader batches to time")
    parser.add_argument("--mlperf", action="store_true", help="MLPerf-shaped multi-hot data and DCNv2 (see above)")
    parser.add_argument("--lengths", choices=LENGTHS, default="fixed", help="--mlperf: the bags' lengths")
    parser.add_argument("--table-rows", type=int, default=100_000, help="--mlperf: rows per table (hashed)")
    parser.add_argument("--dim", type=int, default=64, help="--mlperf: embedding dimension")
    parser.add_argument("--dcn-rank", type=int, default=128, help="--mlperf: rank of each of the 3 cross layers")
    parser.add_argument("--top", default="512,256,1", help="--mlperf: top MLP")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    args.rows = args.rows or (200_000 if args.mlperf else 300_000)
    args.steps = args.steps or (20 if args.mlperf else 40)
    batch_sizes = [int(b) for b in (args.batch_size or ("2048,8192" if args.mlperf else "2048")).split(",")]
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
    base = data_overrides(args, work)
    results = []
    for batch_size in batch_sizes:
        overrides = [
            *base,
            f"data.global_batch_size={batch_size}",
            f"data.eval_global_batch_size={batch_size}",
            f"trainer.max_steps={args.steps}",
            "trainer.eval_every_steps=0",
            "trainer.run_doctor=false",
            "logger.progress_bar=false",
            "logger.log_every_steps=5",
            "checkpoint.every_steps=0",
            "checkpoint.save_at_end=false",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "pipeline" / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("train", overrides=overrides))
        t = time.perf_counter()
        manifest = prepare_data(cfg.data)
        print(
            f"data ready in {time.perf_counter() - t:.1f}s: {manifest.splits['train'].num_rows:,} training rows",
            flush=True,
        )

        split = BinarySplit(cfg.data.processed_dir, "train", manifest)
        batches = train_batches(split, batch_size, 0, 1, seed=0, shuffle=True)
        for _ in range(5):
            next(batches)
        t = time.perf_counter()
        for _ in range(args.loader_batches):
            b = next(batches)
        loader_rate = args.loader_batches * batch_size / (time.perf_counter() - t)
        assert b.labels.numel() == batch_size
        ids_per_sample = b.sparse_features.values().numel() / batch_size

        torch.set_num_threads(os.cpu_count())
        run = work / f"run_b{batch_size}"
        run.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, run)
        try:
            trainer.train()
        finally:
            trainer.close()
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        windows = [e["train/samples_per_s"] for e in events if e["event"] == "train"][1:]
        train_rate = statistics.median(windows)
        results.append((batch_size, loader_rate, train_rate, ids_per_sample, len(windows)))

    model = (
        f"dcn_criteo dim {args.dim}, 3 cross layers of rank {args.dcn_rank}, top {args.top}"
        if args.mlperf
        else "dlrm_criteo"
    )
    data = (
        f"MLPerf-shaped multi-hot, {args.lengths} lengths ({mean_ids_per_row(args.lengths):.0f} ids a row)"
        if args.mlperf
        else "synthetic Criteo, one id per feature"
    )
    print(f"\n{data}; {model}; 1 rank, {os.cpu_count()} threads")
    for batch_size, loader_rate, train_rate, ids, n in results:
        print(f"batch {batch_size}")
        print(
            f"  loader    {loader_rate:>12,.0f} samples/s  ({args.loader_batches} batches, shuffled rows, KJT built, "
            f"{ids:.0f} ids a sample)"
        )
        print(f"  training  {train_rate:>12,.0f} samples/s  (median of {n} windows of 5 steps)")
        print(f"  ratio     {loader_rate / train_rate:>12.1f}x")


if __name__ == "__main__":
    main()
