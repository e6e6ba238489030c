"""What int8 tables and bf16 scoring cost: the same trained model exported in float32 and with ``--quantize
int8``, each scored in fp32 and with ``--precision bf16``, on the same rows, side by side.

In one run: generates a synthetic dataset (``data=synthetic``, a known optimum), trains the paper's model
(``model=dlrm_criteo``) on it as users run it (``./launch.sh train``), exports the final checkpoint twice
(``./launch.sh export``: float32 tables, then int8 row-wise tables) and scores the preprocessed
test split with each export (``pipeline.predict``), in fp32 and in bf16. Prints each one's test AUC, logloss
and calibration, their differences from float32's, the per-row probability difference (largest and mean),
the weights file size and the scoring rate.

Then the serving speed at ``--batch`` rows, contenders alternated over ``--rounds``: ``predict`` of each
export (fp32 and bf16) on ready arrays (dense features and table ids: looked up, scored) against a
plain-PyTorch forward of the same model (``benchmarks/_contenders.py``'s ``PlainDLRM`` holding the export's
weights, its logits checked against the export's); and end to end from the raw test TSV (``predict_raw``:
parse, transform, score) beside the same file's preprocessing alone (parse and transform, no model).

Every contender runs in this one process, so all share one allocator setting: ``load_exported``'s (glibc
keeps freed memory, as in training); ``--glibc-defaults`` loads with ``keep_freed_memory=False`` instead,
which is how a plain-PyTorch script runs.

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
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402
from benchmarks._runs import fresh_run_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="training rows to generate (one epoch is trained)")
    parser.add_argument("--eval-rows", type=int, default=50_000, help="val and test rows each")
    parser.add_argument("--nproc", type=int, default=1, help="training ranks")
    parser.add_argument("--max-steps", type=int, default=None, help="train at most this many steps (default: the run)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--batch", type=int, default=8192, help="rows per forward in the speed comparison")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of the speed comparison")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's allocator as it is (load_exported(keep_freed_memory=False))",
    )
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    allocator = "glibc defaults" if args.glibc_defaults else "freed memory kept (load_exported's default)"
    print(f"allocator, every contender: {allocator}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_int8_"))
    run_dir = fresh_run_dir(work / "run")
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
        *([f"trainer.max_steps={args.max_steps}"] if args.max_steps else []),
    ]
    env = {**os.environ, "NPROC": str(args.nproc), "PIPELINE_RUN_ID": "int8_bench"}
    proc = subprocess.run(["./launch.sh", "train", *train], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"training failed (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
        return 1

    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    results, models, specs = {}, {}, {}
    for name, quantize, precision in (
        ("float32", "none", "fp32"),
        ("int8", "int8", "fp32"),
        ("f32 bf16", "none", "bf16"),
        ("int8 bf16", "int8", "bf16"),
    ):
        out = work / f"export_{quantize}"
        if quantize not in specs:
            specs[quantize] = export(run_dir, out, quantize=quantize, dense_program=False)
        spec = specs[quantize]
        model = models[name] = load_exported(out, precision, keep_freed_memory=not args.glibc_defaults)
        t = time.perf_counter()
        res = run(model, str(work / f"test_{name.replace(' ', '_')}.npy"), split="test")
        seconds = time.perf_counter() - t
        results[name] = {
            "auc": res.metrics["auc"],
            "logloss": res.metrics["logloss"],
            "calibration": res.metrics["calibration"],
            "mib": spec["weights"]["bytes"] / 2**20,
            "rows_per_s": res.scored / seconds,
            "probs": np.load(work / f"test_{name.replace(' ', '_')}.npy"),
        }
    optimum = json.loads((work / "raw" / "optimum.json").read_text())["optimum"]["test"]
    print(
        f"model=dlrm_criteo data=synthetic, {args.rows:,} training rows "
        f"({f'at most {args.max_steps} steps' if args.max_steps else 'the run the rows choose'}), "
        f"{args.eval_rows:,} test rows, "
        f"{args.nproc} rank(s); data optimum test AUC {optimum['auc']:.4f}"
    )
    print(
        f"{'export':9s} {'test AUC':>9s} {'logloss':>8s} {'calib':>6s} {'d AUC':>8s} {'d logloss':>10s} "
        f"{'|dp| max':>9s} {'|dp| mean':>10s} {'weights':>9s} {'rows/s':>9s}"
    )
    base = results["float32"]
    for name, r in results.items():
        diff = np.abs(r["probs"] - base["probs"])
        print(
            f"{name:9s} {r['auc']:9.4f} {r['logloss']:8.4f} {r['calibration']:6.3f} {r['auc'] - base['auc']:+8.5f} "
            f"{r['logloss'] - base['logloss']:+10.5f} {diff.max():9.4f} {diff.mean():10.5f} {r['mib']:7.1f}Mi "
            f"{r['rows_per_s']:9,.0f}"
        )
    print(
        f"|dp|: per-row probability difference from float32; weights {base['mib'] / results['int8']['mib']:.2f}x "
        "smaller with int8 tables; bf16: the dense part under bfloat16 autocast (predict --precision bf16)"
    )
    serving_speed(models, work, args.batch, args.rounds)
    return 0


def plain_copy(model) -> torch.nn.Module:
    """``PlainDLRM`` (benchmarks/_contenders.py) holding an exported float32 DLRM's weights: the same model as
    a plain-PyTorch user writes it (its pairs read from the lower triangle, so the top MLP's first layer
    takes its interaction columns in that order)."""
    from benchmarks._contenders import NUM_TABLES, PlainDLRM

    dlrm = model.model
    ebc = dlrm.sparse_arch.embedding_bag_collection
    tables = {f: c.name for c in ebc.embedding_bag_configs() for f in c.feature_names}
    names = list(model.schema.feature_names)
    assert len(names) == NUM_TABLES, "the plain contender has Criteo's 26 tables"
    w0 = ebc.embedding_bags[tables[names[0]]].weight
    bottom = [p._linear for p in dlrm.dense_arch.model._mlp]  # noqa: SLF001
    top = [*(p._linear for p in dlrm.over_arch.model[0]._mlp), dlrm.over_arch.model[1]]  # noqa: SLF001
    plain = PlainDLRM(1, w0.shape[1], [m.out_features for m in bottom], [m.out_features for m in top])
    with torch.no_grad():
        for k, name in enumerate(names):  # the export's tables, each of its own size
            weight = ebc.embedding_bags[tables[name]].weight.detach().clone()
            plain.emb[k] = torch.nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", sparse=True)
        plain.bot.append(torch.nn.ReLU())  # TorchRec's DenseArch ends in a ReLU too
        for src, dst in zip(
            [*bottom, *top], [m for m in [*plain.bot, *plain.top] if isinstance(m, torch.nn.Linear)], strict=True
        ):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        # Ours: pairs (i, j), i < j, row-major (TorchRec's layout); plain: (i, j), i > j, from tril_indices.
        n, d = NUM_TABLES + 1, w0.shape[1]
        ours = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(*torch.triu_indices(n, n, 1).tolist(), strict=True))}
        order = [ours[(int(j), int(i))] for i, j in zip(plain.li.tolist(), plain.lj.tolist(), strict=True)]
        first = plain.top[0]
        first.weight.copy_(torch.cat([top[0].weight[:, :d], top[0].weight[:, d:][:, order]], dim=1))
    return plain.eval()


def serving_speed(models: dict, work: Path, batch: int, rounds: int) -> None:
    """predict (float32, int8) against a plain-PyTorch forward of the same model, rows/s alternated; then raw TSV
    end to end beside its preprocessing."""
    import statistics

    from pipeline.data.features import FeatureTransform
    from pipeline.data.loader import BinarySplit
    from pipeline.data.manifest import Manifest
    from pipeline.data.tsv import BadRows, read_blocks
    from pipeline.serving.predict import predict_raw

    f32 = models["float32"]
    processed = f32.spec["data"]["processed_dir"]
    manifest = Manifest.load(processed)
    features = FeatureTransform.from_manifest(manifest, processed, f32.spec["input"].get("min_id_frequency", 1))
    split = BinarySplit(processed, "test", manifest, features)  # ids as predict --split reads them
    rows = np.arange(min(batch, len(split)))
    dense, ids = split.gather("dense", rows), split.ids(rows)
    plain = plain_copy(f32)
    dense_t, ids_t = (
        torch.from_numpy(np.ascontiguousarray(dense)),
        torch.from_numpy(np.ascontiguousarray(ids.T).astype(np.int64)),
    )
    with torch.inference_mode():
        gap = (plain(dense_t, ids_t) - f32.logits(dense, ids)).abs().max().item()
    contenders = {
        "plain": lambda: torch.sigmoid(plain(dense_t, ids_t)),
        "float32": lambda: f32.predict(dense, ids),
        # The same export through TorchRec's EmbeddingBagCollection (a KJT, a bag per id, the outputs concatenated):
        # what predict ran before its row-gather lookup of one-hot tables.
        "f32 KJT": lambda: torch.sigmoid(
            f32.model(dense_features=torch.from_numpy(dense), sparse_features=f32.features.kjt(ids)).flatten()
        ),
        "int8": lambda: models["int8"].predict(dense, ids),
        "f32 bf16": lambda: models["f32 bf16"].predict(dense, ids),
        "int8 bf16": lambda: models["int8 bf16"].predict(dense, ids),
    }
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.inference_mode():
        for f in contenders.values():
            f()  # warm-up
        for _ in range(rounds):
            for k, f in contenders.items():
                t = time.perf_counter()
                f()
                seconds[k].append(time.perf_counter() - t)
    rate = {k: len(rows) / statistics.median(v) for k, v in seconds.items()}
    print(
        f"\nserving at batch {len(rows)}, {torch.get_num_threads()} threads, median of {rounds} alternated rounds "
        f"(plain = the same model in plain PyTorch; max |logit gap| {gap:.2e}):"
    )
    for k, r in rate.items():
        print(f"  {k:9s} {r:>10,.0f} rows/s  {r / rate['plain']:.2f}x plain")

    raw = work / "raw" / "test.tsv"
    runs: dict[str, list[float]] = {"preprocessing": [], "predict": [], "predict bf16": []}
    n = 0
    for _ in range(2):
        t = time.perf_counter()
        n = 0
        for block in read_blocks(raw, 8, "error", BadRows(), True, f32.schema):
            f32.features.dense(block)
            f32.features.map_ids(block)
            f32.features.map_lists(block)
            n += len(block)
        runs["preprocessing"].append(time.perf_counter() - t)
        t = time.perf_counter()
        scored = sum(len(p) for p, _ in predict_raw(f32, raw, True, batch_size=batch))
        runs["predict"].append(time.perf_counter() - t)
        assert scored == n
        t = time.perf_counter()
        scored = sum(len(p) for p, _ in predict_raw(models["f32 bf16"], raw, True, batch_size=batch))
        runs["predict bf16"].append(time.perf_counter() - t)
        assert scored == n
    pre, end, end_bf16 = (n / min(runs[k]) for k in ("preprocessing", "predict", "predict bf16"))
    print(
        f"raw TSV end to end ({n:,} rows of {raw.name}, best of 2): parse + transform + score {end:,.0f} rows/s "
        f"(float32), {end_bf16:,.0f} rows/s (bf16); parse + transform alone (preprocessing) {pre:,.0f} rows/s; "
        f"scoring takes {1 - end / pre:.0%} of the float32 time"
    )


if __name__ == "__main__":
    raise SystemExit(main())
