"""Model variants trained sharded on 2 gloo ranks end to end: DCNv2, the projection interaction with
per-table MLPs on the sparse features, and fp16 tables (FBGEMM's fp16 kernel); each exports and its
unsharded fp32 export (and the torch.export program of its dense part) scores like the sharded model did."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_training

pytestmark = pytest.mark.distributed

VARIANTS = {
    "dcn": ["model.interaction=dcn", "model.dcn_num_layers=2", "model.dcn_low_rank_dim=4"],
    "projection_sparse_mlp": [
        "model.interaction=projection",
        "model.projection_branch1_layer_sizes=[16,32]",
        "model.projection_branch2_layer_sizes=[16,24]",
        "model.sparse_arch_layer_sizes=[16,8]",
    ],
    "fp16_tables": ["sharding.embedding_dtype=fp16"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_sharded_and_exports_with_parity(tmp_path, tiny_data_overrides, variant) -> None:
    from pipeline.serving.export import DenseInteraction, export, load_exported
    from pipeline.serving.predict import run

    run_dir = tmp_path / variant
    res = run_training(
        run_dir,
        [
            *tiny_data_overrides,
            *VARIANTS[variant],
            "trainer.max_steps=60",
            "trainer.eval_every_steps=20",
            "trainer.save_predictions=true",
            "sharding=table_wise",
            "logger.log_every_steps=5",
        ],
        nproc=2,
    )
    assert res.returncode == 0, res.output[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train/loss"] for e in events if e["event"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"the training loss falls: {losses}"
    auc = json.loads((run_dir / "summary.json").read_text())["final"]["eval/val/auc"]
    assert auc > 0.55, auc  # data=tiny's optimum is about 0.89; chance is 0.5 (std about 0.01 on 4,000 rows)

    spec = export(run_dir, tmp_path / "export")
    assert spec["model"]["interaction"] == {"dcn": "dcn", "projection_sparse_mlp": "projection"}.get(variant, "dot")
    model = load_exported(tmp_path / "export")
    run(model, str(tmp_path / "val.npy"), split="val")
    np.testing.assert_allclose(
        np.load(tmp_path / "val.npy"), np.load(run_dir / "predictions_val.npy"), rtol=1e-5, atol=1e-6
    )
    # --precision bf16: every variant's dense part under bfloat16 autocast, close to fp32's.
    run(load_exported(tmp_path / "export", "bf16"), str(tmp_path / "bf16.npy"), split="val")
    gap = np.abs(np.load(tmp_path / "bf16.npy") - np.load(tmp_path / "val.npy"))
    assert gap.max() < 0.02 and gap.mean() < 0.002, (gap.max(), gap.mean())
    program = torch.export.load(str(tmp_path / "export" / spec["dense_program"]["file"])).module()
    dense, pooled = torch.rand(5, 13), torch.randn(5, 26, 8)
    with torch.inference_mode():
        torch.testing.assert_close(program(dense, pooled), DenseInteraction(model.model)(dense, pooled))


def test_matrix_factorisation_on_generated_movielens_data(tmp_path) -> None:
    """model=mf on data=movielens_tiny (declared columns: 2 dense, 4 decimal-id sparse), sharded over 2
    ranks: the two tables learn the user-item affinity, and the export scores the raw TSV the same."""
    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    data = tmp_path / "movielens"
    run_dir = tmp_path / "mf"
    res = run_training(
        run_dir,
        [
            "model=mf",
            "data=movielens_tiny",
            f"data.raw_dir={data}/raw",
            f"data.processed_dir={data}/processed",
            "trainer.max_steps=160",
            "trainer.eval_every_steps=0",
            "trainer.save_predictions=true",
            "sharding=table_wise",
            "logger.log_every_steps=10",
        ],
        nproc=2,
    )
    assert res.returncode == 0, res.output[-3000:]
    assert "t_user_id: table_wise" in res.output and "t_genre" not in res.output  # two tables, nothing else
    summary = json.loads((run_dir / "summary.json").read_text())["final"]
    assert summary["eval/val/auc"] > 0.65, summary  # chance 0.5; the generator's optimum is about 0.82

    spec = export(run_dir, tmp_path / "export")
    assert spec["model"]["name"] == "mf" and spec["top_in_features"] is None
    model = load_exported(tmp_path / "export")
    run(model, str(tmp_path / "val.npy"), input_path=str(data / "raw" / "val.tsv"))
    np.testing.assert_allclose(
        np.load(tmp_path / "val.npy"), np.load(run_dir / "predictions_val.npy"), rtol=1e-5, atol=1e-6
    )


def test_bf16_autocast_trains_as_well_as_fp32(tmp_path, tiny_data_overrides) -> None:
    """trainer.precision=bf16 runs the dense part under torch.autocast (slower where the CPU emulates bf16)
    and reaches the fp32 run's validation AUC on data=tiny within 0.01. The export records the precision, and
    predict scores in it by default, as the trainer's evaluation did."""
    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    aucs = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        res = run_training(
            run_dir,
            [
                *tiny_data_overrides,
                "trainer.max_steps=150",
                "trainer.eval_every_steps=0",
                f"trainer.precision={precision}",
                "trainer.save_predictions=true",
            ],
            nproc=1,
        )
        assert res.returncode == 0, res.output[-3000:]
        aucs[precision] = json.loads((run_dir / "summary.json").read_text())["final"]["eval/val/auc"]
        assert export(run_dir, tmp_path / f"export_{precision}", dense_program=False)["precision"] == precision
        model = load_exported(tmp_path / f"export_{precision}")
        assert model.precision == precision
        run(model, str(tmp_path / f"{precision}.npy"), split="val")
        got, want = np.load(tmp_path / f"{precision}.npy"), np.load(run_dir / "predictions_val.npy")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 if precision == "fp32" else 1e-3)
    assert abs(aucs["bf16"] - aucs["fp32"]) < 0.01, aucs
    assert aucs["bf16"] != aucs["fp32"], "bf16 changed the arithmetic (autocast was on)"
