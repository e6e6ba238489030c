"""The DLRM of Naumov et al. 2019 and its family, from TorchRec's blocks.

Every model here is ``sparse_arch`` (one ``EmbeddingBagCollection`` table per categorical feature,
sharded by DMP) followed by a dense part, :meth:`forward_pooled` ``(dense [B, I], pooled [B, F, D])
-> logits [B, 1]`` (data-parallel; what ``pipeline.serving.export`` exports as a program):

- ``model.interaction=dot``: TorchRec's ``DLRM`` (bottom MLP ``DenseArch``, top MLP ``OverArch``) with
  the dot interaction in TorchRec's ``InteractionArch`` layout (the strict upper triangle: 351 pairs for
  27 vectors), optionally with the self-interaction TorchRec lacks (the diagonal <x_i, x_i>: 378 terms,
  the 506-wide top input in the seed's Criteo table), :class:`DotInteraction`. Its backward runs one
  batched GEMM instead of autograd's two, and the pooled embeddings reach it without the copy
  TorchRec's ``SparseArch`` makes (:func:`pairwise_dot`, :func:`pooled_values`).
- ``model.interaction=dcn``: DCNv2's low-rank cross network (TorchRec's ``InteractionDCNArch`` over
  ``LowRankCrossNet``, as TorchRec's ``DLRM_DCN``) on the concatenated 27 vectors.
- ``model.interaction=projection``: TorchRec's ``InteractionProjectionArch`` (as ``DLRM_Projection``):
  two MLPs project the 27 vectors to F1 and F2 vectors whose F1 x F2 dot products feed the top MLP.
- ``model.sparse_arch_layer_sizes``: the seed's optional sparse-feature MLPs, one small MLP per
  table applied to its pooled embedding before the interaction (:class:`FeatureMLPs`).
- ``model.name=mf``: matrix factorisation, the special case DLRM generalises: a user table and an item
  table, logit = <u, v> + bias, no MLPs (:class:`MatrixFactorization`).

A table pools its feature's bag of ids (one id for a one-hot feature, any number for a multi-hot one)
into one vector: ``model.pooling`` (sum | mean), per feature ``model.table_pooling``. With weights in the
data (``is_weighted``) each row is scaled by its id's weight first; mean pooling then divides by the
number of ids, not by the sum of the weights (what FBGEMM's kernels do). An empty bag pools to zeros
under either pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import (
    DenseArch,
    DLRMTrain,
    InteractionDCNArch,
    InteractionProjectionArch,
    OverArch,
    SparseArch,
)
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import Perceptron
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from pipeline.config import (
    NUM_DENSE_FEATURES,
    SPARSE_FEATURE_NAMES,
    ConfigError,
    Interaction,
    ModelConfig,
    ModelName,
    Pooling,
)
from pipeline.model import dot_kernel
from pipeline.model.one_hot import RowGather


def _stack_vectors(dense: torch.Tensor, sparse: torch.Tensor, padded: int) -> torch.Tensor:
    """``[dense; sparse]`` as [B, padded, D], zero rows after the N = F + 1 real ones: batched GEMMs of
    28 x 128 x 28 run about 10-25% faster than of 27 x 128 x 27 on CPU (seen here), and zero rows add
    nothing to any dot product."""
    b, f, d = sparse.shape
    out = dense.new_empty(b, padded, d)
    out[:, 0] = dense
    out[:, 1 : f + 1] = sparse
    if padded > f + 1:
        out[:, f + 1 :] = 0
    return out


def _pairs(dense: torch.Tensor, stacked: torch.Tensor, flat_pairs: torch.Tensor) -> torch.Tensor:
    b, p, _ = stacked.shape
    gram = torch.bmm(stacked, stacked.transpose(1, 2)).view(b, p * p)
    return torch.cat((dense, gram.index_select(1, flat_pairs)), dim=1)


# Rows per slice of the batch in the CPU interaction with PyTorch's ops. The stacked vectors of 256 rows
# (3.5 MiB) stay in cache between the copy that builds them and the GEMMs that read them; over a whole batch
# of 8192 rows (117 MiB) each pass goes to memory. Measured here (2 cores, median ms, whole batch -> slices):
# inference 111.7 -> 43.0 at 8192 rows, 13.2 -> 9.6 at 2048; training 31.3 -> 26.1 at 2048.
CPU_CHUNK_ROWS = 256


def _chunks(dense: torch.Tensor, rows: int = CPU_CHUNK_ROWS) -> list[tuple[int, int]]:
    b = dense.shape[0]
    step = rows if dense.device.type == "cpu" else max(b, 1)
    return [(s, min(b, s + step)) for s in range(0, b, step)]


def _pairs_into(stacked: torch.Tensor, flat_pairs: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` [n, pairs] = the pairs' entries of the Gram matrices of ``stacked`` [n, padded, D]."""
    n, p, _ = stacked.shape
    gram = torch.bmm(stacked, stacked.transpose(1, 2)).view(n, p * p)
    if gram.dtype == out.dtype:
        torch.index_select(gram, 1, flat_pairs, out=out)
    else:  # bf16 products under autocast into a float32 output (the dtype torch.cat would promote to)
        out.copy_(gram.index_select(1, flat_pairs))


