"""Make a dataset ready to train on: generate (synthetic only) and preprocess, once, on rank 0."""

from __future__ import annotations

import logging

import torch.distributed as dist

from pipeline.config import ConfigError, DataConfig
from pipeline.data import preprocess
from pipeline.data.generators import movielens, synthetic
from pipeline.data.manifest import Manifest
from pipeline.data.schema import CRITEO, Schema

logger = logging.getLogger(__name__)


def check_generator_layout(cfg: DataConfig) -> None:
    """A generator writes one fixed layout; the declared columns must be it.

    Raises:
        ConfigError: naming the columns to declare.
    """
    declared = Schema.from_config(cfg)
    for key, spec, layout in (("synthetic", cfg.synthetic, CRITEO), ("movielens", cfg.movielens, movielens.SCHEMA)):
        if spec is None:
            continue
        ours = (declared.dense_columns, declared.sparse_columns, declared.categorical_format)
        theirs = (layout.dense_columns, layout.sparse_columns, layout.categorical_format)
        if ours != theirs:
            raise ConfigError(
                f"data.{key} writes the columns dense {list(layout.dense_columns)}, sparse "
                f"{list(layout.sparse_columns)} ({layout.categorical_format.value}), but data.dense_columns="
                f"{list(declared.dense_columns)}, data.sparse_columns={list(declared.sparse_columns)}, "
                f"data.categorical_format={declared.categorical_format.value}: declare the generator's columns "
                f"(see pipeline/conf/data/{'tiny' if key == 'synthetic' else 'movielens'}.yaml)"
            )


def prepare_data(cfg: DataConfig) -> Manifest:
    """Generate the synthetic raw files if configured and missing, preprocess if stale; return the manifest."""
    check_generator_layout(cfg)
    if cfg.synthetic is not None and not synthetic.is_complete(cfg.synthetic, cfg.raw_dir):
        logger.info("generating synthetic Criteo-format data into %s", cfg.raw_dir)
        synthetic.generate(cfg.synthetic, cfg.raw_dir)
    if cfg.movielens is not None and not movielens.is_complete(cfg.movielens, cfg.raw_dir):
        logger.info("generating MovieLens-style user-item data into %s", cfg.raw_dir)
        movielens.generate(cfg.movielens, cfg.raw_dir)
    if preprocess.is_current(cfg):
        logger.info("reusing preprocessed data in %s", cfg.processed_dir)
        return Manifest.load(cfg.processed_dir)
    return preprocess.preprocess(cfg)


def prepare_data_distributed(cfg: DataConfig, is_rank_zero: bool) -> Manifest:
    """Rank 0 prepares the data while the others wait; then every rank reads the manifest."""
    if is_rank_zero:
        prepare_data(cfg)
    if dist.is_initialized():
        dist.barrier()
    return Manifest.load(cfg.processed_dir)
