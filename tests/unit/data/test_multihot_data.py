"""Multi-hot (list) columns from raw rows to the loader's KJT: the compiled list parser against Python's own
parsing on random rows (hex and decimal ids, weights, empty lists, caps keeping the last ids), malformed
lists under both bad-row policies, and preprocessed lists read back as KJT lengths, values and weights
equal to the raw lists (hash and vocab mode, rows across parts, evaluation padding)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import BadRowPolicy, CategoricalFormat, ConfigError, DataConfig, IdMode
from pipeline.data.jagged import Lists, feature_major
from pipeline.data.loader import BinarySplit, eval_batches, train_batches
from pipeline.data.manifest import Manifest
from pipeline.data.preprocess import preprocess
from pipeline.data.schema import Schema
from pipeline.data.tsv import BadRows, RawDataError, check_line, read_blocks
from pipeline.data.tsv.lists import parse_column

SEP = ","


def random_field(rng, hex_ids: bool, weighted: bool, max_len: int = 7) -> tuple[str, list[int], list[float]]:
    """A random list field and the ids and weights Python reads from it."""
    k = int(rng.integers(0, max_len + 1))
    ids = [int(rng.integers(0, 2**32 if hex_ids else 2**63 - 1)) for _ in range(k)]
    weights = [float(np.float32(rng.choice([0.5, 2.0, 1e-3, 3.25, -1.5e2, 7.0]) * rng.random())) for _ in range(k)]
    tokens = []
    for i, w in zip(ids, weights, strict=True):
        key = f"{i:08x}" if hex_ids else str(i)
        if weighted:
            text = rng.choice([repr(w), f"{w:.3e}", f"{w:.6f}", f"{w:.2f}"])
            tokens.append(f"{key}:{text}")
        else:
            tokens.append(key)
    field = SEP.join(tokens)
    weights = [float(t.split(":")[1]) for t in tokens] if weighted else []
    return field, ids, weights


def layout(hex_ids: bool, caps: dict[str, int], weighted: tuple[str, ...] = ()) -> Schema:
    return Schema(
        dense_columns=("I1",),
        sparse_columns=("C1", "A", "B"),
        feature_names=("C1", "A", "B"),
        categorical_format=CategoricalFormat.hex if hex_ids else CategoricalFormat.int,
        multi_hot=tuple(caps.items()),
        weighted=weighted,
    )


@pytest.mark.parametrize("hex_ids", [True, False])
def test_lists_parse_as_python_parses_them(tmp_path, hex_ids):
    rng = np.random.default_rng(7)
    caps = {"A": 3, "B": 0}
    schema = layout(hex_ids, caps, weighted=("A",))
    lines, expected = [], []
    for _ in range(3000):
        a, a_ids, a_w = random_field(rng, hex_ids, weighted=True)
        b, b_ids, _ = random_field(rng, hex_ids, weighted=False, max_len=12)
        one = f"{int(rng.integers(0, 2**32)):08x}" if hex_ids else str(int(rng.integers(0, 10**6)))
        lines.append(f"1\t{int(rng.integers(-5, 100))}\t{one}\t{a}\t{b}")
        expected.append((a_ids[-3:], a_w[-3:], b_ids, [1.0] * len(b_ids)))  # cap 3 keeps the last three
    path = tmp_path / "rows.tsv"
    path.write_text("\n".join(lines) + "\n")
    blocks = list(read_blocks(path, 1, "error", None, True, schema))
    lists = Lists(
        np.concatenate([b.lists.values for b in blocks]),
        np.concatenate([b.lists.lengths for b in blocks]),
        np.concatenate([b.lists.weights for b in blocks]),
    )
    assert lists.lengths.tolist() == [[len(a), len(b)] for a, _, b, _ in expected]
    want_ids = [i for a, _, b, _ in expected for i in (*a, *b)]
    want_w = [w for _, aw, _, bw in expected for w in (*aw, *bw)]
    assert lists.values.astype(np.uint64).tolist() == want_ids
    assert lists.weights.tolist() == np.asarray(want_w, np.float32).tolist()  # float(text), rounded to float32


def test_weights_beyond_the_kernels_exact_range_are_parsed_in_python():
    fields = [b"5:0.30000000000000004441", b"6:1e-30,7:2.5E+3", b"8:123456789012345678901234"]
    arr_data = b"".join(fields)
    offsets = np.cumsum([0, *map(len, fields)]).astype(np.int64)
    values, weights, lengths = parse_column(
        np.frombuffer(arr_data, np.uint8), offsets, np.ones(3, bool), False, b",", True, 0
    )
    assert values.tolist() == [5, 6, 7, 8] and lengths.tolist() == [1, 2, 1]
    assert (
        weights.tolist()
        == np.asarray([0.30000000000000004441, 1e-30, 2500.0, 1.2345678901234568e23], np.float32).tolist()
    )


BAD_LISTS = [
    ("1,,2", "b'' is not a decimal id"),
    ("1,2,", "b'' is not a decimal id"),
    ("1;2", "b'1;2' is not a decimal id"),
    ("1:0.5", "no ':'"),
    ("-3", "b'-3' is not a decimal id"),
    ("99999999999999999999", "is not a decimal id"),
]


@pytest.mark.parametrize("field,detail", BAD_LISTS)
def test_a_malformed_list_names_file_line_and_field(tmp_path, field, detail):
    schema = layout(False, {"A": 0, "B": 0})
    path = tmp_path / "bad.tsv"
    path.write_text(f"1\t3\t4\t1,2\t\n0\t3\t4\t5\t{field}\n1\t\t\t\t7\n")
    assert check_line(f"0\t3\t4\t5\t{field}".encode(), True, schema)[0] == "bad_categorical"
    with pytest.raises(RawDataError, match=rf"bad.tsv:2: field B is .*{detail}"):
        list(read_blocks(path, 1, "error", None, True, schema))
    counter = BadRows()
    kept = list(read_blocks(path, 1, "skip", counter, True, schema))
    assert counter.counts["bad_categorical"] == 1 and "bad.tsv:2: field B" in counter.examples[0]
    assert [b.line_index.tolist() for b in kept] == [[0, 2]]
    assert kept[0].lists.lengths.tolist() == [[2, 0], [0, 1]] and kept[0].lists.values.tolist() == [1, 2, 7]


def test_weighted_column_needs_a_weight_on_every_id(tmp_path):
    schema = layout(True, {"A": 0, "B": 0}, weighted=("A",))
    kind, detail = check_line(b"1\t3\t0000000a\t0000000b:1,0000000c\t", True, schema)
    assert kind == "bad_categorical" and "field A" in detail and "id:weight" in detail
    kind, detail = check_line(b"1\t3\t0000000a\t0000000b:x\t", True, schema)
    assert "weight b'x' is not a decimal number" in detail


def test_list_config_is_checked():
    base = dict(name="x", raw_dir="r", processed_dir="p", sparse_columns=["u", "h"], dense_columns=[], feature_names=[])
    with pytest.raises(ConfigError, match=r"data.multi_hot_columns names \['x'\]"):
        DataConfig(**base, multi_hot_columns={"x": 3})
    with pytest.raises(ConfigError, match=r"data.weighted_columns \['u'\] are not multi-hot"):
        DataConfig(**base, multi_hot_columns={"h": 3}, weighted_columns=["u"])
    with pytest.raises(ConfigError, match="data.list_separator"):
        DataConfig(**base, multi_hot_columns={"h": 3}, list_separator=":")
    with pytest.raises(ConfigError, match="must be >= 0"):
        DataConfig(**base, multi_hot_columns={"h": -1})


def write_rows(path, rng, n, num_items=40):
    """Decimal ids: user u, a weighted bag A (id:weight), a sequence B; the raw lists are returned too."""
    lines, raw = [], []
    for _ in range(n):
        a = [(int(rng.integers(0, num_items)), float(rng.choice([0.5, 1.0, 2.0]))) for _ in range(rng.integers(0, 5))]
        b = [int(rng.integers(0, num_items)) for _ in range(rng.integers(0, 9))]
        u = int(rng.integers(0, 30))
        fa = ",".join(f"{i}:{w}" for i, w in a)
        lines.append(f"{int(rng.integers(0, 2))}\t{int(rng.integers(0, 9))}\t{u}\t{fa}\t{','.join(map(str, b))}")
        raw.append((u, a, b))
    path.write_text("\n".join(lines) + "\n")
    return raw


def data_config(tmp_path, id_mode: IdMode, **kw) -> DataConfig:
    return DataConfig(
        name="lists",
        raw_dir=str(tmp_path / "raw"),
        processed_dir=str(tmp_path / "proc"),
        dense_columns=["I1"],
        sparse_columns=["u", "A", "B"],
        feature_names=[],
        categorical_format=CategoricalFormat.int,
        multi_hot_columns={"A": 0, "B": 6},
        weighted_columns=["A"],
        id_mode=id_mode,
        bad_rows=BadRowPolicy.error,
        min_id_frequency=1,
        **kw,
    )


def kjt_rows(kjt) -> list[dict]:
    """Per row: feature -> (ids, weights), read back from a KJT."""
    out = [{} for _ in range(kjt.stride())]
    for name, jt in kjt.to_dict().items():
        for r, (v, w) in enumerate(zip(jt.to_dense(), jt.to_dense_weights(), strict=True)):
            out[r][name] = (v.tolist(), w.tolist())
    return out


def test_preprocessed_lists_come_back_as_the_raw_lists(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "raw").mkdir()
    raw = write_rows(tmp_path / "raw" / "train1.tsv", rng, 700)
    raw += write_rows(tmp_path / "raw" / "train2.tsv", rng, 500)
    write_rows(tmp_path / "raw" / "val.tsv", rng, 100)
    cfg = data_config(
        tmp_path,
        IdMode.hash,
        max_ids_per_feature=1000,
        train_files=[str(tmp_path / "raw" / "train1.tsv"), str(tmp_path / "raw" / "train2.tsv")],
    )
    manifest = preprocess(cfg)
    lengths_a = [len(a) for _, a, _ in raw]
    lengths_b = [min(len(b), 6) for _, _, b in raw]
    assert manifest.pooling_factors == [1.0, round(np.mean(lengths_a), 4), round(np.mean(lengths_b), 4)]
    assert manifest.max_lengths == [1, max(lengths_a), max(lengths_b)]
    split = BinarySplit(cfg.processed_dir, "train")
    assert len(split.parts) == 2
    mod = lambda i: 1 + i % 999  # noqa: E731 - hash mode: 1 + id % (cap - 1)
    rows = np.array([5, 699, 700, 701, 1100, 3])  # across the two parts, and not in part order
    got = kjt_rows(split.make_batch(rows).sparse_features)
    for r, g in zip(rows, got, strict=True):
        u, a, b = raw[r]
        assert g["u"] == ([mod(u)], [1.0])
        assert g["A"] == ([mod(i) for i, _ in a], [w for _, w in a])
        assert g["B"] == ([mod(i) for i in b[-6:]], [1.0] * len(b[-6:]))  # the last six of the sequence
    # Training batches (sorted rows within one part) and evaluation batches with padding agree with make_batch.
    batch = next(train_batches(split, 64, 1, 2, seed=0, shuffle=True))
    assert batch.sparse_features.lengths().numel() == 3 * 32
    last = list(eval_batches(BinarySplit(cfg.processed_dir, "val"), 64, 0, 1))[-1]
    assert last.weights.sum() == 100 - 64
    assert (
        kjt_rows(last.batch.sparse_features)[-1]
        == kjt_rows(BinarySplit(cfg.processed_dir, "val").make_batch(np.array([0])).sparse_features)[0]
    )


def test_vocab_mode_lists_and_the_frequency_threshold(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "raw").mkdir()
    raw = write_rows(tmp_path / "raw" / "train.tsv", rng, 800, num_items=300)
    write_rows(tmp_path / "raw" / "val.tsv", rng, 50)
    preprocess(data_config(tmp_path, IdMode.vocab))
    counts = {}
    for _, a, _ in raw:
        for i in [i for i, _ in a]:
            counts[i] = counts.get(i, 0) + 1
    manifest = Manifest.load(tmp_path / "proc")
    assert manifest.num_embeddings_per_feature[1] == len(counts) + 2  # every training value of A, plus 0 and 1
    from pipeline.data.features import FeatureTransform

    features = FeatureTransform.from_manifest(manifest, tmp_path / "proc", min_frequency=3)
    split = BinarySplit(tmp_path / "proc", "train", manifest, features)
    got = kjt_rows(split.make_batch(np.arange(len(raw))).sparse_features)
    for (_, a, _), g in zip(raw, got, strict=True):
        ids = g["A"][0]
        assert len(ids) == len(a)
        # Values seen fewer than 3 times share the rare row 1; a value's id is the same wherever it occurs.
        assert all((i == 1) == (counts[v] < 3) for (v, _), i in zip(a, ids, strict=True))


def test_feature_major_layout_matches_a_direct_one():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, size=(50, 3)).astype(np.int32)
    lists = Lists(
        rng.integers(0, 1000, size=int(lengths.sum())), lengths, rng.random(int(lengths.sum())).astype(np.float32)
    )
    rows = rng.permutation(50)[:20]
    values, lens, weights = feature_major(lists.values, lists.weights, lists.lengths, lists.starts(), rows)
    starts = lists.starts()
    want_v, want_w = [], []
    for c in range(3):
        for r in rows:
            s = starts[r] + lengths[r, :c].sum()
            want_v += lists.values[s : s + lengths[r, c]].tolist()
            want_w += lists.weights[s : s + lengths[r, c]].tolist()
    assert lens.tolist() == lengths[rows].T.tolist()
    assert values.tolist() == want_v and weights.tolist() == want_w
    taken = lists.take(rows)
    assert taken.lengths.tolist() == lengths[rows].tolist()