def _pairs_chunked(dense: torch.Tensor, sparse: torch.Tensor, flat_pairs: torch.Tensor, padded: int) -> torch.Tensor:
    """:func:`_pairs` of :func:`_stack_vectors`, one slice of rows at a time (the same numbers)."""
    b, d = dense.shape
    out = dense.new_empty(b, d + flat_pairs.numel())
    out[:, :d] = dense
    for s, e in _chunks(dense):
        _pairs_into(_stack_vectors(dense[s:e], sparse[s:e], padded), flat_pairs, out[s:e, d:])
    return out


# Rows per slice when the dot interaction reads the embeddings straight from the tables (no-grad CPU forwards:
# evaluation on one rank, serving): each slice's rows are gathered into its slots of a stacked [rows, 28, 128]
# buffer (14 MiB), which the batched GEMM reads while it is still in cache; no [B, 26, 128] buffer is written
# and read again. Measured here (2 cores, the Criteo DLRM's whole forward, median ms at batch 2048 / 8192):
# gather, then stack in slices of 256 rows: 13.2 / 57.0; gathered in slices of 256: 14.2 / 64.6 (26 calls a
# slice), of 512: 11.9 / 50.5, of 1024: 11.6 / 49.5.
GATHER_CHUNK_ROWS = 1024


def pairwise_dot_gathered(
    dense: torch.Tensor, ids: torch.Tensor, gather: RowGather, flat_pairs: torch.Tensor, padded: int
) -> torch.Tensor:
    """:func:`pairwise_dot` of ``dense`` [B, D] and the rows ``gather`` reads for ``ids`` [F, B] (F tables of
    width D), gathered slice by slice (:data:`GATHER_CHUNK_ROWS`) into the stacked vectors. No autograd."""
    b, d = dense.shape
    f = ids.shape[0]
    out = dense.new_empty(b, d + flat_pairs.numel())
    out[:, :d] = dense
    stacked = dense.new_empty(min(b, GATHER_CHUNK_ROWS), padded, d)
    stacked[:, f + 1 :] = 0
    for s, e in _chunks(dense, GATHER_CHUNK_ROWS):
        x = stacked[: e - s]
        gather.into(ids[:, s:e], x[:, 1 : f + 1])
        x[:, 0] = dense[s:e]
        _pairs_into(x, flat_pairs, out[s:e, d:])
    return out


