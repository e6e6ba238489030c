"""An S3 server for the object-storage tests: moto's server mode on a free 127.0.0.1 port, behind a small HTTP proxy
that can fail a share of the requests (500/503 answers or dropped connections), and the AWS environment variables
pointing every process (this one and the training jobs it starts) at the proxy."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ACCESS_KEY = "AKIATESTSTORAGEKEY01"
SECRET_KEY = "storage-test-secret-d41d8cd98f00b204e980"  # must never show up in a log, config or report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Faults:
    """What the proxy breaks: ``share`` of the requests (every n-th of those whose path contains ``match``) get
    ``status`` (0: the connection is dropped without an answer)."""

    share: float = 0.0
    status: int = 503
    match: str = ""
    seen: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, share: float, status: int = 503, match: str = "") -> None:
        with self.lock:
            self.share, self.status, self.match, self.seen, self.failed = share, status, match, 0, 0

    def should_fail(self, path: str) -> int | None:
        """The status to answer with (0: drop), or None to forward the request."""
        with self.lock:
            if self.share <= 0 or self.match not in path:
                return None
            self.seen += 1
            # Deterministic: the n-th request fails when the running share of failures would stay at or below `share`
            # (share 1.0: every one; 0.2: every fifth). A retry is a new request, so it usually gets through.
            if self.failed + 1 <= self.share * self.seen + 1e-9:
                self.failed += 1
                return self.status
            return None


def _proxy_handler(upstream: tuple[str, int], faults: Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self) -> None:
            body = self._body()
            status = faults.should_fail(self.path)
            if status == 0:  # the connection drops without an answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if status is not None:
                code = "SlowDown" if status == 503 else "InternalError"
                payload = f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            # A HEAD answer has no body but says the object's size.
            self.send_header(
                "Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@dataclass
class S3:
    """The running server: ``endpoint`` (the proxy's URL, what the jobs use), ``direct`` (moto's, unbroken) and
    ``faults`` (what the proxy breaks)."""

    endpoint: str
    direct: str
    faults: Faults

    def bucket(self) -> str:
        """A new, empty bucket; returns its ``s3://`` URL."""
        import s3fs

        name = f"test-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.direct}, skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"

    def fs(self):
        """An s3fs file system talking to moto directly (what the tests check with)."""
        import s3fs

        return s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": self.direct}, skip_instance_cache=True, use_listings_cache=False
        )


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3]:
    """moto's S3 server and the failing proxy in front of it, with the AWS environment set for every process."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "moto's server did not start"
            time.sleep(0.1)
    faults = Faults()
    proxy = ThreadingHTTPServer(("127.0.0.1", _free_port()), _proxy_handler(("127.0.0.1", port), faults))
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
        "AWS_MAX_ATTEMPTS": "4",
        "PIPELINE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3(env["AWS_ENDPOINT_URL"], f"http://127.0.0.1:{port}", faults)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proxy.shutdown()
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def faults(s3) -> Iterator[Faults]:
    """The proxy's faults, cleared after the test."""
    yield s3.faults
    s3.faults.set(0.0)
