"""The Docker files, checked without a Docker engine: the compose file against the Compose spec's JSON
schema, the Dockerfile with hadolint, and the commands inside both against what launch.sh and the
Hydra config accept. (Building and running the image needs an engine; see the README.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from pipeline.config import register_configs
from pipeline.resolvers import register_resolvers
from tests.conftest import CONF_DIR, ROOT

register_resolvers()
register_configs()

COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent
WORKDIR = "/app"


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this venv (requirements/dev.txt pins it: ./launch.sh setup)")
    return str(path)


def _compose_doc() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML expands the x-node anchor's << merge


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, from ``env``."""

    def value(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", value, text)


def _service_argv(service: dict, env: dict[str, str]) -> list[str]:
    command = service["command"]
    if isinstance(command, str):
        return shlex.split(_interpolate(command, env))
    return [_interpolate(c, env) for c in command]


def _service_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: _interpolate(str(v), env) for k, v in environment.items()}


def _dry_run(argv: list[str], env: dict[str, str]) -> list[str]:
    """The command ./launch.sh would exec for ``argv`` (PIPELINE_DRY_RUN=1 prints it)."""
    assert argv[0] == "./launch.sh" and os.access(ROOT / "launch.sh", os.X_OK)
    out = subprocess.run(
        ["bash", "launch.sh", *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env, "PIPELINE_DRY_RUN": "1"},
    )
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def _assert_overrides_compose(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        compose("train", overrides=overrides)


# -- docker-compose.yml ---------------------------------------------------------------------------
def test_compose_file_matches_the_compose_spec(tmp_path) -> None:
    check = _tool("check-jsonschema")
    ok = subprocess.run(
        [check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The schema is strict enough to catch a misspelled key.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("    hostname: node1", "    hostnme: node1"))
    out = subprocess.run(
        [check, "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "hostnme" in out.stdout + out.stderr


@pytest.mark.parametrize("train_args", ["", "model=tiny data=tiny trainer.max_steps=50"])
def test_compose_nodes_run_one_two_node_torchrun_job(train_args: str) -> None:
    doc = _compose_doc()
    host_env = {"PIPELINE_TRAIN_ARGS": train_args, "PIPELINE_RUN_ID": "job-42"}
    services = {name: s for name, s in doc["services"].items() if name.startswith("node")}
    assert set(doc["services"]) == {"node0", "node1", "tensorboard"}
    commands = []
    for service in services.values():
        assert service["build"] == {
            "context": "..",
            "dockerfile": "docker/Dockerfile",
            "args": {"VARIANT": "${PIPELINE_VARIANT:-cpu}"},
        }
        assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        env = _service_env(service, host_env)
        # Both nodes: one rendezvous (the first node's c10d store), one run id, so one run folder.
        assert (env["NNODES"], env["RDZV_ENDPOINT"], env["PIPELINE_RUN_ID"]) == ("2", "node0:29500", "job-42")
        rdzv_host = env["RDZV_ENDPOINT"].split(":")[0]
        assert services[rdzv_host]["hostname"] == rdzv_host, "c10d serves the store on the endpoint's host"
        argv = _service_argv(service, host_env)
        assert argv[:2] == ["./launch.sh", "train"]
        torchrun = _dry_run(argv, env)
        script = next(i for i, arg in enumerate(torchrun) if arg.endswith("pipeline/train.py"))
        assert Path(torchrun[0]).name == "torchrun" and Path(torchrun[script]) == ROOT / "pipeline" / "train.py"
        flags = torchrun[1:script]
        for flag, want in {
            "--nnodes": "2",
            "--nproc_per_node": env["NPROC"],
            "--rdzv_backend": "c10d",
            "--rdzv_endpoint": "node0:29500",
            "--rdzv_id": "job-42",
        }.items():
            assert flags[flags.index(flag) + 1] == want, (flag, flags)
        overrides = torchrun[script + 1 :]
        assert overrides == ["checkpoint.dir=/app/checkpoints/job-42", *train_args.split()]
        _assert_overrides_compose(overrides)
        commands.append(torchrun)
    assert commands[0] == commands[1]
    # data, outputs and checkpoints on volumes both nodes share, where the config reads and writes them.
    mounts = [sorted(s["volumes"]) for s in services.values()]
    assert mounts[0] == mounts[1] == sorted(["data:/app/data", "outputs:/app/outputs", "checkpoints:/app/checkpoints"])
    assert {"data", "outputs", "checkpoints"} <= set(doc["volumes"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.data.raw_dir.startswith("data/") and cfg.data.processed_dir.startswith("data/")
    assert cfg.hydra.run.dir.startswith("outputs/")


def test_compose_default_run_id_is_shared_without_launch_sh() -> None:
    services = _compose_doc()["services"]
    ids = {_service_env(services[n], {})["PIPELINE_RUN_ID"] for n in ("node0", "node1")}
    assert ids == {"compose"}


def test_compose_publishes_tensorboard_on_loopback_only_and_gives_preemption_its_grace() -> None:
    doc = _compose_doc()
    assert "name" not in doc, "docker-compose 1.29 rejects a top-level name: (launch.sh passes -p)"
    nodes = [doc["services"][n] for n in ("node0", "node1")]
    assert all("ports" not in node for node in nodes), "the rendezvous port is never published"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        grace = compose("train").trainer.preempt_grace_s
    for node in nodes:
        assert int(node["stop_grace_period"].rstrip("s")) > grace, "docker stop waits for the preemption save"
    board = doc["services"]["tensorboard"]
    assert board["profiles"] == ["tensorboard"], "not started by a plain up (which would never end)"
    assert [_interpolate(p, {}) for p in board["ports"]] == ["127.0.0.1:6006:6006"]
    assert board["volumes"] == ["outputs:/app/outputs:ro"]


# -- Dockerfile -----------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_cmd_is_the_main_job_and_its_inputs_exist() -> None:
    instructions = _instructions()
    cmd = json.loads([arg for op, arg in instructions if op == "CMD"][-1])
    assert cmd == ["./launch.sh", "train"]
    torchrun = _dry_run(cmd, {"PIPELINE_RUN_ID": "x"})
    assert Path(torchrun[-1]) == ROOT / "pipeline" / "train.py" and Path(torchrun[-1]).is_file()
    _assert_overrides_compose([])
    assert [arg for op, arg in instructions if op == "WORKDIR"] == [WORKDIR]
    user = [arg for op, arg in instructions if op == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root"), "the job runs as a non-root user"
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    # The venv that launch.sh setup builds in the image is the one on PATH and the one launch.sh uses.
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert "PIPELINE_VENV=/opt/venv" in env and "PATH=/opt/venv/bin:" in env
    assert any(op == "RUN" and "./launch.sh setup" in arg for op, arg in instructions)


# -- launch.sh compose ----------------------------------------------------------------------------
def _fake_docker(tmp_path: Path, compose_ok: bool, engine_ok: bool, compose_v1: bool = False) -> dict[str, str]:
    """A `docker` on PATH that records its arguments; `compose version` / `info` succeed as told; with
    ``compose_v1`` a recording `docker-compose` too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    script = bin_dir / "docker"
    script.write_text(f"""#!/usr/bin/env bash
echo "$* PIPELINE_RUN_ID=${{PIPELINE_RUN_ID:-}}" >> {log}
case "$1 $2" in
  "compose version") exit {0 if compose_ok else 1} ;;
  "info "*) exit {0 if engine_ok else 1} ;;
esac
exit 0
""")
    script.chmod(0o755)
    # The real docker and docker-compose hidden: folders holding them are replaced by links to the rest.
    path = []
    for i, folder in enumerate(os.environ["PATH"].split(":")):
        if (Path(folder) / "docker-compose").exists() or (Path(folder) / "docker").exists():
            shadow = tmp_path / f"path{i}"
            shadow.mkdir()
            for f in Path(folder).iterdir():
                if f.name not in ("docker", "docker-compose") and not (shadow / f.name).exists():
                    (shadow / f.name).symlink_to(f)
            folder = str(shadow)
        path.append(folder)
    if compose_v1:
        v1 = bin_dir / "docker-compose"
        v1.write_text(
            f'#!/usr/bin/env bash\necho "docker-compose $* PIPELINE_RUN_ID=${{PIPELINE_RUN_ID:-}}" >> {log}\n'
        )
        v1.chmod(0o755)
    return {"PATH": ":".join([str(bin_dir), *path]), "LOG": str(log)}


def _launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "launch.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def test_launch_compose_wraps_docker_compose(tmp_path) -> None:
    env = _fake_docker(tmp_path, compose_ok=True, engine_ok=True)
    out = _launch(["compose", "up", "--build"], {**env, "PIPELINE_RUN_ID": "job-7"})
    assert out.returncode == 0, out.stderr
    calls = Path(env["LOG"]).read_text().splitlines()
    assert calls[-1] == "compose -p dlrm-pipeline -f docker/docker-compose.yml up --build PIPELINE_RUN_ID=job-7"


def test_launch_compose_falls_back_to_docker_compose_1_29(tmp_path) -> None:
    env = _fake_docker(tmp_path, compose_ok=False, engine_ok=True, compose_v1=True)
    out = _launch(["compose", "up"], {**env, "PIPELINE_RUN_ID": "job-8", "PIPELINE_COMPOSE_PROJECT": "p2"})
    assert out.returncode == 0, out.stderr
    calls = Path(env["LOG"]).read_text().splitlines()
    assert calls[-1] == "docker-compose -p p2 -f docker/docker-compose.yml up PIPELINE_RUN_ID=job-8"


def test_launch_compose_without_engine_says_so(tmp_path) -> None:
    env = _fake_docker(tmp_path, compose_ok=True, engine_ok=False)
    out = _launch(["compose", "up"], env)
    assert out.returncode == 1
    assert "no Docker engine reachable" in out.stderr and "compose config" in out.stderr
    # config needs no engine
    assert _launch(["compose", "config"], env).returncode == 0


def test_launch_compose_without_compose_cli_says_so(tmp_path) -> None:
    env = _fake_docker(tmp_path, compose_ok=False, engine_ok=True)
    out = _launch(["compose", "up"], env)
    assert out.returncode == 1
    assert "compose needs Docker Compose" in out.stderr
