"""The entry point prints the resolved config without training, as Hydra's --cfg job promises."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.conftest import ROOT


def test_cfg_job_prints_the_resolved_config() -> None:
    out = subprocess.run(
        [sys.executable, "pipeline/train.py", "--cfg", "job", "--resolve", "model.self_interaction=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["self_interaction"] is True
    assert cfg["model"]["dense_arch_layer_sizes"] == [512, 256, 128]
    assert set(cfg) == {"model", "data", "sharding", "optimizer", "trainer", "checkpoint", "launcher", "logger"}


def test_launch_help_lists_the_commands() -> None:
    out = subprocess.run(["bash", "launch.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for command in ("train", "test", "preprocess", "doctor", "setup"):
        assert f"  {command}" in out.stdout
