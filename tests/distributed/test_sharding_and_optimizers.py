"""Each sharding type and each fused table optimizer trains (in-process, one gloo rank).

Tiny tables would make the planner fall back to data_parallel/dense (no FBGEMM, no fused state), so
the presets pin the fused kernel: these tests exercise the production path.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import register_configs
from pipeline.resolvers import register_resolvers
from tests.conftest import CONF_DIR

register_resolvers()
register_configs()


def _trainer(tmp_path, overrides: list[str]):
    from pipeline.trainer import Trainer

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(
            compose(
                "train",
                overrides=[
                    "trainer.max_steps=4",
                    "trainer.eval_every_steps=0",
                    "trainer.run_doctor=false",
                    "logger.progress_bar=false",
                    "data.eval_global_batch_size=4096",
                    *overrides,
                ],
            )
        )
    return Trainer(cfg, tmp_path)


def _tables(trainer) -> dict[str, torch.Tensor]:
    """This rank's table weights (sharded tables hold ShardedTensors, replicated ones plain tensors)."""
    out = {}
    for k, v in trainer.model.state_dict().items():
        if "embedding_bags" in k:
            out[k] = (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).clone()
    return out


@pytest.mark.parametrize(
    ("optimizer", "fused"), [("row_wise_adagrad", True), ("adagrad", True), ("sgd", True), ("adam", False)]
)
def test_table_optimizer_updates_tables_in_backward(tmp_path, tiny_data_overrides, optimizer: str, fused: bool) -> None:
    # FBGEMM's CPU kernel has no fused Adam: on CPU, Adam tables must be data-parallel.
    sharding = [] if fused else ["sharding=data_parallel"]
    trainer = _trainer(tmp_path, [*tiny_data_overrides, f"optimizer={optimizer}", *sharding])
    try:
        before = _tables(trainer)
        summary = trainer.train()
        after = _tables(trainer)
        assert any(not torch.equal(before[k], after[k]) for k in before), "tables were updated"
        state = trainer.model.fused_optimizer.state_dict()["state"]
        if optimizer in ("row_wise_adagrad", "adagrad"):
            assert state, f"fused {optimizer} keeps its state in FBGEMM"
        assert 0.0 <= summary["final"]["eval/val/auc"] <= 1.0
    finally:
        trainer.close()


def test_adam_tables_on_cpu_fail_with_the_fix(tmp_path, tiny_data_overrides) -> None:
    from pipeline.config import ConfigError

    with pytest.raises(
        ConfigError, match="optimizer.embedding=adam: FBGEMM's fused CPU kernel has no Adam.*sharding=data_parallel"
    ):
        _trainer(tmp_path, [*tiny_data_overrides, "optimizer=adam"])


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_sharding_type_is_applied(tmp_path, tiny_data_overrides, sharding: str) -> None:
    trainer = _trainer(tmp_path, [*tiny_data_overrides, f"sharding={sharding}"])
    try:
        plan = trainer.model.plan.plan["model.sparse_arch.embedding_bag_collection"]
        assert {p.sharding_type for p in plan.values()} == {sharding}
        trainer.train()
    finally:
        trainer.close()


def test_per_table_constraint_overrides_the_group(tmp_path, tiny_data_overrides) -> None:
    trainer = _trainer(
        tmp_path, [*tiny_data_overrides, "sharding=table_wise", "+sharding.table_sharding_types.t_cat_3=[column_wise]"]
    )
    try:
        plan = trainer.model.plan.plan["model.sparse_arch.embedding_bag_collection"]
        assert plan["t_cat_3"].sharding_type == "column_wise"
        assert plan["t_cat_4"].sharding_type == "table_wise"
    finally:
        trainer.close()


def test_row_wise_on_cpu_fails_with_the_fix(tmp_path, tiny_data_overrides) -> None:
    from pipeline.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"sharding.sharding_types=\['row_wise'\]: TorchRec shards tables row-wise only on CUDA"
    ):
        _trainer(tmp_path, [*tiny_data_overrides, "sharding=row_wise"])


def test_schedule_drives_the_fused_table_lr(tmp_path, tiny_data_overrides) -> None:
    trainer = _trainer(
        tmp_path,
        [
            *tiny_data_overrides,
            "optimizer.decay=linear",
            "optimizer.decay_start=0.0",
            "optimizer.final_lr_fraction=0.5",
            "optimizer.embedding_lr=0.08",
            "optimizer.warmup_steps=0",
        ],
    )
    try:
        trainer.train()
        fused_lr = trainer.model.fused_optimizer.param_groups[0]["lr"]
        assert fused_lr == pytest.approx(0.04), "the tables' lr followed the schedule to half"
    finally:
        trainer.close()


def test_profile_steps_write_a_profile_of_the_sharded_step(tmp_path, tiny_data_overrides) -> None:
    """trainer.profile_steps profiles training steps (FBGEMM's fused kernels, the interaction) into the
    run folder; the sharded collection hands its pooled embeddings over in feature order, so the model
    takes them without a copy."""
    from pipeline.data.loader import eval_batches

    trainer = _trainer(
        tmp_path, [*tiny_data_overrides, "optimizer=sgd", "trainer.profile_steps=2", "trainer.profile_wait_steps=1"]
    )
    try:
        trainer.train()
        table = (tmp_path / "profile" / "rank0.txt").read_text()
        assert table.startswith("2 training steps at global batch")
        assert "Self CPU time total" in table
        trace = (tmp_path / "profile" / "rank0.trace.json").read_text()  # every event (the table keeps the top 30)
        assert "split_embedding_codegen_forward_cpu" in trace and "_PairwiseDot" in trace
        dlrm = trainer.model.module.model
        batch = next(iter(eval_batches(trainer.eval_splits["val"], 64, 0, 1, 1))).batch
        kt = dlrm.sparse_arch.embedding_bag_collection(batch.sparse_features)
        kt = kt.wait() if hasattr(kt, "wait") else kt
        assert kt.keys() == dlrm.sparse_arch.sparse_feature_names and kt.key_dim() == 1
    finally:
        trainer.close()
