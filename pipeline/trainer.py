"""The training loop: TrainPipelineSparseDist over a sharded DLRM, periodic and final evaluation."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from pipeline import checkpoint as ckpt
from pipeline.config import Precision, TrainConfig, validate
from pipeline.data.loader import BinarySplit, eval_batches, num_train_batches, train_batches
from pipeline.data.prepare import prepare_data_distributed
from pipeline.data.preprocess import manifest_schema
from pipeline.distributed.sharding import (
    init_process_group,
    lr_scheduler,
    select_device,
    set_num_threads,
    shard_model,
)
from pipeline.metrics.evaluator import PredictionGatherer
from pipeline.metrics.functional import BinaryMetrics
from pipeline.metrics.loggers import make_backends, process_memory_mib
from pipeline.model.dlrm import build_model
from pipeline.runtime import DistEnv, keep_freed_memory

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the step."""


class RunWriter:
    """Rank 0's files in the run folder: metrics.jsonl (one event per line), summary.json, the other
    ``logger.backends`` (TensorBoard event files) and the run report (report.png, report.md)."""

    def __init__(self, run_dir: Path, enabled: bool, logger_cfg=None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.write_report = enabled and bool(getattr(logger_cfg, "report", False))
        self._metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self._backends = make_backends(logger_cfg.backends, run_dir, logger_cfg.tensorboard_step) \
            if enabled and logger_cfg is not None else []

    def event(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        for backend in self._backends:
            backend.log(record)

    def report(self) -> None:
        """report.png + report.md from metrics.jsonl and summary.json; a failure only warns."""
        if not self.write_report:
            return
        try:
            from pipeline.report import write_report

            png, md = write_report([self.run_dir], self.run_dir)
            logger.info("run report: %s, %s", png, md)
        except Exception as e:  # never fail a finished training run over its plot
            logger.warning("run report not written: %s: %s", type(e).__name__, e)

    def summary(self, record: dict) -> None:
        if self.enabled:
            (self.run_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for backend in self._backends:
            backend.close()
        self._backends = []


class Trainer:
    """Owns the process group, the sharded model, its optimizers and the data of one job."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.env = DistEnv.from_environ()
        if cfg.trainer.run_doctor:
            from pipeline.doctor import check_environment

            check_environment()
        self.malloc_tuned = cfg.trainer.keep_freed_memory and keep_freed_memory()  # before the big allocations
        self.device = select_device(cfg.trainer, self.env)
        validate(cfg, self.env.world_size, self.device.type)
        self.backend = init_process_group(cfg.launcher, self.env, self.device)
        self.num_threads = set_num_threads(cfg.trainer.num_threads, self.env)
        self.writer = RunWriter(self.run_dir, self.env.is_rank_zero, cfg.logger)
        logger.info(
            "rank %d/%d (pid %d) on %s, backend %s, %d threads%s, run folder %s",
            self.env.rank, self.env.world_size, os.getpid(), self.device, self.backend, self.num_threads,
            ", freed memory kept for reuse" if self.malloc_tuned else "", self.run_dir,
        )

        self.manifest = prepare_data_distributed(cfg.data, self.env.is_rank_zero)
        self.train_split = BinarySplit(cfg.data.processed_dir, "train", self.manifest)
        self.eval_splits = {s: BinarySplit(cfg.data.processed_dir, s, self.manifest) for s in ("val", "test")}

        torch.manual_seed(cfg.trainer.seed)  # identical MLP init on every rank (DDP also broadcasts)
        schema = manifest_schema(self.manifest)  # the columns the data was preprocessed with
        model = build_model(cfg.model, self.manifest["num_embeddings_per_feature"],
                            feature_names=list(schema.feature_names), num_dense_features=schema.num_dense)
        self.local_batch_size = cfg.data.global_batch_size // self.env.world_size
        self.model, self.optimizer = shard_model(
            model, cfg.sharding, cfg.optimizer, self.env, self.device, self.local_batch_size
        )
        self.steps_per_epoch = num_train_batches(len(self.train_split), cfg.data.global_batch_size)
        self.total_steps = cfg.trainer.max_steps or self.steps_per_epoch * cfg.trainer.num_epochs
        self.scheduler = lr_scheduler(self.optimizer, cfg.optimizer, self.total_steps)
        self.step = 0
        self.train_seconds = 0.0
        self.train_seconds_at_start = 0.0  # training time before this process's train() (a resumed run's)
        self.bookkeeping_seconds = 0.0  # this process's time in the loop's loss/metric/log/progress code
        self.best_auc, self.evals_without_gain = float("-inf"), 0  # early stopping on patience
        self._bad_step: torch.Tensor | None = None
        self._bad_value: torch.Tensor | None = None
        c = cfg.checkpoint
        self.checkpointer = ckpt.Checkpointer(c.dir or self.run_dir / "checkpoints", self.env.rank,
                                              self.env.world_size, c.every_steps, c.every_minutes, c.keep_last)
        resume = ckpt.resolve_resume(cfg.trainer.resume, self.checkpointer.root)
        if resume is not None:
            self.restore(resume, load_optimizer=c.load_optimizer)

    # -- checkpoints --------------------------------------------------------------------------
    def _dense_optimizer(self):
        return self.optimizer.optimizers[-1][1]

    def tensor_state(self) -> dict:
        """The live tensors a checkpoint holds (loading fills them in place)."""
        dense = self._dense_optimizer()
        if any(p not in dense.state for p in dense.params.values()):
            dense.init_state()  # Adam-style state appears at the first step; loading needs it to exist
        return ckpt.tensor_state(self.model, self.optimizer)

    def save_checkpoint(self) -> None:
        self._check_loss_finite()  # never save a diverged state over a good one
        train_state = ckpt.TrainState(step=self.step, epoch=self.step // self.steps_per_epoch,
                                      step_in_epoch=self.step % self.steps_per_epoch,
                                      train_seconds=self.train_seconds, samples=self.step * self.cfg.data.global_batch_size)
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        from omegaconf import OmegaConf

        path = self.checkpointer.save(self.tensor_state(), train_state, {
            "scheduler": sched, "global_batch_size": self.cfg.data.global_batch_size,
            "early_stop": {"best_auc": self.best_auc if self.best_auc > float("-inf") else None,
                           "evals_without_gain": self.evals_without_gain},
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True),
        })
        self.writer.event({"event": "checkpoint", "step": self.step, "path": str(path)})

    def restore(self, path: Path, load_optimizer: bool = True) -> None:
        """Load a checkpoint (from any world size or sharding plan) and continue where it stopped."""
        t0 = time.perf_counter()
        state = self.tensor_state()
        meta = ckpt.load(path, state, self.env.rank, load_optimizer=load_optimizer)
        self.model.load_state_dict(state["model"])
        if load_optimizer:
            self.optimizer.load_state_dict({"state": state["optim"]})
            ts = ckpt.TrainState(**meta["train_state"])
            if meta.get("global_batch_size") != self.cfg.data.global_batch_size:
                logger.warning("checkpoint was trained at global batch %s, this run uses %d: the data position "
                               "is mapped by samples seen", meta.get("global_batch_size"), self.cfg.data.global_batch_size)
                ts.step = ts.samples // self.cfg.data.global_batch_size
            self.step = ts.step
            self.train_seconds = ts.train_seconds
            es = meta.get("early_stop") or {}
            self.best_auc = es.get("best_auc") if es.get("best_auc") is not None else float("-inf")
            self.evals_without_gain = es.get("evals_without_gain", 0)
            self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        logger.info("resumed from %s (saved by %d rank(s)) at step %d in %.2fs", path, meta["world_size"], self.step,
                    time.perf_counter() - t0)
        self.writer.event({"event": "resume", "step": self.step, "samples": self.step * self.cfg.data.global_batch_size,
                           "path": str(path), "saved_world_size": meta["world_size"]})

    def _early_stop(self, metrics: BinaryMetrics) -> str | None:
        """The reason to stop after this mid-training evaluation, or None (same on every rank: metrics are)."""
        t = self.cfg.trainer
        if t.early_stop_auc is not None and metrics.auc >= t.early_stop_auc:
            return f"val AUC {metrics.auc:.4f} reached trainer.early_stop_auc={t.early_stop_auc}"
        if t.early_stop_patience:
            if metrics.auc > self.best_auc + t.early_stop_min_delta:
                self.best_auc, self.evals_without_gain = metrics.auc, 0
            else:
                self.evals_without_gain += 1
                if self.evals_without_gain >= t.early_stop_patience:
                    return (f"no val AUC gain over {self.best_auc:.4f} in {self.evals_without_gain} evaluations "
                            f"(trainer.early_stop_patience={t.early_stop_patience})")
        return None

    def _check_loss_finite(self) -> None:
        if not self.cfg.trainer.stop_on_nonfinite_loss or self._bad_step is None:
            return
        step = int(self._bad_step.item())
        if step >= 0:
            latest = ckpt.latest_checkpoint(self.checkpointer.root) if (self.checkpointer.root / ckpt.LATEST).exists() else None
            raise NonFiniteLossError(
                f"training loss (BCE) is {self._bad_value.item()} at step {step}: stopped. Last good checkpoint: "
                f"{latest or 'none'} (not overwritten). Try a lower optimizer.lr / optimizer.embedding_lr or more "
                "optimizer.warmup_steps, then resume with trainer.resume=auto."
            )

    # -- evaluation ---------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        """bf16 autocast of the matmuls when trainer.precision=bf16 (the loss and metrics stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.trainer.precision == Precision.bf16)

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None = None, save_predictions: bool = False) -> BinaryMetrics:
        """Exact metrics of the current model on ``split`` over all ranks (same result on each).

        ``save_predictions``: rank 0 writes ``predictions_<split>.npy`` into the run folder, one
        probability per row of the split in row order (whatever the world size).
        """
        self.model.eval()
        gatherer = PredictionGatherer()
        batches = eval_batches(self.eval_splits[split], self.cfg.data.eval_global_batch_size,
                               self.env.rank, self.env.world_size, max_batches)
        for eb in batches:
            with self._autocast():
                _, (_, logits, labels) = self.model(eb.batch.to(self.device))
            gatherer.update(logits.float(), labels, eb.weights, eb.rows if save_predictions else None)
        self.model.train()
        metrics = gatherer.compute()
        if save_predictions and self.env.is_rank_zero:
            np.save(self.run_dir / f"predictions_{split}.npy", gatherer.predictions.numpy())
        return metrics

    def _log_eval(self, split: str, metrics: BinaryMetrics, seconds: float, partial: bool) -> None:
        record = {"event": "eval", "split": split, "step": self.step,
                  "samples": self.step * self.cfg.data.global_batch_size, "partial": partial,
                  **{f"eval/{k}": v for k, v in asdict(metrics).items()}, "eval/seconds": round(seconds, 3)}
        self.writer.event(record)
        logger.info(
            "eval %s step %d: auc %.4f logloss %.4f ne %.4f acc %.4f calibration %.3f (%s rows%s)",
            split, self.step, metrics.auc, metrics.logloss, metrics.normalized_entropy, metrics.accuracy,
            metrics.calibration, f"{metrics.num_samples:,}", ", partial" if partial else "",
        )

    def _timed_eval(self, split: str, max_batches: int | None, save_predictions: bool = False) -> BinaryMetrics:
        t0 = time.perf_counter()
        metrics = self.evaluate(split, max_batches, save_predictions)
        self._log_eval(split, metrics, time.perf_counter() - t0, partial=max_batches is not None)
        return metrics

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
                f"{self.env.world_size}, {self.num_threads} threads, {self.device}\n{table}\n")
            prof.export_chrome_trace(str(out / f"rank{rank}.trace.json"))
            logger.info("profile of %d steps written to %s", steps, out / f"rank{rank}.txt")

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=t.profile_wait_steps, warmup=1, active=steps, repeat=1)
        return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)

    def train(self) -> dict:
        """Train for the configured steps, evaluate, write summary.json; return the summary."""
        cfg, env = self.cfg, self.env
        gbs = cfg.data.global_batch_size
        batches = train_batches(self.train_split, gbs, env.rank, env.world_size, cfg.trainer.seed, cfg.data.shuffle,
                                start_epoch=self.step // self.steps_per_epoch, start_step=self.step % self.steps_per_epoch)
        pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.device, execute_all_batches=True)
        log_every = max(1, cfg.logger.log_every_steps)
        eval_every = cfg.trainer.eval_every_steps
        logger.info(
            "training %d steps (%d per epoch) at global batch %d (%d per rank), %s rows",
            self.total_steps, self.steps_per_epoch, gbs, self.local_batch_size, f"{len(self.train_split):,}",
        )
        bar = tqdm(total=self.total_steps * gbs, initial=self.step * gbs, unit="sample", unit_scale=True,
                   mininterval=2.0, disable=not (env.is_rank_zero and cfg.logger.progress_bar), desc="train")
        wall0 = time.perf_counter()
        self.train_seconds_at_start = self.train_seconds
        loss_sum = torch.zeros((), device=self.device)
        # The first step whose loss is not finite, tracked on the device (no per-step host sync).
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._bad_value = torch.zeros((), device=self.device)
        step_t = torch.tensor(self.step, dtype=torch.int64, device=self.device)
        # A log window's training time excludes the evaluations inside it.
        window_steps, window_s, mark = 0, 0.0, time.perf_counter()
        self.stopped_early: str | None = None
        profiler = self._profiler()
        if profiler is not None:
            profiler.start()
        while self.step < self.total_steps:
            with self._autocast():  # forward (and the backward it records) of the dense part in bf16
                loss, _, _ = pipeline.progress(batches)
            self.scheduler.step()
            book = time.perf_counter()  # from here to the evaluation: bookkeeping, not training
            self.step += 1
            loss_sum += loss  # stays on device: no host sync per step
            step_t += 1
            first_bad = ~torch.isfinite(loss) & (self._bad_step < 0)
            self._bad_step = torch.where(first_bad, step_t, self._bad_step)
            self._bad_value = torch.where(first_bad, loss.detach(), self._bad_value)
            window_steps += 1
            if profiler is not None:
                profiler.step()
            bar.update(gbs)
            if self.step % log_every == 0 or self.step == self.total_steps:
                window_s += time.perf_counter() - mark
                self.train_seconds += window_s
                self._check_loss_finite()
                mean_loss = self._mean_over_ranks(loss_sum / window_steps)
                rate = window_steps * gbs / window_s
                self.writer.event({"event": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                                   "samples": self.step * gbs, "train/loss": mean_loss, "train/samples_per_s": rate,
                                   "lr": self.optimizer.param_groups[-1]["lr"],
                                   "time_s": round(time.perf_counter() - wall0, 3), **self._memory_over_ranks()})
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum.zero_()
                window_steps, window_s, mark = 0, 0.0, time.perf_counter()
            self.bookkeeping_seconds += time.perf_counter() - book
            if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                window_s += time.perf_counter() - mark
                pipeline.detach()  # a direct forward must not consume the pipeline's prefetched batch
                metrics = self._timed_eval("val", cfg.trainer.eval_max_batches)
                mark = time.perf_counter()
                self.stopped_early = self._early_stop(metrics)
                if self.stopped_early:
                    logger.info("early stop at step %d: %s", self.step, self.stopped_early)
                    self.writer.event({"event": "early_stop", "step": self.step, "reason": self.stopped_early})
                    window_s += time.perf_counter() - mark
                    self.train_seconds += window_s
                    window_s, window_steps = 0.0, 0
                    break
            if self.step < self.total_steps and self.checkpointer.due(self.step):
                window_s += time.perf_counter() - mark  # saving is not training time
                self.save_checkpoint()
                mark = time.perf_counter()
        bar.close()
        if profiler is not None:
            profiler.stop()  # writes the profile if the run ended inside the profiled steps
        pipeline.detach()
        self._check_loss_finite()
        if cfg.checkpoint.save_at_end and self.step > 0:
            self.save_checkpoint()
        final = {split: self._timed_eval(split, None, cfg.trainer.save_predictions) for split in ("val", "test")}
        return self._finish(final, time.perf_counter() - wall0)

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
        optimum = self.manifest.get("optimum")
        samples = self.step * self.cfg.data.global_batch_size
        this_run = self.train_seconds - self.train_seconds_at_start
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
            "train_samples_per_s": samples / self.train_seconds if self.train_seconds else None,
            "train_seconds": round(self.train_seconds, 3),
            # Rank 0's time in the per-step loss tracking, metric/log events and progress bar, as a
            # fraction of training time (on CUDA a log event's sync also waits for queued kernels).
            "bookkeeping_fraction": round(self.bookkeeping_seconds / this_run, 5) if this_run > 0 else None,
            "wall_seconds": round(wall_s, 3),
            "final": {s: asdict(m) for s, m in final.items()},
            "data_rows": {s: v.get("num_rows") for s, v in self.manifest.get("splits", {}).items()},
            "optimum": optimum,
            "stopped_early": getattr(self, "stopped_early", None),
        }
        if optimum:
            summary["gap_to_optimum"] = {
                s: {"auc": optimum[s]["auc"] - m.auc, "logloss": m.logloss - optimum[s]["logloss"]}
                for s, m in final.items() if s in optimum
            }
        self.writer.summary(summary)
        if self.env.is_rank_zero:
            logger.info("final metrics%s:\n%s", " beside the data's optimum" if optimum else "",
                        format_final(final, optimum))
            logger.info("throughput %.0f samples/s over %d steps; wall %.1fs; summary in %s",
                        summary["train_samples_per_s"] or 0, self.step, wall_s, self.run_dir / "summary.json")
        self.writer.report()
        return summary

    def close(self) -> None:
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
