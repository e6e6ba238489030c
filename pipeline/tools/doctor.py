"""Environment doctor: checks that torch, fbgemm-gpu and torchrec belong together.

TorchRec sits on FBGEMM_GPU's compiled operators, and those are built against one
exact torch minor release. A mismatched trio does not fail at install time (pip
happily installs it); it fails at import time with an opaque
``OSError: ... undefined symbol: _ZN...``. This module turns that into one
readable message naming the installed versions and the fix.

Run it by hand as ``./launch.sh doctor`` or call :func:`check_environment`
at the start of a training job.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

# Known-good pairings, FBGEMM minor release -> the torch minor release it is built for.
# TorchRec is released in lockstep with FBGEMM, so the torchrec minor must equal the
# fbgemm minor ("TorchRec and FBGEMM have matching version numbers that are tested
# together upon release", https://pytorch.org/torchrec/setup-torchrec.html).
# Sources for the torch column:
#   0.4 .. 1.5: FBGEMM Releases Compatibility Table,
#               https://docs.pytorch.org/FBGEMM/general/Releases.html
#   1.6 .. 1.8: fbgemm_gpu's own runtime table `_fbgemm_torch_compat_table` in
#               fbgemm_gpu/__init__.py (added by pytorch/FBGEMM#5941), and
#               pytorch/test-infra#8101 (1.7 "aligns with PyTorch 2.12.x"),
#               pytorch/test-infra#8431 / #8519 (1.8 "aligns with PyTorch 2.13").
#   1.9:        pytorch/FBGEMM#6254 ("Add v1.9.0 -> torch 2.14 to compat table").
# Verified on our CPU dev machine: torch 2.13 + fbgemm-gpu-cpu 1.8 + torchrec 1.8 loads;
# fbgemm-gpu-cpu 1.9.0 beside torch 2.13 fails to load (undefined symbol).
FBGEMM_TORCH_COMPAT: dict[str, str] = {
    "1.9": "2.14",
    "1.8": "2.13",
    "1.7": "2.12",
    "1.6": "2.11",
    "1.5": "2.10",
    "1.4": "2.9",
    "1.3": "2.8",
    "1.2": "2.7",
    "1.1": "2.6",
    "1.0": "2.5",
    "0.8": "2.4",
    "0.7": "2.3",
    "0.6": "2.2",
    "0.5": "2.1",
    "0.4": "2.0",
}

# Every wheel name that ships the `fbgemm_gpu` import package. They all install into
# the same directory, so more than one of them at once means a half-overwritten library.
FBGEMM_DISTRIBUTIONS: tuple[str, ...] = (
    "fbgemm-gpu",
    "fbgemm-gpu-cpu",
    "fbgemm-gpu-nightly",
    "fbgemm-gpu-nightly-cpu",
)
TORCHREC_DISTRIBUTIONS: tuple[str, ...] = ("torchrec", "torchrec-nightly", "torchrec-nightly-cpu")

FIX_HINT = (
    "Fix: reinstall the pinned stack with `./launch.sh setup`, or by hand: "
    "`pip install -r requirements/cpu.txt` (CPU) or `pip install -r requirements/cuda.txt` (CUDA), "
    "then `pip install --no-deps -r requirements/torchrec.txt` (torchrec must go in with --no-deps)."
)


@dataclass(frozen=True)
class StackVersions:
    """Installed versions of the three packages, read from metadata (nothing imported).

    Attributes:
        torch: torch version, e.g. ``2.13.0+cpu``; None when not installed.
        fbgemm: fbgemm_gpu version; None when not installed.
        fbgemm_distribution: which wheel provides fbgemm_gpu, e.g. ``fbgemm-gpu-cpu``.
        torchrec: torchrec version; None when not installed.
        fbgemm_variant: build variant from fbgemm's target file (``cpu``/``cuda``/``rocm``).
        extra_fbgemm_distributions: other fbgemm wheels installed at the same time.
    """

    torch: str | None
    fbgemm: str | None
    fbgemm_distribution: str | None
    torchrec: str | None
    fbgemm_variant: str | None = None
    extra_fbgemm_distributions: tuple[str, ...] = ()

    def describe(self) -> str:
        """Returns e.g. ``torch 2.13.0+cpu, fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0``."""
        fbgemm_name = self.fbgemm_distribution or "fbgemm-gpu"
        return (
            f"torch {self.torch or 'not installed'}, "
            f"{fbgemm_name} {self.fbgemm or 'not installed'}, "
            f"torchrec {self.torchrec or 'not installed'}"
        )


@dataclass(frozen=True)
class CudaDevice:
    """One visible CUDA device."""

    index: int
    name: str
    total_memory_bytes: int


@dataclass
class DoctorReport:
    """Everything the doctor found; ``ok`` is False when training cannot run."""

    python_version: str
    versions: StackVersions
    pairing: str = "unknown"  # "verified", "unverified" or "mismatched"
    torch_cuda: str | None = None  # torch.version.cuda; None for a CPU build
    torch_hip: str | None = None  # torch.version.hip; set for a ROCm build
    cpu_cores: int = 0
    cpu_bf16: bool | None = None  # native bfloat16 (AVX-512 BF16 or AMX); None: unknown
    cuda_available: bool = False
    cuda_devices: list[CudaDevice] = field(default_factory=list)
    gloo_available: bool = False
    nccl_available: bool = False
    nccl_usable: bool = False
    backend: str | None = None  # what a training job would pick
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings do not count)."""
        return not self.problems

    def error_message(self) -> str:
        """One message naming the installed versions, every problem and the fix."""
        lines = [f"Environment check failed for {self.versions.describe()}:"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(FIX_HINT)
        return "\n".join(lines)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _fbgemm_variant(distribution: str) -> str | None:
    """Reads fbgemm's build variant from the file it ships, without importing it.

    The dist name alone is not enough: ``fbgemm-gpu`` from the PyTorch CPU index is
    a CPU build, from PyPI it is a CUDA build.
    """
    try:
        path = metadata.distribution(distribution).locate_file("fbgemm_gpu/docs/target.default.json.py")
        with open(str(path)) as f:
            return str(json.load(f).get("variant")) or None
    except Exception:  # best effort: older wheels lack the file
        return None


def read_versions() -> StackVersions:
    """Reads the installed versions from package metadata only.

    Importing fbgemm_gpu or torchrec from a mismatched install raises (or worse)
    at import time, so nothing is imported here.
    """
    fbgemm_found = [(d, v) for d in FBGEMM_DISTRIBUTIONS if (v := _dist_version(d)) is not None]
    torchrec_found = [v for d in TORCHREC_DISTRIBUTIONS if (v := _dist_version(d)) is not None]
    fbgemm_dist, fbgemm_version = fbgemm_found[0] if fbgemm_found else (None, None)
    return StackVersions(
        torch=_dist_version("torch"),
        fbgemm=fbgemm_version,
        fbgemm_distribution=fbgemm_dist,
        torchrec=torchrec_found[0] if torchrec_found else None,
        fbgemm_variant=_fbgemm_variant(fbgemm_dist) if fbgemm_dist else None,
        extra_fbgemm_distributions=tuple(f"{d} {v}" for d, v in fbgemm_found[1:]),
    )


def minor(version: str | None) -> str | None:
    """Returns ``major.minor`` of a version string (``2.13.0+cpu`` -> ``2.13``)."""
    if not version:
        return None
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def check_pairing(versions: StackVersions) -> tuple[str, list[str], list[str]]:
    """Checks the trio against :data:`FBGEMM_TORCH_COMPAT`.

    Returns:
        ``(pairing, problems, warnings)`` where pairing is ``verified``,
        ``unverified`` (not in the table: a warning only) or ``mismatched``.
    """
    problems: list[str] = []
    warnings: list[str] = []
    missing = [
        name
        for name, v in (("torch", versions.torch), ("fbgemm-gpu", versions.fbgemm), ("torchrec", versions.torchrec))
        if v is None
    ]
    if missing:
        problems.append(f"not installed: {', '.join(missing)}")
        return "mismatched", problems, warnings
    if versions.extra_fbgemm_distributions:
        # They share the fbgemm_gpu/ directory, so the files on disk are a mix of builds.
        problems.append(
            f"several fbgemm wheels are installed at once ({versions.fbgemm_distribution} {versions.fbgemm}, "
            f"{', '.join(versions.extra_fbgemm_distributions)}); keep exactly one"
        )

    torch_minor, fbgemm_minor, torchrec_minor = minor(versions.torch), minor(versions.fbgemm), minor(versions.torchrec)
    if fbgemm_minor != torchrec_minor:
        problems.append(
            f"torchrec {versions.torchrec} needs fbgemm-gpu {torchrec_minor}.x "
            f"(torchrec and fbgemm are released in lockstep), found {versions.fbgemm}"
        )
    wanted_torch = FBGEMM_TORCH_COMPAT.get(fbgemm_minor or "")
    if wanted_torch is None:
        warnings.append(
            f"unverified pairing: fbgemm-gpu {versions.fbgemm} is not in the known-good table "
            f"(pipeline.tools.doctor.FBGEMM_TORCH_COMPAT); relying on the operator load check alone"
        )
    elif wanted_torch != torch_minor:
        problems.append(
            f"fbgemm-gpu {versions.fbgemm} is built for torch {wanted_torch}.x but torch {versions.torch} is installed "
            f"(its compiled operators will not load: 'undefined symbol')"
        )
    if problems:
        return "mismatched", problems, warnings
    return ("verified" if wanted_torch is not None else "unverified"), problems, warnings


def probe_stack() -> None:
    """Imports torch, fbgemm_gpu and torchrec and runs two tiny FBGEMM operators.

    Raises:
        Exception: whatever the import or the operator raised (e.g. OSError for an
            undefined symbol, or a RuntimeError when the op is not registered).
    """
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
    import torch
    import torchrec  # noqa: F401

    # A sparse op: proves the fbgemm .so files loaded and registered their operators.
    out = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3], dtype=torch.int64))
    if out.tolist() != [0, 1, 3, 6]:
        raise RuntimeError(f"fbgemm.asynchronous_complete_cumsum returned {out.tolist()}, expected [0, 1, 3, 6]")

    # A CPU table-batched-embedding forward: the kernel TorchRec's sharded tables run on.
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    tbe = SplitTableBatchedEmbeddingBagsCodegen(embedding_specs=[(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)])
    pooled = tbe(torch.tensor([1, 2, 3], dtype=torch.int64), torch.tensor([0, 2, 3], dtype=torch.int64))
    if tuple(pooled.shape) != (2, 4):
        raise RuntimeError(f"CPU TBE forward returned shape {tuple(pooled.shape)}, expected (2, 4)")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first (cycles guarded)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _short_error(exc: BaseException) -> str:
    """First line of an exception, trimmed, plus the root cause when it explains more.

    torch.ops.load_library wraps the loader's error as "Could not load this library:
    X.so" and only the chained cause says "undefined symbol", so the chain is searched.
    """

    def one_line(e: BaseException) -> str:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if len(text) > 200:
            text = text[:200] + "..."
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    chain = _exception_chain(exc)
    message = one_line(chain[0])
    symbol_error = next((e for e in chain if "undefined symbol" in str(e)), None)
    if symbol_error is not None and symbol_error is not chain[0]:
        message += f" (caused by {one_line(symbol_error)})"
    return message


def cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of ``path`` (``model name``, ``flags``, ...); empty where it cannot be read."""
    info: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def native_bf16(path: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX flags in ``path``), where
    ``trainer.precision=bf16`` and ``predict --precision bf16`` run fast; None where that cannot be read."""
    flags = cpuinfo(path).get("flags")
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def _usable_cpu_cores() -> int:
    # The affinity mask is what this process may actually use (taskset, cgroups via
    # the launcher), which matters more than the machine's total for worker counts.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _fill_devices(report: DoctorReport) -> None:
    """Fills in torch's CUDA build, devices and backends; needs only torch itself."""
    import torch

    report.torch_cuda = torch.version.cuda
    report.torch_hip = getattr(torch.version, "hip", None)
    report.cuda_available = torch.cuda.is_available()
    if report.cuda_available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report.cuda_devices.append(CudaDevice(index=i, name=props.name, total_memory_bytes=props.total_memory))
    dist = torch.distributed
    if dist.is_available():
        report.gloo_available = dist.is_gloo_available()
        report.nccl_available = dist.is_nccl_available()
    report.nccl_usable = report.nccl_available and report.cuda_available
    from pipeline.distributed.env import backend_for  # torch only: the stack may be what is broken

    report.backend = backend_for(report.cuda_available, report.nccl_available, report.gloo_available)


