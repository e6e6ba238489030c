"""MLPerf DLRM-DCNv2's multi-hot data: a one-hot preprocessing (``data.materialize.source_dir``) made into
bags of ids, one per table and row, written as a new preprocessed folder (``data.processed_dir``).

The rule (MLPerf's ``materialize_synthetic_multihot_dataset.py`` with ``--multi_hot_distribution_type
uniform``): the bag of id ``x`` of table ``j`` holds ``sizes[j]`` ids, ``x`` itself first, then
``sizes[j] - 1`` ids drawn uniformly over the table's ``n_j`` rows, the same for every row holding ``x``.
The reference draws a whole ``[n_j, sizes[j]]`` lookup table with ``np.random.seed(0)`` (40M x 99 ids,
16 GB, for its largest); here each drawn id is a counter-based hash of (seed, table, id, position), so no
table exists and memory stays bounded. The distribution and the determinism per id are the reference's;
the ids drawn are not numpy's. With ``GAMMA = 0x9E3779B97F4A7C15``, ``mix`` SplitMix64's output function and
``sm(z) = mix(z + GAMMA)``, all in uint64 arithmetic::

    table_key[j] = sm(sm(seed) ^ j)
    key(j, x)    = sm(table_key[j] ^ x)
    bag(j, x)    = [x, mix(key + 1*GAMMA) % n_j, ..., mix(key + (sizes[j]-1)*GAMMA) % n_j]

(the drawn ids are the first outputs of a SplitMix64 generator started at ``key(j, x)``; ``% n_j`` is
uniform to within n_j / 2^64). A bag is a function of the id and holds it, so the data's Bayes-optimal
metrics are the source's.

Output folder: the layout of :mod:`pipeline.data.preprocess` with every column a list column
(``sparse.bin`` [rows, 0]; ``lengths.bin``, ``offsets.bin``, ``values.bin``), ``dense.bin`` and
``labels.bin`` copied (not hard-linked: preprocessing rewrites its files in place, which would change a
linked copy under a finished part), the vocabulary linked (written by rename, so a link stays intact),
and a manifest whose schema makes every column multi-hot with its bag size as cap. One part per source
part, each finished with a ``done.json`` (verified by sha256 and skipped on a rerun), rows processed in
blocks of about ``block_mb`` output bytes by a compiled kernel while the previous block is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, DataConfig, MaterializeConfig, MultiHotDistribution
from pipeline.data.compiled import compiled
from pipeline.data.jagged import Lists
from pipeline.data.manifest import MANIFEST_VERSION, Manifest, SplitInfo
from pipeline.data.parts import DONE, SplitWriter, fingerprint, verify_files, write_json
from pipeline.data.preprocess import list_lengths
from pipeline.data.schema import Schema
from pipeline.errors import DataError

logger = logging.getLogger(__name__)

RULE = "splitmix64-v1"  # the hash rule above; a change of rule must change this name (and so the fingerprints)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


@compiled
def _mix(z):  # pragma: no cover - compiled
    """SplitMix64's output function (Stafford's variant 13 of the MurmurHash3 finaliser)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@compiled
def _sm(z):  # pragma: no cover - compiled
    return _mix(z + _GAMMA)


@compiled
def _fill_bags(ids, sizes, num_rows, table_keys, out, bad):  # pragma: no cover - compiled
    """``out``: every row's bags, row after row (a row's tables in order); ``bad`` [row, column] of the first
    id outside its table (left at -1 when there is none)."""
    pos = 0
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            x = ids[i, j]
            if x < 0 or x >= num_rows[j]:
                bad[0] = i
                bad[1] = j
                return
            out[pos] = x
            key = _sm(table_keys[j] ^ np.uint64(x))
            n = np.uint64(num_rows[j])
            for k in range(1, sizes[j]):
                out[pos + k] = np.int64(_mix(key + np.uint64(k) * _GAMMA) % n)
            pos += sizes[j]


