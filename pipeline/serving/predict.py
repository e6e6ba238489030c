"""Score raw rows, or a preprocessed split, with an exported model: one probability per row.

    ./launch.sh predict --model <export dir> --input <raw TSV, plain or .gz> --out predictions.tsv
    ./launch.sh predict --model <export dir> --split val --out predictions_val.npy

``--input``: the training layout the export records (Criteo's: label + 13 integer + 26 categorical
fields, 40 in all; or the columns declared in ``data.dense_columns``/``data.sparse_columns``) or the same
without the label (39 fields for Criteo, the Kaggle test layout), detected from the first line
(``--layout`` forces one). The file is streamed in blocks through the same parser, dense transform and id mapping as
preprocessing (``read_blocks``, ``transform_dense``, ``IdMapper`` with the export's vocab.npz or
hash caps), so a row scores exactly as it did in the trainer's evaluation. Output rows follow input
lines one to one; with ``--bad-rows skip`` a malformed line scores NaN (and is counted) instead of
stopping the run. When the input has labels, the metrics (AUC, logloss, ...) are logged too.

``--split``: scores a split of preprocessed data (default: the export's ``data.processed_dir``), in
row order, like the trainer's ``predictions_<split>.npy``.

Output: ``.npy`` (float32 array), or text with one probability per line (``%.9g``: float32
round-trips exactly); ``-`` writes text to stdout. Runs in one process on the CPU without
``torch.distributed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DenseTransform
from pipeline.data.features import FeatureTransform, file_dense_min
from pipeline.data.jagged import Lists
from pipeline.data.schema import CRITEO, Schema
from pipeline.data.tsv import BadRows, RawDataError, open_raw, read_blocks
from pipeline.errors import ExportError
from pipeline.logs import setup_logging
from pipeline.serving.export import PRECISIONS, ExportedModel, load_exported

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 8192


from pipeline.errors import PredictError  # noqa: E402


@dataclass
class PredictResult:
    """What a prediction run produced (besides the output file)."""

    rows: int = 0  # output rows: input lines (raw) or split rows
    scored: int = 0  # rows with a probability (rows - bad rows)
    bad_rows: dict = field(default_factory=dict)  # raw input, --bad-rows skip: counts by kind and examples
    labelled: bool = False
    dense_min: int | None = None  # the torchrec transform's minimum, when used
    nonfinite_dense_rows: int = 0  # torchrec transform: rows with a feature below min - 1 (log of <= 0)
    seconds: float = 0.0  # reading, scoring and writing (the metrics come after)
    metrics: dict | None = None  # when labels are known


# -- raw input ------------------------------------------------------------------------------------
def detect_labelled(path: str | Path, max_lines: int = 1000, schema: Schema = CRITEO) -> bool:
    """True for the training layout (Criteo: 40 fields), False for the unlabelled one (39), from the first
    line with either count (malformed lines before it are left to the parser's bad-row policy).

    Raises:
        PredictError: none of the first lines has 39 or 40 fields.
    """
    with open_raw(path) as f:
        head = f.read(1 << 20)
        complete = len(head) < 1 << 20
    lines = head.split(b"\n")
    if not complete or lines[-1] == b"":
        lines.pop()  # possibly cut off, or after the final newline
    if not any(lines):
        return True  # empty: no rows to score either way
    seen = []
    num_fields = schema.num_fields
    for line in lines[:max_lines]:
        fields = line.rstrip(b"\r").count(b"\t") + 1
        if fields == num_fields:
            return True
        if fields == num_fields - 1:
            return False
        seen.append(fields)
    named = ", ".join(
        c[0] if len(c) == 1 else f"{c[0]}..{c[-1]}" for c in (schema.dense_columns, schema.sparse_columns) if c
    )
    raise PredictError(
        f"{path}: no line among the first {len(seen)} has {num_fields} tab-separated fields (label, "
        f"{named}) or {num_fields - 1} (no label); the first has {seen[0] if seen else 0}. "
        "--layout labelled|unlabelled forces one"
    )


def resolve_dense_min(
    model: ExportedModel, choice: str, path: str | Path, labelled: bool, block_size_mb: float, bad_rows: str
) -> int | None:
    """The minimum for the torchrec dense transform (None for log1p).

    ``train``: the minimum of the training file(s) preprocessing used (recorded at export);
    ``input``: the input file's own minimum (TorchRec's per-file converter, and what preprocessing did
    for a file of its own, e.g. val.tsv with data.split=files); or an integer.
    """
    inp = model.spec["input"]
    if DenseTransform(inp["dense_transform"]) != DenseTransform.torchrec:
        return None
    if choice == "input":
        return file_dense_min(path, model.schema, labelled, block_size_mb, bad_rows)
    if choice == "train":
        recorded = (inp.get("dense_min") or {}).get("train")
        if recorded is None:
            raise PredictError(
                f"{model.dir}: dense_transform=torchrec needs the training file minimum, which the "
                "export does not record (its processed data was not found at export time): pass "
                "--dense-min input (the input file's minimum) or --dense-min <integer>"
            )
        return int(recorded)
    try:
        return int(choice)
    except ValueError:
        raise PredictError(f"--dense-min {choice!r}: expected train, input or an integer") from None


def _score(
    model: ExportedModel, dense: np.ndarray, ids: np.ndarray, batch_size: int, lists: Lists | None = None
) -> np.ndarray:
    out = np.empty(len(dense), dtype=np.float32)
    for lo in range(0, len(dense), batch_size):
        rows = slice(lo, lo + batch_size)
        batch_lists = None if lists is None else lists.take(np.arange(lo, min(lo + batch_size, len(dense))))
        out[rows] = model.predict(dense[rows], ids[rows], batch_lists)
    return out


def predict_raw(
    model: ExportedModel,
    path: str | Path,
    labelled: bool,
    *,
    batch_size: int = DEFAULT_BATCH,
    block_size_mb: float = 8,
    bad_rows: str = "error",
    dense_min: int | None = None,
    counter: BadRows | None = None,
    result: PredictResult | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (probabilities float32, labels int8) for consecutive lines of a raw file.

    One value per input line, in order: a malformed line skipped under ``bad_rows=skip`` gives NaN
    (label -1); labels are -1 for the unlabelled layout.

    Raises:
        RawDataError: a malformed line under ``bad_rows=error`` (file, line and field named).
    """
    features = model.features
    transform = features.dense_transform
    counter = counter if counter is not None else BadRows()
    already_bad = counter.total
    emitted = good = 0  # lines covered so far; good rows among them
    for block in read_blocks(path, block_size_mb, bad_rows, counter, labelled, model.schema):
        if not len(block):
            continue
        with np.errstate(invalid="ignore", divide="ignore"):  # counted and reported instead
            dense = features.dense(block, dense_min)
        if result is not None and transform == DenseTransform.torchrec:
            result.nonfinite_dense_rows += int((~np.isfinite(dense).all(axis=1)).sum())
        probs = _score(model, dense, features.map_ids(block), batch_size, features.map_lists(block))
        end = int(block.line_index[-1]) + 1
        if end - emitted == len(block):  # no skipped line before or inside this block
            yield probs, block.labels
        else:
            p = np.full(end - emitted, np.nan, dtype=np.float32)
            y = np.full(end - emitted, -1, dtype=np.int8)
            p[block.line_index - emitted] = probs
            y[block.line_index - emitted] = block.labels
            yield p, y
        emitted, good = end, good + len(block)
    trailing = counter.total - already_bad - (emitted - good)  # malformed lines after the last good one
    if trailing > 0:
        yield np.full(trailing, np.nan, dtype=np.float32), np.full(trailing, -1, dtype=np.int8)


