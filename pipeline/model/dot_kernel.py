"""The dot interaction on the CPU as one compiled pass per sample, forward and backward (numba, no GIL).

PyTorch computes it as a copy stacking the 27 vectors of each sample into [B, 28, D], a batched GEMM of
28 x D x 28 matrices, and a gather of the pairs from the [B, 28, 28] Gram matrices: three passes over
memory and a GEMM shape the BLAS runs at a fraction of its rate. Here each sample's vectors are copied
once into a small buffer that stays in L1, the upper triangle of their Gram matrix is computed in
register blocks of 2 x 4 dot products, and the requested pairs are written straight into the output
row. The backward builds each sample's symmetric matrix of pair gradients ``S`` (27 x 27, in L1) and
computes ``dx = S x`` in blocks of 4 x 4 entries of ``S``, writing the dense and pooled gradients straight
into their tensors. With one PyTorch thread the rows run in the calling thread; with more, they are split
over numba's threads (as many as ``torch.get_num_threads()``).

Training uses it (``pipeline.model.dlrm._PairwiseDot``); no-grad forwards (evaluation, serving) keep
PyTorch's ops: inside the evaluation pass, between the MLPs' GEMMs, some kernel calls stalled and whole
passes were no faster, although alone its forward is 1.4x-1.9x faster (``benchmarks/README.md``,
"Compiled dot interaction").

The forward's sums are reordered (vectorised), so its values match PyTorch's within float rounding, not
bit for bit. ``benchmarks/interaction.py`` times both passes against the PyTorch ones.
"""

from __future__ import annotations

import math
import os
import threading

import numba
import numpy as np
import torch

from pipeline.data.compiled import compiled

ROWS_PER_TASK = 64  # rows a thread takes at a time


