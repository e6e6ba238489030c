"""trainer.keep_freed_memory: glibc keeps freed blocks for reuse (no page faults on the next step's allocations)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import reallocation_faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    """trainer.keep_freed_memory: a large block freed and allocated again is not page-faulted again
    (glibc's default unmaps it: 64 MiB is 16k fresh 4 KiB pages); the last three of sixteen are checked."""
    setup = "from pipeline.distributed.env import keep_freed_memory\nassert keep_freed_memory()"
    keep = reallocation_faults(setup)
    default = reallocation_faults("")
    assert max(keep[-3:]) < 1000, keep
    assert min(default[-3:]) > 10_000, default
