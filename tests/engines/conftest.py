"""Real engines on this machine: a one-node Slurm cluster (Debian's slurmctld, slurmd and munge) and a
Docker engine (Debian's docker.io, docker-compose and debootstrap), started for the session when none runs
and stopped at its end; .ci/run installs the packages, nothing is installed here. Without an engine the
tests skip saying what to install, and fail instead under CI (CI=true)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, losses

SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo")


def _need(binaries: tuple[str, ...], install: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not found: {install}")


def _unavailable(reason: str) -> None:
    """Skip on a workstation; under CI an engine that cannot be had is a failure, not a silent skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"engine unavailable under CI: {reason}")
    pytest.skip(reason)


def _slurm_conf(state: Path, controller: str, nodes: dict[str, str], memory_mb: int, port: int = 6817) -> str:
    """slurm.conf of a test cluster: slurmctld on this host at ``controller``, one slurmd per ``nodes`` entry
    (name -> address), each node's spool, pid and log files named after it in ``state``."""
    return "\n".join(
        [
            "ClusterName=pipeline-test",
            f"SlurmctldHost={socket.gethostname()}({controller})",
            f"SlurmctldPort={port}",
            f"SlurmdPort={port + 1}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={state}/ctld",
            f"SlurmdSpoolDir={state}/d-%n",
            f"SlurmctldPidFile={state}/slurmctld.pid",
            f"SlurmdPidFile={state}/slurmd-%n.pid",
            f"SlurmctldLogFile={state}/slurmctld.log",
            f"SlurmdLogFile={state}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "MinJobAge=3600",
            *(
                f"NodeName={name} NodeAddr={addr} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN"
                for name, addr in nodes.items()
            ),
            f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _stop_slurm(state: Path, nodes: dict[str, str]) -> None:
    for pid in [state / "slurmctld.pid", *(state / f"slurmd-{n}.pid" for n in nodes)]:
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()])


@pytest.fixture(scope="session")
def munge():
    """A running munged (Slurm's authentication): started when none runs, and then stopped at the end."""
    _need(SLURM_BINARIES, "apt-get install -y slurmd slurmctld slurm-client munge")
    started = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started:  # none ran: every munged at the end is the one started here (it forks as it starts)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    yield
    if started:
        subprocess.run(["pkill", "-x", "munged"])


def _slurm_env(conf: Path) -> dict[str, str]:
    # Jobs inherit the submitting environment (sbatch --export=ALL): not this process's rendezvous variables.
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "SLURM_CONF": str(conf)}


def _wait_for_nodes(env: dict[str, str], nodes: int, state: Path) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
        if out.stdout.split() == ["idle"] * nodes:
            return
        time.sleep(0.5)
    pytest.fail(f"the Slurm nodes did not come up: sinfo says {out.stdout.split()}; logs in {state}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory, munge):
    """SLURM_CONF of a running one-node cluster (its own config and state folder). Everything started here is
    stopped at the end."""
    state = tmp_path_factory.mktemp("slurm")
    (state / "ctld").mkdir()
    conf = state / "slurm.conf"
    nodes = {socket.gethostname(): "127.0.0.1"}
    conf.write_text(_slurm_conf(state, "127.0.0.1", nodes, memory_mb=16000))
    env = _slurm_env(conf)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon], env=env, check=True)
    _wait_for_nodes(env, 1, state)
    yield env
    _stop_slurm(state, nodes)


