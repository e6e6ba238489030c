"""The int8 export's one-hot lookups as row gathers dequantised from int8 row-wise tables: the same rows as
the int8 collection pools, bit for bit."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig, Pooling
from pipeline.model.dlrm import build_model
from pipeline.model.one_hot import one_hot_ids
from pipeline.serving.int8 import Int8RowGather, int8_tables, quantize_tables, use_int8_tables
from tests.unit.model.test_multihot_pooling import _materialise
from tests.unit.model.test_one_hot import KEYS, ROWS, _one_hot

B = 64
SMALL = {"embedding_dim": 16, "dense_arch_layer_sizes": [32, 16], "over_arch_layer_sizes": [32, 8, 1]}


def _model(pooling: Pooling = Pooling.sum, weighted: bool = False) -> torch.nn.Module:
    cfg = ModelConfig(**SMALL, pooling=pooling)
    model = build_model(cfg, ROWS, feature_names=KEYS, num_dense_features=2, weighted=weighted)
    return _materialise(model).model.eval()


@pytest.mark.parametrize("pooling", [Pooling.sum, Pooling.mean])
def test_int8_row_gather_gives_the_int8_collections_rows_bit_for_bit(pooling: Pooling) -> None:
    dlrm = _model(pooling)
    state = quantize_tables(dlrm.state_dict())
    use_int8_tables(dlrm)
    dlrm.load_state_dict(state, strict=True)
    names = dlrm.sparse_arch.sparse_feature_names
    tables = int8_tables(dlrm.sparse_arch.embedding_bag_collection, names)
    assert tables is not None and [t.shape for t in tables] == [(r, 16 + 8) for r in ROWS]
    gather = Int8RowGather(tables)
    with torch.no_grad():
        for seed, keys in enumerate([KEYS, ["c", "a", "b"], KEYS]):  # any key order; the buffer reused
            kjt, dense = _one_hot(keys, seed, B), torch.randn(B, 2)
            pooled = gather(one_hot_ids(kjt, names))
            assert pooled.dtype == torch.float32 and pooled.shape == (B, 3, 16)
            want = dlrm.sparse_arch.embedding_bag_collection(kjt).to_dict()
            for f, name in enumerate(names):
                assert torch.equal(pooled[:, f], want[name])
            assert torch.equal(dlrm.forward_pooled(dense, pooled), dlrm(dense, kjt))
            # Gathered slice by slice into the dot interaction's stacked vectors: the same logits.
            assert torch.equal(dlrm.forward_gathered(dense, one_hot_ids(kjt, names), gather), dlrm(dense, kjt))


def test_no_int8_tables_for_float_or_weighted_collections() -> None:
    dlrm = _model()
    assert int8_tables(dlrm.sparse_arch.embedding_bag_collection, KEYS) is None  # float32 tables
    weighted = _model(weighted=True)
    state = quantize_tables(weighted.state_dict())
    use_int8_tables(weighted)
    weighted.load_state_dict(state, strict=True)
    assert int8_tables(weighted.sparse_arch.embedding_bag_collection, KEYS) is None
