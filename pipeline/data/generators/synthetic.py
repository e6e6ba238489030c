"""Synthetic Criteo-format click logs with a known ground-truth click probability.

Writes ``train.tsv``, ``val.tsv`` and ``test.tsv`` in the raw Criteo layout (label, 13 integer columns
with missing values and negatives in I2, 26 categorical columns as 8-hex-digit hashes with missing
values) and ``optimum.json``: the Bayes-optimal AUC and logloss of each held-out split, computed from
the true click probabilities the labels were drawn from, so a trained model's metrics can be read
against what is achievable.

The ground truth is a model DLRM can represent:

    logit = b0 + sum_j w_j z_j + sum_c a_c[id_c] + sum_(c,d) <V_c[id_c], V_d[id_d]> + sum_c <U_c[id_c], P z>

with z_j = log1p(max(x_j, 0)) of the raw integers (missing -> 0, the DLRM reference's transform), a
per-id effect a_c, low-rank (rank 4) pairwise interactions between categorical features, and
interactions between categorical ids and the dense features. The interacting columns are the ones
with few ids (at most ``_INTERACTING_MAX_CARDINALITY``), whose combinations recur often enough to be
learnt from one pass over the data; about two thirds of the Bayes AUC above 0.5 comes from
first-order terms and the rest from the interactions. Ids are Zipf-distributed per column at Criteo Kaggle
cardinalities capped at ``max_cardinality``. Everything is drawn from one seed, chunk by chunk, so
the output is reproducible byte for byte.

Multi-hot (list) columns, when configured (``num_list_columns``, ``weighted_column``, ``sequence_length``),
follow C26 (:func:`schema` gives the layout; ``data=synthetic_multihot`` declares it), each a bag of ids
``a1b2c3d4,00ff00ff,...`` from its own Zipf table, and add to the logit

    sum_L sum_(i in bag L) e_L[i]  +  sum_(i in W1) w_i e_W[i]  +  sum_(k < window) decay^k e_S[S1[-1 - k]]

L1..Ln: bags of 0..``max_bag_size`` ids (sizes uniform, so some are empty); W1: such a bag written
``id:weight``; S1: a sequence of 0..``sequence_length`` ids, oldest first, of which only the newest
``sequence_window`` matter, the one k places back scaled by ``sequence_decay``^k. Each is a sum over the
bag, which a sum-pooled (weighted) embedding bag represents exactly, except for a decay below 1.
The list columns are drawn independently of the others, so ``optimum.json`` also records
``optimum_without.lists``: the best a model can do that ignores them (the true probability averaged over the
list columns' draws), which the list columns' share of the signal is read against. ``one_hot_scale``
multiplies every term of the one-hot part: fewer rows then learn it (data=synthetic_multihot takes a quarter,
so a one-epoch run on 500k rows ends within 0.01 AUC of the optimum).

Days (``day``, ``new_id_share``): the ground truth is the same every day; day d > 0 draws its own rows, and with
``new_id_share`` > 0 each column's ids live in a pool twice its cardinality: each day that share of a column's
popularity ranks, drawn at random, go to ids never seen before (with effects of their own), replacing the ids
that held them. A model trained on day d knows most of day d+1's ids but not its new ones: what daily
retraining with a growing vocabulary is for.

Run directly: ``python -m pipeline.data.synthetic --out data/synthetic/raw --train-rows 1000000``.
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

from pipeline.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES, SyntheticConfig
from pipeline.data.generators import base
from pipeline.data.schema import CARDINALITIES, CRITEO, Schema

logger = logging.getLogger(__name__)

GENERATOR = "pipeline.data.synthetic"  # the name optimum.json records

_LATENT_DIM = 4
# Effect sizes of the ground truth (logit scale). Most of the signal is first-order (per-id effects,
# dense features), as in real click logs; pairwise terms add what only an interaction layer can find.
_BIAS_SCALE = (0.05, 0.35)  # per column, the std of its ids' effects is drawn from this range
_PAIR_SCALE = 0.35  # std of each latent coordinate in categorical x categorical pairs
_NUM_PAIRS = 12  # interacting categorical column pairs
# Interactions are drawn among columns of at most this many ids: their ids recur often enough that a
# model sees each combination many times in one epoch (as a real ad's site x device does).
_INTERACTING_MAX_CARDINALITY = 110
_CAT_DENSE_SCALE = 0.1  # std of each latent coordinate in categorical x dense interactions
_DENSE_W_SCALE = 0.25  # std of the dense features' weights
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# List columns: the std of a column's summed effect in a bag of the mean size (logit scale).
_LIST_SCALE = 0.8
_SEQUENCE_SCALE = 1.0  # std of the sequence's summed effect over a full window (decay 1)
_WEIGHTS = np.array([0.5, 1.0, 2.0, 3.0])  # W1's weights, written as Python floats ("0.5", "2.0")
_CALIBRATION_ROWS = 100_000
# optimum_without.lists is interpolated on this logit grid, the list logit's distribution taken in bins.
_WITHOUT_GRID = np.linspace(-30.0, 30.0, 6001)
_WITHOUT_BINS = 1000


@dataclass
class _ListTruth:
    """Ground truth of the list columns (drawn from their own seed stream: the one-hot part is unchanged)."""

    names: list[str]  # L1..Ln, W1, S1 as configured
    max_lengths: list[int]  # most ids written per column
    weighted: list[bool]
    sequence: list[bool]
    cdfs: list[np.ndarray]  # Zipf CDF per column
    rank_to_id: list[np.ndarray]
    id_hash_mul: np.ndarray
    id_hash_add: np.ndarray
    effect: list[np.ndarray]  # per column [card] per-id logit effect
    tokens: list[pa.Array]  # per column, what an id (an id:weight) is written as (_list_tokens)
    window: int
    decay: float
    offset: float = 0.0  # mean summed list logit, subtracted: the bias stays the one-hot part's
    without: np.ndarray | None = None  # on _WITHOUT_GRID: E[sigmoid(x + list logit)] over the list columns' draws


@dataclass
class _Truth:
    """The ground-truth parameters, all drawn from the seed."""

    cardinalities: np.ndarray  # [26]
    cdfs: list[np.ndarray]  # Zipf CDF per column over popularity ranks
    rank_to_id: list[np.ndarray]  # popularity rank -> id (a permutation)
    id_hash_mul: np.ndarray  # [26] odd multipliers: id -> 32-bit hash, a bijection
    id_hash_add: np.ndarray  # [26]
    cat_missing: np.ndarray  # [26] probability a categorical field is empty
    dense_mu: np.ndarray  # [13] log-normal location of the counts
    dense_sigma: np.ndarray  # [13]
    dense_offset: np.ndarray  # [13] subtracted from the counts (I2 goes negative)
    dense_missing: np.ndarray  # [13]
    dense_w: np.ndarray  # [13]
    dense_center: np.ndarray  # [13] mean of z, so the weights do not move the bias
    cat_bias: list[np.ndarray]  # per column [card] per-id effect
    cat_latent: list[np.ndarray]  # per column [card, k] latent vectors for categorical pairs
    cat_dense: list[np.ndarray]  # per column [card, k] latent vectors meeting the dense projection
    dense_proj: np.ndarray  # [13, k]
    pairs: np.ndarray  # [P, 2] interacting categorical columns
    lists: _ListTruth | None = None
    b0: float = 0.0
    day: int = 0  # rows of day > 0 come from a stream of their own


def schema(cfg: SyntheticConfig) -> Schema:
    """The raw layout the generator writes for ``cfg``: Criteo's, then the list columns (cap 0 = all ids,
    S1 capped at the window that matters when the sequence is longer)."""
    names, caps, weighted = _list_layout(cfg)
    if not names:
        return CRITEO
    sparse = (*CRITEO.sparse_columns, *names)
    return Schema(
        CRITEO.dense_columns,
        sparse,
        sparse,
        CRITEO.categorical_format,
        tuple(zip(names, caps, strict=True)),
        tuple(n for n, w in zip(names, weighted, strict=True) if w),
    )


def list_lengths(cfg: SyntheticConfig) -> dict[str, int]:
    """The most ids the generator writes in each list column (a declared cap at least this keeps them all)."""
    names, _, _ = _list_layout(cfg)
    return {n: cfg.sequence_length if n == "S1" else cfg.max_bag_size for n in names}


def _list_layout(cfg: SyntheticConfig) -> tuple[list[str], list[int], list[bool]]:
    """Names, caps and weighted flags of the list columns."""
    names = [f"L{j + 1}" for j in range(cfg.num_list_columns)] + (["W1"] if cfg.weighted_column else [])
    caps = [0] * len(names)
    if cfg.sequence_length > 0:
        names.append("S1")
        caps.append(cfg.sequence_window if cfg.sequence_window < cfg.sequence_length else 0)
    return names, caps, [n == "W1" for n in names]


def _make_list_truth(cfg: SyntheticConfig) -> _ListTruth | None:
    names, _, weighted = _list_layout(cfg)
    if not names:
        return None
    rng = np.random.default_rng([cfg.seed, 3])
    sequence = [n == "S1" for n in names]
    card = cfg.list_cardinality
    p = np.arange(1, card + 1, dtype=np.float64) ** -cfg.zipf_alpha
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    window = min(cfg.sequence_window, cfg.sequence_length)
    effects = []
    for w, seq in zip(weighted, sequence, strict=True):
        if seq:  # the window's weights sum(decay^2k) set the per-id std
            ids_that_count = float(np.sum(cfg.sequence_decay ** (2 * np.arange(window))))
            std = _SEQUENCE_SCALE / np.sqrt(ids_that_count)
        else:
            mean_size = cfg.max_bag_size / 2 * (float(np.mean(_WEIGHTS**2)) if w else 1.0)
            std = _LIST_SCALE / np.sqrt(max(mean_size, 1.0))
        effects.append(rng.normal(0.0, std, card))
    lt = _ListTruth(
        names=names,
        max_lengths=[cfg.sequence_length if seq else cfg.max_bag_size for seq in sequence],
        weighted=weighted,
        sequence=sequence,
        cdfs=[cdf] * len(names),
        rank_to_id=[rng.permutation(card) for _ in names],
        id_hash_mul=(rng.integers(0, 2**31, len(names), dtype=np.uint64) * 2 + 1),
        id_hash_add=rng.integers(0, 2**32, len(names), dtype=np.uint64),
        effect=effects,
        tokens=[],
        window=window,
        decay=cfg.sequence_decay,
    )
    lt.tokens = [_list_tokens(lt, c) for c in range(len(names))]
    return lt


@dataclass
class _Lists:
    """One chunk's list columns: per column the bag sizes, the ids and weights (flat), and the summed logit."""

    lengths: list[np.ndarray]  # [n] per column
    ids: list[np.ndarray]  # [sum lengths] per column, rows in order, each row's ids in order
    weight_index: list[np.ndarray | None]  # [sum lengths] index into _WEIGHTS per id (W1), else None
    logit: np.ndarray  # [n] the list columns' contribution to the logit


