"""TorchX's Slurm scheduler, reading a job's state without Slurm accounting.

TorchX reads a Slurm job's state with ``sacct``, which fails on a cluster without accounting storage
(slurmdbd and its database): ``torchx run -s slurm`` then submits the job and fails right after, and
``--wait`` or ``torchx status`` cannot follow it. This scheduler asks ``sacct`` first and, when it
fails, ``scontrol show job`` (which knows a job until ``MinJobAge`` after it ends). It also fits each
role's CPUs and memory per node to what the partition's nodes have (the component asks for 2 CPUs and
4 GB per rank unless told), saying so, instead of submitting a job that would pend forever. Registered
as ``slurm`` through pyproject.toml's ``torchx.schedulers`` entry points, beside TorchX's other schedulers.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

from torchx.schedulers.api import DescribeAppResponse
from torchx.schedulers.slurm_scheduler import SLURM_STATES
from torchx.schedulers.slurm_scheduler import SlurmScheduler as TorchXSlurmScheduler
from torchx.specs import AppDef, AppState, ReplicaStatus, Role, RoleStatus, runopts

logger = logging.getLogger(__name__)


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """The jobs of ``scontrol show job -o`` output: one ``{Key: value}`` per line (a heterogeneous job, one
    line per component)."""
    jobs = []
    for line in text.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        if "JobId" in fields:
            jobs.append(fields)
    return jobs


def describe_from_scontrol(app_id: str, jobs: list[dict[str, str]]) -> DescribeAppResponse | None:
    """The app's state from its jobs' ``JobState`` (the worst of its components) and its roles from their
    ``JobName`` (``<role>-<replica>``, as TorchX names them)."""
    if not jobs:
        return None
    roles: dict[str, Role] = {}
    statuses: dict[str, RoleStatus] = {}
    states = []
    for job in jobs:
        state = SLURM_STATES.get(job.get("JobState", ""), AppState.UNKNOWN)
        states.append((job.get("JobState", ""), state))
        role, _, replica = job.get("JobName", "").rpartition("-")
        if role and replica.isdigit():
            roles.setdefault(role, Role(name=role, num_replicas=0, image=""))
            statuses.setdefault(role, RoleStatus(role, []))
            roles[role].num_replicas += 1
            statuses[role].replicas.append(ReplicaStatus(id=int(replica), role=role, state=state, hostname=""))
    order = [AppState.FAILED, AppState.CANCELLED, AppState.RUNNING, AppState.PENDING, AppState.SUCCEEDED]
    msg, state = min(states, key=lambda s: order.index(s[1]) if s[1] in order else len(order))
    return DescribeAppResponse(
        app_id=app_id, roles=list(roles.values()), roles_statuses=list(statuses.values()), state=state, msg=msg
    )


def has_accounting() -> bool:
    """Whether the cluster stores accounting (what ``sacct`` reads): ``AccountingStorageType`` is not ``none``."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip() not in ("", "accounting_storage/none")
    return True  # unknown: let sacct answer


def partition_node_size(partition: str | None) -> tuple[int, int] | None:
    """(CPUs, memory MB) of the smallest node in ``partition`` (the default partition if None), from sinfo."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P %c %m", "--noconvert"], capture_output=True, text=True)
    sizes = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        part, cpus, mem = line.split()
        if part.strip("*") == partition or (partition is None and part.endswith("*")):
            sizes.append((int(cpus.strip("+")), int(mem.strip("M+"))))
    return min(sizes) if sizes else None


def fit_to_partition(app: AppDef, size: tuple[int, int]) -> list[str]:
    """Lower each role's CPUs and memory per node to a node's ``size``; return what was changed."""
    cpus, mem = size
    changed = []
    for role in app.roles:
        r = role.resource
        if r.cpu > cpus or r.memMB > mem:
            changed.append(
                f"{role.name}: {r.cpu} CPUs / {r.memMB} MB per node -> {min(r.cpu, cpus)} / "
                f"{min(r.memMB, mem)} (the partition's nodes)"
            )
            r.cpu, r.memMB = min(r.cpu, cpus), min(r.memMB, mem)
    return changed


class SlurmScheduler(TorchXSlurmScheduler):
    _accounting: bool | None = None

    def _run_opts(self) -> runopts:
        opts = super()._run_opts()
        opts.add(
            "signal",
            type_=str,
            default=None,
            help="sbatch --signal, e.g. USR1@120: Slurm signals the ranks that long before the time limit and"
            " they save the step they reached (with max_retries, TorchX requeues the job and it resumes)",
        )
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: Any):
        size = partition_node_size(cfg.get("partition"))
        if size is not None:
            for line in fit_to_partition(app, size):
                logger.warning("fitted to the partition: %s", line)
        info = super()._submit_dryrun(app, cfg)
        if cfg.get("signal"):
            info.request.cmd.append(f"--signal={cfg['signal']}")
        return info

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        if self._accounting is None:
            self._accounting = has_accounting()
        if self._accounting:
            try:
                return super().describe(app_id)
            except subprocess.CalledProcessError:
                pass
        out = subprocess.run(["scontrol", "show", "job", "-o", app_id], capture_output=True, text=True)
        return describe_from_scontrol(app_id, parse_scontrol(out.stdout)) if out.returncode == 0 else None


def create_scheduler(session_name: str, **kwargs: Any) -> SlurmScheduler:
    return SlurmScheduler(session_name=session_name)
