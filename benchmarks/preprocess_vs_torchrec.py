"""Preprocessing speed: this pipeline vs TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` on one file; with
``--multi-hot``, on multi-hot rows vs pandas and pyarrow.

Generates one raw Criteo-format file (the synthetic generator, seeded) and converts it with both, in
one run, alternating them ``--repeats`` times (each conversion in a fresh process, timed without
imports), and prints the rows/s of each and the ratio.

    .venv/bin/python benchmarks/preprocess_vs_torchrec.py                 # 500k rows
    .venv/bin/python benchmarks/preprocess_vs_torchrec.py --rows 2000000 --repeats 3
    .venv/bin/python benchmarks/preprocess_vs_torchrec.py --multi-hot fixed       # 100k MLPerf-shaped rows
    .venv/bin/python benchmarks/preprocess_vs_torchrec.py --multi-hot variable

Both produce dense float32, categorical ids and labels on disk. Ours does more per row (validation
with bad-row accounting, hashing ids modulo the cap, a seeded train/val/test split, sha256 of every
output), with the defaults users get: ``data.id_mode=hash``, ``data.dense_transform=log1p``, and the
allocator setting ``./launch.sh preprocess`` and training apply (``trainer.keep_freed_memory``).

``--multi-hot fixed|variable``: the file is MLPerf-shaped (benchmarks/_mlperf_data.py: every categorical
field a list of 8-hex-digit ids, MLPerf DLRM-DCNv2's bag sizes, or lengths uniform in 1..those sizes),
declared to ours by ``data.multi_hot_columns``, and TorchRec's converter (one id per field) gives way to:

    pandas   pandas.read_csv (C engine, categoricals as str), then per list column the way a user writes it:
             ``.str.split(",")``, ``.str.len()`` for the lengths, ``.explode().map(lambda x: int(x, 16))``
             for the ids; only the first --pandas-rows rows (nrows=), rows/s is over those
    pyarrow  pyarrow.csv.read_csv (threads on, categoricals as string), then per list column
             ``pyarrow.compute.split_pattern``, ``list_value_length``, ``list_flatten`` and the 8-digit hex
             ids decoded in numpy from the flattened buffer (two digits a table lookup): no Python per id

Both stop at arrays in memory (labels, dense int64, per list column lengths and uint32 ids); ours is the
whole ``preprocess()`` (parse, validate, hash, split, write the binary parts, sha256, manifest).
"""

from __future__ import annotations

import argparse
import importlib.util
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
from benchmarks._mlperf_data import LENGTHS, MLPERF_BAG_SIZES, mean_ids_per_row, write_raw  # noqa: E402
from pipeline.config import DataConfig, IdMode, SplitMode, SyntheticConfig  # noqa: E402
from pipeline.data.generators import synthetic  # noqa: E402
from pipeline.data.preprocess import preprocess  # noqa: E402
from pipeline.distributed.env import keep_freed_memory  # noqa: E402

HASH_CAP = 10_000_000  # rows per table in hash mode (ids 1 + hash % (cap - 1))


_NAMES = ["label", *[f"I{i + 1}" for i in range(13)], *[f"C{j + 1}" for j in range(len(MLPERF_BAG_SIZES))]]
_LISTS = _NAMES[14:]


def _pandas_lists(src: Path, nrows: int) -> int:
    """pandas as a user writes it: read_csv, then split, explode and int(x, 16) per list column; returns the ids."""
    import numpy as np
    import pandas as pd

    df = pd.read_csv(src, sep="\t", header=None, names=_NAMES, dtype={c: str for c in _LISTS}, nrows=nrows)
    labels = df["label"].to_numpy(np.int8)  # noqa: F841 - the output a user keeps
    dense = df[_NAMES[1:14]].fillna(0).to_numpy(np.int64)  # noqa: F841
    total = 0
    for c in _LISTS:
        lists = df[c].str.split(",")
        lengths = lists.str.len().fillna(0).to_numpy(np.int32)  # noqa: F841
        ids = lists.explode().dropna().map(lambda x: int(x, 16)).to_numpy(np.uint32)
        total += len(ids)
    return total


