"""TorchX: ``torchx run dist.ddp -j NxM pipeline/train.py [overrides]`` from the repo root.

Real jobs on ``local_cwd`` (the scheduler .torchxconfig sets), and the job specs TorchX would submit
to Slurm and Kubernetes (``--dryrun``: no cluster needed).

``dist.ddp`` resolves through pyproject.toml's ``torchx.components`` entry point. The CLI tests do
not depend on the project being installed (``pip install --no-deps -e .``): they put a dist-info
with that entry point section, generated from pyproject.toml, first on the child's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from pipeline.launch import components
from tests.conftest import ROOT

TORCHX = Path(sys.executable).parent / "torchx"
COMPONENT_FILE = f"{ROOT / 'pipeline' / 'launch' / 'components.py'}:ddp"
SHORT_RUN = [
    "trainer.max_steps=30",
    "trainer.eval_every_steps=0",
    "logger.log_every_steps=10",
    "trainer.num_threads=1",
    "logger.progress_bar=false",
]
_HANDLE = re.compile(r"^local_cwd://torchx/(\S+)$", re.M)


def _pyproject_entry_points() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["torchx.components"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchx_env(tmp_path_factory) -> dict[str, str]:
    """Environment for the ``torchx`` CLI: the venv first on PATH, this repo's .torchxconfig only
    (not ~/.torchxconfig), and pyproject.toml's entry points whether or not the project is installed."""
    site = tmp_path_factory.mktemp("entry_points")
    info = site / "dlrm_pipeline-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dlrm-pipeline\nVersion: 0.1.0\n")
    lines = [f"{name} = {value}" for name, value in _pyproject_entry_points().items()]
    (info / "entry_points.txt").write_text("[torchx.components]\n" + "\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_RUN_ID", "TORCHELASTIC_RUN_ID")}
    env.update(
        PATH=f"{TORCHX.parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
        TORCHXCONFIG=str(ROOT / ".torchxconfig"),
    )
    return env


def _torchx(env: dict[str, str], *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHX), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# -- resolving the script ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "m", "args", "want_script", "want_args"),
    [
        (None, None, ["pipeline/train.py", "model=tiny"], "pipeline/train.py", ["model=tiny"]),
        ("pipeline/train.py", None, ["model=tiny"], "pipeline/train.py", ["model=tiny"]),
        ("pipeline/train.py", None, ["pipeline/train.py", "a=1"], "pipeline/train.py", ["a=1"]),
        (None, None, ["model=tiny", "+x=1"], components.DEFAULT_SCRIPT, ["model=tiny", "+x=1"]),
        (None, None, ["--cfg", "job"], components.DEFAULT_SCRIPT, ["--cfg", "job"]),
        (None, None, [], components.DEFAULT_SCRIPT, []),
        (None, None, ["pipeline/train.py", "--", "-m", "a=1,2"], "pipeline/train.py", ["-m", "a=1,2"]),
        (None, "pipeline.train", ["model=tiny"], None, ["model=tiny"]),
    ],
)
def test_script_positional_flag_module_or_default(script, m, args, want_script, want_args) -> None:
    assert components._resolve_entry(script, m, args) == (want_script, want_args)


def test_script_and_module_together_is_an_error() -> None:
    with pytest.raises(ValueError, match="not both"):
        components.ddp("a=1", script="pipeline/train.py", m="pipeline.train")


def test_defaults_one_run_folder_per_job_and_resources_per_process() -> None:
    app = components.ddp("pipeline/train.py", j="2x8")
    (role,) = app.roles
    assert role.num_replicas == role.min_replicas == 2
    assert role.env["PIPELINE_RUN_ID"] == "${app_id}"  # every rank of every node: outputs/<app id>
    # Every restart gets a fresh rendezvous store, not one holding the failed attempt's addresses.
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (16, 0, 32768)
    assert role.image == components.DEFAULT_IMAGE and role.max_retries == 0
    command = shlex.split(role.args[1].split("; ", 1)[1])
    assert command[command.index("--max_restarts") + 1] == "0"
    assert command[command.index("--rdzv_id") + 1] == "${app_id}"
    # An elastic node range survives a failure by restarting its workers (into the same run folder).
    elastic = components.ddp(j="1:2x1").roles[0]
    assert (elastic.min_replicas, elastic.num_replicas) == (1, 2)
    assert "--max_restarts 3" in elastic.args[1] and "--nnodes 1:2" in elastic.args[1]
    # An explicit PIPELINE_RUN_ID names the folder instead.
    assert components.ddp(env={"PIPELINE_RUN_ID": "exp1"}).roles[0].env["PIPELINE_RUN_ID"] == "exp1"


