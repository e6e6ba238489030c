"""Export and predict: a model trained sharded on 2 gloo ranks, exported unsharded, scores the raw
validation TSV as the sharded model scored the preprocessed split (predictions_val.npy, rtol 1e-5),
in a process where torch.distributed is never initialised; the unlabelled (.gz) layout, malformed
lines, hash ids with TorchRec's dense transform under real column-wise shards, a data-parallel table,
the self-interaction, and the torch.export program of the dense part."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.conftest import ROOT, reallocation_faults, run_training

pytestmark = pytest.mark.distributed

STEPS = 30


def _option(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}="))


def _train(run_dir: Path, data: list[str], *extra: str) -> Path:
    run = run_training(
        run_dir,
        [*data, f"trainer.max_steps={STEPS}", "trainer.save_predictions=true", "trainer.eval_every_steps=0", *extra],
        nproc=2,
    )
    assert run.returncode == 0, run.output[-3000:]
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "predictions_val.npy").is_file()
    return run_dir


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory, tiny_data_overrides) -> Path:
    """data=tiny as is (id_mode=vocab, log1p), table-wise over 2 ranks but one table data-parallel (replicated,
    dense kernel), with the self-interaction (TorchRec's InteractionArch replaced by DotInteraction)."""
    return _train(
        tmp_path_factory.mktemp("export") / "vocab",
        tiny_data_overrides,
        "sharding=table_wise",
        "+sharding.table_sharding_types.t_cat_3=[data_parallel]",
        "+sharding.table_compute_kernels.t_cat_3=[dense]",
        "model.self_interaction=true",
    )


@pytest.fixture(scope="module")
def hash_run(tmp_path_factory, tiny_data_overrides) -> Path:
    """The same raw data preprocessed with hash ids and TorchRec's dense transform; column-wise over 2 ranks
    with 256-wide tables, which the planner cuts into two 128-column shards (its minimum), one per rank."""
    root = tmp_path_factory.mktemp("export_hash")
    data = [o for o in tiny_data_overrides if not o.startswith("data.processed_dir=")]
    return _train(
        root / "hash",
        [
            *data,
            f"data.processed_dir={root}/processed",
            "data.id_mode=hash",
            "data.max_ids_per_feature=300",
            "data.dense_transform=torchrec",
        ],
        "sharding=column_wise",
        "model.embedding_dim=256",
    )


def test_exported_model_scores_the_raw_tsv_like_the_sharded_model(tmp_path, vocab_run, tiny_data_overrides) -> None:
    raw = Path(_option(tiny_data_overrides, "data.raw_dir"))
    out = tmp_path / "export"
    exp = _cli("pipeline.serving.export", vocab_run, "--out", out)  # a run folder: its latest checkpoint
    assert exp.returncode == 0, exp.stderr[-3000:]
    spec = json.loads((out / "export.json").read_text())
    assert spec["source"]["step"] == STEPS and spec["source"]["saved_by_world_size"] == 2
    assert spec["model"]["self_interaction"] and spec["top_in_features"] == 8 + 27 * 28 // 2
    assert spec["input"]["id_mode"] == "vocab" and (out / "vocab.npz").is_file()
    assert (out / spec["weights"]["file"]).is_file()
    if spec["weights"]["format"] == "torch":
        weights = torch.load(out / spec["weights"]["file"], weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in weights.values())
        assert weights["sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"].shape[1] == 8

    pred = _cli(
        "pipeline.serving.predict",
        "--model",
        out,
        "--input",
        raw / "val.tsv",
        "--out",
        tmp_path / "val.tsv",
        "--metrics-json",
        tmp_path / "metrics.json",
    )
    assert pred.returncode == 0, pred.stderr[-3000:]
    got = np.loadtxt(tmp_path / "val.tsv", dtype=np.float32)
    want = np.load(vocab_run / "predictions_val.npy")
    assert got.shape == want.shape == (4000,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    summary = json.loads((vocab_run / "summary.json").read_text())["final"]
    assert metrics["auc"] == pytest.approx(summary["eval/val/auc"], abs=1e-6)
    assert metrics["logloss"] == pytest.approx(summary["eval/val/logloss"], rel=1e-5)


@pytest.mark.parametrize("split", ["val", "test"])
def test_distributed_eval_metrics_equal_the_gathered_ones(vocab_run, tiny_data_overrides, split) -> None:
    """The run's metrics (computed over 2 ranks, no rank holding all predictions) are binary_metrics of all the
    split's predictions gathered in one place, to 1e-6."""
    from pipeline.metrics.functional import binary_metrics
    from pipeline.metrics.keys import of_split

    raw = Path(_option(tiny_data_overrides, "data.raw_dir"))
    labels = np.array([float(line.split("\t", 1)[0]) for line in (raw / f"{split}.tsv").read_text().splitlines()])
    probs = np.load(vocab_run / f"predictions_{split}.npy")
    want = binary_metrics(torch.from_numpy(probs), torch.from_numpy(labels))
    got = of_split(json.loads((vocab_run / "summary.json").read_text())["final"], split)
    assert got["num_samples"] == want.num_samples == len(labels)
    for name in ("auc", "logloss", "normalized_entropy", "accuracy", "calibration", "ctr"):
        assert got[name] == pytest.approx(getattr(want, name), abs=1e-6), name


@pytest.fixture(scope="module")
def vocab_export(tmp_path_factory, vocab_run) -> Path:
    """The vocab run exported in this (pytest) process, from its checkpoints folder (the latest)."""
    from pipeline.serving.export import export

    assert not dist.is_initialized()
    out = tmp_path_factory.mktemp("vocab_export") / "export"
    export(vocab_run / "checkpoints", out)
    return out


def test_export_and_predict_run_without_torch_distributed(
    tmp_path, vocab_run, vocab_export, tiny_data_overrides
) -> None:
    """In this process: load the export, score the raw test TSV and the preprocessed val split."""
    from pipeline.serving.export import DenseInteraction, load_exported
    from pipeline.serving.predict import run

    raw = Path(_option(tiny_data_overrides, "data.raw_dir"))
    model = load_exported(vocab_export)
    test = run(model, str(tmp_path / "test.npy"), input_path=str(raw / "test.tsv"), batch_size=1000)
    split = run(model, str(tmp_path / "val.npy"), split="val")
    assert not dist.is_initialized(), "export and predict never start a process group"
    assert test.rows == test.scored == 4000 and test.labelled
    np.testing.assert_allclose(
        np.load(tmp_path / "test.npy"), np.load(vocab_run / "predictions_test.npy"), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "val.npy"), np.load(vocab_run / "predictions_val.npy"), rtol=1e-5, atol=1e-7
    )
    assert split.metrics["num_samples"] == 4000

    # The torch.export program of the dense part gives the eager model's logits from pooled embeddings.
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    program = torch.export.load(str(vocab_export / model.spec["dense_program"]["file"])).module()
    rng = np.random.default_rng(0)
    dense = torch.from_numpy(rng.random((37, 13), dtype=np.float32))
    ids = np.stack([rng.integers(0, n, 37) for n in model.spec["num_embeddings_per_feature"]], axis=1)
    kjt = KeyedJaggedTensor(
        keys=model.spec["feature_names"],
        values=torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1)),
        lengths=torch.ones(26 * 37, dtype=torch.int32),
        stride=37,
    )
    with torch.inference_mode():
        pooled = model.model.sparse_arch(kjt)
        torch.testing.assert_close(program(dense, pooled), DenseInteraction(model.model)(dense, pooled))
        torch.testing.assert_close(program(dense, pooled).flatten(), model.logits(dense, ids))
    assert not dist.is_initialized()


