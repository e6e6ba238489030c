"""pipeline.serving.predict without training: the unlabelled raw layout, layout detection, one output row per
input line around malformed lines, and the text / .npy outputs (a small random DLRM stands in for an
export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.tsv import NO_LABEL, RawDataError, read_blocks
from pipeline.serving.export import ExportedModel, build_dlrm
from pipeline.serving.predict import PredictError, detect_labelled, run
from tests.unit.data.test_raw_tsv import GOOD, row

CAP = 50


def _unlabelled(line: str) -> str:
    return line.split("\t", 1)[1]


def _read(path: Path, **kw) -> dict[str, np.ndarray]:
    blocks = list(read_blocks(path, **kw))
    return {
        k: np.concatenate([getattr(b, k) for b in blocks])
        for k in ("labels", "dense", "dense_missing", "sparse", "sparse_missing", "line_index")
    }


def test_unlabelled_rows_parse_like_labelled_ones(tmp_path) -> None:
    (tmp_path / "l.tsv").write_text("\n".join(GOOD) + "\n")
    (tmp_path / "u.tsv").write_text("\n".join(map(_unlabelled, GOOD)) + "\n")
    a, b = _read(tmp_path / "l.tsv"), _read(tmp_path / "u.tsv", labelled=False)
    for key in ("dense", "dense_missing", "sparse", "sparse_missing", "line_index"):
        np.testing.assert_array_equal(a[key], b[key])
    assert (b["labels"] == NO_LABEL).all()


def test_unlabelled_malformed_lines_are_named_or_skipped(tmp_path) -> None:
    lines = [*map(_unlabelled, GOOD), GOOD[0], _unlabelled(row(dense=["1", "x", *["1"] * 11]))]
    path = tmp_path / "u.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RawDataError, match=r"u.tsv:4: 40 tab-separated fields, expected 39 \(no label\)"):
        _read(path, labelled=False)
    got = _read(path, labelled=False, bad_rows="skip")
    assert got["line_index"].tolist() == [0, 1, 2]
    # A labelled file read as unlabelled fails on its first line, not silently.
    (tmp_path / "l.tsv").write_text("\n".join(GOOD) + "\n")
    with pytest.raises(RawDataError, match="l.tsv:1: 40 tab-separated fields"):
        _read(tmp_path / "l.tsv", labelled=False)


def test_layout_is_detected_from_the_first_line(tmp_path) -> None:
    import gzip

    (tmp_path / "l.tsv").write_text("\n".join(GOOD) + "\n")
    with gzip.open(tmp_path / "u.tsv.gz", "wt") as f:
        f.write("\n".join(map(_unlabelled, GOOD)) + "\n")
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    assert detect_labelled(tmp_path / "l.tsv") is True
    assert detect_labelled(tmp_path / "u.tsv.gz") is False
    with pytest.raises(PredictError, match="no line among the first 1 has 40 .* or 39 .* the first has 3"):
        detect_labelled(tmp_path / "bad.tsv")


@pytest.fixture(scope="module")
def model() -> ExportedModel:
    """A small random DLRM with hash ids (cap 50) and the log1p transform, as an export would load it."""
    from pipeline.config import SPARSE_FEATURE_NAMES

    torch.manual_seed(0)
    cfg = {"embedding_dim": 4, "dense_arch_layer_sizes": [8, 4], "over_arch_layer_sizes": [8, 1]}
    dlrm = build_dlrm(cfg, [CAP] * 26)
    for p in dlrm.sparse_arch.parameters():
        torch.nn.init.normal_(p, std=0.5)
    spec = {
        "num_embeddings_per_feature": [CAP] * 26,
        "feature_names": SPARSE_FEATURE_NAMES,
        "input": {"dense_transform": "log1p", "id_mode": "hash", "caps": [CAP] * 26, "dense_min": None},
    }
    return ExportedModel(Path("."), spec, dlrm, None)


def _rows(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dense = [str(v) if v >= 0 else "" for v in rng.integers(-1, 50, 13)]
        cats = [f"{v:08x}" if v % 7 else "" for v in rng.integers(0, 2**32, 26)]
        out.append("\t".join([str(rng.integers(0, 2)), *dense, *cats]))
    return out


def test_one_output_row_per_input_line_around_malformed_lines(tmp_path, model) -> None:
    good = _rows(300)
    (tmp_path / "clean.tsv").write_text("\n".join(good) + "\n")
    clean = run(model, str(tmp_path / "clean.npy"), input_path=str(tmp_path / "clean.tsv"), batch_size=64)
    want = np.load(tmp_path / "clean.npy")
    assert clean.rows == clean.scored == 300 and clean.metrics["num_samples"] == 300
    assert np.isfinite(want).all() and want.std() > 0

    bad_at = [0, 1, 151, 302, 303]  # first lines, the middle, the last two lines
    lines = list(good)
    for i in bad_at:
        lines.insert(i, "garbage")
    (tmp_path / "dirty.tsv").write_text("\n".join(lines) + "\n")
    res = run(
        model,
        str(tmp_path / "dirty.npy"),
        input_path=str(tmp_path / "dirty.tsv"),
        bad_rows="skip",
        block_size_mb=0.01,
        batch_size=64,
    )  # many blocks, so skipped lines fall between and inside blocks
    got = np.load(tmp_path / "dirty.npy")
    assert res.rows == len(got) == 305 and res.scored == 300 and res.bad_rows["total"] == 5
    assert np.flatnonzero(np.isnan(got)).tolist() == bad_at
    # Other batch boundaries may move the last bit (BLAS blocking), nothing more.
    np.testing.assert_allclose(np.delete(got, bad_at), want, rtol=1e-6)
    assert res.metrics["auc"] == pytest.approx(clean.metrics["auc"], abs=1e-6)


def test_text_output_round_trips_the_npy(tmp_path, model) -> None:
    lines = [_unlabelled(r) for r in _rows(100, seed=1)]
    (tmp_path / "u.tsv").write_text("\n".join(lines))  # no final newline
    res = run(model, str(tmp_path / "p.txt"), input_path=str(tmp_path / "u.tsv"))
    run(model, str(tmp_path / "p.npy"), input_path=str(tmp_path / "u.tsv"))
    assert not res.labelled and res.metrics is None and res.rows == res.scored == 100
    text = (tmp_path / "p.txt").read_text().splitlines()
    assert len(text) == 100
    np.testing.assert_array_equal(np.array(text, dtype=np.float32), np.load(tmp_path / "p.npy"))


def test_one_hot_lookup_gives_the_collections_logits(model) -> None:
    """The row-gather lookup of one-hot float tables scores exactly as the EmbeddingBagCollection forward."""
    assert model.one_hot_tables is not None
    rng = np.random.default_rng(1)
    dense = rng.random((300, 13), dtype=np.float32)
    ids = rng.integers(0, CAP, (300, 26)).astype(np.int32)
    with torch.inference_mode():
        kjt = model.features.kjt(ids)
        expected = model.model(dense_features=torch.from_numpy(dense), sparse_features=kjt).flatten()
    torch.testing.assert_close(model.logits(dense, ids), expected, rtol=0, atol=0)
