"""The raw Criteo parser and preprocessing on real-format edge cases: bad rows under both policies,
the compiled scanner against pyarrow's parse and the line checks, the torchrec-compatible dense mode,
the 1TB day-file layout (plain and .gz), per-column caps, and resuming a killed preprocessing."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import BadRowPolicy, DataConfig, DenseTransform, IdMode, SplitMode, SyntheticConfig
from pipeline.data.generators import synthetic
from pipeline.data.loader import BinarySplit, train_batches
from pipeline.data.preprocess import preprocess, raw_files
from pipeline.data.schema import CRITEO
from pipeline.data.tsv import (
    BAD_ROW_KINDS,
    BadRows,
    RawDataError,
    arrow,
    check_line,
    compiled,
    count_lines,
    read_blocks,
    reader,
    scanner,
)
from pipeline.data.tsv.block import Chunk
from tests.conftest import ROOT


def row(label="1", dense=None, cats=None) -> str:
    dense = dense if dense is not None else ["5", "", "-2", *["1"] * 10]
    cats = cats if cats is not None else ["0a1b2c3d", "", "FFFFFFFF", *["68fd1e64"] * 23]
    return "\t".join([label, *dense, *cats])


GOOD = [row(), row(label="0", dense=[""] * 13, cats=[""] * 26), row(dense=["-1"] * 13, cats=["00000000"] * 26)]
# (kind, a bad line, the field or problem the error message must name)
BAD = [
    ("wrong_field_count", row()[: row().rindex("\t")], "39 tab-separated fields"),
    ("wrong_field_count", "", "1 tab-separated fields"),
    ("bad_label", row(label="2"), "field label is b'2'"),
    ("bad_label", row(label=""), "field label is b''"),
    ("bad_dense", row(dense=["1", "1.5", *["1"] * 11]), "field I2 is b'1.5'"),
    ("bad_dense", row(dense=[*["1"] * 12, "abc"]), "field I13 is b'abc'"),
    ("bad_categorical", row(cats=["xyz12345", *["68fd1e64"] * 25]), "field C1 is b'xyz12345'"),
    ("bad_categorical", row(cats=[*["68fd1e64"] * 25, "0a1b2c3d4"]), "field C26 is b'0a1b2c3d4'"),
    ("bad_categorical", row(cats=["68fd1e64", "0a1b", *["68fd1e64"] * 24]), "field C2 is b'0a1b'"),
    ("bad_dense", row(dense=["+5", *["1"] * 12]), "field I1 is b'+5'"),
    ("bad_dense", row(dense=[*["1"] * 6, "-", *["1"] * 6]), "field I7 is b'-'"),
]


def _read_all(path, **kw):
    blocks = list(read_blocks(path, **kw))
    return {
        k: np.concatenate([getattr(b, k) for b in blocks])
        for k in ("labels", "dense", "dense_missing", "sparse", "sparse_missing", "line_index")
    }


def test_good_rows_parse_to_the_right_values(tmp_path) -> None:
    path = tmp_path / "good.tsv"
    path.write_text("\n".join(GOOD))  # no final newline: a complete last row is still a row
    got = _read_all(path)
    assert got["labels"].tolist() == [1, 0, 1]
    assert got["dense"][0, :3].tolist() == [5, 0, -2] and got["dense_missing"][0, :3].tolist() == [False, True, False]
    assert got["dense_missing"][1].all() and got["sparse_missing"][1].all()
    assert got["sparse"][0, :3].tolist() == [0x0A1B2C3D, 0, 0xFFFFFFFF]
    assert got["sparse_missing"][0, :3].tolist() == [False, True, False]
    assert got["sparse"][2].tolist() == [0] * 26 and not got["sparse_missing"][2].any(), (
        "00000000 is a value, not missing"
    )
    assert count_lines(path) == 3


@pytest.mark.parametrize(("kind", "line", "named"), BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_row_error_policy_names_file_line_and_field(tmp_path, kind, line, named) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join([GOOD[0], GOOD[1], line, GOOD[2]]) + "\n")
    with pytest.raises(RawDataError) as e:
        list(read_blocks(path))
    assert f"bad.tsv:3: {named}" in str(e.value) and f"[{kind};" in str(e.value)


def test_truncated_last_line_is_its_own_kind(tmp_path) -> None:
    path = tmp_path / "cut.tsv"
    path.write_text("\n".join([*GOOD, row()[:57]]))  # the writer died mid-row
    with pytest.raises(RawDataError, match=r"cut.tsv:4: the file ends without a newline inside a malformed row"):
        list(read_blocks(path))
    counter = BadRows()
    got = _read_all(path, bad_rows="skip", counter=counter)
    assert counter.counts["truncated_last_line"] == 1 and counter.total == 1
    assert got["labels"].tolist() == [1, 0, 1]


def test_skip_policy_drops_and_counts_every_bad_row_across_blocks(tmp_path) -> None:
    lines, expected_good, kinds = [], [], dict.fromkeys(BAD_ROW_KINDS, 0)
    rng = np.random.default_rng(0)
    for i in range(600):
        if rng.random() < 0.1:
            kind, line, _ = BAD[rng.integers(len(BAD))]
            kinds[kind] += 1
            lines.append(line)
        else:
            good = row(dense=[str(i), *["1"] * 12])
            expected_good.append(i)
            lines.append(good)
    path = tmp_path / "mixed.tsv"
    path.write_text("\n".join(lines) + "\n")
    counter = BadRows()
    got = _read_all(path, block_size_mb=0.01, bad_rows="skip", counter=counter)  # ~40 rows per block
    assert counter.counts == kinds and counter.total == 600 - len(expected_good)
    assert got["dense"][:, 0].tolist() == expected_good, "good rows all kept, in order"
    assert got["line_index"].tolist() == expected_good, "each row keeps its line number"
    assert counter.examples[0].startswith(f"{path}:")


_FIELDS = ("labels", "dense", "dense_missing", "sparse", "sparse_missing", "line_index")


def _scan(lines: list[str], labelled: bool = True):
    data = ("\n".join(lines) + "\n").encode()
    return scanner.scan_chunk(Chunk(memoryview(data), 7, len(lines), False), labelled, CRITEO)


def _random_good_rows(rng: np.random.Generator, n: int, labelled: bool = True) -> list[str]:
    """Rows the scanner must accept: missing fields, negatives, "-0", leading zeros, 18-digit
    integers, upper- and lower-case hex."""

    def dense() -> str:
        k = rng.integers(8)
        return (
            ""
            if k == 0
            else "-0"
            if k == 1
            else "007"
            if k == 2
            else str(int(rng.integers(-(10**18) + 1, 10**18)))
            if k == 3
            else str(int(rng.integers(-3, 100_000)))
        )

    def cat() -> str:
        if rng.random() < 0.15:
            return ""
        h = f"{int(rng.integers(2**32)):08x}"
        return h.upper() if rng.random() < 0.2 else h

    return [
        "\t".join(
            [
                *([str(int(rng.integers(2)))] if labelled else []),
                *(dense() for _ in range(13)),
                *(cat() for _ in range(26)),
            ]
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("labelled", [True, False])
def test_scanner_gives_what_pyarrow_and_the_conversion_give(labelled) -> None:
    lines = _random_good_rows(np.random.default_rng(1), 3000, labelled)
    got = _scan(lines, labelled)
    assert got is not None, "the scanner accepted every well-formed row"
    data = ("\n".join(lines) + "\n").encode()
    want = arrow.convert(arrow.parse(data, labelled), np.arange(7, 7 + len(lines)), labelled)
    for k in _FIELDS:
        assert np.array_equal(getattr(got, k), getattr(want, k)), k
    assert got.sparse.flags.f_contiguous == want.sparse.flags.f_contiguous


def _reference_row(line: str) -> tuple:
    """What a row means, by the line check's rules, parsed with Python's int()."""
    f = line.split("\t")
    return (
        int(f[0]),
        [int(v) if v else 0 for v in f[1:14]],
        [int(v, 16) if v else 0 for v in f[14:]],
        [not v for v in f[1:14]],
        [not v for v in f[14:]],
    )


def test_scanner_never_accepts_a_row_the_line_check_rejects() -> None:
    """Random edits of good rows: whenever the scanner accepts a chunk, every row in it passes the
    line check and parses to what Python's int() gives; whenever a row fails the line check, the
    scanner rejects its chunk (the chunk then takes pyarrow's path and the line checks)."""
    rng = np.random.default_rng(2)
    alphabet = list("0123456789abcdefABCDEFg-+ \t\r\n.x")
    accepted = rejected = 0
    for _ in range(400):
        lines = _random_good_rows(rng, 4)
        for _ in range(rng.integers(1, 3)):  # edit one row: insert, delete or replace a character
            i = int(rng.integers(len(lines)))
            line, at, op = lines[i], int(rng.integers(len(lines[i]) + 1)), rng.integers(3)
            c = str(rng.choice(alphabet))
            lines[i] = (
                line[:at] + c + line[at:]
                if op == 0
                else line[:at] + line[at + 1 :]
                if op == 1
                else line[:at] + c + line[at + 1 :]
            )
        lines = "\n".join(lines).split("\n")  # an inserted newline makes two lines
        ok = all(check_line(ln.encode()) is None for ln in lines)
        got = _scan(lines)
        if got is None:
            rejected += 1
            continue
        accepted += 1
        assert ok, f"scanner accepted a malformed row: {lines}"
        for r, line in enumerate(lines):
            label, dense, sparse, dmiss, smiss = _reference_row(line)
            assert got.labels[r] == label and got.dense[r].tolist() == dense and got.sparse[r].tolist() == sparse
            assert got.dense_missing[r].tolist() == dmiss and got.sparse_missing[r].tolist() == smiss
    assert accepted > 20 and rejected > 200, (accepted, rejected)  # both sides were exercised


def test_every_bad_row_kind_is_rejected_by_the_scanner() -> None:
    for kind, line, _ in BAD:
        assert _scan([GOOD[0], line, GOOD[2]]) is None, kind
    assert _scan([GOOD[0], row(dense=["1" * 19, *["1"] * 12])]) is None, "19 digits: left to pyarrow"
    assert _scan(GOOD) is not None


def test_clean_hex_rows_never_reach_pyarrow(tmp_path, monkeypatch) -> None:
    """The fast path is the one taken: with pyarrow's parse disabled, clean files still read (and a
    file with a bad row still needs it)."""

    def no_pyarrow(*a, **k):
        raise AssertionError("pyarrow's parse was called")

    path = tmp_path / "clean.tsv"
    lines = _random_good_rows(np.random.default_rng(3), 5000)
    path.write_text("\n".join(lines) + "\n")
    want = arrow.convert(arrow.parse(path.read_bytes()), np.arange(5000))
    monkeypatch.setattr(reader, "parse", no_pyarrow)
    got = _read_all(path, block_size_mb=0.05)  # ~200 rows per chunk, in the worker threads
    assert all(np.array_equal(got[k], getattr(want, k)) for k in _FIELDS) and len(got["labels"]) == 5000
    path.write_text("\n".join([*lines[:10], BAD[0][1]]) + "\n")
    with pytest.raises(AssertionError, match="pyarrow's parse was called"):
        _read_all(path)


def test_preprocess_skip_counts_bad_rows_in_the_manifest(tmp_path) -> None:
    path = tmp_path / "sample.tsv"
    path.write_text("\n".join([*GOOD * 20, BAD[0][1], BAD[4][1], BAD[4][1], row()[:30]]))
    cfg = DataConfig(
        name="t",
        raw_dir=str(tmp_path),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.random,
        raw_files=[str(path)],
        bad_rows=BadRowPolicy.skip,
        id_mode=IdMode.vocab,
    )
    m = preprocess(cfg)
    assert m.bad_rows["by_kind"] == {
        "wrong_field_count": 1,
        "bad_label": 0,
        "bad_dense": 2,
        "bad_categorical": 0,
        "truncated_last_line": 1,
    }
    assert sum(s.num_rows for s in m.splits.values()) == 60, "nothing good is lost"
    with pytest.raises(RawDataError, match="sample.tsv:61"):
        preprocess(
            DataConfig(**{**cfg.__dict__, "bad_rows": BadRowPolicy.error, "processed_dir": str(tmp_path / "o2")})
        )


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    synthetic.generate(
        SyntheticConfig(num_train_rows=6000, num_val_rows=500, num_test_rows=500, max_cardinality=300, seed=5), root
    )
    return root


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_chunks_cover_the_file_exactly_and_taper_at_the_end(tmp_path, generated, suffix) -> None:
    from pipeline.data.tsv.reader import _iter_chunks

    data = (generated / "train.tsv").read_bytes() + b"1\t2"  # and an unterminated last line
    path = tmp_path / f"f.tsv{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    size = 64 << 10
    for taper in (0, 2):
        chunks = list(_iter_chunks(path, size, taper))
        assert b"".join(bytes(c.data) for c in chunks) == data
        assert [c.first_line for c in chunks] == list(np.cumsum([0] + [c.num_lines for c in chunks[:-1]]))
        assert sum(c.num_lines for c in chunks) == data.count(b"\n") + 1
        assert chunks[-1].unterminated and chunks[-1].last and not any(c.last for c in chunks[:-1])
        lengths = [len(c.data) for c in chunks[:-2]]  # not the end of the file, nor the unterminated line
        if taper and not suffix:  # the size of a plain file is known: its last chunks shrink, to an eighth
            assert max(lengths) > size - 300 and size // 8 - 300 < min(lengths) < size // 4
        else:
            assert min(lengths) > size - 300, "full chunks (up to the last whole line) until the end"


def test_a_failed_background_sync_fails_the_preprocessing(tmp_path, generated, monkeypatch) -> None:
    import errno
    import os

    from pipeline.data import parts

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(parts, "_SYNC_EVERY", 1 << 10)  # a sync after every block
    monkeypatch.setattr(os, "fdatasync", full)
    cfg = DataConfig(
        name="t",
        raw_dir=str(generated),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.random,
        raw_files=[str(generated / "train.tsv")],
        id_mode=IdMode.hash,
        max_ids_per_feature=1000,
        block_size_mb=1,
    )
    with pytest.raises(OSError, match="No space left"):
        preprocess(cfg)
    assert not list((tmp_path / "out").glob("parts/*/done.json")) and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.filterwarnings("ignore:Local function is not supported by pickle")
def test_torchrec_dense_mode_equals_torchrec_converter(tmp_path, generated) -> None:
    from torchrec.datasets.criteo import BinaryCriteoUtils

    src = generated / "train.tsv"
    BinaryCriteoUtils.tsv_to_npys(str(src), str(tmp_path / "d.npy"), str(tmp_path / "s.npy"), str(tmp_path / "l.npy"))
    cfg = DataConfig(
        name="t",
        raw_dir=str(generated),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.files,
        dense_transform=DenseTransform.torchrec,
        id_mode=IdMode.vocab,
    )
    m = preprocess(cfg)
    split = BinarySplit(cfg.processed_dir, "train", m)
    ref_dense = np.load(tmp_path / "d.npy")
    np.testing.assert_array_equal(split.column("dense"), ref_dense)  # bit for bit
    np.testing.assert_array_equal(split.column("labels"), np.load(tmp_path / "l.npy").ravel())
    raw = _read_all(src)
    np.testing.assert_array_equal(raw["sparse"].astype(np.int64), np.load(tmp_path / "s.npy"))
    assert (raw["dense"] < 0).any(), "the file has negative values, so the shift by the minimum matters"


def test_day_files_plain_and_gz_split_like_the_1tb_reference(tmp_path, generated) -> None:
    lines = (generated / "train.tsv").read_text().splitlines(keepends=True)
    days = tmp_path / "days"
    days.mkdir()
    chunks = [lines[:2000], lines[2000:3500], lines[3500:5001]]
    (days / "day_0").write_text("".join(chunks[0]))
    with gzip.open(days / "day_1.gz", "wt") as f:
        f.write("".join(chunks[1]))
    with gzip.open(days / "day_10.gz", "wt") as f:  # sorts after day_1 by number, not as text
        f.write("".join(chunks[2]))
    cfg = DataConfig(
        name="d",
        raw_dir=str(days),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.days,
        raw_files=[str(days / "day_*")],
        id_mode=IdMode.hash,
        max_ids_per_feature=1000,
    )
    assert [p.name for p in raw_files(cfg)] == ["day_0", "day_1.gz", "day_10.gz"]
    m = preprocess(cfg)
    assert {s: v.num_rows for s, v in m.splits.items()} == {"train": 3500, "val": 750, "test": 751}
    assert len(m.splits["train"].parts) == 2
    labels = np.array([int(ln.split("\t", 1)[0]) for ln in lines[:5001]])
    np.testing.assert_array_equal(BinarySplit(cfg.processed_dir, "train").column("labels"), labels[:3500])
    np.testing.assert_array_equal(BinarySplit(cfg.processed_dir, "test").column("labels"), labels[-751:])


def test_per_column_caps_size_the_tables(tmp_path, generated) -> None:
    caps = [10 + j for j in range(26)]
    cfg = DataConfig(
        name="c",
        raw_dir=str(generated),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.files,
        id_mode=IdMode.hash,
        num_embeddings_per_feature=caps,
    )
    m = preprocess(cfg)
    assert m.num_embeddings_per_feature == caps
    ids = BinarySplit(cfg.processed_dir, "train", m).column("sparse")
    assert (ids.max(axis=0) < np.array(caps)).all() and (ids.max(axis=0) == np.array(caps) - 1).sum() > 20
    vcfg = DataConfig(**{**cfg.__dict__, "id_mode": IdMode.vocab, "processed_dir": str(tmp_path / "v")})
    assert max(preprocess(vcfg).num_embeddings_per_feature[j] - caps[j] for j in range(26)) <= 0


def test_rank_slices_cover_every_training_row_once_per_epoch(tmp_path, generated) -> None:
    days = tmp_path / "days"
    days.mkdir()
    lines = (generated / "train.tsv").read_text().splitlines(keepends=True)
    for d, (lo, hi) in enumerate([(0, 1536), (1536, 3072), (3072, 4000)]):
        (days / f"day_{d}").write_text("".join(lines[lo:hi]))
    cfg = DataConfig(
        name="d",
        raw_dir=str(days),
        processed_dir=str(tmp_path / "out"),
        split=SplitMode.days,
        raw_files=[str(days / "day_*")],
        id_mode=IdMode.hash,
        max_ids_per_feature=50,
    )
    preprocess(cfg)
    split = BinarySplit(cfg.processed_dir, "train")  # 3072 rows in two parts
    seen: list[np.ndarray] = []
    original = split.make_batch
    split.make_batch = lambda rows: (seen.append(rows), original(rows))[1]
    for rank in range(2):
        for _ in train_batches(split, 512, rank, 2, seed=3, shuffle=True, num_epochs=1):
            pass
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(3072))
    b = next(train_batches(split, 3072, 0, 1, seed=3, shuffle=False, num_epochs=1))
    raw_labels = [int(ln.split("\t", 1)[0]) for ln in lines[:3072]]
    assert b.labels.tolist() == raw_labels, "rows come from both parts in file order"