def _pyarrow_lists(src: Path) -> int:
    """pyarrow's CSV reader and compute kernels, the ids decoded in numpy; returns the ids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    nibble = np.full(256, 0xFF, np.uint16)
    nibble[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
    nibble[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
    first, second = np.meshgrid(nibble, nibble, indexing="ij")
    pairs = np.where((first > 15) | (second > 15), 0xFFFF, (first << 4) | second).T.ravel()  # [c0 | c1 << 8]

    table = pacsv.read_csv(
        src,
        read_options=pacsv.ReadOptions(column_names=_NAMES),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in _LISTS}),
    )
    labels = table["label"].to_numpy()  # noqa: F841 - the output a user keeps
    dense = np.column_stack([pc.fill_null(table[c], 0).to_numpy() for c in _NAMES[1:14]])  # noqa: F841
    total = 0
    for c in _LISTS:
        lists = pc.split_pattern(table[c].combine_chunks(), ",")
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()  # noqa: F841
        flat = pc.list_flatten(lists)
        offsets = np.frombuffer(flat.buffers()[1], np.int32, count=len(flat) + 1, offset=flat.offset * 4)
        if not (np.diff(offsets) == 8).all():
            raise ValueError(f"{c}: an id that is not 8 characters")
        digits = np.frombuffer(flat.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        two = pairs[digits.view("<u2")]
        if two.max(initial=0) > 0xFF:
            raise ValueError(f"{c}: an id that is not hex")
        ids = two.astype(np.uint8).view(">u4").astype(np.uint32)
        total += len(ids)
    return total


def _convert_once(contender: str, src: Path, out: Path, block_size_mb: int, nrows: int = 0) -> float:
    """One conversion in this (fresh) process; returns its seconds (imports and set-up excluded)."""
    out.mkdir(parents=True)
    if contender in ("pandas", "pyarrow"):
        import numpy  # noqa: F401 - imported before the clock, as for the others
        import pyarrow.compute  # noqa: F401
        import pyarrow.csv  # noqa: F401

        if contender == "pandas":
            import pandas  # noqa: F401

        t0 = time.perf_counter()
        _pandas_lists(src, nrows) if contender == "pandas" else _pyarrow_lists(src)
        return time.perf_counter() - t0
    if contender in ("ours", "ours_lists"):
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
            multi_hot_columns={c: 0 for c in _LISTS} if contender == "ours_lists" else {},
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
    parser.add_argument("--rows", type=int, default=None, help="rows in the generated file (500k; 100k multi-hot)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, alternating")
    parser.add_argument(
        "--multi-hot",
        choices=LENGTHS,
        default=None,
        help="MLPerf-shaped multi-hot rows (fixed bag sizes or lengths up to them): ours vs pandas and pyarrow",
    )
    parser.add_argument(
        "--pandas-rows", type=int, default=20_000, help="--multi-hot: rows pandas converts (the file's first)"
    )
    parser.add_argument("--block-size-mb", type=int, default=DataConfig.block_size_mb)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--one", nargs=2, metavar=("CONTENDER", "SRC"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.rows is None:
        args.rows = 100_000 if args.multi_hot else 500_000
    print(f"machine: {describe()}", flush=True)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Local function is not supported by pickle")
    if args.one:
        contender, src = args.one
        print(_convert_once(contender, Path(src), Path(args.workdir), args.block_size_mb, args.pandas_rows))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pp_"))
    t = time.perf_counter()
    if args.multi_hot:
        src = write_raw(work / "raw" / "train.tsv", args.rows, seed=0, lengths=args.multi_hot)
        what = f"MLPerf-shaped multi-hot ({args.multi_hot} lengths, {mean_ids_per_row(args.multi_hot):.0f} ids a row)"
        contenders = ("ours_lists", "pandas", "pyarrow")
        if importlib.util.find_spec("pandas") is None:  # not one of the project's requirements
            print("pandas is not installed (pip install pandas): its contender is left out")
            contenders = ("ours_lists", "pyarrow")
    else:
        synthetic.generate(
            SyntheticConfig(num_train_rows=args.rows, num_val_rows=1, num_test_rows=1, max_cardinality=100_000, seed=0),
            work / "raw",
        )
        src = work / "raw" / "train.tsv"
        what = "Criteo-format"
        contenders = ("ours", "torchrec")
    os.sync()  # the generated file is on disk: no writeback of it competes with the first timed run
    print(
        f"generated {args.rows:,} {what} rows ({src.stat().st_size / 2**20:.0f} MiB) in "
        f"{time.perf_counter() - t:.1f}s: {src}"
    )
    num_rows = {c: min(args.pandas_rows, args.rows) if c == "pandas" else args.rows for c in contenders}

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
                "--pandas-rows",
                str(num_rows[contender]),
            ],
            capture_output=True,
            text=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        if child.returncode != 0:
            sys.exit(f"{contender} run failed:\n{child.stderr}")
        return float(child.stdout.strip().splitlines()[-1])

    times: dict[str, list[float]] = {c: [] for c in contenders}
    for i in range(args.repeats):
        for name in contenders:
            times[name].append(run(name, i))
            print(
                f"  run {i + 1} {name.removesuffix('_lists'):9s} {times[name][-1]:7.2f}s  "
                f"{num_rows[name] / times[name][-1]:>12,.0f} rows/s"
                f"  ({num_rows[name]:,} rows)",
                flush=True,
            )
    rate = {k: num_rows[k] / statistics.median(v) for k, v in times.items()}
    if args.multi_hot:
        ours = rate["ours_lists"]
        others = [c for c in contenders if c != "ours_lists"]
        print(
            f"\nrows/s (median of {args.repeats}, each run a fresh process):  ours (preprocess) {ours:,.0f}   "
            + "   ".join(f"{c} {rate[c]:,.0f}" for c in others)
        )
        print("   ".join(f"ratio ours/{c} {ours / rate[c]:.2f}x" for c in others))
    else:
        print(
            f"\nrows/s (median of {args.repeats}, each run a fresh process):  ours {rate['ours']:,.0f}   "
            f"torchrec tsv_to_npys {rate['torchrec']:,.0f}   ratio {rate['ours'] / rate['torchrec']:.1f}x"
        )
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
