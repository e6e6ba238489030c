"""The DLRM of Naumov et al. 2019 from TorchRec's blocks.

TorchRec's ``DLRM`` provides the sparse arch (EmbeddingBagCollection), the bottom MLP (``DenseArch``),
the dot interaction (``InteractionArch``, strict upper triangle: 351 pairs for 27 vectors) and the
top MLP (``OverArch``). What it lacks is the optional self-interaction (the diagonal <x_i, x_i>,
378 terms, the 506-wide top input in the seed's Criteo table); :class:`DotInteraction` adds it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRMTrain, OverArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipeline.config import NUM_DENSE_FEATURES, ModelConfig
from pipeline.data.criteo import SPARSE_FEATURE_NAMES


class DotInteraction(nn.Module):
    """Pairwise dot products of the bottom-MLP output and the pooled embeddings.

    Output: ``[dense, <x_i, x_j> for i < j]`` (or ``i <= j`` with ``self_interaction``), the layout
    of TorchRec's ``InteractionArch`` plus the diagonal.
    """

    def __init__(self, num_sparse_features: int, self_interaction: bool) -> None:
        super().__init__()
        num_vectors = num_sparse_features + 1
        i, j = torch.triu_indices(num_vectors, num_vectors, offset=0 if self_interaction else 1)
        self.register_buffer("triu_i", i, persistent=False)
        self.register_buffer("triu_j", j, persistent=False)
        self.num_interactions = i.numel()

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)  # [B, F+1, D]
        gram = torch.bmm(combined, combined.transpose(1, 2))  # [B, F+1, F+1]
        return torch.cat((dense_features, gram[:, self.triu_i, self.triu_j]), dim=1)


class DLRM(TorchRecDLRM):
    """TorchRec's DLRM with an optional self-interaction."""

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int,
                 dense_arch_layer_sizes: list[int], over_arch_layer_sizes: list[int],
                 self_interaction: bool = False, dense_device: torch.device | None = None) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_arch_layer_sizes,
                         over_arch_layer_sizes, dense_device)
        if self_interaction:
            num_sparse = len(self.sparse_arch.sparse_feature_names)
            self.inter_arch = DotInteraction(num_sparse, self_interaction=True)
            embedding_dim = dense_arch_layer_sizes[-1]
            self.over_arch = OverArch(embedding_dim + self.inter_arch.num_interactions, over_arch_layer_sizes, dense_device)
        self.top_in_features: int = self.over_arch.model[0]._mlp[0]._linear.in_features  # 479 or 506 for Criteo


def table_configs(cfg: ModelConfig, num_embeddings_per_feature: list[int]) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, sized from the dataset's manifest."""
    if len(num_embeddings_per_feature) != len(SPARSE_FEATURE_NAMES):
        raise ValueError(f"expected {len(SPARSE_FEATURE_NAMES)} table sizes, got {len(num_embeddings_per_feature)}")
    return [
        EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=cfg.embedding_dim, num_embeddings=n, feature_names=[feature])
        for feature, n in zip(SPARSE_FEATURE_NAMES, num_embeddings_per_feature)
    ]


def build_model(cfg: ModelConfig, num_embeddings_per_feature: list[int]) -> DLRMTrain:
    """DLRM + BCE loss; tables on the meta device (placed and sharded later by DMP), MLPs on CPU."""
    ebc = EmbeddingBagCollection(tables=table_configs(cfg, num_embeddings_per_feature), device=torch.device("meta"))
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=NUM_DENSE_FEATURES,
        dense_arch_layer_sizes=list(cfg.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(cfg.over_arch_layer_sizes),
        self_interaction=cfg.self_interaction,
    )
    return DLRMTrain(dlrm)