# -- the CLI: entry point, .torchxconfig, builtins -----------------------------------------------------


def test_entry_point_names_the_project_component_and_keeps_builtins(torchx_env) -> None:
    eps = _pyproject_entry_points()
    assert eps["dist"] == "pipeline.launch.components"
    listed = _torchx(torchx_env, "builtins")
    assert listed.returncode == 0, listed.stderr[-3000:]
    names = set(re.findall(r"^\s*\d+\. (\S+)$", listed.stdout, re.M))
    assert {"dist.ddp", "dist.spmd", "utils.echo", "utils.python", "metrics.tensorboard", "serve.torchserve"} <= names
    # Exactly as written in the issue: positional script, scheduler from .torchxconfig (local_cwd).
    dry = _torchx(torchx_env, "run", "--dryrun", "dist.ddp", "-j", "2x8", "pipeline/train.py")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"loaded configs from {ROOT / '.torchxconfig'}" in dry.stderr
    flat = re.sub(r"""['"]\n\s+['"]""", "", dry.stdout)  # the dry run pretty-prints long strings in pieces
    assert "--nnodes 2 --nproc_per_node 8 --max_restarts 0" in flat and "pipeline/train.py" in flat
    assert "'local_cwd://torchx/${app_id}'" in dry.stdout  # TORCHX_JOB_ID of the local_cwd scheduler


def test_builtin_utils_echo_still_runs(tmp_path, torchx_env) -> None:
    run = _torchx(torchx_env, "run", "-cfg", f"log_dir={tmp_path}", "utils.echo", "--msg", "hello from torchx")
    assert run.returncode == 0, run.stderr[-3000:]
    (app_id,) = _HANDLE.findall(run.stdout)
    assert (tmp_path / "torchx" / app_id / "echo" / "0" / "stdout.log").read_text().strip() == "hello from torchx"


def test_installed_entry_points_match_pyproject() -> None:
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="torchx.components")}
    if not installed:
        pytest.skip("project not installed in this venv (./launch.sh setup runs pip install --no-deps -e .)")
    assert installed == _pyproject_entry_points(), "stale install: rerun ./launch.sh setup"


# -- real jobs on local_cwd ------------------------------------------------------------------------------


def _check_one_run_folder(run: subprocess.CompletedProcess, runs: Path, world_size: int) -> dict:
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    app_ids = _HANDLE.findall(run.stdout)
    assert len(app_ids) == 1, run.stdout
    # One folder for the whole job, named after the app id, shared by every rank of every node.
    assert [p.name for p in runs.iterdir()] == app_ids
    run_dir = runs / app_ids[0]
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", ".hydra", "metrics.jsonl", "summary.json"} <= names
    assert {f"rank{r}.log" for r in range(world_size)} <= names
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["steps"] == 30
    assert summary["run_dir"] == str(run_dir)
    assert summary["final"]["eval/val/num_samples"] == 4000
    return summary


@pytest.mark.distributed
def test_two_nodes_of_one_process_positional_script(tmp_path, torchx_env, tiny_data_overrides) -> None:
    runs = tmp_path / "runs"
    run = _torchx(
        torchx_env,
        "run",
        "dist.ddp",
        "-j",
        "2x1",
        "--rdzv_port",
        str(_free_port()),
        "pipeline/train.py",
        *tiny_data_overrides,
        *SHORT_RUN,
        f"hydra.run.dir={runs}/${{run_id:}}",
        timeout=240,
    )
    _check_one_run_folder(run, runs, world_size=2)


