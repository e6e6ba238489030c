"""The machine line every benchmark prints first: CPU model, kernel-relevant ISA, cores, GEMM rate."""

from __future__ import annotations

import os

from benchmarks import _machine


def test_the_isa_named_is_what_cpuinfo_lists(monkeypatch) -> None:
    flags = "fpu avx avx2 avx512f avx512bw amx_bf16 amx_tile"
    monkeypatch.setattr(_machine, "_cpuinfo", lambda: {"model name": "AMD EPYC 9B14", "flags": flags})
    assert _machine.isa() == ["AVX2", "AVX-512", "AMX"]
    line = _machine.describe(rate=190e9)
    assert line.endswith(f"| AMD EPYC 9B14 | AVX2, AVX-512, AMX | {os.cpu_count()} cores | fp32 GEMM 190 GFLOP/s")
    monkeypatch.setattr(_machine, "_cpuinfo", lambda: {"model name": "old", "flags": "fpu sse2"})
    assert "| old | no AVX2 |" in _machine.describe(rate=1e9)


def test_gemm_rate_is_measured() -> None:
    assert _machine.gemm_rate() > 1e9  # any CPU this runs on does more than 1 GFLOP/s
