"""Jobs submitted to real Slurm clusters (one node; two nodes in network namespaces) through ./launch.sh submit
slurm (TorchX) and hydra/launcher=slurm."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_training
from tests.engines.conftest import PREEMPTIBLE, losses, preempted_step, wait_for_training

pytestmark = pytest.mark.slurm


def _job_id(out: subprocess.CompletedProcess) -> str | None:
    """The Slurm job id of a submission, from the app handle TorchX prints (slurm://torchx/<id>)."""
    return next((w.split("/")[-1] for w in out.stdout.split() if w.startswith("slurm://")), None)


def _remove_job_files(job_ids: list[str | None]) -> None:
    """sbatch's own output files, written into the submitting folder (the checkout)."""
    for job_id in filter(None, job_ids):
        for f in ROOT.glob(f"slurm-{job_id}*"):
            f.unlink()


def _submit(env: dict, j: str, args: list[str], run_dir: Path, *options: str, timeout: float = 600):
    """./launch.sh submit slurm <options> -j <j> pipeline/train.py <args> into ``run_dir``."""
    return subprocess.run(
        ["./launch.sh", "submit", "slurm", *options, "-j", j, "pipeline/train.py", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_torchx_job_on_slurm_runs_to_the_end_like_a_local_torchrun_job(
    slurm_cluster, tmp_path, tiny_data_overrides
) -> None:
    """A 1x2 job (one node, two ranks) submitted with --wait and no resources given: fitted to the partition's
    nodes, its state followed without Slurm accounting, one run folder, and the final metrics of the same job
    under local torchrun."""
    overrides = [*tiny_data_overrides, "trainer.max_steps=50", "trainer.num_threads=1", "logger.progress_bar=false"]
    run_dir = tmp_path / "on_slurm"
    job = _submit(slurm_cluster, "1x2", overrides, run_dir, "--wait")
    job_id = _job_id(job)
    try:
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "Job finished: SUCCEEDED" in job.stderr + job.stdout
        assert "accounting storage is disabled" not in job.stderr
        assert f"fitted to the partition: train: 4 CPUs / 8192 MB per node -> {os.cpu_count()} / 8192" in job.stderr
        assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
        local = run_training(tmp_path / "local", overrides, nproc=2)
        assert local.returncode == 0, local.output[-3000:]
        on_slurm = json.loads((run_dir / "summary.json").read_text())
        assert on_slurm["world_size"] == 2 and on_slurm["final"] == local.summary["final"]
    finally:
        _remove_job_files([job_id])


def test_scancel_checkpoints_the_step_and_a_resubmitted_job_resumes_it(
    slurm_cluster, tmp_path, tiny_data_overrides
) -> None:
    """scancel sends the job SIGTERM: the ranks save the step they reached and stop; the same job submitted
    again (same run folder) resumes from it, and every step's loss equals an uninterrupted run's."""
    overrides = [*tiny_data_overrides, *PREEMPTIBLE]
    run_dir = tmp_path / "on_slurm"
    resources = ("--cpu", "2", "--memMB", "4000")
    job_ids = []
    try:
        first = _submit(slurm_cluster, "1x2", overrides, run_dir, *resources, timeout=120)
        job_ids.append(_job_id(first))
        assert job_ids[0], first.stdout + first.stderr
        wait_for_training(run_dir, timeout=120)
        subprocess.run(["scancel", job_ids[0]], env=slurm_cluster, check=True)
        deadline = time.time() + 120
        while "preempted" not in (run_dir / "metrics.jsonl").read_text() and time.time() < deadline:
            time.sleep(0.2)
        step = preempted_step(run_dir, "SIGTERM")
        second = _submit(slurm_cluster, "1x2", overrides, run_dir, "--wait", *resources)
        job_ids.append(_job_id(second))
        assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
        saved = run_dir / "checkpoints" / f"step_{step:08d}"
        assert f"resumed from {saved}" in (run_dir / "rank0.log").read_text()
        reference = run_training(tmp_path / "reference", overrides, nproc=2)
        assert reference.returncode == 0, reference.output[-3000:]
        assert losses(run_dir) == losses(reference.run_dir), "every step's loss equals the uninterrupted run's"
    finally:
        _remove_job_files(job_ids)


def test_a_sweep_through_slurm_runs_each_point_as_a_job_and_prints_the_results(
    slurm_cluster, tmp_path, tiny_data_overrides
) -> None:
    """hydra/launcher=slurm (submitit): two points, two Slurm jobs, followed without accounting storage, and
    the same results table as a torchrun sweep."""
    sweep_dir = tmp_path / "sweep"
    out = subprocess.run(
        [
            "./launch.sh",
            "train",
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=4",
            f"hydra.sweep.dir={sweep_dir}",
            *tiny_data_overrides,
            "trainer.max_steps=20",
            "logger.progress_bar=false",
            "optimizer.lr=0.01,0.1",
        ],
        cwd=ROOT,
        env=slurm_cluster,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "sacct" not in out.stdout + out.stderr
    lines = out.stdout[out.stdout.index("sweep results") :].splitlines()
    assert lines[1].split()[:4] == ["#", "status", "exit", "optimizer.lr"]
    assert [row.split()[:4] for row in lines[2:4]] == [["0", "ok", "0", "0.01"], ["1", "ok", "0", "0.1"]]
    for num in (0, 1):
        summary = json.loads((sweep_dir / str(num) / "summary.json").read_text())
        assert summary["world_size"] == 1 and summary["steps"] == 20
    assert (sweep_dir / "results.csv").is_file()


def test_two_node_torchx_job_runs_one_rank_on_each_node_like_a_local_two_rank_job(
    slurm_two_nodes, tmp_path, tiny_data_overrides
) -> None:
    """A 2x1 job on two Slurm nodes (two network namespaces): one rank on each node, joined by torchrun's c10d
    rendezvous on the first node, with the final metrics of a 2-rank torchrun job on this machine."""
    overrides = [*tiny_data_overrides, "trainer.max_steps=50", "trainer.num_threads=1", "logger.progress_bar=false"]
    run_dir = tmp_path / "two_nodes"
    job = _submit(slurm_two_nodes, "2x1", overrides, run_dir, "--wait")
    job_id = _job_id(job)
    try:
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "Job finished: SUCCEEDED" in job.stderr + job.stdout
    finally:
        _remove_job_files([job_id])
    hosts = {rank: (run_dir / f"rank{rank}.log").read_text().split(", host ")[1].split(",")[0] for rank in (0, 1)}
    assert sorted(hosts.values()) == ["sn0", "sn1"], hosts
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = run_training(tmp_path / "local", overrides, nproc=2)
    assert reference.returncode == 0, reference.output[-3000:]
    assert summary["final"] == reference.summary["final"]


def test_sigusr1_before_the_time_limit_checkpoints_and_torchx_requeues_the_job_which_resumes(
    slurm_cluster, tmp_path, tiny_data_overrides
) -> None:
    """SIGUSR1 to the job's ranks (what sbatch --signal=USR1@T sends T seconds before the time limit; here
    scancel -s USR1): every rank saves the step reached, TorchX's batch script requeues the job (max_retries),
    and the same job id resumes from that step and ends with every step's loss of an uninterrupted run."""
    overrides = [*tiny_data_overrides, *PREEMPTIBLE]
    run_dir = tmp_path / "requeued"
    options = ("-cfg", "signal=USR1@30", "--max_retries", "1", "--cpu", "2", "--memMB", "4000")
    first = _submit(slurm_cluster, "1x2", overrides, run_dir, *options, timeout=120)
    job_id = _job_id(first)
    assert job_id, first.stdout + first.stderr
    try:
        wait_for_training(run_dir, timeout=120)
        subprocess.run(["scancel", "-s", "USR1", job_id], env=slurm_cluster, check=True)
        deadline = time.time() + 400
        while not (run_dir / "summary.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        log = (run_dir / "rank0.log").read_text()
        assert (run_dir / "summary.json").exists(), log[-3000:]
        step = preempted_step(run_dir, "SIGUSR1")
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in log
        job = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_cluster, capture_output=True, text=True)
        assert "Restarts=1" in job.stdout, job.stdout
        reference = run_training(tmp_path / "reference", overrides, nproc=2)
        assert reference.returncode == 0, reference.output[-3000:]
        assert losses(run_dir) == losses(reference.run_dir), "every step's loss equals the uninterrupted run's"
    finally:
        subprocess.run(["scancel", job_id], env=slurm_cluster)
        _remove_job_files([job_id])