@compiled(fastmath=True)
def _dot_rows(dense, values, pair_i, pair_j, out, start, end):  # pragma: no cover
    """``out[b] = [dense[b], <x_i, x_j> for each pair]`` for rows ``start:end``, ``x = [dense[b]; the
    F vectors of values[b]]`` (``values[b]`` is F * D wide); ``pair_i <= pair_j`` index ``x``."""
    d = dense.shape[1]
    n = values.shape[1] // d + 1
    padded = (n + 3) // 4 * 4  # rows i + 1 and j + 3 of the last blocks exist (and stay zero)
    x = np.zeros((padded, d), np.float32)
    gram = np.empty((padded, padded), np.float32)
    for b in range(start, end):
        for t in range(d):
            v = dense[b, t]
            x[0, t] = v
            out[b, t] = v
        for r in range(1, n):
            o = (r - 1) * d
            for t in range(d):
                x[r, t] = values[b, o + t]
        for i in range(0, n, 2):  # the upper triangle (and the diagonal), 2 x 4 entries at a time
            for j in range(i // 4 * 4, n, 4):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for t in range(d):
                    u = x[i, t]
                    w = x[i + 1, t]
                    y0 = x[j, t]
                    y1 = x[j + 1, t]
                    y2 = x[j + 2, t]
                    y3 = x[j + 3, t]
                    a0 += u * y0
                    a1 += u * y1
                    a2 += u * y2
                    a3 += u * y3
                    b0 += w * y0
                    b1 += w * y1
                    b2 += w * y2
                    b3 += w * y3
                gram[i, j] = a0
                gram[i, j + 1] = a1
                gram[i, j + 2] = a2
                gram[i, j + 3] = a3
                gram[i + 1, j] = b0
                gram[i + 1, j + 1] = b1
                gram[i + 1, j + 2] = b2
                gram[i + 1, j + 3] = b3
        for k in range(pair_i.shape[0]):
            out[b, d + k] = gram[pair_i[k], pair_j[k]]


@compiled(parallel=True)
def _dot_all_rows(dense, values, pair_i, pair_j, out):  # pragma: no cover
    b = dense.shape[0]
    for task in numba.prange((b + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        start = task * ROWS_PER_TASK
        _dot_rows(dense, values, pair_i, pair_j, out, start, min(b, start + ROWS_PER_TASK))


@compiled(fastmath=True)
def _dot_grad_rows(dense, values, pair_i, pair_j, grad_out, grad_dense, grad_values, start, end):  # pragma: no cover
    """The gradients of :func:`_dot_rows`'s output ``grad_out`` for rows ``start:end``: ``grad_dense[b] =
    grad_out[b, :D] + dx_0``, ``grad_values[b] = [dx_1, ..., dx_F]`` with ``dx = S x``, ``S[i, j] = S[j, i]``
    the gradient of pair (i, j) (twice it on the diagonal: d<x, x>/dx = 2x)."""
    d = dense.shape[1]
    n = values.shape[1] // d + 1
    padded = (n + 3) // 4 * 4
    x = np.zeros((padded, d), np.float32)
    s = np.zeros((padded, padded), np.float32)
    dx = np.empty((padded, d), np.float32)
    for b in range(start, end):
        for t in range(d):
            x[0, t] = dense[b, t]
        for r in range(1, n):
            o = (r - 1) * d
            for t in range(d):
                x[r, t] = values[b, o + t]
        for i in range(n):
            for j in range(n):
                s[i, j] = 0.0
        for k in range(pair_i.shape[0]):
            g = grad_out[b, d + k]
            s[pair_i[k], pair_j[k]] += g
            s[pair_j[k], pair_i[k]] += g
        # 4 x 4 blocks of s: each pass over a row of dx adds four columns' terms (four times the arithmetic per
        # load and store of dx as one column at a time). Rows and columns past n exist and are zero in s and
        # x; rows of dx past n are never read back.
        for i in range(0, n, 4):
            for t in range(d):
                dx[i, t] = 0.0
                dx[i + 1, t] = 0.0
                dx[i + 2, t] = 0.0
                dx[i + 3, t] = 0.0
            for j in range(0, n, 4):
                s00, s01, s02, s03 = s[i, j], s[i, j + 1], s[i, j + 2], s[i, j + 3]
                s10, s11, s12, s13 = s[i + 1, j], s[i + 1, j + 1], s[i + 1, j + 2], s[i + 1, j + 3]
                s20, s21, s22, s23 = s[i + 2, j], s[i + 2, j + 1], s[i + 2, j + 2], s[i + 2, j + 3]
                s30, s31, s32, s33 = s[i + 3, j], s[i + 3, j + 1], s[i + 3, j + 2], s[i + 3, j + 3]
                for t in range(d):
                    y0, y1, y2, y3 = x[j, t], x[j + 1, t], x[j + 2, t], x[j + 3, t]
                    dx[i, t] += s00 * y0 + s01 * y1 + s02 * y2 + s03 * y3
                    dx[i + 1, t] += s10 * y0 + s11 * y1 + s12 * y2 + s13 * y3
                    dx[i + 2, t] += s20 * y0 + s21 * y1 + s22 * y2 + s23 * y3
                    dx[i + 3, t] += s30 * y0 + s31 * y1 + s32 * y2 + s33 * y3
        for t in range(d):
            grad_dense[b, t] = grad_out[b, t] + dx[0, t]
        for r in range(1, n):
            o = (r - 1) * d
            for t in range(d):
                grad_values[b, o + t] = dx[r, t]


@compiled(parallel=True)
def _dot_grad_all_rows(dense, values, pair_i, pair_j, grad_out, grad_dense, grad_values):  # pragma: no cover
    b = dense.shape[0]
    for task in numba.prange((b + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        start = task * ROWS_PER_TASK
        _dot_grad_rows(
            dense, values, pair_i, pair_j, grad_out, grad_dense, grad_values, start, min(b, start + ROWS_PER_TASK)
        )


def usable(dense: torch.Tensor, sparse: torch.Tensor) -> bool:
    """Whether :func:`dot_forward` takes these inputs: float32 on the CPU, no autocast, not traced, and either
    one thread or numba's OpenMP threading layer (:func:`_parallel`)."""
    return (
        dense.device.type == "cpu"
        and dense.dtype == torch.float32
        and sparse.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and (torch.get_num_threads() == 1 or _parallel())
    )


_PAIRS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _pairs(flat_pairs: torch.Tensor, padded: int) -> tuple[np.ndarray, np.ndarray]:
    flat = flat_pairs.cpu().numpy()
    key = (flat.tobytes(), padded)
    pairs = _PAIRS.get(key)
    if pairs is None:
        i, j = flat // padded, flat % padded
        pairs = _PAIRS[key] = (np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64))
    return pairs


_LAYER: list[str] = []  # numba's threading layer, once started
_START = threading.Lock()


def _parallel() -> bool:
    """Whether the parallel kernels run here: numba's thread pool started (once), on its OpenMP layer.

    That layer loads its own OpenMP runtime beside PyTorch's, and the two pools share the cores. Left to spin
    after each kernel (OpenMP's default), numba's idle workers hold cores PyTorch's next GEMM needs (seen
    here: single kernel calls stalling 56-80 ms, passes of 131k rows taking 2.4-3.2 s against 1.1-1.5 s).
    Started with ``OMP_WAIT_POLICY=PASSIVE`` its workers sleep between kernels; the variable is set only while
    numba's runtime loads and reads it (PyTorch's read its own when torch was imported). Where no OpenMP runtime is
    installed (``libgomp1``, e.g. a slim container) numba falls back to its workqueue layer, on which
    training ran slower than with PyTorch's ops (28.6-29.5k against 31-32k samples/s at batch 2048, 2 threads):
    PyTorch's ops are used there."""
    with _START:
        if not _LAYER:
            from numba.np.ufunc.parallel import _launch_threads

            policy = os.environ.get("OMP_WAIT_POLICY")
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            try:
                _launch_threads()
            finally:
                if policy is None:
                    del os.environ["OMP_WAIT_POLICY"]
                else:
                    os.environ["OMP_WAIT_POLICY"] = policy
            _LAYER.append(numba.threading_layer())
    return _LAYER[0] == "omp"


def _run(serial, parallel, rows: int, *arrays: np.ndarray) -> None:
    """``serial(*arrays, 0, rows)`` in this thread when PyTorch runs one thread, else ``parallel(*arrays)`` on
    numba's pool sized to PyTorch's. The OpenMP layer takes launches from several threads at once."""
    threads = torch.get_num_threads()
    if threads == 1 or not _parallel():
        serial(*arrays, 0, rows)
        return
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)  # per calling thread
    parallel(*arrays)


def _array(t: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    return t.detach().reshape(shape).contiguous().numpy()


def dot_forward(dense: torch.Tensor, sparse: torch.Tensor, flat_pairs: torch.Tensor, padded: int) -> torch.Tensor:
    """``[dense, <x_i, x_j> for each pair]`` over ``x = [dense; sparse]`` (dense [B, D], sparse [B, F, D]),
    ``flat_pairs`` = i * padded + j: what ``pipeline.model.dlrm.pairwise_dot`` computes. No autograd."""
    (b, d), width = dense.shape, math.prod(sparse.shape[1:])
    pair_i, pair_j = _pairs(flat_pairs, padded)
    out = dense.new_empty(b, d + pair_i.shape[0])
    _run(_dot_rows, _dot_all_rows, b, _array(dense, (b, d)), _array(sparse, (b, width)), pair_i, pair_j, out.numpy())
    return out


def dot_backward(
    dense: torch.Tensor, sparse: torch.Tensor, flat_pairs: torch.Tensor, padded: int, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`dot_forward`'s output with respect to ``dense`` [B, D] and ``sparse`` [B, F, D]
    (contiguous, as the sharded tables want theirs)."""
    (b, d), width = dense.shape, math.prod(sparse.shape[1:])
    pair_i, pair_j = _pairs(flat_pairs, padded)
    grad_dense = dense.new_empty(b, d)
    grad_sparse = sparse.new_empty(sparse.shape)
    _run(
        _dot_grad_rows,
        _dot_grad_all_rows,
        b,
        _array(dense, (b, d)),
        _array(sparse, (b, width)),
        pair_i,
        pair_j,
        _array(grad_out, (b, d + pair_i.shape[0])),
        grad_dense.numpy(),
        grad_sparse.view(b, width).numpy(),
    )
    return grad_dense, grad_sparse


def compile_kernels() -> None:
    """Compile the four kernels now, or load them from numba's cache (about 3 s the first time, 0.3 s after)."""
    _parallel()  # numba's pool started as training starts it
    dense, values, grad_dense = (
        np.zeros((2, 4), np.float32),
        np.zeros((2, 12), np.float32),
        np.zeros((2, 4), np.float32),
    )
    pair_i, pair_j = np.array([0, 1]), np.array([1, 1])
    out, grad_values = np.zeros((2, 6), np.float32), np.zeros((2, 12), np.float32)
    _dot_rows(dense, values, pair_i, pair_j, out, 0, 2)
    _dot_all_rows(dense, values, pair_i, pair_j, out)
    _dot_grad_rows(dense, values, pair_i, pair_j, out, grad_dense, grad_values, 0, 2)
    _dot_grad_all_rows(dense, values, pair_i, pair_j, out, grad_dense, grad_values)
