"""Defaults that follow the data: settings left null are chosen from the number of training rows.

A click log of a hundred thousand rows and one of billions want different batch sizes and epoch counts,
and a fixed default serves one of them badly (2048 rows a step leaves a 125k-row log 61 updates). A batch
chosen small comes with a smaller table learning rate (Adagrad tables; see :func:`scaled_table_lr`). What
is chosen, and why, is logged at start and written into the run's ``config.yaml`` and ``summary.json``
(``chosen_from_data``); setting the key yourself always wins (a batch you set keeps your rates as given).
"""

from __future__ import annotations

import math

from pipeline.config import EmbeddingOptimizer, TrainConfig

UPDATES_PER_EPOCH = 1000  # the batch size gives an epoch at least this many updates ...
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 64, 2048  # ... as a power of two in this range
SAMPLES_PER_RUN = 1_000_000  # small logs train for about this many samples ...
MAX_AUTO_EPOCHS = 4  # ... in at most this many epochs (each from fresh tables, the best one kept)
TABLE_LR_BATCH = 256  # a batch chosen below this scales the Adagrad tables' rate by sqrt(batch / this)
_ADAGRAD_TABLES = (EmbeddingOptimizer.adagrad, EmbeddingOptimizer.row_wise_adagrad)


def auto_global_batch_size(num_train_rows: int, world_size: int) -> int:
    """The largest power of two giving an epoch ``UPDATES_PER_EPOCH`` updates, within [``MIN_AUTO_BATCH``,
    ``MAX_AUTO_BATCH``], rounded up to a multiple of the world size."""
    target = max(1, num_train_rows // UPDATES_PER_EPOCH)
    batch = min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, 1 << (target.bit_length() - 1)))
    return -(-batch // world_size) * world_size


def auto_num_epochs(num_train_rows: int) -> int:
    """One epoch from ``SAMPLES_PER_RUN`` rows up; below that, enough epochs to see about that many samples,
    at most ``MAX_AUTO_EPOCHS``."""
    return min(MAX_AUTO_EPOCHS, max(1, math.ceil(SAMPLES_PER_RUN / max(1, num_train_rows))))


def scaled_table_lr(lr: float, batch: int) -> float:
    """The tables' learning rate for a batch chosen from the data: ``lr`` from ``TABLE_LR_BATCH`` rows up,
    ``lr * sqrt(batch / TABLE_LR_BATCH)`` below (0.1 -> 0.05 at 64): smaller batches update each row more
    often (figures in benchmarks/README.md, "Model quality on your own files")."""
    return lr if batch >= TABLE_LR_BATCH else round(lr * math.sqrt(batch / TABLE_LR_BATCH), 6)


def adapt_to_data(cfg: TrainConfig, num_train_rows: int, world_size: int) -> list[str]:
    """Fill the settings left null (``data.global_batch_size``, ``trainer.num_epochs``) from the training rows,
    with the table learning rate that goes with a chosen batch, in place; return one line per value chosen,
    with the reason."""
    chosen = []
    d, t, o = cfg.data, cfg.trainer, cfg.optimizer
    if d.global_batch_size is None:
        d.global_batch_size = auto_global_batch_size(num_train_rows, world_size)
        chosen.append(
            f"data.global_batch_size={d.global_batch_size}: {num_train_rows:,} training rows, at least "
            f"{UPDATES_PER_EPOCH} updates per epoch with a power of two in [{MIN_AUTO_BATCH}, "
            f"{MAX_AUTO_BATCH}] ({num_train_rows // d.global_batch_size:,} per epoch)"
        )
        table_lr = o.embedding_lr if o.embedding_lr is not None else o.lr
        scaled = scaled_table_lr(table_lr, d.global_batch_size)
        if o.embedding in _ADAGRAD_TABLES and scaled != table_lr:
            o.embedding_lr = scaled
            chosen.append(
                f"optimizer.embedding_lr={o.embedding_lr:g}: {table_lr:g} x sqrt({d.global_batch_size}/"
                f"{TABLE_LR_BATCH}) with the batch chosen from the data (a batch you set keeps your rates)"
            )
    if t.num_epochs is None:
        t.num_epochs = auto_num_epochs(num_train_rows)
        reason = (
            f"{num_train_rows:,} training rows: one epoch from {SAMPLES_PER_RUN:,} up"
            if t.num_epochs == 1
            else f"{num_train_rows:,} training rows: about {SAMPLES_PER_RUN:,} samples in at most {MAX_AUTO_EPOCHS} "
            "epochs, each from fresh tables (trainer.reset_tables_each_epoch), the best one kept"
        )
        chosen.append(f"trainer.num_epochs={t.num_epochs}: {reason}")
    return chosen
