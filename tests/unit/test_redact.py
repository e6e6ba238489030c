"""Credentials masked in what a run writes and logs (pipeline/redact.py)."""

from __future__ import annotations

import io
import logging

import pytest
from omegaconf import OmegaConf

from pipeline.config import LoggerConfig, TrainConfig
from pipeline.metrics.loggers import RunWriter
from pipeline.redact import MASK, RedactingFilter, is_secret_name, redact_config, redact_files, redact_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "logger.mlflow_tracking_uri=http://bob:hunter2@host:5000/x",
            "logger.mlflow_tracking_uri=http://***@host:5000/x",
        ),
        ("https://ghp_token@host/repo", "https://***@host/repo"),
        (r"uri=http\://bob\:hunter2@h\:5000", r"uri=http\://***@h\:5000"),  # escaped by Hydra's sweeper
        (r'"uri=http\\://bob\\:hunter2@h"', r'"uri=http\\://***@h"'),  # and in JSON
        ("s3://k:s@bucket/a", "s3://***@bucket/a"),
        ("uri: http://host/?api_key=zz&page=2", "uri: http://host/?api_key=***&page=2"),
        ("db_password=x password: y token=YWJj==", "db_password=*** password: *** token=***"),
        ("mlflow_tracking_token: null", "mlflow_tracking_token: null"),  # nothing to hide
        ("password=${oc.env:PW}", "password=${oc.env:PW}"),  # an interpolation, not a value
        ("num_passes=3 author: me key_column=id", "num_passes=3 author: me key_column=id"),
        ("sqlite:////tmp/x.db http://127.0.0.1:5000", "sqlite:////tmp/x.db http://127.0.0.1:5000"),
    ],
)
def test_redact_text_masks_credentials_and_leaves_the_rest(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_values_of_secret_environment_variables_are_masked_wherever_they_appear(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0k-abcdef")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-1234")  # not a secret's name: left alone
    text = "experiment t0k-abcdef, key wJalrXUtnFEMI, run run-1234"
    assert redact_text(text) == f"experiment {MASK}, key {MASK}, run run-1234"
    assert is_secret_name("MLFLOW_TRACKING_PASSWORD") and is_secret_name("apiKey") and not is_secret_name("passes")


def test_redact_config_masks_secret_keys_urls_and_environment_values(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    config = {
        "logger": {"mlflow_tracking_uri": "http://u:p@h:1", "mlflow_tracking_token": "abc", "name": "default"},
        "data": {"raw_files": ["s3://AKIA:sec@b/x.tsv", "plain.tsv"], "name": "0123456789abcdef"},
        "trainer": {"access_key": None, "seed": 7},
    }
    assert redact_config(config) == {
        "logger": {"mlflow_tracking_uri": "http://***@h:1", "mlflow_tracking_token": MASK, "name": "default"},
        "data": {"raw_files": ["s3://***@b/x.tsv", "plain.tsv"], "name": MASK},
        "trainer": {"access_key": None, "seed": 7},
    }


def test_the_shipped_config_has_nothing_to_mask() -> None:
    config = OmegaConf.to_container(OmegaConf.structured(TrainConfig()), enum_to_str=True)
    assert redact_config(config) == config


def test_config_yaml_is_written_without_credentials(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-pw")
    cfg = TrainConfig()
    cfg.logger = LoggerConfig(mlflow_tracking_uri="https://user:s3cr3t-pw@mlflow.example:443")
    writer = RunWriter(tmp_path, True, LoggerConfig(backends=["jsonl"]))
    writer.config(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    writer.close()
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr3t-pw" not in text and "user:" not in text
    assert OmegaConf.load(tmp_path / "config.yaml").logger.mlflow_tracking_uri == "https://***@mlflow.example:443"


def test_hydra_files_are_masked_in_place(tmp_path) -> None:
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("- logger.mlflow_tracking_uri=http://bob:hunter2@h:5000\n- model=tiny\n")
    redact_files([overrides, tmp_path / "missing.yaml"])
    assert overrides.read_text() == "- logger.mlflow_tracking_uri=http://***@h:5000\n- model=tiny\n"


def test_the_log_filter_masks_every_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("tests.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("tracking at %s", "http://bob:hunter2@h:5000")
        log.warning("no secret in %d lines", 2)
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "tracking at http://***@h:5000\nno secret in 2 lines\n"
