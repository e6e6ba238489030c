"""MLPerf's multi-hot materialisation: the bag rule, the folder it writes, restarts, and the loader's view of it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, DataConfig, IdMode, MaterializeConfig, SplitMode, SyntheticConfig
from pipeline.data import materialize as mat
from pipeline.data.generators import synthetic
from pipeline.data.loader import BinarySplit
from pipeline.data.manifest import Manifest
from pipeline.data.prepare import prepare_data
from pipeline.data.preprocess import preprocess
from pipeline.errors import DataError

MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
MLPERF_TABLES = [40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209, 11938]
MLPERF_TABLES += [155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36]
SMALL = SyntheticConfig(num_train_rows=3000, num_val_rows=700, num_test_rows=500, max_cardinality=300, seed=5)

# The rule as the module docstring states it, in Python integers: an independent check of the compiled kernel.
_M64, _GAMMA = 2**64 - 1, 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _sm(z: int) -> int:
    return _mix((z + _GAMMA) & _M64)


def rule_bag(seed: int, table: int, x: int, size: int, n: int) -> list[int]:
    key = _sm(_sm(_sm(seed) ^ table) ^ x)
    return [x] + [_mix((key + k * _GAMMA) & _M64) % n for k in range(1, size)]


def _spec(source: Path, seed: int = 0) -> MaterializeConfig:
    return MaterializeConfig(source_dir=str(source), sizes=list(MLPERF_SIZES), seed=seed)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A one-hot preprocessing (3 parts: train, val, test) hashed into MLPerf's table sizes."""
    root = tmp_path_factory.mktemp("mat")
    synthetic.generate(SMALL, root / "raw")
    cfg = DataConfig(
        name="t",
        raw_dir=str(root / "raw"),
        processed_dir=str(root / "onehot"),
        split=SplitMode.files,
        id_mode=IdMode.hash,
        num_embeddings_per_feature=list(MLPERF_TABLES),
    )
    preprocess(cfg)
    return root / "onehot"


@pytest.fixture(scope="module")
def bags(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bags")
    mat.materialize(source, out, _spec(source))
    return out


def _part_hashes(out: Path) -> dict:
    m = Manifest.load(out)
    return {s: [{k: f["sha256"] for k, f in p["files"].items()} for p in info.parts] for s, info in m.splits.items()}


class Killed(BaseException):
    """The process dying (like a KeyboardInterrupt, not an error the code could handle)."""


_REAL_PART, _REAL_WRITE_JSON = mat._materialize_part, mat.write_json


def _spy(monkeypatch, fail: str | None = None) -> list[str]:
    """Record the parts materialised (not skipped); with ``fail``, that part dies before its done.json."""
    calls: list[str] = []
    real_part, real_write = _REAL_PART, _REAL_WRITE_JSON

    def part(source_dir, out, name, *args, **kwargs):
        calls.append(name)
        return real_part(source_dir, out, name, *args, **kwargs)

    def write_json(path, obj):
        if fail is not None and f"parts/{fail}/" in str(path):
            raise Killed(path)
        real_write(path, obj)

    monkeypatch.setattr(mat, "_materialize_part", part)
    monkeypatch.setattr(mat, "write_json", write_json)
    return calls


def test_splitmix_is_the_published_generator() -> None:
    assert _sm(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from seed 0
    assert int(mat._sm(np.uint64(0))) == 0xE220A8397B1DCDAF


def test_bag_is_the_id_then_the_rules_draws() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, n, 64) for n in MLPERF_TABLES], axis=1).astype(np.int32)
    ids[3] = np.asarray(MLPERF_TABLES) - 1  # the last row of every table
    ids[4] = 0
    rule = mat.BagRule(tuple(MLPERF_SIZES), tuple(MLPERF_TABLES), seed=7)
    lists = rule.bags(ids)
    assert lists.values.dtype == np.int32 and len(lists.values) == 64 * sum(MLPERF_SIZES)
    assert (lists.lengths == MLPERF_SIZES).all()
    rows = lists.values.reshape(64, -1)
    starts = np.cumsum([0, *MLPERF_SIZES[:-1]])
    for j, (size, n) in enumerate(zip(MLPERF_SIZES, MLPERF_TABLES, strict=True)):
        got = rows[:, starts[j] : starts[j] + size]
        assert (got[:, 0] == ids[:, j]).all(), "the bag starts with the id itself"
        assert ((got >= 0) & (got < n)).all()
        for i in (0, 3, 4, 63):
            assert got[i].tolist() == rule_bag(7, j, int(ids[i, j]), size, n)