def table_keys(seed: int, num_tables: int) -> np.ndarray:
    """uint64 [num_tables]: each table's key, ``sm(sm(seed) ^ j)``."""
    base = _sm(np.uint64(seed % 2**64))
    return np.array([_sm(base ^ np.uint64(j)) for j in range(num_tables)], dtype=np.uint64)


@dataclasses.dataclass
class BagRule:
    """The materialisation of one dataset: ids per bag and rows per table (one each per column), and the seed."""

    sizes: tuple[int, ...]
    num_embeddings: tuple[int, ...]
    seed: int = 0
    keys: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)  # table_keys(seed, tables)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.num_embeddings) or min(self.sizes, default=1) < 1:
            raise ConfigError(
                f"data.materialize.sizes {list(self.sizes)}: give one bag size >= 1 per table "
                f"({len(self.num_embeddings)} tables)"
            )
        self.keys = table_keys(self.seed, len(self.sizes))

    @property
    def ids_per_row(self) -> int:
        return int(sum(self.sizes))

    def bags(self, ids: np.ndarray, dtype: np.dtype | None = None) -> Lists:
        """The bags of ``ids`` [n, num_tables] (table row ids), row-major as stored: every row's bags one
        after the other, ``lengths`` [n, num_tables] the sizes.

        Raises:
            DataError: an id outside its table (the source is not the data these table sizes describe).
        """
        ids = np.ascontiguousarray(ids)
        if ids.ndim != 2 or ids.shape[1] != len(self.sizes):
            raise ValueError(f"ids of shape {ids.shape}: expected [rows, {len(self.sizes)}]")
        values = np.empty(len(ids) * self.ids_per_row, dtype=dtype or ids.dtype)
        bad = np.full(2, -1, np.int64)
        _fill_bags(
            ids,
            np.asarray(self.sizes, np.int64),
            np.asarray(self.num_embeddings, np.int64),
            self.keys,
            values,
            bad,
        )
        if bad[0] >= 0:
            i, j = int(bad[0]), int(bad[1])
            raise DataError(
                f"row {i}: id {int(ids[i, j])} of table {j} is outside its {self.num_embeddings[j]:,} rows: "
                "the source data and its manifest's table sizes disagree (preprocess the source again)"
            )
        lengths = np.broadcast_to(np.asarray(self.sizes, np.int32), (len(ids), len(self.sizes)))
        return Lists(values, lengths)


def source_config(cfg: DataConfig) -> DataConfig:
    """The one-hot preprocessing the materialisation reads: ``cfg`` into ``data.materialize.source_dir``."""
    return dataclasses.replace(cfg, processed_dir=cfg.materialize.source_dir, materialize=None)


def source_fingerprint(source: Manifest) -> str:
    """What the materialisation depends on in a source manifest: its settings, parts (sha256s), schema, tables."""
    d = source.to_dict()
    keep = {k: d[k] for k in ("settings", "splits", "num_embeddings_per_feature", "id_caps", "reserved_ids")}
    keep["schema"] = source.schema.to_dict()
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _settings(spec: MaterializeConfig, source: Manifest) -> dict:
    return {
        **source.settings,
        "materialize": {
            "rule": RULE,
            "sizes": [int(s) for s in spec.sizes],
            "distribution": MultiHotDistribution(spec.distribution).value,
            "seed": int(spec.seed),
            "source_dir": str(spec.source_dir),
            "source_fingerprint": source_fingerprint(source),
        },
    }


def is_current(processed_dir: str | Path, spec: MaterializeConfig, source: Manifest) -> bool:
    """True when ``processed_dir`` holds a finished materialisation of this source with this spec."""
    m = Manifest.read(processed_dir)
    return m is not None and m.version == MANIFEST_VERSION and m.settings == _settings(spec, source)


