"""Daily retraining's data: generated days that drift, and a vocabulary that grows from yesterday's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, IdMode, SplitMode, SyntheticConfig
from pipeline.data.features import RARE_ID, IdMapper, table_sizes
from pipeline.data.generators import synthetic
from pipeline.data.loader import BinarySplit
from pipeline.data.manifest import Manifest
from pipeline.data.preprocess import preprocess
from pipeline.data.tsv import read_blocks
from pipeline.data.vocab import load_vocab, vocab_digest
from pipeline.errors import ConfigError, DataError

DAY = {"num_train_rows": 6000, "num_val_rows": 1000, "num_test_rows": 1000, "max_cardinality": 300, "seed": 4}


def _values(path: Path, column: int) -> list[str]:
    return [line.split("\t")[14 + column] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    """Days 0 and 1 of a log where 5% of each column's ranks go to new ids each day."""
    root = tmp_path_factory.mktemp("days")
    for day in (0, 1):
        synthetic.generate(SyntheticConfig(**DAY, day=day, new_id_share=0.05), root / f"raw{day}")
    return root


def _cfg(root: Path, day: int, **kw) -> DataConfig:
    return DataConfig(
        name="t",
        raw_dir=str(root / f"raw{day}"),
        processed_dir=str(root / f"out{day}" / str(sorted(kw.items()))),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
        **kw,
    )


def test_a_day_draws_new_rows_and_new_ids_from_the_same_click_model(days) -> None:
    day0 = (days / "raw0" / "train.tsv").read_text().splitlines()
    day1 = (days / "raw1" / "train.tsv").read_text().splitlines()
    assert day0 != day1 and len(day0) == len(day1)
    unseen = []
    for c in range(26):
        seen = set(_values(days / "raw0" / "train.tsv", c)) - {""}
        values = [v for v in _values(days / "raw1" / "train.tsv", c) if v]
        unseen.append(np.mean([v not in seen for v in values]))
    # new ids take 5% of the ranks at random: a few percent of the values, never most of them
    assert 0.005 < np.mean(unseen) < 0.2 and max(unseen) < 0.6
    # without new ids a later day is only other rows: its values are (almost all) yesterday's
    synthetic.generate(SyntheticConfig(**DAY), days / "plain0")
    synthetic.generate(SyntheticConfig(**DAY, day=1), days / "plain1")
    seen = set(_values(days / "plain0" / "train.tsv", 0))
    assert np.mean([v not in seen for v in _values(days / "plain1" / "train.tsv", 0)]) < 0.01


