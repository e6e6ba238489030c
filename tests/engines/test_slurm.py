"""Jobs submitted to a real (one-node) Slurm cluster through ./launch.sh submit slurm (TorchX)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, run_training

pytestmark = pytest.mark.slurm


def test_torchx_job_on_slurm_runs_to_the_end_like_a_local_torchrun_job(
    slurm_cluster, tmp_path, tiny_data_overrides
) -> None:
    """A 1x2 job (one node, two ranks) submitted with --wait: its state is followed without Slurm accounting,
    it writes one run folder, and its final metrics equal the same job under local torchrun."""
    overrides = [*tiny_data_overrides, "trainer.max_steps=50", "trainer.num_threads=1", "logger.progress_bar=false"]
    run_dir = tmp_path / "on_slurm"
    job = subprocess.run(
        [
            "./launch.sh",
            "submit",
            "slurm",
            "--wait",
            "-j",
            "1x2",
            "--cpu",
            "2",
            "--memMB",
            "4000",
            "pipeline/train.py",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=slurm_cluster,
        capture_output=True,
        text=True,
        timeout=600,
    )
    job_id = next((w.split("/")[-1] for w in job.stdout.split() if w.startswith("slurm://")), None)
    try:
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "Job finished: SUCCEEDED" in job.stderr + job.stdout
        assert "accounting storage is disabled" not in job.stderr
        assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
        local = run_training(tmp_path / "local", overrides, nproc=2)
        assert local.returncode == 0, local.output[-3000:]
        on_slurm = json.loads((run_dir / "summary.json").read_text())
        assert on_slurm["world_size"] == 2 and on_slurm["final"] == local.summary["final"]
    finally:
        if job_id:
            for f in ROOT.glob(f"slurm-{job_id}*"):  # sbatch's own output files, in the submitting folder
                f.unlink()
