"""Defaults that follow the data: the batch size and epoch count a run uses when the config leaves them null."""

from __future__ import annotations

import pytest

from pipeline.autoconfig import adapt_to_data, auto_global_batch_size, auto_num_epochs, scaled_table_lr
from pipeline.config import EmbeddingOptimizer, TrainConfig


@pytest.mark.parametrize(
    ("rows", "batch"),
    [
        (20_000, 64),
        (125_284, 64),
        (200_000, 128),
        (300_000, 256),
        (600_000, 512),
        (3_000_000, 2048),
        (39_000_000, 2048),
    ],
)
def test_batch_gives_an_epoch_about_a_thousand_updates_within_64_to_2048(rows, batch) -> None:
    assert auto_global_batch_size(rows, 1) == batch
    assert rows // batch >= 1000 or batch == 64


def test_auto_batch_splits_evenly_over_the_ranks() -> None:
    assert auto_global_batch_size(125_284, 2) == 64
    assert auto_global_batch_size(125_284, 3) == 66 and auto_global_batch_size(3_000_000, 24) == 2064


@pytest.mark.parametrize(
    ("rows", "epochs"),
    [(20_000, 4), (125_284, 4), (300_000, 4), (400_000, 3), (600_000, 2), (1_000_000, 1), (3_000_000, 1)],
)
def test_small_logs_get_more_epochs_large_ones_one(rows, epochs) -> None:
    assert auto_num_epochs(rows) == epochs


def _cfg(embedding: EmbeddingOptimizer = EmbeddingOptimizer.row_wise_adagrad) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.global_batch_size, cfg.trainer.num_epochs = None, None
    cfg.optimizer.embedding, cfg.optimizer.lr, cfg.optimizer.embedding_lr = embedding, 0.01, 0.1
    return cfg


def test_only_null_settings_are_chosen_and_each_choice_is_explained() -> None:
    cfg = _cfg()
    chosen = adapt_to_data(cfg, 125_284, 1)
    assert (cfg.data.global_batch_size, cfg.trainer.num_epochs, cfg.optimizer.embedding_lr) == (64, 4, 0.05)
    assert chosen[0].startswith("data.global_batch_size=64: 125,284 training rows") and "1,957 per epoch" in chosen[0]
    assert chosen[1].startswith("optimizer.embedding_lr=0.05: 0.1 x sqrt(64/256)")
    assert chosen[2].startswith("trainer.num_epochs=4: 125,284 training rows") and "fresh tables" in chosen[2]
    cfg = _cfg()
    cfg.data.global_batch_size, cfg.trainer.num_epochs = 64, 1  # the user's values win, rates included
    assert adapt_to_data(cfg, 125_284, 1) == [] and (cfg.data.global_batch_size, cfg.trainer.num_epochs) == (64, 1)
    assert cfg.optimizer.embedding_lr == 0.1


@pytest.mark.parametrize(("batch", "lr"), [(64, 0.05), (128, 0.070711), (256, 0.1), (2048, 0.1)])
def test_a_small_chosen_batch_scales_the_table_rate_by_its_square_root(batch, lr) -> None:
    assert scaled_table_lr(0.1, batch) == lr


def test_large_logs_and_non_adagrad_tables_keep_their_rates() -> None:
    big = _cfg()
    adapt_to_data(big, 3_000_000, 2)  # the main job: batch 2048, rate as configured
    assert (big.data.global_batch_size, big.optimizer.embedding_lr) == (2048, 0.1)
    sgd = _cfg(EmbeddingOptimizer.sgd)
    adapt_to_data(sgd, 125_284, 1)
    assert (sgd.data.global_batch_size, sgd.optimizer.embedding_lr) == (64, 0.1)
    unset = _cfg()
    unset.optimizer.embedding_lr = None  # tables at optimizer.lr: that is the rate scaled
    adapt_to_data(unset, 125_284, 1)
    assert unset.optimizer.embedding_lr == round(0.01 * 0.5, 6)
