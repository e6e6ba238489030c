"""Model shapes (479/506-wide top input) and the self-interaction against a direct computation."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import SPARSE_FEATURE_NAMES, ModelConfig
from pipeline.model.dlrm import DotInteraction, build_model


@pytest.mark.parametrize(("self_interaction", "num_pairs", "top_in"), [(False, 351, 479), (True, 378, 506)])
def test_criteo_top_mlp_input_width(self_interaction: bool, num_pairs: int, top_in: int) -> None:
    model = build_model(ModelConfig(self_interaction=self_interaction), [1000] * 26)
    dlrm = model.model
    assert dlrm.top_in_features == top_in
    assert top_in - 128 == num_pairs
    assert [
        layer.in_features for layer in dlrm.dense_arch.model._mlp.modules() if isinstance(layer, torch.nn.Linear)
    ] == [13, 512, 256]
    assert len(dlrm.sparse_arch.embedding_bag_collection.embedding_bag_configs()) == 26


def test_dot_interaction_with_diagonal_matches_direct_products() -> None:
    b, f, d = 3, 4, 5
    dense, sparse = torch.randn(b, d), torch.randn(b, f, d)
    out = DotInteraction(f, self_interaction=True)(dense, sparse)
    vectors = torch.cat([dense.unsqueeze(1), sparse], dim=1)
    expected = [vectors[:, i] @ vectors[:, j].T for i in range(f + 1) for j in range(i, f + 1)]
    expected = torch.stack([e.diagonal() for e in expected], dim=1)
    assert out.shape == (b, d + (f + 1) * (f + 2) // 2)
    torch.testing.assert_close(out[:, :d], dense)
    torch.testing.assert_close(out[:, d:], expected)


def test_forward_gives_one_logit_per_sample() -> None:
    cfg = ModelConfig(
        embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], self_interaction=True
    )
    model = build_model(cfg, [50] * 26)
    # Materialise the meta-device tables for a plain (unsharded) forward.
    ebc = model.model.sparse_arch.embedding_bag_collection
    ebc.to_empty(device="cpu")
    for p in ebc.parameters():
        torch.nn.init.uniform_(p, -0.1, 0.1)
    b = 6
    kjt = KeyedJaggedTensor(
        keys=SPARSE_FEATURE_NAMES,
        values=torch.randint(0, 50, (26 * b,)),
        lengths=torch.ones(26 * b, dtype=torch.int32),
        stride=b,
    )
    logits = model.model(torch.randn(b, 13), kjt)
    assert logits.shape == (b, 1)


@pytest.mark.parametrize("chunk_rows", [512, 3])
@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction_gradients_match_autograd_of_the_gram_matrix(
    self_interaction: bool, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-GEMM backward gives autograd's gradients of bmm + gather, diagonal included, whether the
    batch is one slice of rows or several (7 rows in slices of 3: 3 + 3 + 1)."""
    monkeypatch.setattr("pipeline.model.dlrm.CPU_CHUNK_ROWS", chunk_rows)
    b, f, d = 7, 5, 6
    dense, sparse = torch.randn(b, d, dtype=torch.float64), torch.randn(b, f, d, dtype=torch.float64)
    upstream = torch.randn(b, d + (f + 1) * (f + 2 * self_interaction) // 2, dtype=torch.float64)

    def reference(x, s):
        vectors = torch.cat([x.unsqueeze(1), s], dim=1)
        i, j = torch.triu_indices(f + 1, f + 1, offset=0 if self_interaction else 1)
        return torch.cat([x, torch.bmm(vectors, vectors.transpose(1, 2))[:, i, j]], dim=1)

    grads, handed_back = [], []
    for fn in (reference, DotInteraction(f, self_interaction=self_interaction)):
        x, s = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
        s.register_hook(handed_back.append)  # the gradient as the function returns it (.grad may be a copy)
        out = fn(x, s)
        out.backward(upstream)
        grads.append((out.detach(), x.grad, s.grad))
    for ours, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, ref)
    assert handed_back[1].is_contiguous(), "the pooled embeddings' gradient needs no copy before the tables"
    with torch.no_grad():
        torch.testing.assert_close(DotInteraction(f, self_interaction)(dense, sparse), grads[0][0])
    assert torch.autograd.gradcheck(
        DotInteraction(f, self_interaction), (dense[:4].clone().requires_grad_(), sparse[:4].clone().requires_grad_())
    )


