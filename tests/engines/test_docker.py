"""The pipeline's image and its 2-node compose job on a real Docker engine (built from a local Debian base)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_training
from tests.engines.conftest import PREEMPTIBLE, TEST_IMAGE, losses, preempted_step, wait_for_training

pytestmark = pytest.mark.docker_engine

OVERRIDES = ["model=tiny", "data=tiny", *PREEMPTIBLE]


def _docker(*args: str, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"docker {' '.join(args)}:\n{(out.stdout + out.stderr)[-3000:]}"
    return out


def _compose(*args: str, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["./launch.sh", "compose", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert out.returncode == 0, f"compose {' '.join(args)}:\n{(out.stdout + out.stderr)[-3000:]}"
    return out


def test_the_image_trains_as_uid_1000_into_its_run_folder_and_reports_health(docker_engine, tmp_path) -> None:
    """docker run of the image trains the tiny job as uid 1000, writes the run folder on a mounted volume, and
    the HEALTHCHECK reads the heartbeat its training wrote. numba finds an OpenMP runtime (libgomp1) there, so
    the dot interaction's parallel kernels run in containers too."""
    health = json.loads(
        _docker("image", "inspect", "-f", "{{json .Config.Healthcheck}}", TEST_IMAGE, env=docker_engine).stdout
    )
    assert health["Test"] == ["CMD", "python", "-m", "pipeline.tools.health"]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.chown(outputs, 1000, 1000)
    parallel = "from pipeline.model.dot_kernel import _parallel; assert _parallel(), 'no OpenMP layer for numba'"
    script = (
        f'id -u && python -c "{parallel}"'
        " && NPROC=1 ./launch.sh train model=tiny data=tiny"
        " && python -m pipeline.tools.health && ! python -m pipeline.tools.health --max-age 0"
    )
    run = _docker(
        "run", "--rm", "--network", "none", "-e", "PIPELINE_RUN_ID=img", "-v", f"{outputs}:/app/outputs",
        TEST_IMAGE, "sh", "-c", script, env=docker_engine, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert run.stdout.splitlines()[0] == "1000"
    assert "last progress" in run.stdout and "no training progress for" in run.stdout
    summary = json.loads((outputs / "img" / "summary.json").read_text())
    assert summary["final"]["eval/val/auc"] > 0.7
    assert {f.stat().st_uid for f in (outputs / "img").rglob("*")} == {1000}


def test_compose_two_nodes_stop_and_resume_equal_a_two_rank_local_run(
    docker_engine, tmp_path, tiny_data_overrides
) -> None:
    """The 2-node compose job: `compose stop` preempts both nodes (each saves the step reached, exit 143), a
    second `up` with the same run id resumes from that step on the checkpoints volume, and every step's loss
    and the final metrics equal a 2-rank torchrun job on this machine; the nodes publish no port; `down -v`
    removes containers and volumes."""
    env = {**docker_engine, "PIPELINE_RUN_ID": "preempt", "PIPELINE_TRAIN_ARGS": " ".join(OVERRIDES)}
    project = env["PIPELINE_COMPOSE_PROJECT"]
    _compose("down", "-v", env=env)  # leftovers of an interrupted earlier run
    try:
        _compose("up", "-d", env=env)
        outputs = Path(
            _docker("volume", "inspect", "-f", "{{.Mountpoint}}", f"{project}_outputs", env=env).stdout.strip()
        )
        run_dir = outputs / "preempt"
        wait_for_training(run_dir)
        for node in ("node0", "node1"):
            cid = _compose("ps", "-q", node, env=env).stdout.strip()
            ports = json.loads(_docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", cid, env=env).stdout)
            assert not any(ports.values()), f"{node} publishes {ports}"
        _compose("stop", env=env, timeout=300)
        step = preempted_step(run_dir, "SIGTERM")
        for node in ("node0", "node1"):
            cid = _compose("ps", "-a", "-q", node, env=env).stdout.strip()
            assert _docker("inspect", "-f", "{{.State.ExitCode}}", cid, env=env).stdout.strip() == "143", node
        _compose("up", env=env, timeout=600)
        saved = f"/app/checkpoints/preempt/step_{step:08d}"
        assert f"resumed from {saved}" in (run_dir / "rank0.log").read_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        reference = run_training(tmp_path / "local", [*tiny_data_overrides, *PREEMPTIBLE], nproc=2)
        assert reference.returncode == 0, reference.output[-3000:]
        assert losses(run_dir) == losses(reference.run_dir)
        assert summary["final"] == reference.summary["final"]
    finally:
        _compose("down", "-v", env=env, check=False)
    volumes = _docker("volume", "ls", "-q", "--filter", f"name={project}_", env=env).stdout.split()
    assert volumes == [], f"down -v left {volumes}"


def test_tensorboard_is_published_on_loopback_only(docker_engine, tmp_path) -> None:
    """The compose file's TensorBoard service (profile tensorboard) answers on 127.0.0.1 and nowhere else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**docker_engine, "PIPELINE_TENSORBOARD_PORT": str(port)}
    try:
        _compose("--profile", "tensorboard", "up", "-d", "tensorboard", env=env)
        cid = _compose("ps", "-q", "tensorboard", env=env).stdout.strip()
        bindings = json.loads(_docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", cid, env=env).stdout)
        published = {k: v for k, v in bindings.items() if v}  # the image's EXPOSE 29500 stays unpublished
        assert published == {"6006/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and b"TensorBoard" in page.read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
    finally:
        _compose("--profile", "tensorboard", "down", "-v", env=env, check=False)
