"""The benchmarks' MLPerf-shaped multi-hot rows: Criteo's layout with every categorical field a bag of MLPerf's
sizes, read back by the pipeline's own parser."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks._mlperf_data import MLPERF_BAG_SIZES, mean_ids_per_row, multi_hot_override, write_raw
from pipeline.config import DataConfig, SplitMode
from pipeline.data.schema import Schema
from pipeline.data.tsv import read_blocks


@pytest.mark.parametrize("lengths", ["fixed", "variable"])
def test_rows_parse_as_bags_of_the_mlperf_sizes(tmp_path, lengths) -> None:
    path = write_raw(tmp_path / "rows.tsv", 1000, seed=3, lengths=lengths)
    assert path.read_bytes() == write_raw(tmp_path / "again.tsv", 1000, seed=3, lengths=lengths).read_bytes()
    columns = {f"C{j + 1}": 0 for j in range(len(MLPERF_BAG_SIZES))}
    cfg = DataConfig(name="t", split=SplitMode.random, raw_files=[str(path)], multi_hot_columns=columns)
    blocks = list(read_blocks(path, 1, "error", None, True, Schema.from_config(cfg)))
    got = np.concatenate([b.lists.lengths for b in blocks])
    assert got.shape == (1000, 26)
    sizes = np.asarray(MLPERF_BAG_SIZES)
    if lengths == "fixed":
        assert (got == sizes).all()
    else:
        assert (got >= 1).all() and (got <= sizes).all() and (got < sizes).any()
    assert abs(got.sum(axis=1).mean() - mean_ids_per_row(lengths)) < 0.05 * mean_ids_per_row(lengths)
    assert multi_hot_override() == "+data.multi_hot_columns={" + ",".join(f"{c}:0" for c in columns) + "}"
