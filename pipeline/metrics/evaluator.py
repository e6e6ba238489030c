"""Exact evaluation over all ranks without any rank holding all predictions.

Every metric but AUC is a sum over rows, all-reduced in float64. The exact AUC (every threshold, ties
counting one half, as :func:`~pipeline.metrics.functional.binary_metrics`) is a distributed
sort-and-count:

1. each row becomes one int32, ``score * 2 + label``, where the score is the probability's float32 bits:
   for non-negative floats they order like the float, so ties are ties of float32 values, as in the
   gathered computation, and a sort puts a score's negatives just before its positives;
2. each rank sorts its values (in place) and counts the rows per distinct value;
3. an all-reduced histogram of the values' high bits (distinct values per bin, over all ranks) cuts the
   score range into one run of bins per rank, about equal in size; a score's rows share a bin, so equal
   scores always meet on one rank;
4. an all-to-all sends each (value, count), packed in one int64, to the rank owning its bin, which sorts
   and merges them;
5. each rank adds up ``positives * (2 * negatives below + negatives at the score)`` over its scores, the
   negatives below its range coming from the per-rank counts of one all-reduce, and
   AUC = sum / (2 * positives * negatives), in exact integer arithmetic.

A rank holds its own rows, its distinct values (at most as many) and those it receives (about
1/world_size of all ranks' distinct values, plus at most one histogram bin), never all rows. Collectives
run on the tensors' device (CPU for gloo, the model's GPU for nccl); without a process group, or on one
rank, there are none.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipeline.metrics.functional import LOGLOSS_CLIP, BinaryMetrics, metrics_from_totals

logger = logging.getLogger(__name__)

_ONE_BITS = 0x3F800000  # float32 1.0 as an int32: every probability's score is at most this
_BIN_SHIFT = 15  # 2**14 consecutive float32 scores (2**15 values with the label bit) per histogram bin
NUM_SCORE_BINS = ((2 * _ONE_BITS + 1) >> _BIN_SHIFT) + 1  # 65,025 bins over [0, 1]: 520 KB of counts to all-reduce
# Over all ranks: a count travels in the low 32 bits of an int64, and 2 * positives * negatives fits an int64.
MAX_ROWS = 2**32 - 1
_SUM_CHUNK = 1 << 18  # rows per float64 pass of the sums: their temporaries stay under 16 MB


def _world_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum over ranks in place (nothing on one rank)."""
    if _world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def _local_sums(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [rows, positives, sum of probs, sum of clipped cross-entropy, right at 0.5, invalid probs]."""
    sums = torch.zeros(6, dtype=torch.float64, device=probs.device)
    for start in range(0, probs.numel(), _SUM_CHUNK):
        p = probs[start : start + _SUM_CHUNK].double()
        y = labels[start : start + _SUM_CHUNK].double()
        c = p.clamp(LOGLOSS_CLIP, 1 - LOGLOSS_CLIP)
        cross_entropy = -(y * c.log() + (1 - y) * (1 - c).log())
        invalid = ~((p >= 0) & (p <= 1))  # NaN too
        parts = [y.sum(), p.sum(), cross_entropy.sum(), ((p > 0.5).double() == y).sum(), invalid.sum()]
        sums[0] += p.numel()
        sums[1:] += torch.stack([t.double() for t in parts])
    return sums


def _sort(values: torch.Tensor) -> torch.Tensor:
    """``values`` ascending, sorted in place on the CPU (numpy's sort needs no index or scratch arrays, where
    torch.sort adds 20 bytes a row); on a GPU, a sorted copy."""
    if values.device.type == "cpu":
        values.numpy().sort()
        return values
    return torch.sort(values).values


def _sorted_values(probs: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """int32 ``score * 2 + label`` of each row, ascending (probabilities checked to be in [0, 1])."""
    values = probs.view(torch.int32).clamp_min(0)  # -0.0's bits are negative as an int32: +0.0
    values.mul_(2).add_(positive)
    return _sort(values)


def _sum_runs(sorted_values: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of a sorted tensor and the rows (or the summed ``counts``, overwritten) at each, int64."""
    distinct, run_lengths = torch.unique_consecutive(sorted_values, return_counts=True)
    if counts is None:
        return distinct, run_lengths
    at_ends = counts.cumsum_(0)[run_lengths.cumsum_(0).sub_(1)]
    return distinct, torch.diff(at_ends, prepend=at_ends.new_zeros(1))


def score_bin_owners(bin_counts: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank that owns each score bin: consecutive runs of bins, rank 0 the lowest scores.

    Bin ``b`` goes to the rank whose share ``[r T / W, (r + 1) T / W)`` of the ``T`` counted items holds the
    items before it, so a rank gets its share plus at most one bin, and every bin is owned whole.
    """
    total = int(bin_counts.sum())
    if total == 0:
        return torch.zeros_like(bin_counts)
    before = torch.cumsum(bin_counts, 0) - bin_counts
    return (before * world_size // total).clamp_(max=world_size - 1)


def _send_counts(distinct: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """How many of this rank's sorted distinct values go to each rank (int64 [world_size])."""
    world_size = _world_size(group)
    edges = torch.arange(NUM_SCORE_BINS + 1, dtype=torch.int32, device=distinct.device) << _BIN_SHIFT
    below_edge = torch.searchsorted(distinct, edges)
    hist = _all_reduce(torch.diff(below_edge), group)
    owners = score_bin_owners(hist, world_size)
    first_bin = torch.searchsorted(owners, torch.arange(world_size + 1, device=owners.device))
    return torch.diff(below_edge[first_bin])


def _exchange(words: torch.Tensor, send_counts: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Send the first ``send_counts[0]`` words to rank 0, the next to rank 1, ...; returns those received."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    received = words.new_empty(int(recv_counts.sum()))
    dist.all_to_all_single(received, words, recv_counts.tolist(), send_counts.tolist(), group=group)
    return received


def _values_on_owners(
    probs: torch.Tensor, positive: torch.Tensor, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's range of distinct ``score * 2 + label`` values (ascending) and all ranks' rows at each."""
    distinct, counts = _sum_runs(_sorted_values(probs, positive))
    if _world_size(group) == 1:
        return distinct, counts
    send_counts = _send_counts(distinct, group)
    words = distinct.to(torch.int64).bitwise_left_shift_(32).bitwise_or_(counts)
    del distinct, counts
    received = _sort(_exchange(words, send_counts, group))
    del words
    values = (received >> 32).to(torch.int32)
    return _sum_runs(values, received.bitwise_and_(0xFFFFFFFF))


def _area_terms(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positives, negatives, sum over scores of ``positives * (2 * negatives below + negatives at the score)``),
    int64, for one rank's sorted distinct values; in-place steps keep the temporaries to a few per value."""
    is_pos = (values & 1).bool()
    neg = counts.masked_fill(is_pos, 0)
    # A positive entry's score has negatives only in the entry just before it (value - 1), if that is there.
    neg_at = torch.zeros_like(neg)
    neg_at[1:] = neg[:-1]
    neg_at[1:].masked_fill_(values[1:] - values[:-1] != 1, 0)
    num_neg = neg.sum()
    terms = neg.cumsum_(0)  # at a positive entry: the negatives below its score and at it
    terms.mul_(2).sub_(neg_at).mul_(counts).masked_fill_(~is_pos, 0)
    return counts.sum() - num_neg, num_neg, terms.sum()


def _distributed_auc(probs: torch.Tensor, positive: torch.Tensor, group: ProcessGroup | None) -> float:
    """Exact AUC of all ranks' rows, ties counting one half; NaN with one class only."""
    world_size = _world_size(group)
    num_pos, num_neg, twice_area = _area_terms(*_values_on_owners(probs, positive, group))
    # Slots: [positives per rank | negatives per rank | 2 * the area within ranks]; one all-reduce.
    totals = torch.zeros(2 * world_size + 1, dtype=torch.int64, device=probs.device)
    rank = dist.get_rank(group) if world_size > 1 else 0
    totals[rank], totals[world_size + rank], totals[-1] = num_pos, num_neg, twice_area
    totals = _all_reduce(totals, group).cpu()
    pos_per_rank, neg_per_rank = totals[:world_size], totals[world_size:-1]
    num_pos, num_neg = int(pos_per_rank.sum()), int(neg_per_rank.sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    # Every positive on rank r ranks above the negatives of the ranks below it (their ranges lie lower).
    neg_below_rank = torch.cumsum(neg_per_rank, 0) - neg_per_rank
    twice_area = int(totals[-1]) + 2 * int((pos_per_rank * neg_below_rank).sum())
    return twice_area / (2 * num_pos * num_neg)


def distributed_binary_metrics(
    probs: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None = None
) -> BinaryMetrics:
    """:class:`BinaryMetrics` of all ranks' rows together, the same on every rank, no rank holding them all.

    Args:
        probs: this rank's probabilities in [0, 1] (float32; may be empty on some ranks).
        labels: this rank's labels in {0, 1}, as many as ``probs``.
        group: the process group (the default one when initialized; none: this process's rows alone).

    Raises:
        ValueError: no rows on any rank, or more than ``MAX_ROWS`` rows in all (raised on all ranks).

    A NaN probability (or one outside [0, 1]) on any rank makes the AUC NaN on all, as the logloss.
    """
    probs = probs.detach().float().flatten().contiguous()
    labels = labels.detach().flatten()
    if probs.numel() != labels.numel():
        raise ValueError(f"{probs.numel()} probabilities but {labels.numel()} labels")
    totals = _all_reduce(_local_sums(probs, labels), group).tolist()
    num_rows, num_positive, sum_probs, sum_logloss, num_correct, num_invalid = totals
    if num_rows == 0:
        raise ValueError("evaluation needs at least one prediction over all ranks, got none")
    if num_rows > MAX_ROWS:
        raise ValueError(f"{int(num_rows):,} rows: the distributed AUC counts at most {MAX_ROWS:,} (evaluate fewer)")
    if num_invalid:  # the logloss is NaN too; every rank sees the count, so all skip the AUC's collectives
        logger.warning("%d predictions are NaN or outside [0, 1]: AUC and logloss are NaN", int(num_invalid))
        auc = float("nan")
    else:
        auc = _distributed_auc(probs, labels == 1, group)
    return metrics_from_totals(int(num_rows), num_positive, sum_probs, sum_logloss, num_correct, auc)


class PredictionAccumulator:
    """Accumulates this rank's (probability, label, weight) rows without host syncs, then scores them over all
    ranks with :func:`distributed_binary_metrics`. Rows of weight 0 (the eval loader's padding) are dropped."""

    def __init__(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        # After compute() with rows given: on rank 0, all ranks' probabilities in row order (None elsewhere).
        self.predictions: torch.Tensor | None = None

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        self._probs.append(torch.sigmoid(logits.detach().float().flatten()))
        self._labels.append(labels.detach().float().flatten())
        self._weights.append(weights.to(logits.device).float().flatten())
        if rows is not None:
            self._rows.append(rows.to(logits.device).long().flatten())

    def compute(self, group: ProcessGroup | None = None) -> BinaryMetrics:
        """The metrics over all ranks (the same on each); call once, on every rank.

        When ``update`` was given row indices, rank 0 also gathers every rank's probabilities and row indices
        (12 bytes a row, all rows on rank 0) into :attr:`predictions`, in row order, for the file users ask for.
        """
        probs, labels, weights = (_take(parts) for parts in (self._probs, self._labels, self._weights))
        keep = weights > 0
        kept_probs, kept_labels = probs[keep], labels[keep]
        del labels, weights
        rows = torch.where(keep, _take(self._rows), -1) if self._rows else None
        if rows is None:
            del probs  # only the rows that count stay
        metrics = distributed_binary_metrics(kept_probs, kept_labels, group)
        if rows is not None:
            self.predictions = _predictions_on_rank_zero(probs, rows, group)
        return metrics


def _take(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate and empty the list, so the pieces are freed."""
    whole = torch.cat(parts) if parts else torch.empty(0)
    parts.clear()
    return whole


def _predictions_on_rank_zero(
    probs: torch.Tensor, rows: torch.Tensor, group: ProcessGroup | None
) -> torch.Tensor | None:
    """All ranks' probabilities in row order on rank 0 (rows of -1 are padding); None on other ranks.

    Every rank holds as many rows (the eval loader pads), so a fixed-size gather suffices.
    """
    world_size = _world_size(group)
    if world_size > 1:
        rank_zero = dist.get_rank(group) == 0
        parts = [(torch.empty_like(probs), torch.empty_like(rows)) for _ in range(world_size)] if rank_zero else None
        dist.gather(probs, [p for p, _ in parts] if parts else None, group=group, group_dst=0)
        dist.gather(rows, [r for _, r in parts] if parts else None, group=group, group_dst=0)
        if not rank_zero:
            return None
        probs, rows = torch.cat([p for p, _ in parts]), torch.cat([r for _, r in parts])
    probs, rows = probs.cpu(), rows.cpu()
    real = rows >= 0
    ordered = torch.empty(int(real.sum()), dtype=torch.float32)
    ordered[rows[real]] = probs[real]
    return ordered
