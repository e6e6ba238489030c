"""Processed data in an object store (``data.processed_dir=s3://bucket/prefix``), read through a local copy.

The loader memory-maps its part files, so training reads a local folder: the cache (``data.cache_dir``, default
``$PIPELINE_CACHE_DIR/s3/<bucket>/<prefix>``, :func:`pipeline.storage.cache_path`). Rank 0 copies the store's
finished preprocessing down once (every file missing locally or of another size; part files are checked against
the manifest's sha256 as they arrive) and writes the manifest last, so a copy cut short is completed, never used.
When the store has none, or one made from other sources or settings, preprocessing runs into the cache (restartable
per file, as locally) and the result is uploaded, ``manifest.json`` last: its presence in the store marks a
complete upload.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data.manifest import MANIFEST, Manifest
from pipeline.data.parts import sha256_file
from pipeline.errors import DataError, MissingDataError

logger = logging.getLogger(__name__)


def local_dir(cfg: DataConfig) -> Path:
    """The folder the processed data is read from: ``data.processed_dir``, or for an object-store URL its cache."""
    if not storage.is_remote(cfg.processed_dir):
        return Path(cfg.processed_dir)
    return Path(cfg.cache_dir) if cfg.cache_dir else storage.cache_path(cfg.processed_dir)


def local_copy(url: str, cache_dir: str | None = None) -> Path:
    """A local, verified copy of the finished preprocessing at ``url`` (export and predict); ``url`` itself when local.

    Raises:
        MissingDataError: the store has no finished preprocessing there.
        DataError: the store cannot be read, or a file does not match the manifest.
    """
    if not storage.is_remote(url):
        return Path(url)
    local = Path(cache_dir) if cache_dir else storage.cache_path(url)
    if _fetch_manifest(url) is None:
        raise MissingDataError(
            f"{storage.display(storage.join(url, MANIFEST))} not found: preprocess first (./launch.sh preprocess "
            f"data=... data.processed_dir={storage.display(url)})"
        )
    pull(url, local)
    return local


def prepare(cfg: DataConfig, prepare_local: Callable[[DataConfig], Manifest]) -> Manifest:
    """``data.processed_dir`` in an object store: reuse the store's preprocessing when it is current for this config,
    else run ``prepare_local`` (generate and preprocess) into the cache and upload the result. Rank 0 only."""
    url, local = cfg.processed_dir, local_dir(cfg)
    local_cfg = dataclasses.replace(cfg, processed_dir=str(local))
    remote = _fetch_manifest(url)
    if remote is not None:
        local.mkdir(parents=True, exist_ok=True)
        _write_atomic(local / MANIFEST, remote)  # so that the usual check below judges the store's manifest
        from pipeline.data import preprocess

        if preprocess.is_current(local_cfg):
            pull(url, local)
            logger.info("using the preprocessed data in %s (local copy %s)", storage.display(url), local)
            return Manifest.load(local)
        (local / MANIFEST).unlink()
        logger.info("%s was made from other sources or settings: preprocessing into %s", storage.display(url), local)
    manifest = prepare_local(local_cfg)
    push(local, url)
    return manifest


def pull(url: str, local: Path) -> Manifest:
    """Copy the finished preprocessing at ``url`` into ``local`` (files missing or of another size; part files checked
    by sha256), manifest last.

    Raises:
        DataError: the store cannot be read, has no manifest, or a file does not match it.
    """
    text = _fetch_manifest(url)
    if text is None:
        raise DataError(f"{storage.display(storage.join(url, MANIFEST))} not found: nothing to copy")
    manifest = Manifest.from_dict(json.loads(text))
    checked = {
        info["path"]: info
        for split in manifest.splits.values()
        for part in split.parts
        for info in part["files"].values()
    }
    try:
        files = storage.list_files(url)
        fetched = 0
        for rel, size in sorted(files.items()):
            dst = local / rel
            if rel == MANIFEST or rel.endswith(".tmp") or (dst.is_file() and dst.stat().st_size == size):
                continue
            storage.download(storage.join(url, *rel.split("/")), dst)
            fetched += size
            info = checked.get(rel)
            if info is not None and sha256_file(dst) != info["sha256"]:
                dst.unlink()
                raise DataError(
                    f"{storage.display(storage.join(url, rel))} does not match the sha256 in its manifest: the "
                    "upload is damaged; preprocess again"
                )
    except OSError as e:
        raise DataError(f"cannot copy {storage.display(url)} to {local} ({storage.describe_error(e)})") from None
    missing = [rel for rel in checked if not (local / rel).is_file()]
    if missing:
        raise DataError(f"{storage.display(url)}: its manifest lists files the store does not hold: {missing[:3]}")
    _write_atomic(local / MANIFEST, text)
    if fetched:
        logger.info("copied %.1f MiB of %s to %s", fetched / 2**20, storage.display(url), local)
    return manifest


def push(local: Path, url: str) -> None:
    """Upload the finished preprocessing in ``local`` to ``url``: the store's manifest is removed first, every file
    uploaded, files the store holds beyond them deleted, and ``manifest.json`` uploaded last.

    Raises:
        DataError: the store cannot be written (after its retries).
    """
    target = storage.join(url, MANIFEST)
    try:
        if storage.exists(target):
            storage.filesystem(url).rm_file(target)
        ours = storage.list_files(local)
        for rel in sorted(ours):
            if rel != MANIFEST and not rel.endswith(".tmp"):
                storage.upload(local / rel, storage.join(url, *rel.split("/")))
        for rel in storage.list_files(url):
            if rel not in ours:
                storage.filesystem(url).rm_file(storage.join(url, *rel.split("/")))
        storage.upload(local / MANIFEST, target)
    except OSError as e:
        raise DataError(
            f"cannot upload the processed data in {local} to {storage.display(url)} ({storage.describe_error(e)}); "
            "it stays usable locally, and the next run uploads it again"
        ) from None
    logger.info("uploaded the processed data in %s to %s", local, storage.display(url))


def _fetch_manifest(url: str) -> str | None:
    """The text of the store's manifest.json, None when there is none."""
    try:
        loc = storage.join(url, MANIFEST)
        return storage.read_text(loc) if storage.is_file(loc) else None
    except OSError as e:
        raise DataError(f"cannot read {storage.display(url)} ({storage.describe_error(e)})") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