# Two Slurm nodes on this machine: each slurmd in its own network namespace (and host name), on a bridge
# with slurmctld in the root namespace. Addresses from RFC 2544's benchmarking range, never routed.
TWO_NODE_NET = "198.18.1"
TWO_NODE_NAMES = ("sn0", "sn1")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _remove_stale_networks() -> None:
    """Delete the namespaces and bridge a killed earlier session left (``sl<pid>``, that pid gone): their bridge
    holds the controller's address, and the new nodes could not reach it."""
    found = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    found += subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for pid in sorted(set(re.findall(r"\bsl(\d+)[bn]", found))):
        if Path(f"/proc/{pid}").exists():
            continue
        for i in range(2):
            subprocess.run(["ip", "netns", "delete", f"sl{pid}n{i}"], capture_output=True)
        subprocess.run(["ip", "link", "delete", f"sl{pid}b"], capture_output=True)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory, munge):
    """SLURM_CONF of a running two-node cluster: nodes sn0 and sn1, each a slurmd in its own network namespace
    with its own host name and /etc/hosts (names of both nodes and the controller). Removed at the end."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        _unavailable("needs iproute2's ip and util-linux's nsenter")
    _remove_stale_networks()
    tag = f"sl{os.getpid()}"
    bridge, namespaces = f"{tag}b", [f"{tag}n{i}" for i in range(2)]
    state = tmp_path_factory.mktemp("slurm2")
    (state / "ctld").mkdir()
    conf = state / "slurm.conf"
    nodes = {name: f"{TWO_NODE_NET}.1{i}" for i, name in enumerate(TWO_NODE_NAMES)}
    # Ports beside a one-node cluster's slurmctld (6817) in the root namespace.
    conf.write_text(_slurm_conf(state, f"{TWO_NODE_NET}.1", nodes, memory_mb=8000, port=6827))
    env = _slurm_env(conf)
    hosts = "127.0.0.1 localhost\n" + f"{TWO_NODE_NET}.1 {socket.gethostname()}\n"
    hosts += "".join(f"{addr} {name}\n" for name, addr in nodes.items())
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as e:
            _unavailable(f"cannot create network devices here: {e.stderr.strip()}")
        _ip("addr", "add", f"{TWO_NODE_NET}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(namespaces):
            _ip("netns", "add", ns)
            _ip("link", "add", f"{tag}v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"{tag}v{i}", "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{TWO_NODE_NET}.1{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            (state / f"hosts-{ns}").write_text(hosts)
        subprocess.run(["slurmctld"], env=env, check=True)
        for ns, name in zip(namespaces, TWO_NODE_NAMES, strict=True):
            # Its own network, host name and /etc/hosts; /sys (and its cgroup mount, which slurmd reads) kept.
            inside = f"mount --bind {state}/hosts-{ns} /etc/hosts && hostname {name} && exec slurmd"
            subprocess.run(
                ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c", inside],
                env=env,
                check=True,
            )
        _wait_for_nodes(env, 2, state)
        yield env
    finally:
        _stop_slurm(state, nodes)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)


DOCKER_BINARIES = ("dockerd", "docker", "debootstrap")
TEST_IMAGE = "dlrm-pipeline:test"


def _docker_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """The environment for ./launch.sh image/compose against a running Docker engine with the pipeline's image
    built as dlrm-pipeline:test from a local Debian base (docker/base-image.sh; both cached between runs by
    Docker: the base by its key label, the dependency layer by the lock files). dockerd is started (no
    iptables, no default bridge, networks from 198.19.0.0/16) only when none answers, and only that one is
    stopped at the end."""
    _need(DOCKER_BINARIES, "apt-get install -y docker.io docker-compose debootstrap")
    if shutil.which("docker-compose") is None and subprocess.run(["docker", "compose", "version"]).returncode:
        _unavailable("neither docker compose nor docker-compose: apt-get install -y docker-compose")
    if os.geteuid() != 0:
        _unavailable("the Docker tests run as root (dockerd, debootstrap)")
    state = tmp_path_factory.mktemp("dockerd")
    daemon = None
    if not _docker_up():
        log = open(state / "dockerd.log", "w")  # noqa: SIM115 - open for the daemon's lifetime
        daemon = subprocess.Popen(
            [
                "dockerd",
                "--iptables=false",
                "--bridge=none",
                "--default-address-pool",
                "base=198.19.0.0/16,size=24",
                # Its own pid file: a stale /var/run/docker.pid (a daemon killed with its session) stops nothing.
                "--pidfile",
                str(state / "dockerd.pid"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while not _docker_up():
            if daemon.poll() is not None or time.time() > deadline:
                pytest.fail(f"dockerd did not start: {(state / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.5)
    env = {
        **os.environ,
        "PIPELINE_IMAGE": TEST_IMAGE,
        "PIPELINE_COMPOSE_PROJECT": "dlrm-pipeline-test",
        "NPROC": "1",
    }
    try:
        build = subprocess.run(
            ["./launch.sh", "image", "--local-base"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
        )
        assert build.returncode == 0, f"building the image failed:\n{(build.stdout + build.stderr)[-4000:]}"
        yield env
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()


# A job long enough (on 2 cores) to be stopped in the middle: 400 steps, a loss logged at every step.
PREEMPTIBLE = [
    "trainer.max_steps=400",
    "trainer.num_threads=1",
    "logger.progress_bar=false",
    "logger.log_every_steps=1",
    "trainer.eval_every_steps=0",
    "checkpoint.every_steps=1000",
]


def wait_for_training(run_dir: Path, step: int = 30, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while max(losses(run_dir), default=0) < step and time.time() < deadline:
        time.sleep(0.05)
    assert max(losses(run_dir), default=0) >= step, f"the job did not reach step {step} within {timeout:.0f} s"


def preempted_step(run_dir: Path, signal: str) -> int:
    """The step the run's single preemption (by ``signal``) saved, checked to lie inside the job."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (stop,) = [e for e in events if e["event"] == "preempted"]
    assert stop["signal"] == signal and 30 <= stop["step"] < 400, stop
    return stop["step"]
