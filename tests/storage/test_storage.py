"""The storage layer's path rules: which locations are remote, how they join, and where their local copies live."""

from __future__ import annotations

from pathlib import Path

from pipeline import storage


def test_urls_are_remote_and_plain_paths_stay_paths() -> None:
    assert storage.location("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert storage.location("outputs/run/checkpoints") == Path("outputs/run/checkpoints")
    assert storage.location("file:///tmp/x") == Path("/tmp/x")
    assert not storage.is_remote("/tmp/s3:/x") and storage.is_remote("S3://bucket")
    assert storage.join("s3://bucket/a", "step_1", "meta.json") == "s3://bucket/a/step_1/meta.json"
    assert storage.join(Path("/a"), "latest") == Path("/a/latest")
    assert storage.name("s3://bucket/a/step_00000010") == "step_00000010"


def test_the_cache_of_a_url_is_under_the_cache_root_and_never_names_a_credential(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    assert storage.cache_path("s3://bucket/data/tiny/") == tmp_path / "s3" / "bucket" / "data" / "tiny"
    assert storage.cache_path("s3://key:secret@bucket/../x") == tmp_path / "s3" / "bucket" / "x"
    assert storage.display("s3://key:secret@bucket/x") == "s3://***@bucket/x"