class _PairwiseDot(torch.autograd.Function):
    """``[dense, gram(x)[pairs]]`` for ``x = [dense; pooled]`` with a cheaper backward.

    On the CPU in float32 (no autocast) both passes run the compiled kernels of
    :mod:`pipeline.model.dot_kernel`; otherwise (bf16, float64, CUDA) PyTorch's ops, as follows.

    Autograd's backward of ``bmm(x, x^T)`` followed by the pair gather runs two batched GEMMs and a
    scatter-add of the pair gradients; the Gram matrix is symmetric, so ``dx = (G + G^T) x`` with ``G``
    the pair gradients scattered into [N, N]: one batched GEMM. The same numbers within float rounding.
    Forward and backward run over slices of rows (:data:`CPU_CHUNK_ROWS`), and the backward stacks each
    slice again rather than keeping the [B, N, D] stack: less memory, and the gradient of the pooled
    embeddings comes out contiguous (the sharded collection would otherwise copy it).
    """

    @staticmethod
    def forward(ctx, dense: torch.Tensor, sparse: torch.Tensor, flat_pairs: torch.Tensor, padded: int) -> torch.Tensor:
        ctx.save_for_backward(dense, sparse, flat_pairs)
        ctx.padded = padded
        ctx.kernel = dot_kernel.usable(dense, sparse)
        if ctx.kernel:
            return dot_kernel.dot_forward(dense, sparse, flat_pairs, padded)
        return _pairs_chunked(dense, sparse, flat_pairs, padded)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dense, sparse, flat_pairs = ctx.saved_tensors
        if ctx.kernel and grad_out.dtype == torch.float32:
            return (*dot_kernel.dot_backward(dense, sparse, flat_pairs, ctx.padded, grad_out), None, None)
        p, (b, f, d) = ctx.padded, sparse.shape
        grad_dense = grad_out[:, :d].clone()
        grad_sparse = sparse.new_empty(b, f, d)
        # G + G^T in one buffer: each pair's gradient added at (i, j) and at (j, i); a diagonal pair lands
        # twice, as it should (d<x,x>/dx = 2x). Cheaper than scattering G and adding its transpose.
        transposed_pairs = (flat_pairs % p) * p + flat_pairs // p
        for s, e in _chunks(dense):
            grad_pairs = grad_out[s:e, d:]
            g = grad_out.new_zeros(e - s, p * p)
            g.index_add_(1, flat_pairs, grad_pairs).index_add_(1, transposed_pairs, grad_pairs)
            grad_stacked = torch.bmm(g.view(e - s, p, p), _stack_vectors(dense[s:e], sparse[s:e], p))
            grad_dense[s:e] += grad_stacked[:, 0]
            grad_sparse[s:e] = grad_stacked[:, 1 : f + 1]
        return grad_dense, grad_sparse, None, None


def pairwise_dot(dense: torch.Tensor, sparse: torch.Tensor, flat_pairs: torch.Tensor, padded: int) -> torch.Tensor:
    """``[dense, <x_i, x_j> for each pair]`` over ``x = [dense; sparse]`` stacked into ``padded`` rows;
    ``flat_pairs`` = i * padded + j."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _pairs(dense, _stack_vectors(dense, sparse, padded), flat_pairs)  # one traceable graph
    if torch.is_grad_enabled() and (dense.requires_grad or sparse.requires_grad):
        return _PairwiseDot.apply(dense, sparse, flat_pairs, padded)
    return _pairs_chunked(dense, sparse, flat_pairs, padded)


def pooled_values(kt: KeyedTensor, names: list[str], dim: int) -> torch.Tensor:
    """The pooled embeddings [B, F, D] of ``names`` from the collection's output, without a copy when the
    output already holds exactly those features in that order (TorchRec's ``SparseArch`` always
    concatenates the 26 slices: a [B, F*D] copy forward and backward each step)."""
    values = kt.values()
    if kt.key_dim() == 1 and kt.keys() == names and values.shape[1] == len(names) * dim:
        return values.view(values.shape[0], len(names), dim)
    per_key = kt.to_dict()
    return torch.cat([per_key[name] for name in names], dim=1).view(-1, len(names), dim)


_REORDERED_PAIRS: dict[tuple, torch.Tensor] = {}


def pooled_for_dot(
    kt: KeyedTensor,
    names: list[str],
    dim: int,
    flat_pairs: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    padded: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled embeddings as [B, F, D] in the collection's own key order (a view), and the pair
    indices of :class:`DotInteraction` (``flat_pairs``) for that order.

    Sharded over several ranks, the collection's output lists each rank's tables together (e.g.
    table-wise on 2 ranks: rank 0's 13 features, then rank 1's), so :func:`pooled_values` would copy
    the 26 slices back into feature order, forward and backward, every step. The dot interaction does
    not need that order: the Gram matrix of the vectors in any order holds the same dot products, and
    only which entries are read changes. The remapped indices are computed once per key order. Falls
    back to :func:`pooled_values` and ``flat_pairs`` when the output is not a permutation of ``names``
    of width ``dim`` each.
    """
    values, keys = kt.values(), kt.keys()
    if keys == names:
        return pooled_values(kt, names, dim), flat_pairs
    cache_key = (tuple(keys), tuple(names), dim, padded, pair_i.numel(), str(pair_i.device))
    pairs = _REORDERED_PAIRS.get(cache_key)
    if pairs is None:
        if (
            kt.key_dim() != 1
            or sorted(keys) != sorted(names)
            or values.shape[1] != len(names) * dim
            or any(n != dim for n in kt.length_per_key())
        ):
            return pooled_values(kt, names, dim), flat_pairs
        position = {k: p for p, k in enumerate(keys)}
        # Row of each vector in the stacked input: the dense vector first, then the pooled ones in kt order.
        rows = torch.tensor([0, *(1 + position[n] for n in names)], dtype=pair_i.dtype, device=pair_i.device)
        pairs = _REORDERED_PAIRS[cache_key] = rows[pair_i] * padded + rows[pair_j]
    return values.view(values.shape[0], len(names), dim), pairs


