"""The two baselines of benchmarks/train_throughput.py, each run in its own process(es).

    torchrec : the minimal idiomatic TorchRec loop: TorchRec's DLRM + DLRMTrain, DMP with the default
               planner, fused SGD in backward, dense SGD, TrainPipelineSparseDist over ready batches
    plain    : a plain-PyTorch DLRM in the style of facebookresearch/dlrm dlrm_s_pytorch.py:
               nn.EmbeddingBag(sparse=True) per table, torch.optim.SGD, one process

Both train on random batches of the same shapes as the pipeline's (ids uniform over the tables) and
print one JSON line: per-step samples/s after warm-up, inference samples/s, peak RSS.

``--bag-sizes 3,2,...`` (one per table) makes the batches multi-hot: each row's bag of table j holds that
many ids (``--bag-lengths variable``: uniform in 1..that many), as the KJT (torchrec) or EmbeddingBag
offsets (plain) carry them; ``--interaction dcn`` makes torchrec's model TorchRec's ``DLRM_DCN`` (DCNv2
low-rank cross layers, ``--dcn-layers``, ``--dcn-rank``) instead of ``DLRM``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

DENSE_IN = 13
NUM_TABLES = 26


def random_batches(n: int, batch: int, rows: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch, DENSE_IN, generator=g),
            torch.randint(0, rows, (NUM_TABLES, batch), generator=g),
            torch.randint(0, 2, (batch,), generator=g).float(),
        )
        for _ in range(n)
    ]


def random_bag_batches(
    n: int, batch: int, rows: int, seed: int, sizes: list[int], variable: bool
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Multi-hot batches: (dense [b, 13], lengths int32 [tables, b], ids int64 feature-major [lengths.sum()],
    labels [b]); table j's bags hold ``sizes[j]`` ids each (``variable``: uniform in 1..sizes[j])."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor(sizes, dtype=torch.int64).unsqueeze(1).expand(len(sizes), batch)
    out = []
    for _ in range(n):
        dense = torch.rand(batch, DENSE_IN, generator=g)
        lengths = (1 + (torch.rand(top.shape, generator=g) * top).long()) if variable else top
        lengths = lengths.to(torch.int32).contiguous()
        ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
        out.append((dense, lengths, ids, torch.randint(0, 2, (batch,), generator=g).float()))
    return out


def summarize(step_s: list[float], batch: int, warmup: int) -> dict:
    rates = [batch / s for s in step_s[warmup:]]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "steps": len(rates)}


def profile(a, step, name: str) -> None:
    """torch.profiler over ``a.profile_steps`` steps: the top ops by self CPU time to ``a.profile/<name>.txt``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    a.profile.mkdir(parents=True, exist_ok=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(a.profile_steps):
            step(i)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    (a.profile / f"{name}.txt").write_text(f"{a.profile_steps} steps, batch {a.batch}\n{table}\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- plain PyTorch ---------------------------------------------------------------------------------
class PlainDLRM(nn.Module):
    """dlrm_s_pytorch.py's structure: EmbeddingBag list, MLPs with ReLU, dot interaction (lower triangle)."""

    def __init__(self, rows: int, dim: int, bottom: list[int], top: list[int]) -> None:
        super().__init__()
        self.emb = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for _ in range(NUM_TABLES))
        for e in self.emb:
            nn.init.uniform_(e.weight, -((1 / rows) ** 0.5), (1 / rows) ** 0.5)
        self.bot = self._mlp([DENSE_IN, *bottom], sigmoid_last=False)
        n = NUM_TABLES + 1
        self.li, self.lj = torch.tril_indices(n, n, offset=-1)
        self.top = self._mlp([dim + n * (n - 1) // 2, *top], sigmoid_last=False)

    @staticmethod
    def _mlp(sizes: list[int], sigmoid_last: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``ids``: [tables, b] (one id per table), or per table (ids, offsets) of its bags."""
        x = self.bot(dense)
        if isinstance(ids, torch.Tensor):
            offsets = torch.arange(ids.shape[1])
            ly = [e(ids[k], offsets) for k, e in enumerate(self.emb)]
        else:
            ly = [e(i, o) for (i, o), e in zip(ids, self.emb, strict=True)]
        t = torch.cat([x, *ly], dim=1).view(x.shape[0], -1, x.shape[1])
        z = torch.bmm(t, t.transpose(1, 2))
        return self.top(torch.cat([x, z[:, self.li, self.lj]], dim=1)).squeeze(1)


def run_plain(a) -> dict:
    torch.manual_seed(0)
    model = PlainDLRM(a.rows, a.dim, a.bottom, a.top)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    if a.bag_sizes:
        batches = []
        for dense, lengths, ids, labels in random_bag_batches(
            a.warmup + a.steps, a.batch, a.rows, 0, a.bag_sizes, a.bag_lengths == "variable"
        ):
            per_table = torch.split(ids, lengths.sum(dim=1).tolist())
            starts = [torch.cumsum(ln, 0, dtype=torch.int64) - ln for ln in lengths]
            batches.append((dense, list(zip(per_table, starts, strict=True)), labels))
    else:
        batches = random_batches(a.warmup + a.steps, a.batch, a.rows, 0)
    times = []

    def step(dense, ids, labels) -> None:
        opt.zero_grad()
        loss = loss_fn(model(dense, ids), labels)
        loss.backward()
        opt.step()

    for dense, ids, labels in batches:
        t = time.perf_counter()
        step(dense, ids, labels)
        times.append(time.perf_counter() - t)
    if a.profile:
        profile(a, lambda i: step(*batches[i % len(batches)]), "plain")
    model.eval()
    inf = []
    with torch.no_grad():
        for dense, ids, _ in batches[: a.warmup + a.infer_steps]:
            t = time.perf_counter()
            torch.sigmoid(model(dense, ids))
            inf.append(time.perf_counter() - t)
    return {
        "train": summarize(times, a.batch, a.warmup),
        "infer": summarize(inf, a.batch, a.warmup),
        "peak_rss_mib": peak_rss_mib(),
        "world_size": 1,
    }


# -- minimal TorchRec ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU step's time is the kernels', not their launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_torchrec(a) -> dict:
    import torch.distributed as dist
    from torchrec import optim as trec_optim
    from torchrec.datasets.utils import Batch
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    device = torch.device(a.device)
    if device.type == "cuda":  # one GPU per rank, nccl between them
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    names = [f"cat_{i}" for i in range(NUM_TABLES)]
    tables = [
        EmbeddingBagConfig(name=f"t_{n}", embedding_dim=a.dim, num_embeddings=a.rows, feature_names=[n]) for n in names
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    if a.interaction == "dcn":
        model = DLRMTrain(DLRM_DCN(ebc, DENSE_IN, a.bottom, a.top, a.dcn_layers, a.dcn_rank))
    else:
        model = DLRMTrain(DLRM(ebc, DENSE_IN, a.bottom, a.top))
    apply_optimizer_in_backward(trec_optim.SGD, model.model.sparse_arch.parameters(), {"lr": 0.01})
    dmp = DistributedModelParallel(model, device=device)
    dense_opt = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=0.01)
    )
    opt = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
    local = a.batch // world

    def to_batch(dense, ids, labels) -> Batch:
        kjt = KeyedJaggedTensor(
            keys=names, values=ids.reshape(-1), lengths=torch.ones(NUM_TABLES * local, dtype=torch.int32), stride=local
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def to_bag_batch(dense, lengths, ids, labels) -> Batch:
        kjt = KeyedJaggedTensor(keys=names, values=ids, lengths=lengths.reshape(-1), stride=local)
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def make(n: int, seed: int) -> list[Batch]:
        if a.bag_sizes:
            bags = random_bag_batches(n, local, a.rows, seed, a.bag_sizes, a.bag_lengths == "variable")
            return [to_bag_batch(*b) for b in bags]
        return [to_batch(*b) for b in random_batches(n, local, a.rows, seed)]

    batches = make(a.warmup + a.steps + 2, rank)
    pipeline = TrainPipelineSparseDist(dmp, opt, device, execute_all_batches=True)  # copies each batch to device
    it = iter(batches)
    times = []
    for _ in range(a.warmup + a.steps):
        t = time.perf_counter()
        pipeline.progress(it)
        _sync(device)
        times.append(time.perf_counter() - t)
    if a.profile:
        more = iter(make(a.profile_steps + 2, rank + 1))
        profile(a, lambda i: pipeline.progress(more), f"torchrec_rank{rank}")
    pipeline.detach()
    dmp.eval()
    inf = []
    with torch.no_grad():
        for b in batches[: a.warmup + a.infer_steps]:
            b = b.to(device)  # ready on the device, as the forward's input
            _sync(device)
            t = time.perf_counter()
            dmp(b)
            _sync(device)
            inf.append(time.perf_counter() - t)
    out = {
        "train": summarize(times, a.batch, a.warmup),
        "infer": summarize(inf, a.batch, a.warmup),
        "peak_rss_mib": peak_rss_mib(),
        "world_size": world,
        **({"peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}),
    }
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()
    if rank != 0:
        return {}
    # Ranks step together: the job's rate is the slowest rank's; memory is the largest rank's.
    slow = min(gathered, key=lambda g: g["train"]["median"])
    return {**slow, "peak_rss_mib": max(g["peak_rss_mib"] for g in gathered)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("contender", choices=["plain", "torchrec"])
    p.add_argument("--batch", type=int, required=True, help="global batch size")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--bottom", type=lambda s: [int(x) for x in s.split(",")], default=[512, 256, 128])
    p.add_argument("--top", type=lambda s: [int(x) for x in s.split(",")], default=[512, 256, 1])
    p.add_argument(
        "--bag-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="ids per bag, one per table (multi-hot); default one id per table",
    )
    p.add_argument("--bag-lengths", choices=["fixed", "variable"], default="fixed")
    p.add_argument("--interaction", choices=["dot", "dcn"], default="dot", help="torchrec: DLRM or DLRM_DCN")
    p.add_argument("--dcn-layers", type=int, default=3)
    p.add_argument("--dcn-rank", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--infer-steps", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torchrec: where the model runs")
    p.add_argument("--profile", type=Path, default=None, help="also profile --profile-steps steps into this folder")
    p.add_argument("--profile-steps", type=int, default=10)
    a = p.parse_args()
    if a.bag_sizes and len(a.bag_sizes) != NUM_TABLES:
        p.error(f"--bag-sizes needs {NUM_TABLES} sizes, got {len(a.bag_sizes)}")
    if a.contender == "plain" and a.interaction != "dot":
        p.error("plain has the dot interaction only")
    if a.contender == "plain" and a.device != "cpu":
        p.error("plain runs on the CPU only")
    result = run_plain(a) if a.contender == "plain" else run_torchrec(a)
    if result:
        a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
