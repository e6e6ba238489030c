"""trainer.keep_freed_memory: glibc keeps freed blocks for reuse (no page faults on the next step's allocations)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


_FAULTS = """
import resource, sys, torch
from pipeline.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(3):  # 64 MiB blocks: above glibc's largest mmap threshold
    x = torch.ones(16 * 2**20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    """trainer.keep_freed_memory: a large block freed and allocated again is not page-faulted again
    (glibc's default unmaps it: 64 MiB is 16k fresh 4 KiB pages)."""
    out = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2])
        applied, faults = proc.stdout.split()
        out[mode] = (applied, int(faults))
    assert out["keep"][0] == "True"
    assert out["keep"][1] < 1000, out
    assert out["default"][1] > 10_000, out
