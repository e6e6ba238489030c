"""Processed data in an S3 store, in this process: preprocessed once into the local copy and uploaded (manifest
last), copied down by another machine without preprocessing, a damaged object refused by its sha256, and a store
that fails every request stopping with one line naming the URL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import DataConfig, IdMode, SplitMode, SyntheticConfig
from pipeline.data import mirror
from pipeline.data.generators import synthetic
from pipeline.data.manifest import MANIFEST, Manifest
from pipeline.data.prepare import prepare_data
from pipeline.errors import DataError

SMALL = SyntheticConfig(num_train_rows=3000, num_val_rows=500, num_test_rows=500, max_cardinality=100, seed=5)


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory) -> tuple[DataConfig, Manifest]:
    """A config whose processed_dir is in the store, prepared once (preprocessed locally, uploaded)."""
    root = tmp_path_factory.mktemp("data_store")
    synthetic.generate(SMALL, root / "raw")
    cfg = DataConfig(
        name="t",
        raw_dir=str(root / "raw"),
        processed_dir=s3.bucket() + "/processed/small",
        cache_dir=str(root / "cache_first"),
        split=SplitMode.files,
        id_mode=IdMode.vocab,
    )
    return cfg, prepare_data(cfg)


def _part_files(manifest: Manifest) -> list[str]:
    return [f["path"] for s in manifest.splits.values() for p in s.parts for f in p["files"].values()]


def test_preprocessing_into_the_store_uploads_every_file_and_the_manifest_last(s3, uploaded) -> None:
    cfg, manifest = uploaded
    key = cfg.processed_dir.removeprefix("s3://")
    stored = {k.removeprefix(key + "/") for k in s3.fs().find(cfg.processed_dir)}
    assert MANIFEST in stored and "vocab.npz" in stored
    assert set(_part_files(manifest)) <= stored
    assert Manifest.load(cfg.cache_dir).to_dict() == manifest.to_dict()


def test_another_machine_copies_the_data_down_instead_of_preprocessing(s3, uploaded, tmp_path, caplog) -> None:
    cfg, manifest = uploaded
    other = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"))
    caplog.set_level("INFO")
    assert prepare_data(other).to_dict() == manifest.to_dict()
    assert "using the preprocessed data in" in caplog.text and "preprocessing" not in caplog.text.lower()
    for rel in _part_files(manifest):
        assert (tmp_path / "cache" / rel).read_bytes() == (Path(cfg.cache_dir) / rel).read_bytes()


def test_a_damaged_object_in_the_store_is_refused_by_its_sha256(s3, uploaded, tmp_path) -> None:
    cfg, manifest = uploaded
    damaged = s3.bucket() + "/damaged"
    s3.fs().put(str(Path(cfg.cache_dir)) + "/", damaged + "/", recursive=True)
    rel = _part_files(manifest)[0]
    size = (Path(cfg.cache_dir) / rel).stat().st_size
    s3.fs().pipe_file(f"{damaged}/{rel}", b"\x01" * size)  # same size, other bytes
    with pytest.raises(DataError, match=rf"{damaged}/{rel} does not match the sha256 in its manifest"):
        mirror.local_copy(damaged, str(tmp_path / "cache"))


def test_a_store_failing_every_request_stops_the_copy_in_one_line(s3, faults, uploaded, tmp_path, monkeypatch) -> None:
    cfg, _ = uploaded
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    faults.set(1.0, status=503)
    with pytest.raises(DataError) as failed:
        prepare_data(dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache")))
    assert str(failed.value).startswith(f"cannot read {cfg.processed_dir} (") and "\n" not in str(failed.value)
