"""A real two-node job on one machine: two network namespaces joined by a veth pair, one torchrun
node in each, rendezvous over the veth link (c10d), gloo over the veth interfaces.

The nodes must end with exactly the metrics of a 2-rank run on one node: same world size, same rows
per step, same (table-wise) plan, one thread per rank.

Needs root and iproute2 (``ip netns``); skipped with the reason otherwise. Namespaces and links are
named ``dlrmnn<pid>...`` after the test process; the test removes its own in ``finally``, and first
removes leftovers of earlier runs whose process is gone (never those of a run still alive, which
may be another checkout's test running at the same time).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TrainRun, run_training

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PREFIX = "dlrmnn"
# RFC 2544's benchmarking range: never routed, only ever on this test's own veth link.
ADDRESSES = ("198.18.0.1", "198.18.0.2")
RDZV_PORT = 29400  # inside node 0's namespace: no clash with anything on the host
STEPS = 200

COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every_steps=100",
    "logger.log_every_steps=50",
    "sharding=table_wise",
    "trainer.num_threads=1",
]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers() -> None:
    """Delete namespaces and root-namespace veth ends of earlier runs whose test process is gone."""
    own = re.compile(rf"^{PREFIX}(\d+)")
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = own.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        fields = line.split(": ")
        name = fields[1].split("@")[0] if len(fields) > 1 else ""
        m = own.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "delete", name, check=False)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "delete", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    return None


class TwoNodeNetwork:
    """Namespaces ``<prefix><pid>n0`` / ``n1`` with veth ends ``<prefix><pid>v0`` / ``v1``."""

    def __init__(self) -> None:
        base = f"{PREFIX}{os.getpid()}"
        self.namespaces = (f"{base}n0", f"{base}n1")
        self.interfaces = (f"{base}v0", f"{base}v1")  # <= 15 characters for a pid up to 7 digits

    def __enter__(self) -> TwoNodeNetwork:
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
            _ip("link", "add", self.interfaces[0], "type", "veth", "peer", "name", self.interfaces[1])
            for ns, dev, addr in zip(self.namespaces, self.interfaces, ADDRESSES, strict=True):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            if shutil.which("ping"):  # the link works before any training starts
                ping = subprocess.run(
                    ["ip", "netns", "exec", self.namespaces[1], "ping", "-c", "1", "-W", "5", ADDRESSES[0]],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if ping.returncode != 0:
                    raise RuntimeError(f"veth link down: {ping.stdout}{ping.stderr}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes the veth end inside it, and its peer
            _ip("netns", "delete", ns, check=False)
        for dev in self.interfaces:  # an end not moved yet (setup failed half-way)
            if _ip("link", "show", dev, check=False).returncode == 0:
                _ip("link", "delete", dev, check=False)


def _start_node(net: TwoNodeNetwork, node: int, run_dir: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    cmd = [
        "ip",
        "netns",
        "exec",
        net.namespaces[node],
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"{ADDRESSES[0]}:{RDZV_PORT}",
        "--rdzv_id",
        run_dir.name,
        # Node 0's namespace hosts the rendezvous store: torchrun cannot tell by the hostname, which
        # both namespaces share. --local_addr is the address this node's ranks are reached at.
        "--rdzv_conf",
        f"is_host={'true' if node == 0 else 'false'}",
        "--local_addr",
        ADDRESSES[node],
        str(ROOT / "pipeline" / "train.py"),
        f"hydra.run.dir={run_dir}",
        "logger.progress_bar=false",
        *overrides,
    ]
    env = {
        **os.environ,
        "PIPELINE_RUN_ID": run_dir.name,
        "GLOO_SOCKET_IFNAME": net.interfaces[node],
        "OMP_NUM_THREADS": "1",
    }
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started for the node
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


_EVAL_LINE = re.compile(r"eval (val|test) step \d+( \(best checkpoint, step \d+\))?: .*")


def test_two_namespaced_nodes_match_one_node_with_two_ranks(tmp_path, tiny_data_overrides) -> None:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    overrides = [*tiny_data_overrides, *COMMON]
    one_node = run_training(tmp_path / "one_node", overrides, nproc=2)
    assert one_node.returncode == 0, one_node.output[-4000:]

    _remove_leftovers()
    run_dir = tmp_path / "two_nodes"
    logs = [tmp_path / f"node{n}.out" for n in (0, 1)]
    procs: list[subprocess.Popen] = []
    with TwoNodeNetwork() as net:
        try:
            procs = [_start_node(net, n, run_dir, overrides, logs[n]) for n in (0, 1)]
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                _stop(p)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outputs)
    assert not any(ns.startswith(f"{PREFIX}{os.getpid()}") for ns in _ip("netns", "list").stdout.split())

    two_nodes = TrainRun(run_dir, 0, "\n".join(outputs))
    summary, baseline = two_nodes.summary, one_node.summary
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    # Two hosts (one rank each) vs one host (two ranks): the same training, to the last digit.
    assert summary["final"] == baseline["final"]
    assert [e["train/loss"] for e in two_nodes.events("train")] == [e["train/loss"] for e in one_node.events("train")]
    # Both nodes finished and computed the same (all-gathered) metrics.
    rank_lines = [[m.group(0) for m in _EVAL_LINE.finditer((run_dir / f"rank{r}.log").read_text())] for r in (0, 1)]
    # val at step 100, at each epoch's end, final val and test: every evaluation, the same on both nodes.
    assert len(rank_lines[0]) == len(two_nodes.events("eval")) >= 3 and rank_lines[0] == rank_lines[1]
    assert summary["run_dir"] == str(run_dir)
