"""The training loop: TrainPipelineSparseDist over a sharded DLRM, periodic and final evaluation, the best
checkpoint kept and restored."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from pipeline import checkpoint as ckpt
from pipeline import storage
from pipeline.autoconfig import adapt_to_data
from pipeline.checkpoint.warm_start import check_rows_line_up, data_identity, load_grown, resolve_init
from pipeline.config import BestMetric, Precision, TrainConfig, validate, validate_batch_sizes
from pipeline.data import mirror
from pipeline.data.features import FeatureTransform
from pipeline.data.loader import BinarySplit, eval_batches, num_train_batches, train_batches
from pipeline.data.prepare import prepare_data_distributed
from pipeline.distributed.env import DistEnv, init_process_group, keep_freed_memory, select_device, set_num_threads
from pipeline.distributed.sharding import reset_tables, shard_model
from pipeline.errors import DataError, Preempted, TrainingError
from pipeline.metrics.evaluator import PredictionAccumulator
from pipeline.metrics.functional import BinaryMetrics
from pipeline.metrics.keys import eval_key, eval_metrics
from pipeline.metrics.loggers import RunWriter, process_memory_mib
from pipeline.model.dlrm import build_model
from pipeline.model.one_hot import RowGather, one_hot_ids, whole_local_tables
from pipeline.optim.schedule import lr_scheduler, resolve_schedule
from pipeline.redact import redact_config
from pipeline.tools.health import Heartbeat

logger = logging.getLogger(__name__)

STOP_VOTE_EVERY = 8  # steps between the ranks' votes on a stop signal (SIGTERM, SIGUSR1)


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or Inf; the message names the step."""