def run_checks(
    versions: StackVersions | None = None,
    importer: Callable[[], None] | None = None,
) -> DoctorReport:
    """Runs every check and returns the report; never raises for a broken stack.

    Args:
        versions: installed versions; read from metadata when None. Tests pass
            fake ones to simulate a mismatch without touching the real install.
        importer: imports the stack and runs the operator probe; :func:`probe_stack`
            when None. Tests pass one that raises to simulate a broken build.
    """
    versions = versions if versions is not None else read_versions()
    importer = importer if importer is not None else probe_stack
    report = DoctorReport(
        python_version=platform.python_version(),
        versions=versions,
        cpu_cores=_usable_cpu_cores(),
        cpu_bf16=native_bf16(),
    )

    report.pairing, problems, warnings = check_pairing(versions)
    report.problems += problems
    report.warnings += warnings

    if versions.torch is not None:
        try:
            _fill_devices(report)
        except Exception as exc:  # torch itself is broken: nothing else can work
            report.problems.append(f"torch {versions.torch} failed to import or query its devices: {_short_error(exc)}")

    # Skip the import probe when the table already says the pairing is wrong: loading
    # a mismatched .so can take the whole process down instead of raising.
    if report.ok:
        try:
            importer()
        except Exception as exc:
            hint = ""
            if any("undefined symbol" in str(e) for e in _exception_chain(exc)):
                hint = " (fbgemm's compiled operators were built for a different torch)"
            if versions.fbgemm_variant in ("cuda", "rocm") and report.torch_cuda is None and not _torch_is_rocm(report):
                hint += f" (fbgemm is a {versions.fbgemm_variant} build but torch is a CPU build)"
            report.problems.append(
                f"fbgemm_gpu/torchrec failed to load or run an FBGEMM operator with {versions.describe()}: "
                f"{_short_error(exc)}{hint}"
            )

    if report.ok:
        _variant_warnings(report)
    if report.backend is None and versions.torch is not None and report.ok:
        report.problems.append("no torch.distributed backend is available (neither nccl with CUDA nor gloo)")
    return report