def _draw_lists(lt: _ListTruth, rng: np.random.Generator, n: int) -> _Lists:
    lengths, ids, weight_index, logit = [], [], [], np.zeros(n)
    for c in range(len(lt.names)):
        size = rng.integers(0, lt.max_lengths[c] + 1, n)
        total = int(size.sum())
        ranks = np.minimum(np.searchsorted(lt.cdfs[c], rng.random(total), side="right"), len(lt.cdfs[c]) - 1)
        col_ids = lt.rank_to_id[c][ranks]
        row = np.repeat(np.arange(n), size)
        scale = np.ones(total)
        w = None
        if lt.weighted[c]:
            w = rng.integers(0, len(_WEIGHTS), total)
            scale = _WEIGHTS[w]
        if lt.sequence[c]:  # k = places before the row's newest id
            k = np.repeat(np.cumsum(size), size) - 1 - np.arange(total)
            scale = np.where(k < lt.window, lt.decay ** np.minimum(k, lt.window), 0.0)
        logit += np.bincount(row, weights=lt.effect[c][col_ids] * scale, minlength=n)
        lengths.append(size)
        ids.append(col_ids)
        weight_index.append(w)
    return _Lists(lengths, ids, weight_index, logit - lt.offset)


def _list_tokens(lt: _ListTruth, c: int) -> pa.Array:
    """Every token column ``c`` can write: the ids' hex hashes, or in a weighted column every ``id:weight``
    (at ``id * len(_WEIGHTS) + weight index``)."""
    card = len(lt.effect[c])
    hashed = (np.arange(card, dtype=np.uint64) * lt.id_hash_mul[c] + lt.id_hash_add[c]) & 0xFFFFFFFF
    tokens = _hex_column(hashed, np.zeros(card, dtype=bool))
    if not lt.weighted[c]:
        return tokens
    weights = pa.array([repr(float(w)) for w in _WEIGHTS])
    return pc.binary_join_element_wise(
        tokens.take(np.repeat(np.arange(card), len(_WEIGHTS))),
        weights.take(np.tile(np.arange(len(_WEIGHTS)), card)),
        ":",
    )