@pytest.mark.parametrize("min_freq", [1, 2])
def test_a_grown_vocabulary_keeps_yesterdays_ids_and_appends_the_new_values(days, min_freq) -> None:
    old_cfg = _cfg(days, 0)
    old = preprocess(old_cfg)
    new_cfg = _cfg(days, 1, vocab_from=old_cfg.processed_dir, min_id_frequency=min_freq)
    new = preprocess(new_cfg)
    old_keys = load_vocab(old_cfg.processed_dir, 26, min_freq)  # the rows a model trained on day 0 has
    new_keys = load_vocab(new_cfg.processed_dir, 26)
    counts1 = {}
    for block in read_blocks(Path(new_cfg.raw_dir) / "train.tsv"):
        for j in range(26):
            values, n = np.unique(block.sparse[~block.sparse_missing[:, j], j], return_counts=True)
            for v, k in zip(values.tolist(), n.tolist(), strict=True):
                counts1[(j, v)] = counts1.get((j, v), 0) + k
    for j in range(26):
        kept = len(old_keys[j])
        assert (new_keys[j][:kept] == old_keys[j]).all(), "yesterday's values keep their ids"
        appended = new_keys[j][kept:].tolist()
        expected = sorted(
            (v for (c, v), k in counts1.items() if c == j and k >= min_freq and v not in set(old_keys[j].tolist())),
            key=lambda v: (-counts1[(j, v)], v),
        )
        assert appended == expected, "new values follow, most frequent first, those under the threshold left out"
    assert sum(len(k) for k in new_keys) > sum(len(k) for k in old_keys)
    # the manifest records the line: day 0's digest and the rows a model trained on it has
    assert new.vocab_sha256 == vocab_digest(new_cfg.processed_dir)
    assert new.vocab_generations == [
        {
            "processed_dir": old_cfg.processed_dir,
            "vocab_sha256": old.vocab_sha256,
            "rows": table_sizes(old, old_cfg.processed_dir, min_freq),
        }
    ]
    # every value of a grown vocabulary owns its row; the threshold was applied as it grew
    assert table_sizes(new, new_cfg.processed_dir, min_freq + 1) == [len(k) + 2 for k in new_keys]
    # the stored ids: day-0 values map to their day-0 ids, new values past them
    mapper = IdMapper(IdMode.vocab, [2**62] * 26, new_keys)
    block = next(read_blocks(Path(new_cfg.raw_dir) / "val.tsv"))
    stored = BinarySplit(new_cfg.processed_dir, "val", new).ids(np.arange(len(block)))
    assert (stored == mapper(block)).all()
    old_mapper = IdMapper(IdMode.vocab, [2**62] * 26, old_keys)
    old_ids = old_mapper(block)
    known = (old_ids != RARE_ID) & ~block.sparse_missing
    assert (stored[known] == old_ids[known]).all()
    unknown = ~known & ~block.sparse_missing  # values day 0 gave no row: a new row, or rare if day 1 has none
    past_old = stored >= np.array([len(k) + 2 for k in old_keys])[None, :]
    assert (past_old | (stored == RARE_ID))[unknown].all() and past_old[unknown].any()


def test_growth_stops_at_the_cap_and_a_grown_vocabulary_grows_again(days, tmp_path) -> None:
    old_cfg = _cfg(days, 0, max_ids_per_feature=150)
    preprocess(old_cfg)
    grown_cfg = _cfg(days, 1, max_ids_per_feature=150, vocab_from=old_cfg.processed_dir)
    grown = preprocess(grown_cfg)
    assert max(grown.num_embeddings_per_feature) == 150
    # a third day grows from the grown one: the line holds both
    synthetic.generate(SyntheticConfig(**DAY, day=2, new_id_share=0.05), days / "raw2")
    third_cfg = _cfg(days, 2, vocab_from=grown_cfg.processed_dir)
    third = preprocess(third_cfg)
    assert [g["processed_dir"] for g in third.vocab_generations] == [old_cfg.processed_dir, grown_cfg.processed_dir]
    keys2, keys3 = load_vocab(grown_cfg.processed_dir, 26), load_vocab(third_cfg.processed_dir, 26)
    assert all((k3[: len(k2)] == k2).all() for k2, k3 in zip(keys2, keys3, strict=True))


def test_growth_is_part_of_the_settings_and_its_mistakes_are_named(days, tmp_path) -> None:
    old_cfg = _cfg(days, 0)
    preprocess(old_cfg)
    plain = preprocess(_cfg(days, 1))
    grown = preprocess(_cfg(days, 1, vocab_from=old_cfg.processed_dir))
    assert "vocab_from" not in plain.settings and grown.settings["vocab_from"]["vocab_sha256"]
    assert grown.vocab_generations and plain.vocab_generations is None
    with pytest.raises(ConfigError, match="data.id_mode=vocab"):
        DataConfig(name="t", id_mode=IdMode.hash, vocab_from=old_cfg.processed_dir)
    with pytest.raises(DataError, match="not found"):
        preprocess(_cfg(days, 1, vocab_from=str(tmp_path / "nowhere")))
    hashed = DataConfig(
        name="t",
        raw_dir=str(days / "raw0"),
        processed_dir=str(tmp_path / "h"),
        split=SplitMode.files,
        max_ids_per_feature=50,
    )
    preprocess(hashed)
    with pytest.raises(DataError, match="no vocabulary to grow"):
        preprocess(_cfg(days, 1, vocab_from=hashed.processed_dir))
    assert Manifest.load(old_cfg.processed_dir).vocab_generations is None
