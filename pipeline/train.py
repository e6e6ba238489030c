"""Train a sharded DLRM: ``./launch.sh train [overrides]`` or ``torchrun ... pipeline/train.py [overrides]``.

Every rank runs this entry point; Hydra composes and validates the config (conf/train.yaml), and all
ranks write into one run folder, outputs/<run_id>/.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun/TorchX pipeline/train.py): make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, TrainConfig, register_configs
from pipeline.runtime import env_rank, register_resolvers

logger = logging.getLogger("pipeline.train")
# TorchRec 1.8 passes DDP's deprecated broadcast_buffers on every run; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)

register_resolvers()
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(dict_cfg: DictConfig) -> None:
    from pipeline.trainer import Trainer  # heavy imports (torchrec) after the config is known good

    cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logging.getLogger("pipeline").setLevel(cfg.logger.level)
    if env_rank() == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dict_cfg, resolve=True))
    from pipeline.checkpoint import CheckpointError
    from pipeline.trainer import NonFiniteLossError

    try:
        trainer = Trainer(cfg, run_dir)
    except ConfigError as e:
        logger.error("invalid config: %s", e)
        raise SystemExit(2) from None
    except CheckpointError as e:
        logger.error("cannot resume: %s", e)
        raise SystemExit(3) from None
    try:
        trainer.train()
    except (NonFiniteLossError, CheckpointError) as e:
        logger.error("%s", e)
        raise SystemExit(3) from None
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