def test_unlabelled_gz_input_and_malformed_lines(
    tmp_path, vocab_run, vocab_export, tiny_data_overrides, caplog
) -> None:
    """The Kaggle test layout (no label column, here gzipped) scores the same; a malformed line stops the
    run naming it, or with --bad-rows skip scores NaN in its place so output rows still follow input lines."""
    import gzip

    from pipeline.serving.export import load_exported
    from pipeline.serving.predict import main, run

    raw = Path(_option(tiny_data_overrides, "data.raw_dir"))
    want = np.load(vocab_run / "predictions_val.npy")
    lines = [ln.split("\t", 1)[1] for ln in (raw / "val.tsv").read_text().splitlines()]
    lines.insert(10, "not\ta\trow")
    lines.append("\t".join(["1"] * 39)[:-1] + "zz")  # bad categorical in the last line
    path = tmp_path / "test.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")

    model = load_exported(vocab_export)
    res = run(model, str(tmp_path / "p.npy"), input_path=str(path), bad_rows="skip", block_size_mb=0.1)
    got = np.load(tmp_path / "p.npy")
    assert not res.labelled and res.metrics is None
    assert res.rows == len(got) == 4002 and res.scored == 4000
    assert res.bad_rows["by_kind"]["wrong_field_count"] == 1 and res.bad_rows["by_kind"]["bad_categorical"] == 1
    assert np.isnan(got[10]) and np.isnan(got[-1])
    np.testing.assert_allclose(np.delete(got, [10, 4001]), want, rtol=1e-5, atol=1e-7)

    caplog.set_level("ERROR", logger="pipeline.serving.predict")
    assert main(["--model", str(vocab_export), "--input", str(path), "--out", str(tmp_path / "e.tsv")]) == 1
    assert "test.txt.gz:11: 3 tab-separated fields, expected 39 (no label)" in caplog.text
    assert "--bad-rows skip" in caplog.text
    assert not (tmp_path / "e.tsv").exists() and not (tmp_path / "e.tsv.tmp").exists(), "no partial output"


