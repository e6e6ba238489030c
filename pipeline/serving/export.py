"""Export a trained checkpoint as a plain, unsharded model that loads without ``torch.distributed``.

    ./launch.sh export <run dir | checkpoints dir | step_<N> dir> --out <dir>

builds the training model unsharded (TorchRec's ``DLRM`` with a plain ``EmbeddingBagCollection`` on
the CPU, from the resolved config in the checkpoint's ``meta.json``), loads the DCP checkpoint into
it in one process (DCP reassembles table-, row- and column-wise shards into whole tables; no process
group is created), and writes::

    <out>/
      model.safetensors | model.pt   the DLRM's state_dict as plain tensors (safetensors when installed,
                                     else a torch.save dict of tensors: torch.load(weights_only=True));
                                     ``--quantize int8``: tables int8 row-wise as ``<table>.weight_int8_rowwise``
      vocab.npz                      id_mode=vocab: the raw hashes that own a table row (a copy of the
                                     data's vocab.npz, sha256-checked)
      dense_interaction.pt2          torch.export program of the dense part (bottom MLP, interaction,
                                     top MLP): (dense [B, num_dense], pooled embeddings [B, tables, D])
                                     -> logits [B, 1] (Criteo: [B, 13] and [B, 26, D])
      export.json                    written last: model config, the training precision (predict's
                                     default), the data's column schema (dense and
                                     sparse columns, feature names = KJT keys, categorical format),
                                     table sizes, weights file and sha256, and all that turns a raw row
                                     into model input (dense transform and, for the torchrec transform,
                                     the file minimums preprocessing used; id mode, caps, reserved ids,
                                     vocab file)

:func:`load_exported` loads it back as an :class:`ExportedModel` (``pipeline.serving.predict`` uses it). The
optimizer state in the checkpoint is not exported.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.config import DenseTransform, IdMode, ModelConfig
from pipeline.data.features import FeatureTransform
from pipeline.data.jagged import Lists
from pipeline.data.schema import CRITEO, Schema
from pipeline.errors import ExportError
from pipeline.logs import setup_logging
from pipeline.model.one_hot import RowGather, whole_local_tables
from pipeline.serving.int8 import (  # noqa: F401 - INT8_KEY: export.json
    INT8_KEY,
    Int8RowGather,
    int8_tables,
    quantize_tables,
    use_int8_tables,
)
from pipeline.tools.doctor import native_bf16

logger = logging.getLogger(__name__)

EXPORT_JSON = "export.json"
FORMAT_VERSION = 3  # 3: int8 row-wise tables (weights.table_format); 2: the column schema; 1: Criteo's layout
TABLE_FORMATS = ("float32", "int8_rowwise")
PRECISIONS = ("fp32", "bf16")  # load_exported(precision=...): the dense part's arithmetic when scoring
WEIGHTS_TORCH = "model.pt"
WEIGHTS_SAFETENSORS = "model.safetensors"
VOCAB = "vocab.npz"
PROGRAM = "dense_interaction.pt2"
# A checkpoint's model entries are "model." + the DMP's state_dict keys, which are "model." (DLRMTrain
# wraps DLRM as .model) + the DLRM's own keys.
CHECKPOINT_PREFIX = "model.model."
ROOT = Path(__file__).resolve().parents[2]  # a checkout's root: relative data paths of a run started there


# -- the model ------------------------------------------------------------------------------------
def build_dlrm(
    model_cfg: dict | ModelConfig,
    num_embeddings_per_feature: list[int],
    feature_names: list[str] | None = None,
    num_dense_features: int | None = None,
    weighted: bool = False,
) -> torch.nn.Module:
    """The training architecture (``pipeline.model.dlrm.build_model``) as a plain CPU module, without
    the loss wrapper; table weights are allocated but not initialised (a checkpoint fills them).

    ``feature_names`` (one per entry of ``num_embeddings_per_feature``) and ``num_dense_features`` are
    the data's (manifest or export.json); None = Criteo's. The pooling (``model.pooling``,
    ``model.table_pooling``) comes with ``model_cfg``; ``weighted``: the data has weighted columns
    (``bool(schema.weighted)``), so the tables take a weight per id as in training."""
    from pipeline.model.dlrm import build_model

    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig(**model_cfg)
    dlrm = build_model(
        cfg,
        list(num_embeddings_per_feature),  # tables on the meta device, MLPs on CPU
        feature_names=list(feature_names if feature_names is not None else CRITEO.feature_names),
        num_dense_features=CRITEO.num_dense if num_dense_features is None else num_dense_features,
        weighted=weighted,
    ).model
    ebc = dlrm.sparse_arch.embedding_bag_collection
    ebc.to_empty(device=torch.device("cpu"))  # no random init of tables about to be overwritten
    ebc._device = torch.device("cpu")  # noqa: SLF001 - EBC records its construction device (meta)
    return dlrm.eval()


# -- finding and reading a checkpoint ---------------------------------------------------------------
def find_checkpoint(path: str | Path, which: str = "best") -> storage.Location:
    """:func:`pipeline.checkpoint.find_checkpoint`, or ExportError naming the places looked at.

    Raises:
        ExportError: nothing there is a complete checkpoint, or the store cannot be read.
    """
    from pipeline import checkpoint as ckpt

    path = storage.location(path)
    try:
        found = ckpt.find_checkpoint(path, which)
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        if isinstance(path, Path):
            raise
        raise ExportError(f"cannot read {storage.display(path)} ({storage.describe_error(e)})") from None
    if found is None:
        raise ExportError(
            f"no checkpoint at {storage.display(path)}: expected a step_<N> folder ({ckpt.META} + .metadata), a "
            f"checkpoints folder with '{ckpt.LATEST}', or a run folder with checkpoints/{ckpt.LATEST}"
        )
    return found


def read_weights(path: storage.Location, meta: dict, dlrm: torch.nn.Module) -> None:
    """Load the model entries of DCP checkpoint ``path`` into ``dlrm`` in place, in this process only.

    Raises:
        ExportError: an entry is missing, of another shape, or not a tensor.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline.checkpoint import CheckpointError, load_tensors
    from pipeline.checkpoint.safe_load import safe_reader

    own = dlrm.state_dict()
    try:
        saved = safe_reader(path).read_metadata().state_dict_metadata
    except OSError as e:
        if isinstance(path, Path):
            raise
        raise ExportError(f"cannot read checkpoint {storage.display(path)} ({storage.describe_error(e)})") from None
    problems = []
    for key, tensor in own.items():
        entry = saved.get(CHECKPOINT_PREFIX + key)
        if entry is None:
            problems.append(f"  not in checkpoint  {CHECKPOINT_PREFIX + key}")
        elif not isinstance(entry, TensorStorageMetadata):
            problems.append(f"  not a tensor (refusing to unpickle it)  {CHECKPOINT_PREFIX + key}")
        elif list(entry.size) != list(tensor.shape):
            problems.append(f"  shape differs  {key}: checkpoint {list(entry.size)} vs model {list(tensor.shape)}")
    extra = sorted(
        k for k in meta.get("shapes", {}) if k.startswith("model.") and k[len(CHECKPOINT_PREFIX) :] not in own
    )
    problems += [f"  not in the model  {k}" for k in extra]
    if problems:
        raise ExportError(
            f"checkpoint {path} does not fit the model its config describes:\n" + "\n".join(problems[:40])
        )
    target = {CHECKPOINT_PREFIX + k: v for k, v in own.items()}
    try:
        load_tensors(path, target, no_dist=True)  # in place, no process group
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    dlrm.load_state_dict({k: target[CHECKPOINT_PREFIX + k] for k in own}, strict=True)


