"""./launch.sh plan: TorchRec's planner for a cluster this machine doesn't have."""

from __future__ import annotations

import pytest

from pipeline.tools.plan import CARDINALITIES, PlanDoesNotFit, plan, table_sizes


def test_criteo_1tb_on_two_nodes_of_eight_h100s_fits_with_memory_per_rank() -> None:
    sizes = table_sizes("criteo_1tb", 40_000_000)
    assert max(sizes) == 40_000_000 and len(sizes) == 26
    result = plan(2, 8, "cuda", 80, 128, sizes, 128, 2048, "row_wise_adagrad", 0.15, None)
    assert result["world_size"] == 16 and len(result["tables"]) == 26
    assert len(result["hbm_gib"]) == 16 and max(result["hbm_gib"]) < 80 * 0.85
    # Weights plus RowWiseAdagrad state of every table appear somewhere (data-parallel tables on every rank).
    total = 40_000_000 * 3 + 29_275_262 + 11_316_797
    assert sum(result["hbm_gib"]) > total * 128 * 4 / 1024**3
    big = [t for t in result["tables"] if t["rows"] == 40_000_000]
    assert len(big) == 3 and all(t["kernel"] == "fused" for t in big)


def test_a_plan_that_cannot_fit_is_refused_with_the_shortfall_and_the_tables() -> None:
    sizes = table_sizes("criteo_1tb", None)
    assert sizes[19] == CARDINALITIES["criteo_1tb"][19] + 1
    with pytest.raises(PlanDoesNotFit) as e:
        plan(1, 2, "cuda", 16, 16, sizes, 128, 2048, "row_wise_adagrad", 0.15, None)
    msg = str(e.value)
    assert "GiB more than the 54.4 GiB usable on 2 ranks" in msg
    assert "t_cat_19: 48,937,458 rows x 128 fp32 = 23.5 GiB" in msg and "--cap" in msg


def test_tables_larger_than_hbm_go_to_host_memory_behind_an_hbm_cache() -> None:
    """GPU readiness without a GPU: 1 node of 2 GPUs with 16 GiB each cannot hold the capped 1TB tables
    (78 GiB): HBM-only kernels are refused naming the cache as a way out; allowing fused_uvm_caching
    places the largest tables in host memory and keeps every GPU under its HBM."""
    sizes = table_sizes("criteo_1tb", 40_000_000)
    with pytest.raises(PlanDoesNotFit) as e:
        plan(1, 2, "cuda", 16, 256, sizes, 128, 2048, "row_wise_adagrad", 0.15, None, kernels=["fused"])
    assert "usable on 2 ranks x (16 GiB HBM)" in str(e.value) and "--kernels fused,fused_uvm_caching" in str(e.value)
    result = plan(
        1,
        2,
        "cuda",
        16,
        256,
        sizes,
        128,
        2048,
        "row_wise_adagrad",
        0.15,
        None,
        kernels=["fused", "fused_uvm_caching"],
        cache_load_factor=0.1,
    )
    cached = {t["table"] for t in result["tables"] if t["kernel"] == "fused_uvm_caching"}
    assert {"t_cat_0", "t_cat_19", "t_cat_21"} <= cached
    assert max(result["hbm_gib"]) < 16 * 0.85 and sum(result["ddr_gib"]) > 40


def test_fp16_tables_halve_the_planned_memory() -> None:
    sizes = table_sizes("criteo_1tb", 40_000_000)
    fp32 = plan(2, 8, "cuda", 80, 128, sizes, 128, 2048, "sgd", 0.15, None, kernels=["fused"])
    fp16 = plan(2, 8, "cuda", 80, 128, sizes, 128, 2048, "sgd", 0.15, None, kernels=["fused"], dtype="fp16")
    table_bytes = sum(sizes) * 128 * 4 / 1024**3
    assert sum(fp32["hbm_gib"]) - sum(fp16["hbm_gib"]) == pytest.approx(table_bytes / 2, rel=0.02)
