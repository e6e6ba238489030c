"""Int8 row-wise tables for serving: PyTorch's fused 8-bit format (per row the uint8 codes plus an fp32
scale and bias: 136 bytes instead of 512 at dimension 128) and its quantized CPU lookup kernel."""

from __future__ import annotations

import torch

from pipeline.errors import ExportError
from pipeline.model.one_hot import RowGather

INT8_KEY = "weight_int8_rowwise"  # <table>.weight_int8_rowwise replaces <table>.weight in an int8 export


def _is_table_weight(key: str) -> bool:
    return ".embedding_bags." in key and key.endswith(".weight")


def quantize_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every table weight [rows, D] -> int8 row-wise [rows, D + 8] (PyTorch's fused 8-bit format: per row
    the uint8 codes, then its fp32 scale and bias), under ``<table>.weight_int8_rowwise``; the dense
    part's tensors are kept as they are."""
    out = {}
    for key, value in state.items():
        if _is_table_weight(key):
            out[key[: -len("weight")] + INT8_KEY] = torch.ops.quantized.embedding_bag_byte_prepack(
                value.detach().float().contiguous()
            )
        else:
            out[key] = value
    return out


class Int8EmbeddingBagCollection(torch.nn.Module):
    """An ``EmbeddingBagCollection``'s lookups from int8 row-wise tables, with PyTorch's quantized CPU
    kernel ``embedding_bag_byte_rowwise_offsets``: the same KeyedTensor out, a quarter of the table
    memory. Pooled as the float collection: sum, or mean (the weighted sum over the number of ids, as
    FBGEMM's kernels; zeros for an empty bag), with the ids' weights when it is weighted. State dict
    keys: ``embedding_bags.<table>.weight_int8_rowwise``."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        from torchrec.modules.embedding_configs import PoolingType

        super().__init__()
        self.embedding_bags = torch.nn.ModuleDict()
        self.weighted = bool(ebc.is_weighted())
        self.lookups: list[tuple[str, str, int, bool]] = []  # (feature, table, dim, mean pooling)
        for cfg in ebc.embedding_bag_configs():
            if len(cfg.feature_names) != 1:
                raise ExportError(f"int8 tables support one feature per table; {cfg.name} has {cfg.feature_names}")
            table = torch.nn.Module()
            table.register_buffer(INT8_KEY, torch.empty(cfg.num_embeddings, cfg.embedding_dim + 8, dtype=torch.uint8))
            self.embedding_bags[cfg.name] = table
            self.lookups.append((cfg.feature_names[0], cfg.name, cfg.embedding_dim, cfg.pooling == PoolingType.MEAN))

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        per_feature = features.to_dict()
        pooled = []
        for feature, table, _, mean in self.lookups:
            jt = per_feature[feature]
            indices = jt.values()
            offsets = jt.offsets().to(indices.dtype)
            bags = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                getattr(self.embedding_bags[table], INT8_KEY),
                indices,
                offsets,
                False,
                0,  # sum pooling: the mean divides below, by the number of ids (not the weights' sum)
                False,
                jt.weights_or_none() if self.weighted else None,
                None,
                True,  # offsets end with the total
            )
            if mean:
                bags = bags / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(bags.dtype)
            pooled.append(bags)
        return KeyedTensor(
            keys=[f for f, *_ in self.lookups],
            length_per_key=[d for _, _, d, _ in self.lookups],
            values=torch.cat(pooled, dim=1),
        )


def use_int8_tables(dlrm: torch.nn.Module) -> torch.nn.Module:
    """Swap the model's float tables for :class:`Int8EmbeddingBagCollection` (to be filled by load_state_dict)."""
    arch = dlrm.sparse_arch
    arch.embedding_bag_collection = Int8EmbeddingBagCollection(arch.embedding_bag_collection)
    return dlrm


# -- one-hot lookups as row gathers ----------------------------------------------------------------------
def int8_tables(collection: torch.nn.Module, feature_names: list[str]) -> list[torch.Tensor] | None:
    """Each feature's int8 row-wise table [rows, D + 8] in ``feature_names`` order, when ``collection`` is an
    :class:`Int8EmbeddingBagCollection` of unweighted tables of one width, a table per feature; else None."""
    if not isinstance(collection, Int8EmbeddingBagCollection) or collection.weighted:
        return None
    table_of = {feature: table for feature, table, _, _ in collection.lookups}
    if sorted(table_of) != sorted(feature_names):
        return None
    tables = [getattr(collection.embedding_bags[table_of[f]], INT8_KEY) for f in feature_names]
    return tables if len({t.shape[1] for t in tables}) == 1 else None


class Int8RowGather(RowGather):
    """:class:`~pipeline.model.one_hot.RowGather` over int8 row-wise tables: each id's row dequantised (codes x
    scale + bias, by PyTorch's quantized embedding-bag kernel, as :class:`Int8EmbeddingBagCollection` pools a
    bag of one id) into the float32 [B, F, D] the dense part reads."""

    def __init__(self, tables: list[torch.Tensor]) -> None:
        super().__init__(tables, width=tables[0].shape[1] - 8, dtype=torch.float32)

    def _rows(self, table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        offsets = torch.arange(ids.numel() + 1, dtype=ids.dtype)
        out.copy_(
            torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                table, ids, offsets, False, 0, False, None, None, True
            )
        )
