"""MLflow experiment tracking: ``logger.backends=[jsonl,tensorboard,mlflow]``.

Rank 0 of a run opens one MLflow run (through ``MlflowClient``; the tracking URI is ``logger.mlflow_tracking_uri``,
else ``MLFLOW_TRACKING_URI``, else MLflow's default ``sqlite:///mlflow.db`` in the working folder):

- experiment ``logger.mlflow_experiment``, by default the data's name (``data.name``: runs on the same data side
  by side), created when missing; the run's name is the run id (the run folder's name);
- params: the resolved config (config.yaml's values, the ones chosen from the data included), flattened to
  dotted keys (``optimizer.lr``), credentials masked (:mod:`pipeline.redact`);
- metrics: every ``train`` and ``eval`` event of metrics.jsonl under the same keys (``train/loss``,
  ``eval/val/auc``, ``memory/rss_mib``, ``progress/samples``), at the training step;
- artifacts, when the run ends: report.md, report.png, summary.json, config.yaml; an export made later with
  ``./launch.sh export <run folder> --out ...`` goes to ``export/`` of the same MLflow run.

The MLflow run id is kept in the run folder (``mlflow_run.json``): a resumed run continues the same MLflow run.
MLflow cannot delete metric points, so the steps a killed run logged after its last checkpoint stay in the
history beside the resumed run's (its latest value per step is the resumed run's).

A sweep or a tuning (``./launch.sh sweep`` / ``tune`` with the backend selected) is one parent run, named by the
sweep id, in the same experiment; each point or trial is a child run (``mlflow.parentRunId``) with its own params
and metrics; the parent gets the results table, and for a tuning the best trial (best.json, tuned.yaml).

A tracking server that fails a request only warns: metrics.jsonl keeps every event, training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.metrics.loggers import scalars_of
from pipeline.redact import redact_config, redact_text

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in the run folder (or the sweep folder): the MLflow run to continue
PARENT_RUN_ENV = "PIPELINE_MLFLOW_PARENT_RUN_ID"  # set by the sweep launcher for its points
EXPERIMENT_ENV = "PIPELINE_MLFLOW_EXPERIMENT_ID"
ARTIFACTS = ("report.md", "report.png", "summary.json", "config.yaml")
_BATCH = 100  # params per log_batch call (MLflow's limit)
_MAX_PARAM_CHARS = 6000  # MLflow's longest param value
_MAX_PENDING = 256  # queued metric batches before the oldest are waited for (a slow server bounds the backlog)


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def selected(logger_cfg: Any) -> bool:
    """Whether ``logger.backends`` includes mlflow (a dataclass, a DictConfig or a dict)."""
    backends = getattr(logger_cfg, "backends", None)
    if backends is None and isinstance(logger_cfg, dict):
        backends = logger_cfg.get("backends")
    return "mlflow" in {_value(b) for b in backends or ()}


def tracking_uri(logger_cfg: Any = None) -> str | None:
    """``logger.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else None (MLflow's default)."""
    uri = getattr(logger_cfg, "mlflow_tracking_uri", None) if logger_cfg is not None else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _import_mlflow():
    """mlflow, quietened: its INFO lines (database migrations) off, credentials masked in what it logs, and no
    "View run at <tracking URI>" printed (the URI may hold a user:password@). A ConfigError when not installed."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        import mlflow
    except ImportError as e:
        from pipeline.errors import ConfigError

        raise ConfigError(
            "logger.backends includes mlflow but mlflow is not installed: run ./launch.sh setup (or pip install "
            "-r requirements/cpu.txt), or leave it out: logger.backends=[jsonl,tensorboard]"
        ) from e
    from pipeline.redact import RedactingFilter

    mlflow_logger = logging.getLogger("mlflow")
    if mlflow_logger.level < logging.WARNING:
        mlflow_logger.setLevel(logging.WARNING)
    for handler in mlflow_logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    return mlflow


def _client(uri: str | None):
    return _import_mlflow().MlflowClient(uri)


def _experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created when missing (two runs creating it at once get the same one)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created meanwhile by a parallel run (RESOURCE_ALREADY_EXISTS)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> strings of a config container (lists kept whole: ``[64, 32]``), as MLflow params."""
    if isinstance(config, dict):
        if not config and prefix:
            return {prefix: "{}"}
        out: dict[str, str] = {}
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = json.dumps(config) if isinstance(config, list | tuple) else "null" if config is None else _value(config)
    return {prefix: text[:_MAX_PARAM_CHARS]}


def read_run_file(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_run_file(folder: Path, record: dict) -> None:
    path = Path(folder) / RUN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def _warn(what: str, e: Exception) -> None:
    logger.warning(
        "MLflow: %s failed: %s", what, redact_text(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    )


def open_run(
    folder: Path,
    uri: str | None,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
) -> tuple[Any, str, bool]:
    """(client, run id, continued) of the MLflow run of ``folder``: the one its run file names when the server
    still has it, else a new one (its id then written to the run file)."""
    client = _client(uri)
    kept = read_run_file(folder)
    if kept is not None:
        try:
            run = client.get_run(kept["run_id"])
            if run.info.lifecycle_stage == "active":
                client.update_run(run.info.run_id, status="RUNNING")
                return client, run.info.run_id, True
        except Exception as e:  # noqa: BLE001 - another server, or the run was deleted: start a new one
            _warn(f"continuing run {kept.get('run_id')}", e)
    experiment_id = experiment_id or _experiment_id(client, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    _write_run_file(
        folder,
        {
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "experiment": experiment,
            "run_name": run_name,
            "tracking_uri": redact_text(uri or client.tracking_uri or ""),
        },
    )
    return client, run.info.run_id, False


class MlflowBackend:
    """One MLflow run per run folder, opened by :meth:`log_config` (rank 0; see the module docstring)."""

    def __init__(self, run_dir: str | Path, logger_cfg: Any = None):
        _import_mlflow()  # fails now, with the config error's message, when mlflow is not installed
        self.run_dir = Path(run_dir)
        self.logger_cfg = logger_cfg
        self.uri = tracking_uri(logger_cfg)
        self.client = None
        self.run_id: str | None = None
        self._pending: list = []  # metric batches queued for MLflow's logging thread

    def log_config(self, config: dict) -> None:
        """Open (or continue) the MLflow run and log the resolved config as params."""
        experiment = (
            getattr(self.logger_cfg, "mlflow_experiment", None) or (config.get("data") or {}).get("name") or "default"
        )
        run_name = os.environ.get("PIPELINE_RUN_ID") or self.run_dir.name
        try:
            self.client, self.run_id, continued = open_run(
                self.run_dir,
                self.uri,
                str(experiment),
                run_name,
                tags={"pipeline.run_dir": str(self.run_dir.absolute())},
                parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
                experiment_id=os.environ.get(EXPERIMENT_ENV) or None,
            )
        except Exception as e:  # noqa: BLE001 - no server: the run trains, metrics.jsonl has everything
            _warn(f"opening a run at {redact_text(self.uri or 'the default store')}", e)
            return
        logger.info(
            "MLflow run %s (%s) in experiment %r at %s",
            self.run_id,
            "continued" if continued else "new",
            experiment,
            redact_text(self.uri or self.client.tracking_uri),
        )
        self._log_params(flatten(redact_config(config)), continued)

    def _log_params(self, params: dict[str, str], continued: bool) -> None:
        from mlflow.entities import Param

        if continued:  # params are immutable in MLflow: log only new keys, say which changed
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                logger.warning("MLflow: params %s changed since the run started; the first values stay", changed)
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        try:
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + _BATCH])
        except Exception as e:  # noqa: BLE001
            _warn("logging params", e)

    def log(self, record: dict) -> None:
        if self.run_id is None:
            return
        step, values = scalars_of(record, "step")
        if not values:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        try:
            # Queued and sent by MLflow's logging thread: the training loop does not wait for the server.
            self._pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        except Exception as e:  # noqa: BLE001
            _warn(f"logging metrics of step {step}", e)
        if len(self._pending) > _MAX_PENDING:
            self._wait(self._pending[: -_MAX_PENDING // 2])

    def _wait(self, operations: list) -> None:
        """Wait for queued metric batches (and hear about those that failed)."""
        for op in operations:
            try:
                if op is not None:
                    op.wait()
            except Exception as e:  # noqa: BLE001
                _warn("logging metrics", e)
        self._pending = self._pending[len(operations) :]

    def close(self) -> None:
        """Wait for the queued metrics; the run itself is ended by :func:`end_run` once the report is written
        (pipeline/train.py)."""
        self._wait(list(self._pending))


def end_run(
    logger_cfg: Any, run_dir: str | Path, status: str = "FINISHED", artifacts: Iterable[str] = ARTIFACTS
) -> None:
    """Upload the run folder's ``artifacts`` that exist and end the MLflow run of ``run_dir`` with ``status``
    (FINISHED, FAILED, KILLED); nothing when the backend is not selected or no run was opened."""
    run_dir = Path(run_dir)
    kept = read_run_file(run_dir)
    if not selected(logger_cfg) or kept is None:
        return
    try:
        client = _client(tracking_uri(logger_cfg))
        for name in artifacts:
            if (run_dir / name).is_file():
                client.log_artifact(kept["run_id"], str(run_dir / name))
        client.set_terminated(kept["run_id"], status=status)
    except Exception as e:  # noqa: BLE001 - never fail a finished training run over its tracking
        _warn(f"ending run {kept['run_id']}", e)


def log_export(run_dir: str | Path, export_dir: str | Path) -> bool:
    """Upload an export of a tracked run to ``export/`` of its MLflow run; True when done.

    The tracking URI is the run's (config.yaml), or ``MLFLOW_TRACKING_URI`` when that held credentials
    (config.yaml has them masked).
    """
    run_dir, export_dir = Path(run_dir), Path(export_dir)
    kept = read_run_file(run_dir)
    if kept is None or not export_dir.is_dir():
        return False
    uri = None
    try:
        import yaml

        uri = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("logger") or {}).get("mlflow_tracking_uri")
    except (OSError, ValueError, AttributeError):
        pass
    if uri and "***" in uri:
        uri = None
    try:
        client = _client(uri or tracking_uri())
        client.log_artifacts(kept["run_id"], str(export_dir), artifact_path="export")
    except Exception as e:  # noqa: BLE001
        _warn(f"uploading the export to run {kept['run_id']}", e)
        return False
    logger.info("export uploaded to MLflow run %s (artifacts/export)", kept["run_id"])
    return True


class SweepTracking:
    """The parent MLflow run of a sweep or tuning (the sweep folder's run file keeps it across restarts)."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def start(cls, config: Any, sweep_dir: Path) -> SweepTracking | None:
        """The parent run for ``config`` (the sweep's composed config), or None when mlflow is not selected or
        the server fails (the points then track nothing nested; each still opens its own run)."""
        logger_cfg = config.get("logger") if hasattr(config, "get") else None
        if logger_cfg is None or not selected(logger_cfg):
            return None
        uri = tracking_uri(logger_cfg)
        data_name = (config.get("data") or {}).get("name")
        experiment = logger_cfg.get("mlflow_experiment") or data_name or "default"
        overrides = [str(o) for o in (config.hydra.overrides.task or [])] if "hydra" in config else []
        try:
            client, run_id, _ = open_run(
                sweep_dir,
                uri,
                str(experiment),
                sweep_dir.name,
                tags={
                    "pipeline.sweep_dir": str(sweep_dir),
                    "pipeline.overrides": redact_text(" ".join(overrides))[:5000],
                },
            )
            experiment_id = read_run_file(sweep_dir)["experiment_id"]
            client.update_run(run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001
            _warn(f"opening the sweep's run at {redact_text(uri or 'the default store')}", e)
            return None
        logger.info("MLflow: sweep run %s in experiment %r; points are its nested runs", run_id, experiment)
        return cls(client, run_id, experiment_id)

    def environment(self) -> dict[str, str]:
        """What a point's processes need to nest their runs under this one."""
        return {PARENT_RUN_ENV: self.run_id, EXPERIMENT_ENV: self.experiment_id}

    def update(self, files: Iterable[Path], metrics: dict[str, float] | None = None, status: str | None = None) -> None:
        """Upload ``files`` (the results table, the best trial) and ``metrics``; ``status``: end the run (FINISHED,
        FAILED) or set it running again (RUNNING)."""
        from mlflow.entities import Metric

        try:
            for path in files:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
            if metrics:
                now = int(time.time() * 1000)
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
            if status == "RUNNING":
                self.client.update_run(self.run_id, status=status)
            elif status:
                self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            _warn(f"updating the sweep's run {self.run_id}", e)
