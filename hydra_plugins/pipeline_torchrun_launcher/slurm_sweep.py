"""``hydra/launcher=slurm``: hydra-submitit-launcher's Slurm launcher, plus the sweep's results table.

Each sweep point is a Slurm job (a job array), run by submitit; when the points have finished this
launcher writes ``results.csv`` / ``results.json`` into the sweep folder and prints the table, as the
torchrun launcher does. On a cluster without accounting storage (no ``sacct``), submitit follows the
jobs through ``scontrol`` instead of warning on every poll.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from hydra_plugins.pipeline_torchrun_launcher.torchrun_launcher import SweepPoint, _split_override, write_results

log = logging.getLogger(__name__)


def _scontrol_watcher():
    """A submitit watcher that reads job states from ``scontrol show job`` (every job slurmctld knows)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class ScontrolInfoWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            return ["scontrol", "show", "job", "-o"] if self._registered - self._finished else None

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            from pipeline.launch.slurm import parse_scontrol

            out: dict[str, dict[str, str]] = {}
            for job in parse_scontrol(string.decode() if isinstance(string, bytes) else string):
                key = job["JobId"]
                if job.get("ArrayJobId") and job.get("ArrayTaskId", "").isdigit():
                    key = f"{job['ArrayJobId']}_{job['ArrayTaskId']}"
                out[key] = {"JobID": key, "State": job.get("JobState", "UNKNOWN"), "NodeList": job.get("NodeList", "")}
            return out

    return ScontrolInfoWatcher(delay_s=600)


def _swept_keys(points: list[SweepPoint]) -> list[str]:
    values: dict[str, set[str]] = {}
    for p in points:
        for o in p.overrides:
            k, v = _split_override(o)
            values.setdefault(k, set()).add(v)
    return [k for k, v in values.items() if len(v) > 1]


class PipelineSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.slurm.slurm import SlurmJob

        from pipeline.launch.slurm import has_accounting

        if not has_accounting():
            SlurmJob.watcher = _scontrol_watcher()
        t0 = time.perf_counter()
        returns = super().launch(job_overrides, initial_job_idx)
        seconds = time.perf_counter() - t0
        sweep_dir = Path(self.config.hydra.sweep.dir)
        points = []
        for num, (overrides, ret) in enumerate(zip(job_overrides, returns, strict=True), start=initial_job_idx):
            output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
            run_dir = Path(output_dir) if output_dir else sweep_dir / str(num)
            summary_file = run_dir / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
            ok = ret.status == JobStatus.COMPLETED and summary is not None
            points.append(
                SweepPoint(
                    num,
                    list(overrides),
                    run_dir,
                    "ok" if ok else "failed",
                    0 if ok else 1,
                    (summary or {}).get("wall_seconds", seconds),
                    summary,
                )
            )
        print(write_results(sweep_dir, points, _swept_keys(points)), flush=True)
        return returns


def _register() -> None:
    """hydra/launcher=slurm's schema: submitit's, with this class as the target."""
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    ConfigStore.instance().store(
        group="hydra/launcher",
        name="pipeline_submitit_slurm",
        node=SlurmQueueConf(_target_=f"{__name__}.PipelineSlurmLauncher"),
        provider="pipeline",
    )


_register()