def _list_column(lt: _ListTruth, c: int, lists: _Lists) -> pa.Array:
    """One list column's fields: the tokens of its ids joined by ","."""
    index = lists.ids[c] if lists.weight_index[c] is None else lists.ids[c] * len(_WEIGHTS) + lists.weight_index[c]
    offsets = np.concatenate([[0], np.cumsum(lists.lengths[c])]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), lt.tokens[c].take(index)), ",")


def _calibrate_lists(lt: _ListTruth, rng: np.random.Generator) -> np.ndarray:
    """Centre the list logit on a calibration sample and tabulate E[sigmoid(x + list logit)] for
    optimum_without.lists; return the centred sample."""
    sample = _draw_lists(lt, rng, _CALIBRATION_ROWS).logit
    lt.offset = float(sample.mean())
    sample = sample - lt.offset
    counts, edges = np.histogram(sample, bins=_WITHOUT_BINS)
    centres = (edges[:-1] + edges[1:]) / 2
    lt.without = base.sigmoid(_WITHOUT_GRID[:, None] + centres[None, :]) @ (counts / counts.sum())
    return sample


def _make_truth(cfg: SyntheticConfig) -> _Truth:
    rng = np.random.default_rng([cfg.seed, 0])
    cards = np.minimum(np.array(CARDINALITIES["criteo_kaggle"]), cfg.max_cardinality).astype(np.int64)
    pools = cards * 2 if cfg.new_id_share > 0 else cards  # the ids a column draws from over the days
    cdfs, rank_to_id, bias, latent, cat_dense = [], [], [], [], []
    # Columns differ in how much they say about a click, as real Criteo columns do.
    col_scale = rng.uniform(*_BIAS_SCALE, NUM_SPARSE_FEATURES)
    for c, (card, pool) in enumerate(zip(cards, pools, strict=True)):
        p = np.arange(1, card + 1, dtype=np.float64) ** -cfg.zipf_alpha
        cdf = np.cumsum(p / p.sum())
        cdf[-1] = 1.0
        cdfs.append(cdf)
        rank_to_id.append(rng.permutation(pool))
        bias.append(rng.normal(0.0, col_scale[c], pool))
        latent.append(rng.normal(0.0, _PAIR_SCALE, (pool, _LATENT_DIM)))
        scale = _CAT_DENSE_SCALE if card <= _INTERACTING_MAX_CARDINALITY else 0.0
        cat_dense.append(rng.normal(0.0, scale, (pool, _LATENT_DIM)))
    num_pairs = _NUM_PAIRS
    common = [c for c in range(NUM_SPARSE_FEATURES) if cards[c] <= _INTERACTING_MAX_CARDINALITY]
    all_pairs = np.array([(a, b) for i, a in enumerate(common) for b in common[i + 1 :]])
    pairs = all_pairs[rng.choice(len(all_pairs), num_pairs, replace=False)]
    dense_mu = rng.uniform(0.0, 4.0, NUM_DENSE_FEATURES)
    dense_sigma = rng.uniform(0.5, 1.5, NUM_DENSE_FEATURES)
    dense_offset = np.zeros(NUM_DENSE_FEATURES)
    dense_offset[1] = 3  # I2: -3..-1 occur, as -1/-2 do in the real logs
    dense_missing = rng.uniform(0.0, 0.45, NUM_DENSE_FEATURES)
    dense_missing[1] = 0.0
    cat_missing = np.where(rng.random(NUM_SPARSE_FEATURES) < 0.3, rng.uniform(0.05, 0.45, NUM_SPARSE_FEATURES), 0.0)
    truth = _Truth(
        cardinalities=cards,
        cdfs=cdfs,
        rank_to_id=rank_to_id,
        id_hash_mul=(rng.integers(0, 2**31, NUM_SPARSE_FEATURES, dtype=np.uint64) * 2 + 1),
        id_hash_add=rng.integers(0, 2**32, NUM_SPARSE_FEATURES, dtype=np.uint64),
        cat_missing=cat_missing,
        dense_mu=dense_mu,
        dense_sigma=dense_sigma,
        dense_offset=dense_offset,
        dense_missing=dense_missing,
        dense_w=rng.normal(0.0, _DENSE_W_SCALE, NUM_DENSE_FEATURES),
        dense_center=np.zeros(NUM_DENSE_FEATURES),
        cat_bias=bias,
        cat_latent=latent,
        cat_dense=cat_dense,
        dense_proj=rng.normal(0.0, 0.15, (NUM_DENSE_FEATURES, _LATENT_DIM)),
        pairs=pairs,
    )
    if cfg.one_hot_scale != 1.0:  # skipped at 1: the default truth stays the very same floats
        _scale_one_hot(truth, cfg.one_hot_scale)
    # Center z and solve the bias for the target click rate on a calibration sample.
    calib = _draw_features(truth, np.random.default_rng([cfg.seed, 1]), _CALIBRATION_ROWS)
    truth.dense_center = calib[2].mean(axis=0)
    logits = _logits(truth, *calib)
    truth.lists = _make_list_truth(cfg)
    if truth.lists is not None:
        logits = logits + _calibrate_lists(truth.lists, np.random.default_rng([cfg.seed, 4]))
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if base.sigmoid(logits + mid).mean() < cfg.target_ctr:
            lo = mid
        else:
            hi = mid
    truth.b0 = (lo + hi) / 2
    _move_to_day(truth, cfg)  # after the bias: the click model is the same every day, only the ids drift
    return truth


