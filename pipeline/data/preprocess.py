"""Raw TSV (Criteo's layout or the one ``data.*_columns`` declare) -> columnar binary splits +
``manifest.json``, restartable per input file.

Output folder (``data.processed_dir``)::

    manifest.json                 written last: rows per split and their parts (files, dtype, shape,
                                  sha256), the schema (dense_columns, sparse_columns, feature_names =
                                  the KJT keys, categorical_format), table sizes, id settings, dense
                                  transform, sources with sizes, bad-row counts by kind, the
                                  generator's optimum if known
    vocab.npz, vocab.json         id_mode=vocab: per sparse column (arrays C1..CF by position), the raw
                                  hashes or ids that own a table row
    parts/<NNN>/<split>/dense.bin     float32 [rows, num_dense], already transformed
    parts/<NNN>/<split>/sparse.bin    int32 [rows, num_one_hot] table row ids of the one-id columns (int64
                                      when a cap exceeds 2^31)
    parts/<NNN>/<split>/lengths.bin   with list columns (data.multi_hot_columns): int32 [rows, num_lists],
                    offsets.bin       int64 [rows] where each row's ids start in values.bin,
                    values.bin        the ids, row after row (a row's lists one after the other),
                    weights.bin       float32, one per id (data.weighted_columns; 1.0 for other columns)
    parts/<NNN>/<split>/labels.bin    uint8 [rows]
    parts/<NNN>/done.json         input file NNN is finished: its outputs' sha256s, rows, bad rows

One part per input file (raw file NNN in order), holding that file's rows of each split it feeds. A
part's ``done.json`` is written (atomically, after its files are synced) only when it is complete,
so a killed run resumes at the file it was on: finished parts whose settings and source match are
verified by checksum and skipped. The manifest is written after every part is done, so a present
manifest whose settings and sources match means the data can be used as is.

Ids: row 0 of every table is "missing", row 1 (vocab mode) is "rare or unseen"; vocab ids follow by
descending training frequency. In hash mode an id is ``1 + hash % (cap - 1)``. Table sizes are
written to the manifest and the model reads them from there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from pipeline.config import (
    DataConfig,
    DenseTransform,
    IdMode,
    SplitMode,
)
from pipeline.data.features import (
    DENSE_TRANSFORMS,
    MISSING_ID,
    NO_CAP,
    RARE_ID,
    FeatureTransform,
    IdMapper,
    auto_hash_cap,
    configured_caps,
    file_dense_min,
)
from pipeline.data.manifest import MANIFEST_VERSION, Manifest, SplitInfo
from pipeline.data.parts import (
    DONE,
    SplitWriter,
    fingerprint,
    finished_part,
    sha256_file,
    source_records,
    write_json,
)
from pipeline.data.schema import CRITEO, Schema
from pipeline.data.splits import SPLITS, Unit, assigned_blocks, plan_units, raw_files, split_files, unit_blocks
from pipeline.data.tsv import BadRows, RawBlock, compile_scanner
from pipeline.data.vocab import IdCounter, VocabBase, vocab_digest
from pipeline.errors import DataError

logger = logging.getLogger(__name__)


def compile_kernels() -> None:
    """Compile (or load from the cache) the raw-row scanner and the vocabulary lookup, e.g. while
    building a container image."""
    compile_scanner()
    num_sparse = len(CRITEO.sparse_columns)
    mapper = IdMapper(IdMode.vocab, [NO_CAP] * num_sparse, [np.array([7, 3], np.uint32)] * num_sparse)
    block = RawBlock(
        np.zeros(1, np.int8),
        np.zeros((1, 13), np.int64),
        np.zeros((1, 13), bool),
        np.full((1, 26), 3, np.uint32),
        np.zeros((1, 26), bool),
        np.zeros(1, np.int64),
    )
    if mapper(block).tolist() != [[3] * 26]:
        raise RuntimeError("the compiled vocabulary lookup gave a wrong id")


def _settings(cfg: DataConfig) -> dict:
    """The inputs that determine the output; outputs made with other settings are rebuilt."""
    schema = Schema.from_config(cfg)
    # Criteo's layout is left out, so data preprocessed before columns could be declared (hours for
    # Criteo 1TB) keeps its fingerprints and is reused; any other layout is part of the settings.
    layout = {} if schema == CRITEO else {"schema": schema.to_dict()}
    return {
        "split": cfg.split.value,
        "raw_files": list(cfg.raw_files),
        **(
            {"files": {k: [str(p) for p in v] for k, v in split_files(cfg).items()}}
            if cfg.split == SplitMode.files
            else {}
        ),
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_seed": cfg.split_seed,
        "id_mode": cfg.id_mode.value,
        "caps": configured_caps(cfg) or "auto",
        "dense_transform": cfg.dense_transform.value,
        "bad_rows": cfg.bad_rows.value,
        **layout,
        **({"vocab_from": _vocab_from_settings(cfg)} if cfg.vocab_from else {}),
    }


def _vocab_from_settings(cfg: DataConfig) -> dict:
    """What a grown vocabulary depends on: the folder it grows from, that folder's vocabulary, and the frequency
    threshold applied as it grows."""
    return {
        "processed_dir": str(cfg.vocab_from),
        "vocab_sha256": vocab_digest(cfg.vocab_from),
        "min_id_frequency": cfg.min_id_frequency,
    }


def is_current(cfg: DataConfig) -> bool:
    """True when processed_dir holds a finished preprocessing of the same sources and settings."""
    m = Manifest.read(cfg.processed_dir)
    if m is None:
        return False
    try:
        sources = source_records(raw_files(cfg))
    except FileNotFoundError:
        return False
    if m.version != MANIFEST_VERSION or m.sources != sources:
        return False
    if m.schema != Schema.from_config(cfg):
        logger.info(
            "%s was preprocessed with columns %s, the config declares %s: preprocessing again",
            Manifest.path(cfg.processed_dir),
            m.schema.to_dict(),
            Schema.from_config(cfg).to_dict(),
        )
        return False
    return m.settings == _settings(cfg)


def _count_ids(cfg: DataConfig, units: list[Unit]) -> IdCounter:
    """A first pass over the training rows: every categorical value and how often it occurs."""
    counter = IdCounter(len(cfg.sparse_columns), Schema.from_config(cfg).multi_index)
    ignored = BadRows()  # the main pass counts bad rows; this pass sees the same ones
    for unit in units:
        if "train" in unit.splits:
            for _, block in unit_blocks(unit, cfg, ignored, only=("train",)):
                counter.add(block)
    return counter


def _load_or_build_vocab(
    cfg: DataConfig, units: list[Unit], out: Path, settings: dict, sources: list[dict]
) -> tuple[list[np.ndarray], str]:
    """The vocabulary (every training value by descending count, at most the cap) from a first pass over the
    training rows, with the counts; reused when already built and intact."""
    marker, npz = out / "vocab.json", out / "vocab.npz"
    key = fingerprint(settings, sources)
    if marker.exists() and npz.exists():
        m = json.loads(marker.read_text())
        if m.get("fingerprint") == key and sha256_file(npz) == m.get("sha256"):
            logger.info("vocabulary in %s verified, reused", npz)
            with np.load(npz) as z:
                return [z[f"C{j + 1}"] for j in range(len(cfg.sparse_columns))], m["sha256"]
    t0 = time.perf_counter()
    caps = configured_caps(cfg) or [NO_CAP] * len(cfg.sparse_columns)
    base = VocabBase.load(cfg.vocab_from, len(cfg.sparse_columns), cfg.min_id_frequency) if cfg.vocab_from else None
    counter = _count_ids(cfg, units)
    vocab, counts = base.grow(counter, cfg.min_id_frequency, caps) if base else counter.vocab(caps)
    if base:
        old = base.generations[-1]["rows"]
        logger.info(
            "grew the vocabulary of %s: %s values kept their ids, %s new ones follow",
            cfg.vocab_from,
            f"{sum(r - 2 for r in old):,}",
            f"{sum(len(v) - (r - 2) for v, r in zip(vocab, old, strict=True)):,}",
        )
    marker.unlink(missing_ok=True)
    tmp = out / "vocab.tmp.npz"
    np.savez(
        tmp, **{f"C{j + 1}": v for j, v in enumerate(vocab)}, **{f"count_C{j + 1}": c for j, c in enumerate(counts)}
    )
    os.replace(tmp, npz)
    digest = sha256_file(npz)
    write_json(marker, {"fingerprint": key, "sha256": digest, "sizes": [len(v) for v in vocab]})
    logger.info("built the vocabulary in %.1fs: %s ids", time.perf_counter() - t0, f"{sum(len(v) for v in vocab):,}")
    return vocab, digest


def _load_or_count_hash_caps(
    cfg: DataConfig, units: list[Unit], out: Path, settings: dict, sources: list[dict]
) -> list[int]:
    """Hash mode without a configured cap: :func:`auto_hash_cap` of each column's distinct training values,
    from a first pass (reused from ``hash_caps.json`` when the settings and sources match)."""
    marker = out / "hash_caps.json"
    key = fingerprint(settings, sources)
    if marker.exists():
        m = json.loads(marker.read_text())
        if m.get("fingerprint") == key:
            return m["caps"]
    t0 = time.perf_counter()
    distinct = _count_ids(cfg, units).num_distinct()
    caps = [auto_hash_cap(n) for n in distinct]
    write_json(marker, {"fingerprint": key, "distinct": distinct, "caps": caps})
    logger.info(
        "hash caps from %s distinct training values per column in %.1fs (data.max_ids_per_feature=null): %s",
        distinct,
        time.perf_counter() - t0,
        caps,
    )
    return caps


def _process_unit(unit: Unit, cfg: DataConfig, out: Path, features: FeatureTransform, key: str) -> dict:
    """Convert one input file into its part; returns the part's done record."""
    t0 = time.perf_counter()
    rel = f"parts/{unit.name}"
    file_min = (
        file_dense_min(unit.path, features.schema, True, cfg.block_size_mb, cfg.bad_rows.value)
        if cfg.dense_transform == DenseTransform.torchrec
        else None
    )
    counter = BadRows()
    writers = {s: SplitWriter(out, f"{rel}/{s}", features.ids.dtype, features.schema) for s in unit.splits}

    def outputs(block: RawBlock, assigned: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
        """In the reader's threads: each split's rows, transformed and mapped, ready to write."""
        # The whole block is transformed and mapped, then its (narrower) outputs split: rows are independent.
        dense, ids, labels = features.dense(block, file_min), features.map_ids(block), block.labels
        lists = features.map_lists(block)
        rows = {}
        for split in writers:
            keep = assigned == SPLITS.index(split)
            if keep.all():
                rows[split] = dense, ids, labels, lists
            elif keep.any():
                rows[split] = dense[keep], ids[keep], labels[keep], None if lists is None else lists.take(keep)
        return rows

    try:
        for _, _, rows in assigned_blocks(unit, cfg, counter, then=outputs):
            for split, (dense, ids, labels, lists) in rows.items():
                writers[split].write(dense, ids, labels, lists)
        for writer in writers.values():
            writer.start_close()  # the splits' final fsyncs run side by side
        closed = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record = {
        "fingerprint": key,
        "source": source_records([unit.path])[0],
        "splits": closed,
        "bad_rows": counter.to_dict(),
        "dense_min": file_min,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / rel / DONE, record)
    rows = sum(v["num_rows"] for v in record["splits"].values())
    if rows == 0:
        if counter.total:
            raise DataError(
                f"{unit.path}: all {counter.total:,} rows are malformed and were skipped "
                f"(data.bad_rows=skip; by kind { ({k: v for k, v in counter.counts.items() if v}) }); first: "
                f"{counter.examples[0] if counter.examples else '-'}"
            )
        raise DataError(f"{unit.path} has no rows: an empty input file")
    logger.info(
        "part %s: %s -> %s rows in %.1fs (%s rows/s)%s",
        unit.name,
        unit.path,
        f"{rows:,}",
        record["seconds"],
        f"{rows / max(record['seconds'], 1e-9):,.0f}",
        f", skipped {counter.total} bad rows {counter.counts}" if counter.total else "",
    )
    for example in counter.examples:
        logger.warning("skipped bad row %s", example)
    return record


def preprocess(cfg: DataConfig) -> Manifest:
    """Convert the raw files named by ``cfg`` into binary splits; return the manifest.

    Restartable: parts finished by an earlier (killed) run with the same settings are verified and
    skipped.

    Raises:
        RawDataError: a malformed raw row under ``data.bad_rows=error`` (file, line and field named).
        FileNotFoundError: a raw file is missing.
    """
    t0 = time.perf_counter()
    out = Path(cfg.processed_dir)
    out.mkdir(parents=True, exist_ok=True)
    Manifest.path(out).unlink(missing_ok=True)
    files = raw_files(cfg)
    for path in files:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty (0 bytes): no rows to preprocess")
    units = plan_units(cfg, files)
    settings = _settings(cfg)
    sources = source_records(files)
    vocab, id_key = (None, "")
    caps = configured_caps(cfg)
    if cfg.id_mode == IdMode.vocab:
        vocab, id_key = _load_or_build_vocab(cfg, units, out, settings, sources)
        caps = caps or [NO_CAP] * len(cfg.sparse_columns)
    elif caps is None:
        caps = _load_or_count_hash_caps(cfg, units, out, settings, sources)
        id_key = json.dumps(caps)
    schema = Schema.from_config(cfg)
    mapper = IdMapper(cfg.id_mode, caps, vocab, schema.multi_index)
    features = FeatureTransform(schema, cfg.dense_transform, mapper.num_embeddings, mapper)  # no threshold: all ids
    records = []
    for unit in units:
        key = fingerprint(settings, {"index": unit.index, "path": str(unit.path), "ranges": unit.ranges}, id_key)
        records.append(finished_part(unit, out, key) or _process_unit(unit, cfg, out, features, key))
    splits = {s: SplitInfo() for s in SPLITS}
    bad = BadRows()
    for record in records:
        for s, info in record["splits"].items():
            splits[s].num_rows += info["num_rows"]
            splits[s].parts.append(info)
        part_bad = BadRows()
        part_bad.counts.update(record["bad_rows"]["by_kind"])
        part_bad.examples = list(record["bad_rows"]["examples"])
        bad.merge(part_bad)
    _check_splits(cfg, units, splits)
    manifest = Manifest(
        settings=settings,
        sources=sources,
        splits=splits,
        schema=schema,
        num_embeddings_per_feature=mapper.num_embeddings,  # before data.min_id_frequency (see features.table_sizes)
        id_caps=None if vocab is not None and configured_caps(cfg) is None else caps,
        reserved_ids={"missing": MISSING_ID, **({"rare_or_unseen": RARE_ID} if vocab is not None else {})},
        dense_transform=DENSE_TRANSFORMS[cfg.dense_transform],
        bad_rows=bad.to_dict(),
        optimum=_optimum(cfg),
        vocab_sha256=id_key if vocab is not None else None,
        vocab_generations=VocabBase.lineage(cfg.vocab_from, len(cfg.sparse_columns), cfg.min_id_frequency)
        if vocab is not None and cfg.vocab_from
        else None,
        **list_lengths(schema, splits["train"]),
        seconds=round(time.perf_counter() - t0, 2),
    )
    manifest.save(out)
    logger.info(
        "preprocessed %d file(s) -> %s in %.1fs: %s%s",
        len(files),
        out,
        manifest.seconds,
        ", ".join(f"{s} {v.num_rows:,} rows" for s, v in splits.items()),
        f"; skipped {bad.total} bad rows {bad.counts}" if bad.total else "",
    )
    return manifest


def list_lengths(schema: Schema, train: SplitInfo) -> dict:
    """The manifest's ``pooling_factors`` and ``max_lengths`` per table from the training parts' list lengths
    (empty for one-hot data)."""
    if not schema.multi_hot:
        return {}
    sums = np.zeros(len(schema.multi_hot), np.int64)
    longest = np.zeros(len(schema.multi_hot), np.int64)
    for part in train.parts:
        if "list_lengths" in part:
            sums += np.asarray(part["list_lengths"]["sum"], np.int64)
            longest = np.maximum(longest, part["list_lengths"]["max"])
    factors, maxes = [1.0] * schema.num_sparse, [1] * schema.num_sparse
    for m, j in enumerate(schema.multi_index):
        factors[j] = round(float(sums[m]) / max(train.num_rows, 1), 4)
        maxes[j] = int(longest[m])
    return {"pooling_factors": factors, "max_lengths": maxes}


def _check_splits(cfg: DataConfig, units: list[Unit], splits: dict[str, SplitInfo]) -> None:
    """Every split some input feeds must have rows (train and val always do).

    Raises:
        DataError: naming the split, the files that feed it and the setting that sized it.
    """
    for split in SPLITS:
        feeding = [str(u.path) for u in units if split in u.splits]
        if (feeding or split != "test") and splits[split].num_rows == 0:
            share = (
                f"data.{split}_fraction={getattr(cfg, f'{split}_fraction')}"
                if split != "train"
                else f"1 - data.val_fraction - data.test_fraction = {1 - cfg.val_fraction - cfg.test_fraction:g}"
            )
            how = {
                SplitMode.random: f"{share} of a random split",
                SplitMode.files: f"data.{split}_files",
                SplitMode.kaggle: "the Kaggle day split",
                SplitMode.days: "the day split",
            }[cfg.split]
            raise DataError(
                f"split {split} has no rows ({how}; from {feeding or 'no file'}): give it rows, "
                "e.g. more input or a larger fraction"
            )


def _optimum(cfg: DataConfig) -> dict | None:
    """The synthetic (or MovieLens-style) generator's Bayes-optimal metrics, when the raw data came from it."""
    from pipeline.data.generators.base import OPTIMUM_FILE

    path = Path(cfg.raw_dir) / OPTIMUM_FILE
    if cfg.split == SplitMode.files and path.exists():
        return json.loads(path.read_text())["optimum"]
    return None
