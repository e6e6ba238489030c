"""The machine a benchmark ran on, printed first by every benchmark: CPU model, the ISA extensions that
change the kernels (AVX2, AVX-512, AVX-512 BF16, AMX), core count and a measured fp32 GEMM rate, so
figures from different days (and CPU kinds) are read side by side with what they ran on."""

from __future__ import annotations

import os
import platform
import time

from pipeline.tools.doctor import cpuinfo

ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}


_cpuinfo = cpuinfo  # the first processor's fields of /proc/cpuinfo (a seam for tests)


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def isa() -> list[str]:
    """The kernel-relevant extensions this CPU has, in ISA_FLAGS order."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [name for flag, name in ISA_FLAGS.items() if flag in flags]


def gemm_rate(device: str = "cpu") -> float:
    """fp32 GEMM FLOP/s with all cores, or on the GPU for ``device="cuda"`` (best of a few 2048x512x512
    products; 16384 rows on a GPU)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = 16384 if device == "cuda" else 2048
    a, b = torch.randn(rows, 512, device=device), torch.randn(512, 512, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(20):
        sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 10 * 2 * rows * 512 * 512 / (time.perf_counter() - t))
    return best


def gpu_model() -> str:
    """The GPU's name and memory, or '' without one."""
    import torch

    if not torch.cuda.is_available():
        return ""
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s)"


def describe(rate: float | None = None) -> str:
    """One line: date, CPU, ISA, cores, GEMM rate (measured unless given)."""
    rate = gemm_rate() if rate is None else rate
    return (
        f"{time.strftime('%Y-%m-%d')} | {cpu_model()} | {', '.join(isa()) or 'no AVX2'} | "
        f"{os.cpu_count()} cores | fp32 GEMM {rate / 1e9:.0f} GFLOP/s"
    )