def _move_to_day(truth: _Truth, cfg: SyntheticConfig) -> None:
    """Day ``cfg.day``'s popularity ranks: each day ``new_id_share`` of a column's ranks, drawn at random, go to
    ids of its pool not used yet (ids of their own effects), in place of the ids that held them."""
    truth.day = cfg.day
    pools = truth.rank_to_id
    truth.rank_to_id = [r[:card].copy() for r, card in zip(pools, truth.cardinalities, strict=True)]
    if cfg.new_id_share == 0:
        return
    for c, card in enumerate(truth.cardinalities):
        k = max(1, round(cfg.new_id_share * card))
        for day in range(1, cfg.day + 1):
            ranks = np.random.default_rng([cfg.seed, 5, c, day]).choice(card, k, replace=False)
            first = card + (day - 1) * k  # the pool's ids in order, from the first one day 0 does not use
            truth.rank_to_id[c][ranks] = pools[c][(first + np.arange(k)) % len(pools[c])]


def _scale_one_hot(truth: _Truth, scale: float) -> None:
    """Multiply every term of the one-hot part's logit by ``scale`` (pairs are products of two latents)."""
    truth.dense_w = truth.dense_w * scale
    truth.cat_bias = [b * scale for b in truth.cat_bias]
    truth.cat_latent = [v * np.sqrt(scale) for v in truth.cat_latent]
    truth.cat_dense = [v * scale for v in truth.cat_dense]