def _torch_is_rocm(report: DoctorReport) -> bool:
    """True for a ROCm torch build (torch.version.cuda is None there as well)."""
    return report.torch_hip is not None


def _variant_warnings(report: DoctorReport) -> None:
    """Warns when the fbgemm build variant does not suit the hardware."""
    variant = report.versions.fbgemm_variant
    if report.cuda_available and variant == "cpu":
        report.warnings.append(
            f"CUDA is available but {report.versions.fbgemm_distribution} {report.versions.fbgemm} is a CPU build: "
            "GPU embedding kernels are missing; install requirements/cuda.txt for GPU training"
        )
    if report.versions.fbgemm_variant == "cuda" and not report.cuda_available:
        report.warnings.append(
            f"{report.versions.fbgemm_distribution} {report.versions.fbgemm} is a CUDA build but no CUDA device "
            "is visible: training runs on CPU"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_report(report: DoctorReport) -> str:
    """Human-readable multi-line report for ``./launch.sh doctor``."""
    v = report.versions
    fbgemm = f"{v.fbgemm} ({v.fbgemm_distribution}, variant {v.fbgemm_variant or '?'})" if v.fbgemm else "not installed"
    lines = [
        "TorchRec environment doctor",
        f"  python    {report.python_version} ({sys.executable})",
        f"  torch     {v.torch or 'not installed'} (CUDA build: {report.torch_cuda or 'none'}"
        + (f", ROCm build: {report.torch_hip}" if report.torch_hip else "")
        + ")",
        f"  fbgemm    {fbgemm}",
        f"  torchrec  {v.torchrec or 'not installed'}",
        f"  pairing   {report.pairing} (fbgemm {minor(v.fbgemm)} wants torch "
        f"{FBGEMM_TORCH_COMPAT.get(minor(v.fbgemm) or '', '?')} and torchrec {minor(v.fbgemm)})",
        f"  cpu       {report.cpu_cores} usable cores"
        + {
            True: ", native bf16 (AVX-512 BF16 / AMX): trainer.precision=bf16 and predict --precision bf16 run fast",
            False: ", no native bf16 (bf16 would be emulated: keep fp32)",
            None: "",
        }[report.cpu_bf16],
    ]
    if report.cuda_devices:
        lines.append(f"  cuda      {len(report.cuda_devices)} device(s)")
        lines += [f"    [{d.index}] {d.name}, {_gib(d.total_memory_bytes)}" for d in report.cuda_devices]
    else:
        lines.append("  cuda      not available")
    lines.append(
        f"  backends  gloo={'yes' if report.gloo_available else 'no'} "
        f"nccl={'yes' if report.nccl_available else 'no'} "
        f"(usable: {'yes' if report.nccl_usable else 'no'}) -> training uses {report.backend or 'nothing'}"
    )
    lines += [f"  warning: {w}" for w in report.warnings]
    lines.append("  status    OK" if report.ok else report.error_message())
    return "\n".join(lines)


def _compact(report: DoctorReport) -> str:
    """One log line for the start of a training job."""
    gpus = ", ".join(f"{d.name} {_gib(d.total_memory_bytes)}" for d in report.cuda_devices) or "no CUDA devices"
    return (
        f"environment: python {report.python_version} | {report.versions.describe()} "
        f"(pairing {report.pairing}, torch CUDA {report.torch_cuda or 'none'}) | "
        f"{report.cpu_cores} CPU cores, {gpus} | backend {report.backend or 'none'}"
    )


def check_environment(log: Callable[[str], None] = logger.info) -> DoctorReport:
    """Checks the environment at job start and stops the job with one clear message.

    Args:
        log: where the compact report goes.

    Returns:
        The report, when there is no problem.

    Raises:
        SystemExit: with :meth:`DoctorReport.error_message` (exit status 1) on a problem.
    """
    report = run_checks()
    log(_compact(report))
    for w in report.warnings:
        logger.warning("environment: %s", w)
    if not report.ok:
        raise SystemExit(report.error_message())
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``./launch.sh doctor``: prints the report, 0 when ok."""
    import argparse

    argparse.ArgumentParser(prog="dlrm-pipeline doctor", description=main.__doc__).parse_args(argv)
    # fbgemm_gpu logs every library it loads; keep only real warnings on the console.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run_checks()
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
