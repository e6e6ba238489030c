"""A resumable Optuna sweeper: ``./launch.sh tune`` (``train -m tune=default``).

The search is Optuna's (TPE by default) through hydra-optuna-sweeper: the same ``hydra.sweeper.params``
syntax (``interval``, ``tag(log, ...)``, ``choice``, ``range``), samplers and storage. Its sweep loop is
replaced by one that

- keeps the study in the sweep folder (``optuna.db``, SQLite) and, started again with the same sweep folder
  (``PIPELINE_RUN_ID``), resumes it: finished trials count towards ``n_trials``, and a trial a killed
  sweep left running is run again with its parameters in its own folder, where the training job resumes
  from its last checkpoint;
- numbers each trial's folder by its Optuna trial number (``multirun/<id>/<number>``), so folders and
  trials stay paired across restarts;
- reads each trial's objective from its ``summary.json`` (``objective``: ``val_auc`` by default, the
  final validation AUC of the best checkpoint), records failed trials as failed and carries on;
- prints the best trial and writes its parameters as a config file to train with:
  ``configs/tuned/<name>.yaml`` (``./launch.sh train +tuned=<name>``) and ``<sweep dir>/tuned.yaml``.

Trials run through the configured launcher (the project's torchrun launcher: each a torchrun job of
``NPROC`` ranks, ``n_jobs`` side by side).
"""

# No `from __future__ import annotations`: Hydra's plugin scanner executes this module before it is in
# sys.modules, and dataclasses cannot resolve string annotations then.
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)

LOCK = ".tune.lock"

# objective name -> (key path in summary.json, direction)
OBJECTIVES = {
    "val_auc": (("final", "eval/val/auc"), "maximize"),
    "val_logloss": (("final", "eval/val/logloss"), "minimize"),
    "val_ne": (("final", "eval/val/normalized_entropy"), "minimize"),
}


def _sampler_defaults() -> List[Any]:
    return [{"sampler": "tpe"}]


@dataclass
class PipelineOptunaSweeperConf:
    """``hydra.sweeper.*`` of ``hydra/sweeper=pipeline_optuna`` (hydra-optuna-sweeper's keys, plus ``objective``
    and ``tuned_name``)."""

    _target_: str = "hydra_plugins.pipeline_optuna_sweeper.sweeper.ResumableOptunaSweeper"
    defaults: List[Any] = field(default_factory=_sampler_defaults)
    sampler: Any = MISSING  # hydra-optuna-sweeper's sampler configs: tpe (default), random, cmaes, grid, ...
    objective: str = "val_auc"  # what a trial is judged by (its summary.json): val_auc, val_logloss, val_ne
    storage: Optional[str] = None  # Optuna storage URL; null = sqlite:///<sweep dir>/optuna.db
    study_name: str = "tune"
    n_trials: int = 20  # trials in the study, those of earlier (killed) runs of the same sweep folder included
    n_jobs: int = 1  # trials run side by side (the launcher's max_parallel should allow them)
    max_failure_rate: float = 0.5  # stop when more than this share of finished trials failed
    params: Optional[Dict[str, str]] = None  # the search space, hydra-optuna-sweeper's syntax
    tuned_name: Optional[str] = None  # the config written for the best trial: <tuned_dir>/<name>.yaml; null = run id
    tuned_dir: str = "configs/tuned"  # configs/ is on Hydra's search path (pipeline/conf/train.yaml): +tuned=<name>


ConfigStore.instance().store(
    group="hydra/sweeper", name="pipeline_optuna", node=PipelineOptunaSweeperConf, provider="pipeline"
)


