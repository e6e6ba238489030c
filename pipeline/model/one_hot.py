"""One-hot lookups as row gathers straight from the tables' weights: evaluation on one CPU rank, and serving.

When every bag holds one id, pooling (sum or mean) returns that id's row, so a lookup is a gather.
FBGEMM's CPU kernel behind the sharded collection (``split_embedding_codegen_forward_cpu``,
fbgemm-gpu-cpu 1.8.0) runs on one core whatever the thread count (its CPU time equals its wall time,
measured here): about 10 ms of a 36 ms evaluation batch of 2048 rows on 2 cores, where ``index_select``
over the same weights uses every core and takes about 4 ms. The rows land in one buffer kept for the
whole pass, so no batch allocates the kernel's 27 MB output (a fresh one was page-faulted in about a
third of a first pass's batches, at about 100 ms each). ``ExportedModel.logits`` gathers the unsharded
export's rows with a :class:`RowGather` of its own per call (int8 row-wise tables: ``Int8RowGather``).

The gathered rows are the rows the kernels pool, and the dense part reads them as [B, F, D] (a view of
the table-major buffer): the logits are bit for bit those of the collection's path. In float32 without
gradients, the dot interaction has :meth:`RowGather.into` write them slice by slice straight into its
stacked vectors instead (``DLRM.forward_gathered``), the same logits without the batch-sized buffer.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def whole_local_tables(collection: nn.Module, feature_names: list[str]) -> list[torch.Tensor] | None:
    """Each feature's table ``t_<feature>`` as this rank holds it, in ``feature_names`` order: views of the
    weights the kernels train, when every one is a float32 [rows, D] held whole here (one rank, or
    replicated) with one width D; else None (a table sharded over ranks, by rows or by columns, or another
    layout).

    ``collection``: an ``EmbeddingBagCollection`` or TorchRec's sharded one.
    """
    state = collection.state_dict(keep_vars=True)
    tables = []
    for name in feature_names:
        weight = state.get(f"embedding_bags.t_{name}.weight")
        if weight is None:
            return None
        if hasattr(weight, "local_shards"):  # ShardedTensor: whole only as one local shard at the origin
            shards = weight.local_shards()
            if len(shards) != 1 or list(shards[0].metadata.shard_sizes) != list(weight.size()):
                return None
            weight = shards[0].tensor
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        tables.append(weight.detach())
    if not tables or len({t.shape[1] for t in tables}) != 1:
        return None
    return tables


def one_hot_ids(kjt: KeyedJaggedTensor, feature_names: list[str]) -> torch.Tensor | None:
    """The ids [F, B] (int64) of ``feature_names`` when every bag of the batch holds exactly one id and carries
    no weight; else None."""
    if kjt.weights_or_none() is not None or kjt.variable_stride_per_key():
        return None
    keys, batch = kjt.keys(), kjt.stride()
    values = kjt.values()
    if values.numel() != len(keys) * batch or not bool((kjt.lengths() == 1).all()):
        return None
    ids = values.view(len(keys), batch)
    if keys != feature_names:
        position = {k: i for i, k in enumerate(keys)}
        if sorted(keys) != sorted(feature_names):
            return None
        ids = ids[[position[n] for n in feature_names]]
    return ids.long()


class RowGather:
    """Rows ``tables[f][ids[f]]`` as [B, F, D]: a view of a table-major [F, B, D] buffer, each table's rows
    written into one contiguous slice (no concatenation). The buffer is kept for the next call (a later
    batch as large or smaller writes into it). ``width`` and ``dtype``: of a row as the dense part reads it
    (default: the tables' own); subclasses turn stored rows into those in :meth:`_rows`."""

    def __init__(self, tables: list[torch.Tensor], width: int | None = None, dtype: torch.dtype | None = None) -> None:
        self.tables = tables
        self.width = tables[0].shape[1] if width is None else width
        self.dtype = tables[0].dtype if dtype is None else dtype
        self._buffer: torch.Tensor | None = None

    def _rows(self, table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(table, 0, ids, out=out)

    def into(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``tables[f][ids[f]]`` into ``out[:, f]`` (``out``: [B, F, D], any strides with rows of D
        contiguous, e.g. slots of a stacked [B, N, D] buffer)."""
        if ids.shape[0] != len(self.tables) or out.shape[:2] != (ids.shape[1], len(self.tables)):
            raise ValueError(f"ids {tuple(ids.shape)} and out {tuple(out.shape)} for {len(self.tables)} tables")
        for f, table in enumerate(self.tables):
            self._rows(table, ids[f], out[:, f])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        num_features, batch = ids.shape
        if num_features != len(self.tables):
            raise ValueError(f"ids for {num_features} features, {len(self.tables)} tables")
        if self._buffer is None or self._buffer.shape[1] < batch:
            self._buffer = torch.empty(num_features, batch, self.width, dtype=self.dtype, device=self.tables[0].device)
        out = self._buffer[:, :batch]
        for f, table in enumerate(self.tables):
            self._rows(table, ids[f], out[f])
        return out.transpose(0, 1)
