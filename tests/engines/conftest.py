"""Real engines on this machine: a one-node Slurm cluster started for the session (Debian's slurmctld,
slurmd and munge, installed by .ci/run; nothing is installed here). Without the binaries the tests skip,
saying what to install."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo")


def _need(binaries: tuple[str, ...], install: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {install}")


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
