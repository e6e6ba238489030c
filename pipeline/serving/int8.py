"""Int8 row-wise tables for serving: PyTorch's fused 8-bit format (per row the uint8 codes plus an fp32
scale and bias: 136 bytes instead of 512 at dimension 128) and its quantized CPU lookup kernel."""

from __future__ import annotations

import torch

from pipeline.errors import ExportError

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
    """An ``EmbeddingBagCollection``'s lookups (sum pooling) from int8 row-wise tables, with PyTorch's
    quantized CPU kernel ``embedding_bag_byte_rowwise_offsets``: the same KeyedTensor out, a quarter of
    the table memory. State dict keys: ``embedding_bags.<table>.weight_int8_rowwise``."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.embedding_bags = torch.nn.ModuleDict()
        self.lookups: list[tuple[str, str, int]] = []  # (feature, table, dim)
        for cfg in ebc.embedding_bag_configs():
            if len(cfg.feature_names) != 1:
                raise ExportError(f"int8 tables support one feature per table; {cfg.name} has {cfg.feature_names}")
            table = torch.nn.Module()
            table.register_buffer(INT8_KEY, torch.empty(cfg.num_embeddings, cfg.embedding_dim + 8, dtype=torch.uint8))
            self.embedding_bags[cfg.name] = table
            self.lookups.append((cfg.feature_names[0], cfg.name, cfg.embedding_dim))

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        per_feature = features.to_dict()
        pooled = []
        for feature, table, _ in self.lookups:
            jt = per_feature[feature]
            indices = jt.values()
            pooled.append(
                torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                    getattr(self.embedding_bags[table], INT8_KEY),
                    indices,
                    jt.offsets().to(indices.dtype),
                    False,
                    0,
                    False,
                    jt.weights_or_none(),
                    None,
                    True,
                )
            )  # sum pooling; offsets end with the total
        return KeyedTensor(
            keys=[f for f, _, _ in self.lookups],
            length_per_key=[d for _, _, d in self.lookups],
            values=torch.cat(pooled, dim=1),
        )


def use_int8_tables(dlrm: torch.nn.Module) -> torch.nn.Module:
    """Swap the model's float tables for :class:`Int8EmbeddingBagCollection` (to be filled by load_state_dict)."""
    arch = dlrm.sparse_arch
    arch.embedding_bag_collection = Int8EmbeddingBagCollection(arch.embedding_bag_collection)
    return dlrm
