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

from pipeline.config import TrainConfig, register_configs
from pipeline.errors import CheckpointError, ConfigError, UserError
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
    try:
        trainer = Trainer(cfg, run_dir)
        try:
            trainer.train()
        finally:
            trainer.close()
    except UserError as e:  # a message that names the problem and the fix; no traceback
        prefix = {ConfigError: "invalid config: ", CheckpointError: "cannot resume: "}.get(type(e), "")
        logger.error("%s%s", prefix, e)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
