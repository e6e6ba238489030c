"""The raw click-log layout: label, integer (dense) columns, categorical (sparse) columns.

One row per line, tab-separated, no header: label (0/1), the integer columns (empty = missing, may be
negative), then the categorical columns (empty = missing). Criteo's layout (:data:`CRITEO`, the default)
has 13 integer features I1..I13 and 26 categorical features C1..C26 as 8-hex-digit hashes; a
:class:`Schema` built from ``data.dense_columns``, ``data.sparse_columns`` and ``data.categorical_format``
declares any other (e.g. decimal user and item ids).

Multi-hot (list) columns, declared by ``data.multi_hot_columns`` (column -> cap), hold several ids in one
field separated by ``data.list_separator`` (default ``,``): ``a1b2c3d4,00ff00ff``, or in the decimal
format ``17,4,230``. An empty field is an empty list (no ids). Columns in ``data.weighted_columns`` write
each id as ``id:weight`` with a float weight (``17:0.5,4:2``). A cap N > 0 keeps the last N ids of a
longer list (a sequence is written oldest first, so its most recent N ids are kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import NUM_DENSE_FEATURES, NUM_SPARSE_FEATURES, SPARSE_FEATURE_NAMES, CategoricalFormat, DataConfig

LABEL = "label"


DENSE_COLUMNS = [f"I{i + 1}" for i in range(NUM_DENSE_FEATURES)]


SPARSE_COLUMNS = [f"C{i + 1}" for i in range(NUM_SPARSE_FEATURES)]


COLUMNS = [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS]


NUM_FIELDS = len(COLUMNS)


UNLABELLED_COLUMNS = COLUMNS[1:]  # the layout without a label column (Kaggle test.txt)


@dataclass(frozen=True)
class Schema:
    """A raw layout: label, then ``dense_columns``, then ``sparse_columns``; the default is Criteo's."""

    dense_columns: tuple[str, ...] = tuple(DENSE_COLUMNS)
    sparse_columns: tuple[str, ...] = tuple(SPARSE_COLUMNS)
    feature_names: tuple[str, ...] = tuple(SPARSE_FEATURE_NAMES)  # KJT keys, one per sparse column
    categorical_format: CategoricalFormat = CategoricalFormat.hex
    multi_hot: tuple[tuple[str, int], ...] = ()  # (column, cap) of the list columns, in sparse_columns order
    weighted: tuple[str, ...] = ()  # list columns written id:weight
    list_separator: str = ","

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Schema:
        """The layout ``data.dense_columns``/``sparse_columns``/``feature_names``/``categorical_format`` declare."""
        return cls(
            tuple(cfg.dense_columns),
            tuple(cfg.sparse_columns),
            tuple(cfg.feature_names or cfg.sparse_columns),
            CategoricalFormat(cfg.categorical_format),
            tuple((c, int(cfg.multi_hot_columns[c])) for c in cfg.sparse_columns if c in cfg.multi_hot_columns),
            tuple(c for c in cfg.sparse_columns if c in cfg.weighted_columns),
            cfg.list_separator,
        )

    @classmethod
    def from_dict(cls, d: dict | None) -> Schema:
        """From a manifest, export.json or resolved data config; keys it lacks (written before columns could
        be declared) are Criteo's."""
        d = d or {}
        sparse = tuple(d.get("sparse_columns") or SPARSE_COLUMNS)
        names = d.get("feature_names") or (SPARSE_FEATURE_NAMES if "sparse_columns" not in d else sparse)
        return cls(
            tuple(d.get("dense_columns", DENSE_COLUMNS)),
            sparse,
            tuple(names),
            CategoricalFormat(d.get("categorical_format", "hex")),
            tuple((c, int(n)) for c, n in (d.get("multi_hot_columns") or {}).items()),
            tuple(d.get("weighted_columns") or ()),
            d.get("list_separator", ","),
        )

    def to_dict(self) -> dict:
        d = {
            "dense_columns": list(self.dense_columns),
            "sparse_columns": list(self.sparse_columns),
            "feature_names": list(self.feature_names),
            "categorical_format": self.categorical_format.value,
        }
        if self.multi_hot:  # one-hot layouts keep the keys (and fingerprints) they always had
            d |= {
                "multi_hot_columns": dict(self.multi_hot),
                "weighted_columns": list(self.weighted),
                "list_separator": self.list_separator,
            }
        return d

    @property
    def multi_hot_columns(self) -> list[str]:
        return [c for c, _ in self.multi_hot]

    @property
    def multi_index(self) -> list[int]:
        """Positions (in ``sparse_columns``, and so in the tables and KJT keys) of the list columns."""
        cols = set(self.multi_hot_columns)
        return [j for j, c in enumerate(self.sparse_columns) if c in cols]

    @property
    def one_hot_index(self) -> list[int]:
        """Positions of the one-id columns (``RawBlock.sparse`` and ``sparse.bin`` hold these, in this order)."""
        cols = set(self.multi_hot_columns)
        return [j for j, c in enumerate(self.sparse_columns) if c not in cols]

    @property
    def num_one_hot(self) -> int:
        return self.num_sparse - len(self.multi_hot)

    @property
    def caps(self) -> list[int]:
        """Most ids kept per row, per list column (0 = all)."""
        return [n for _, n in self.multi_hot]

    @property
    def weighted_mask(self) -> list[bool]:
        """Per list column: written id:weight."""
        return [c in self.weighted for c, _ in self.multi_hot]

    @property
    def num_dense(self) -> int:
        return len(self.dense_columns)

    @property
    def num_sparse(self) -> int:
        return len(self.sparse_columns)

    @property
    def columns(self) -> list[str]:
        return [LABEL, *self.dense_columns, *self.sparse_columns]

    @property
    def num_fields(self) -> int:
        """Fields of a labelled row."""
        return 1 + self.num_dense + self.num_sparse

    def describe(self) -> str:
        """The layout in words, for messages and export.json."""

        def span(cols: tuple[str, ...]) -> str:
            return "none" if not cols else cols[0] if len(cols) == 1 else f"{cols[0]}..{cols[-1]}"

        cats = "8-hex-digit hashes" if self.categorical_format == CategoricalFormat.hex else "decimal integer ids"
        lists = ""
        if self.multi_hot:
            weighted = f", {', '.join(self.weighted)} as id:weight" if self.weighted else ""
            lists = (
                f"; lists of ids separated by {self.list_separator!r} in {', '.join(self.multi_hot_columns)} "
                f"(empty = no ids{weighted})"
            )
        return (
            f"TSV: [label], {self.num_dense} integer(s) {span(self.dense_columns)} (empty = missing), "
            f"{self.num_sparse} categorical(s) {span(self.sparse_columns)} as {cats} (empty = missing){lists}"
        )


CRITEO = Schema()


# Per-column row counts of the public datasets (TorchRec's and MLPerf's DLRM examples use the same).
CARDINALITIES = {
    "criteo_kaggle": [
        1460,
        583,
        10131227,
        2202608,
        305,
        24,
        12517,
        633,
        3,
        93145,
        5683,
        8351593,
        3194,
        27,
        14992,
        5461306,
        10,
        5652,
        2173,
        4,
        7046547,
        18,
        15,
        286181,
        105,
        142572,
    ],
    "criteo_1tb": [
        45833188,
        36746,
        17245,
        7413,
        20243,
        3,
        7114,
        1441,
        62,
        29275261,
        1572176,
        345138,
        10,
        2209,
        11267,
        128,
        4,
        974,
        14,
        48937457,
        11316796,
        40094537,
        452104,
        12606,
        104,
        35,
    ],
}