# Leaves for torch.fx (TrainPipelineSparseDist traces the model): their bodies run eagerly.
torch.fx.wrap("pairwise_dot")
torch.fx.wrap("pooled_values")
torch.fx.wrap("pooled_for_dot")


class DotInteraction(nn.Module):
    """Pairwise dot products of the bottom-MLP output and the pooled embeddings.

    Output: ``[dense, <x_i, x_j> for i < j]`` (or ``i <= j`` with ``self_interaction``), the layout
    of TorchRec's ``InteractionArch`` plus the optional diagonal, computed by :func:`pairwise_dot`.
    """

    def __init__(self, num_sparse_features: int, self_interaction: bool) -> None:
        super().__init__()
        num_vectors = num_sparse_features + 1
        self.padded = -(-num_vectors // 4) * 4  # 27 -> 28
        i, j = torch.triu_indices(num_vectors, num_vectors, offset=0 if self_interaction else 1)
        self.register_buffer("pair_i", i, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)
        self.register_buffer("flat_pairs", i * self.padded + j, persistent=False)
        self.num_interactions = i.numel()

    def forward(
        self, dense_features: torch.Tensor, sparse_features: torch.Tensor, flat_pairs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``flat_pairs``: the pair indices for pooled vectors in another order (:func:`pooled_for_dot`)."""
        return pairwise_dot(
            dense_features, sparse_features, self.flat_pairs if flat_pairs is None else flat_pairs, self.padded
        )


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
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if k < last:
                x = torch.relu_(x)  # in place on the fresh GEMM output (see relu_in_place)
        return x.transpose(0, 1)


def relu_in_place(module: nn.Module) -> None:
    """Make every TorchRec ``Perceptron`` under ``module`` apply its ReLU in place on its linear layer's output.

    The output is a fresh tensor that nothing else reads (the linear layer's backward keeps its input, not its
    output), so the logits and the gradients are the same bit for bit; it saves a [B, width] buffer and a pass
    over it per layer (``benchmarks/README.md``, "In-place ReLU")."""
    for m in module.modules():
        if isinstance(m, Perceptron) and m._activation_fn is torch.relu:
            m._activation_fn = torch.relu_


class DLRM(TorchRecDLRM):
    """TorchRec's DLRM with a choice of interaction, an optional self-interaction and optional
    per-feature MLPs on the pooled embeddings."""

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        over_arch_layer_sizes: list[int],
        self_interaction: bool = False,
        interaction: Interaction = Interaction.dot,
        sparse_arch_layer_sizes: list[int] | None = None,
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 64,
        projection_layer_sizes: tuple[list[int], list[int]] | None = None,
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__(
            embedding_bag_collection, dense_in_features, dense_arch_layer_sizes, over_arch_layer_sizes, dense_device
        )
        num_sparse = len(self.sparse_arch.sparse_feature_names)
        d = dense_arch_layer_sizes[-1]
        self.sparse_mlp = (
            FeatureMLPs(num_sparse, self.sparse_arch.D, list(sparse_arch_layer_sizes))
            if sparse_arch_layer_sizes
            else None
        )
        if interaction == Interaction.dot:  # TorchRec's InteractionArch's layout, with an optional diagonal
            self.inter_arch = DotInteraction(num_sparse, self_interaction=self_interaction)
            top_in = d + self.inter_arch.num_interactions
        elif interaction == Interaction.dcn:
            crossnet = LowRankCrossNet(
                in_features=(num_sparse + 1) * d, num_layers=dcn_num_layers, low_rank=dcn_low_rank_dim
            )
            self.inter_arch = InteractionDCNArch(num_sparse, crossnet)
            top_in = (num_sparse + 1) * d
        elif interaction == Interaction.projection:
            branch1, branch2 = projection_layer_sizes
            in_features = (num_sparse + 1) * d
            self.inter_arch = InteractionProjectionArch(
                num_sparse,
                DenseArch(in_features, list(branch1), dense_device),
                DenseArch(in_features, list(branch2), dense_device),
            )
            top_in = d + (branch1[-1] // d) * (branch2[-1] // d)
        else:
            raise ValueError(f"unknown interaction {interaction!r}")
        self.over_arch = OverArch(top_in, over_arch_layer_sizes, dense_device)
        relu_in_place(self)
        self.top_in_features: int = self.over_arch.model[0]._mlp[0]._linear.in_features  # 479 or 506 for Criteo

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.sparse_arch.embedding_bag_collection(sparse_features)
        names, dim = self.sparse_arch.sparse_feature_names, self.sparse_arch.D
        if self.sparse_mlp is None and isinstance(self.inter_arch, DotInteraction):
            # Whatever order the (sharded) collection returns the features in: no copy to reorder them.
            inter = self.inter_arch
            pooled, flat_pairs = pooled_for_dot(
                kt, names, dim, inter.flat_pairs, inter.pair_i, inter.pair_j, inter.padded
            )
            return self.forward_pooled(dense_features, pooled, flat_pairs)
        return self.forward_pooled(dense_features, pooled_values(kt, names, dim))

    def forward_pooled(
        self, dense_features: torch.Tensor, pooled: torch.Tensor, flat_pairs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, 1] from the dense features [B, I] and the pooled embeddings [B, F, D] (in feature
        order, or in the order ``flat_pairs`` of the dot interaction was made for)."""
        if self.sparse_mlp is not None:
            pooled = self.sparse_mlp(pooled)
        embedded_dense = self.dense_arch(dense_features)
        if flat_pairs is not None:
            return self.over_arch(self.inter_arch(embedded_dense, pooled, flat_pairs))
        return self.over_arch(self.inter_arch(dense_features=embedded_dense, sparse_features=pooled))

    def forward_gathered(self, dense_features: torch.Tensor, ids: torch.Tensor, gather: RowGather) -> torch.Tensor:
        """Logits [B, 1] from the dense features [B, I] and one id per feature ``ids`` [F, B] (feature order),
        whose rows ``gather`` reads from the tables: :meth:`forward_pooled` of ``gather(ids)``, the same
        numbers. Without gradients, on CPU in float32, the dot interaction gathers the rows slice by slice
        into its stacked vectors (:func:`pairwise_dot_gathered`); otherwise the rows are gathered first."""
        if (
            self.sparse_mlp is None
            and isinstance(self.inter_arch, DotInteraction)
            and not torch.is_grad_enabled()
            and dense_features.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and dense_features.dtype == gather.dtype == torch.float32
        ):
            inter = self.inter_arch
            pairs = pairwise_dot_gathered(self.dense_arch(dense_features), ids, gather, inter.flat_pairs, inter.padded)
            return self.over_arch(pairs)
        return self.forward_pooled(dense_features, gather(ids))

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
            raise ValueError(
                f"matrix factorisation needs exactly two tables, got {self.sparse_arch.sparse_feature_names}"
            )
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.forward_pooled(dense_features, self.sparse_arch(sparse_features))

    def forward_pooled(self, dense_features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled[:, 0] * pooled[:, 1]).sum(dim=1, keepdim=True) + self.bias

    def forward_gathered(self, dense_features: torch.Tensor, ids: torch.Tensor, gather: RowGather) -> torch.Tensor:
        return self.forward_pooled(dense_features, gather(ids))

    def dense_modules(self) -> list[str]:
        return []


_POOLING_TYPES = {Pooling.sum: PoolingType.SUM, Pooling.mean: PoolingType.MEAN}


class WeightedMeanEmbeddingBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag(mode="mean")`` that also takes per-id weights, as FBGEMM's kernels do: the weighted
    sum over the bag divided by its number of ids (zeros for an empty bag). PyTorch's own bag refuses
    weights under mean pooling, so without this a weighted collection with a mean table would train
    sharded (FBGEMM) but fail unsharded (export, predict). Same parameters and state dict as the bag it
    replaces."""

    def forward(
        self, input: torch.Tensor, offsets: torch.Tensor | None = None, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if per_sample_weights is None:
            return super().forward(input, offsets)
        summed = F.embedding_bag(
            input,
            self.weight,
            offsets,
            mode="sum",
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
            padding_idx=self.padding_idx,
        )
        ends = offsets if self.include_last_offset else torch.cat([offsets, offsets.new_tensor([input.numel()])])
        counts = (ends[1:] - ends[:-1]).clamp(min=1).unsqueeze(1)
        return summed / counts.to(summed.dtype)


def feature_pooling(cfg: ModelConfig, feature_names: list[str]) -> dict[str, Pooling]:
    """Each feature's pooling: ``model.pooling``, overridden per feature by ``model.table_pooling``.

    Raises:
        ConfigError: ``model.table_pooling`` names a feature the data does not have.
    """
    unknown = sorted(set(cfg.table_pooling) - set(feature_names))
    if unknown:
        raise ConfigError(
            f"model.table_pooling names {unknown}, which are not among the data's sparse features {list(feature_names)}"
        )
    return {f: Pooling(cfg.table_pooling.get(f, cfg.pooling)) for f in feature_names}


def table_configs(
    cfg: ModelConfig, num_embeddings_per_feature: list[int], feature_names: list[str] = SPARSE_FEATURE_NAMES
) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, sized from the dataset's manifest and pooled as configured
    (:func:`feature_pooling`); for ``mf``, the user's and the item's only.

    Raises:
        ConfigError: ``model.user_feature`` / ``item_feature`` / ``table_pooling`` name a feature the data
            does not have.
    """
    if len(num_embeddings_per_feature) != len(feature_names):
        raise ValueError(f"expected {len(feature_names)} table sizes, got {len(num_embeddings_per_feature)}")
    sizes = dict(zip(feature_names, num_embeddings_per_feature, strict=True))
    pooling = feature_pooling(cfg, list(feature_names))
    if cfg.name == ModelName.mf:
        for key in ("user_feature", "item_feature"):
            if getattr(cfg, key) not in sizes:
                raise ConfigError(
                    f"model.{key}={getattr(cfg, key)!r} is not one of the data's sparse features {feature_names}"
                )
        feature_names = [cfg.user_feature, cfg.item_feature]
    return [
        EmbeddingBagConfig(
            name=f"t_{feature}",
            embedding_dim=cfg.embedding_dim,
            num_embeddings=sizes[feature],
            feature_names=[feature],
            pooling=_POOLING_TYPES[pooling[feature]],
        )
        for feature in feature_names
    ]


def embedding_bag_collection(
    tables: list[EmbeddingBagConfig], weighted: bool, device: torch.device
) -> EmbeddingBagCollection:
    """TorchRec's collection of ``tables``; a weighted one's mean tables pool as FBGEMM's kernels do
    (:class:`WeightedMeanEmbeddingBag`), so the unsharded model computes what the sharded one trained."""
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=device)
    if weighted:
        for t in tables:
            if t.pooling == PoolingType.MEAN:
                bag = ebc.embedding_bags[t.name]
                ebc.embedding_bags[t.name] = WeightedMeanEmbeddingBag(
                    t.num_embeddings,
                    t.embedding_dim,
                    mode="mean",
                    include_last_offset=True,
                    device=bag.weight.device,
                    dtype=bag.weight.dtype,
                )
    return ebc


def build_model(
    cfg: ModelConfig,
    num_embeddings_per_feature: list[int],
    feature_names: list[str] = SPARSE_FEATURE_NAMES,
    num_dense_features: int = NUM_DENSE_FEATURES,
    weighted: bool = False,
) -> DLRMTrain:
    """The configured model + BCE loss; tables on the meta device (placed and sharded later by DMP),
    the dense part on CPU. ``weighted``: the batches carry a weight per id (``bool(schema.weighted)``)."""
    ebc = embedding_bag_collection(
        table_configs(cfg, num_embeddings_per_feature, list(feature_names)), weighted, torch.device("meta")
    )
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