def _draw_features(truth: _Truth, rng: np.random.Generator, n: int):
    """Draw one chunk: raw dense ints (+mask), z, categorical ids (+mask)."""
    counts = np.floor(np.exp(rng.normal(truth.dense_mu, truth.dense_sigma, (n, NUM_DENSE_FEATURES))))
    dense = (counts - truth.dense_offset).astype(np.int64)
    dense_missing = rng.random((n, NUM_DENSE_FEATURES)) < truth.dense_missing
    z = np.log1p(np.maximum(dense, 0)).astype(np.float64)
    z[dense_missing] = 0.0
    ids = np.empty((n, NUM_SPARSE_FEATURES), dtype=np.int64)
    for c in range(NUM_SPARSE_FEATURES):
        ranks = np.searchsorted(truth.cdfs[c], rng.random(n), side="right")
        ids[:, c] = truth.rank_to_id[c][np.minimum(ranks, truth.cardinalities[c] - 1)]
    cat_missing = rng.random((n, NUM_SPARSE_FEATURES)) < truth.cat_missing
    return dense, dense_missing, z, ids, cat_missing


def _logits(truth: _Truth, dense, dense_missing, z, ids, cat_missing) -> np.ndarray:
    zc = z - truth.dense_center
    logit = zc @ truth.dense_w
    dense_latent = zc @ truth.dense_proj  # [n, k]
    present = ~cat_missing
    for c in range(NUM_SPARSE_FEATURES):
        logit += truth.cat_bias[c][ids[:, c]] * present[:, c]
        logit += np.einsum("nk,nk->n", truth.cat_dense[c][ids[:, c]], dense_latent) * present[:, c]
    for a, b in truth.pairs:
        dot = np.einsum("nk,nk->n", truth.cat_latent[a][ids[:, a]], truth.cat_latent[b][ids[:, b]])
        logit += dot * (present[:, a] & present[:, b])
    return logit + truth.b0


