"""Compiling the data path's hot loops with numba."""

from __future__ import annotations

from collections.abc import Callable

import numba


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by numba without the GIL, its machine code cached in ``__pycache__`` (or the
    user's cache folder) so only the first run after an install compiles (about 0.6 s; loading the
    cache costs about 0.15 s); compiled in every process where no cache folder is writable."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(fn)
