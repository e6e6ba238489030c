"""The DLRM of Naumov et al. 2019 and its family, from TorchRec's blocks.

Every model here is ``sparse_arch`` (one ``EmbeddingBagCollection`` table per categorical feature,
sharded by DMP) followed by a dense part, :meth:`forward_pooled` ``(dense [B, I], pooled [B, F, D])
-> logits [B, 1]`` (data-parallel; what ``pipeline.export`` exports as a program):

- ``model.interaction=dot``: TorchRec's ``DLRM`` (bottom MLP ``DenseArch``, the dot interaction
  ``InteractionArch`` over the strict upper triangle: 351 pairs for 27 vectors, top MLP ``OverArch``)
  plus the optional self-interaction TorchRec lacks (the diagonal <x_i, x_i>: 378 terms, the 506-wide
  top input in the seed's Criteo table), :class:`DotInteraction`.
- ``model.interaction=dcn``: DCNv2's low-rank cross network (TorchRec's ``InteractionDCNArch`` over
  ``LowRankCrossNet``, as TorchRec's ``DLRM_DCN``) on the concatenated 27 vectors.
- ``model.interaction=projection``: TorchRec's ``InteractionProjectionArch`` (as ``DLRM_Projection``):
  two MLPs project the 27 vectors to F1 and F2 vectors whose F1 x F2 dot products feed the top MLP.
- ``model.sparse_arch_layer_sizes``: the seed's optional sparse-feature MLPs, one small MLP per
  table applied to its pooled embedding before the interaction (:class:`FeatureMLPs`).
- ``model.name=mf``: matrix factorisation, the special case DLRM generalises: a user table and an item
  table, logit = <u, v> + bias, no MLPs (:class:`MatrixFactorization`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DenseArch, DLRMTrain, InteractionDCNArch, InteractionProjectionArch, OverArch, SparseArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import NUM_DENSE_FEATURES, Interaction, ModelConfig, ModelName
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


class FeatureMLPs(nn.Module):
    """One MLP per sparse feature on its pooled embedding, [B, F, D] -> [B, F, D'], batched over the
    features (one ``baddbmm`` per layer, not F small GEMMs). ReLU between layers; the last layer is
    linear, so the embeddings keep their sign for the dot products."""

    def __init__(self, num_features: int, in_dim: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for out_dim in layer_sizes:
            bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per feature
            self.weights.append(nn.Parameter(torch.empty(num_features, in_dim, out_dim).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_features, 1, out_dim).uniform_(-bound, bound)))
            in_dim = out_dim

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled.transpose(0, 1)  # [F, B, D]
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if k < last:
                x = torch.relu(x)
        return x.transpose(0, 1)


class DLRM(TorchRecDLRM):
    """TorchRec's DLRM with a choice of interaction, an optional self-interaction and optional
    per-feature MLPs on the pooled embeddings."""

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int,
                 dense_arch_layer_sizes: list[int], over_arch_layer_sizes: list[int],
                 self_interaction: bool = False, interaction: Interaction = Interaction.dot,
                 sparse_arch_layer_sizes: list[int] | None = None, dcn_num_layers: int = 3,
                 dcn_low_rank_dim: int = 64, projection_layer_sizes: tuple[list[int], list[int]] | None = None,
                 dense_device: torch.device | None = None) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_arch_layer_sizes,
                         over_arch_layer_sizes, dense_device)
        num_sparse = len(self.sparse_arch.sparse_feature_names)
        d = dense_arch_layer_sizes[-1]
        self.sparse_mlp = (FeatureMLPs(num_sparse, self.sparse_arch.D, list(sparse_arch_layer_sizes))
                           if sparse_arch_layer_sizes else None)
        if interaction == Interaction.dot and self_interaction:
            self.inter_arch = DotInteraction(num_sparse, self_interaction=True)
            top_in = d + self.inter_arch.num_interactions
        elif interaction == Interaction.dcn:
            crossnet = LowRankCrossNet(in_features=(num_sparse + 1) * d, num_layers=dcn_num_layers,
                                       low_rank=dcn_low_rank_dim)
            self.inter_arch = InteractionDCNArch(num_sparse, crossnet)
            top_in = (num_sparse + 1) * d
        elif interaction == Interaction.projection:
            branch1, branch2 = projection_layer_sizes
            in_features = (num_sparse + 1) * d
            self.inter_arch = InteractionProjectionArch(num_sparse, DenseArch(in_features, list(branch1), dense_device),
                                                        DenseArch(in_features, list(branch2), dense_device))
            top_in = d + (branch1[-1] // d) * (branch2[-1] // d)
        else:
            top_in = None  # TorchRec's InteractionArch and OverArch as built
        if top_in is not None:
            self.over_arch = OverArch(top_in, over_arch_layer_sizes, dense_device)
        self.top_in_features: int = self.over_arch.model[0]._mlp[0]._linear.in_features  # 479 or 506 for Criteo

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.forward_pooled(dense_features, self.sparse_arch(sparse_features))

    def forward_pooled(self, dense_features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1] from the dense features [B, I] and the pooled embeddings [B, F, D]."""
        if self.sparse_mlp is not None:
            pooled = self.sparse_mlp(pooled)
        embedded_dense = self.dense_arch(dense_features)
        return self.over_arch(self.inter_arch(dense_features=embedded_dense, sparse_features=pooled))

    def dense_modules(self) -> list[str]:
        """Names of the submodules :meth:`forward_pooled` uses (what an export keeps besides the tables)."""
        return ["dense_arch", "inter_arch", "over_arch", *(["sparse_mlp"] if self.sparse_mlp is not None else [])]


class MatrixFactorization(nn.Module):
    """Matrix factorisation as the special case of DLRM (the seed's Part I): a user table and an item
    table, logit = <u, v> + b, no dense features and no MLPs. Other features in the batch are ignored
    (the sharded collection's input distribution keeps only its tables' features)."""

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(embedding_bag_collection)
        if len(self.sparse_arch.sparse_feature_names) != 2:
            raise ValueError(f"matrix factorisation needs exactly two tables, got {self.sparse_arch.sparse_feature_names}")
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.forward_pooled(dense_features, self.sparse_arch(sparse_features))

    def forward_pooled(self, dense_features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled[:, 0] * pooled[:, 1]).sum(dim=1, keepdim=True) + self.bias

    def dense_modules(self) -> list[str]:
        return []


def table_configs(cfg: ModelConfig, num_embeddings_per_feature: list[int],
                  feature_names: list[str] = SPARSE_FEATURE_NAMES) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, sized from the dataset's manifest (for ``mf``, the user's
    and the item's only)."""
    if len(num_embeddings_per_feature) != len(feature_names):
        raise ValueError(f"expected {len(feature_names)} table sizes, got {len(num_embeddings_per_feature)}")
    sizes = dict(zip(feature_names, num_embeddings_per_feature))
    if cfg.name == ModelName.mf:
        for key in ("user_feature", "item_feature"):
            if getattr(cfg, key) not in sizes:
                raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not one of the data's sparse features "
                                 f"{feature_names}")
        feature_names = [cfg.user_feature, cfg.item_feature]
    return [EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=cfg.embedding_dim, num_embeddings=sizes[feature],
                               feature_names=[feature])
            for feature in feature_names]


def build_model(cfg: ModelConfig, num_embeddings_per_feature: list[int],
                feature_names: list[str] = SPARSE_FEATURE_NAMES,
                num_dense_features: int = NUM_DENSE_FEATURES) -> DLRMTrain:
    """The configured model + BCE loss; tables on the meta device (placed and sharded later by DMP),
    the dense part on CPU."""
    ebc = EmbeddingBagCollection(tables=table_configs(cfg, num_embeddings_per_feature, list(feature_names)),
                                 device=torch.device("meta"))
    if cfg.name == ModelName.mf:
        return DLRMTrain(MatrixFactorization(ebc))
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=num_dense_features,
        dense_arch_layer_sizes=list(cfg.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(cfg.over_arch_layer_sizes),
        self_interaction=cfg.self_interaction,
        interaction=cfg.interaction,
        sparse_arch_layer_sizes=list(cfg.sparse_arch_layer_sizes),
        dcn_num_layers=cfg.dcn_num_layers,
        dcn_low_rank_dim=cfg.dcn_low_rank_dim,
        projection_layer_sizes=(list(cfg.projection_branch1_layer_sizes), list(cfg.projection_branch2_layer_sizes)),
    )
    return DLRMTrain(dlrm)
