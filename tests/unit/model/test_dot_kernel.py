"""The compiled CPU dot interaction against a float64 computation of the Gram matrix, and where it runs."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import dlrm, dot_kernel
from pipeline.model.dlrm import DotInteraction


def reference(dense: torch.Tensor, sparse: torch.Tensor, self_interaction: bool) -> torch.Tensor:
    """``[dense, <x_i, x_j> for i < j (or i <= j)]`` by autograd of bmm, in float64."""
    x = torch.cat([dense.unsqueeze(1), sparse], dim=1)
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, offset=0 if self_interaction else 1)
    return torch.cat([dense, torch.bmm(x, x.transpose(1, 2))[:, i, j]], dim=1)


def ran_kernel(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each run of the compiled forward ("forward") and backward ("backward")."""
    calls: list[str] = []
    run = dot_kernel._run

    def recorded(serial, *args):
        calls.append("backward" if serial is dot_kernel._dot_grad_rows else "forward")
        run(serial, *args)

    monkeypatch.setattr(dot_kernel, "_run", recorded)
    monkeypatch.setattr(dot_kernel, "_parallel", lambda: True)  # whatever numba's threading layer here
    return calls


# 27 vectors of 128 (Criteo), odd and even vector counts around the 4-row blocks, a width that is no multiple
# of the vector registers, batches that are and are not multiples of a thread's share of rows.
@pytest.mark.parametrize(("b", "f", "d"), [(200, 26, 128), (7, 4, 6), (65, 7, 33), (1, 1, 8)])
@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("threads", [1, 2])  # the serial kernel in this thread; the parallel one on numba's pool
def test_kernel_matches_the_gram_matrix_forward_and_backward(
    b: int, f: int, d: int, self_interaction: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ran_kernel(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_kernel(b, f, d, self_interaction, calls)
    finally:
        torch.set_num_threads(before)


def check_kernel(b: int, f: int, d: int, self_interaction: bool, calls: list[str]) -> None:
    g = torch.Generator().manual_seed(b * 100 + f)
    dense, sparse = torch.randn(b, d, generator=g), torch.randn(b, f, d, generator=g)
    inter = DotInteraction(f, self_interaction)
    upstream = torch.randn(b, d + inter.num_interactions, generator=g)

    x, s = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
    out = inter(x, s)
    out.backward(upstream)
    assert calls == ["forward", "backward"]

    x64, s64 = dense.double().requires_grad_(), sparse.double().requires_grad_()
    want = reference(x64, s64, self_interaction)
    want.backward(upstream.double())
    tol = {"rtol": 1e-5, "atol": 1e-4 * d}
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(s.grad.double(), s64.grad, **tol)
    assert s.grad.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(inter(dense, sparse), out.detach(), **tol)
    assert len(calls) == 2, "no-grad forwards (evaluation, serving) run PyTorch's ops"


def test_kernel_reads_pooled_embeddings_in_the_shards_order() -> None:
    """With the pair indices remapped to another order of the pooled vectors (a sharded collection's), the
    kernel gives the outputs and gradients of the vectors in feature order."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    names, d, b = [f"f{k}" for k in range(6)], 16, 70
    shard_order = ["f1", "f3", "f5", "f0", "f2", "f4"]
    inter = DotInteraction(len(names), self_interaction=True)
    values = torch.randn(b, len(names) * d, requires_grad=True)
    dense = torch.randn(b, d, requires_grad=True)
    kt = KeyedTensor(keys=shard_order, length_per_key=[d] * len(names), values=values)
    pooled, flat = dlrm.pooled_for_dot(kt, names, d, inter.flat_pairs, inter.pair_i, inter.pair_j, inter.padded)
    out = inter(dense, pooled, flat)
    grads = torch.autograd.grad(out.pow(2).sum(), (values, dense))
    expected = inter(dense, dlrm.pooled_values(kt, names, d))
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (values, dense))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_other_precisions_and_an_empty_batch_take_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ran_kernel(monkeypatch)
    inter = DotInteraction(5, self_interaction=False)
    dense, sparse = torch.randn(8, 12), torch.randn(8, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = inter(dense.bfloat16(), sparse.bfloat16())
    inter(dense.double(), sparse.double())
    assert calls == [], "bf16 and float64 run PyTorch's ops"
    x, s = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
    torch.testing.assert_close(bf16.float(), inter(x, s), rtol=2e-2, atol=0.3)
    assert calls == ["forward"]
    empty = inter(x[:0], s[:0])
    empty.sum().backward()
    assert empty.shape == (0, 12 + 15) and calls[-1] == "backward"


TRAIN_FROM_THREADS = """
import threading, torch
from pipeline.model.dlrm import DotInteraction
inter = DotInteraction(26, self_interaction=False)
inputs = [(torch.randn(300, 32, requires_grad=True), torch.randn(300, 26, 32, requires_grad=True)) for _ in range(4)]

def passes(x, s):
    out = inter(x, s)
    return (out.detach(), *torch.autograd.grad(out.square().sum(), (x, s)))

expected = [passes(*x) for x in inputs]
results = [[] for _ in inputs]
threads = [
    threading.Thread(target=lambda k=k: results[k].extend(passes(*inputs[k]) for _ in range(20)))
    for k in range(len(inputs))
]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert all(len(r) == 20 for r in results)
assert all(torch.equal(a, b) for rs, e in zip(results, expected) for r in rs for a, b in zip(r, e))
print("ok")
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_the_parallel_kernels_run_on_numbas_openmp_layer_only(layer: str) -> None:
    """On numba's workqueue layer (no OpenMP runtime installed) training ran slower than with PyTorch's ops:
    there the kernels run only with one thread (the serial kernel)."""
    script = (
        "import numba, torch\n"
        "from pipeline.model import dot_kernel\n"
        "x, s = torch.randn(8, 16), torch.randn(8, 5, 16)\n"
        "torch.set_num_threads(2)\n"
        "two = dot_kernel.usable(x, s)\n"
        "torch.set_num_threads(1)\n"
        "print(numba.threading_layer(), two, dot_kernel.usable(x, s))\n"
    )
    layer_seen, two, one = run_python(script, layer).split()
    if layer == "workqueue":
        assert layer_seen == "workqueue"
    assert two == str(layer_seen == "omp") and one == "True"


def run_python(script: str, layer: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, **({"NUMBA_THREADING_LAYER": layer} if layer != "default" else {})}
    root = Path(__file__).resolve().parents[3]
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_threads_running_the_kernels_at_once_get_their_own_results() -> None:
    """Several threads training at once get their own results: the kernels keep no state between calls."""
    assert run_python(TRAIN_FROM_THREADS, "default") == "ok"


def test_compile_kernels_compiles_what_training_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Docker image runs at build time: the argument types training passes, serial and parallel, so a
    container's first training step compiles nothing (each kernel holds one compiled signature)."""
    dot_kernel.compile_kernels()
    monkeypatch.setattr(dot_kernel, "_parallel", lambda: True)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x, s = torch.randn(5, 8, requires_grad=True), torch.randn(5, 3, 8, requires_grad=True)
            DotInteraction(3, self_interaction=False)(x, s).sum().backward()
    finally:
        torch.set_num_threads(before)
    kernels = ("_dot_rows", "_dot_all_rows", "_dot_grad_rows", "_dot_grad_all_rows")
    assert {k: len(getattr(dot_kernel, k).signatures) for k in kernels} == dict.fromkeys(kernels, 1)
