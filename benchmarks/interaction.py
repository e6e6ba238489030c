"""The dot interaction alone: ours (the compiled kernels), ours with PyTorch's ops, TorchRec's InteractionArch.

In one run, for each batch size, alternating the contenders and evicting the caches before each pass
(a 96 MiB sweep, as the MLPs do between a training step's forward and backward):

    kernel     pipeline.model.dlrm.DotInteraction as float32 training runs it on the CPU: the compiled
               kernels of pipeline/model/dot_kernel.py (inference: its forward kernel called directly;
               the model's no-grad forwards use PyTorch's ops, see that module)
    sliced     the same module with PyTorch's ops (what it runs for bf16 or on a GPU): stacking, batched
               GEMM and pair gather, CPU_CHUNK_ROWS rows at a time, and the one-GEMM backward
    torchrec   TorchRec's InteractionArch (autograd backward), fed the 26 pooled embeddings as the
               [B, 26, D] tensor its SparseArch would build

Training: forward + backward (the pooled embeddings' gradient made contiguous, as the tables need it);
inference: a no-grad forward. Prints the median and best milliseconds of --repeats passes and the
ratios sliced / kernel and torchrec / kernel (above 1 = the kernel is faster). The 27 vectors of
dimension 128 of ``model=dlrm_criteo`` (351 pairs, no self-interaction, as InteractionArch).

    .venv/bin/python benchmarks/interaction.py
    .venv/bin/python benchmarks/interaction.py --batch-sizes 2048 --threads 1 --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402
from pipeline.distributed.env import keep_freed_memory  # noqa: E402
from pipeline.model import dlrm, dot_kernel  # noqa: E402


@contextlib.contextmanager
def kernel_off(off: bool):
    """PyTorch's ops instead of the compiled kernels while ``off``."""
    usable = dot_kernel.usable
    if off:
        dot_kernel.usable = lambda *_: False
    try:
        yield
    finally:
        dot_kernel.usable = usable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="512,2048,8192")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    from torchrec.models.dlrm import InteractionArch

    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as training does: large buffers reused, not page-faulted again each pass
    torch.manual_seed(0)
    f, d = 26, 128
    ours, theirs = dlrm.DotInteraction(f, self_interaction=False), InteractionArch(f)
    sweep = torch.zeros(96 * 2**20 // 4)

    def evict() -> None:
        sweep.add_(1.0)

    print(
        f"dot interaction, {f} pooled vectors + 1 dense, D={d}, {a.threads} threads, slices of {dlrm.CPU_CHUNK_ROWS} "
        "rows; "
        f"ms per pass (median / best of {a.repeats})"
    )
    print(
        f"{'batch':>6s} {'pass':>9s} {'kernel':>13s} {'sliced':>13s} {'torchrec':>13s} {'sliced/kernel':>13s} "
        f"{'torchrec/kernel':>15s}"
    )
    for b in (int(x) for x in a.batch_sizes.split(",")):
        dense = torch.randn(b, d, requires_grad=True)
        pooled = torch.randn(b, f * d, requires_grad=True)  # the collection's output, [B, F*D]
        upstream = torch.randn(b, d + f * (f + 1) // 2)

        def run(who: str, train: bool, b=b, dense=dense, pooled=pooled, upstream=upstream) -> float:
            kernel = who == "kernel"
            module = theirs if who == "torchrec" else ours
            dense.grad = pooled.grad = None
            evict()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(train), kernel_off(not kernel):
                if kernel and not train:
                    out = dot_kernel.dot_forward(dense, pooled.view(b, f, d), ours.flat_pairs, ours.padded)
                else:
                    out = module(dense, pooled.view(b, f, d))
            if not train:
                return time.perf_counter() - t0
            t1 = time.perf_counter()
            evict()  # the top MLP runs between the interaction's forward and its backward
            t2 = time.perf_counter()
            with kernel_off(not kernel):
                out.backward(upstream)
            pooled.grad.contiguous()
            return (t1 - t0) + (time.perf_counter() - t2)

        for train in (True, False):
            times: dict[str, list[float]] = {"kernel": [], "sliced": [], "torchrec": []}
            for who in times:
                run(who, train)  # warm-up
            for _ in range(a.repeats):
                for who in times:
                    times[who].append(run(who, train) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = " ".join(f"{med[k]:6.1f} / {min(v):5.1f}" for k, v in times.items())
            print(
                f"{b:>6d} {'training' if train else 'inference':>9s} {cells} {med['sliced'] / med['kernel']:>12.2f}x "
                f"{med['torchrec'] / med['kernel']:>14.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