def test_bag_depends_on_the_id_and_seed_only() -> None:
    rule = mat.BagRule((100, 12), (40000000, 1000), seed=0)
    ids = np.array([[5, 9], [123456, 9], [5, 9]], np.int64)
    rows = rule.bags(ids).values.reshape(3, -1)
    assert (rows[0] == rows[2]).all(), "the same ids in two rows: the same bags"
    assert (rows[0, :100] != rows[1, :100]).any()
    assert (rows[0, 100:] == rows[1, 100:]).all()
    again = mat.BagRule((100, 12), (40000000, 1000), seed=0).bags(ids[::-1].copy()).values.reshape(3, -1)
    assert (again[::-1] == rows).all(), "the order of rows changes nothing"
    other = mat.BagRule((100, 12), (40000000, 1000), seed=1).bags(ids).values.reshape(3, -1)
    assert (other[:, 0] == rows[:, 0]).all() and (other[:, 1:100] != rows[:, 1:100]).mean() > 0.99


def test_drawn_ids_are_uniform_over_the_table() -> None:
    small = mat.BagRule((100,), (50,), seed=3).bags(np.arange(50).reshape(-1, 1)).values.reshape(50, 100)[:, 1:]
    counts = np.bincount(small.reshape(-1), minlength=50)  # 4,950 draws over 50 rows, 99 expected each
    chi2 = ((counts - 99) ** 2 / 99).sum()
    assert chi2 < 49 + 5 * np.sqrt(2 * 49), chi2  # chi-square, 49 degrees of freedom: mean 49, sd 9.9
    n = 40_000_000
    ids = np.random.default_rng(1).choice(n, 20_000, replace=False).reshape(-1, 1)
    draws = mat.BagRule((100,), (n,), seed=0).bags(ids).values.reshape(-1, 100)[:, 1:].reshape(-1)
    assert abs(draws.mean() / n - 0.5) < 0.002  # 1.98M draws: sd of the mean 0.0002
    counts = np.bincount(draws * 100 // n, minlength=100)
    expected = len(draws) / 100
    assert ((counts - expected) ** 2 / expected).sum() < 99 + 5 * np.sqrt(2 * 99)


def test_an_id_outside_its_table_names_row_and_table() -> None:
    with pytest.raises(DataError, match=r"row 1: id 10 of table 1 is outside its 10 rows"):
        mat.BagRule((2, 2), (10, 10)).bags(np.array([[1, 2], [3, 10]], np.int32))


def test_manifest_makes_every_column_a_bag(source, bags) -> None:
    src, m = Manifest.load(source), Manifest.load(bags)
    assert m.schema.multi_hot == tuple(zip(src.schema.sparse_columns, MLPERF_SIZES, strict=True))
    assert m.schema.weighted == () and m.schema.feature_names == src.schema.feature_names
    assert m.pooling_factors == [float(s) for s in MLPERF_SIZES] and m.max_lengths == MLPERF_SIZES
    assert m.num_embeddings_per_feature == src.num_embeddings_per_feature == MLPERF_TABLES
    assert m.optimum == src.optimum and m.optimum is not None, "a bag is a function of its id: same optimum"
    assert {s: v.num_rows for s, v in m.splits.items()} == {s: v.num_rows for s, v in src.splits.items()}
    spec = m.settings["materialize"]
    assert spec["sizes"] == MLPERF_SIZES and spec["seed"] == 0 and spec["rule"] == mat.RULE
    assert spec["source_fingerprint"] == mat.source_fingerprint(src)
    assert m.settings["id_mode"] == "hash"
    files = m.splits["train"].parts[0]["files"]
    assert files["sparse"]["shape"] == [3000, 0] and files["lengths"]["shape"] == [3000, 26]
    assert files["values"]["shape"] == [3000 * sum(MLPERF_SIZES)] and "weights" not in files
    assert files["dense"]["sha256"] == src.splits["train"].parts[0]["files"]["dense"]["sha256"]


def test_loader_batch_is_the_rule_applied_to_the_source_row(source, bags) -> None:
    one_hot, multi = BinarySplit(source, "val"), BinarySplit(bags, "val")
    rows = np.array([0, 1, 17, 300, len(one_hot) - 1])
    ids = one_hot.gather("sparse", rows)
    batch = multi.make_batch(rows)
    np.testing.assert_array_equal(batch.dense_features.numpy(), one_hot.gather("dense", rows))
    np.testing.assert_array_equal(batch.labels.numpy(), one_hot.gather("labels", rows))
    features = batch.sparse_features.to_dict()
    assert list(features) == list(Manifest.load(bags).schema.feature_names)
    for j, (name, size, n) in enumerate(zip(features, MLPERF_SIZES, MLPERF_TABLES, strict=True)):
        assert features[name].lengths().tolist() == [size] * len(rows)
        got = features[name].values().reshape(len(rows), size).tolist()
        assert got == [rule_bag(0, j, int(x), size, n) for x in ids[:, j]], name


def test_same_source_and_seed_give_the_same_bytes_whatever_the_block(source, bags, tmp_path) -> None:
    mat.materialize(source, tmp_path / "small_blocks", _spec(source), block_mb=0.05)
    assert _part_hashes(tmp_path / "small_blocks") == _part_hashes(bags)
    mat.materialize(source, tmp_path / "seed1", _spec(source, seed=1))
    other, ours = _part_hashes(tmp_path / "seed1"), _part_hashes(bags)
    assert other["train"][0]["values"] != ours["train"][0]["values"]
    assert other["train"][0]["dense"] == ours["train"][0]["dense"]


def test_killed_run_redoes_only_the_unfinished_parts(source, bags, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    calls = _spy(monkeypatch, fail="001")
    with pytest.raises(Killed):
        mat.materialize(source, out, _spec(source))
    assert calls == ["000", "001"] and not Manifest.path(out).exists()
    assert (out / "parts/001/train/values.bin").exists() is False and (out / "parts/001/val/values.bin").exists()
    calls = _spy(monkeypatch)
    mat.materialize(source, out, _spec(source))
    assert calls == ["001", "002"], "part 000 was finished: verified and skipped"
    assert _part_hashes(out) == _part_hashes(bags)


def test_rerun_skips_verified_parts_and_redoes_a_damaged_one(source, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    mat.materialize(source, out, _spec(source))
    before = _part_hashes(out)
    calls = _spy(monkeypatch)
    mat.materialize(source, out, _spec(source))
    assert calls == []
    values = out / "parts/000/train/values.bin"
    data = bytearray(values.read_bytes())
    data[1000] ^= 0xFF
    values.write_bytes(bytes(data))
    mat.materialize(source, out, _spec(source))
    assert calls == ["000"] and _part_hashes(out) == before
    mat.materialize(source, out, _spec(source, seed=2))
    assert calls == ["000", "000", "001", "002"], "another seed: every part again"


def test_prepare_data_makes_the_source_then_the_bags_and_reuses_both(tmp_path, monkeypatch) -> None:
    spec = SyntheticConfig(num_train_rows=1500, num_val_rows=300, num_test_rows=300, max_cardinality=50, seed=1)
    cfg = DataConfig(
        name="t",
        raw_dir=str(tmp_path / "raw"),
        processed_dir=str(tmp_path / "bags"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
        synthetic=spec,
        materialize=MaterializeConfig(source_dir=str(tmp_path / "onehot"), sizes=list(MLPERF_SIZES)),
    )
    m = prepare_data(cfg)
    assert Manifest.load(tmp_path / "onehot").schema.multi_hot == ()
    assert m.schema.multi_hot_columns == list(m.schema.sparse_columns)
    assert (tmp_path / "bags" / "vocab.npz").exists(), "vocab mode: data.min_id_frequency reads the counts there"
    assert m.optimum == json.loads((tmp_path / "raw" / "optimum.json").read_text())["optimum"]
    calls = _spy(monkeypatch)
    prepare_data(cfg)
    assert calls == []
    reseeded = dataclasses.replace(cfg, materialize=dataclasses.replace(cfg.materialize, seed=9))
    assert prepare_data(reseeded).settings["materialize"]["seed"] == 9 and calls == ["000", "001", "002"]


def test_refuses_a_source_that_is_not_one_hot_or_the_same_folder(source, bags, tmp_path) -> None:
    with pytest.raises(ConfigError, match="need a folder of their own"):
        mat.materialize(source, source, _spec(source))
    with pytest.raises(DataError, match="has list columns"):
        mat.materialize(bags, tmp_path / "twice", _spec(bags))
    with pytest.raises(ConfigError, match="26 categorical columns"):
        mat.materialize(source, tmp_path / "x", MaterializeConfig(source_dir=str(source), sizes=[1, 2]))


def test_pooling_factors_come_from_the_data_else_the_spec(bags, tmp_path) -> None:
    base = DataConfig(name="t", raw_dir="r", processed_dir=str(tmp_path / "none"))
    assert mat.pooling_factors(base) == [1.0] * 26
    planned = dataclasses.replace(base, materialize=MaterializeConfig(source_dir="s", sizes=list(MLPERF_SIZES)))
    assert mat.pooling_factors(planned) == [float(s) for s in MLPERF_SIZES]
    assert mat.pooling_factors(dataclasses.replace(base, processed_dir=str(bags))) == [float(s) for s in MLPERF_SIZES]