_PREPROCESS = """
import sys
sys.path.insert(0, {root!r})
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from pipeline.config import DataConfig, SplitMode, IdMode
from pipeline.data.preprocess import preprocess
preprocess(DataConfig(name="r", raw_dir={raw!r}, processed_dir={out!r}, split=SplitMode.days,
                      raw_files=[{raw!r} + "/day_*"], id_mode=IdMode.hash, max_ids_per_feature=1000, block_size_mb=1))
"""


def _run_preprocess(raw: Path, out: Path, **kw) -> subprocess.Popen:
    code = _PREPROCESS.format(root=str(ROOT), raw=str(raw), out=str(out))
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def test_killed_preprocess_resumes_at_its_file_and_verifies_finished_ones(tmp_path, generated) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    text = (generated / "train.tsv").read_text()
    for d in range(3):
        with open(raw / f"day_{d}", "w") as f:
            f.write(text * 25)  # 150k rows per day: long enough to be killed mid-way
    clean = tmp_path / "clean"
    assert _run_preprocess(raw, clean).wait(timeout=300) == 0
    out = tmp_path / "out"
    proc = _run_preprocess(raw, out)
    deadline = time.time() + 120
    while not (out / "parts" / "000" / "done.json").exists():
        assert proc.poll() is None and time.time() < deadline, "preprocess ended before part 000 was done"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert not (out / "parts" / "002" / "done.json").exists(), "killed before the last part"

    resumed = _run_preprocess(raw, out)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "part 000 (" in log and "already done and verified by sha256: skipped" in log
    assert "part 002:" in log, "the unfinished parts are redone"
    want, got = (json.loads((d / "manifest.json").read_text())["splits"] for d in (clean, out))
    assert got == want, "the resumed output equals an uninterrupted run"

    # A finished part whose files were damaged is redone, not trusted.
    with open(out / "parts" / "001" / "train" / "dense.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    (out / "manifest.json").unlink()
    again = _run_preprocess(raw, out)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "does not match its sha256: redoing it" in log, log
    assert json.loads((out / "manifest.json").read_text())["splits"] == want


def test_memory_stays_bounded_by_the_block_size(tmp_path, generated) -> None:
    """Peak RSS while reading a file 8x larger than before grows by far less than the file."""
    text = (generated / "train.tsv").read_text()
    small, large = tmp_path / "small.tsv", tmp_path / "large.tsv"
    small.write_text(text * 10)
    large.write_text(text * 80)  # ~120 MB
    probe = (
        "import resource, sys; sys.path.insert(0, {root!r}); from pipeline.data.tsv import read_blocks; "
        "n = sum(len(b) for b in read_blocks({path!r}, 4)); "
        "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    peaks = {}
    for path in (small, large):
        out = subprocess.run(
            [sys.executable, "-c", probe.format(root=str(ROOT), path=str(path))],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout.split()
        peaks[path.name] = int(out[1]) / 1024  # MiB
    size_mb = large.stat().st_size / 2**20
    assert peaks["large.tsv"] - peaks["small.tsv"] < 0.25 * (size_mb - small.stat().st_size / 2**20), peaks


def test_kernels_compile_without_a_writable_cache_folder(monkeypatch) -> None:
    """Where numba finds no folder to cache machine code in, it refuses ``cache=True`` at decoration
    ("no locator available"); ``compiled`` then compiles in-process instead of failing the import."""
    import numba
    import numba.core.caching

    def plus_one(x):
        return x + 1

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator available"):
        numba.njit(cache=True)(plus_one)
    assert compiled(plus_one)(41) == 42
