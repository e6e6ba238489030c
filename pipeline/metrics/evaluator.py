"""Exact evaluation over all ranks: every rank's predictions are gathered, then scored once.

Each rank holds the same number of predictions (the eval loader pads the last batch and marks the
padding with weight 0), so a plain ``all_gather`` of fixed-size tensors suffices and every rank ends
with identical metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.metrics.functional import BinaryMetrics, binary_metrics


class PredictionGatherer:
    """Accumulates this rank's (probability, label, weight) rows without host syncs."""

    def __init__(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self.predictions: torch.Tensor | None = None  # after compute(): probabilities in row order, if rows were given

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        self._probs.append(torch.sigmoid(logits.detach().float().flatten()))
        self._labels.append(labels.detach().float().flatten())
        self._weights.append(weights.to(logits.device).float().flatten())
        if rows is not None:
            self._rows.append(rows.to(logits.device).long().flatten())

    def compute(self) -> BinaryMetrics:
        """Gather every rank's rows, drop padding, and compute the metrics (same on all ranks)."""
        local = torch.stack([torch.cat(self._probs), torch.cat(self._labels), torch.cat(self._weights)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            local = torch.cat(parts, dim=1)
        local = local.cpu()
        keep = local[2] > 0
        if self._rows:
            rows = torch.cat(self._rows)
            if dist.is_initialized() and dist.get_world_size() > 1:
                parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, rows)
                rows = torch.cat(parts)
            rows = rows.cpu()[keep]
            self.predictions = torch.empty(len(rows), dtype=torch.float32)
            self.predictions[rows] = local[0][keep]
        return binary_metrics(local[0][keep], local[1][keep])
