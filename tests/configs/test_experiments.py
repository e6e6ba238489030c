"""Every shipped experiment composes and validates; the MLPerf ones say what the reference runs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import Interaction, TrainConfig, register_configs, validate
from pipeline.data.materialize import pooling_factors
from pipeline.resolvers import register_resolvers
from tests.conftest import CONF_DIR

register_resolvers()
register_configs()

MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]


def _compose(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(name: str) -> None:
    validate(_compose([f"experiment={name}"]), world_size=2, device_type="cpu")


def test_mlperf_dlrmv2_is_the_reference_setup() -> None:
    cfg = _compose(["experiment=mlperf_dlrmv2", "data.processed_dir=/nonexistent"])
    validate(cfg, world_size=8, device_type="cuda")
    assert cfg.data.materialize.sizes == MLPERF_SIZES
    assert cfg.data.num_embeddings_per_feature[:3] == [40000000, 39060, 17295] and cfg.data.id_mode.value == "hash"
    assert cfg.data.global_batch_size == 65536 and cfg.data.global_batch_size // 8 == 8192
    assert cfg.model.interaction == Interaction.dcn and cfg.model.dcn_low_rank_dim == 512
    assert cfg.model.over_arch_layer_sizes == [1024, 1024, 512, 256, 1]
    assert (cfg.optimizer.embedding.value, cfg.optimizer.dense.value, cfg.optimizer.lr) == ("adagrad", "adagrad", 0.005)
    assert cfg.optimizer.embedding_lr is None and cfg.optimizer.warmup_fraction == 0.0
    assert cfg.trainer.early_stop_auc == 0.80275
    assert pooling_factors(cfg.data) == [float(s) for s in MLPERF_SIZES], "planned from the spec without the data"


def test_mlperf_small_keeps_the_model_and_optimizer_on_tiny_data() -> None:
    big, small = _compose(["experiment=mlperf_dlrmv2"]), _compose(["experiment=mlperf_dlrmv2_small"])
    assert small.model == big.model
    assert small.optimizer == big.optimizer
    assert small.data.materialize.sizes == MLPERF_SIZES
    assert small.data.materialize.source_dir == _compose(["data=tiny"]).data.processed_dir