# -- the input side -------------------------------------------------------------------------------
def _resolve_dir(path: str) -> Path:
    """A config path as the training job saw it (relative to the launch folder, usually the repo root)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _dense_mins(processed: Path) -> list[dict]:
    """Per preprocessed part: its source file, the splits it fed, and the file minimum used by the
    torchrec dense transform (``dense_min`` in parts/<NNN>/done.json)."""
    out = []
    for done in sorted((processed / "parts").glob("*/done.json")):
        record = json.loads(done.read_text())
        out.append(
            {
                "source": record["source"]["path"],
                "splits": [s for s, v in record["splits"].items() if v["num_rows"] > 0],
                "dense_min": record.get("dense_min"),
            }
        )
    return out


def _differ(sizes: list[int], table_sizes: dict[str, int], feature_names: tuple[str, ...]) -> bool:
    """True when a feature with a table in the checkpoint has another size in ``sizes``."""
    return len(sizes) != len(feature_names) or any(
        f in table_sizes and table_sizes[f] != n for f, n in zip(feature_names, sizes, strict=True)
    )


def bag_schema(schema: Schema, sizes: list[int]) -> Schema:
    """The layout of materialised data: every column of the one-hot ``schema`` a bag of its size."""
    return dataclasses.replace(schema, multi_hot=tuple(zip(schema.sparse_columns, sizes, strict=True)), weighted=())


def input_spec(data: dict, processed: Path | None, table_sizes: dict[str, int]) -> tuple[dict, list[int]]:
    """How a raw row becomes model input, as preprocessing did it (export copies the vocab.npz it names).

    Args:
        data: the checkpoint's resolved data config.
        table_sizes: feature name -> rows of its table in the checkpoint (matrix factorisation has tables
            for two of the data's features only).

    Returns:
        The input spec, and the table size of every sparse feature of the data (the id mapping's).

    Raises:
        ExportError: vocab mode without the data's vocab.npz, or a vocabulary/manifest that does not
            match the checkpoint's table sizes.
    """
    from pipeline.data import features as ft
    from pipeline.data.manifest import Manifest
    from pipeline.data.vocab import load_vocab

    schema = Schema.from_dict(data)
    transform = DenseTransform(data["dense_transform"])
    id_mode = IdMode(data["id_mode"])
    min_frequency = data.get("min_id_frequency", 1) if id_mode == IdMode.vocab else 1
    held = [table_sizes.get(f) for f in schema.feature_names]  # for messages: None = no table
    manifest = Manifest.read(processed) if processed is not None else None
    have_data = manifest is not None
    manifest_sizes = None
    bags = data.get("materialize")
    if bags:  # the data's bags were made from one-hot rows (data.materialize): raw rows are one-hot
        if not have_data:
            raise ExportError(
                f"data.materialize needs the data's manifest (looked in {processed}): pass --processed-dir "
                "<the data.processed_dir the model was trained on>"
            )
    if have_data:
        expected = bag_schema(schema, bags["sizes"]) if bags else schema
        if manifest.schema != expected:
            raise ExportError(
                f"{processed / 'manifest.json'} records the columns {manifest.schema.to_dict()}, "
                f"the checkpoint's config declares {schema.to_dict()}: the data was preprocessed again "
                "with other settings since training (use --processed-dir to point at the data the "
                "model was trained on)"
            )
        manifest_sizes = ft.table_sizes(manifest, processed, min_frequency)
        if _differ(manifest_sizes, table_sizes, schema.feature_names):
            raise ExportError(
                f"{processed / 'manifest.json'} gives table sizes {manifest_sizes} (with "
                f"data.min_id_frequency={min_frequency}), the checkpoint holds {held}: the data "
                "was preprocessed again with other settings since training (use --processed-dir to "
                "point at the data the model was trained on)"
            )
    spec: dict[str, Any] = {
        "layout": schema.describe(),
        "dense_transform": transform.value,
        "dense_transform_formula": ft.DENSE_TRANSFORMS[transform],
        "id_mode": id_mode.value,
        "caps": None,
        "min_id_frequency": min_frequency,
        "reserved_ids": {
            "missing": ft.MISSING_ID,
            **({"rare_or_unseen": ft.RARE_ID} if id_mode == IdMode.vocab else {}),
        },
        "hash_formula": "1 + hash % (cap - 1)" if id_mode == IdMode.hash else None,
        "vocab": None,
        "dense_min": None,
        "materialize": None,
    }
    if bags:
        spec["materialize"] = {
            "sizes": list(bags["sizes"]),
            "seed": bags["seed"],
            "distribution": bags["distribution"],
            "num_embeddings": list(manifest.num_embeddings_per_feature),  # what the bags were drawn over
            "rule": manifest.settings["materialize"]["rule"],
        }
    if transform == DenseTransform.torchrec:
        parts = _dense_mins(processed) if have_data else []
        train = [p["dense_min"] for p in parts if "train" in p["splits"] and p["dense_min"] is not None]
        spec["dense_min"] = {"train": min(train) if train else None, "parts": parts}
        if not train:
            logger.warning(
                "dense_transform=torchrec but the training file minimum is unknown (no %s): predict "
                "will need --dense-min input or an integer",
                processed / "parts" if processed else "data",
            )
    if id_mode == IdMode.hash:
        caps = _hash_caps(data, manifest_sizes, len(schema.feature_names))
        if caps is None:
            raise ExportError(
                "id_mode=hash with caps chosen from the data (data.max_ids_per_feature=null) needs the "
                f"data's manifest (looked in {processed}): pass --processed-dir <the data.processed_dir "
                "the model was trained on>"
            )
        spec["caps"] = caps
        if bags:
            return spec, list(manifest_sizes)
        if _differ(spec["caps"], table_sizes, schema.feature_names):
            raise ExportError(f"id_mode=hash caps {spec['caps']} differ from the checkpoint's table sizes {held}")
        return spec, list(spec["caps"])
    if not have_data or not (processed / VOCAB).is_file():
        raise ExportError(
            f"id_mode=vocab needs the data's {VOCAB} (looked in {processed}): pass --processed-dir "
            "<the data.processed_dir the model was trained on>"
        )
    src = processed / VOCAB
    marker = processed / "vocab.json"
    digest = _sha256(src)
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") != digest:
        raise ExportError(f"{src} does not match the sha256 in {marker}: the vocabulary is damaged")
    # With bags, every value's own id: the bags are drawn from it, then folded by the tables' sizes.
    vocab_min = 1 if bags else min_frequency
    vocab = load_vocab(processed, schema.num_sparse, vocab_min)
    vocab_sizes = [len(v) + 2 for v in vocab]
    if bags:  # the whole vocabulary (the bags' source ids); the tables' sizes fold the rare ones
        vocab_sizes = list(manifest_sizes)
    elif _differ(vocab_sizes, table_sizes, schema.feature_names):
        raise ExportError(f"{src} gives table sizes {vocab_sizes}, the checkpoint holds {held}")
    # The export's copy holds the values that own a row under data.min_id_frequency (the rest read as rare).
    spec["vocab"] = {
        "file": VOCAB,
        "source": str(src),
        "source_sha256": digest,
        "min_id_frequency": vocab_min,
        "arrays": vocab,
    }
    return spec, vocab_sizes


def _hash_caps(data: dict, manifest_sizes: list[int] | None, num_sparse: int) -> list[int] | None:
    """Hash mode's per-column caps: the config's, else (chosen from the data) the manifest's table sizes."""
    if data.get("num_embeddings_per_feature"):
        return list(data["num_embeddings_per_feature"])
    if data.get("max_ids_per_feature") is not None:
        return [data["max_ids_per_feature"]] * num_sparse
    return manifest_sizes


# -- torch.export of the dense part ----------------------------------------------------------------
class DenseInteraction(torch.nn.Module):
    """The model after the embedding lookup, its ``forward_pooled``: for DLRM the bottom MLP, the
    optional sparse-feature MLPs, the interaction and the top MLP; for MF the dot product -> logits [B, 1].
    It holds the model's dense submodules only, not the tables."""

    def __init__(self, dlrm: torch.nn.Module) -> None:
        super().__init__()
        self.body = copy.copy(dlrm)  # shallow: shares the dense submodules, drops the tables below
        self.body._modules = {name: dlrm._modules[name] for name in dlrm.dense_modules()}  # noqa: SLF001

    def forward(self, dense_features: torch.Tensor, pooled_embeddings: torch.Tensor) -> torch.Tensor:
        return self.body.forward_pooled(dense_features, pooled_embeddings)


def export_dense_program(dlrm: torch.nn.Module, path: Path, num_dense_features: int = CRITEO.num_dense) -> None:
    """Write a ``torch.export`` program of :class:`DenseInteraction` with a dynamic batch dimension."""
    from torch.export import Dim
    from torch.export import export as torch_export
    from torch.export import save as torch_save_program

    d = dlrm.sparse_arch.D
    module = copy.deepcopy(DenseInteraction(dlrm)).eval()
    for m in module.modules():  # buffers that are views of one storage (triu rows/cols) would be saved shared
        for name, buf in m._buffers.items():  # noqa: SLF001
            if buf is not None:
                m._buffers[name] = buf.clone()  # noqa: SLF001
    num_tables = len(dlrm.sparse_arch.sparse_feature_names)  # matrix factorisation: 2, whatever the data has
    example = (torch.zeros(4, num_dense_features), torch.zeros(4, num_tables, d))
    batch = Dim("batch", min=1)
    program = torch_export(module, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch_save_program(program, str(path))


# -- export ---------------------------------------------------------------------------------------
def _save_tensors(tensors: dict[str, torch.Tensor], out: Path, fmt: str) -> Path:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out / WEIGHTS_SAFETENSORS
        save_file(tensors, str(path))
    else:
        path = out / WEIGHTS_TORCH
        torch.save(tensors, path)
    return path


def _weights_format(requested: str) -> str:
    if requested == "torch":
        return requested
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        if requested == "safetensors":
            raise ExportError("--format safetensors: safetensors is not installed (pip install safetensors)") from None
        return "torch"
    return "safetensors"


def export(
    checkpoint: str | Path,
    out: str | Path,
    processed_dir: str | Path | None = None,
    weights_format: str = "auto",
    dense_program: bool = True,
    quantize: str = "none",
    which: str = "best",
) -> dict:
    """Export the checkpoint at ``checkpoint`` (see :func:`find_checkpoint`) into ``out``; returns export.json.

    Runs in one process and never initialises ``torch.distributed``. ``quantize="int8"`` stores the
    tables int8 row-wise (:func:`quantize_tables`); the dense part stays float32.
    """
    from pipeline.checkpoint import read_meta

    if quantize not in ("none", "int8"):
        raise ExportError(f"quantize={quantize!r}: expected 'none' or 'int8'")
    t0 = time.perf_counter()
    path = find_checkpoint(checkpoint, which)
    try:
        meta = read_meta(path)
    except OSError as e:
        if isinstance(path, Path):
            raise
        raise ExportError(f"cannot read {storage.display(path)}/meta.json ({storage.describe_error(e)})") from None
    cfg = meta.get("config")
    if not cfg:
        raise ExportError(f"{path}/meta.json holds no config: it was written by an older version of the pipeline")
    shapes = meta["shapes"]
    schema = Schema.from_dict(cfg["data"])  # configs saved before columns could be declared: Criteo's
    table_sizes = {}  # feature -> rows; model.name=mf has tables for two of the features only
    for f in schema.feature_names:
        key = f"{CHECKPOINT_PREFIX}sparse_arch.embedding_bag_collection.embedding_bags.t_{f}.weight"
        if key in shapes:
            table_sizes[f] = shapes[key][0]
    if not table_sizes:
        raise ExportError(
            f"checkpoint {path} has none of the tables t_<feature> of the data's features {list(schema.feature_names)}"
        )
    tables = [f"t_{f}" for f in table_sizes]
    target = storage.location(out)
    out = _staging(target)  # an object-store --out is written here, then uploaded
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_JSON).is_file():
        raise ExportError(f"--out {out} exists and is not an earlier export: choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_JSON).unlink(missing_ok=True)  # written last: its presence marks a complete export

    processed_loc = processed_dir or cfg["data"]["processed_dir"]
    if storage.is_remote(processed_loc):
        processed = _local_data(str(processed_loc), None if processed_dir else cfg["data"].get("cache_dir"))
    else:
        processed = Path(processed_dir) if processed_dir else _resolve_dir(cfg["data"]["processed_dir"])
    spec_input, sizes = input_spec(cfg["data"], processed, table_sizes)
    dlrm = build_dlrm(cfg["model"], sizes, list(schema.feature_names), schema.num_dense, bool(schema.weighted))
    read_weights(path, meta, dlrm)

    fmt = _weights_format(weights_format)
    for stale in (WEIGHTS_TORCH, WEIGHTS_SAFETENSORS, PROGRAM) + (() if spec_input["vocab"] else (VOCAB,)):
        (out / stale).unlink(missing_ok=True)
    if spec_input["vocab"]:
        arrays = spec_input["vocab"].pop("arrays")
        np.savez(out / VOCAB, **{f"C{j + 1}": v for j, v in enumerate(arrays)})
        spec_input["vocab"]["sha256"] = _sha256(out / VOCAB)
    state = dlrm.state_dict()
    table_format = "int8_rowwise" if quantize == "int8" else "float32"
    if quantize == "int8":
        state = quantize_tables(state)
    weights = _save_tensors(state, out, fmt)
    program = None
    if dense_program:
        try:
            export_dense_program(dlrm, out / PROGRAM, schema.num_dense)
            program = {
                "file": PROGRAM,
                "inputs": [
                    f"dense_features [B, {schema.num_dense}] float32 (transformed)",
                    f"pooled_embeddings [B, {len(tables)}, {dlrm.sparse_arch.D}] float32 (tables {tables} in order)",
                ],
                "output": "logits [B, 1]",
            }
        except Exception as e:  # noqa: BLE001 - optional artifact
            logger.warning(
                "torch.export of the dense part failed (%s: %s); the export has no %s", type(e).__name__, e, PROGRAM
            )
    import torchrec

    spec = {
        "format_version": FORMAT_VERSION if quantize == "int8" else 2,  # readers of format 2 load float exports
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": {
            "checkpoint": str(path.resolve()) if isinstance(path, Path) else storage.display(path),
            "step": meta["train_state"]["step"],
            "saved_by_world_size": meta["world_size"],
            "saved_at": meta.get("saved_at"),
        },
        "model": dict(cfg["model"]),
        "top_in_features": getattr(dlrm, "top_in_features", None),  # DLRM only (matrix factorisation has no top MLP)
        "tables": tables,
        "schema": schema.to_dict(),
        "feature_names": list(schema.feature_names),  # the KJT keys, one per sparse column
        "num_embeddings_per_feature": sizes,  # per feature (the id mapping's); tables hold those in "tables"
        "weights": {
            "file": weights.name,
            "format": fmt,
            "sha256": _sha256(weights),
            "num_tensors": len(state),
            "dtype": "float32",
            "table_format": table_format,
            "bytes": weights.stat().st_size,
            "parameters": sum(v.numel() for v in dlrm.state_dict().values()),
        },
        "input": spec_input,
        # The dense part's arithmetic in training and evaluation (trainer.precision): predict's default.
        "precision": str(cfg.get("trainer", {}).get("precision", "fp32")),
        "data": {
            "name": cfg["data"].get("name"),
            "processed_dir": storage.display(processed_loc) if storage.is_remote(processed_loc) else str(processed),
            "split": cfg["data"].get("split"),
            "raw_dir": cfg["data"].get("raw_dir"),
            "raw_files": cfg["data"].get("raw_files"),
        },
        "dense_program": program,
        "versions": {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?")},
    }
    tmp = out / (EXPORT_JSON + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, out / EXPORT_JSON)
    if not isinstance(target, Path):
        _upload_export(out, target)
    logger.info(
        "exported %s (step %d, saved by %d rank(s)) -> %s in %.1fs: %s parameters, %s (%s tables, %.1f MiB), "
        "id_mode=%s, dense=%s",
        storage.display(path),
        spec["source"]["step"],
        meta["world_size"],
        storage.display(target),
        time.perf_counter() - t0,
        f"{spec['weights']['parameters']:,}",
        weights.name,
        table_format,
        weights.stat().st_size / 2**20,
        spec_input["id_mode"],
        spec_input["dense_transform"],
    )
    return spec


def _staging(out: storage.Location) -> Path:
    """The local folder an export is written into: ``--out`` itself, or for an object store its local cache."""
    return out if isinstance(out, Path) else storage.cache_path(out)


def _local_data(url: str, cache_dir: str | None) -> Path:
    """The local copy of processed data in an object store (export reads its vocabulary and part records)."""
    from pipeline.data.mirror import local_copy
    from pipeline.errors import DataError

    try:
        return local_copy(url, cache_dir)
    except DataError as e:
        raise ExportError(f"the data the model was trained on: {e}") from None


def _upload_export(local: Path, url: str) -> None:
    """Upload an export folder, ``export.json`` last (the store's old one removed first: a partial upload is no export).

    Raises:
        ExportError: the store cannot be written (after its retries).
    """
    try:
        fs = storage.filesystem(url)
        found = storage.list_files(url)
        if found and EXPORT_JSON not in found:
            raise ExportError(
                f"--out {storage.display(url)} holds files and is not an earlier export: choose a new prefix"
            )
        if EXPORT_JSON in found:
            fs.rm_file(storage.join(url, EXPORT_JSON))
        names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != EXPORT_JSON)
        for name in names:
            storage.upload(local / name, storage.join(url, name))
        for stale in set(found) - set(names) - {EXPORT_JSON}:
            fs.rm_file(storage.join(url, *stale.split("/")))
        storage.upload(local / EXPORT_JSON, storage.join(url, EXPORT_JSON))
    except OSError as e:
        raise ExportError(f"cannot upload the export to {storage.display(url)} ({storage.describe_error(e)})") from None


def _download_export(url: str) -> Path:
    """A local copy of the export at ``url`` (its cache folder), ``export.json`` last; files whose size matches are
    reused, the weights are checked against export.json's sha256.

    Raises:
        ExportError: no export there, the store cannot be read, or the weights do not match.
    """
    local = storage.cache_path(url)
    try:
        found = storage.list_files(url)
        if EXPORT_JSON not in found:
            raise ExportError(f"{storage.display(storage.join(url, EXPORT_JSON))} not found: not an export")
        text = storage.read_text(storage.join(url, EXPORT_JSON))
        local.mkdir(parents=True, exist_ok=True)
        (local / EXPORT_JSON).unlink(missing_ok=True)
        for rel, size in found.items():
            dst = local / rel
            if rel != EXPORT_JSON and not (dst.is_file() and dst.stat().st_size == size):
                storage.download(storage.join(url, *rel.split("/")), dst)
    except OSError as e:
        raise ExportError(f"cannot read the export at {storage.display(url)} ({storage.describe_error(e)})") from None
    weights = json.loads(text)["weights"]
    if _sha256(local / weights["file"]) != weights["sha256"]:
        raise ExportError(f"{storage.display(url)}/{weights['file']} does not match the sha256 in its export.json")
    (local / EXPORT_JSON).write_text(text)
    return local


# -- loading an export ------------------------------------------------------------------------------
@dataclass
class ExportedModel:
    """An exported DLRM on the CPU plus what turns raw rows into its input."""

    dir: Path
    spec: dict
    model: torch.nn.Module  # pipeline.model.dlrm.DLRM (plain TorchRec modules), eval mode
    vocab: list[np.ndarray] | None
    precision: str = "fp32"  # bf16: the dense part under bfloat16 autocast (:data:`PRECISIONS`)

    @property
    def schema(self) -> Schema:
        """The raw column layout the model was trained on (Criteo's for exports without one)."""
        return Schema.from_dict(self.spec.get("schema"))

    @functools.cached_property
    def features(self) -> FeatureTransform:
        """Raw rows -> this model's input, exactly as preprocessing and training mapped them.

        Raises:
            ExportError: the id mapping and the weights disagree on a table's size.
        """
        from pipeline.data.features import NO_CAP, FeatureTransform, IdMapper

        inp = self.spec["input"]
        sizes = self.spec["num_embeddings_per_feature"]
        caps = list(inp["caps"]) if inp.get("caps") else [NO_CAP] * len(sizes)
        mapper = IdMapper(IdMode(inp["id_mode"]), caps, self.vocab, self.schema.multi_index)
        transform = DenseTransform(inp["dense_transform"])
        bags = inp.get("materialize")
        if bags:  # one-hot raw rows, each id made into its bag as the training data's were
            from pipeline.data.materialize import BagRule

            if mapper.num_embeddings != bags["num_embeddings"]:
                raise ExportError(
                    f"{self.dir}: the id mapping gives {mapper.num_embeddings} ids per table, the bags were drawn "
                    f"over {bags['num_embeddings']}"
                )
            rule = BagRule(tuple(bags["sizes"]), tuple(bags["num_embeddings"]), bags["seed"])
            return FeatureTransform(bag_schema(self.schema, bags["sizes"]), transform, sizes, mapper, rule)
        if mapper.num_embeddings != sizes:
            raise ExportError(
                f"{self.dir}: the id mapping gives table sizes {mapper.num_embeddings}, the weights hold {sizes}"
            )
        return FeatureTransform(self.schema, transform, sizes, mapper)

    @functools.cached_property
    def one_hot_tables(self) -> list[tuple[int, torch.Tensor]] | None:
        """(id column, table) per feature in the order the model pools them, when every feature is one id of
        an unweighted table of one width, float32 or int8 row-wise; else None.

        A bag of one id pools to that id's row under sum and mean alike, so the lookup is then a row gather,
        written straight into the [B, F, D] the dense part reads: no KJT, no per-bag offsets, and no copy
        concatenating the tables' outputs (:meth:`logits`)."""
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        arch = getattr(self.model, "sparse_arch", None)
        ebc = getattr(arch, "embedding_bag_collection", None)
        schema = self.features.schema
        if ebc is None or schema.multi_hot or schema.weighted:
            return None
        column = {name: j for j, name in enumerate(schema.feature_names)}
        names = list(arch.sparse_feature_names)
        if sorted(names) != sorted(column):
            return None
        if type(ebc) is EmbeddingBagCollection:
            tables = whole_local_tables(ebc, names)
            width = None if tables is None else tables[0].shape[1]
        else:
            tables = int8_tables(ebc, names)
            width = None if tables is None else tables[0].shape[1] - 8
        if width != arch.D:
            return None
        return [(column[name], table) for name, table in zip(names, tables, strict=True)]

    @torch.inference_mode()
    def logits(
        self, dense: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor, lists: Lists | tuple | None = None
    ) -> torch.Tensor:
        """Logits [B] of transformed dense features [B, num_dense] float32, one-hot table row ids
        [B, num_one_hot] and the list columns' row ids (:meth:`FeatureTransform.kjt`'s ``lists``)."""
        dense = torch.as_tensor(
            np.ascontiguousarray(dense) if isinstance(dense, np.ndarray) else dense, dtype=torch.float32
        )
        tables = self.one_hot_tables
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if tables is not None and lists is None:
                # A gather per call (no buffer shared between callers' threads).
                columns = [j for j, _ in tables]
                idx = torch.from_numpy(np.ascontiguousarray(np.asarray(ids)[:, columns].T, dtype=np.int64))
                weights = [table for _, table in tables]
                gather = Int8RowGather(weights) if weights[0].dtype == torch.uint8 else RowGather(weights)
                logits = self.model.forward_gathered(dense, idx, gather)
            else:
                kjt = self.features.kjt(np.asarray(ids), lists)
                logits = self.model(dense_features=dense, sparse_features=kjt)
        return logits.float().flatten()

    def predict(
        self, dense: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor, lists: Lists | tuple | None = None
    ) -> np.ndarray:
        """Click probabilities [B] float32 (sigmoid of :meth:`logits`, as the trainer's evaluation)."""
        return torch.sigmoid(self.logits(dense, ids, lists).float()).numpy()


def _load_tensors(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ExportError(
                f"{path} is safetensors, which is not installed here: pip install safetensors, or "
                "export again with --format torch"
            ) from None
        return load_file(str(path))
    # Memory-mapped: pages are read as rows are looked up, and the parameters use them in place (assign=True).
    from pipeline.checkpoint.safe_load import load_tensor_file

    return load_tensor_file(path, ExportError, map_location="cpu", mmap=True)


def load_exported(
    export_dir: str | Path, precision: str | None = None, keep_freed_memory: bool = True
) -> ExportedModel:
    """Load an export written by :func:`export` (CPU, one process, no ``torch.distributed``).

    ``precision="bf16"`` scores with the dense part (MLPs, interaction) under bfloat16 autocast; the lookups
    and the output stay float32. Fast where the CPU has AMX or AVX-512 BF16; elsewhere it is emulated.
    None: the precision the model was trained and evaluated in (``trainer.precision``, recorded at export;
    fp32 for exports without it), so predict scores as the trainer's evaluation did.

    ``keep_freed_memory``: make this process's glibc keep freed memory for reuse, as training does
    (``pipeline.distributed.env.keep_freed_memory``; process-wide, not undone). With glibc's defaults a
    batch's activations may be page-faulted afresh, depending on what the process freed before (glibc's
    mmap threshold moves with it): float32 scoring at batch 8192 ran about 1.3x slower
    (``benchmarks/README.md``, "Serving and the allocator"). False leaves the allocator as it is.

    Raises:
        ExportError: not an export, a newer format, files that do not match export.json, or an unknown
            ``precision``.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: expected one of {PRECISIONS}")
    d = _download_export(str(export_dir)) if storage.is_remote(export_dir) else Path(export_dir)
    path = d / EXPORT_JSON
    if not path.is_file():
        raise ExportError(f"{path} not found: not an export folder (./launch.sh export <run dir> --out {d})")
    spec = json.loads(path.read_text())
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} is export format {spec['format_version']}; this code reads up to {FORMAT_VERSION}")
    if precision is None:
        precision = spec.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ExportError(f"{path}: precision {precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" and native_bf16() is False:
        logger.warning(
            "precision bf16: this CPU has neither AVX-512 BF16 nor AMX, so bfloat16 is emulated and scores "
            "slower than fp32 (predict --precision fp32 scores in fp32)"
        )
    if keep_freed_memory:
        from pipeline.distributed.env import keep_freed_memory as keep

        keep()
    w = spec["weights"]
    tensors = _load_tensors(d / w["file"], w["format"])
    schema = Schema.from_dict(spec.get("schema"))
    dlrm = build_dlrm(
        spec["model"],
        spec["num_embeddings_per_feature"],
        list(schema.feature_names),
        schema.num_dense,
        bool(schema.weighted),
    )
    table_format = w.get("table_format", "float32")
    if table_format not in TABLE_FORMATS:
        raise ExportError(f"{path}: weights.table_format {table_format!r} is not one of {TABLE_FORMATS}")
    if table_format == "int8_rowwise":
        use_int8_tables(dlrm)
    try:
        dlrm.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"{d / w['file']} does not fit the model in {path}: {e}") from None
    vocab = None
    if spec["input"]["vocab"] is not None:
        vpath = d / spec["input"]["vocab"]["file"]
        with np.load(vpath) as z:  # allow_pickle=False: plain arrays only
            vocab = [z[f"C{j + 1}"] for j in range(schema.num_sparse)]
    return ExportedModel(d, spec, dlrm.eval(), vocab, precision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./launch.sh export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run folder, its checkpoints folder, or one step_<N>")
    parser.add_argument(
        "--checkpoint",
        dest="which",
        choices=("best", "latest"),
        default="best",
        help="in a run or checkpoints folder: the best checkpoint (the run's final metrics came from "
        "it; default) or the latest",
    )
    parser.add_argument("--out", required=True, help="export folder (new, empty, or an earlier export)")
    parser.add_argument(
        "--processed-dir",
        default=None,
        help="the preprocessed data the model was trained on (default: data.processed_dir from the "
        "checkpoint's config); needed for vocab.npz and the torchrec transform's file minimums",
    )
    parser.add_argument(
        "--format",
        choices=("auto", "safetensors", "torch"),
        default="auto",
        help="weights file: safetensors when installed (auto), else a torch.save dict of tensors",
    )
    parser.add_argument("--no-dense-program", action="store_true", help=f"skip the torch.export program ({PROGRAM})")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: tables stored int8 row-wise (a quarter of the size; the dense part stays float32)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export(
            args.checkpoint,
            args.out,
            args.processed_dir,
            args.format,
            not args.no_dense_program,
            args.quantize,
            which=args.which,
        )
    except ExportError as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
