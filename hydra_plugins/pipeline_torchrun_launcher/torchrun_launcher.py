"""A Hydra launcher that runs every sweep point as its own ``torchrun`` job.

``python pipeline/train.py -m optimizer.lr=0.01,0.1`` (or ``./launch.sh train -m ...``) composes the
sweep once, in one process, and this launcher starts, for each point,

    torchrun --standalone --nnodes 1 --nproc_per_node N pipeline/train.py \
        hydra.run.dir=<sweep dir>/<num> <point's overrides>

as a subprocess, so a point may itself be a multi-rank job. Running Hydra's multirun inside one
torchrun instead would make every rank run (and, with a sampling sweeper, choose) the whole sweep.

Points run one after another (``hydra.launcher.max_parallel=K``: K at a time, after the first point
has run alone and prepared the data). A failed point is recorded
and the others still run; at the end the sweep folder holds ``results.csv`` and ``results.json``
(each point's overrides, status, exit code and final metrics from its ``summary.json``), the same
table is printed, and the sweep exits non-zero if any point failed.
"""

# No `from __future__ import annotations`: Hydra's plugin scanner executes this module before it is in
# sys.modules, and dataclasses cannot resolve string annotations then. Keep the imports light as well:
# every Hydra start (every rank of every run) imports this module.
import copy
import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

# What torchrun/TorchX set for their workers. A sweep point starts its own torchrun, which must not
# inherit the outer job's rank layout or rendezvous.
_WORKER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)

# Final metrics in the table: (column suffix, key in summary.json's final.<split>).
_METRICS = (("auc", "auc"), ("logloss", "logloss"), ("ne", "normalized_entropy"), ("calibration", "calibration"))
_SPLITS = ("val", "test")

_SAFE_OVERRIDE_VALUE = re.compile(r"^[A-Za-z0-9_./:+@%-]+$")
_TAIL_LINES = 15
# Lines of a point's output that name its error (a rank's ERROR log line, an exception's last line),
# shown when the point fails; torchrun's own report of the failed child is left out.
_ERROR_LINE = re.compile(r"\]\[(ERROR|CRITICAL)\]|^[\w.]*(Error|Exception)\b.*:")


class SweepPointFailed(SystemExit):
    """Raised by Hydra's sweeper for a point whose torchrun job did not finish cleanly (after all points ran).

    A SystemExit with a message: the sweep exits with status 1 and that message, without a traceback
    through Hydra's internals (the point's own error is in its torchrun.log, and shown by the launcher).
    """


@dataclass
class SweepPoint:
    """One point of the sweep: what it ran with, where, and how it ended."""

    num: int
    overrides: list[str]
    run_dir: Path
    status: str = "pending"  # ok | failed | no_summary | timeout | invalid (its config, checked before starting)
    exit_code: int | None = None
    seconds: float = 0.0
    summary: dict | None = None
    error: str | None = None  # why an invalid point was not started

    @property
    def log_file(self) -> Path:
        return self.run_dir / "torchrun.log"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("~+"), value


