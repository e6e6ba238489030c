"""Raw TSV -> binary -> batches: values survive the round trip; ranks split batches exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import BadRowPolicy, DataConfig, IdMode, SplitMode, SyntheticConfig
from pipeline.data.features import MISSING_ID, NO_CAP, RARE_ID, IdMapper
from pipeline.data.generators import synthetic
from pipeline.data.loader import BinarySplit, epoch_order, eval_batches, train_batches
from pipeline.data.preprocess import compile_kernels, is_current, preprocess
from pipeline.data.tsv import RawBlock, RawDataError, read_blocks

SMALL = SyntheticConfig(num_train_rows=5000, num_val_rows=1500, num_test_rows=1000, max_cardinality=200, seed=3)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    synthetic.generate(SMALL, root / "raw")
    cfg = DataConfig(
        name="t",
        raw_dir=str(root / "raw"),
        processed_dir=str(root / "out"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
    )
    return cfg, preprocess(cfg)


def synthetic_path(cfg: DataConfig, split: str) -> Path:
    return Path(cfg.raw_dir) / f"{split}.tsv"


def _raw_rows(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_round_trip_dense_labels_and_ids(processed) -> None:
    cfg, manifest = processed
    rows = _raw_rows(synthetic_path(cfg, "val"))
    split = BinarySplit(cfg.processed_dir, "val")
    assert len(split) == len(rows) == manifest.splits["val"].num_rows
    dense = split.column("dense")
    raw_dense = np.array([[float(v) if v else np.nan for v in r[1:14]] for r in rows])
    expected = np.where(np.isnan(raw_dense), 0.0, np.log1p(np.maximum(np.nan_to_num(raw_dense), 0)))
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    assert (raw_dense < 0).any(), "the data has negative values to exercise the clip"
    np.testing.assert_array_equal(split.column("labels"), [int(r[0]) for r in rows])
    ids = split.column("sparse")
    raw_cats = np.array([r[14:] for r in rows])
    assert ((raw_cats == "") == (ids == MISSING_ID)).all(), "missing <-> id 0, nothing else is id 0"
    for j in range(26):  # one raw hash <-> one id, within and across splits
        pairs = set(zip(raw_cats[:, j], ids[:, j], strict=True))
        assert len(pairs) == len({h for h, _ in pairs})
    sizes = manifest.num_embeddings_per_feature
    assert len(sizes) == 26 and (ids.max(axis=0) < np.array(sizes)).all()


def test_manifest_is_reused_until_settings_change(processed) -> None:
    cfg, _ = processed
    assert is_current(cfg)
    assert not is_current(DataConfig(**{**cfg.__dict__, "id_mode": IdMode.hash}))
    assert not is_current(DataConfig(**{**cfg.__dict__, "bad_rows": BadRowPolicy.skip}))


def test_hash_mode_maps_modulo_the_cap(tmp_path, processed) -> None:
    cfg, _ = processed
    hcfg = DataConfig(
        **{**cfg.__dict__, "processed_dir": str(tmp_path), "id_mode": IdMode.hash, "max_ids_per_feature": 97}
    )
    manifest = preprocess(hcfg)
    assert manifest.num_embeddings_per_feature == [97] * 26
    rows = _raw_rows(synthetic_path(cfg, "test"))
    ids = BinarySplit(tmp_path, "test").column("sparse")
    for i in (0, 1, 2):
        for j in range(26):
            h = rows[i][14 + j]
            assert ids[i, j] == (0 if h == "" else 1 + int(h, 16) % 96)


@pytest.mark.parametrize("dtype", [np.uint32, np.int64])  # hex hashes, decimal ids (beyond 2^32 too)
def test_vocab_mode_gives_each_key_its_rank_and_others_the_rare_id(dtype) -> None:
    """The compiled hash-table lookup against a dict: id = 2 + position in the vocabulary (most frequent
    first), RARE_ID for keys outside it, MISSING_ID for missing values; empty, tiny and large
    vocabularies (tables at most half full, so probe chains occur)."""
    rng = np.random.default_rng(0)
    hi = 2**32 if dtype == np.uint32 else 2**50
    sizes = [0, 1, 2, 7, 100, 20_000] * 4 + [3, 50_000]
    vocab = [rng.choice(hi, size=n, replace=False).astype(dtype) for n in sizes]
    mapper = IdMapper(IdMode.vocab, [NO_CAP] * len(vocab), vocab)
    assert mapper.num_embeddings == [n + 2 for n in sizes]
    n = 5000
    sparse = np.empty((n, 26), dtype, order="F")
    for j, v in enumerate(vocab):
        unseen = rng.integers(0, hi, 20).astype(dtype)
        sparse[:, j] = rng.choice(np.concatenate([v, unseen]), n)
    missing = np.asfortranarray(rng.random((n, 26)) < 0.1)
    block = RawBlock(
        np.zeros(n, np.int8), np.zeros((n, 13), np.int64), np.zeros((n, 13), bool), sparse, missing, np.arange(n)
    )
    got = mapper(block)
    for j, v in enumerate(vocab):
        rank = {int(k): i + 2 for i, k in enumerate(v)}
        want = [
            MISSING_ID if m else rank.get(int(k), RARE_ID) for k, m in zip(sparse[:, j], missing[:, j], strict=True)
        ]
        assert got[:, j].tolist() == want, j
    assert (got == RARE_ID).any() and (got > RARE_ID).any()


def test_compile_kernels_checks_the_compiled_code() -> None:
    """What the Docker image runs at build time: compiles (or loads) both kernels and checks their output."""
    compile_kernels()


def test_two_ranks_split_each_global_batch_of_one(processed) -> None:
    cfg, _ = processed
    split = BinarySplit(cfg.processed_dir, "train")
    one = train_batches(split, 512, 0, 1, seed=1, shuffle=True, num_epochs=1)
    r0 = train_batches(split, 512, 0, 2, seed=1, shuffle=True, num_epochs=1)
    r1 = train_batches(split, 512, 1, 2, seed=1, shuffle=True, num_epochs=1)
    n = 0
    for b, b0, b1 in zip(one, r0, r1, strict=True):
        n += 1
        assert b0.labels.numel() == b1.labels.numel() == 256
        both = torch.cat([b0.dense_features, b1.dense_features])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, b.dense_features.tolist()))
    assert n == len(split) // 512


def test_epoch_visits_each_row_once_and_reshuffles(processed) -> None:
    cfg, _ = processed
    split = BinarySplit(cfg.processed_dir, "train")
    e0, e1 = epoch_order(len(split), 1, 0, True), epoch_order(len(split), 1, 1, True)
    assert sorted(e0) == list(range(len(split)))
    assert not np.array_equal(e0, e1)


def test_eval_batches_cover_every_row_exactly_once(processed) -> None:
    cfg, _ = processed
    split = BinarySplit(cfg.processed_dir, "val")  # 1500 rows: the last global batch is partial
    labels = []
    for rank in range(2):
        for eb in eval_batches(split, 1024, rank, 2):
            labels.append(eb.batch.labels[eb.weights > 0])
    assert sum(len(x) for x in labels) == len(split)
    assert torch.cat(labels).sum().item() == int(split.column("labels").sum())


def test_bad_row_names_file_line_and_field(tmp_path) -> None:
    good = "\t".join(["1", *["1"] * 13, *["0a1b2c3d"] * 26])
    bad = "\t".join(["0", *["1"] * 13, "xyz12345", *["0a1b2c3d"] * 25])
    path = tmp_path / "bad.tsv"
    path.write_text(f"{good}\n{good}\n{bad}\n")
    with pytest.raises(RawDataError, match=r"bad.tsv:3: field C1 is b'xyz12345', expected 8 hex digits"):
        list(read_blocks(path))


def test_random_split_is_seeded_and_keeps_every_row(tmp_path, processed) -> None:
    cfg, _ = processed
    src = synthetic_path(cfg, "train")  # 5000 rows
    rcfg = DataConfig(
        name="t",
        raw_dir=str(tmp_path),
        processed_dir=str(tmp_path / "a"),
        split=SplitMode.random,
        raw_files=[str(src)],
        val_fraction=0.1,
        test_fraction=0.2,
        split_seed=4,
    )
    m = preprocess(rcfg)
    rows = {s: v.num_rows for s, v in m.splits.items()}
    assert sum(rows.values()) == 5000
    assert 350 < rows["val"] < 650 and 850 < rows["test"] < 1150
    again = preprocess(DataConfig(**{**rcfg.__dict__, "processed_dir": str(tmp_path / "b"), "block_size_mb": 1}))
    assert {s: v.parts[0]["files"]["labels"]["sha256"] for s, v in again.splits.items()} == {
        s: v.parts[0]["files"]["labels"]["sha256"] for s, v in m.splits.items()
    }, "same seed, same split, any block size"


def test_kaggle_split_takes_days_0_to_5_then_halves_day_6(tmp_path, processed) -> None:
    cfg, _ = processed
    src = synthetic_path(cfg, "train")  # 5000 rows: 4285 train, then 357 val and 358 test
    kcfg = DataConfig(
        name="k", raw_dir=str(tmp_path), processed_dir=str(tmp_path / "k"), split=SplitMode.kaggle, raw_files=[str(src)]
    )
    m = preprocess(kcfg)
    assert {s: v.num_rows for s, v in m.splits.items()} == {"train": 4285, "val": 357, "test": 358}
    labels = [int(r[0]) for r in _raw_rows(src)]
    np.testing.assert_array_equal(BinarySplit(tmp_path / "k", "test").column("labels"), labels[-358:])
