"""./launch.sh plan: TorchRec's planner for a cluster this machine doesn't have."""

from __future__ import annotations

import json

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


def _multi_hot_manifest(folder) -> None:
    """A processed folder's manifest: three tables, the second a list column of 12.5 ids per row (at most 40)."""
    from pipeline.data.manifest import Manifest, SplitInfo
    from pipeline.data.schema import Schema

    schema = Schema(("i1",), ("a", "b", "c"), ("a", "b", "c"), multi_hot=(("b", 0),))
    Manifest(
        settings={},
        sources=[],
        splits={"train": SplitInfo(100)},
        schema=schema,
        num_embeddings_per_feature=[100, 5_000, 50],
        pooling_factors=[1.0, 12.5, 1.0],
        max_lengths=[1, 40, 1],
    ).save(folder)


def test_the_plan_shows_each_tables_ids_per_sample_from_the_manifest(tmp_path, capsys) -> None:
    from pipeline.tools.plan import main

    _multi_hot_manifest(tmp_path)
    args = ["-j", "1x2", "--device", "cpu", "--ddr-gb", "4", "--data", f"processed:{tmp_path}", "--embedding-dim", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "14.5 ids per sample" in out
    header = next(line for line in out.splitlines() if line.startswith("table"))
    assert header.split()[:4] == ["table", "rows", "ids/sample", "max"]
    row = next(line for line in out.splitlines() if line.startswith("t_cat_1 "))
    assert row.split()[:4] == ["t_cat_1", "5,000", "12.5", "40"]
    assert next(line for line in out.splitlines() if line.startswith("t_cat_2 ")).split()[:4] == [
        "t_cat_2",
        "50",
        "1",
        "1",
    ]
    assert "est. ms" in out
    assert main([*args, "--json"]) == 0
    tables = {t["table"]: t for t in json.loads(capsys.readouterr().out)["tables"]}
    assert tables["t_cat_1"]["pooling_factor"] == 12.5 and tables["t_cat_1"]["max_length"] == 40


def test_pooling_factors_given_for_data_not_here_raise_the_planned_cost(capsys) -> None:
    from pipeline.tools.plan import main

    sizes = table_sizes("criteo_kaggle", 1000)
    one_hot = plan(1, 2, "cpu", None, 4, sizes, 16, 2048, "sgd", 0.15, None)
    bags = plan(1, 2, "cpu", None, 4, sizes, 16, 2048, "sgd", 0.15, None, pooling_factors=[20.0] * 26)
    assert all(t["pooling_factor"] == 1.0 and t["max_length"] is None for t in one_hot["tables"])
    assert sum(bags["perf_ms"]) > 5 * sum(one_hot["perf_ms"]) > 0
    args = ["-j", "1x2", "--device", "cpu", "--ddr-gb", "4", "--data", "criteo_kaggle", "--cap", "1000"]
    assert main([*args, "--pooling-factors", "20"]) == 0
    out = capsys.readouterr().out
    assert "520 ids per sample" in out and " max " not in out  # no longest list without a manifest
    assert next(line for line in out.splitlines() if line.startswith("t_cat_7 ")).split()[2] == "20"
    with pytest.raises(SystemExit, match="one value >= 0 for every table"):
        main([*args, "--pooling-factors", "1,2"])


def test_a_training_config_is_planned_from_its_overrides(capsys) -> None:
    """experiment=mlperf_dlrmv2 for 8 GPUs of 80 GB: MLPerf's table sizes and bag sizes from the config, its
    dimension, Adagrad and global batch 65536 over the 8 ranks; memory per rank within the card."""
    from pipeline.tools.plan import main

    assert main(["experiment=mlperf_dlrmv2", "-j", "1x8", "--device", "cuda", "--hbm-gb", "80", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tables = {t["table"]: t for t in result["tables"]}
    assert tables["t_cat_0"]["rows"] == 40_000_000 and tables["t_cat_20"]["pooling_factor"] == 100
    assert len(result["hbm_gib"]) == 8 and 0 < max(result["hbm_gib"]) <= 80
    assert main(["experiment=mlperf_dlrmv2", "-j", "1x8", "--hbm-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "214 ids per sample, dim 128 fp32, adagrad, batch 8192/rank" in out
    assert main(["experiment=mlperf_dlrmv2", "model.embeding_dim=64", "-j", "1x8"]) == 2
    assert "did you mean model.embedding_dim" in capsys.readouterr().err
