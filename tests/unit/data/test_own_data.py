"""Your own files (data=files: any names, globs, .gz), no silent empties, the frequency threshold applied when
batches are read, and hash caps that follow the data."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import BadRowPolicy, DataConfig, IdMode, SplitMode, SyntheticConfig
from pipeline.data.features import RARE_ID, FeatureTransform, auto_hash_cap, table_sizes
from pipeline.data.generators import synthetic
from pipeline.data.loader import BinarySplit
from pipeline.data.preprocess import preprocess
from pipeline.data.vocab import load_vocab
from pipeline.errors import DataError, MissingDataError

SMALL = SyntheticConfig(num_train_rows=3000, num_val_rows=600, num_test_rows=500, max_cardinality=300, seed=5)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    synthetic.generate(SMALL, root / "gen")
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _files_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        name="own",
        raw_dir=str(root / "nowhere"),
        processed_dir=str(root / "out"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
        **kw,
    )


def test_own_files_take_any_names_globs_and_gz(raw, tmp_path) -> None:
    train = _lines(raw / "gen" / "train.tsv")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "clicks_2026-11-01.tsv").write_text("".join(train[:1000]))
    (logs / "clicks_2026-11-02.tsv").write_text("".join(train[1000:2200]))
    with gzip.open(logs / "clicks_2026-11-03.tsv.gz", "wt") as f:
        f.write("".join(train[2200:]))
    shutil.copy(raw / "gen" / "val.tsv", logs / "holdout.txt")
    cfg = _files_cfg(tmp_path, train_files=[str(logs / "clicks_*.tsv*")], val_files=[str(logs / "holdout.txt")])
    manifest = preprocess(cfg)
    rows = {s: v.num_rows for s, v in manifest.splits.items()}
    assert rows == {"train": 3000, "val": 600, "test": 0}  # no test files: no test split
    assert [p["num_rows"] for p in manifest.splits["train"].parts] == [1000, 1200, 800]  # one part per file
    labels = BinarySplit(cfg.processed_dir, "train", manifest).column("labels")
    np.testing.assert_array_equal(labels, [int(line[0]) for line in train])  # in file order, glob sorted


def test_a_missing_or_doubly_used_file_is_named(raw, tmp_path) -> None:
    val = str(raw / "gen" / "val.tsv")
    with pytest.raises(MissingDataError, match=r"data.train_files: pattern .*nothing_\*.tsv' matches no file"):
        preprocess(_files_cfg(tmp_path, train_files=[str(tmp_path / "nothing_*.tsv")], val_files=[val]))
    with pytest.raises(MissingDataError, match=r"no val data: data.val_files is empty and .*val.tsv does not exist"):
        preprocess(_files_cfg(tmp_path, train_files=[val]))
    with pytest.raises(DataError, match=r"val.tsv is listed for both train and val"):
        preprocess(_files_cfg(tmp_path, train_files=[val], val_files=[val]))


def test_an_empty_input_file_fails_naming_it(raw, tmp_path) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    cfg = _files_cfg(tmp_path, train_files=[str(raw / "gen" / "train.tsv")], val_files=[str(empty)])
    with pytest.raises(DataError, match=r"empty.tsv is empty \(0 bytes\)"):
        preprocess(cfg)
    with gzip.open(tmp_path / "empty.tsv.gz", "wt") as f:  # not 0 bytes, but no rows
        f.write("")
    cfg = _files_cfg(tmp_path, train_files=[str(raw / "gen" / "train.tsv")], val_files=[str(tmp_path / "empty.tsv.gz")])
    with pytest.raises(DataError, match=r"empty.tsv.gz has no rows"):
        preprocess(cfg)


def test_a_file_whose_rows_are_all_dropped_fails_with_the_count(raw, tmp_path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join("2" + line[1:] for line in _lines(raw / "gen" / "val.tsv")[:40]))  # label 2: bad_label
    cfg = _files_cfg(
        tmp_path, train_files=[str(raw / "gen" / "train.tsv")], val_files=[str(bad)], bad_rows=BadRowPolicy.skip
    )
    with pytest.raises(DataError, match=r"bad.tsv: all 40 rows are malformed and were skipped .*'bad_label': 40"):
        preprocess(cfg)


def test_a_random_split_with_no_rows_fails_naming_the_fraction(raw, tmp_path) -> None:
    small = tmp_path / "small.tsv"
    small.write_text("".join(_lines(raw / "gen" / "val.tsv")[:20]))
    cfg = DataConfig(
        name="t",
        raw_dir=str(tmp_path),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.random,
        raw_files=[str(small)],
        val_fraction=0.001,
        test_fraction=0.3,
    )
    with pytest.raises(DataError, match=r"split val has no rows \(data.val_fraction=0.001 of a random split"):
        preprocess(cfg)


@pytest.fixture(scope="module")
def vocab_data(raw, tmp_path_factory) -> tuple[DataConfig, dict]:
    cfg = DataConfig(
        name="t",
        raw_dir=str(raw / "gen"),
        processed_dir=str(tmp_path_factory.mktemp("v") / "out"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
    )
    return cfg, preprocess(cfg)


def test_frequency_threshold_applies_when_batches_are_read(vocab_data) -> None:
    """One preprocessing serves every data.min_id_frequency: values seen fewer times in training read as the
    rare-or-unseen id, exactly as a vocabulary built with that threshold would map them."""
    cfg, manifest = vocab_data
    keys = load_vocab(cfg.processed_dir, 26)
    with np.load(Path(cfg.processed_dir) / "vocab.npz") as z:
        counts = [z[f"count_C{j + 1}"] for j in range(26)]
    assert all((np.diff(c) <= 0).all() for c in counts), "ids follow descending training counts"
    full = BinarySplit(cfg.processed_dir, "train", manifest)
    sizes = table_sizes(manifest, cfg.processed_dir, 3)
    assert sizes == [int((c >= 3).sum()) + 2 for c in counts] and sizes != manifest.num_embeddings_per_feature
    folded = BinarySplit(
        cfg.processed_dir, "train", manifest, FeatureTransform.from_manifest(manifest, cfg.processed_dir, 3)
    )
    rows = np.arange(len(full))
    before, after = full.ids(rows), folded.ids(rows)
    rare = before >= np.array(sizes)
    assert rare.any() and (after[rare] == RARE_ID).all() and (after[~rare] == before[~rare]).all()
    # a value whose id survives was seen at least 3 times; one that does not, fewer
    for j in (2, 5):
        seen = np.bincount(before[:, j], minlength=len(keys[j]) + 2)
        assert (seen[2 : sizes[j]] >= 3).all() and (seen[sizes[j] :] < 3).all()
    assert [len(v) + 2 for v in load_vocab(cfg.processed_dir, 26, 3)] == sizes
    assert table_sizes(manifest, cfg.processed_dir, 1) == manifest.num_embeddings_per_feature


def test_hash_caps_follow_the_distinct_training_values(raw, tmp_path) -> None:
    cfg = DataConfig(
        name="t",
        raw_dir=str(raw / "gen"),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.files,
        id_mode=IdMode.hash,
    )  # no max_ids_per_feature: from the data
    manifest = preprocess(cfg)
    distinct = json.loads((tmp_path / "out" / "hash_caps.json").read_text())["distinct"]
    rows = [line.rstrip("\n").split("\t") for line in _lines(raw / "gen" / "train.tsv")]
    assert distinct == [len({r[14 + j] for r in rows} - {""}) for j in range(26)]
    assert manifest.num_embeddings_per_feature == [auto_hash_cap(n) for n in distinct]
    assert all(2 * n <= c - 1 < 4 * n + 2 for n, c in zip(distinct, manifest.num_embeddings_per_feature, strict=True))
    ids = BinarySplit(cfg.processed_dir, "train", manifest).column("sparse")
    assert (ids < np.array(manifest.num_embeddings_per_feature)).all()


def test_a_vocabulary_holding_pickled_objects_is_refused_without_running_them(tmp_path) -> None:
    """vocab.npz from an untrusted place with an object array (a pickle inside): a data error naming the file;
    nothing in it is unpickled."""
    from pipeline.data.vocab import load_vocab

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    objects = np.empty(1, dtype=object)
    objects[0] = Payload()
    np.savez(tmp_path / "vocab.npz", C1=objects)
    with pytest.raises(DataError, match=r"vocab.npz: Object arrays cannot be loaded"):
        load_vocab(tmp_path, num_sparse=1)
    assert not marker.exists()
