"""How many ranks a node starts when ``NPROC`` is not set: what trains fastest there.

One rank per GPU. On CPUs, one rank per NUMA node: ranks that share a node's cores take them from each other and
wait on each other's all-to-alls at every step (on 2 cores, 2 ranks trained at 0.66x of 1 rank's samples/s at batch
2048 and 0.72x at 8192: benchmarks/README.md), while one rank uses every core of its node for each kernel. Sharding
over several ranks is what several nodes, sockets or GPUs are for; ``NPROC=2`` still runs 2 ranks anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

NODES = Path("/sys/devices/system/node")


def numa_nodes(root: Path = NODES) -> int:
    """NUMA nodes that have CPUs (1 where the kernel does not say)."""
    try:
        nodes = [p for p in root.iterdir() if re.fullmatch(r"node\d+", p.name)]
        with_cpus = [p for p in nodes if (p / "cpulist").read_text().strip()]
    except OSError:
        return 1
    return max(1, len(with_cpus))


def default_ranks_per_node() -> tuple[int, str]:
    """(ranks, why) for a node when ``NPROC`` is unset."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return gpus, f"one per GPU ({gpus})"
    nodes = numa_nodes()
    return nodes, f"one per NUMA node on CPUs ({nodes}; ranks sharing cores are slower per sample)"
