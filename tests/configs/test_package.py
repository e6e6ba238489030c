"""The project as a package: the wheel ships the configs and the dlrm-pipeline command, which runs from any
folder and reads the user's configs/ folder there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a folder of its own."""
    base = tmp_path_factory.mktemp("package")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "wheel"), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    (wheel,) = (base / "wheel").glob("dlrm_pipeline-*.whl")
    install = [*pip, "install", "--no-deps", "--target", str(base / "site"), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    return base / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "NPROC": "1"}
    return subprocess.run(
        [str(site / "bin" / "dlrm-pipeline"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_wheel_holds_every_config_and_the_command(installed) -> None:
    shipped = {
        p.relative_to(installed / "pipeline" / "conf") for p in (installed / "pipeline" / "conf").rglob("*.yaml")
    }
    in_tree = {p.relative_to(ROOT / "pipeline" / "conf") for p in (ROOT / "pipeline" / "conf").rglob("*.yaml")}
    assert shipped == in_tree and Path("train.yaml") in shipped
    assert (installed / "bin" / "dlrm-pipeline").is_file()


def test_the_command_runs_from_any_folder_with_the_users_config_groups(installed, tmp_path) -> None:
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "mine.yaml").write_text("defaults:\n  - tiny\nembedding_dim: 24\n")
    where = _run(installed, tmp_path, "doctor")  # imports the installed copy, not the checkout
    assert where.returncode == 0, where.stderr[-2000:]
    shown = _run(installed, tmp_path, "train", "model=mine", "data=tiny", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr[-2000:]
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["model"]["embedding_dim"] == 24 and cfg["model"]["over_arch_layer_sizes"] == [16, 1]  # tiny, dim 24
    bad = _run(installed, tmp_path, "train", "model.embeding_dim=3")
    assert bad.returncode == 2 and "did you mean model.embedding_dim?" in bad.stderr
    assert not (tmp_path / "outputs").exists(), "no run folder from a start that failed validation"
