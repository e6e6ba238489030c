"""Make a dataset ready to train on: generate (synthetic only) and preprocess, once, on rank 0."""

from __future__ import annotations

import logging

import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data import preprocess, synthetic

logger = logging.getLogger(__name__)


def prepare_data(cfg: DataConfig) -> dict:
    """Generate the synthetic raw files if configured and missing, preprocess if stale; return the manifest."""
    if cfg.synthetic is not None and not synthetic.is_complete(cfg.synthetic, cfg.raw_dir):
        logger.info("generating synthetic Criteo-format data into %s", cfg.raw_dir)
        synthetic.generate(cfg.synthetic, cfg.raw_dir)
    if preprocess.is_current(cfg):
        logger.info("reusing preprocessed data in %s", cfg.processed_dir)
        return preprocess.load_manifest(cfg.processed_dir)
    return preprocess.preprocess(cfg)


def prepare_data_distributed(cfg: DataConfig, is_rank_zero: bool) -> dict:
    """Rank 0 prepares the data while the others wait; then every rank reads the manifest."""
    if is_rank_zero:
        prepare_data(cfg)
    if dist.is_initialized():
        dist.barrier()
    return preprocess.load_manifest(cfg.processed_dir)
