"""Preprocessing speed: this pipeline vs TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` on one file.

Generates one raw Criteo-format file (the synthetic generator, seeded) and converts it with both, in
one run, alternating them ``--repeats`` times (each conversion in a fresh process, timed without
imports), and prints the rows/s of each and the ratio.

    .venv/bin/python benchmarks/preprocess_vs_torchrec.py                 # 500k rows
    .venv/bin/python benchmarks/preprocess_vs_torchrec.py --rows 2000000 --repeats 3

Both produce dense float32, categorical ids and labels on disk. Ours does more per row (validation
with bad-row accounting, hashing ids modulo the cap, a seeded train/val/test split, sha256 of every
output), with the defaults users get: ``data.id_mode=hash``, ``data.dense_transform=log1p``, and the
allocator setting ``./launch.sh preprocess`` and training apply (``trainer.keep_freed_memory``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._machine import describe  # noqa: E402
from pipeline.config import DataConfig, IdMode, SplitMode, SyntheticConfig  # noqa: E402
from pipeline.data.generators import synthetic  # noqa: E402
from pipeline.data.preprocess import preprocess  # noqa: E402
from pipeline.distributed.env import keep_freed_memory  # noqa: E402

HASH_CAP = 10_000_000  # rows per table in hash mode (ids 1 + hash % (cap - 1))


def _convert_once(contender: str, src: Path, out: Path, block_size_mb: int) -> float:
    """One conversion in this (fresh) process; returns its seconds (imports and set-up excluded)."""
    out.mkdir(parents=True)
    if contender == "ours":
        keep_freed_memory()  # as ./launch.sh preprocess does
        cfg = DataConfig(
            name="bench",
            raw_dir=str(src.parent),
            processed_dir=str(out),
            split=SplitMode.random,
            raw_files=[str(src)],
            id_mode=IdMode.hash,
            max_ids_per_feature=HASH_CAP,  # a set cap: one pass (unset, the cap is counted from the data first)
            block_size_mb=block_size_mb,
        )
        t0 = time.perf_counter()
        preprocess(cfg)
        return time.perf_counter() - t0
    from torchrec.datasets.criteo import BinaryCriteoUtils

    t0 = time.perf_counter()
    BinaryCriteoUtils.tsv_to_npys(str(src), str(out / "dense.npy"), str(out / "sparse.npy"), str(out / "labels.npy"))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000, help="rows in the generated file")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, alternating")
    parser.add_argument("--block-size-mb", type=int, default=DataConfig.block_size_mb)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--one", nargs=2, metavar=("CONTENDER", "SRC"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Local function is not supported by pickle")
    if args.one:
        contender, src = args.one
        print(_convert_once(contender, Path(src), Path(args.workdir), args.block_size_mb))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pp_"))
    t = time.perf_counter()
    synthetic.generate(
        SyntheticConfig(num_train_rows=args.rows, num_val_rows=1, num_test_rows=1, max_cardinality=100_000, seed=0),
        work / "raw",
    )
    src = work / "raw" / "train.tsv"
    os.sync()  # the generated file is on disk: no writeback of it competes with the first timed run
    print(
        f"generated {args.rows:,} rows ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s: {src}"
    )

    def run(contender: str, i: int) -> float:
        # Each run in a fresh process: a converter's heap (TorchRec's holds GBs of Python objects) must
        # not slow the other down, and every run pays its own start-up, as a user's run does.
        out = work / f"{contender}{i}"
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                contender,
                str(src),
                "--workdir",
                str(out),
                "--block-size-mb",
                str(args.block_size_mb),
            ],
            capture_output=True,
            text=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        if child.returncode != 0:
            sys.exit(f"{contender} run failed:\n{child.stderr}")
        return float(child.stdout.strip().splitlines()[-1])

    times: dict[str, list[float]] = {"ours": [], "torchrec": []}
    for i in range(args.repeats):
        for name in ("ours", "torchrec"):
            times[name].append(run(name, i))
            print(
                f"  run {i + 1} {name:9s} {times[name][-1]:7.2f}s  {args.rows / times[name][-1]:>12,.0f} rows/s",
                flush=True,
            )
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    print(
        f"\nrows/s (median of {args.repeats}, each run a fresh process):  ours {rate['ours']:,.0f}   "
        f"torchrec tsv_to_npys {rate['torchrec']:,.0f}   ratio {rate['ours'] / rate['torchrec']:.1f}x"
    )
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
