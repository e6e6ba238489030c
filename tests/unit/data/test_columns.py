"""Declared columns: a non-Criteo layout preprocesses, loads, is recorded, and is never silently reused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import (
    BadRowPolicy,
    CategoricalFormat,
    ConfigError,
    DataConfig,
    IdMode,
    MovieLensConfig,
    SplitMode,
    SyntheticConfig,
    TrainConfig,
    validate,
)
from pipeline.data.features import MISSING_ID
from pipeline.data.generators import movielens, synthetic
from pipeline.data.loader import BinarySplit
from pipeline.data.manifest import MANIFEST, Manifest
from pipeline.data.prepare import check_generator_layout, prepare_data
from pipeline.data.preprocess import is_current, preprocess
from pipeline.data.schema import CRITEO, Schema
from pipeline.data.tsv import BadRows, RawDataError, read_blocks
from tests.conftest import CONF_DIR

DENSE = ["age", "activity"]
SPARSE = ["user_id", "item_id", "genre"]


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def _int_rows(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        user, item, genre = rng.integers(0, 50), rng.integers(10**12, 10**12 + 30), rng.integers(0, 5)
        rows.append(
            [
                str(rng.integers(0, 2)),
                str(rng.integers(0, 90)),
                "" if rng.random() < 0.1 else str(rng.integers(0, 500)),
                str(user),
                str(item),
                "" if rng.random() < 0.2 else str(genre),
            ]
        )
    return rows


def _int_config(root: Path, **kw) -> DataConfig:
    base = DataConfig(
        name="ints",
        raw_dir=str(root / "raw"),
        processed_dir=str(root / "out"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
        dense_columns=list(DENSE),
        sparse_columns=list(SPARSE),
        feature_names=[],
        categorical_format=CategoricalFormat.int,
    )
    return replace(base, **kw)


@pytest.fixture
def int_data(tmp_path) -> tuple[DataConfig, dict[str, list[list[str]]]]:
    (tmp_path / "raw").mkdir()
    rows = {s: _int_rows(n, i) for i, (s, n) in enumerate((("train", 600), ("val", 200), ("test", 150)))}
    for s, r in rows.items():
        _write_rows(tmp_path / "raw" / f"{s}.tsv", r)
    return _int_config(tmp_path), rows


def test_declared_int_layout_preprocesses_and_loads_with_its_widths_and_keys(int_data) -> None:
    cfg, rows = int_data
    manifest = preprocess(cfg)
    assert list(manifest.schema.dense_columns) == DENSE and list(manifest.schema.sparse_columns) == SPARSE
    assert list(manifest.schema.feature_names) == SPARSE, "feature_names=[] names the features after the columns"
    assert manifest.schema.categorical_format.value == "int"
    assert manifest.num_dense == 2 and manifest.num_sparse == 3
    assert len(manifest.num_embeddings_per_feature) == 3
    assert manifest.num_embeddings_per_feature[2] == 5 + 2, "5 genres + missing + rare"

    split = BinarySplit(cfg.processed_dir, "val")
    batch = split.make_batch(np.arange(16))
    assert batch.dense_features.shape == (16, 2)
    assert batch.sparse_features.keys() == SPARSE
    assert batch.sparse_features.lengths().tolist() == [1] * 48
    raw = np.array(rows["val"])
    np.testing.assert_allclose(split.column("dense")[:, 0], np.log1p(raw[:, 1].astype(np.float64)), rtol=1e-6)
    np.testing.assert_array_equal(split.column("labels"), raw[:, 0].astype(int))
    ids = split.column("sparse")
    assert ((raw[:, 3:] == "") == (ids == MISSING_ID)).all()
    for j in range(3):  # one raw id <-> one table row
        pairs = set(zip(raw[:, 3 + j], ids[:, j], strict=True))
        assert len(pairs) == len({r for r, _ in pairs}) == len({i for _, i in pairs})
    kjt = batch.sparse_features.to_dict()
    np.testing.assert_array_equal(kjt["item_id"].values().numpy(), ids[:16, 1])


def test_explicit_feature_names_become_the_kjt_keys(int_data) -> None:
    cfg, _ = int_data
    cfg = replace(cfg, feature_names=["u", "i", "g"])
    preprocess(cfg)
    assert list(Manifest.load(cfg.processed_dir).schema.feature_names) == ["u", "i", "g"]
    assert BinarySplit(cfg.processed_dir, "train").make_batch(np.arange(4)).sparse_features.keys() == ["u", "i", "g"]


BAD_IDS = ["-3", "0x1f", " 5", "1.5", "abc", "99999999999999999999", "9223372036854775808"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_int_categorical_stops_naming_file_line_and_field(int_data, bad) -> None:
    cfg, rows = int_data
    rows["train"][4][4] = bad
    _write_rows(Path(cfg.raw_dir) / "train.tsv", rows["train"])
    with pytest.raises(
        RawDataError, match=r"train.tsv:5: field item_id is .*expected a decimal integer id.*bad_categorical"
    ):
        preprocess(cfg)


def test_bad_int_categoricals_are_skipped_and_counted(int_data) -> None:
    cfg, rows = int_data
    for i, bad in enumerate(BAD_IDS):
        rows["train"][10 * i + 3][3] = bad
    _write_rows(Path(cfg.raw_dir) / "train.tsv", rows["train"])
    manifest = preprocess(replace(cfg, bad_rows=BadRowPolicy.skip))
    assert manifest.bad_rows["by_kind"]["bad_categorical"] == len(BAD_IDS)
    assert manifest.splits["train"].num_rows == 600 - len(BAD_IDS)
    assert "train.tsv:4: field user_id is b'-3'" in manifest.bad_rows["examples"][0]


def test_largest_int_id_parses() -> None:
    schema = Schema(("a",), ("x",), ("x",), CategoricalFormat.int)
    block = next(read_blocks(_tmp_file("1\t\t9223372036854775807\n0\t3\t007\n"), schema=schema))
    assert block.sparse[:, 0].tolist() == [2**63 - 1, 7] and block.dense_missing[:, 0].tolist() == [True, False]


def _tmp_file(text: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "f.tsv"
    path.write_text(text)
    return path


def test_hex_layout_with_other_columns_and_no_dense_columns(tmp_path) -> None:
    (tmp_path / "raw").mkdir()
    rng = np.random.default_rng(0)
    for s in ("train", "val", "test"):
        _write_rows(
            tmp_path / "raw" / f"{s}.tsv",
            [
                [str(rng.integers(0, 2)), f"{rng.integers(0, 9):08x}", f"{rng.integers(0, 2**32):08x}"]
                for _ in range(50)
            ],
        )
    cfg = DataConfig(
        name="hex",
        raw_dir=str(tmp_path / "raw"),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.files,
        id_mode=IdMode.hash,
        max_ids_per_feature=11,
        dense_columns=[],
        sparse_columns=["site", "device"],
        feature_names=[],
    )
    manifest = preprocess(cfg)
    assert manifest.num_embeddings_per_feature == [11, 11] and manifest.num_dense == 0
    batch = BinarySplit(cfg.processed_dir, "test").make_batch(np.arange(8))
    assert batch.dense_features.shape == (8, 0) and batch.sparse_features.keys() == ["site", "device"]
    # A Criteo-width row is the wrong field count here, named with the declared layout.
    with pytest.raises(RawDataError, match=r"40 tab-separated fields, expected 3"):
        list(read_blocks(_tmp_file("\t".join(["1"] * 40) + "\n"), schema=Schema.from_config(cfg)))


def test_changed_columns_are_not_reused(int_data) -> None:
    cfg, _ = int_data
    preprocess(cfg)
    assert is_current(cfg)
    for changed in (
        replace(cfg, feature_names=["a", "b", "c"]),
        replace(cfg, dense_columns=["age"], sparse_columns=["activity", *SPARSE]),
        replace(cfg, categorical_format=CategoricalFormat.hex),
    ):
        assert not is_current(changed), changed
    # Preprocessing again with the new names rebuilds the parts and records them.
    renamed = replace(cfg, feature_names=["a", "b", "c"])
    assert list(preprocess(renamed).schema.feature_names) == ["a", "b", "c"]
    assert is_current(renamed) and not is_current(cfg)


def test_criteo_data_preprocessed_before_columns_were_declared_is_reused(tmp_path) -> None:
    synthetic.generate(
        SyntheticConfig(num_train_rows=300, num_val_rows=100, num_test_rows=100, max_cardinality=50, seed=1),
        tmp_path / "raw",
    )
    cfg = DataConfig(
        name="c",
        raw_dir=str(tmp_path / "raw"),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
    )
    manifest = preprocess(cfg)
    assert list(manifest.schema.feature_names) == list(CRITEO.feature_names) == [f"cat_{i}" for i in range(26)]
    assert "schema" not in manifest.settings, "Criteo's layout keeps the fingerprints of older data"
    # An older manifest has no schema fields: it is Criteo's, still current, and loads with cat_* keys.
    old = {
        k: v
        for k, v in manifest.to_dict().items()
        if k not in ("dense_columns", "sparse_columns", "feature_names", "categorical_format")
    }
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(old))
    assert is_current(cfg)
    kjt = BinarySplit(cfg.processed_dir, "val").make_batch(np.arange(2)).sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(26)]
    assert not is_current(
        replace(
            cfg,
            dense_columns=[f"I{i + 1}" for i in range(12)],
            sparse_columns=["I13", *cfg.sparse_columns],
            feature_names=[],
        )
    )


def _train_config(**data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data = DataConfig(name="x", raw_dir="r", processed_dir="p", **data)
    return cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"sparse_columns": ["a", "b"]},
            r"data.feature_names has 26 names but data.sparse_columns has 2 .*feature_names=\[\]",
        ),
        (
            {"sparse_columns": ["a", "b"], "feature_names": [], "num_embeddings_per_feature": [5] * 26},
            r"data.num_embeddings_per_feature has 26 entries .*\(2 in data.sparse_columns\)",
        ),
        ({"sparse_columns": [], "feature_names": []}, r"data.sparse_columns is empty"),
        ({"dense_columns": ["a"], "sparse_columns": ["a"], "feature_names": []}, r"\['a'\] appear more than once"),
        ({"dense_columns": ["label"]}, r"the label column is called 'label'"),
        ({"sparse_columns": ["a b"], "feature_names": []}, r"without whitespace"),
        ({"synthetic": SyntheticConfig(), "movielens": MovieLensConfig()}, r"data.synthetic and data.movielens"),
    ],
)
def test_bad_column_declarations_fail_naming_the_key(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(_train_config(**data), world_size=1)


def test_declared_caps_are_checked_against_the_declared_columns() -> None:
    ok = _train_config(sparse_columns=["a", "b"], feature_names=[], num_embeddings_per_feature=[5, 7])
    validate(ok, 1)  # one cap per declared column: accepted as given
    assert list(ok.data.num_embeddings_per_feature) == [5, 7]
    with pytest.raises(ConfigError, match=r"has 3 entries .*\(2 in data.sparse_columns\)"):
        validate(_train_config(sparse_columns=["a", "b"], feature_names=[], num_embeddings_per_feature=[5, 7, 9]), 1)


SMALL_ML = MovieLensConfig(num_users=80, num_items=60, num_train_rows=3000, num_val_rows=500, num_test_rows=500)


def test_movielens_output_parses_with_its_schema(tmp_path) -> None:
    record = movielens.generate(SMALL_ML, tmp_path)
    assert set(record["optimum"]) == {"val", "test"} and 0.6 < record["optimum"]["val"]["auc"] < 1
    assert movielens.is_complete(SMALL_ML, tmp_path)
    assert not movielens.is_complete(replace(SMALL_ML, seed=1), tmp_path)
    counter = BadRows()
    blocks = list(read_blocks(tmp_path / "train.tsv", schema=movielens.SCHEMA, counter=counter))
    assert counter.total == 0 and sum(len(b) for b in blocks) == 3000
    sparse = np.concatenate([b.sparse for b in blocks])
    assert sparse.dtype == np.int64 and not np.concatenate([b.sparse_missing for b in blocks]).any()
    limits = [SMALL_ML.num_users, SMALL_ML.num_items, SMALL_ML.num_genres, SMALL_ML.num_age_buckets]
    assert (sparse.min(axis=0) >= 0).all() and (sparse.max(axis=0) < limits).all()
    labels = np.concatenate([b.labels for b in blocks])
    assert 0.25 < labels.mean() < 0.55, "target_ctr 0.4"
    # Zipf popularity: the most frequent item is far above the mean.
    assert np.bincount(sparse[:, 1]).max() > 5 * 3000 / SMALL_ML.num_items


def test_movielens_config_generates_and_preprocesses_on_first_use(tmp_path) -> None:
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(CONF_DIR / "data" / "movielens.yaml")
    assert (
        Schema(
            tuple(yaml.dense_columns),
            tuple(yaml.sparse_columns),
            tuple(yaml.sparse_columns),
            CategoricalFormat(yaml.categorical_format),
        )
        == movielens.SCHEMA
    )
    cfg = DataConfig(
        name="ml",
        raw_dir=str(tmp_path / "raw"),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
        dense_columns=list(yaml.dense_columns),
        sparse_columns=list(yaml.sparse_columns),
        feature_names=list(yaml.feature_names),
        categorical_format=CategoricalFormat(yaml.categorical_format),
        movielens=SMALL_ML,
    )
    manifest = prepare_data(cfg)
    assert list(manifest.schema.feature_names) == ["user_id", "item_id", "genre", "user_age_bucket"]
    assert manifest.optimum["val"]["auc"] > 0.6
    batch = BinarySplit(cfg.processed_dir, "train").make_batch(np.arange(32))
    assert batch.dense_features.shape == (32, 2) and torch.isfinite(batch.dense_features).all()
    # The generator's layout must be the declared one.
    with pytest.raises(ConfigError, match=r"data.movielens writes the columns .*pipeline/conf/data/movielens.yaml"):
        check_generator_layout(replace(cfg, categorical_format=CategoricalFormat.hex))
    with pytest.raises(ConfigError, match=r"data.synthetic writes the columns"):
        check_generator_layout(replace(cfg, movielens=None, synthetic=SyntheticConfig()))


@pytest.mark.parametrize("model_name", ["dlrm", "mf"])
def test_exported_model_scores_raw_rows_of_its_declared_layout(tmp_path, model_name) -> None:
    from pipeline.serving.export import ExportedModel, build_dlrm, export_dense_program
    from pipeline.serving.predict import detect_labelled, run

    movielens.generate(SMALL_ML, tmp_path)
    torch.manual_seed(0)
    cap = 97
    names = list(movielens.SCHEMA.feature_names)
    cfg = {"name": model_name, "embedding_dim": 4, "dense_arch_layer_sizes": [8, 4], "over_arch_layer_sizes": [8, 1]}
    dlrm = build_dlrm(cfg, [cap] * 4, names, movielens.SCHEMA.num_dense)
    for p in dlrm.sparse_arch.parameters():
        torch.nn.init.normal_(p, std=0.5)
    spec = {
        "num_embeddings_per_feature": [cap] * 4,
        "feature_names": names,
        "schema": movielens.SCHEMA.to_dict(),
        "input": {"dense_transform": "log1p", "id_mode": "hash", "caps": [cap] * 4, "dense_min": None},
    }
    model = ExportedModel(tmp_path, spec, dlrm, None)
    assert model.schema == movielens.SCHEMA
    assert detect_labelled(tmp_path / "val.tsv", schema=model.schema)
    result = run(model, str(tmp_path / "p.npy"), input_path=str(tmp_path / "val.tsv"), batch_size=128)
    probs = np.load(tmp_path / "p.npy")
    assert result.rows == result.scored == 500 and np.isfinite(probs).all() and probs.std() > 0
    # The dense program takes the declared widths: [B, 2] dense, [B, tables, D] pooled (mf: 2 tables).
    export_dense_program(dlrm, tmp_path / "dense.pt2", movielens.SCHEMA.num_dense)
    program = torch.export.load(str(tmp_path / "dense.pt2")).module()
    tables = 2 if model_name == "mf" else 4
    out = program(torch.zeros(3, 2), torch.zeros(3, tables, 4))
    assert out.shape == (3, 1)
