"""Train a sharded DLRM: ``./launch.sh train [overrides]`` (``dlrm-pipeline train``), or under torchrun / TorchX
directly: ``torchrun ... pipeline/train.py [overrides]``.

Every rank runs this entry point: Hydra composes the config (``pipeline/conf/train.yaml``; building it
checks every group's rules), rank 0 checks the environment, the trainer trains, and rank 0 writes the
run report. All ranks write into one run folder, ``outputs/<run id>/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun/TorchX pipeline/train.py): make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.config import LoggerBackend, TrainConfig, register_configs
from pipeline.errors import CheckpointError, ConfigError, Preempted, UserError
from pipeline.redact import redact_files
from pipeline.resolvers import register_resolvers

# configs/ (the user's config folder, on the search path) is optional: no warning where it does not exist.
warnings.filterwarnings("ignore", message=r".*path=configs is not available.*", category=UserWarning)
logger = logging.getLogger("pipeline.train")
# TorchRec 1.8 passes DDP's deprecated broadcast_buffers on every run; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)

register_resolvers()
register_configs()

INTERRUPTED = 130


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _discard_if_new(run_dir: Path) -> None:
    """Remove the folder Hydra made for a start that never trained (no metrics, no checkpoints)."""
    if _rank() == 0 and not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def _report(cfg: TrainConfig, run_dir: Path) -> None:
    """report.png + report.md of the finished run (rank 0); a failure only warns."""
    if _rank() != 0 or not cfg.logger.report:
        return
    try:
        from pipeline.tools.report import write_report

        png, md = write_report([run_dir], run_dir)
        logger.info("run report: %s, %s", png, md)
    except Exception as e:  # noqa: BLE001 - never fail a finished training run over its plot
        logger.warning("run report not written: %s: %s", type(e).__name__, e)


def _end_tracking(cfg: TrainConfig, run_dir: Path, status: str) -> None:
    """Upload the report and end the run's MLflow run with ``status`` (rank 0, logger.backends with mlflow)."""
    if _rank() == 0 and LoggerBackend.mlflow in cfg.logger.backends:
        from pipeline.metrics.tracking import end_run

        end_run(cfg.logger, run_dir, status)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(dict_cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if _rank() == 0:  # Hydra wrote .hydra/ (the overrides, the composed config) before this runs
        redact_files(sorted((run_dir / ".hydra").glob("*.yaml")))
    try:
        cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
    except ConfigError as e:
        if _rank() == 0:
            logger.error("invalid config: %s", e)
        _discard_if_new(run_dir)
        raise SystemExit(e.exit_code) from None
    logging.getLogger("pipeline").setLevel(cfg.logger.level)
    from pipeline.trainer import Trainer  # heavy imports (torchrec) after the config is known good

    trainer = None
    status = "FAILED"  # of the MLflow run, when tracked
    try:
        if cfg.trainer.run_doctor and _rank() == 0:
            from pipeline.tools.doctor import check_environment

            check_environment()
        trainer = Trainer(cfg, run_dir)
        trainer.train()
        status = "FINISHED"
    except UserError as e:  # a message that names the problem and the fix: once, no traceback
        prefix = {ConfigError: "invalid config: ", CheckpointError: "cannot resume: "}.get(type(e), "")
        if str(e).startswith("checkpoint save failed"):  # a CheckpointError of saving, not of resuming
            prefix = ""
        (logger.error if _rank() == 0 else logger.info)("%s%s", prefix, e)
        if isinstance(e, ConfigError):
            _discard_if_new(run_dir)
        raise SystemExit(e.exit_code) from None
    except Preempted as e:
        status = "KILLED"
        if _rank() == 0:
            logger.warning("preempted by %s; the same command with PIPELINE_RUN_ID=%s resumes from it", e, run_dir.name)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        status = "KILLED"
        if _rank() == 0:
            step = trainer.step if trainer is not None else 0
            logger.warning(
                "interrupted at step %d (Ctrl-C); the same command with PIPELINE_RUN_ID=%s resumes from "
                "the latest checkpoint",
                step,
                run_dir.name,
            )
        raise SystemExit(INTERRUPTED) from None
    finally:
        if trainer is not None:
            trainer.close()
        if status != "FINISHED":
            _end_tracking(cfg, run_dir, status)
    _report(cfg, run_dir)
    _end_tracking(cfg, run_dir, status)  # after the report: it is one of the run's artifacts


if __name__ == "__main__":
    main()
