"""launch.sh's commands, by what they would run (PIPELINE_DRY_RUN=1 prints the command instead)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "pipeline" / "train.py")  # the installed package's entry, by its full path


def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT", "PIPELINE_RUN_ID", "NPROC")}
    return subprocess.run(
        ["bash", "launch.sh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "PIPELINE_DRY_RUN": "1", **env},
    )


def _argv(*args: str, **env: str) -> list[str]:
    out = _launch(*args, **env)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "-m", "optimizer.lr=0.01,0.1"],
        ["train", "--multirun", "optimizer.lr=0.01,0.1"],
        ["sweep", "optimizer.lr=0.01,0.1"],
        ["sweep", "-m", "optimizer.lr=0.01,0.1"],
    ],
)
def test_sweep_runs_in_one_process_not_under_torchrun(args: list[str]) -> None:
    argv = _argv(*args)
    # One Hydra process expands the sweep; its launcher starts torchrun per point.
    assert argv[0].endswith("/python") and argv[1] == str(ROOT / "pipeline" / "train.py")
    assert argv[2:] in (["-m", "optimizer.lr=0.01,0.1"], ["--multirun", "optimizer.lr=0.01,0.1"])


def test_train_is_one_standalone_torchrun_node_by_default() -> None:
    argv = _argv("train", "model=tiny", NPROC="3")
    assert argv[0].endswith("/torchrun")
    # The ranks reach the local store by 127.0.0.1 (a container without a network cannot resolve its name).
    local = ["--standalone", "--local-addr", "127.0.0.1", "--nnodes", "1"]
    assert argv[1:] == [*local, "--nproc_per_node", "3", SCRIPT, "model=tiny"]


def test_without_nproc_a_cpu_node_runs_one_rank_per_numa_node_and_says_so(tmp_path) -> None:
    from pipeline.launch.ranks import numa_nodes

    out = _launch("train", "model=tiny")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    nodes = numa_nodes()
    assert argv[argv.index("--nproc_per_node") + 1] == str(nodes)
    assert f"NPROC={nodes}: one per NUMA node on CPUs" in out.stderr
    for name, cpus in (("node0", "0-3"), ("node1", "4-7"), ("node2", ""), ("possible", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cpulist").write_text(cpus + "\n")
    assert numa_nodes(tmp_path) == 2, "nodes with CPUs only"
    assert numa_nodes(tmp_path / "missing") == 1


def test_train_on_several_nodes_uses_c10d_rendezvous_with_the_run_id() -> None:
    argv = _argv("train", "model=tiny", NNODES="2", NPROC="1", RDZV_ENDPOINT="node0:29500", PIPELINE_RUN_ID="job1")
    assert argv[1:] == [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "node0:29500",
        "--rdzv_id",
        "job1",
        SCRIPT,
        "model=tiny",
    ]
    # Without an endpoint or a shared run id the nodes could not meet (or would write two folders).
    for env in ({"RDZV_ENDPOINT": "node0:29500"}, {"PIPELINE_RUN_ID": "job1"}):
        out = _launch("train", NNODES="2", **env)
        assert out.returncode == 2 and "RDZV_ENDPOINT" in out.stderr and "PIPELINE_RUN_ID" in out.stderr


def test_submit_runs_torchx_with_the_scheduler() -> None:
    argv = _argv("submit", "local_cwd", "-j", "2x1", "pipeline/train.py", "model=tiny")
    assert argv[0].endswith("/torchx")
    assert argv[1:] == ["run", "--scheduler", "local_cwd", "dist.ddp", "-j", "2x1", "pipeline/train.py", "model=tiny"]
    out = _launch("submit")
    assert out.returncode == 2 and "usage: ./launch.sh submit <scheduler>" in out.stderr


def test_help_explains_every_command_with_an_example() -> None:
    out = subprocess.run(["bash", "launch.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for command in ("train", "sweep", "test", "preprocess", "doctor", "setup", "compose", "submit"):
        assert f"\n  {command} " in out.stdout
        assert f"./launch.sh {command}" in out.stdout
    for text in (
        "-m model.embedding_dim=64,128 optimizer.lr=0.01,0.1",
        "hydra/launcher=slurm",
        "compose up",
        "NNODES=2 RDZV_ENDPOINT=",
    ):
        assert text in out.stdout


def test_max_restarts_reaches_torchrun() -> None:
    argv = _argv("train", "model=tiny", NPROC="2", MAX_RESTARTS="3")
    assert argv[1:] == [
        "--standalone",
        "--local-addr",
        "127.0.0.1",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "3",
        SCRIPT,
        "model=tiny",
    ]


def test_submit_puts_torchx_run_options_before_the_component() -> None:
    argv = _argv("submit", "slurm", "--dryrun", "-cfg", "partition=cpu", "-j", "2x8", "model=tiny")
    assert argv[0].endswith("/torchx")
    assert argv[1:] == [
        "run",
        "--scheduler",
        "slurm",
        "--dryrun",
        "-cfg",
        "partition=cpu",
        "dist.ddp",
        "-j",
        "2x8",
        "model=tiny",
    ]


@pytest.mark.parametrize("env", [{}, {"NNODES": "2", "RDZV_ENDPOINT": "node0:29500", "PIPELINE_RUN_ID": "job1"}])
def test_train_gives_every_torchrun_restart_a_fresh_rendezvous_store(monkeypatch, env) -> None:
    """torchrun's shared rendezvous store keeps a failed attempt's addresses; the CLI turns sharing off for the
    torchrun it starts (seen by a stand-in for it)."""
    from pipeline import cli

    seen: dict = {}
    monkeypatch.setattr(cli, "_torchrun", lambda argv, run_id: seen.update(argv=argv, env=dict(os.environ)) or 0)
    for key in (
        "NNODES",
        "RDZV_ENDPOINT",
        "PIPELINE_RUN_ID",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
        "NPROC",
        "OMP_NUM_THREADS",
    ):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    for key, value in {**env, "MAX_RESTARTS": "2"}.items():
        monkeypatch.setenv(key, value)
    assert cli.train(["model=tiny"]) == 0
    assert seen["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and seen["env"]["OMP_NUM_THREADS"] == "1"
    assert seen["argv"][seen["argv"].index("--max-restarts") + 1] == "2" and seen["argv"][-1] == "model=tiny"


def test_a_bad_override_stops_before_torchrun_in_a_few_lines(tmp_path) -> None:
    """Checked in one process before torchrun: one message with the closest key, exit code 2, no run folder."""
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "dlrm-pipeline"), "train", "trainer.max_step=5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PIPELINE_RUN_ID": "bad"},
    )
    assert out.returncode == 2
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) <= 5 and "Traceback" not in out.stderr, lines
    assert "unknown key trainer.max_step (did you mean trainer.max_steps?)" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_rank_that_crashes_is_named_with_its_log(monkeypatch, capsys) -> None:
    """A rank dying of something other than a user error: one line naming the rank and its log."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from pipeline import cli

    def crash(args) -> None:
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=-11, error_file="<N/A>")
        raise ChildFailedError("train.py", {1: failure})

    monkeypatch.setattr(torch.distributed.run, "run", crash)
    assert cli._torchrun(["--standalone", SCRIPT], "r") == 1
    assert "rank 1 failed (exit code -11); its log: rank1.log in the run folder" in capsys.readouterr().err
