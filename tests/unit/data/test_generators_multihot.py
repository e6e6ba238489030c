"""The generators' multi-hot columns: lists that parse, bag sizes in bounds, reproducible, an optimum that
counts them, the one-hot layouts' bytes unchanged, and the declared layout checked against the generator's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, DataConfig, MovieLensConfig, SyntheticConfig
from pipeline.data.generators import base, movielens, synthetic
from pipeline.data.prepare import check_generator_layout
from pipeline.data.schema import CRITEO
from pipeline.data.tsv import BadRows, read_blocks
from tests.conftest import CONF_DIR

MULTI = SyntheticConfig(
    num_train_rows=3000,
    num_val_rows=3000,
    num_test_rows=2000,
    max_cardinality=120,
    seed=3,
    num_list_columns=2,
    weighted_column=True,
    max_bag_size=6,
    sequence_length=12,
    sequence_window=4,
    sequence_decay=0.9,
    list_cardinality=50,
)
RECENT = MovieLensConfig(
    num_users=40, num_items=60, num_train_rows=2000, num_val_rows=500, num_test_rows=500, num_recent_items=5
)
WEIGHTS = {0.5, 1.0, 2.0, 3.0}


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def _split_list(field: str) -> list[str]:
    return field.split(",") if field else []


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for split in base.SPLITS:
        h.update((folder / f"{split}.tsv").read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    synthetic.generate(MULTI, out)
    return out


def test_list_columns_follow_the_criteo_columns_and_parse_with_split(multi_dir) -> None:
    rows = _rows(multi_dir / "train.tsv")
    assert len(rows) == MULTI.num_train_rows and {len(r) for r in rows} == {1 + 13 + 26 + 4}
    assert synthetic.schema(MULTI).sparse_columns[26:] == ("L1", "L2", "W1", "S1")
    sizes = {name: [] for name in ("L1", "L2", "W1", "S1")}
    for r in rows:
        for name, field in zip(sizes, r[40:], strict=True):
            tokens = _split_list(field)
            sizes[name].append(len(tokens))
            for token in tokens:
                if name == "W1":
                    key, weight = token.split(":")
                    assert float(weight) in WEIGHTS, token
                else:
                    key = token
                assert len(key) == 8 and int(key, 16) >= 0, token
    for name, longest in (("L1", 6), ("L2", 6), ("W1", 6), ("S1", 12)):
        assert min(sizes[name]) == 0, f"{name}: empty bags occur"
        assert max(sizes[name]) == longest, f"{name}: bag sizes reach {longest} and stay within it"


def test_the_pipelines_reader_parses_every_row_with_the_generators_schema(multi_dir) -> None:
    counter = BadRows()
    blocks = list(read_blocks(multi_dir / "val.tsv", schema=synthetic.schema(MULTI), counter=counter))
    assert counter.total == 0 and sum(len(b) for b in blocks) == MULTI.num_val_rows
    lengths = np.concatenate([b.lists.lengths for b in blocks])
    assert lengths.shape == (MULTI.num_val_rows, 4)
    assert lengths[:, 3].max() == MULTI.sequence_window, "S1 is declared with its window as cap: the newest kept"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, multi_dir) -> None:
    synthetic.generate(MULTI, tmp_path / "again")
    synthetic.generate(replace(MULTI, seed=4), tmp_path / "other")
    for split in base.SPLITS:
        ours = (multi_dir / f"{split}.tsv").read_bytes()
        assert ours == (tmp_path / "again" / f"{split}.tsv").read_bytes()
        assert ours != (tmp_path / "other" / f"{split}.tsv").read_bytes()


def test_optimum_counts_the_lists_and_beats_the_best_model_without_them(multi_dir) -> None:
    record = json.loads((multi_dir / base.OPTIMUM_FILE).read_text())
    assert synthetic.is_complete(MULTI, multi_dir)
    assert record["schema"] == synthetic.schema(MULTI).to_dict()
    for split in ("val", "test"):
        full, without = record["optimum"][split], record["optimum_without"]["lists"][split]
        assert full["auc"] > without["auc"] + 0.05, (full, without)
        assert full["logloss"] < without["logloss"]
        # Without the lists the best probability is their draws averaged out: still calibrated.
        assert without["calibration"] == pytest.approx(1.0, abs=0.06)
        assert 0.55 < without["auc"] < full["auc"] < 1.0


def test_one_hot_layouts_write_the_bytes_they_always_did(tmp_path) -> None:
    """Digests of the generators' output before list columns existed (same configs as test_generators.py and
    test_columns.py): new config fields at their defaults change nothing."""
    small = SyntheticConfig(num_train_rows=3000, num_val_rows=2000, num_test_rows=1000, max_cardinality=300, seed=7)
    small_ml = MovieLensConfig(num_users=80, num_items=60, num_train_rows=3000, num_val_rows=500, num_test_rows=500)
    synthetic.generate(small, tmp_path / "s")
    movielens.generate(small_ml, tmp_path / "m")
    assert _digest(tmp_path / "s") == "15067b410dcfc29c59b6b4db77a0eff9ec758cecfda3d3032a5fb60e9e6b9523"
    assert _digest(tmp_path / "m") == "97c20279af42e2d76b6e826bab6de128cabebf00acbbb8cbaa70d04257189f93"
    assert synthetic.schema(small) == CRITEO and movielens.schema(small_ml) == movielens.SCHEMA
    record = json.loads((tmp_path / "s" / base.OPTIMUM_FILE).read_text())
    assert "optimum_without" not in record and "schema" not in record


def test_a_record_from_before_the_list_fields_is_still_complete(tmp_path) -> None:
    small = SyntheticConfig(num_train_rows=300, num_val_rows=200, num_test_rows=100, max_cardinality=50)
    synthetic.generate(small, tmp_path)
    path = tmp_path / base.OPTIMUM_FILE
    record = json.loads(path.read_text())
    new_fields = set(asdict(SyntheticConfig())) - {
        "num_train_rows",
        "num_val_rows",
        "num_test_rows",
        "max_cardinality",
        "zipf_alpha",
        "target_ctr",
        "seed",
    }
    record["config"] = {k: v for k, v in record["config"].items() if k not in new_fields}
    path.write_text(json.dumps(record))
    assert synthetic.is_complete(small, tmp_path)
    assert not synthetic.is_complete(replace(small, num_list_columns=1), tmp_path)


def test_recent_items_are_the_users_earlier_items_oldest_first(tmp_path) -> None:
    record = movielens.generate(RECENT, tmp_path)
    assert record["schema"]["multi_hot_columns"] == {"recent_items": 5}
    seen: dict[str, list[str]] = {}
    lengths = []
    for split in base.SPLITS:  # the log in time order: train, then val, then test
        for r in _rows(tmp_path / f"{split}.tsv"):
            assert len(r) == 1 + 2 + 5
            user, item, recent = r[3], r[4], _split_list(r[7])
            assert recent == seen.get(user, [])[-5:], (split, user)
            assert all(int(i) < RECENT.num_items for i in recent)
            seen.setdefault(user, []).append(item)
            lengths.append(len(recent))
    assert min(lengths) == 0 and max(lengths) == 5
    assert 0.6 < record["optimum"]["val"]["auc"] < 1.0
    counter = BadRows()
    blocks = list(read_blocks(tmp_path / "val.tsv", schema=movielens.schema(RECENT), counter=counter))
    assert counter.total == 0 and sum(len(b) for b in blocks) == RECENT.num_val_rows


def test_recent_items_move_the_optimum(tmp_path) -> None:
    """The same impressions with and without the recent-items affinity: it carries signal of its own."""
    with_recent = movielens.generate(replace(RECENT, num_train_rows=20000, num_val_rows=20000), tmp_path / "a")
    none = movielens.generate(
        replace(RECENT, num_train_rows=20000, num_val_rows=20000, recent_items_scale=0.0), tmp_path / "b"
    )
    assert with_recent["optimum"]["val"]["auc"] > none["optimum"]["val"]["auc"] + 0.02


def _shipped(name: str, **overrides) -> DataConfig:
    yaml = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
    yaml.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), yaml, overrides)
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("name", ["synthetic_multihot", "movielens_recent"])
def test_shipped_list_configs_declare_their_generators_layout(name) -> None:
    cfg = _shipped(name)
    check_generator_layout(cfg)
    spec = cfg.synthetic if cfg.synthetic is not None else cfg.movielens
    module = synthetic if cfg.synthetic is not None else movielens
    longest = module.list_lengths(spec)
    # A cap of 0 and one at least the longest list the generator writes keep the same ids.
    check_generator_layout(
        replace(cfg, multi_hot_columns={c: cap or longest[c] for c, cap in cfg.multi_hot_columns.items()})
    )


def test_a_layout_without_the_list_declaration_fails_naming_the_keys() -> None:
    cfg = _shipped("synthetic_multihot")
    with pytest.raises(ConfigError, match=r"data.multi_hot_columns=\{'L1': 0, 'L2': 0, 'W1': 0, 'S1': 10\}"):
        check_generator_layout(replace(cfg, multi_hot_columns={**cfg.multi_hot_columns, "S1": 0}))
    with pytest.raises(ConfigError, match=r"data.weighted_columns=\['W1'\].*synthetic_multihot.yaml"):
        check_generator_layout(replace(cfg, weighted_columns=[]))
    with pytest.raises(ConfigError, match=r"data.synthetic writes the columns .*synthetic_multihot.yaml"):
        check_generator_layout(
            replace(cfg, sparse_columns=cfg.sparse_columns[:-1], multi_hot_columns={}, weighted_columns=[])
        )
    recent = _shipped("movielens_recent")
    with pytest.raises(ConfigError, match=r"data.movielens writes the list columns .*recent_items"):
        check_generator_layout(replace(recent, multi_hot_columns={"recent_items": 5}))
