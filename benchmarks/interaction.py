"""The dot interaction alone: ours in slices of rows, ours over the whole batch, TorchRec's InteractionArch.

In one run, for each batch size, alternating the contenders and evicting the caches before each pass
(a 96 MiB sweep, as the MLPs do between a training step's forward and backward):

    sliced     pipeline.model.dlrm.DotInteraction as training runs it (CPU_CHUNK_ROWS rows at a time)
    whole      the same module over the whole batch at once (CPU_CHUNK_ROWS set to the batch size)
    torchrec   TorchRec's InteractionArch (autograd backward), fed the 26 pooled embeddings as the
               [B, 26, D] tensor its SparseArch would build

Training: forward + backward (the pooled embeddings' gradient made contiguous, as the tables need it);
inference: a no-grad forward. Prints the median and best milliseconds of --repeats passes and the
ratios whole / sliced and torchrec / sliced (above 1 = the sliced one is faster). The 27 vectors of
dimension 128 of ``model=dlrm_criteo`` (351 pairs, no self-interaction, as InteractionArch).

    .venv/bin/python benchmarks/interaction.py
    .venv/bin/python benchmarks/interaction.py --batch-sizes 2048 --threads 1 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402
from pipeline.model import dlrm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="512,2048,8192")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    from torchrec.models.dlrm import InteractionArch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    f, d = 26, 128
    sliced_rows = dlrm.CPU_CHUNK_ROWS
    ours, theirs = dlrm.DotInteraction(f, self_interaction=False), InteractionArch(f)
    sweep = torch.zeros(96 * 2**20 // 4)

    def evict() -> None:
        sweep.add_(1.0)

    print(
        f"dot interaction, {f} pooled vectors + 1 dense, D={d}, {a.threads} threads, slices of {sliced_rows} rows; "
        f"ms per pass (median / best of {a.repeats})"
    )
    print(
        f"{'batch':>6s} {'pass':>9s} {'sliced':>13s} {'whole':>13s} {'torchrec':>13s} {'whole/sliced':>12s} "
        f"{'torchrec/sliced':>15s}"
    )
    for b in (int(x) for x in a.batch_sizes.split(",")):
        dense = torch.randn(b, d, requires_grad=True)
        pooled = torch.randn(b, f * d, requires_grad=True)  # the collection's output, [B, F*D]
        upstream = torch.randn(b, d + f * (f + 1) // 2)

        def run(who: str, train: bool, b=b, dense=dense, pooled=pooled, upstream=upstream) -> float:
            dlrm.CPU_CHUNK_ROWS = b if who == "whole" else sliced_rows
            module = theirs if who == "torchrec" else ours
            dense.grad = pooled.grad = None
            evict()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(train):
                out = module(dense, pooled.view(b, f, d))
            if not train:
                return time.perf_counter() - t0
            t1 = time.perf_counter()
            evict()  # the top MLP runs between the interaction's forward and its backward
            t2 = time.perf_counter()
            out.backward(upstream)
            pooled.grad.contiguous()
            return (t1 - t0) + (time.perf_counter() - t2)

        for train in (True, False):
            times: dict[str, list[float]] = {"sliced": [], "whole": [], "torchrec": []}
            for who in times:
                run(who, train)  # warm-up
            for _ in range(a.repeats):
                for who in times:
                    times[who].append(run(who, train) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = " ".join(f"{med[k]:6.1f} / {min(v):5.1f}" for k, v in times.items())
            print(
                f"{b:>6d} {'training' if train else 'inference':>9s} {cells} {med['whole'] / med['sliced']:>11.2f}x "
                f"{med['torchrec'] / med['sliced']:>14.2f}x",
                flush=True,
            )
    dlrm.CPU_CHUNK_ROWS = sliced_rows


if __name__ == "__main__":
    main()