def test_dot_interaction_has_torchrec_interaction_arch_layout() -> None:
    from torchrec.models.dlrm import InteractionArch

    dense, sparse = torch.randn(4, 8), torch.randn(4, 26, 8)
    torch.testing.assert_close(
        DotInteraction(26, self_interaction=False)(dense, sparse), InteractionArch(26)(dense, sparse)
    )


def test_pooled_embeddings_are_a_view_when_the_keys_are_in_order() -> None:
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from pipeline.model.dlrm import pooled_values

    values = torch.randn(3, 4 * 2)
    kt = KeyedTensor(keys=["a", "b", "c", "d"], length_per_key=[2] * 4, values=values)
    assert pooled_values(kt, ["a", "b", "c", "d"], 2).data_ptr() == values.data_ptr()
    reordered = pooled_values(kt, ["b", "a", "d", "c"], 2)
    torch.testing.assert_close(reordered, values.view(3, 4, 2)[:, [1, 0, 3, 2]])


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction_reads_pooled_embeddings_in_the_shards_order(self_interaction) -> None:
    """Sharded over ranks the collection returns features grouped by rank; the dot interaction reads them
    in that order (a view, no reordering copy) and gives the same outputs and gradients."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from pipeline.model.dlrm import pooled_for_dot, pooled_values

    names, d, b = [f"f{k}" for k in range(6)], 4, 5
    shard_order = ["f1", "f3", "f5", "f0", "f2", "f4"]  # e.g. two ranks, table-wise
    inter = DotInteraction(len(names), self_interaction)
    values = torch.randn(b, len(names) * d, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    kt = KeyedTensor(keys=shard_order, length_per_key=[d] * len(names), values=values)

    pooled, flat = pooled_for_dot(kt, names, d, inter.flat_pairs, inter.pair_i, inter.pair_j, inter.padded)
    assert pooled.data_ptr() == values.data_ptr(), "a view of the shards' output"
    assert not torch.equal(flat, inter.flat_pairs), "pair indices remapped to the shards' order"
    again = pooled_for_dot(kt, names, d, inter.flat_pairs, inter.pair_i, inter.pair_j, inter.padded)[1]
    assert again is flat, "computed once per key order"
    out = inter(dense, pooled, flat)
    grads = torch.autograd.grad(out.pow(2).sum(), (values, dense))
    expected = inter(dense, pooled_values(kt, names, d))
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (values, dense))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    in_order = KeyedTensor(keys=names, length_per_key=[d] * len(names), values=values)
    assert (
        pooled_for_dot(in_order, names, d, inter.flat_pairs, inter.pair_i, inter.pair_j, inter.padded)[1]
        is inter.flat_pairs
    )


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32])
def test_sliced_no_grad_interaction_under_bf16_autocast_equals_the_whole_batch_graph(
    dense_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slices of 3 rows write their bf16 products straight into the output; its dtype is the one torch.cat
    gives the whole-batch graph (bf16 for a bf16 dense vector, float32 for a float32 one)."""
    from pipeline.model.dlrm import _pairs, _stack_vectors

    monkeypatch.setattr("pipeline.model.dlrm.CPU_CHUNK_ROWS", 3)
    inter = DotInteraction(5, self_interaction=False)
    dense, sparse = torch.randn(7, 8).to(dense_dtype), torch.randn(7, 5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = inter(dense, sparse)
        want = _pairs(dense, _stack_vectors(dense, sparse, inter.padded), inter.flat_pairs)
    assert got.dtype == want.dtype == dense_dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
