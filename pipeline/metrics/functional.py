"""Exact binary-classification metrics over a full set of predictions.

AUC is exact (torchmetrics' binary AUROC: every distinct threshold, ties count one half), not the
bucketed approximation some trainers report; the others follow the DLRM/TorchRec definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import binary_auroc

LOGLOSS_CLIP = 1e-7  # probabilities are clipped to [LOGLOSS_CLIP, 1 - LOGLOSS_CLIP] in the logloss


@dataclass
class BinaryMetrics:
    """Evaluation metrics of click probabilities against 0/1 labels."""

    auc: float  # area under the ROC curve
    logloss: float  # mean binary cross-entropy, natural log
    normalized_entropy: float  # logloss / entropy of the observed click rate (He et al. 2014)
    accuracy: float  # fraction right at threshold 0.5
    calibration: float  # mean prediction / observed click rate (1 = calibrated)
    ctr: float  # observed click rate
    num_samples: int


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor) -> BinaryMetrics:
    """Compute :class:`BinaryMetrics` from probabilities in [0, 1] and labels in {0, 1}."""
    probs = probs.detach().double().flatten()
    labels = labels.detach().double().flatten()
    if probs.numel() == 0:
        raise ValueError("binary_metrics needs at least one prediction")
    clipped = probs.clamp(LOGLOSS_CLIP, 1 - LOGLOSS_CLIP)
    sum_logloss = -(labels * clipped.log() + (1 - labels) * (1 - clipped).log()).sum().item()
    num_positive = labels.sum().item()
    both_classes = 0 < num_positive < probs.numel()
    return metrics_from_totals(
        num_samples=probs.numel(),
        num_positive=num_positive,
        sum_probs=probs.sum().item(),
        sum_logloss=sum_logloss,
        num_correct=((probs > 0.5).double() == labels).sum().item(),
        auc=binary_auroc(probs, labels.long()).item() if both_classes else float("nan"),
    )


def metrics_from_totals(
    num_samples: int, num_positive: float, sum_probs: float, sum_logloss: float, num_correct: float, auc: float
) -> BinaryMetrics:
    """:class:`BinaryMetrics` from sums over all rows (what one process or all ranks together hold).

    ``sum_logloss`` is the summed cross-entropy of the probabilities clipped to [1e-7, 1 - 1e-7];
    ``num_correct`` counts rows where ``prob > 0.5`` equals the label.
    """
    logloss = sum_logloss / num_samples
    ctr = num_positive / num_samples
    c = min(max(ctr, LOGLOSS_CLIP), 1 - LOGLOSS_CLIP)
    base_entropy = -(c * math.log(c) + (1 - c) * math.log(1 - c))
    return BinaryMetrics(
        auc=auc,
        logloss=logloss,
        normalized_entropy=logloss / base_entropy,
        accuracy=num_correct / num_samples,
        calibration=sum_probs / num_samples / ctr if ctr > 0 else float("nan"),
        ctr=ctr,
        num_samples=int(num_samples),
    )
