"""Synthetic MovieLens-style user-item interactions with a known latent-factor ground truth.

Writes ``train.tsv``, ``val.tsv`` and ``test.tsv`` in the layout :data:`SCHEMA` declares (select it with
``data=movielens``, whose YAML declares the same columns)::

    label  item_age_days  user_activity  user_id  item_id  genre  user_age_bucket

all decimal integers (``data.categorical_format=int``), and ``optimum.json``: the Bayes-optimal AUC and
logloss of the held-out splits from the true like probabilities, as :mod:`pipeline.data.synthetic` does.

Each row is one impression: a user drawn by activity (Zipf over a random ranking of users) and an
item drawn by popularity (Zipf over a random ranking of items), independently. The label ("liked" /
"clicked") is drawn from

    p = sigmoid(b0 + <u_user, v_item> + b_user + b_item + A[age_bucket, genre]
                + w_age * z(item_age) + w_act * z(user_activity))

with latent vectors u, v of rank ``latent_dim`` scaled so that <u, v> has std ``latent_scale``, per-user and
per-item biases, an age-bucket x genre affinity table, and small effects of the two dense columns
(z = standardised log1p). Every user has one age bucket and a fixed activity count; every item one
genre and a fixed age in days. ``b0`` is solved for ``target_ctr``. Matrix factorisation
(``model=mf``) can learn the <u, v> part; DLRM the whole. Everything is drawn from ``seed``, chunk by
chunk, so the output is reproducible byte for byte.

With ``num_recent_items`` N > 0 (``data=movielens_recent``) a sequence column ``recent_items`` follows:
the items shown to the same user in the rows before this one (train, then val, then test: the log in time
order), oldest first, the last N of them, decimal ids separated by ``,`` (empty for a user's first row).
The logit gains the item's affinity to them,

    + sum_(r in recent_items) <c_item, c_r>

with item vectors c of rank ``latent_dim`` scaled so that the sum has std ``recent_items_scale`` over a full
history: a sum-pooled embedding bag of the recent items dotted with the item's embedding (DLRM's
interaction) represents it exactly. :func:`schema` gives the layout.

Run directly: ``python -m pipeline.data.movielens --out data/movielens/raw --train-rows 200000``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import CategoricalFormat, MovieLensConfig
from pipeline.data.generators import base
from pipeline.data.schema import Schema

logger = logging.getLogger(__name__)

DENSE_COLUMNS = ("item_age_days", "user_activity")
SPARSE_COLUMNS = ("user_id", "item_id", "genre", "user_age_bucket")
SCHEMA = Schema(DENSE_COLUMNS, SPARSE_COLUMNS, SPARSE_COLUMNS, CategoricalFormat.int)  # num_recent_items=0
RECENT_ITEMS = "recent_items"
GENERATOR = "pipeline.data.movielens"
_USER_BIAS = 0.4  # std of the per-user bias (logit scale)
_ITEM_BIAS = 0.6  # std of the per-item bias
_AFFINITY = 0.4  # std of the age-bucket x genre affinity
_W_ITEM_AGE = -0.25  # newer items are liked a little more
_W_ACTIVITY = 0.15  # active users like a little more
_MAX_ITEM_AGE_DAYS = 20 * 365


@dataclass
class _Truth:
    """The ground-truth parameters, all drawn from the seed."""

    user_cdf: np.ndarray  # Zipf CDF over activity ranks
    user_by_rank: np.ndarray  # activity rank -> user id
    item_cdf: np.ndarray  # Zipf CDF over popularity ranks
    item_by_rank: np.ndarray  # popularity rank -> item id
    user_latent: np.ndarray  # [users, k]
    item_latent: np.ndarray  # [items, k]
    user_bias: np.ndarray  # [users]
    item_bias: np.ndarray  # [items]
    item_genre: np.ndarray  # [items] genre id
    user_age_bucket: np.ndarray  # [users] age bucket id
    affinity: np.ndarray  # [age buckets, genres]
    item_age_days: np.ndarray  # [items] int
    user_activity: np.ndarray  # [users] int, interactions the user has logged
    item_age_z: np.ndarray  # [items] standardised log1p(item_age_days)
    user_activity_z: np.ndarray  # [users] standardised log1p(user_activity)
    history: _History | None = None  # num_recent_items > 0: each user's last items so far (advances as rows are drawn)
    item_similarity: np.ndarray | None = None  # [items, k] c: the recent-items affinity is sum_r <c_item, c_r>
    b0: float = 0.0


class _History:
    """Each user's last ``cap`` items, newest last, as the rows are drawn in order."""

    def __init__(self, num_users: int, cap: int) -> None:
        self.cap = cap
        self.items = np.zeros((num_users, cap), dtype=np.int64)  # right-aligned: the newest in the last column
        self.lengths = np.zeros(num_users, dtype=np.int64)

    def advance(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's history before it (lengths [n], values flat in row order, oldest first); then the rows'
        items join their users' histories."""
        n, cap = len(users), self.cap
        order = np.argsort(users, kind="stable")
        grouped_users = users[order]
        starts = np.flatnonzero(np.r_[True, grouped_users[1:] != grouped_users[:-1]])
        group_users = grouped_users[starts]
        counts = np.diff(np.r_[starts, n])
        kept = self.lengths[group_users]
        # Per user: the kept history, then this chunk's items in row order, in one flat array.
        sizes = kept + counts
        group_start = np.r_[0, np.cumsum(sizes)[:-1]]
        flat = np.empty(int(sizes.sum()), dtype=np.int64)
        j = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        g = np.repeat(np.arange(len(group_users)), kept)
        flat[group_start[g] + j] = self.items[group_users[g], cap - kept[g] + j]
        position = np.arange(n) - np.repeat(starts, counts)  # the row's place among its user's rows here
        group_of_row = np.repeat(np.arange(len(group_users)), counts)
        end = group_start[group_of_row] + kept[group_of_row] + position
        flat[end] = items[order]
        # A row's history ends just before its own item.
        length_sorted = np.minimum(cap, kept[group_of_row] + position)
        lengths = np.empty(n, dtype=np.int64)
        lengths[order] = length_sorted
        ends = np.empty(n, dtype=np.int64)
        ends[order] = end
        offsets = np.repeat(ends - lengths, lengths)
        values = flat[offsets + np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)]
        # The new histories: the last cap of each user's flat run.
        new = np.minimum(cap, sizes)
        j = np.arange(int(new.sum())) - np.repeat(np.cumsum(new) - new, new)
        g = np.repeat(np.arange(len(group_users)), new)
        self.items[group_users[g], cap - new[g] + j] = flat[group_start[g] + sizes[g] - new[g] + j]
        self.lengths[group_users] = new
        return lengths, values


