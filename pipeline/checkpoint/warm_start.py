"""Warm start (``trainer.init_from``): a new run that starts from a trained model's weights.

Unlike resuming, nothing of the old run's position comes along: the step, the data order, the learning-rate
schedule and the RNG start fresh on this run's data; the optimizer state only with ``trainer.init_optimizer``.
The tables may have more rows than the checkpoint's (the vocabulary grew, ``data.vocab_from``): each saved
table fills its first rows (and their optimizer state), the rows past it keep their initial values. Tables
never shrink, and every other shape must match.

An id must own the same row in both runs: in vocab mode the checkpoint names the vocabulary it was trained on
(its digest), which must be this data's or one this data's vocabulary grew from, with the checkpoint's table
sizes; in hash mode the tables must be the same size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.tensor import DTensor

from pipeline.checkpoint.manager import META, _shapes, find_checkpoint, read_meta
from pipeline.checkpoint.safe_load import flatten, load_tensors, plain_state
from pipeline.data.manifest import Manifest
from pipeline.errors import WarmStartError

_TABLE_SEGMENTS = (".embedding_bags.", ".embeddings.")  # TorchRec's collections: where table entries live


def resolve_init(init_from: str) -> Path:
    """``trainer.init_from`` -> one checkpoint: a step folder as given; a checkpoints folder's best (the model
    its run reported and exported), else its latest; a run folder's ``checkpoints/`` the same way."""
    found = find_checkpoint(init_from, "best")
    if found is None:
        raise WarmStartError(
            f"trainer.init_from={init_from}: no checkpoint there (expected a run folder, its checkpoints folder, or "
            f"a step_<N> folder with {META})"
        )
    return found


def data_identity(manifest: Manifest, table_rows: list[int]) -> dict:
    """What a checkpoint records of its data, for a warm start to check its rows against."""
    return {"id_mode": manifest.id_mode, "vocab_sha256": manifest.vocab_sha256, "table_rows": list(table_rows)}


def check_rows_line_up(path: Path, meta: dict, manifest: Manifest, processed_dir: str, table_rows: list[int]) -> None:
    """Fail unless every id owns the same row in the checkpoint's tables and in this run's (see the module).

    Raises:
        WarmStartError: naming what differs and how to make the data line up.
    """
    saved = meta.get("data")
    if saved is None:  # a checkpoint written before checkpoints recorded their data: sizes only
        return
    if saved["id_mode"] != manifest.id_mode:
        raise WarmStartError(
            f"trainer.init_from: {path} was trained on data.id_mode={saved['id_mode']} ids, this data has "
            f"{manifest.id_mode} ids: the rows would not line up"
        )
    if manifest.id_mode != "vocab":
        if saved["table_rows"] != list(table_rows):
            raise WarmStartError(
                f"trainer.init_from: {path} has tables of {saved['table_rows']} rows, this data {list(table_rows)}: "
                "hashed ids own their rows only at the same sizes (set data.max_ids_per_feature or "
                "data.num_embeddings_per_feature to the checkpoint's)"
            )
        return
    if saved["vocab_sha256"] == manifest.vocab_sha256:
        return
    line = manifest.vocab_generations or []
    match = next((g for g in line if g["vocab_sha256"] == saved["vocab_sha256"]), None)
    if match is None:
        origin = meta.get("config", {}).get("data", {}).get("processed_dir", "<its processed folder>")
        raise WarmStartError(
            f"trainer.init_from: {path} was trained on another vocabulary than {processed_dir}'s, or one it did "
            f"not grow from: grow this data's vocabulary from it with data.vocab_from={origin}"
        )
    if match["rows"] != saved["table_rows"]:
        raise WarmStartError(
            f"trainer.init_from: {path} has tables of {saved['table_rows']} rows, but the vocabulary of "
            f"{processed_dir} grew from {match['rows']} of them: train day N and grow day N+1 with the same "
            "data.min_id_frequency"
        )


def load_grown(path: Path, state: dict[str, Any], load_optimizer: bool, tables_only: bool = False) -> dict:
    """Load checkpoint ``path`` into ``state`` (``app_state``; the optimizer's part only with ``load_optimizer``)
    where tables may have grown: a table's saved rows fill its first rows in place, on any sharding; returns its
    meta.json. ``tables_only``: the tables' entries alone (fresh tables of a later epoch start from them again).

    Raises:
        WarmStartError: a shape differs other than a table's rows growing, or an entry is missing (named).
    """
    meta = read_meta(path)
    saved = meta["shapes"]
    target = state if load_optimizer else {"model": state["model"]}
    plain = plain_state(target)
    flat: dict[str, Any] = {}
    flatten("", plain, flat)
    if tables_only:
        flat = {k: v for k, v in flat.items() if _is_table(k)}
    ours = {k: v for k, v in _shapes(target).items() if k in flat}
    problems = []
    for key, shape in ours.items():
        if key not in saved:
            problems.append(f"  not in checkpoint  {key}")
        elif saved[key] != shape and not _grown(key, saved[key], shape):
            problems.append(f"  shape differs  {key}: checkpoint {saved[key]} vs model {shape}")
    if problems:
        raise WarmStartError(
            f"trainer.init_from: {path} does not fit this model (only tables may grow, by rows):\n"
            + "\n".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    clipped = {k: _first_rows(v, saved[k][0]) if saved[k] != ours[k] else v for k, v in flat.items()}
    load_tensors(path, clipped)
    for name, part in target.items():  # the loaded values are in the live tensors; hand them to their owners
        part.load_state_dict(plain[name])
    return meta


def _is_table(key: str) -> bool:
    return any(s in f".{key}" for s in _TABLE_SEGMENTS)


def _grown(key: str, saved: list[int], ours: list[int]) -> bool:
    """A table entry (weights, or their optimizer state) with more rows here than saved, and the same otherwise."""
    return _is_table(key) and len(saved) == len(ours) >= 1 and saved[0] <= ours[0] and saved[1:] == ours[1:]


def _first_rows(tensor: Any, rows: int) -> Any:
    """A view of ``tensor``'s first ``rows`` rows that loading writes through: a plain tensor's narrow, or a
    ShardedTensor of the smaller size over the parts of this rank's shards that fall in those rows."""
    if isinstance(tensor, ShardedTensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            meta = tensor.metadata()
            shards = [_clip(m, rows) for m in meta.shards_metadata]
            local = [
                Shard(s.tensor.narrow(0, 0, clip.shard_sizes[0]), clip)
                for s in tensor.local_shards()
                if (clip := _clip(s.metadata, rows)) is not None
            ]
            size = torch.Size([rows, *meta.size[1:]])
            global_meta = type(meta)([m for m in shards if m is not None], size, meta.tensor_properties)
            return ShardedTensor._init_from_local_shards_and_global_metadata(  # noqa: SLF001 - no collective
                local,
                global_meta,
                process_group=tensor._process_group,  # noqa: SLF001
            )
    if isinstance(tensor, torch.Tensor) and not isinstance(tensor, DTensor):
        return tensor.narrow(0, 0, rows)
    raise WarmStartError(f"a grown table is a {type(tensor).__name__}, which a warm start cannot fill")


def _clip(shard: ShardMetadata, rows: int) -> ShardMetadata | None:
    """The part of ``shard`` within the first ``rows`` rows, or None when it has none."""
    start, size = shard.shard_offsets[0], shard.shard_sizes[0]
    keep = min(size, rows - start)
    if keep <= 0:
        return None
    return ShardMetadata([start, *shard.shard_offsets[1:]], [keep, *shard.shard_sizes[1:]], shard.placement)
