"""Exact evaluation metrics at scale: gathering every prediction to every rank against the distributed sort-and-count.

2 gloo ranks (spawned processes, fresh for each measurement) hold N random predictions between them, in
batches of 65,536 as the evaluation loop leaves them (probability, label, weight: 12 bytes a row). Labels are
drawn from a known click model (a true logit; the prediction is that logit plus noise), so the AUC is
meaningful. For each N the two methods run alternated, ``--repeats`` times:

- ``gather``: the evaluator as it was, every rank all-gathers every rank's rows and computes
  ``binary_metrics`` (torchmetrics' exact AUROC) on all of them;
- ``distributed``: ``PredictionAccumulator.compute`` (``pipeline/metrics/evaluator.py``): sums all-reduced,
  the exact AUC by a range-partitioned all-to-all of distinct scores.

Per run it prints the seconds of the computation (the slower rank's), each rank's peak RSS during it
(VmHWM reset after the inputs were made) and the increase over the RSS before it, and the AUC; then the
AUC difference of the methods. Before running ``gather`` it estimates that run's memory (from the last
``gather`` measured, else 140 bytes per row of N on each rank) and skips it, saying why, when the two ranks
would need more than ``--max-gib`` or 80% of the memory available.

    .venv/bin/python benchmarks/eval_at_scale.py --rows 10000000,50000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import describe  # noqa: E402
from pipeline.metrics.evaluator import PredictionAccumulator  # noqa: E402
from pipeline.metrics.functional import BinaryMetrics, binary_metrics  # noqa: E402

NUM_RANKS = 2
BATCH = 65_536  # rows per rank per evaluation batch
GATHER_BYTES_PER_ROW = 140  # per rank per global row, when nothing was measured yet (115 measured at 10M)
GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


def _batches(num_rows: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's batches of (logit, label, weight); the last batch is padded with weight-0 rows."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, num_rows, BATCH):
        true_logit = -1.2 + 1.3 * torch.randn(BATCH, generator=g)
        label = (torch.rand(BATCH, generator=g) < torch.sigmoid(true_logit)).float()
        weight = (torch.arange(BATCH) < num_rows - start).float()
        yield true_logit + 0.6 * torch.randn(BATCH, generator=g), label, weight


def _gather_everything(num_rows: int, seed: int) -> Callable[[], BinaryMetrics]:
    """The evaluator before the distributed metrics: every rank's rows all-gathered to every rank, then scored."""
    probs, labels, weights = [], [], []
    for logit, label, weight in _batches(num_rows, seed):
        probs.append(torch.sigmoid(logit))
        labels.append(label)
        weights.append(weight)

    def compute() -> BinaryMetrics:
        local = torch.stack([torch.cat(probs), torch.cat(labels), torch.cat(weights)])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        local = torch.cat(parts, dim=1)
        keep = local[2] > 0
        return binary_metrics(local[0][keep], local[1][keep])

    return compute


def _distributed(num_rows: int, seed: int) -> Callable[[], BinaryMetrics]:
    """The evaluator now: this rank's rows stay here; the exact metrics by sums and a distributed sort-and-count."""
    acc = PredictionAccumulator()
    for logit, label, weight in _batches(num_rows, seed):
        acc.update(logit, label, weight)
    return acc.compute


METHODS = {"gather": _gather_everything, "distributed": _distributed}


def _rank(rank: int, method: str, num_rows: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on the machine's cores, as torchrun would run them
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=NUM_RANKS)
    local_rows = num_rows // NUM_RANKS + (rank < num_rows % NUM_RANKS)
    compute = METHODS[method](local_rows, rank)
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()  # without a reset, VmHWM is the whole process's peak
    dist.barrier()
    t0 = time.perf_counter()
    metrics = compute()
    seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "rss_before_mib": rss_before / 1024,
        "peak_mib": _status_kib("VmHWM") / 1024,
        "reset": reset,
        "auc": metrics.auc,
        "num_samples": metrics.num_samples,
    }
    (Path(out_dir) / f"{method}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(method: str, num_rows: int, work: Path) -> list[dict]:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    mp.spawn(_rank, args=(method, num_rows, str(run_dir / "init"), str(run_dir)), nprocs=NUM_RANKS, join=True)
    return [json.loads((run_dir / f"{method}_{r}.json").read_text()) for r in range(NUM_RANKS)]


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000000,50000000", help="comma-separated numbers of rows (all ranks)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-gib", type=float, default=24.0, help="memory the two ranks may use together")
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{NUM_RANKS} gloo ranks, 1 thread each; memory available {_available_gib():.1f} GiB; load {load}", flush=True
    )
    print("method       rows         seconds  peak RSS per rank (MiB)  increase (MiB)        AUC", flush=True)
    gather_bytes_per_row = float(GATHER_BYTES_PER_ROW)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    for num_rows in (int(r) for r in args.rows.split(",")):
        aucs: dict[str, float] = {}
        for repeat in range(args.repeats):
            for method in list(METHODS)[:: 1 if repeat % 2 == 0 else -1]:
                if method == "gather":
                    need = gather_bytes_per_row * num_rows * NUM_RANKS / GIB + 12 * num_rows / GIB
                    limit = min(args.max_gib, 0.8 * _available_gib())
                    if need > limit:
                        print(
                            f"gather       {num_rows:<12,} skipped: it would need about {need:.1f} GiB for "
                            f"{NUM_RANKS} ranks ({gather_bytes_per_row:.0f} bytes a row per rank), "
                            f"above {limit:.1f} GiB",
                            flush=True,
                        )
                        continue
                ranks = _run(method, num_rows, work)
                increase = [r["peak_mib"] - r["rss_before_mib"] for r in ranks]
                if method == "gather":
                    gather_bytes_per_row = max(increase) * 2**20 / num_rows
                aucs[method] = ranks[0]["auc"]
                assert all(r["auc"] == ranks[0]["auc"] or r["auc"] != r["auc"] for r in ranks), "ranks disagree"
                assert ranks[0]["num_samples"] == num_rows
                note = "" if all(r["reset"] for r in ranks) else "  (peak of the whole process: VmHWM not resettable)"
                peaks = " / ".join(f"{r['peak_mib']:,.0f}" for r in ranks)
                increases = " / ".join(f"{x:,.0f}" for x in increase)
                seconds = max(r["seconds"] for r in ranks)
                print(
                    f"{method:<12} {num_rows:<12,} {seconds:7.2f}  {peaks:<23}  {increases:<20}  "
                    f"{ranks[0]['auc']:.9f}{note}",
                    flush=True,
                )
        if len(aucs) == 2:
            diff = aucs["distributed"] - aucs["gather"]
            print(f"{num_rows:,} rows: AUC difference distributed - gather = {diff:.3e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