class StepTimer:
    """Training time in log windows, excluding what runs inside :meth:`paused` (evaluations, saves), and the
    loop's own bookkeeping time (loss tracking, log events, progress bar)."""

    def __init__(self, train_seconds: float) -> None:
        self.train_seconds = train_seconds  # over the whole run, a resumed run's earlier time included
        self.bookkeeping_seconds = 0.0
        self.window_steps = 0
        self._window_s = 0.0
        self._mark = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._window_s += time.perf_counter() - self._mark
        try:
            yield
        finally:
            self._mark = time.perf_counter()

    @contextmanager
    def bookkeeping(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.bookkeeping_seconds += time.perf_counter() - t0

    def close_window(self) -> tuple[int, float]:
        """End the log window: (steps, seconds) trained in it."""
        now = time.perf_counter()
        seconds = self._window_s + now - self._mark
        steps = self.window_steps
        self.train_seconds += seconds
        self.window_steps, self._window_s, self._mark = 0, 0.0, now
        return steps, seconds


class LossTracker:
    """The mean training loss of a log window and the first non-finite loss, kept on the device (no host sync
    per step)."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), device=device)
        self._step = torch.tensor(step, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self._step += 1
        first_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, self._step, self.bad_step)
        self.bad_value = torch.where(first_bad, loss.detach(), self.bad_value)

    def first_bad(self) -> tuple[int, float] | None:
        step = int(self.bad_step.item())
        return (step, self.bad_value.item()) if step >= 0 else None


@dataclass
class BestTracker:
    """The best validation value of ``trainer.best_metric`` so far, the step of its checkpoint, and evaluations
    since it improved."""

    metric: BestMetric = BestMetric.logloss
    value: float | None = None
    step: int | None = None
    evals_without_gain: int = 0

    def _gain(self, metrics: BinaryMetrics) -> float:
        """How much better than the best so far ``metrics`` is (inf for the first)."""
        if self.value is None:
            return float("inf")
        new = getattr(metrics, self.metric.value)
        return new - self.value if self.metric == BestMetric.auc else self.value - new

    def update(self, metrics: BinaryMetrics, step: int, min_delta: float = 0.0) -> bool:
        """Record an evaluation; True when it is the new best (a gain of more than ``min_delta`` resets patience)."""
        gain = self._gain(metrics)
        self.evals_without_gain = 0 if gain > min_delta else self.evals_without_gain + 1
        if gain > 0:
            self.value, self.step = getattr(metrics, self.metric.value), step
            return True
        return False

    def describe(self) -> str:
        return f"val {self.metric.value} {self.value:.4f} at step {self.step}" if self.step is not None else "none"

    def to_dict(self) -> dict:
        return {
            "metric": self.metric.value,
            "value": self.value,
            "step": self.step,
            "evals_without_gain": self.evals_without_gain,
        }

    @classmethod
    def from_dict(cls, d: dict | None, metric: BestMetric) -> BestTracker:
        """From a checkpoint's record; one kept for another metric starts over (its patience count kept)."""
        d = d or {}
        if d.get("metric") != metric.value or d.get("value") is None:
            return cls(metric, evals_without_gain=d.get("evals_without_gain", 0))
        return cls(metric, d["value"], d.get("step"), d.get("evals_without_gain", 0))


class Trainer:
    """Owns the process group, the sharded model, its optimizers and the data of one job."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.env = DistEnv.from_environ()
        self.malloc_tuned = cfg.trainer.keep_freed_memory and keep_freed_memory()  # before the big allocations
        self.device = select_device(cfg.trainer, self.env)
        validate(cfg, self.env.world_size, self.device.type)
        self.backend = init_process_group(cfg.launcher, self.env, self.device)
        # Stop requests are agreed on the CPU (a gloo group beside NCCL's), so checking costs no device sync.
        self._control = dist.new_group(backend="gloo") if self.env.world_size > 1 else None
        self._stop_signal = 0
        self._stop_vote: tuple | None = None  # the all-reduce of the stop flags in flight
        self.num_threads = set_num_threads(cfg.trainer.num_threads, self.env)
        self.heartbeat = Heartbeat.from_env(self.env.local_rank)  # the container's HEALTHCHECK reads it
        self.writer = RunWriter(self.run_dir, self.env.is_rank_zero, cfg.logger)
        logger.info(
            "rank %d/%d (pid %d) on %s, host %s, backend %s, %d threads%s, run folder %s",
            self.env.rank,
            self.env.world_size,
            os.getpid(),
            self.device,
            socket.gethostname(),
            self.backend,
            self.num_threads,
            ", freed memory kept for reuse" if self.malloc_tuned else "",
            self.run_dir,
        )

        self.manifest = prepare_data_distributed(cfg.data, self.env.is_rank_zero, self.env.local_rank == 0)
        data_dir = mirror.local_dir(cfg.data)  # data.processed_dir, or its local copy when in an object store
        features = FeatureTransform.from_manifest(self.manifest, data_dir, cfg.data.min_id_frequency)
        self.table_rows = list(features.table_sizes)
        self.train_split = BinarySplit(data_dir, "train", self.manifest, features)
        self.eval_splits = {
            s: BinarySplit(data_dir, s, self.manifest, features) for s in ("val", "test") if self.manifest.rows(s)
        }
        if "val" not in self.eval_splits:
            raise DataError(
                f"the val split of {cfg.data.processed_dir} has no rows: evaluation and the best "
                "checkpoint need validation data (data.val_files, or data.val_fraction with data=tsv)"
            )
        self.adapted = adapt_to_data(cfg, len(self.train_split), self.env.world_size)
        validate_batch_sizes(cfg.data, self.env.world_size)
        if self.env.is_rank_zero:
            for line in self.adapted:
                logger.info("chosen from the data: %s", line)
            self._write_resolved_config()
        self.steps_per_epoch = num_train_batches(len(self.train_split), cfg.data.global_batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the train split of {cfg.data.processed_dir} has {len(self.train_split):,} rows, fewer "
                f"than one global batch (data.global_batch_size={cfg.data.global_batch_size}): use a smaller "
                "batch or more training data"
            )
        self.total_steps = cfg.trainer.max_steps or self.steps_per_epoch * cfg.trainer.num_epochs

        torch.manual_seed(cfg.trainer.seed)  # identical MLP init on every rank (DDP also broadcasts)
        schema = self.manifest.schema  # the columns the data was preprocessed with
        model = build_model(
            cfg.model,
            features.table_sizes,
            feature_names=list(schema.feature_names),
            num_dense_features=schema.num_dense,
            weighted=bool(schema.weighted),  # the batches carry a weight per id (1.0 where the data has none)
        )
        self.local_batch_size = cfg.data.global_batch_size // self.env.world_size
        factors = self.manifest.pooling_factors  # mean ids per row per table (None: one-hot data)
        self.model, self.optimizer = shard_model(
            model,
            cfg.sharding,
            cfg.optimizer,
            self.env,
            self.device,
            self.local_batch_size,
            dict(zip(schema.feature_names, factors, strict=True)) if factors else None,
        )
        # Tables re-initialised each epoch need their full rate in every epoch; the MLPs' rate decays each epoch.
        restarts = cfg.trainer.reset_tables_each_epoch and self.total_steps > self.steps_per_epoch
        self.schedule, warnings = resolve_schedule(
            cfg.optimizer, self.total_steps, self.steps_per_epoch if restarts else None
        )
        if self.env.is_rank_zero:
            for warning in warnings:
                logger.warning("%s", warning)
        self.scheduler = lr_scheduler(self.optimizer, self.schedule, num_table_groups=self._num_table_groups())
        self.eval_every, self.eval_in_epoch = self._eval_cadence()
        self.step = 0
        self.timer = StepTimer(0.0)
        self.train_seconds_at_start = 0.0  # training time before this process's train() (a resumed run's)
        self.best = BestTracker(cfg.trainer.best_metric)
        self.stopped_early: str | None = None
        self.loss: LossTracker | None = None
        self.final_step = 0
        self._last_val: tuple[int, BinaryMetrics] | None = None  # (step, metrics) of the last whole-split val eval
        self._last_saved_step: int | None = None
        c = cfg.checkpoint
        self.checkpointer = ckpt.Checkpointer(
            c.dir or self.run_dir / "checkpoints",
            self.env.rank,
            self.env.world_size,
            c.every_steps,
            c.every_minutes,
            c.keep_last,
            c.async_save,
        )
        resume = ckpt.resolve_resume(cfg.trainer.resume, self.checkpointer.root)
        self._init_path: Path | None = None  # trainer.init_from's checkpoint, once the run started from it
        if resume is not None:
            self.restore(resume, load_optimizer=c.load_optimizer)
            if cfg.trainer.init_from:
                logger.info("trainer.init_from=%s not used: the run resumes its own checkpoint", cfg.trainer.init_from)
        elif cfg.trainer.init_from:
            self.warm_start(resolve_init(cfg.trainer.init_from))

    def _write_resolved_config(self) -> None:
        """config.yaml with the values chosen from the data filled in (what this run really used), credentials
        masked; MLflow's params."""
        from omegaconf import OmegaConf

        self.writer.config(OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True))

    def _num_table_groups(self) -> int:
        """How many of the combined optimizer's param groups are the fused table optimizer's (they come first)."""
        return len(self.optimizer.optimizers[0][1].param_groups)

    # -- checkpoints --------------------------------------------------------------------------
    def _dense_optimizer(self):
        return self.optimizer.optimizers[-1][1]

    def app_state(self) -> dict:
        """What a checkpoint holds: the model and its optimizers as DCP ``Stateful`` objects."""
        dense = self._dense_optimizer()
        if any(p not in dense.state for p in dense.params.values()):
            dense.init_state()  # Adam-style state appears at the first step; loading needs it to exist
        return ckpt.app_state(self.model, self.optimizer)

    def save_checkpoint(self, best: bool = False) -> storage.Location:
        self._check_loss_finite()  # never save a diverged state over a good one
        train_state = ckpt.TrainState(
            step=self.step,
            epoch=self.step // self.steps_per_epoch,
            step_in_epoch=self.step % self.steps_per_epoch,
            train_seconds=self.timer.train_seconds,
            samples=self.step * self.cfg.data.global_batch_size,
        )
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        from omegaconf import OmegaConf

        path = self.checkpointer.save(
            self.app_state(),
            train_state,
            {
                "scheduler": sched,
                "global_batch_size": self.cfg.data.global_batch_size,
                "early_stop": self.best.to_dict(),
                "data": data_identity(self.manifest, self.table_rows),  # what trainer.init_from checks rows against
                "config": redact_config(OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True)),
            },
            best=best,
        )
        event = {"event": "checkpoint", "step": self.step, "path": str(path), "best": best}
        self.writer.event({**event, "in_background": True} if self.checkpointer.async_save else event)
        self._last_saved_step = self.step
        return path

    def restore(self, path: storage.Location, load_optimizer: bool = True) -> None:
        """Load a checkpoint (from any world size or sharding plan) and continue where it stopped."""
        t0 = time.perf_counter()
        meta = self._load_weights(path, load_optimizer)
        if load_optimizer:
            ts = ckpt.TrainState(**meta["train_state"])
            if meta.get("global_batch_size") != self.cfg.data.global_batch_size:
                logger.warning(
                    "checkpoint was trained at global batch %s, this run uses %d: the data position "
                    "is mapped by samples seen",
                    meta.get("global_batch_size"),
                    self.cfg.data.global_batch_size,
                )
                ts.step = ts.samples // self.cfg.data.global_batch_size
            self.step = ts.step
            self.timer.train_seconds = ts.train_seconds
            self.best = BestTracker.from_dict(meta.get("early_stop"), self.cfg.trainer.best_metric)
            # The step count only: the per-group lists follow this rank's param groups, whose number can differ
            # between ranks and plans (FBGEMM groups a rank's tables by pooling and weighting).
            scalars = {k: v for k, v in meta["scheduler"].items() if not isinstance(v, list)}
            self.scheduler.load_state_dict(
                {**self.scheduler.state_dict(), **scalars, "lr_lambdas": [None] * len(self.optimizer.param_groups)}
            )
            s = self.scheduler
            lrs = [base * fn(s.last_epoch) for base, fn in zip(s.base_lrs, s.lr_lambdas, strict=True)]
            s._last_lr = lrs  # noqa: SLF001 - what LambdaLR.step would have set
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
        logger.info(
            "resumed from %s (saved by %d rank(s)) at step %d in %.2fs",
            path,
            meta["world_size"],
            self.step,
            time.perf_counter() - t0,
        )
        self.writer.event(
            {
                "event": "resume",
                "step": self.step,
                "samples": self.step * self.cfg.data.global_batch_size,
                "path": str(path),
                "saved_world_size": meta["world_size"],
            }
        )

    def warm_start(self, path: Path) -> None:
        """Start this run (step 0, this data) from checkpoint ``path``'s weights (``trainer.init_from``): tables
        that grew keep their new rows' initial values; the optimizer state too with ``trainer.init_optimizer``."""
        t0 = time.perf_counter()
        meta = ckpt.read_meta(path)
        check_rows_line_up(path, meta, self.manifest, self.cfg.data.processed_dir, self.table_rows)
        load_grown(path, self.app_state(), self.cfg.trainer.init_optimizer)
        self._init_path = path
        saved = (meta.get("data") or {}).get("table_rows") or self.table_rows
        new_rows = sum(self.table_rows) - sum(saved)
        logger.info(
            "started from %s (step %d of its run%s) in %.2fs; %s new table rows start as initialised",
            path,
            meta["train_state"]["step"],
            ", with its optimizer state" if self.cfg.trainer.init_optimizer else "",
            time.perf_counter() - t0,
            f"{new_rows:,}",
        )
        self.writer.event(
            {
                "event": "init_from",
                "step": 0,
                "path": str(path),
                "its_step": meta["train_state"]["step"],
                "optimizer": self.cfg.trainer.init_optimizer,
                "new_table_rows": new_rows,
            }
        )

    def _load_weights(self, path: storage.Location, load_optimizer: bool, restore_rng: bool = True) -> dict:
        return ckpt.load(path, self.app_state(), self.env.rank, load_optimizer, restore_rng)

    def _check_loss_finite(self) -> None:
        if not self.cfg.trainer.stop_on_nonfinite_loss or self.loss is None:
            return
        bad = self.loss.first_bad()
        if bad is not None:
            root = self.checkpointer.root
            latest = ckpt.latest_checkpoint(root) if storage.exists(storage.join(root, ckpt.LATEST)) else None
            raise NonFiniteLossError(
                f"training loss (BCE) is {bad[1]} at step {bad[0]}: stopped. Last good checkpoint: {latest or 'none'} "
                "(not overwritten). Try a lower optimizer.lr / optimizer.embedding_lr or a longer warm-up "
                "(optimizer.warmup_fraction), then resume with trainer.resume=auto."
            )

    # -- evaluation ---------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        """bf16 autocast of the matmuls when trainer.precision=bf16 (the loss and metrics stay fp32)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.trainer.precision == Precision.bf16
        )

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None = None, save_predictions: bool = False) -> BinaryMetrics:
        """Exact metrics of the current model on ``split`` over all ranks (same result on each).

        The metrics are computed distributed: no rank gathers all predictions. ``save_predictions``: rank 0
        writes ``predictions_<split>.npy`` into the run folder, one probability per row of the split in row
        order (whatever the world size); for that it gathers every rank's probabilities and row indices
        (12 bytes a row on rank 0).
        """
        self.model.eval()
        accumulator = PredictionAccumulator()
        batches = eval_batches(
            self.eval_splits[split],
            self.cfg.data.eval_global_batch_size,
            self.env.rank,
            self.env.world_size,
            max_batches,
        )
        # Logits from the unwrapped model: DMP's DDP wrapper and DLRMTrain's loss serve training only (no
        # gradients to sync, a loss nobody reads); the sharded tables inside look up and exchange as in training.
        net = self.model.module.model
        gather = self._local_gather(net)
        for eb in batches:
            batch = eb.batch.to(self.device)
            ids = one_hot_ids(batch.sparse_features, net.sparse_arch.sparse_feature_names) if gather else None
            with self._autocast():
                if ids is not None:
                    logits = net.forward_gathered(batch.dense_features, ids, gather)
                else:
                    logits = net(batch.dense_features, batch.sparse_features)
            accumulator.update(logits.float(), batch.labels, eb.weights, eb.rows if save_predictions else None)
            self.heartbeat.beat()
        self.model.train()
        metrics = accumulator.compute()
        if save_predictions and self.env.is_rank_zero:
            np.save(self.run_dir / f"predictions_{split}.npy", accumulator.predictions.numpy())
        return metrics

    def _local_gather(self, net: torch.nn.Module) -> RowGather | None:
        """Evaluation's lookup as row gathers from the tables in place (:mod:`pipeline.model.one_hot`), on one
        CPU rank that holds every table whole; None where the sharded collection looks up (several ranks,
        CUDA, tables split by rows or columns, models without the DLRM's sparse part)."""
        if self.env.world_size != 1 or self.device.type != "cpu" or not hasattr(net, "sparse_arch"):
            return None
        tables = whole_local_tables(net.sparse_arch.embedding_bag_collection, net.sparse_arch.sparse_feature_names)
        return RowGather(tables) if tables is not None else None

    def _timed_eval(
        self, split: str, max_batches: int | None, save_predictions: bool = False, model_step: int | None = None
    ) -> BinaryMetrics:
        """Evaluate and log the event; ``model_step``: the step of the weights evaluated, when not the current."""
        t0 = time.perf_counter()
        metrics = self.evaluate(split, max_batches, save_predictions)
        seconds = time.perf_counter() - t0
        partial = max_batches is not None
        record = {
            "event": "eval",
            "step": self.step,
            "samples": self.step * self.cfg.data.global_batch_size,
            "partial": partial,
            **eval_metrics(split, metrics),
            eval_key(split, "seconds"): round(seconds, 3),
        }
        if model_step is not None:
            record["model_step"] = model_step
        self.writer.event(record)
        logger.info(
            "eval %s step %d%s: auc %.4f logloss %.4f ne %.4f acc %.4f calibration %.3f (%s rows%s)",
            split,
            self.step,
            f" (best checkpoint, step {model_step})" if model_step is not None else "",
            metrics.auc,
            metrics.logloss,
            metrics.normalized_entropy,
            metrics.accuracy,
            metrics.calibration,
            f"{metrics.num_samples:,}",
            ", partial" if partial else "",
        )
        return metrics

    def _eval_cadence(self) -> tuple[int, bool]:
        """(every how many steps val is evaluated, whether counted from each epoch's start).

        ``trainer.eval_every_steps`` counts steps of the run. ``trainer.eval_every_fraction`` spreads about
        1/fraction evaluations over the run, the same number in every epoch, so each epoch's end is one of them.
        """
        t = self.cfg.trainer
        if t.eval_every_steps is not None:
            return t.eval_every_steps, False
        if t.eval_every_fraction <= 0:
            return 0, False
        epochs = max(1, -(-self.total_steps // self.steps_per_epoch))
        per_epoch = max(1, round(1 / t.eval_every_fraction / epochs))
        span = min(self.total_steps, self.steps_per_epoch)
        return max(1, -(-span // per_epoch)), True

    def _eval_due(self) -> bool:
        """A mid-training evaluation after this step (the run's last step has its own): at the cadence and at the
        end of every epoch of a multi-epoch run."""
        if self.step >= self.total_steps:
            return False
        epoch_end = self.step % self.steps_per_epoch == 0
        if self.eval_every:
            position = self.step % self.steps_per_epoch if self.eval_in_epoch else self.step
            if position % self.eval_every == 0:
                return True
        return epoch_end and self.total_steps > self.steps_per_epoch

    def _validate_and_keep_best(self) -> str | None:
        """Evaluate on val, save the best checkpoint when it improved; return the reason to stop early, if any."""
        t = self.cfg.trainer
        metrics = self._timed_eval("val", t.eval_max_batches)
        self._last_val = (self.step, metrics) if t.eval_max_batches is None else None
        improved = self.best.update(metrics, self.step, t.early_stop_min_delta)
        if improved and t.restore_best:
            self.save_checkpoint(best=True)
        if t.early_stop_auc is not None and metrics.auc >= t.early_stop_auc:
            return f"val AUC {metrics.auc:.4f} reached trainer.early_stop_auc={t.early_stop_auc}"
        if t.early_stop_patience and self.best.evals_without_gain >= t.early_stop_patience:
            return (
                f"no gain over the best {self.best.describe()} in {self.best.evals_without_gain} evaluations "
                f"(trainer.early_stop_patience={t.early_stop_patience})"
            )
        return None

    # -- training -----------------------------------------------------------------------------
    def _profiler(self) -> torch.profiler.profile | None:
        """torch.profiler over ``trainer.profile_steps`` steps; each rank writes ``profile/rank<N>.txt``
        (ops by self time) and ``profile/rank<N>.trace.json`` (open in Perfetto or chrome://tracing)."""
        t = self.cfg.trainer
        if t.profile_steps <= 0:
            return None
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        rank, steps, gbs = self.env.rank, t.profile_steps, self.cfg.data.global_batch_size

        def write(prof: torch.profiler.profile) -> None:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
            (out / f"rank{rank}.txt").write_text(
                f"{steps} training steps at global batch {gbs} from step {self.step - steps + 1}, rank {rank} of "
                f"{self.env.world_size}, {self.num_threads} threads, {self.device}\n{table}\n"
            )
            prof.export_chrome_trace(str(out / f"rank{rank}.trace.json"))
            logger.info("profile of %d steps written to %s", steps, out / f"rank{rank}.txt")

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=t.profile_wait_steps, warmup=1, active=steps, repeat=1)
        return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)

    def _start_epoch(self) -> None:
        """From the second epoch on, fresh tables (trainer.reset_tables_each_epoch): see the config."""
        if self.cfg.trainer.reset_tables_each_epoch and self.step > 0 and self.step % self.steps_per_epoch == 0:
            reset_tables(self.model)
            if self._init_path is not None:  # a warm start's fresh tables are the ones it started from
                load_grown(self._init_path, self.app_state(), load_optimizer=False, tables_only=True)
            logger.info(
                "epoch %d starts from %s tables (trainer.reset_tables_each_epoch)",
                self.step // self.steps_per_epoch,
                "the trainer.init_from" if self._init_path is not None else "re-initialised",
            )

    def _log_train(self, bar: tqdm, wall0: float) -> None:
        steps, seconds = self.timer.close_window()
        self._check_loss_finite()
        gbs = self.cfg.data.global_batch_size
        mean_loss = self._mean_over_ranks(self.loss.loss_sum / steps)
        self.loss.loss_sum.zero_()
        self.writer.event(
            {
                "event": "train",
                "step": self.step,
                "epoch": (self.step - 1) // self.steps_per_epoch,
                "samples": self.step * gbs,
                "train/loss": mean_loss,
                "train/samples_per_s": steps * gbs / seconds,
                "train/lr": self.optimizer.param_groups[-1]["lr"],
                "time_s": round(time.perf_counter() - wall0, 3),
                **self._memory_over_ranks(),
            }
        )
        bar.set_postfix(loss=f"{mean_loss:.4f}")

    def _train_batches(self) -> Iterator:
        """This rank's training batches from the current step on (the resumed position included)."""
        cfg, env = self.cfg, self.env
        return train_batches(
            self.train_split,
            cfg.data.global_batch_size,
            env.rank,
            env.world_size,
            cfg.trainer.seed,
            cfg.data.shuffle,
            start_epoch=self.step // self.steps_per_epoch,
            start_step=self.step % self.steps_per_epoch,
        )

    def _announce(self) -> None:
        logger.info(
            "training %d steps (%d per epoch) at global batch %d (%d per rank), %s rows; %s; %s",
            self.total_steps,
            self.steps_per_epoch,
            self.cfg.data.global_batch_size,
            self.local_batch_size,
            f"{len(self.train_split):,}",
            self.schedule.describe(),
            f"val evaluated every {self.eval_every} steps" if self.eval_every else "val evaluated at the end",
        )

    def _progress_bar(self) -> tqdm:
        gbs = self.cfg.data.global_batch_size
        return tqdm(
            total=self.total_steps * gbs,
            initial=self.step * gbs,
            unit="sample",
            unit_scale=True,
            mininterval=2.0,
            disable=not (self.env.is_rank_zero and self.cfg.logger.progress_bar),
            desc="train",
        )

    # -- preemption ------------------------------------------------------------------------------
    @contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGUSR1 only note the request; the loop acts on it after the step."""

        def note(signum, frame) -> None:
            self._stop_signal = signum

        previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self._stop_vote is not None:
                self._stop_vote[0].wait()
                self._stop_vote = None

    def _stop_requested(self) -> int:
        """The stop signal any rank had received (0: none), the same on every rank, so all stop after the same
        step. Ranks vote every ``STOP_VOTE_EVERY`` steps and read the vote a step later, when it has finished:
        no rank waits, and a stop lands within ``STOP_VOTE_EVERY + 1`` steps of the signal."""
        if self._control is None:
            return self._stop_signal
        decided = 0
        if self._stop_vote is not None and self.step % STOP_VOTE_EVERY == 1:
            work, flag = self._stop_vote
            work.wait()
            decided, self._stop_vote = int(flag.item()), None
        if self.step % STOP_VOTE_EVERY == 0:
            flag = torch.tensor([self._stop_signal], dtype=torch.int64)
            self._stop_vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control, async_op=True), flag)
        return decided

    def _stop_for_preemption(self, signum: int) -> None:
        """Save the step reached (unless just saved) and stop with :class:`Preempted`."""
        name, t0 = signal.Signals(signum).name, time.perf_counter()
        self.checkpointer.drain()  # the save in flight first; this one is synchronous
        path = (
            self.save_checkpoint()
            if self._last_saved_step != self.step
            else ckpt.latest_checkpoint(self.checkpointer.root)
        )
        seconds = time.perf_counter() - t0
        grace = self.cfg.trainer.preempt_grace_s
        self.writer.event(
            {
                "event": "preempted",
                "step": self.step,
                "signal": name,
                "checkpoint": str(path),
                "seconds": round(seconds, 3),
            }
        )
        if seconds > grace:
            logger.warning("the preemption checkpoint took %.1fs, more than trainer.preempt_grace_s=%s", seconds, grace)
        raise Preempted(f"{name}: stopped after step {self.step}, checkpoint {path} saved in {seconds:.1f}s")

    def train(self) -> dict:
        """Train for the configured steps, keep the best checkpoint, evaluate, write summary.json; return it.

        Raises:
            Preempted: SIGTERM or SIGUSR1 arrived; the step reached is checkpointed.
        """
        with self._stop_signals():
            return self._train()

    def _train(self) -> dict:
        gbs = self.cfg.data.global_batch_size
        log_every = max(1, self.cfg.logger.log_every_steps)
        batches = self._train_batches()
        pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.device, execute_all_batches=True)
        self._announce()
        bar = self._progress_bar()
        wall0 = time.perf_counter()
        self.timer = StepTimer(self.timer.train_seconds)
        self.train_seconds_at_start = self.timer.train_seconds
        self.loss = LossTracker(self.device, self.step)
        profiler = self._profiler()
        if profiler is not None:
            profiler.start()
        while self.step < self.total_steps:
            self._start_epoch()
            with self._autocast():  # forward (and the backward it records) of the dense part in bf16
                loss, _, _ = pipeline.progress(batches)
            self.scheduler.step()
            with self.timer.bookkeeping():
                self.step += 1
                self.timer.window_steps += 1
                self.loss.update(loss)
                if profiler is not None:
                    profiler.step()
                bar.update(gbs)
                self.heartbeat.beat()
                if self.step % log_every == 0 or self.step == self.total_steps:
                    self._log_train(bar, wall0)
                stop = self._stop_requested()
            if stop:
                bar.close()
                pipeline.detach()
                self._stop_for_preemption(stop)
            if self._eval_due():
                with self.timer.paused():
                    pipeline.detach()  # a direct forward must not consume the pipeline's prefetched batch
                    self.stopped_early = self._validate_and_keep_best()
                if self.stopped_early:
                    logger.info("early stop at step %d: %s", self.step, self.stopped_early)
                    self.writer.event({"event": "early_stop", "step": self.step, "reason": self.stopped_early})
                    self.timer.close_window()
                    break
            if self.step < self.total_steps and self.checkpointer.due(self.step) and self._last_saved_step != self.step:
                with self.timer.paused():  # saving is not training time
                    self.save_checkpoint()
        bar.close()
        if profiler is not None:
            profiler.stop()  # writes the profile if the run ended inside the profiled steps
        pipeline.detach()
        self.checkpointer.drain()  # the save in flight finishes; the final ones are synchronous
        self._check_loss_finite()
        final = self._final_evaluation()
        return self._finish(final, time.perf_counter() - wall0)

    def _final_evaluation(self) -> dict[str, BinaryMetrics]:
        """Evaluate the last state on val, save it (as the best if it is); with trainer.restore_best, load the best
        checkpoint when it is an earlier one; then every split's final metrics come from that model."""
        t, c = self.cfg.trainer, self.cfg.checkpoint
        if self._last_val is not None and self._last_val[0] == self.step:
            last_val, improved = self._last_val[1], self.best.step == self.step  # an early stop's whole-split eval
        else:
            last_val = self._timed_eval("val", None)
            improved = self.best.update(last_val, self.step)
        if self.step > 0 and self._last_saved_step != self.step and (c.save_at_end or (improved and t.restore_best)):
            self.save_checkpoint(best=improved and t.restore_best)
        final = {"val": last_val}
        self.final_step = self.step
        if t.restore_best and self.best.step is not None and self.best.step != self.step:
            best = ckpt.best_checkpoint(self.checkpointer.root)
            if best is None:
                raise TrainingError(f"trainer.restore_best: no best checkpoint under {self.checkpointer.root}")
            self._load_weights(best, load_optimizer=False, restore_rng=False)
            self.final_step = self.best.step
            logger.info("restored the best checkpoint %s (%s) for the final metrics", best, self.best.describe())
            final["val"] = self._timed_eval("val", None, t.save_predictions, model_step=self.best.step)
        elif t.save_predictions:
            final["val"] = self._timed_eval("val", None, True)
        for split in self.eval_splits:
            if split != "val":
                model_step = self.final_step if self.final_step != self.step else None
                final[split] = self._timed_eval(split, None, t.save_predictions, model_step=model_step)
        return final

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.env.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.env.world_size
        return value.item()

    def _memory_over_ranks(self) -> dict[str, float]:
        """Process RSS / peak RSS (and CUDA max allocated) in MiB, the largest over ranks."""
        mem = process_memory_mib(self.device)
        if self.env.world_size > 1:
            values = torch.tensor(list(mem.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            mem = dict(zip(mem, values.tolist(), strict=True))
        return {k: round(v, 1) for k, v in mem.items()}

    def _finish(self, final: dict[str, BinaryMetrics], wall_s: float) -> dict:
        optimum = self.manifest.optimum
        samples = self.step * self.cfg.data.global_batch_size
        train_seconds = self.timer.train_seconds
        this_run = train_seconds - self.train_seconds_at_start
        summary = {
            "run_dir": str(self.run_dir),
            "world_size": self.env.world_size,
            "backend": self.backend,
            "device": str(self.device),
            "data": self.cfg.data.name,
            "model": self.cfg.model.name,
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "samples": samples,
            "global_batch_size": self.cfg.data.global_batch_size,
            "schedule": self.schedule.describe(),
            "chosen_from_data": self.adapted,
            "train_samples_per_s": samples / train_seconds if train_seconds else None,
            "train_seconds": round(train_seconds, 3),
            # Rank 0's time in the per-step loss tracking, metric/log events and progress bar, as a
            # fraction of training time (on CUDA a log event's sync also waits for queued kernels).
            "bookkeeping_fraction": round(self.timer.bookkeeping_seconds / this_run, 5) if this_run > 0 else None,
            "wall_seconds": round(wall_s, 3),
            "final": {k: v for s, m in final.items() for k, v in eval_metrics(s, m).items()},
            "final_model_step": self.final_step,
            "best": self.best.to_dict(),
            "data_rows": {s: v.num_rows for s, v in self.manifest.splits.items()},
            "optimum": optimum,
            "stopped_early": self.stopped_early,
        }
        if optimum:
            summary["gap_to_optimum"] = {
                k: v
                for s, m in final.items()
                if s in optimum
                for k, v in eval_metrics(
                    s, {"auc": optimum[s]["auc"] - m.auc, "logloss": m.logloss - optimum[s]["logloss"]}
                ).items()
            }
        self.writer.summary(summary)
        if self.env.is_rank_zero:
            restored = f" (the best checkpoint, step {self.final_step})" if self.final_step != self.step else ""
            logger.info(
                "final metrics%s%s:\n%s",
                restored,
                " beside the data's optimum" if optimum else "",
                format_final(final, optimum),
            )
            logger.info(
                "throughput %.0f samples/s over %d steps; wall %.1fs; summary in %s",
                summary["train_samples_per_s"] or 0,
                self.step,
                wall_s,
                self.run_dir / "summary.json",
            )
        return summary

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def format_final(final: dict[str, BinaryMetrics], optimum: dict | None) -> str:
    """A small table: split, our AUC/logloss/NE, and the Bayes-optimal values when known."""
    head = f"{'split':<6} {'auc':>8} {'logloss':>8} {'ne':>8} {'calib':>7}"
    if optimum:
        head += f" | {'opt auc':>8} {'opt logloss':>11} {'auc gap':>8}"
    rows = [head]
    for split, m in final.items():
        row = f"{split:<6} {m.auc:>8.4f} {m.logloss:>8.4f} {m.normalized_entropy:>8.4f} {m.calibration:>7.3f}"
        if optimum and split in optimum:
            o = optimum[split]
            row += f" | {o['auc']:>8.4f} {o['logloss']:>11.4f} {o['auc'] - m.auc:>8.4f}"
        rows.append(row)
    return "\n".join(rows)