# -- preprocessed split -----------------------------------------------------------------------------
def predict_split(
    model: ExportedModel, processed_dir: str | Path, split: str, batch_size: int = DEFAULT_BATCH
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (probabilities, labels) over a preprocessed split, in row order.

    Raises:
        PredictError: the data was preprocessed with other settings than the model was trained on.
    """
    from pipeline.data.loader import BinarySplit
    from pipeline.data.manifest import Manifest
    from pipeline.data.mirror import local_copy
    from pipeline.errors import DataError

    try:
        processed_dir = local_copy(str(processed_dir))  # an object store's processed data: its verified local copy
    except DataError as e:
        raise PredictError(str(e)) from None
    manifest = Manifest.load(processed_dir)
    inp = model.spec["input"]
    ours = {"id_mode": inp["id_mode"], "dense_transform": inp["dense_transform"]}
    differ = {k: (manifest.settings.get(k), v) for k, v in ours.items() if manifest.settings.get(k) != v}
    if manifest.schema != model.features.schema:
        differ["columns"] = (manifest.schema.to_dict(), model.features.schema.to_dict())
    features = FeatureTransform.from_manifest(manifest, processed_dir, inp.get("min_id_frequency", 1))
    if features.table_sizes != model.spec["num_embeddings_per_feature"]:
        differ["table sizes"] = (features.table_sizes, model.spec["num_embeddings_per_feature"])
    if differ:
        raise PredictError(
            f"{processed_dir} was preprocessed with other settings than the model was trained on "
            f"(data vs model): {differ}; score the raw file with --input instead"
        )
    data = BinarySplit(processed_dir, split, manifest, features)
    for lo in range(0, len(data), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(data)))
        yield model.predict(data.gather("dense", rows), data.ids(rows), data.lists(rows)), data.gather("labels", rows)


# -- output ---------------------------------------------------------------------------------------
class _Output:
    """``.npy`` (collected, written at the end), text (streamed), or ``-`` (text to stdout); files are
    written to a temporary name and renamed when complete."""

    def __init__(self, out: str) -> None:
        self.path = None if out == "-" else Path(out)
        self.npy = self.path is not None and self.path.suffix == ".npy"
        self.parts: list[np.ndarray] = []
        self.tmp = None if self.path is None else self.path.with_name(self.path.name + ".tmp")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = sys.stdout.buffer if self.path is None else (None if self.npy else open(self.tmp, "wb"))

    def write(self, probs: np.ndarray) -> None:
        if self.npy:
            self.parts.append(probs)
        else:
            np.savetxt(self.f, probs, fmt="%.9g")

    def close(self) -> None:
        if self.npy:
            with open(self.tmp, "wb") as f:
                np.save(f, np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32))
        elif self.path is not None:
            self.f.close()
        else:
            self.f.flush()
        if self.path is not None:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.f is not None and self.path is not None:
            self.f.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def run(
    model: ExportedModel,
    out: str,
    *,
    input_path: str | None = None,
    split: str | None = None,
    processed_dir: str | None = None,
    layout: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    block_size_mb: float = 8,
    bad_rows: str = "error",
    dense_min: str = "train",
) -> PredictResult:
    """Score ``input_path`` (raw) or ``split`` (preprocessed) into ``out``; see the module docstring."""
    from pipeline.metrics.functional import binary_metrics

    t0 = time.perf_counter()
    result = PredictResult()
    counter = BadRows()
    if input_path is not None:
        labelled = detect_labelled(input_path, schema=model.schema) if layout == "auto" else layout == "labelled"
        result.labelled = labelled
        result.dense_min = resolve_dense_min(model, dense_min, input_path, labelled, block_size_mb, bad_rows)
        stream = predict_raw(
            model,
            input_path,
            labelled,
            batch_size=batch_size,
            block_size_mb=block_size_mb,
            bad_rows=bad_rows,
            dense_min=result.dense_min,
            counter=counter,
            result=result,
        )
    else:
        result.labelled = True
        stream = predict_split(model, processed_dir or model.spec["data"]["processed_dir"], split, batch_size)
    output = _Output(out)
    probs_all, labels_all = [], []
    try:
        for probs, labels in stream:
            output.write(probs)
            result.rows += len(probs)
            if result.labelled:
                keep = labels >= 0
                probs_all.append(probs[keep])
                labels_all.append(labels[keep])
            else:
                result.scored += int(np.isfinite(probs).sum())
        output.close()
    except BaseException:
        output.abort()
        raise
    result.seconds = round(time.perf_counter() - t0, 3)  # reading, scoring and writing; not the metrics
    if result.labelled:
        p = np.concatenate(probs_all) if probs_all else np.zeros(0, np.float32)
        y = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int8)
        result.scored = len(p)
        if len(p):
            result.metrics = asdict(binary_metrics(torch.from_numpy(p), torch.from_numpy(y.astype(np.float32))))
    result.bad_rows = counter.to_dict() if counter.total else {}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./launch.sh predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="an export folder (./launch.sh export ... --out DIR)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="raw TSV in the export's layout (plain or .gz), with or without the label column")
    src.add_argument("--split", choices=("train", "val", "test"), help="a split of preprocessed data instead")
    parser.add_argument("--out", required=True, help="predictions: .npy (float32) or text (one per line); - = stdout")
    parser.add_argument(
        "--processed-dir", help="--split: the preprocessed data (default: the export's data.processed_dir)"
    )
    parser.add_argument(
        "--layout",
        choices=("auto", "labelled", "unlabelled"),
        default="auto",
        help="--input: with a label (Criteo: 40 fields) or without (39); auto = from the first line",
    )
    parser.add_argument(
        "--bad-rows",
        choices=("error", "skip"),
        default="error",
        help="--input: stop at the first malformed line (naming it), or score it NaN and count it",
    )
    parser.add_argument(
        "--dense-min",
        default="train",
        help="data.dense_transform=torchrec only: the minimum in log(x - min + 2): train (the training "
        "file's, recorded at export), input (the input file's own, TorchRec's per-file "
        "converter), or an integer",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="rows per forward pass")
    parser.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="bf16: the MLPs and the interaction in bfloat16 (the lookups and output float32): faster on CPUs "
        "with AMX or AVX-512 BF16, probabilities a few 1e-4 from fp32's; emulated and slower elsewhere. "
        "auto: the precision the model was trained in (trainer.precision)",
    )
    parser.add_argument("--block-size-mb", type=float, default=8, help="--input: raw bytes parsed per block")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="torch intra-op threads (default: cores - 1, leaving one to the parser thread; more "
        "threads than free cores make OpenMP spin: 10k instead of 60k rows/s on 2 busy cores)",
    )
    parser.add_argument("--metrics-json", help="also write the run's summary (rows, bad rows, metrics) as JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(max(1, args.threads))
    try:
        t0 = time.perf_counter()
        model = load_exported(args.model, None if args.precision == "auto" else args.precision)
        logger.info(
            "loaded %s (step %d, %s parameters, %s) in %.1fs",
            args.model,
            model.spec["source"]["step"],
            f"{model.spec['weights']['parameters']:,}",
            model.precision,
            time.perf_counter() - t0,
        )
        result = run(
            model,
            args.out,
            input_path=args.input,
            split=args.split,
            processed_dir=args.processed_dir,
            layout=args.layout,
            batch_size=args.batch_size,
            block_size_mb=args.block_size_mb,
            bad_rows=args.bad_rows,
            dense_min=args.dense_min,
        )
    except RawDataError as e:
        logger.error(
            "%s",
            str(e).replace(
                "data.bad_rows=skip drops and counts such rows", "--bad-rows skip scores such rows NaN and counts them"
            ),
        )
        return 1
    except (ExportError, PredictError, FileNotFoundError, KeyError) as e:
        logger.error("%s", e)
        return 1
    what = args.input or f"split {args.split}"
    logger.info(
        "scored %s rows of %s in %.1fs (%s rows/s) -> %s%s",
        f"{result.rows:,}",
        what,
        result.seconds,
        f"{result.rows / max(result.seconds, 1e-9):,.0f}",
        args.out,
        f"; {result.bad_rows['total']} malformed rows scored NaN {result.bad_rows['by_kind']}"
        if result.bad_rows
        else "",
    )
    if result.dense_min is not None:
        logger.info("torchrec dense transform with min %d (--dense-min %s)", result.dense_min, args.dense_min)
    if result.nonfinite_dense_rows:
        logger.warning(
            "%d rows have an integer feature below min - 1 = %d, where log(x - min + 2) is -inf or NaN, "
            "and score NaN or garbage: --dense-min input uses this file's own minimum",
            result.nonfinite_dense_rows,
            result.dense_min - 1,
        )
    if result.metrics:
        m = result.metrics
        logger.info(
            "metrics: auc %.4f logloss %.4f ne %.4f acc %.4f calibration %.3f (%s labelled rows)",
            m["auc"],
            m["logloss"],
            m["normalized_entropy"],
            m["accuracy"],
            m["calibration"],
            f"{m['num_samples']:,}",
        )
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
