"""MLPerf multi-hot materialisation speed: one-hot rows -> bags of 214 ids (``pipeline/data/materialize.py``).

In one run: writes a one-hot source of ``--rows`` rows (MLPerf's 26 table sizes, ids uniform over each
table, int32, one part) the way preprocessing lays it out, then times (a) the compiled bag kernel alone over
blocks of the size materialisation uses, (b) the whole materialisation (kernel, copy of dense and labels,
writes, sha256, fsync) into a fresh folder, and prints rows/s and output MB/s of each and their ratio.
The output is about 1 KB a row (214 int32 ids, 26 int32 lengths, an offset, dense, label).

    .venv/bin/python benchmarks/materialize_speed.py
    .venv/bin/python benchmarks/materialize_speed.py --rows 4000000 --workdir /big/disk
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402

MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
MLPERF_TABLES = [40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209, 11938]
MLPERF_TABLES += [155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36]


def write_source(out: Path, rows: int, seed: int = 0) -> None:
    """A one-hot preprocessed folder: one part holding ``rows`` training rows and a small val split."""
    from pipeline.data.manifest import Manifest, SplitInfo
    from pipeline.data.parts import SplitWriter
    from pipeline.data.schema import CRITEO

    rng = np.random.default_rng(seed)
    splits = {s: SplitInfo() for s in ("train", "val", "test")}
    for split, n in (("train", rows), ("val", 10_000)):
        writer = SplitWriter(out, f"parts/{'000' if split == 'train' else '001'}/{split}", np.int32, CRITEO)
        for lo in range(0, n, 1 << 20):
            b = min(1 << 20, n - lo)
            ids = np.stack([rng.integers(0, t, b, dtype=np.int32) for t in MLPERF_TABLES], axis=1)
            writer.write(rng.random((b, 13), dtype=np.float32), ids, rng.integers(0, 2, b).astype(np.uint8))
        info = writer.close()
        splits[split].num_rows = n
        splits[split].parts.append(info)
    Manifest(
        settings={"id_mode": "hash", "benchmark": "materialize_speed"},
        sources=[],
        splits=splits,
        schema=CRITEO,
        num_embeddings_per_feature=list(MLPERF_TABLES),
        id_caps=list(MLPERF_TABLES),
    ).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="training rows of the one-hot source")
    parser.add_argument("--workdir", default=None, help="folder for the source and output (about 1.1 KB a row)")
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.config import MaterializeConfig
    from pipeline.data import materialize as mat

    work = Path(args.workdir or tempfile.mkdtemp(prefix="materialize_speed_"))
    source, out = work / "source", work / "bags"
    write_source(source, args.rows)
    spec = MaterializeConfig(source_dir=str(source), sizes=MLPERF_SIZES)
    rule = mat.BagRule(tuple(MLPERF_SIZES), tuple(MLPERF_TABLES))
    rule.bags(np.zeros((1, 26), np.int32))  # compile (or load the cache) outside the timings
    sparse = np.memmap(source / "parts/000/train/sparse.bin", np.int32, "r", shape=(args.rows, 26))
    block = (64 << 20) // (4 * (sum(MLPERF_SIZES) + 26) + 8 + 52 + 1)  # materialize()'s block at 64 MB
    t = time.perf_counter()
    for lo in range(0, args.rows, block):
        rule.bags(np.asarray(sparse[lo : lo + block]))
    kernel_s = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    manifest = mat.materialize(source, out, spec)
    whole_s = time.perf_counter() - t
    total = manifest.rows("train") + manifest.rows("val")
    out_bytes = sum(f.stat().st_size for f in (out / "parts").rglob("*.bin"))
    print(f"rows: {args.rows:,} train + 10,000 val; output {out_bytes / 1e9:.2f} GB ({out_bytes / total:,.0f} B/row)")
    print(f"{'contender':44s} {'rows/s':>12s} {'MB/s out':>10s}")
    print(f"{'(a) bag kernel alone (1 thread)':44s} {args.rows / kernel_s:>12,.0f} {'':>10s}")
    rate = out_bytes / whole_s / 1e6
    print(f"{'(b) materialize(): kernel, writes, sha256':44s} {total / whole_s:>12,.0f} {rate:>10,.0f}")
    print(f"ratio (a)/(b): {(args.rows / kernel_s) / (total / whole_s):.2f}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
