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

from pipeline.config import CategoricalFormat, MovieLensConfig
from pipeline.data.generators import base
from pipeline.data.schema import Schema

logger = logging.getLogger(__name__)

DENSE_COLUMNS = ("item_age_days", "user_activity")
SPARSE_COLUMNS = ("user_id", "item_id", "genre", "user_age_bucket")
SCHEMA = Schema(DENSE_COLUMNS, SPARSE_COLUMNS, SPARSE_COLUMNS, CategoricalFormat.int)
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
    b0: float = 0.0


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


def _chunk_table(truth: _Truth, rng: np.random.Generator, n: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    users, items = _draw_pairs(truth, rng, n)
    prob = base.sigmoid(_logits(truth, users, items))
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
    return pa.table({k: pa.array(v) for k, v in columns.items()}), prob, labels


def generate(cfg: MovieLensConfig, out_dir: str | Path) -> dict:
    """Write train/val/test TSV and optimum.json into ``out_dir``; return the optimum record."""
    truth = _make_truth(cfg)
    return base.generate(GENERATOR, cfg, out_dir, truth, _chunk_table, {"schema": SCHEMA.to_dict()})


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
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = MovieLensConfig(
        num_users=a.users,
        num_items=a.items,
        num_train_rows=a.train_rows,
        num_val_rows=a.val_rows,
        num_test_rows=a.test_rows,
        seed=a.seed,
    )
    record = generate(cfg, a.out)
    print(json.dumps(record["optimum"], indent=2))


if __name__ == "__main__":
    main()