def _source_parts(source: Manifest) -> dict[str, dict[str, dict]]:
    """Part name (``NNN``) -> split -> the source manifest's record of that part's split, in part order."""
    parts: dict[str, dict[str, dict]] = {}
    for split, info in source.splits.items():
        for part in info.parts:
            name = Path(part["files"]["labels"]["path"]).parts[1]  # parts/<NNN>/<split>/labels.bin
            parts.setdefault(name, {})[split] = part
    return dict(sorted(parts.items()))


def _finished(out: Path, name: str, key: str) -> dict | None:
    """The done record of a finished, intact part made from the same source part and spec, else None."""
    path = out / "parts" / name / DONE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != key:
        logger.info("part %s was materialised from another source or spec: redoing it", name)
        return None
    for split, info in record["splits"].items():
        problem = verify_files(out, info["files"])
        if problem is not None:
            logger.warning("part %s (%s): %s: redoing it", name, split, problem)
            return None
    logger.info("part %s already materialised and verified by sha256: skipped", name)
    return record


def _map(path: Path, info: dict) -> np.ndarray:
    if 0 in info["shape"]:
        return np.zeros(info["shape"], dtype=info["dtype"])
    return np.memmap(path, dtype=info["dtype"], mode="r", shape=tuple(info["shape"]))


