"""The synthetic generator writes valid raw Criteo rows, reproducibly, with its optimum."""

from __future__ import annotations

import json
import re

import numpy as np

from pipeline.config import SyntheticConfig
from pipeline.data.generators import base, synthetic

SMALL = SyntheticConfig(num_train_rows=3000, num_val_rows=2000, num_test_rows=1000, max_cardinality=300, seed=7)


def test_rows_have_the_raw_criteo_layout(tmp_path) -> None:
    synthetic.generate(SMALL, tmp_path)
    lines = (tmp_path / "train.tsv").read_text().splitlines()
    assert len(lines) == SMALL.num_train_rows
    fields = [line.split("\t") for line in lines]
    assert {len(f) for f in fields} == {40}
    assert {f[0] for f in fields} == {"0", "1"}
    dense = [[v for v in f[1:14]] for f in fields]
    assert any(v == "" for row in dense for v in row), "dense columns have missing values"
    assert all(re.fullmatch(r"-?\d+", v) for row in dense for v in row if v)
    assert any(row[1].startswith("-") for row in dense), "I2 has negative values"
    cats = [v for f in fields for v in f[14:]]
    assert "" in cats, "categorical columns have missing values"
    assert all(re.fullmatch(r"[0-9a-f]{8}", v) for v in cats if v)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.generate(SMALL, a)
    synthetic.generate(SMALL, b)
    synthetic.generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 8}), c)
    for split in base.SPLITS:
        assert (a / f"{split}.tsv").read_bytes() == (b / f"{split}.tsv").read_bytes()
        assert (a / f"{split}.tsv").read_bytes() != (c / f"{split}.tsv").read_bytes()


def test_optimum_is_written_and_plausible(tmp_path) -> None:
    synthetic.generate(SMALL, tmp_path)
    record = json.loads((tmp_path / base.OPTIMUM_FILE).read_text())
    for split in ("val", "test"):
        o = record["optimum"][split]
        assert 0.6 < o["auc"] < 1.0
        assert 0 < o["normalized_entropy"] < 1, "the true probabilities beat predicting the base rate"
    assert synthetic.is_complete(SMALL, tmp_path)
    assert not synthetic.is_complete(SyntheticConfig(**{**SMALL.__dict__, "seed": 8}), tmp_path)


def test_ids_follow_a_skewed_popularity(tmp_path) -> None:
    synthetic.generate(SMALL, tmp_path)
    col = [line.split("\t")[14] for line in (tmp_path / "train.tsv").read_text().splitlines()]
    _, counts = np.unique([c for c in col if c], return_counts=True)
    counts = np.sort(counts)[::-1]
    assert counts[0] > 20 * np.median(counts), "Zipf: the most popular id dominates the median one"
