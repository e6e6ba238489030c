"""Exact evaluation over all ranks without any rank holding all predictions.

Every metric but AUC is a sum over rows, all-reduced in float64. The exact AUC (every threshold, ties
counting one half, as :func:`~pipeline.metrics.functional.binary_metrics`) is a distributed
sort-and-count:

1. each rank sorts its scores and counts positives and negatives per distinct score. A probability's
   float32 bits, read as an integer, order like the probability (for non-negative floats), so ties are
   ties of float32 values, as in the gathered computation;
2. an all-reduced histogram of the scores' high bits (distinct scores per bin, over all ranks) cuts the
   score range into one run of bins per rank, about equal in size; equal scores share a bin, so they
   always meet on one rank;
3. an all-to-all sends each (score, positives, negatives) to the rank owning its bin, which merges them;
4. each rank adds up ``pos * (2 * negatives below + negatives at the score)`` over its scores, the
   negatives below its range coming from the per-rank counts of one all-reduce, and
   AUC = sum / (2 * positives * negatives), in exact integer arithmetic.

A rank holds its own rows, its distinct scores (at most as many) and the distinct scores it receives
(about 1/world_size of all ranks' distinct scores, plus at most one histogram bin), never all rows.
Collectives run on the tensors' device (CPU for gloo, the model's GPU for nccl); without a process group,
or on one rank, there are none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipeline.metrics.functional import LOGLOSS_CLIP, BinaryMetrics, metrics_from_totals

_ONE_BITS = 0x3F800000  # float32 1.0 as an int32: every probability's key is at most this
_KEY_SHIFT = 14  # 2**14 consecutive float32 values per histogram bin (512 bins per power of two)
NUM_SCORE_BINS = (_ONE_BITS >> _KEY_SHIFT) + 1  # 65,025 bins over [0, 1]: 520 KB of int64 counts to all-reduce
_SUM_CHUNK = 1 << 20  # rows per float64 pass of the sums: bounds their temporaries


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


def _run_sums(values: torch.Tensor, run_ends: torch.Tensor) -> torch.Tensor:
    """int64 sums of ``values`` over consecutive runs ending (inclusive) at ``run_ends``."""
    at_ends = values.cumsum(0, dtype=torch.int64)[run_ends]
    return torch.diff(at_ends, prepend=at_ends.new_zeros(1))


def _sum_by_score(
    keys: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct keys in ascending order with their summed positives and negatives (int64)."""
    sorted_keys, order = torch.sort(keys)
    distinct, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    del sorted_keys
    run_ends = counts.cumsum(0) - 1
    return distinct, _run_sums(pos[order], run_ends), _run_sums(neg[order], run_ends)


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


def _exchange(rows: torch.Tensor, dest: torch.Tensor, world_size: int, group: ProcessGroup | None) -> torch.Tensor:
    """Send each row of ``rows`` (sorted by ``dest``) to rank ``dest``; returns the rows this rank receives."""
    send_counts = torch.bincount(dest, minlength=world_size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    received = rows.new_empty((int(recv_counts.sum()), rows.shape[1]))
    dist.all_to_all_single(received, rows, recv_counts.tolist(), send_counts.tolist(), group=group)
    return received


def _scores_on_owners(
    probs: torch.Tensor, positive: torch.Tensor, count_dtype: torch.dtype, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's range of distinct scores (int keys, ascending) with all ranks' positives and negatives at each."""
    # A non-negative float's bits, as an int32, order like the float; -0.0's bits are negative: clamped to +0.0.
    keys = probs.view(torch.int32).clamp_min(0)
    keys, pos, neg = _sum_by_score(keys, positive, ~positive)
    world_size = _world_size(group)
    if world_size == 1:
        return keys, pos, neg
    bins = (keys >> _KEY_SHIFT).long()
    hist = _all_reduce(torch.bincount(bins, minlength=NUM_SCORE_BINS), group)
    dest = score_bin_owners(hist, world_size)[bins]
    del bins, hist
    triples = torch.stack([keys.to(count_dtype), pos.to(count_dtype), neg.to(count_dtype)], dim=1)
    del keys, pos, neg
    received = _exchange(triples, dest, world_size, group)
    del triples, dest
    return _sum_by_score(received[:, 0].contiguous(), received[:, 1], received[:, 2])


def _distributed_auc(probs: torch.Tensor, positive: torch.Tensor, num_rows: int, group: ProcessGroup | None) -> float:
    """Exact AUC of all ranks' rows, ties counting one half; NaN with one class only."""
    world_size = _world_size(group)
    # int32 counts halve the all-to-all; a count above 2**31 - 1 needs that many rows on one rank.
    count_dtype = torch.int32 if num_rows < 2**31 else torch.int64
    _, pos, neg = _scores_on_owners(probs, positive, count_dtype, group)
    neg_below_here = torch.cumsum(neg, 0) - neg  # negatives below each score, from this rank's range
    # Slots: [positives per rank | negatives per rank | this rank's part of 2 * the area]; one all-reduce.
    totals = torch.zeros(2 * world_size + 1, dtype=torch.int64, device=probs.device)
    rank = dist.get_rank(group) if world_size > 1 else 0
    totals[rank] = pos.sum()
    totals[world_size + rank] = neg.sum()
    totals[-1] = (pos * (2 * neg_below_here + neg)).sum()
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
        ValueError: no rows on any rank, or a probability outside [0, 1] (NaN) on any rank (raised on all).
    """
    probs = probs.detach().float().flatten().contiguous()
    labels = labels.detach().flatten()
    if probs.numel() != labels.numel():
        raise ValueError(f"{probs.numel()} probabilities but {labels.numel()} labels")
    totals = _all_reduce(_local_sums(probs, labels), group).tolist()
    num_rows, num_positive, sum_probs, sum_logloss, num_correct, num_invalid = totals
    if num_rows == 0:
        raise ValueError("evaluation needs at least one prediction over all ranks, got none")
    if num_invalid:
        raise ValueError(f"{int(num_invalid)} probabilities outside [0, 1] or NaN: the model's outputs are not finite")
    auc = _distributed_auc(probs, labels == 1, int(num_rows), group)
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