def _hex_column(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    """uint32 values -> 8-lowercase-hex-digit strings, null where missing, without a Python loop."""
    n = len(values)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    nibbles = (values.astype(np.uint64)[:, None] >> shifts) & 0xF
    data = _HEX[nibbles].tobytes()
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32).tobytes()
    validity = pa.array(~missing).buffers()[1]
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data), validity, int(missing.sum()))


def _chunk_table(truth: _Truth, rng: np.random.Generator, n: int) -> base.Chunk:
    if truth.day:  # another day's rows: a stream of the day's own
        rng = rng.spawn(truth.day)[-1]
    # The list columns draw from a child stream, so the one-hot columns are the bytes they were without them.
    list_rng = rng.spawn(1)[0] if truth.lists is not None else None
    dense, dense_missing, z, ids, cat_missing = _draw_features(truth, rng, n)
    logit = _logits(truth, dense, dense_missing, z, ids, cat_missing)
    lists = _draw_lists(truth.lists, list_rng, n) if truth.lists is not None else None
    prob = base.sigmoid(logit + lists.logit if lists is not None else logit)
    labels = (rng.random(n) < prob).astype(np.int8)
    columns = {"label": pa.array(labels)}
    for j in range(NUM_DENSE_FEATURES):
        columns[f"I{j + 1}"] = pa.array(dense[:, j], mask=dense_missing[:, j])
    for c in range(NUM_SPARSE_FEATURES):
        hashed = (ids[:, c].astype(np.uint64) * truth.id_hash_mul[c] + truth.id_hash_add[c]) & 0xFFFFFFFF
        columns[f"C{c + 1}"] = _hex_column(hashed, cat_missing[:, c])
    if lists is None:
        return base.Chunk(pa.table(columns), prob, labels)
    for c, name in enumerate(truth.lists.names):
        columns[name] = _list_column(truth.lists, c, lists)
    without = np.interp(logit, _WITHOUT_GRID, truth.lists.without)  # the list columns' draws averaged out
    return base.Chunk(pa.table(columns), prob, labels, {"lists": without})


def generate(cfg: SyntheticConfig, out_dir: str | Path) -> dict:
    """Write train/val/test TSV and optimum.json into ``out_dir``; return the optimum record."""
    truth = _make_truth(cfg)
    extra: dict = {"cardinalities": truth.cardinalities.tolist()}
    if truth.lists is not None:
        extra["schema"] = schema(cfg).to_dict()
    return base.generate(GENERATOR, cfg, out_dir, truth, _chunk_table, extra)


def is_complete(cfg: SyntheticConfig, out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished generation with exactly this config."""
    return base.is_complete(GENERATOR, cfg, out_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    defaults = SyntheticConfig()
    p.add_argument("--train-rows", type=int, default=defaults.num_train_rows)
    p.add_argument("--val-rows", type=int, default=defaults.num_val_rows)
    p.add_argument("--test-rows", type=int, default=defaults.num_test_rows)
    p.add_argument("--max-cardinality", type=int, default=defaults.max_cardinality)
    p.add_argument("--zipf-alpha", type=float, default=defaults.zipf_alpha)
    p.add_argument("--target-ctr", type=float, default=defaults.target_ctr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--list-columns", type=int, default=defaults.num_list_columns, help="list columns L1..Ln")
    p.add_argument("--weighted-column", action="store_true", help="a weighted list column W1 (id:weight)")
    p.add_argument("--sequence-length", type=int, default=defaults.sequence_length, help="> 0: a sequence S1")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = SyntheticConfig(
        a.train_rows,
        a.val_rows,
        a.test_rows,
        a.max_cardinality,
        a.zipf_alpha,
        a.target_ctr,
        a.seed,
        num_list_columns=a.list_columns,
        weighted_column=a.weighted_column,
        sequence_length=a.sequence_length,
    )
    record = generate(cfg, a.out)
    print(json.dumps(record["optimum"], indent=2))


if __name__ == "__main__":
    main()
