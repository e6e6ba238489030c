"""Where checkpoints, processed data and exports live: a local folder, or a folder in an object store given as a URL
(``s3://bucket/prefix``), behind one small set of path operations (fsspec; s3fs for ``s3://``).

A location is a :class:`~pathlib.Path` when local (the code that uses it keeps its local behaviour: atomic
renames, fsync) and the URL string when remote. The endpoint and credentials of an object store come from the
environment, as the AWS tools read them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``, or a profile), never from a config. Requests that fail are retried
a bounded number of times (botocore's standard mode, ``AWS_MAX_ATTEMPTS`` attempts, default 5; ``AWS_RETRY_MODE``
sets the mode); after that the operation fails with an :class:`OSError` the callers turn into their own one-line
error naming the URL.

Files of an object store that the code memory-maps or reads often (processed data, an export's weights) are copied
once into a local cache: ``PIPELINE_CACHE_DIR``, default ``~/.cache/dlrm-pipeline`` (see :func:`cache_path`).
"""

from __future__ import annotations

import io
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.redact import redact_text

logger = logging.getLogger(__name__)

Location = Path | str  # a local folder or file (Path) or an object-store URL (str)

DEFAULT_MAX_ATTEMPTS = 5  # botocore's attempts per request (the first included) when AWS_MAX_ATTEMPTS is unset
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is an object-store URL (``s3://...``, any fsspec protocol but the local file system)."""
    text = os.fspath(location)
    if "://" not in text:
        return False
    protocol = text.split("://", 1)[0].lower()
    return protocol not in ("file", "local")


def location(value: str | os.PathLike) -> Location:
    """A config value as a location: the URL string for an object store, else a Path (``file://`` stripped)."""
    text = os.fspath(value)
    if is_remote(text):
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


def join(base: Location, *names: str) -> Location:
    """``base / name / ...`` for either kind of location."""
    if isinstance(base, Path):
        return base.joinpath(*names)
    return "/".join([base.rstrip("/"), *names])


def name(loc: Location) -> str:
    """The last part of a location (``step_00000010``)."""
    return loc.name if isinstance(loc, Path) else loc.rstrip("/").rsplit("/", 1)[-1]


def display(loc: Location) -> str:
    """A location for a message or log line, credentials masked (a URL may carry some)."""
    return redact_text(str(loc))


def _storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options of a protocol: for s3, the bounded retry policy and timeouts (credentials and endpoint stay with
    botocore, which reads them from the environment)."""
    if protocol not in ("s3", "s3a"):
        return {}
    retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    retries["total_max_attempts"] = int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))
    return {
        "use_listings_cache": False,  # other processes write here too: list afresh each time
        # On top of botocore's attempts, s3fs retries a request whose connection failed or timed out (5 times).
        "config_kwargs": {
            "retries": retries,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        },
    }


@cache
def _filesystem(protocol: str, env_key: tuple) -> Any:
    import fsspec

    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True, **_storage_options(protocol))
    except ImportError as e:
        raise OSError(f"{protocol}:// needs a package that is not installed ({e}); pip install s3fs") from None


def filesystem(loc: Location) -> Any:
    """The fsspec file system of a remote location (one per protocol and retry settings, reused)."""
    protocol = str(loc).split("://", 1)[0].lower()
    env_key = tuple(os.environ.get(k) for k in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_ENDPOINT_URL"))
    return _filesystem(protocol, env_key)


def storage_options(loc: Location) -> dict[str, Any]:
    """What fsspec's ``url_to_fs`` needs beside a URL to build the same file system (DCP's fsspec writer/reader)."""
    return _storage_options(str(loc).split("://", 1)[0].lower())


def exists(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.exists()
    return filesystem(loc).exists(loc)


def is_file(loc: Location) -> bool:
    """Whether a file is there; a store that cannot be asked raises (fsspec's ``isfile`` would say False, and a
    missing ``latest`` would start a run over)."""
    if isinstance(loc, Path):
        return loc.is_file()
    try:
        return filesystem(loc).info(loc)["type"] == "file"
    except FileNotFoundError:
        return False


def read_bytes(loc: Location) -> bytes:
    if isinstance(loc, Path):
        return loc.read_bytes()
    return filesystem(loc).cat_file(loc)


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object (remote: one PUT, which is atomic: readers see the old object or the new one)."""
    if isinstance(loc, Path):
        loc.write_bytes(data)
    else:
        filesystem(loc).pipe_file(loc, data)


def open_binary(loc: Location) -> io.BufferedIOBase:
    """A seekable binary reader (remote: fetched whole into memory; the files read this way are small)."""
    if isinstance(loc, Path):
        return open(loc, "rb")  # noqa: SIM115 - the caller closes it
    return io.BytesIO(read_bytes(loc))


def remove_tree(loc: Location) -> None:
    """Delete a folder (remote: every object under the prefix); nothing there is fine."""
    if isinstance(loc, Path):
        import shutil

        shutil.rmtree(loc, ignore_errors=True)
        return
    fs = filesystem(loc)
    try:
        fs.rm(loc, recursive=True)
    except FileNotFoundError:
        pass


def list_dirs(loc: Location) -> list[str]:
    """Names of the sub-folders of a folder (remote: the common prefixes), sorted; none when it does not exist."""
    if isinstance(loc, Path):
        return sorted(p.name for p in loc.iterdir() if p.is_dir()) if loc.is_dir() else []
    fs = filesystem(loc)
    try:
        entries = fs.ls(loc, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def list_files(loc: Location) -> dict[str, int]:
    """Every file under a folder, recursively: path relative to it -> size in bytes."""
    if isinstance(loc, Path):
        return {str(p.relative_to(loc)): p.stat().st_size for p in loc.rglob("*") if p.is_file()}
    fs = filesystem(loc)
    try:
        found = fs.find(loc, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    root = fs._strip_protocol(loc).rstrip("/") + "/"  # noqa: SLF001 - how fsspec names the keys it lists
    return {k[len(root) :]: int(v["size"]) for k, v in found.items() if k.startswith(root) and v["type"] == "file"}


def download(src: Location, dst: Path) -> None:
    """Copy one remote file to a local path (through a temporary name, renamed when complete)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    filesystem(src).get_file(src, str(tmp))
    os.replace(tmp, dst)


def upload(src: Path, dst: Location) -> None:
    """Copy one local file to a remote location."""
    filesystem(dst).put_file(str(src), dst)


def cache_root() -> Path:
    """The local cache of object-store files: ``PIPELINE_CACHE_DIR``, default ``~/.cache/dlrm-pipeline``."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "dlrm-pipeline")


def cache_path(url: str, root: str | os.PathLike | None = None) -> Path:
    """Where the local copy of ``url`` lives: ``<root>/<protocol>/<bucket>/<key>`` (``root``: :func:`cache_root`)."""
    protocol, rest = url.split("://", 1)
    rest = rest.split("@", 1)[-1]  # never a credential in a folder name
    parts = [p for p in rest.strip("/").split("/") if p not in ("", ".", "..")]
    return Path(root if root is not None else cache_root()).joinpath(protocol.lower(), *parts)


def describe_error(error: BaseException) -> str:
    """One line for an object-store failure: the exception's type and first line, credentials masked."""
    text = str(error).strip().splitlines()
    return redact_text(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "))
