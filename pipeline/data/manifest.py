"""``manifest.json``: what a finished preprocessing holds, as one typed record every reader uses.

Written last by preprocessing (its presence marks a complete, usable folder): rows per split and their
parts (files, dtype, shape, sha256), the column layout, table sizes, id settings, the dense transform,
the raw sources with sizes, bad-row counts by kind, and the generator's optimum when the data is
synthetic. :meth:`Manifest.load` checks the format version, so data preprocessed by another version
of the pipeline is refused (or, through ``is_current``, preprocessed again) rather than misread.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.schema import Schema
from pipeline.errors import DataError, MissingDataError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 3  # 3: vocab.npz holds the counts; data.min_id_frequency applies when batches are read
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class SplitInfo:
    """One split's rows and the part files that hold them (one part per raw input file feeding it)."""

    num_rows: int = 0
    parts: list[dict] = field(
        default_factory=list
    )  # {"num_rows", "files": {dense|sparse|labels: {path, dtype, shape, sha256}}}


@dataclass
class Manifest:
    """A finished preprocessing; see the module docstring."""

    settings: dict[str, Any]  # the inputs that determined the output (split, id mode, caps, transform, ...)
    sources: list[dict]  # the raw files with size and mtime
    splits: dict[str, SplitInfo]
    schema: Schema
    num_embeddings_per_feature: list[int]  # rows per table before data.min_id_frequency (see features.table_sizes)
    id_caps: list[int] | None = None  # the caps the ids were mapped with (hash mode; vocab mode with a cap)
    reserved_ids: dict[str, int] = field(default_factory=dict)
    dense_transform: str = ""  # the formula, in words
    bad_rows: dict = field(default_factory=dict)  # {"total", "by_kind", "examples"}
    optimum: dict | None = None  # the generator's Bayes-optimal metrics per split, when known
    pooling_factors: list[float] | None = None  # per table: mean ids per training row (None: one-hot, all 1)
    max_lengths: list[int] | None = None  # per table: the most ids in a training row (None: one-hot, all 1)
    vocab_sha256: str | None = None  # vocab mode: the digest of vocab.npz (a checkpoint records the one it trained on)
    # A vocabulary grown from earlier ones (data.vocab_from): their line, oldest first, each {"processed_dir",
    # "vocab_sha256", "rows"}; None for a vocabulary of its own
    vocab_generations: list[dict] | None = None
    seconds: float = 0.0
    version: int = MANIFEST_VERSION

    @property
    def id_mode(self) -> str:
        return self.settings.get("id_mode", "hash")

    @property
    def num_dense(self) -> int:
        return self.schema.num_dense

    @property
    def num_sparse(self) -> int:
        return self.schema.num_sparse

    def table_pooling_factors(self) -> list[float]:
        """Mean ids per row of each table (1.0 for one-hot features)."""
        return list(self.pooling_factors) if self.pooling_factors is not None else [1.0] * self.num_sparse

    def rows(self, split: str) -> int:
        return self.splits[split].num_rows if split in self.splits else 0

    def to_dict(self) -> dict:
        d = {
            "version": self.version,
            "settings": self.settings,
            "sources": self.sources,
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            **self.schema.to_dict(),
            "num_dense_features": self.num_dense,
            "num_sparse_features": self.num_sparse,
            "num_embeddings_per_feature": self.num_embeddings_per_feature,
            "id_caps": self.id_caps,
            "reserved_ids": self.reserved_ids,
            "dense_transform": self.dense_transform,
            "bad_rows": self.bad_rows,
            "optimum": self.optimum,
            "seconds": self.seconds,
        }
        if self.pooling_factors is not None:
            d |= {"pooling_factors": self.pooling_factors, "max_lengths": self.max_lengths}
        if self.vocab_sha256 is not None:
            d["vocab_sha256"] = self.vocab_sha256
        if self.vocab_generations is not None:
            d["vocab_generations"] = self.vocab_generations
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            settings=d.get("settings", {}),
            sources=d.get("sources", []),
            splits={k: SplitInfo(v.get("num_rows", 0), list(v.get("parts", []))) for k, v in d["splits"].items()},
            schema=Schema.from_dict(d),
            num_embeddings_per_feature=list(d["num_embeddings_per_feature"]),
            id_caps=d.get("id_caps"),
            reserved_ids=d.get("reserved_ids", {}),
            dense_transform=d.get("dense_transform", ""),
            bad_rows=d.get("bad_rows", {}),
            optimum=d.get("optimum"),
            pooling_factors=d.get("pooling_factors"),
            max_lengths=d.get("max_lengths"),
            vocab_sha256=d.get("vocab_sha256"),
            vocab_generations=d.get("vocab_generations"),
            seconds=d.get("seconds", 0.0),
            version=d.get("version", 0),
        )

    @staticmethod
    def path(processed_dir: str | Path) -> Path:
        return Path(processed_dir) / MANIFEST

    @classmethod
    def read(cls, processed_dir: str | Path) -> Manifest | None:
        """The manifest in ``processed_dir`` whatever its version, or None when there is none (or it is unreadable)."""
        path = cls.path(processed_dir)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def load(cls, processed_dir: str | Path) -> Manifest:
        """The manifest of a finished preprocessing of this version.

        Raises:
            MissingDataError: there is none (naming the folder and the command that makes one).
            DataError: it was written by another version of the pipeline.
        """
        path = cls.path(processed_dir)
        if not path.is_file():
            raise MissingDataError(f"{path} not found: preprocess first (./launch.sh preprocess data=...)")
        manifest = cls.read(processed_dir)
        if manifest is None:
            raise DataError(f"{path} is not a readable manifest: preprocess again (./launch.sh preprocess data=...)")
        if manifest.version != MANIFEST_VERSION:
            raise DataError(
                f"{path} is format {manifest.version}, this pipeline reads {MANIFEST_VERSION}: preprocess "
                "again (./launch.sh preprocess data=...)"
            )
        return manifest

    def save(self, processed_dir: str | Path) -> None:
        """Write atomically (a temporary file, fsynced, renamed over)."""
        path = self.path(processed_dir)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
