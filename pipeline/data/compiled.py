"""Compiling hot loops with numba (the data path's parsers, the CPU dot interaction)."""

from __future__ import annotations

from collections.abc import Callable

import numba


def compiled(fn: Callable | None = None, *, parallel: bool = False, fastmath: bool = False) -> Callable:
    """``fn`` compiled by numba without the GIL, its machine code cached in ``__pycache__`` (or the
    user's cache folder) so only the first run after an install compiles (about 0.6 s; loading the
    cache costs about 0.15 s); compiled in every process where no cache folder is writable.

    ``parallel``: ``numba.prange`` loops run on numba's threads; ``fastmath``: float sums may be
    reordered (vectorised reductions). Use as ``@compiled`` or ``@compiled(parallel=True)``."""
    if fn is None:
        return lambda f: compiled(f, parallel=parallel, fastmath=fastmath)
    opts = dict(nogil=True, boundscheck=False, parallel=parallel, fastmath=fastmath)
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(**opts)(fn)
