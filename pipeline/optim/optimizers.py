"""The two optimizers of a DLRM: a table optimizer FBGEMM fuses into the embedding backward, and a dense one
for the MLPs, applied after backward.
"""

from __future__ import annotations

import torch
from torchrec import optim as trec_optim

from pipeline.config import (
    DenseOptimizer,
    EmbeddingOptimizer,
    OptimizerConfig,
)


def fused_table_optimizer(cfg: OptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The table optimizer and its FBGEMM arguments.

    TorchRec's optimizer classes accept (and ignore) FBGEMM-only keyword arguments, and the kwargs
    are handed to FBGEMM's fused kernel as they are: Adam's betas must be spelled beta1/beta2.
    """
    lr = cfg.embedding_lr if cfg.embedding_lr is not None else cfg.lr
    if cfg.embedding == EmbeddingOptimizer.sgd:
        return trec_optim.SGD, {"lr": lr}
    if cfg.embedding == EmbeddingOptimizer.adagrad:
        return trec_optim.Adagrad, {"lr": lr, "eps": cfg.eps}
    if cfg.embedding == EmbeddingOptimizer.row_wise_adagrad:
        return trec_optim.RowWiseAdagrad, {"lr": lr, "eps": cfg.eps}
    return trec_optim.Adam, {"lr": lr, "eps": cfg.eps, "beta1": cfg.betas[0], "beta2": cfg.betas[1]}


def dense_optimizer_factory(cfg: OptimizerConfig):
    if cfg.dense == DenseOptimizer.sgd:
        return lambda params: torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.dense == DenseOptimizer.adagrad:
        return lambda params: torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return lambda params: torch.optim.Adam(
        params, lr=cfg.lr, eps=cfg.eps, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