def list_lengths(cfg: MovieLensConfig) -> dict[str, int]:
    """The most ids the generator writes in each list column (a declared cap at least this keeps them all)."""
    return {RECENT_ITEMS: cfg.num_recent_items} if cfg.num_recent_items > 0 else {}


def schema(cfg: MovieLensConfig) -> Schema:
    """The raw layout the generator writes for ``cfg`` (:data:`SCHEMA`, then ``recent_items`` when configured)."""
    if cfg.num_recent_items <= 0:
        return SCHEMA
    sparse = (*SPARSE_COLUMNS, RECENT_ITEMS)
    return Schema(DENSE_COLUMNS, sparse, sparse, CategoricalFormat.int, ((RECENT_ITEMS, cfg.num_recent_items),))


def _zipf_cdf(n: int, alpha: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return cdf


def _standardise(x: np.ndarray) -> np.ndarray:
    z = np.log1p(x.astype(np.float64))
    return (z - z.mean()) / max(z.std(), 1e-9)


def _make_truth(cfg: MovieLensConfig) -> _Truth:
    rng = np.random.default_rng([cfg.seed, 0])
    k = cfg.latent_dim
    # <u, v> of iid N(0, s^2) coordinates has variance k s^4.
    s = (cfg.latent_scale**2 / k) ** 0.25
    user_cdf, item_cdf = _zipf_cdf(cfg.num_users, cfg.zipf_alpha), _zipf_cdf(cfg.num_items, cfg.zipf_alpha)
    user_by_rank, item_by_rank = rng.permutation(cfg.num_users), rng.permutation(cfg.num_items)
    # Activity: the user's expected share of a million interactions, drawn Poisson; fixed per user.
    share = np.diff(user_cdf, prepend=0.0)[np.argsort(user_by_rank)]
    user_activity = rng.poisson(share * 1_000_000) + 1
    item_age_days = rng.integers(0, _MAX_ITEM_AGE_DAYS, cfg.num_items)
    genre_weights = rng.dirichlet(np.full(cfg.num_genres, 2.0))
    age_weights = rng.dirichlet(np.full(cfg.num_age_buckets, 4.0))
    truth = _Truth(
        user_cdf=user_cdf,
        user_by_rank=user_by_rank,
        item_cdf=item_cdf,
        item_by_rank=item_by_rank,
        user_latent=rng.normal(0.0, s, (cfg.num_users, k)),
        item_latent=rng.normal(0.0, s, (cfg.num_items, k)),
        user_bias=rng.normal(0.0, _USER_BIAS, cfg.num_users),
        item_bias=rng.normal(0.0, _ITEM_BIAS, cfg.num_items),
        item_genre=rng.choice(cfg.num_genres, cfg.num_items, p=genre_weights),
        user_age_bucket=rng.choice(cfg.num_age_buckets, cfg.num_users, p=age_weights),
        affinity=rng.normal(0.0, _AFFINITY, (cfg.num_age_buckets, cfg.num_genres)),
        item_age_days=item_age_days,
        user_activity=user_activity,
        item_age_z=_standardise(item_age_days),
        user_activity_z=_standardise(user_activity),
    )
    users, items = _draw_pairs(truth, np.random.default_rng([cfg.seed, 1]), 100_000)
    logits = _logits(truth, users, items)
    if cfg.num_recent_items > 0:
        # Its own seed stream: the columns of the layout without recent_items keep their bytes.
        k, cap = cfg.latent_dim, cfg.num_recent_items
        # sum of cap products <c, c'> of iid N(0, s^2) coordinates has variance cap k s^4.
        s = (cfg.recent_items_scale**2 / (cap * k)) ** 0.25
        truth.item_similarity = np.random.default_rng([cfg.seed, 3]).normal(0.0, s, (cfg.num_items, k))
        # The bias is solved over calibration rows with histories of their own (a scratch log).
        truth.history = _History(cfg.num_users, cap)
        logits = logits + _recent_logit(truth, items, *truth.history.advance(users, items))
        truth.history = _History(cfg.num_users, cap)
    lo, hi = -20.0, 20.0
    for _ in range(60):  # bisect the global bias for the target like rate
        mid = (lo + hi) / 2
        if base.sigmoid(logits + mid).mean() < cfg.target_ctr:
            lo = mid
        else:
            hi = mid
    truth.b0 = (lo + hi) / 2
    return truth


def _draw_pairs(truth: _Truth, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, item ids) of ``n`` impressions."""
    u = np.minimum(np.searchsorted(truth.user_cdf, rng.random(n), side="right"), len(truth.user_cdf) - 1)
    i = np.minimum(np.searchsorted(truth.item_cdf, rng.random(n), side="right"), len(truth.item_cdf) - 1)
    return truth.user_by_rank[u], truth.item_by_rank[i]


def _logits(truth: _Truth, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    dot = np.einsum("nk,nk->n", truth.user_latent[users], truth.item_latent[items])
    return (
        truth.b0
        + dot
        + truth.user_bias[users]
        + truth.item_bias[items]
        + truth.affinity[truth.user_age_bucket[users], truth.item_genre[items]]
        + _W_ITEM_AGE * truth.item_age_z[items]
        + _W_ACTIVITY * truth.user_activity_z[users]
    )


def _recent_logit(truth: _Truth, items: np.ndarray, lengths: np.ndarray, recent: np.ndarray) -> np.ndarray:
    """sum over each row's recent items r of <c_item, c_r>."""
    c = truth.item_similarity
    row = np.repeat(np.arange(len(items)), lengths)
    return np.bincount(row, weights=np.einsum("nk,nk->n", c[items][row], c[recent]), minlength=len(items))


def _chunk_table(truth: _Truth, rng: np.random.Generator, n: int) -> base.Chunk:
    users, items = _draw_pairs(truth, rng, n)
    logit = _logits(truth, users, items)
    if truth.history is not None:
        lengths, recent = truth.history.advance(users, items)
        logit = logit + _recent_logit(truth, items, lengths, recent)
    prob = base.sigmoid(logit)
    labels = (rng.random(n) < prob).astype(np.int8)
    columns = {
        "label": labels,
        "item_age_days": truth.item_age_days[items],
        "user_activity": truth.user_activity[users],
        "user_id": users,
        "item_id": items,
        "genre": truth.item_genre[items],
        "user_age_bucket": truth.user_age_bucket[users],
    }
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if truth.history is not None:
        tokens = pc.cast(pa.array(recent), pa.string())
        offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        table = table.append_column(RECENT_ITEMS, pc.binary_join(pa.ListArray.from_arrays(offsets, tokens), ","))
    return base.Chunk(table, prob, labels)


def generate(cfg: MovieLensConfig, out_dir: str | Path) -> dict:
    """Write train/val/test TSV and optimum.json into ``out_dir``; return the optimum record."""
    truth = _make_truth(cfg)  # a fresh truth: the histories start empty
    return base.generate(GENERATOR, cfg, out_dir, truth, _chunk_table, {"schema": schema(cfg).to_dict()})


def is_complete(cfg: MovieLensConfig, out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished generation with exactly this config."""
    return base.is_complete(GENERATOR, cfg, out_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    defaults = MovieLensConfig()
    p.add_argument("--train-rows", type=int, default=defaults.num_train_rows)
    p.add_argument("--val-rows", type=int, default=defaults.num_val_rows)
    p.add_argument("--test-rows", type=int, default=defaults.num_test_rows)
    p.add_argument("--users", type=int, default=defaults.num_users)
    p.add_argument("--items", type=int, default=defaults.num_items)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--recent-items", type=int, default=defaults.num_recent_items, help="> 0: a recent_items column")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = MovieLensConfig(
        num_users=a.users,
        num_items=a.items,
        num_train_rows=a.train_rows,
        num_val_rows=a.val_rows,
        num_test_rows=a.test_rows,
        seed=a.seed,
        num_recent_items=a.recent_items,
    )
    record = generate(cfg, a.out)
    print(json.dumps(record["optimum"], indent=2))


if __name__ == "__main__":
    main()
