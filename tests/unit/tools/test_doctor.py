"""Tests for the environment doctor (pipeline.tools.doctor).

Mismatches are simulated through the injectable ``versions`` / ``importer`` arguments
(or by monkeypatching the module-level functions), so the real install is never touched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.distributed.env import backend_for
from pipeline.tools import doctor
from pipeline.tools.doctor import DoctorReport, StackVersions, check_environment, format_report, run_checks

REPO_ROOT = Path(__file__).resolve().parents[3]
UNDEFINED_SYMBOL = (
    "/venv/lib/python3.11/site-packages/fbgemm_gpu/fbgemm_gpu_py.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"
)


def _versions(torch: str, fbgemm: str, torchrec: str, dist: str = "fbgemm-gpu-cpu") -> StackVersions:
    return StackVersions(torch=torch, fbgemm=fbgemm, fbgemm_distribution=dist, torchrec=torchrec, fbgemm_variant="cpu")


def _must_not_import() -> None:
    raise AssertionError("a known-bad pairing must not be imported")


def _noop_import() -> None:
    pass


def _assert_names_versions_and_fix(message: str, versions: StackVersions) -> None:
    assert f"torch {versions.torch}" in message
    assert f"{versions.fbgemm_distribution} {versions.fbgemm}" in message
    assert f"torchrec {versions.torchrec}" in message
    assert "./launch.sh setup" in message
    assert "requirements/cpu.txt" in message and "requirements/cuda.txt" in message
    assert "--no-deps" in message
    assert "Traceback" not in message


def test_real_environment_passes() -> None:
    report = run_checks()
    assert report.ok, report.error_message()
    assert report.pairing == "verified"
    assert report.versions.torch and report.versions.fbgemm and report.versions.torchrec
    assert report.cpu_cores >= 1
    assert report.backend == ("nccl" if report.nccl_usable else "gloo")
    if not report.cuda_available:
        assert report.nccl_usable is False
        assert report.cuda_devices == []


def test_read_versions_does_not_import_fbgemm_or_torchrec() -> None:
    # In a fresh interpreter: reading versions must work even when importing would crash.
    code = (
        "import sys\n"
        "from pipeline.tools.doctor import read_versions\n"
        "v = read_versions()\n"
        "assert v.torch and v.fbgemm and v.torchrec and v.fbgemm_distribution, v\n"
        "assert 'fbgemm_gpu' not in sys.modules and 'torchrec' not in sys.modules\n"
        "print(v.describe())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout and "torchrec " in out.stdout


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        # Verified by hand on the dev machine: fbgemm-gpu-cpu 1.9.0 fails to load beside torch 2.13.
        (_versions("2.13.0+cpu", "1.9.0", "1.8.0"), "built for torch 2.14.x"),
        (_versions("2.12.0", "1.8.0", "1.8.0", dist="fbgemm-gpu"), "built for torch 2.13.x"),
        (_versions("2.13.0", "1.8.0", "1.7.0"), "torchrec 1.7.0 needs fbgemm-gpu 1.7.x"),
    ],
)
def test_mismatched_pairing_is_a_problem(versions: StackVersions, expected: str) -> None:
    report = run_checks(versions=versions, importer=_must_not_import)
    assert not report.ok
    assert report.pairing == "mismatched"
    message = report.error_message()
    assert expected in message
    _assert_names_versions_and_fix(message, versions)


def test_import_failure_becomes_one_clear_message() -> None:
    versions = _versions("2.13.0+cpu", "1.8.0", "1.8.0")

    def broken_import() -> None:
        raise OSError(UNDEFINED_SYMBOL)

    report = run_checks(versions=versions, importer=broken_import)
    assert not report.ok
    assert len(report.problems) == 1
    message = report.error_message()
    assert "OSError" in message and "undefined symbol" in message
    assert "built for a different torch" in message
    _assert_names_versions_and_fix(message, versions)


def test_wrapped_load_error_reports_the_undefined_symbol_cause() -> None:
    # The real shape seen with fbgemm-gpu-cpu 1.9.0 beside torch 2.13: torch.ops.load_library
    # raises "Could not load this library" and chains the loader's OSError as the cause.
    versions = _versions("2.13.0+cpu", "1.8.0", "1.8.0")

    def broken_import() -> None:
        try:
            raise OSError(UNDEFINED_SYMBOL)
        except OSError as cause:
            raise OSError("Could not load this library: /venv/.../fbgemm_gpu_tbe_index_select.so") from cause

    message = run_checks(versions=versions, importer=broken_import).error_message()
    assert "Could not load this library" in message
    assert "caused by OSError" in message and "undefined symbol: _ZN3c10" in message
    assert "built for a different torch" in message
    _assert_names_versions_and_fix(message, versions)


def test_check_environment_exits_with_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = _versions("2.13.0+cpu", "1.8.0", "1.8.0")

    def broken_import() -> None:
        raise ImportError(UNDEFINED_SYMBOL)

    # Module-level functions are the other injection point (what a job's call uses).
    monkeypatch.setattr(doctor, "read_versions", lambda: versions)
    monkeypatch.setattr(doctor, "probe_stack", broken_import)
    logged: list[str] = []
    with pytest.raises(SystemExit) as excinfo:
        check_environment(log=logged.append)
    message = excinfo.value.code
    assert isinstance(message, str)  # a str code: Python prints it and exits with status 1
    _assert_names_versions_and_fix(message, versions)
    assert "undefined symbol" in message
    assert logged and "torch 2.13.0+cpu" in logged[0]


def test_check_environment_returns_report_when_ok() -> None:
    logged: list[str] = []
    report = check_environment(log=logged.append)
    assert report.ok
    assert len(logged) == 1 and "backend" in logged[0]


def test_unlisted_pairing_is_only_a_warning() -> None:
    versions = _versions("2.99.0", "1.99.0", "1.99.0")
    report = run_checks(versions=versions, importer=_noop_import)
    assert report.ok
    assert report.pairing == "unverified"
    assert any("unverified pairing" in w for w in report.warnings)


def test_unlisted_pairing_fails_when_ops_do_not_load() -> None:
    versions = _versions("2.99.0", "1.99.0", "1.99.0")

    def broken_import() -> None:
        raise RuntimeError("No such operator fbgemm::asynchronous_complete_cumsum")

    report = run_checks(versions=versions, importer=broken_import)
    assert not report.ok
    assert "No such operator" in report.error_message()


def test_missing_package_is_a_problem() -> None:
    versions = StackVersions(torch="2.13.0", fbgemm="1.8.0", fbgemm_distribution="fbgemm-gpu-cpu", torchrec=None)
    report = run_checks(versions=versions, importer=_must_not_import)
    assert not report.ok
    assert "not installed: torchrec" in report.error_message()


def test_two_fbgemm_wheels_at_once_is_a_problem() -> None:
    versions = StackVersions(
        torch="2.13.0",
        fbgemm="1.8.0",
        fbgemm_distribution="fbgemm-gpu",
        torchrec="1.8.0",
        extra_fbgemm_distributions=("fbgemm-gpu-cpu 1.8.0",),
    )
    report = run_checks(versions=versions, importer=_must_not_import)
    assert not report.ok
    assert "several fbgemm wheels" in report.error_message()


@pytest.mark.parametrize(
    ("cuda", "nccl", "gloo", "expected"),
    [
        (True, True, True, "nccl"),
        (False, True, True, "gloo"),  # nccl compiled in but no GPU: not usable
        (False, False, True, "gloo"),
        (True, False, True, "gloo"),
        (False, False, False, None),
    ],
)
def test_choose_backend(cuda: bool, nccl: bool, gloo: bool, expected: str | None) -> None:
    assert backend_for(cuda, nccl, gloo) == expected


def test_format_report_lists_versions_devices_and_backend() -> None:
    report = DoctorReport(
        python_version="3.11.7",
        versions=_versions("2.13.0+cpu", "1.8.0", "1.8.0"),
        pairing="verified",
        cpu_cores=8,
        gloo_available=True,
        backend="gloo",
        warnings=["something odd"],
    )
    text = format_report(report)
    for needle in ("3.11.7", "2.13.0+cpu", "fbgemm-gpu-cpu", "torchrec  1.8.0", "8 usable cores", "gloo", "OK"):
        assert needle in text
    assert "warning: something odd" in text


def test_module_entry_point_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.doctor"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "status    OK" in out.stdout
    assert "torchrec" in out.stdout


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True), ("fpu avx2 fma", False)],
)
def test_native_bf16_reads_the_cpu_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert doctor.native_bf16(cpuinfo) is expected
    assert doctor.native_bf16(tmp_path / "missing") is None
    line = format_report(
        DoctorReport(
            python_version="3.11",
            versions=StackVersions("2.13.0", "1.8.0", "fbgemm-gpu-cpu", "1.8.0"),
            cpu_bf16=expected,
        )
    )
    assert ("native bf16 (AVX-512 BF16 / AMX)" in line) is expected and ("no native bf16" in line) is not expected
