"""Prepare a dataset without training: ``./launch.sh preprocess data=<name> [overrides]``.

Generates the synthetic raw files when the data config asks for them, then converts the raw TSV into
binary splits + manifest.json (skipped when a finished manifest with the same settings is there).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.config import TrainConfig, register_configs
from pipeline.errors import UserError
from pipeline.resolvers import register_resolvers

# configs/ (the user's config folder, on the search path) is optional: no warning where it does not exist.
warnings.filterwarnings("ignore", message=r".*path=configs is not available.*", category=UserWarning)
logger = logging.getLogger("pipeline.preprocess")

register_resolvers()
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(dict_cfg: DictConfig) -> None:
    from pipeline.data.prepare import prepare_data
    from pipeline.distributed.env import keep_freed_memory

    try:
        cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
        if cfg.trainer.keep_freed_memory:
            keep_freed_memory()  # each block's columns reuse the previous block's pages, as in training
        manifest = prepare_data(cfg.data)
    except UserError as e:  # the file, line and field, or the key: no traceback
        logger.error("%s", e)
        raise SystemExit(e.exit_code) from None
    rows = {s: v.num_rows for s, v in manifest.splits.items()}
    logger.info(
        "manifest %s: rows %s, table sizes %s",
        storage.display(storage.join(storage.location(cfg.data.processed_dir), "manifest.json")),
        json.dumps(rows),
        manifest.num_embeddings_per_feature,
    )


if __name__ == "__main__":
    main()