def _materialize_part(
    source_dir: Path,
    out: Path,
    name: str,
    splits: dict[str, dict],
    rule: BagRule,
    schema: Schema,
    key: str,
    block_mb: float,
) -> dict:
    """One source part -> its bags; returns the part's done record."""
    t0 = time.perf_counter()
    row_bytes = 4 * (rule.ids_per_row + len(rule.sizes)) + 8 + 4 * schema.num_dense + 1
    block = max(1, int(block_mb * (1 << 20)) // row_bytes)
    closed = {}
    rows = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bags") as pool:
        for split, info in splits.items():
            files = info["files"]
            src = {k: _map(source_dir / f["path"], f) for k, f in files.items()}
            dtype = np.dtype(files["sparse"]["dtype"])
            writer = SplitWriter(out, f"parts/{name}/{split}", dtype, schema)

            def make(lo: int, hi: int, src=src, dtype=dtype) -> tuple:
                """In the helper thread: a block's bags (the compiled kernel runs without the GIL)."""
                lists = rule.bags(np.asarray(src["sparse"][lo:hi]), dtype)
                return (
                    np.asarray(src["dense"][lo:hi]),
                    np.zeros((hi - lo, 0), dtype),  # no one-hot columns left
                    np.asarray(src["labels"][lo:hi]),
                    lists,
                )

            try:
                pending = None
                n = info["num_rows"]
                for lo in range(0, n, block):  # the next block's bags are made while this one is written
                    future = pool.submit(make, lo, min(lo + block, n))
                    if pending is not None:
                        writer.write(*pending.result())
                    pending = future
                if pending is not None:
                    writer.write(*pending.result())
                closed[split] = writer.close()
            except BaseException:
                writer.abort()
                raise
            rows += info["num_rows"]
    record = {"fingerprint": key, "splits": closed, "seconds": round(time.perf_counter() - t0, 2)}
    write_json(out / "parts" / name / DONE, record)
    logger.info(
        "part %s: %s rows materialised in %.1fs (%s rows/s)",
        name,
        f"{rows:,}",
        record["seconds"],
        f"{rows / max(record['seconds'], 1e-9):,.0f}",
    )
    return record


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def materialize(source_dir: str | Path, out_dir: str | Path, spec: MaterializeConfig, block_mb: float = 64) -> Manifest:
    """Materialise the one-hot preprocessing in ``source_dir`` into multi-hot bags in ``out_dir``; return the
    manifest. Restartable: parts finished by an earlier (killed) run with the same source and spec are
    verified and skipped.

    Raises:
        ConfigError: the spec does not fit the source (bag sizes per column), or writes over it.
        DataError: the source is not one-hot, or holds an id outside its table.
    """
    t0 = time.perf_counter()
    source_dir, out = Path(source_dir), Path(out_dir)
    if source_dir.resolve() == out.resolve():
        raise ConfigError(
            f"data.materialize.source_dir and data.processed_dir are both {out}: the bags need a folder of their own"
        )
    source = Manifest.load(source_dir)
    if source.schema.multi_hot:
        raise DataError(
            f"{Manifest.path(source_dir)} has list columns {source.schema.multi_hot_columns}: data.materialize "
            "makes bags of one-hot data (preprocess the source with data.multi_hot_columns={})"
        )
    if len(spec.sizes) != source.num_sparse:
        raise ConfigError(
            f"data.materialize.sizes has {len(spec.sizes)} entries, the source {source_dir} has {source.num_sparse} "
            "categorical columns: give one bag size per column"
        )
    rule = BagRule(tuple(int(s) for s in spec.sizes), tuple(source.num_embeddings_per_feature), int(spec.seed))
    settings = _settings(spec, source)
    schema = dataclasses.replace(
        source.schema, multi_hot=tuple(zip(source.schema.sparse_columns, rule.sizes, strict=True)), weighted=()
    )
    out.mkdir(parents=True, exist_ok=True)
    Manifest.path(out).unlink(missing_ok=True)  # a manifest marks a finished folder: not while parts change
    logger.info(
        "materialising %s into %s: bags of %s ids per row (%s)",
        source_dir,
        out,
        rule.ids_per_row,
        ",".join(map(str, rule.sizes)),
    )
    records = {}
    for name, splits in _source_parts(source).items():
        key = fingerprint(settings["materialize"], {"part": name, "source": splits})
        records[name] = _finished(out, name, key) or _materialize_part(
            source_dir, out, name, splits, rule, schema, key, block_mb
        )
    for vocab in ("vocab.npz", "vocab.json"):  # vocab mode: data.min_id_frequency reads the counts from here
        if (source_dir / vocab).exists():
            _link_or_copy(source_dir / vocab, out / vocab)
    splits = {s: SplitInfo() for s in source.splits}
    for record in records.values():
        for s, info in record["splits"].items():
            splits[s].num_rows += info["num_rows"]
            splits[s].parts.append(info)
    manifest = dataclasses.replace(
        source,
        settings=settings,
        splits=splits,
        schema=schema,
        **list_lengths(schema, splits["train"]),  # the pooling factors preprocessing writes: the sizes
        seconds=round(time.perf_counter() - t0, 2),
        version=MANIFEST_VERSION,
    )
    manifest.save(out)
    rows = sum(s.num_rows for s in splits.values())
    logger.info("materialised %s rows -> %s in %.1fs", f"{rows:,}", out, manifest.seconds)
    return manifest


def prepare(cfg: DataConfig, source: Manifest) -> Manifest:
    """``data.processed_dir`` as ``data.materialize`` describes it: reused when current, else materialised
    from ``source`` (the manifest of ``data.materialize.source_dir``, already prepared)."""
    if is_current(cfg.processed_dir, cfg.materialize, source):
        logger.info("reusing the multi-hot bags in %s", cfg.processed_dir)
        return Manifest.load(cfg.processed_dir)
    return materialize(cfg.materialize.source_dir, cfg.processed_dir, cfg.materialize)


def pooling_factors(cfg: DataConfig) -> list[float]:
    """Mean ids per row of each table for ``cfg``, with or without the data at hand: the manifest in
    ``data.processed_dir`` when there is one, else ``data.materialize.sizes``, else one id each (the planner's
    inputs for a cluster you plan before the data exists)."""
    manifest = Manifest.read(cfg.processed_dir)
    if manifest is not None and manifest.version == MANIFEST_VERSION:
        return manifest.table_pooling_factors()
    if cfg.materialize is not None:
        return [float(s) for s in cfg.materialize.sizes]
    return [1.0] * len(cfg.sparse_columns)
