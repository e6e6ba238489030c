"""Exact binary-classification metrics over a full set of predictions.

AUC is exact (torchmetrics' binary AUROC: every distinct threshold, ties count one half), not the
bucketed approximation some trainers report; the others follow the DLRM/TorchRec definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import binary_auroc

_EPS = 1e-7


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
    clipped = probs.clamp(_EPS, 1 - _EPS)
    logloss = -(labels * clipped.log() + (1 - labels) * (1 - clipped).log()).mean().item()
    ctr = labels.mean().item()
    c = min(max(ctr, _EPS), 1 - _EPS)
    base_entropy = -(c * torch.tensor(c).log() + (1 - c) * torch.tensor(1 - c).log()).item()
    both_classes = 0 < ctr < 1
    auc = binary_auroc(probs, labels.long()).item() if both_classes else float("nan")
    return BinaryMetrics(
        auc=auc,
        logloss=logloss,
        normalized_entropy=logloss / base_entropy,
        accuracy=((probs > 0.5).double() == labels).double().mean().item(),
        calibration=probs.mean().item() / ctr if ctr > 0 else float("nan"),
        ctr=ctr,
        num_samples=int(probs.numel()),
    )