def test_hash_ids_and_torchrec_dense_transform_column_wise(tmp_path, hash_run, tiny_data_overrides) -> None:
    from pipeline.checkpoint import SafeFileSystemReader, latest_checkpoint
    from pipeline.serving.export import export, load_exported
    from pipeline.serving.predict import run

    raw = Path(_option(tiny_data_overrides, "data.raw_dir"))
    saved = SafeFileSystemReader(latest_checkpoint(hash_run / "checkpoints")).read_metadata().state_dict_metadata
    chunks = saved["model.model.sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"].chunks
    assert sorted((list(c.offsets), list(c.sizes)) for c in chunks) == [([0, 0], [300, 128]), ([0, 128], [300, 128])]
    spec = export(hash_run, tmp_path / "export")
    inp = spec["input"]
    assert inp["id_mode"] == "hash" and inp["caps"] == [300] * 26 and inp["vocab"] is None
    assert not (tmp_path / "export" / "vocab.npz").exists()
    assert inp["dense_transform"] == "torchrec" and inp["dense_min"]["train"] is not None
    assert {tuple(p["splits"]) for p in inp["dense_min"]["parts"]} == {("train",), ("val",), ("test",)}

    model = load_exported(tmp_path / "export")
    want = np.load(hash_run / "predictions_val.npy")
    # val.tsv was preprocessed as a file of its own: the transform used that file's minimum.
    res = run(model, str(tmp_path / "val.npy"), input_path=str(raw / "val.tsv"), dense_min="input")
    val_min = next(p["dense_min"] for p in inp["dense_min"]["parts"] if p["splits"] == ["val"])
    assert res.dense_min == val_min
    np.testing.assert_allclose(np.load(tmp_path / "val.npy"), want, rtol=1e-5, atol=1e-7)
    run(model, str(tmp_path / "split.npy"), split="val")
    np.testing.assert_allclose(np.load(tmp_path / "split.npy"), want, rtol=1e-5, atol=1e-7)
    # The default takes the training file's minimum, recorded at export; "input" the file's own.
    lines = (raw / "val.tsv").read_text().splitlines()
    first = lines[0].split("\t")
    first[1] = str(inp["dense_min"]["train"] - 5)  # I1
    (tmp_path / "lower.tsv").write_text("\n".join(["\t".join(first), *lines[1:]]) + "\n")
    at_train = run(model, str(tmp_path / "a.npy"), input_path=str(tmp_path / "lower.tsv"))
    at_input = run(model, str(tmp_path / "b.npy"), input_path=str(tmp_path / "lower.tsv"), dense_min="input")
    assert (at_train.dense_min, at_input.dense_min) == (inp["dense_min"]["train"], inp["dense_min"]["train"] - 5)
    assert (at_train.nonfinite_dense_rows, at_input.nonfinite_dense_rows) == (1, 0)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_allclose(a[1:], want[1:], rtol=1e-5, atol=1e-7)
    assert np.isnan(a[0]) and not np.isnan(b[0]) and not np.allclose(a[1:], b[1:])


