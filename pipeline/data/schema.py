"""The raw click-log layout: label, integer (dense) columns, categorical (sparse) columns.

One row per line, tab-separated, no header: label (0/1), the integer columns (empty = missing, may be
negative), then the categorical columns (empty = missing). Criteo's layout (:data:`CRITEO`, the default)
has 13 integer features I1..I13 and 26 categorical features C1..C26 as 8-hex-digit hashes; a
:class:`Schema` built from ``data.dense_columns``, ``data.sparse_columns`` and ``data.categorical_format``
declares any other (e.g. decimal user and item ids).
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

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Schema:
        """The layout ``data.dense_columns``/``sparse_columns``/``feature_names``/``categorical_format`` declare."""
        return cls(
            tuple(cfg.dense_columns),
            tuple(cfg.sparse_columns),
            tuple(cfg.feature_names or cfg.sparse_columns),
            CategoricalFormat(cfg.categorical_format),
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
        )

    def to_dict(self) -> dict:
        return {
            "dense_columns": list(self.dense_columns),
            "sparse_columns": list(self.sparse_columns),
            "feature_names": list(self.feature_names),
            "categorical_format": self.categorical_format.value,
        }

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
        return (
            f"TSV: [label], {self.num_dense} integer(s) {span(self.dense_columns)} (empty = missing), "
            f"{self.num_sparse} categorical(s) {span(self.sparse_columns)} as {cats} (empty = missing)"
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