class ResumableOptunaSweeper(Sweeper):
    """See the module docstring."""

    def __init__(
        self,
        sampler: Any,
        objective: str,
        storage: Optional[str],
        study_name: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: Optional[DictConfig],
        tuned_name: Optional[str] = None,
        tuned_dir: str = "configs/tuned",
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"hydra.sweeper.objective={objective}: expected one of {sorted(OBJECTIVES)}")
        self.sampler = sampler
        self.objective = objective
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = max(1, n_jobs)
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.tuned_name = tuned_name
        self.tuned_dir = Path(tuned_dir)
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # -- the search space -------------------------------------------------------------------------
    def _space(self, arguments: List[str]) -> tuple:
        """(Optuna distributions, fixed overrides) from hydra.sweeper.params and the command line's overrides."""
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        params_conf = [f"{k!s}={v}" for k, v in (self.params or {}).items()] + list(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        for name in fixed:
            distributions.pop(name, None)
        return distributions, fixed

    @staticmethod
    def _overrides(params: Dict[str, Any], fixed: Dict[str, Any]) -> List[str]:
        return [f"{name}={value}" for name, value in {**params, **fixed}.items()]

    # -- the loop ---------------------------------------------------------------------------------
    def sweep(self, arguments: List[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _lock(sweep_dir)
        distributions, fixed = self._space(arguments)
        if not distributions:
            raise ValueError(
                "nothing to search: hydra.sweeper.params (or a sweep override like "
                "optimizer.lr='tag(log, interval(0.001, 0.1))') defines no range or choice"
            )
        path, direction = OBJECTIVES[self.objective]
        storage = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # hydra-optuna-sweeper builds its ranges with distribution classes Optuna converts with a FutureWarning.
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna.distributions")
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, sampler=self.sampler, direction=direction, load_if_exists=True
        )
        if study.trials and hasattr(self.sampler, "reseed_rng"):
            self.sampler.reseed_rng()  # a resumed search: not the first run's random draws over again
        done = [t for t in study.trials if t.state.is_finished()]
        stale = [t for t in study.trials if t.state == TrialState.RUNNING]
        log.info(
            "Optuna study %r (%s, %s %s) in %s: %d of %d trials done%s; %d side by side",
            self.study_name,
            type(self.sampler).__name__,
            direction,
            self.objective,
            storage,
            len(done),
            self.n_trials,
            f", {len(stale)} left running by a killed run: running them again" if stale else "",
            self.n_jobs,
        )
        log.info("to resume this search after a stop: PIPELINE_RUN_ID=%s and the same command", sweep_dir.name)
        self._restore_points(study, fixed, sweep_dir)
        for trial in stale:  # a killed sweep's trials: the same parameters, folder and checkpoints
            self._run([(trial.number, trial.params)], study, fixed, path)
        while True:
            finished = [t for t in study.trials if t.state.is_finished()]
            to_go = self.n_trials - len(finished)
            failed = [t for t in finished if t.state == TrialState.FAIL]
            if finished and len(failed) / len(finished) > self.max_failure_rate:
                raise SystemExit(
                    f"{len(failed)} of {len(finished)} trials failed (more than hydra.sweeper."
                    f"max_failure_rate={self.max_failure_rate}); their logs: "
                    + ", ".join(str(sweep_dir / str(t.number) / "torchrun.log") for t in failed[:3])
                )
            if to_go <= 0:
                break
            trials = [study.ask(distributions) for _ in range(min(self.n_jobs, to_go))]
            self._run([(t.number, t.params) for t in trials], study, fixed, path)
        self._report_best(study, fixed, sweep_dir, arguments)

    def _run(self, numbered: List[tuple], study: Any, fixed: Dict[str, Any], path: tuple) -> None:
        """Launch trials (consecutive numbers: one batch) and tell Optuna each one's objective or failure."""
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        numbered = sorted(numbered, key=lambda x: x[0])
        groups: List[List[tuple]] = []
        for item in numbered:
            if groups and item[0] == groups[-1][-1][0] + 1:
                groups[-1].append(item)
            else:
                groups.append([item])
        for group in groups:
            overrides = [self._overrides(params, fixed) for _, params in group]
            returns = self.launcher.launch(overrides, initial_job_idx=group[0][0])
            for (number, _), ret in zip(group, returns, strict=True):
                value = None
                if ret.status == JobStatus.COMPLETED:
                    try:
                        value = _lookup(ret.return_value, path)
                    except (KeyError, TypeError, ValueError) as e:
                        log.warning("trial %d: no %s in its summary (%s)", number, self.objective, e)
                if value is None or value != value:  # failed, or NaN
                    study.tell(number, state=TrialState.FAIL)
                    log.warning("trial %d failed (its log: %s)", number, Path(ret.working_dir) / "torchrun.log")
                else:
                    study.tell(number, value)
                    log.info("trial %d: %s %.5f", number, self.objective, value)

    def _restore_points(self, study: Any, fixed: Dict[str, Any], sweep_dir: Path) -> None:
        """Put the finished trials of earlier runs into the launcher's results table (the project's launcher)."""
        points = getattr(self.launcher, "points", None)
        if points is None:
            return
        from hydra_plugins.pipeline_torchrun_launcher.torchrun_launcher import SweepPoint

        for t in study.trials:
            if not t.state.is_finished():
                continue
            run_dir = sweep_dir / str(t.number)
            summary_file = run_dir / "summary.json"
            ok = summary_file.is_file() and t.state.name == "COMPLETE"
            points.append(
                SweepPoint(
                    t.number,
                    self._overrides(t.params, fixed),
                    run_dir,
                    status="ok" if ok else "failed",
                    exit_code=0 if ok else None,
                    summary=json.loads(summary_file.read_text()) if ok else None,
                )
            )

    def _report_best(self, study: Any, fixed: Dict[str, Any], sweep_dir: Path, arguments: List[str]) -> None:
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        if not complete:
            raise SystemExit(f"no trial finished: see the logs under {sweep_dir}")
        best = study.best_trial
        path = OBJECTIVES[self.objective][0]
        name = self.tuned_name or sweep_dir.name
        arguments = [a for a in arguments if not a.startswith("tune=")]
        text = tuned_config(best.params, self.objective, best.value, best.number, sweep_dir, arguments, name)
        (sweep_dir / "tuned.yaml").write_text(text)
        self.tuned_dir.mkdir(parents=True, exist_ok=True)
        (self.tuned_dir / f"{name}.yaml").write_text(text)
        (sweep_dir / "best.json").write_text(
            json.dumps(
                {
                    "objective": self.objective,
                    "value": best.value,
                    "trial": best.number,
                    "params": best.params,
                    "overrides": self._overrides(best.params, {}),
                    "run_dir": str(sweep_dir / str(best.number)),
                    "tuned_config": str(self.tuned_dir / f"{name}.yaml"),
                    "trials_complete": len(complete),
                    "trials": len(study.trials),
                },
                indent=2,
            )
            + "\n"
        )
        _redact_files([sweep_dir / "tuned.yaml", self.tuned_dir / f"{name}.yaml", sweep_dir / "best.json"])
        tracking = getattr(self.launcher, "tracking", None)  # the sweep's MLflow run (the project's launcher)
        if tracking is not None:
            tracking.update(
                [sweep_dir / "best.json", sweep_dir / "tuned.yaml"], {f"best/{path[-1]}": best.value}, status="FINISHED"
            )
        print(
            _redact(
                f"best of {len(complete)} trials: #{best.number} {self.objective} {best.value:.5f}\n"
                f"  overrides: {' '.join(self._overrides(best.params, {}))}\n"
                f"  written to {self.tuned_dir / (name + '.yaml')}: train with it: ./launch.sh train +tuned={name} "
                f"{' '.join(a for a in arguments if '=' in a and not _is_sweep(a))}".rstrip()
            ),
            flush=True,
        )


def _redact(text: str) -> str:
    """Credentials (a tracking URI's user:password@, tokens) masked (pipeline/redact.py)."""
    try:
        from pipeline.redact import redact_text
    except ImportError:  # not the pipeline's project
        return text
    return redact_text(text)


def _redact_files(paths: List[Path]) -> None:
    try:
        from pipeline.redact import redact_files
    except ImportError:
        return
    redact_files(paths)


def _is_sweep(override: str) -> bool:
    value = override.partition("=")[2]
    return any(value.startswith(p) for p in ("interval(", "tag(", "choice(", "range(")) or "," in value


def _lookup(summary: Any, path: tuple) -> float:
    value = summary
    for key in path:
        value = value[key]
    return float(value)


def tuned_config(
    params: Dict[str, Any], objective: str, value: float, number: int, sweep_dir: Path, arguments: List[str], name: str
) -> str:
    """A config file (package _global_) that sets the best trial's parameters; group choices become overrides of
    the defaults list, e.g. ``model: dcn_criteo``."""
    groups = {k: v for k, v in params.items() if "." not in k}
    values = OmegaConf.create({})
    for key, v in params.items():
        if "." in key:
            OmegaConf.update(values, key, v, force_add=True)
    lines = [
        "# @package _global_",
        f"# Best of an Optuna search ({objective} {value:.5f}, trial {number}): {sweep_dir}",
        f"# written {time.strftime('%Y-%m-%d %H:%M')}; the search: ./launch.sh tune {' '.join(arguments)}",
        f"# train with it: ./launch.sh train +tuned={name} (plus your data overrides)",
    ]
    if groups:
        lines += ["defaults:"] + [f"  - override /{g}: {v}" for g, v in groups.items()]
    body = OmegaConf.to_yaml(values) if params.keys() - groups.keys() else ""
    return "\n".join(lines) + "\n" + body


def _lock(sweep_dir: Path) -> None:
    """One tuning process per sweep folder: a second one would run the first one's trials again."""
    lock = sweep_dir / LOCK
    if lock.is_file():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            pass  # a killed run's lock
        else:
            if pid != os.getpid():
                raise SystemExit(f"{sweep_dir} is being tuned by process {pid}; wait for it or stop it first")
    lock.write_text(str(os.getpid()))