@pytest.mark.distributed
def test_one_node_of_two_processes_script_flag(tmp_path, torchx_env, tiny_data_overrides) -> None:
    runs = tmp_path / "runs"
    run = _torchx(
        torchx_env,
        "run",
        "dist.ddp",
        "-j",
        "1x2",
        "--script",
        "pipeline/train.py",
        "--",
        *tiny_data_overrides,
        *SHORT_RUN,
        f"hydra.run.dir={runs}/${{run_id:}}",
        timeout=240,
    )
    _check_one_run_folder(run, runs, world_size=2)


# -- job specs for clusters (dry runs) -------------------------------------------------------------------


def _dryrun(scheduler: str, args: list[str], cfg: dict | None = None):
    from torchx.runner import get_runner

    with get_runner() as runner:
        return runner.dryrun_component(COMPONENT_FILE, args, scheduler, workspace=None, cfg=cfg or {})


def test_slurm_sbatch_script_runs_torchrun_on_every_node(tmp_path) -> None:
    info = _dryrun("slurm", ["-j", "2x8", "pipeline/train.py", "model=tiny", "hydra.run.dir=outputs/x y"])
    request = info.request
    assert sorted(request.replicas) == ["train-0", "train-1"]  # one heterogeneous group per node
    for replica in request.replicas.values():
        assert replica.sbatch_opts["cpus-per-task"] == "16" and replica.sbatch_opts["mem"] == "32768"
        assert "gpus-per-task" not in replica.sbatch_opts
    script = request.materialize()
    assert script.count("hetjob") == 1

    # Run the generated batch script with stand-ins for srun and torchrun: the command and the
    # environment each node's torchrun really gets, after sbatch, srun and bash quoting.
    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    torchrun = fake_venv / "bin" / "torchrun"
    torchrun.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'run_id': os.environ.get('PIPELINE_RUN_ID')}))\n"
    )
    torchrun.chmod(0o755)
    srun = tmp_path / "srun"
    srun.write_text(f"#!{sys.executable}\n" + _FAKE_SRUN)
    srun.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST_HET_GROUP_0": "node-a",
        "PIPELINE_VENV": str(fake_venv),
    }
    out = subprocess.run(["bash", "job.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    nodes = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(nodes) == 2
    for node in nodes:
        assert node["run_id"] == "4242"  # PIPELINE_RUN_ID = the Slurm job id on both nodes: one run folder
        argv = node["argv"]
        assert argv[argv.index("--rdzv_endpoint") + 1] == "node-a:29500"
        assert argv[argv.index("--rdzv_id") + 1] == "4242"
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--nproc_per_node") + 1] == "8"
        assert argv[-3:] == ["pipeline/train.py", "model=tiny", "hydra.run.dir=outputs/x y"]


def test_resource_and_restart_options_from_the_command_line() -> None:
    info = _dryrun(
        "slurm",
        [
            "-j",
            "1:2x1",
            "--cpu",
            "3",
            "--memMB",
            "1000",
            "--max_restarts",
            "2",
            "--max_retries",
            "1",
            "--",
            "model=tiny",
        ],
    )
    request = info.request
    assert request.max_retries == 1  # Slurm requeues the job once after a failure
    for replica in request.replicas.values():
        assert replica.sbatch_opts["cpus-per-task"] == "3" and replica.sbatch_opts["mem"] == "1000"
        command = shlex.split(replica.args[1].split("; ", 1)[1])
        assert command[command.index("--max_restarts") + 1] == "2"
        assert command[command.index("--nnodes") + 1] == "1:2"
        assert command[-2:] == [components.DEFAULT_SCRIPT, "model=tiny"]


# srun stand-in: for each heterogeneous group (separated by ":"), run its command with the variables
# of its --export=ALL,K=V,... option, as srun would on that group's node.
_FAKE_SRUN = """\
import os, subprocess, sys
groups, cur = [], []
for a in sys.argv[1:]:
    if a == ":":
        groups.append(cur); cur = []
    else:
        cur.append(a)
groups.append(cur)
for g in groups:
    env = dict(os.environ)
    while g[0].startswith("--"):
        if g[0].startswith("--export=ALL,"):
            env.update(kv.split("=", 1) for kv in g[0][len("--export=ALL,"):].split(","))
        g = g[1:]
    rc = subprocess.run(g, env=env).returncode
    if rc:
        sys.exit(rc)
"""


def test_kubernetes_volcano_job_gang_schedules_every_node() -> None:
    pytest.importorskip(
        "kubernetes", reason="the kubernetes package renders TorchX's pod specs (pip install kubernetes 'urllib3<1.27')"
    )
    info = _dryrun(
        "kubernetes",
        [
            "-j",
            "2x8",
            "--gpu",
            "8",
            "--image",
            "registry.example/dlrm-pipeline:1",
            "--mounts",
            "type=volume,src=dlrm-outputs,dst=/app/outputs",
            "pipeline/train.py",
            "model=tiny",
        ],
        cfg={"queue": "default"},
    )
    job = info.request.resource
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "default" and job["spec"]["schedulerName"] == "volcano"
    app_id = job["metadata"]["name"]
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["train-0", "train-1"]
    for task in tasks:
        (container,) = task["template"].spec.containers
        assert container.image == "registry.example/dlrm-pipeline:1"
        env = {e.name: e.value for e in container.env}
        assert env["PIPELINE_RUN_ID"] == app_id  # one run folder on the shared volume
        assert container.resources.limits == {"cpu": "16000m", "memory": "32768M", "nvidia.com/gpu": "8"}
        assert [(p.name, p.container_port) for p in container.ports] == [("c10d", 29500)]
        assert "/app/outputs" in {v.mount_path for v in container.volume_mounts}
        assert container.command[:2] == ["bash", "-c"]
        command = container.command[2]
        assert f"--rdzv_id '{app_id}' --nnodes 2 --nproc_per_node 8" in command
        assert command.endswith("pipeline/train.py model=tiny")
    # Node 0 hosts the c10d store; the other nodes find it through Volcano's per-task host variable.
    assert "--rdzv_endpoint ${VC_TRAIN_0_HOSTS:=localhost}:29500" in tasks[1]["template"].spec.containers[0].command[2]


def test_kubernetes_defaults_come_from_torchxconfig(torchx_env) -> None:
    pytest.importorskip(
        "kubernetes", reason="the kubernetes package renders TorchX's pod specs (pip install kubernetes 'urllib3<1.27')"
    )
    # No -cfg queue=..., no --workspace "": .torchxconfig gives the queue and submits the image as built.
    dry = _torchx(torchx_env, "run", "-s", "kubernetes", "--dryrun", "dist.ddp", "-j", "2x1", "pipeline/train.py")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "queue: default" in dry.stdout and "image: dlrm-pipeline:latest" in dry.stdout


def test_kubernetes_pod_templates_are_valid_against_the_kubernetes_schema() -> None:
    """Every task's pod template in the Volcano Job (what `torchx run -s kubernetes --dryrun` prints) validates
    strictly (no unknown fields) against the Kubernetes 1.33 schema; a misspelled field would not."""
    pytest.importorskip(
        "kubernetes", reason="the kubernetes package renders TorchX's pod specs (pip install kubernetes 'urllib3<1.27')"
    )
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="requirements/dev.txt pins it")
    from kubernetes.client import ApiClient

    info = _dryrun(
        "kubernetes",
        ["-j", "2x8", "--gpu", "8", "--image", "registry.example/dlrm-pipeline:1", "pipeline/train.py", "model=tiny"],
        cfg={"queue": "default"},
    )
    job = ApiClient().sanitize_for_serialization(info.request.resource)
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    for task in job["spec"]["tasks"]:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": task["name"]}}
        pod["template"] = task["template"]
        kubernetes_validate.validate(pod, "1.33", strict=True)
    pod["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.33", strict=True)
