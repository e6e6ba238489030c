"""Real engines on this machine: a one-node Slurm cluster (Debian's slurmctld, slurmd and munge) and a
Docker engine (Debian's docker.io, docker-compose and debootstrap), started for the session when none runs
and stopped at its end; .ci/run installs the packages, nothing is installed here. Without an engine the
tests skip saying what to install, and fail instead under CI (CI=true)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

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


def _slurm_conf(state: Path) -> str:
    host = socket.gethostname()
    return "\n".join(
        [
            "ClusterName=pipeline-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={state}/ctld",
            f"SlurmdSpoolDir={state}/d",
            f"SlurmctldPidFile={state}/slurmctld.pid",
            f"SlurmdPidFile={state}/slurmd.pid",
            f"SlurmctldLogFile={state}/slurmctld.log",
            f"SlurmdLogFile={state}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "MinJobAge=3600",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=16000 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster (its own config and state folder); munged is started when
    none runs. Everything started here is stopped at the end."""
    _need(SLURM_BINARIES, "apt-get install -y slurmd slurmctld slurm-client munge")
    state = tmp_path_factory.mktemp("slurm")
    (state / "ctld").mkdir()
    (state / "d").mkdir()
    conf = state / "slurm.conf"
    conf.write_text(_slurm_conf(state))
    # Jobs inherit the submitting environment (sbatch --export=ALL): not this process's rendezvous variables.
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "SLURM_CONF": str(conf)}
    started_munged = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started_munged:  # none ran: every munged at the end is the one started here (it forks as it starts)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if out.stdout.strip() == "idle":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the Slurm node did not come up: sinfo says {out.stdout.strip()!r}; logs in {state}")
    yield env
    for daemon in ("slurmd", "slurmctld"):
        pid = state / f"{daemon}.pid"
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()])
    if started_munged:
        subprocess.run(["pkill", "-x", "munged"])


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