def test_int8_export_scores_close_to_float_and_is_smaller(tmp_path, vocab_run, vocab_export) -> None:
    """--quantize int8: tables int8 row-wise through PyTorch's quantized embedding-bag kernel; the val
    predictions stay close to the float export's and the AUC moves by little."""
    from pipeline.serving.export import INT8_KEY, export, load_exported, main
    from pipeline.serving.predict import run

    assert main([str(vocab_run), "--out", str(tmp_path / "int8"), "--quantize", "int8", "--no-dense-program"]) == 0
    spec = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert spec["format_version"] == 3 and spec["weights"]["table_format"] == "int8_rowwise"
    float_spec = json.loads((vocab_export / "export.json").read_text())
    assert float_spec["format_version"] == 2 and float_spec["weights"]["table_format"] == "float32"
    assert spec["weights"]["bytes"] < 0.7 * float_spec["weights"]["bytes"]  # tiny tables (D=8): 16 B/row vs 32

    model = load_exported(tmp_path / "int8")
    buffers = dict(model.model.named_buffers())
    d = spec["model"]["embedding_dim"]
    tables = {k: v for k, v in buffers.items() if k.endswith(INT8_KEY)}
    assert len(tables) == 26 and all(v.dtype == torch.uint8 and v.shape[1] == d + 8 for v in tables.values())
    assert not any(k.endswith(".weight") and ".embedding_bags." in k for k, _ in model.model.named_parameters())
    q = run(model, str(tmp_path / "q.npy"), split="val")
    f = run(load_exported(vocab_export), str(tmp_path / "f.npy"), split="val")
    got, want = np.load(tmp_path / "q.npy"), np.load(tmp_path / "f.npy")
    assert np.abs(got - want).max() < 0.02 and not np.array_equal(got, want)
    assert abs(q.metrics["auc"] - f.metrics["auc"]) < 0.005

    with pytest.raises(Exception, match="quantize='int4'"):
        export(vocab_run, tmp_path / "int4", quantize="int4")


def test_bf16_scoring_stays_close_to_fp32(tmp_path, vocab_run, vocab_export, caplog, monkeypatch) -> None:
    """predict --precision bf16: the dense part under bfloat16 autocast, the lookups float32; the probabilities
    move by little, and an unknown precision or a CPU without native bfloat16 is said in one line."""
    from pipeline.errors import ExportError
    from pipeline.serving import export as export_module
    from pipeline.serving.export import load_exported
    from pipeline.serving.predict import main

    out = tmp_path / "bf16.npy"
    assert main(["--model", str(vocab_export), "--split", "val", "--out", str(out), "--precision", "bf16"]) == 0
    got, want = np.load(out), np.load(vocab_run / "predictions_val.npy")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 0.02 and np.abs(got - want).mean() < 0.002 and not np.array_equal(got, want)
    assert load_exported(vocab_export).precision == "fp32"

    with pytest.raises(ExportError, match="precision 'fp16': expected one of"):
        load_exported(vocab_export, "fp16")
    monkeypatch.setattr(export_module, "native_bf16", lambda: False)  # as imported there
    caplog.set_level("WARNING", logger="pipeline.serving.export")
    assert load_exported(vocab_export, "bf16").precision == "bf16"
    assert "neither AVX-512 BF16 nor AMX, so bfloat16 is emulated" in caplog.text


class _Payload:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_export_whose_weights_are_a_crafted_pickle_is_refused_without_running_it(tmp_path, vocab_export) -> None:
    from pipeline.errors import ExportError
    from pipeline.serving.export import WEIGHTS_TORCH, load_exported

    export_dir = tmp_path / "export"
    shutil.copytree(vocab_export, export_dir)
    weights = next(export_dir.glob("model.*"))
    weights.unlink()
    marker = tmp_path / "pwned"
    torch.save({"bottom": _Payload(marker)}, export_dir / WEIGHTS_TORCH)
    spec = json.loads((export_dir / "export.json").read_text())
    spec["weights"].update(file=WEIGHTS_TORCH, format="torch")  # whoever made the folder wrote export.json too
    (export_dir / "export.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="not a plain tensor file; refusing to unpickle it"):
        load_exported(export_dir)
    assert not marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_loading_an_export_keeps_freed_memory_for_reuse(vocab_export) -> None:
    """load_exported sets glibc to keep freed memory, as training does: a block freed and allocated again is
    not page-faulted again (each batch's activations, otherwise faulted afresh); keep_freed_memory=False
    leaves glibc's defaults (64 MiB unmapped on free: 16k fresh pages each time)."""
    setup = (
        "from pipeline.serving.export import load_exported\n"
        "load_exported(sys.argv[1], keep_freed_memory=sys.argv[2] == 'keep')"
    )
    keep = reallocation_faults(setup, str(vocab_export), "keep")
    default = reallocation_faults(setup, str(vocab_export), "default")
    assert max(keep[-3:]) < 1000, keep
    assert min(default[-3:]) > 10_000, default
