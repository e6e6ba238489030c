"""Logging of the command-line tools (export, predict, plan, report, doctor): the pipeline's messages at INFO,
other libraries' at WARNING (FBGEMM announces every library it loads)."""

from __future__ import annotations

import logging


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # a torch-internal nag at TorchRec's forward
