"""The distributed exact metrics against binary_metrics over all rows gathered: in one process, and on 3 gloo
ranks (spawned once for the module) with ties across ranks, a rank without rows, one class, padding."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.metrics.evaluator import (
    NUM_SCORE_BINS,
    PredictionAccumulator,
    distributed_binary_metrics,
    score_bin_owners,
)
from pipeline.metrics.functional import BinaryMetrics, binary_metrics

WORLD_SIZE = 3


def _scenario(name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(probabilities, labels, rows per rank): the same tensors in every process."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "ties":  # 41 distinct scores, each on every rank
        probs = torch.randint(0, 41, (3000,), generator=g) / 40
        return probs, (torch.rand(3000, generator=g) < 0.3).float(), [1000, 1200, 800]
    if name == "rank_without_rows":
        probs = (torch.sigmoid(torch.randn(500, generator=g)) * 100).round() / 100
        return probs, (torch.rand(500, generator=g) < probs).float(), [300, 0, 200]
    if name == "one_class":
        return torch.rand(600, generator=g), torch.zeros(600), [200, 200, 200]
    if name == "all_scores_equal":
        return torch.full((900,), 0.25), (torch.rand(900, generator=g) < 0.25).float(), [300, 300, 300]
    if name == "extremes":  # zero, negative zero, subnormals, one: keys order like the probabilities
        edge = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 1e-8, 0.5, 1.0 - 2**-24, 1.0])
        probs = edge[torch.randint(0, len(edge), (400,), generator=g)]
        return probs, (torch.rand(400, generator=g) < 0.5).float(), [100, 150, 150]
    if name == "model_scores":  # labels drawn from the scores: nearly all distinct, AUC about 0.8
        probs = torch.sigmoid(2 * torch.randn(20000, generator=g))
        return probs, (torch.rand(20000, generator=g) < probs).float(), [9000, 6000, 5000]
    raise KeyError(name)


SCENARIOS = ["ties", "rank_without_rows", "one_class", "all_scores_equal", "extremes", "model_scores"]


def _assert_same(got: BinaryMetrics | dict, want: BinaryMetrics) -> None:
    got = got if isinstance(got, dict) else asdict(got)
    for key, value in asdict(want).items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key


# -- one process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_one_process_matches_gathered_metrics(name) -> None:
    probs, labels, _ = _scenario(name)
    _assert_same(distributed_binary_metrics(probs, labels), binary_metrics(probs, labels))


def test_one_class_gives_nan_auc_and_all_equal_one_half() -> None:
    assert math.isnan(distributed_binary_metrics(torch.rand(10), torch.ones(10)).auc)
    assert distributed_binary_metrics(torch.full((10,), 0.3), torch.tensor([0, 1] * 5)).auc == 0.5


def test_no_rows_are_refused_and_a_nan_prediction_makes_auc_and_logloss_nan() -> None:
    with pytest.raises(ValueError, match="at least one prediction"):
        distributed_binary_metrics(torch.empty(0), torch.empty(0))
    m = distributed_binary_metrics(torch.tensor([0.2, float("nan"), 0.7]), torch.tensor([0.0, 1.0, 1.0]))
    assert math.isnan(m.auc) and math.isnan(m.logloss) and m.num_samples == 3


def test_score_bins_go_to_ranks_in_order_and_in_about_equal_shares() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (NUM_SCORE_BINS,), generator=g)
    counts[1000] = 400_000  # one bin far above a rank's share: it stays whole
    for world_size in (2, 3, 8):
        owners = score_bin_owners(counts, world_size)
        assert bool((owners[1:] >= owners[:-1]).all()), "each rank owns one run of bins, rank 0 the lowest"
        per_rank = torch.zeros(world_size, dtype=torch.int64).index_add_(0, owners, counts)
        assert int(per_rank.max()) <= int(counts.sum()) / world_size + int(counts.max())
        assert int(per_rank.sum()) == int(counts.sum())
    assert not score_bin_owners(torch.zeros(NUM_SCORE_BINS, dtype=torch.int64), 4).any()


def test_accumulator_drops_padding_and_orders_predictions() -> None:
    acc = PredictionAccumulator()
    logits, labels = torch.randn(10), (torch.arange(10) % 3 == 0).float()
    rows = torch.tensor([4, 0, 2, 9, 1, 3, 5, 8, 7, 6])
    acc.update(logits[:6], labels[:6], torch.ones(6), rows[:6])
    padding = torch.zeros(2)  # weight 0: dropped whatever its score and label
    weights = torch.tensor([1.0] * 4 + [0.0] * 2)
    acc.update(
        torch.cat([logits[6:], padding]),
        torch.cat([labels[6:], padding + 1]),
        weights,
        torch.cat([rows[6:], padding.long()]),
    )
    m = acc.compute()
    _assert_same(m, binary_metrics(torch.sigmoid(logits), labels))
    want = torch.empty(10)
    want[rows] = torch.sigmoid(logits)
    assert torch.equal(acc.predictions, want)


# -- three gloo ranks ----------------------------------------------------------------------------


def _padded_eval_rows(num_rows: int, local_batch: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's row indices and weights as the eval loader gives them (padding: row 0, weight 0)."""
    global_batch = local_batch * WORLD_SIZE
    batches = -(-num_rows // global_batch)
    rows = torch.cat([torch.arange(local_batch) + i * global_batch + rank * local_batch for i in range(batches)])
    real = rows < num_rows
    return torch.where(real, rows, 0), real.float()


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    results: dict[str, dict] = {}
    for name in SCENARIOS:
        probs, labels, sizes = _scenario(name)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        results[name] = asdict(distributed_binary_metrics(probs[mine], labels[mine]))
    # The trainer's path: logits, padded batches, row indices for the predictions file.
    logits, labels, _ = _scenario("model_scores")
    rows, weights = _padded_eval_rows(len(logits), 256, rank)
    acc = PredictionAccumulator()
    for batch in torch.split(torch.arange(len(rows)), 256):
        acc.update(torch.logit(logits[rows[batch]]), labels[rows[batch]], weights[batch], rows[batch])
    results["accumulator"] = asdict(acc.compute())
    if acc.predictions is not None:
        torch.save(acc.predictions, Path(out_dir) / "predictions.pt")
    # A NaN on one rank only: every rank skips the AUC's collectives alike (none waits forever in one).
    probs = torch.full((5,), float("nan") if rank == 2 else 0.5)
    results["nan_on_one_rank"] = asdict(distributed_binary_metrics(probs, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(str(out / "init"), str(out)), nprocs=WORLD_SIZE, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)], out


@pytest.mark.parametrize("name", SCENARIOS)
def test_three_ranks_match_gathered_metrics_on_every_rank(three_ranks, name) -> None:
    probs, labels, _ = _scenario(name)
    want = binary_metrics(probs, labels)
    for rank_results in three_ranks[0]:
        _assert_same(rank_results[name], want)


def test_three_ranks_accumulator_drops_padding_and_writes_row_order(three_ranks) -> None:
    probs, labels, _ = _scenario("model_scores")
    results, out = three_ranks
    assert len(_padded_eval_rows(len(probs), 256, 2)[0]) * WORLD_SIZE > len(probs), "the last batch has padding"
    for rank_results in results:
        _assert_same(rank_results["accumulator"], binary_metrics(probs, labels))
        assert rank_results["accumulator"]["num_samples"] == len(probs)
    predictions = torch.load(out / "predictions.pt")
    torch.testing.assert_close(predictions, probs, rtol=1e-6, atol=1e-7)  # logit then sigmoid again


def test_three_ranks_all_give_nan_auc_for_a_nan_on_one_rank(three_ranks) -> None:
    for rank_results in three_ranks[0]:
        got = rank_results["nan_on_one_rank"]
        assert math.isnan(got["auc"]) and math.isnan(got["logloss"]) and got["num_samples"] == 15