def _quote(value: str) -> str:
    """A path as a Hydra override value: bare when that parses, else single-quoted."""
    if _SAFE_OVERRIDE_VALUE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class TorchrunLauncher(Launcher):
    """Start each sweep point as ``torchrun ... <script> <overrides>``; see the module docstring.

    Args (``hydra.launcher.<name>=...``, defaults in pipeline/conf/hydra/launcher/torchrun.yaml):
        nproc_per_node: ranks per point (torchrun's ``--nproc_per_node``; ``NPROC`` by default).
        torchrun_args: torchrun's other arguments (``--standalone --nnodes 1``: one node, a free port,
            so parallel points do not collide).
        script: the training script; default the script the sweep was started with (``sys.argv[0]``).
        max_parallel: points running at once.
        timeout_s: wall-clock limit per point (``null``: none); a point over it is stopped and failed.
        env: extra environment variables for every point.
        stream_output: also print each point's output, prefixed ``[#num]`` (always in ``torchrun.log``).
        results_name: base name of the table files in the sweep folder (``results.csv``, ``.json``).
    """

    def __init__(
        self,
        nproc_per_node: int | str = 2,
        torchrun_args: Sequence[str] = ("--standalone", "--nnodes", "1"),
        script: str | None = None,
        max_parallel: int = 1,
        timeout_s: float | None = None,
        env: dict[str, Any] | None = None,
        stream_output: bool = False,
        results_name: str = "results",
    ) -> None:
        super().__init__()
        self.nproc_per_node = int(nproc_per_node)
        self.torchrun_args = [str(a) for a in torchrun_args]
        self.script = script
        self.max_parallel = max(1, int(max_parallel))
        self.timeout_s = float(timeout_s) if timeout_s else None
        self.env = {str(k): str(v) for k, v in dict(env or {}).items()}
        self.stream_output = bool(stream_output)
        self.results_name = results_name
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.points: list[SweepPoint] = []  # every point so far, over all of the sweeper's batches
        self.tracking: Any = None  # the sweep's parent MLflow run (logger.backends with mlflow), else None
        self._procs: dict[int, subprocess.Popen] = {}
        self._print_lock = threading.Lock()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # -- launching ------------------------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                "a sweep (-m) starts one torchrun job per point: run it from one process "
                "(./launch.sh train -m ... or python pipeline/train.py -m ...), not under torchrun/TorchX, "
                "where every rank would run the whole sweep"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _redact_file(sweep_dir / "multirun.yaml")  # Hydra's sweeper wrote the overrides there, credentials included
        self._start_tracking(sweep_dir)
        batch: list[tuple[SweepPoint, DictConfig]] = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{num}"
                sweep_config.hydra.job.num = num
            run_dir = sweep_dir / str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
            point = SweepPoint(num, list(overrides), run_dir)
            point.error = self._config_problem(sweep_config)
            if point.error is not None:
                point.status = "invalid"
            batch.append((point, sweep_config))

        log.info(
            "Sweep of %d points, each a torchrun job of %d rank(s), into %s", len(batch), self.nproc_per_node, sweep_dir
        )
        for point, _ in batch:
            log.info("\t#%d : %s", point.num, _redact(" ".join(point.overrides)))
        points = [p for p, _ in batch]
        # Side by side, the sweep's first point runs alone: it generates/preprocesses the data once, so
        # parallel points do not all prepare the same folder at the same time.
        alone = points[:1] if self.max_parallel > 1 and not self.points else []
        pool = ThreadPoolExecutor(max_workers=self.max_parallel)
        # The points run in their own sessions: a SIGTERM to the sweep (a scheduler, kill) must stop them
        # as Ctrl-C does, not leave them running.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_signal) if in_main else None
        try:
            for point in alone:
                self._run_point(point, sweep_dir)
            list(pool.map(lambda p: self._run_point(p, sweep_dir), points[len(alone) :]))
        except BaseException:  # Ctrl-C: start no more points, stop the running ones (in their own sessions)
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(self._procs.values()):
                _stop(proc)
            raise
        finally:
            pool.shutdown(wait=True)
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        self.points.extend(p for p, _ in batch)
        table = write_results(sweep_dir, self.points, self._swept_keys(), self.results_name)
        print(table, flush=True)
        failed = [p for p in self.points if not p.ok]
        self._update_tracking(sweep_dir, failed)
        if failed:
            log.error(
                "%d of %d sweep points failed: %s",
                len(failed),
                len(self.points),
                ", ".join(f"#{p.num} ({p.status}, exit code {p.exit_code})" for p in failed),
            )
        return [self._job_return(point, cfg, len(failed)) for point, cfg in batch]

    def _command(self, point: SweepPoint) -> list[str]:
        script = self.script or sys.argv[0]
        threads = []
        if self.max_parallel > 1 and not any(_split_override(o)[0] == "trainer.num_threads" for o in point.overrides):
            # Points side by side share the cores: each rank gets its share instead of all of them.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = [f"trainer.num_threads={max(1, cores // (self.max_parallel * self.nproc_per_node))}"]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *self.torchrun_args,
            "--nproc_per_node",
            str(self.nproc_per_node),
            str(Path(script).absolute()),
            f"hydra.run.dir={_quote(str(point.run_dir))}",
            *point.overrides,
            *threads,
        ]

    def _environment(self, point: SweepPoint, sweep_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _WORKER_ENV and not k.startswith("TORCHELASTIC_")}
        # One run id per point (pipeline/resolvers.py): equal on its ranks, distinct between points.
        env["PIPELINE_RUN_ID"] = f"{sweep_dir.name}_{point.run_dir.name}"
        env.setdefault("OMP_NUM_THREADS", "1")  # as launch.sh; each rank sets its own thread count
        if self.tracking is not None:  # the point's MLflow run nests under the sweep's
            env.update(self.tracking.environment())
        env.update(self.env)
        return env

    # -- tracking -------------------------------------------------------------------------------
    def _start_tracking(self, sweep_dir: Path) -> None:
        """The sweep's parent MLflow run, opened at the first batch (kept in the sweep folder across restarts)."""
        if self.tracking is None and "logger" in self.config:
            try:
                from pipeline.metrics.tracking import SweepTracking
            except ImportError:  # not the pipeline's config
                return
            self.tracking = SweepTracking.start(self.config, sweep_dir)
        elif self.tracking is not None:
            self.tracking.update([], status="RUNNING")

    def _update_tracking(self, sweep_dir: Path, failed: list[SweepPoint]) -> None:
        """The results table and the best validation AUC so far on the sweep's run, which ends with this batch
        (FAILED when a point failed; a tuner's next batch sets it running again)."""
        if self.tracking is None:
            return
        aucs = [
            p.summary["final"]["eval/val/auc"]
            for p in self.points
            if p.ok and "eval/val/auc" in p.summary.get("final", {})
        ]
        self.tracking.update(
            [sweep_dir / f"{self.results_name}.csv", sweep_dir / f"{self.results_name}.json"],
            {"best/eval/val/auc": max(aucs)} if aucs else None,
            status="FAILED" if failed else "FINISHED",
        )

    def _config_problem(self, sweep_config: DictConfig) -> str | None:
        """Why a point's config cannot run (every group's rules and the world size's), checked before its
        torchrun starts; None when it can. Configs that are not the pipeline's are not checked."""
        try:
            from pipeline.config import TrainConfig, validate
            from pipeline.errors import ConfigError
        except ImportError:
            return None
        task = copy.deepcopy(sweep_config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        try:
            cfg = OmegaConf.to_object(task)
            if isinstance(cfg, TrainConfig):
                validate(cfg, self.nproc_per_node)
        except ConfigError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a value OmegaConf cannot build: the point's own run would fail too
            return f"{type(e).__name__}: {str(e).splitlines()[0]}"
        return None

    def _run_point(self, point: SweepPoint, sweep_dir: Path) -> None:
        if point.status == "invalid":
            log.error("#%d not started: invalid config: %s", point.num, point.error)
            return
        point.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = self._command(point)
        log.info(
            "#%d starting: torchrun ... %s (log %s)", point.num, _redact(" ".join(point.overrides)), point.log_file
        )
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        errors: deque[str] = deque(maxlen=_TAIL_LINES)
        t0 = time.perf_counter()
        timed_out = threading.Event()
        with open(point.log_file, "w") as log_file:
            log_file.write("$ " + _redact(" ".join(cmd)) + "\n")
            log_file.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=os.getcwd(),
                env=self._environment(point, sweep_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            self._procs[point.num] = proc
            timer = None
            if self.timeout_s:
                timer = threading.Timer(self.timeout_s, lambda: (timed_out.set(), _stop(proc)))
                timer.daemon = True
                timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log_file.write(line)
                    tail.append(line.rstrip("\n"))
                    if _ERROR_LINE.search(line) and "ChildFailedError" not in line:
                        errors.append(line.rstrip("\n"))
                    if self.stream_output:
                        with self._print_lock:
                            print(f"[#{point.num}] {line}", end="", flush=True)
                point.exit_code = proc.wait()
            except BaseException:  # Ctrl-C while this thread reads: stop the point's torchrun and ranks
                _stop(proc)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                self._procs.pop(point.num, None)
        point.seconds = round(time.perf_counter() - t0, 1)
        summary_file = point.run_dir / "summary.json"
        if timed_out.is_set():
            point.status = "timeout"
        elif point.exit_code != 0:
            point.status = "failed"
        elif not summary_file.is_file():
            point.status = "no_summary"
        else:
            point.summary = json.loads(summary_file.read_text())
            point.status = "ok"
        if point.ok:
            final = point.summary.get("final", {}) if point.summary else {}
            log.info(
                "#%d done in %.0f s: val auc %.4f logloss %.4f",
                point.num,
                point.seconds,
                final.get("eval/val/auc", float("nan")),
                final.get("eval/val/logloss", float("nan")),
            )
        else:
            log.error(
                "#%d %s (exit code %s) after %.0f s; %s of %s:\n%s",
                point.num,
                point.status,
                point.exit_code,
                point.seconds,
                "errors" if errors else "last lines",
                point.log_file,
                "\n".join(errors or tail),
            )

    # -- results --------------------------------------------------------------------------------
    def _swept_keys(self) -> list[str]:
        """Keys the sweep varies: sweep overrides (a=1,2), the sweeper's params, and any key that differs."""
        assert self.config is not None
        keys: list[str] = []
        task = OmegaConf.to_container(self.config.hydra.overrides.task, resolve=False) or []
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            for o in OverridesParser.create().parse_overrides([str(t) for t in task]):
                if o.is_sweep_override():
                    keys.append(o.key_or_group)
        except Exception:  # noqa: BLE001 - the table is still useful with the keys that differ
            pass
        params = OmegaConf.select(self.config, "hydra.sweeper.params", default=None)
        if params:
            keys.extend(str(k) for k in params)
        values: dict[str, set[str]] = {}
        order: list[str] = []
        for p in self.points:
            for o in p.overrides:
                k, v = _split_override(o)
                if k not in values:
                    order.append(k)
                values.setdefault(k, set()).add(v)
        keys.extend(k for k in order if len(values[k]) > 1 or len(self.points) == 1 and not keys)
        return list(dict.fromkeys(keys))

    def _job_return(self, point: SweepPoint, sweep_config: DictConfig, num_failed: int) -> JobReturn:
        cfg = copy.deepcopy(sweep_config)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        ret = JobReturn(
            overrides=point.overrides,
            cfg=cfg,
            hydra_cfg=OmegaConf.create({"hydra": sweep_config.hydra}),
            working_dir=str(point.run_dir),
            task_name=str(sweep_config.hydra.job.name),
        )
        if point.ok:
            ret.status = JobStatus.COMPLETED
            ret.return_value = point.summary
        else:
            ret.status = JobStatus.FAILED
            why = (
                f"invalid config: {point.error}"
                if point.status == "invalid"
                else f"{point.status}, exit code {point.exit_code}; log: {point.log_file}"
            )
            ret.return_value = SweepPointFailed(
                f"sweep point #{point.num} ({' '.join(point.overrides)}) {why}. {num_failed} of {len(self.points)} "
                f"points failed; the others' results are in {point.run_dir.parent / (self.results_name + '.csv')}"
            )
        return ret


def _redact(text: str) -> str:
    """Credentials (a tracking URI's user:password@, tokens) masked for the logs (pipeline/redact.py)."""
    try:
        from pipeline.redact import redact_text
    except ImportError:
        return text
    return redact_text(text)


def _redact_file(path: Path) -> None:
    try:
        from pipeline.redact import redact_files
    except ImportError:
        return
    redact_files([path])


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the point's process group (torchrun and its ranks), SIGKILL it after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _row(point: SweepPoint, swept_keys: list[str]) -> dict[str, Any]:
    values = dict(_split_override(o) for o in point.overrides)
    row: dict[str, Any] = {"num": point.num, "status": point.status, "exit_code": point.exit_code}
    row.update({k: values.get(k, "") for k in swept_keys})
    final = (point.summary or {}).get("final", {})
    for split in _SPLITS:
        for name, key in _METRICS:
            row[f"{split}_{name}"] = final.get(f"eval/{split}/{key}")
    summary = point.summary or {}
    row["train_samples_per_s"] = summary.get("train_samples_per_s")
    row["steps"] = summary.get("steps")
    row["world_size"] = summary.get("world_size")
    row["seconds"] = point.seconds
    row["run_dir"] = str(point.run_dir)
    row["overrides"] = " ".join(point.overrides)
    return row


def write_results(sweep_dir: Path, points: list[SweepPoint], swept_keys: list[str], name: str = "results") -> str:
    """Write ``<name>.csv`` and ``<name>.json`` into ``sweep_dir``; return the table as text."""
    rows = [_row(p, swept_keys) for p in points]
    columns = list(rows[0]) if rows else ["num", "status", "exit_code"]
    with open(sweep_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    doc = {
        "sweep_dir": str(sweep_dir),
        "swept": swept_keys,
        "num_points": len(points),
        "num_failed": sum(not p.ok for p in points),
        "points": [
            {
                **{k: r[k] for k in ("num", "status", "exit_code", "seconds", "run_dir")},
                "overrides": p.overrides,
                "swept": {k: r[k] for k in swept_keys},
                "final": (p.summary or {}).get("final"),
                "gap_to_optimum": (p.summary or {}).get("gap_to_optimum"),
                "train_samples_per_s": r["train_samples_per_s"],
                "steps": r["steps"],
                "world_size": r["world_size"],
                "log": str(p.log_file),
            }
            for p, r in zip(points, rows, strict=True)
        ],
    }
    (sweep_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    for path in (sweep_dir / f"{name}.csv", sweep_dir / f"{name}.json"):  # the overrides, credentials masked
        _redact_file(path)
    return _redact(format_table(rows, swept_keys, sweep_dir / f"{name}.csv"))


def format_table(rows: list[dict[str, Any]], swept_keys: list[str], csv_path: Path) -> str:
    shown = ["num", "status", "exit_code", *swept_keys, "val_auc", "val_logloss", "test_auc", "test_logloss", "seconds"]

    def cell(column: str, v: Any) -> str:
        if v is None or v == "":
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if column == "seconds" else f"{v:.4f}"
        return str(v)

    header = ["#" if c == "num" else "exit" if c == "exit_code" else c for c in shown]
    body = [[cell(c, r.get(c)) for c in shown] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [f"sweep results ({csv_path}, .json):", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
