"""Preprocessing speed: this pipeline vs TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` on one file.

Generates one raw Criteo-format file (the synthetic generator, seeded) and converts it with both, in
one run, alternating them ``--repeats`` times, and prints the rows/s of each and the ratio.

    .venv/bin/python benchmarks/preprocess_vs_torchrec.py                 # 500k rows
    .venv/bin/python benchmarks/preprocess_vs_torchrec.py --rows 2000000 --repeats 3

Both produce dense float32, categorical ids and labels on disk. Ours does more per row (validation
with bad-row accounting, hashing ids modulo the cap, a seeded train/val/test split, sha256 of every
output), with the defaults users get: ``data.id_mode=hash``, ``data.dense_transform=log1p``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import DataConfig, IdMode, SplitMode, SyntheticConfig  # noqa: E402
from pipeline.data import synthetic  # noqa: E402
from pipeline.data.preprocess import preprocess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000, help="rows in the generated file")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each contender, alternating")
    parser.add_argument("--block-size-mb", type=int, default=DataConfig.block_size_mb)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Local function is not supported by pickle")
    from torchrec.datasets.criteo import BinaryCriteoUtils

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pp_"))
    t = time.perf_counter()
    synthetic.generate(SyntheticConfig(num_train_rows=args.rows, num_val_rows=1, num_test_rows=1,
                                       max_cardinality=100_000, seed=0), work / "raw")
    src = work / "raw" / "train.tsv"
    print(f"generated {args.rows:,} rows ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s: {src}")

    def ours(i: int) -> float:
        out = work / f"ours{i}"
        cfg = DataConfig(name="bench", raw_dir=str(work / "raw"), processed_dir=str(out), split=SplitMode.random,
                         raw_files=[str(src)], id_mode=IdMode.hash, block_size_mb=args.block_size_mb)
        t0 = time.perf_counter()
        preprocess(cfg)
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        return dt

    def torchrec(i: int) -> float:
        out = work / f"torchrec{i}"
        out.mkdir()
        t0 = time.perf_counter()
        BinaryCriteoUtils.tsv_to_npys(str(src), str(out / "dense.npy"), str(out / "sparse.npy"), str(out / "labels.npy"))
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        return dt

    times: dict[str, list[float]] = {"ours": [], "torchrec": []}
    for i in range(args.repeats):
        for name, fn in (("ours", ours), ("torchrec", torchrec)):
            times[name].append(fn(i))
            print(f"  run {i + 1} {name:9s} {times[name][-1]:7.2f}s  {args.rows / times[name][-1]:>12,.0f} rows/s", flush=True)
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    print(f"\nrows/s (median of {args.repeats}):  ours {rate['ours']:,.0f}   torchrec tsv_to_npys {rate['torchrec']:,.0f}"
          f"   ratio {rate['ours'] / rate['torchrec']:.1f}x")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
