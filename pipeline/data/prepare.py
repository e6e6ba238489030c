"""Make a dataset ready to train on: generate (synthetic only) and preprocess, once, on rank 0."""

from __future__ import annotations

import logging

import torch.distributed as dist

from pipeline import storage
from pipeline.config import ConfigError, DataConfig
from pipeline.data import materialize, mirror, preprocess
from pipeline.data.generators import movielens, synthetic
from pipeline.data.manifest import Manifest
from pipeline.data.schema import Schema

logger = logging.getLogger(__name__)


def check_generator_layout(cfg: DataConfig) -> None:
    """A generator writes one fixed layout (its config's); the declared columns must be it, list columns
    and their caps included (a cap of 0 and one at least the longest list the generator writes are the same).

    Raises:
        ConfigError: naming the keys to set.
    """
    declared = Schema.from_config(cfg)
    for key, spec, module in (("synthetic", cfg.synthetic, synthetic), ("movielens", cfg.movielens, movielens)):
        if spec is None:
            continue
        layout, longest = module.schema(spec), module.list_lengths(spec)
        ours = (declared.dense_columns, declared.sparse_columns, declared.categorical_format)
        theirs = (layout.dense_columns, layout.sparse_columns, layout.categorical_format)
        preset = _PRESETS[key][bool(layout.multi_hot)]
        if ours != theirs:
            raise ConfigError(
                f"data.{key} writes the columns dense {list(layout.dense_columns)}, sparse "
                f"{list(layout.sparse_columns)} ({layout.categorical_format.value}), but data.dense_columns="
                f"{list(declared.dense_columns)}, data.sparse_columns={list(declared.sparse_columns)}, "
                f"data.categorical_format={declared.categorical_format.value}: declare the generator's columns "
                f"(see pipeline/conf/data/{preset}.yaml)"
            )
        lists = (_kept(declared.multi_hot, longest), set(declared.weighted), declared.list_separator)
        if lists != (_kept(layout.multi_hot, longest), set(layout.weighted), layout.list_separator) and (
            declared.multi_hot or layout.multi_hot
        ):
            raise ConfigError(
                f"data.{key} writes the list columns {dict(layout.multi_hot)} (column: ids kept; longest lists "
                f"{longest}), weighted {list(layout.weighted)}, separated by {layout.list_separator!r}, but "
                f"data.multi_hot_columns={dict(declared.multi_hot)}, data.weighted_columns={list(declared.weighted)}, "
                f"data.list_separator={declared.list_separator!r}: set data.multi_hot_columns="
                f"{dict(layout.multi_hot)} and data.weighted_columns={list(layout.weighted)} "
                f"(see pipeline/conf/data/{preset}.yaml)"
            )


# The shipped config that declares each generator's layout, without and with list columns.
_PRESETS = {"synthetic": ("tiny", "synthetic_multihot"), "movielens": ("movielens", "movielens_recent")}


def _kept(multi_hot: tuple[tuple[str, int], ...], longest: dict[str, int]) -> dict[str, int]:
    """Caps as what they keep: 0 (everything) for a cap at least the longest list written."""
    return {c: 0 if cap >= longest.get(c, cap + 1) else cap for c, cap in multi_hot}


def prepare_data(cfg: DataConfig) -> Manifest:
    """Generate the synthetic raw files if configured and missing, preprocess if stale (with ``data.materialize``:
    the one-hot source, then its multi-hot bags); return the manifest. An object-store ``data.processed_dir`` is
    prepared in its local copy and uploaded (:mod:`pipeline.data.mirror`)."""
    if storage.is_remote(cfg.processed_dir):
        return mirror.prepare(cfg, prepare_data)
    if cfg.materialize is not None:
        return materialize.prepare(cfg, prepare_data(materialize.source_config(cfg)))
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


def prepare_data_distributed(cfg: DataConfig, is_rank_zero: bool, is_local_zero: bool | None = None) -> Manifest:
    """Rank 0 prepares the data while the others wait; then every rank reads the manifest (of the local copy when
    ``data.processed_dir`` is in an object store: the first rank of every other node copies it down first)."""
    if is_rank_zero:
        prepare_data(cfg)
    if dist.is_initialized():
        dist.barrier()
    local = mirror.local_dir(cfg)
    if storage.is_remote(cfg.processed_dir):
        if is_local_zero and not is_rank_zero:
            mirror.pull(cfg.processed_dir, local)
        if dist.is_initialized():
            dist.barrier()
    return Manifest.load(local)
