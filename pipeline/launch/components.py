"""TorchX components of the pipeline: ``torchx run dist.ddp -j 2x8 pipeline/train.py [overrides]``.

Registered under the ``dist`` group through the ``torchx.components`` entry point in pyproject.toml,
so ``dist.ddp`` names :func:`ddp` below instead of TorchX's builtin, which rejects a positional script
(``exactly one of --script and -m must be specified``). Registering any entry point hides TorchX's
builtins, so pyproject.toml lists the other builtin modules again (``utils.echo`` and the rest) and
this module keeps ``dist.spmd``.

Without the entry point installed (``pip install --no-deps -e .``), name the file instead:
``torchx run pipeline/launch/components.py:ddp -j 2x1 pipeline/train.py``.

Keep this module import-light (no torch): every ``torchx`` call imports it. No
``from __future__ import annotations`` either: TorchX builds its argument parser from the runtime
annotations, and its linter accepts ``Optional[...]`` but not ``X | None``. ``Optional[int]``
arguments reach the function as strings, so "automatic" is spelled 0 or -1 below.
"""

import os
from typing import Dict, List, Optional, Tuple

import torchx
import torchx.components.dist as _torchx_dist
import torchx.specs as specs
from torchx.components.structured_arg import StructuredNameArgument
from torchx.specs import macros

DEFAULT_SCRIPT = "pipeline/train.py"
"""What runs when neither a script, ``--script`` nor ``-m`` is given (paths are relative to the
working directory: the repo root on ``local_cwd``, the image's WORKDIR ``/app`` in containers)."""

DEFAULT_IMAGE = "dlrm-pipeline:latest"
"""``docker build -f docker/Dockerfile -t dlrm-pipeline .``; ignored by ``local_cwd``, which runs in
the current folder."""

# The project's venv first on PATH, where launch.sh puts it (PIPELINE_VENV, the image sets /opt/venv;
# else ./.venv), so torchrun and python are the pinned ones even when the venv is not activated.
# `$$` is a literal `$` after TorchX's macro substitution; bash expands the rest on the node.
_VENV_ON_PATH = 'export PATH="$${PIPELINE_VENV:-$$PWD/.venv}/bin:$$PATH"'

CPUS_PER_PROCESS = 2
MEM_MB_PER_PROCESS = 4096
ELASTIC_MAX_RESTARTS = 3


def ddp(
    *script_args: str,
    script: Optional[str] = None,
    m: Optional[str] = None,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    j: str = "1x2",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = -1,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
    tee: int = 3,
) -> specs.AppDef:
    """
    DDP-style job of the DLRM pipeline (one role, N nodes x M processes) under torchrun. Drop-in for
    TorchX's dist.ddp that also takes the script positionally:
    ``torchx run dist.ddp -j 2x8 pipeline/train.py model=tiny``, ``--script pipeline/train.py -- model=tiny``,
    or no script at all (pipeline/train.py). Put Hydra flags that start with ``-`` after ``--``.
    Every rank of every node writes into one run folder, outputs/<app id>: the job's app id is passed
    as PIPELINE_RUN_ID (and as torchrun's rendezvous id).

    Args:
        script_args: the script (optional, first, e.g. pipeline/train.py) and its arguments (Hydra overrides)
        script: script to run (default: the first positional argument if it is not an override, else pipeline/train.py)
        m: python module to run instead of a script (python -m)
        image: container image (docker/kubernetes; local_cwd runs in the current folder)
        name: job name: ``{experimentname}/{runname}``, ``{experimentname}/``, ``/{runname}`` or
            ``{runname}``; the run name defaults to the script's name
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        cpu: cpus per node (0: 2 per process)
        gpu: gpus per node (set it to the processes per node for CUDA training)
        memMB: memory per node in MB (0: 4096 per process)
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}; a min:max range makes the job elastic
        env: environment variables for every process (e.g. ENV1=v1,ENV2=v2); PIPELINE_RUN_ID here
            overrides the app id as the run folder name
        max_retries: times the scheduler may resubmit the whole job after a failure
        max_restarts: times torchrun restarts a node's workers after a failure (-1: 0 for a fixed node
            count, 3 for an elastic range); a restart runs the script again in the same run folder, so
            it resumes from the run's latest checkpoint where the trainer has written one
        rdzv_port: port of the c10d rendezvous store on node 0 (multi-node only; give concurrent jobs
            on one host different ports)
        rdzv_backend: rendezvous backend (c10d, or static with node ranks from the replica ids)
        mounts: mounts (e.g. type=volume,src=pvc,dst=/app/outputs); multi-node jobs need outputs/ and
            data/ on a shared filesystem
        debug: set PyTorch's distributed debug flags
        tee: tee stdout/stderr of the workers to the console and log files (0 none, 1 out, 2 err, 3 both)
    """
    script, args = _resolve_entry(script, m, list(script_args))
    min_nnodes, max_nnodes, nproc_per_node, nnodes_rep = _torchx_dist.parse_nnodes(j)
    if (script or "").endswith("pipeline/train.py") or m == "pipeline.train":
        _check_config(args, max_nnodes * nproc_per_node, "cuda" if gpu > 0 else "cpu")
    if max_nnodes == 1:
        rdzv_endpoint = "localhost:0"  # one node: torchrun picks a free port
    else:
        # Node 0's host, filled in by the scheduler (torchx's rank0_env macro).
        rdzv_endpoint = _torchx_dist._noquote(f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}")
    if max_restarts < 0:
        max_restarts = ELASTIC_MAX_RESTARTS if min_nnodes < max_nnodes else 0

    argname = StructuredNameArgument.parse_from(name=name, m=m, script=script)
    role_env = {
        # One run folder per job on every rank and node (pipeline/resolvers.py: run_id).
        "PIPELINE_RUN_ID": macros.app_id,
        # Each rank sets its own thread count (trainer.num_threads); this silences torchrun's banner.
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "LOGLEVEL": os.getenv("LOGLEVEL", "WARNING"),  # torchrun's own log level, as TorchX's dist.ddp
        # A fresh rendezvous store for every restart: the shared one keeps the previous attempt's
        # addresses, which restarted ranks can read and hang on (pytorch/pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env or {}),
        "TORCHX_TRACKING_EXPERIMENT_NAME": argname.experiment_name,
    }
    if debug:
        role_env.update(_torchx_dist._TORCH_DEBUG_FLAGS)

    cmd = [
        "torchrun",
        "--rdzv_backend",
        rdzv_backend,
        "--rdzv_endpoint",
        rdzv_endpoint,
        "--rdzv_id",
        macros.app_id,
        "--nnodes",
        nnodes_rep,
        "--nproc_per_node",
        str(nproc_per_node),
        "--max_restarts",
        str(max_restarts),
        "--tee",
        str(tee),
        "--role",
        "",
        # SIGUSR1 too (Slurm's --signal, scancel -s USR1): forwarded to the ranks, which save the step they
        # reached and exit 143; without it torchrun would die of it and leave the ranks behind.
        "--signals-to-handle",
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    ]
    if rdzv_backend == "static":
        cmd += ["--node_rank", macros.replica_id]
    cmd += [script] if script is not None else ["-m", m]
    cmd += args

    if h is None:
        cpu = cpu or CPUS_PER_PROCESS * nproc_per_node
        memMB = memMB or MEM_MB_PER_PROCESS * nproc_per_node
    return specs.AppDef(
        name=argname.run_name,
        roles=[
            specs.Role(
                name=_torchx_dist.get_role_name(script, m),
                image=image,
                min_replicas=min_nnodes,
                num_replicas=max_nnodes,
                entrypoint="bash",
                args=["-c", f"{_VENV_ON_PATH}; {_torchx_dist._args_join(cmd)}"],
                env=role_env,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts) if mounts else [],
            )
        ],
    )


def spmd(
    *args: str,
    script: Optional[str] = None,
    m: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "/",
    h: str = "gpu.small",
    j: str = "1x1",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    TorchX's builtin dist.spmd, unchanged (kept reachable beside the project's dist.ddp).

    Args:
        args: the arguments to the main module or script
        script: script to run
        m: the main module name
        image: the image of the job
        name: ``{experimentname}/{runname}`` or ``{experimentname}/`` or ``/{runname}`` or ``{runname}``
        h: the type of host to run on; must be one of the registered named resources
        j: {nnodes}x{nproc_per_node}; for GPU hosts omitting nproc_per_node infers it from the GPU count
        env: environment variables to be passed to the run (e.g. ENV1=v1,ENV2=v2)
        max_retries: the number of scheduler retries allowed
        mounts: mounts for the worker containers (type=<bind/volume>,src=/host,dst=/job[,readonly])
        debug: whether to run with preset debug flags enabled
    """
    return _torchx_dist.spmd(
        *args,
        script=script,
        m=m,
        image=image,
        name=name,
        h=h,
        j=j,
        env=env,
        max_retries=max_retries,
        mounts=mounts,
        debug=debug,
    )


def _looks_like_script(arg: str) -> bool:
    """A path, not a Hydra override (``key=value``, ``+key=v``, ``~key``) nor a flag (``--cfg``)."""
    return "=" not in arg and not arg.startswith(("-", "+", "~"))


def _resolve_entry(script: Optional[str], m: Optional[str], args: List[str]) -> Tuple[Optional[str], List[str]]:
    """Return (script or None when ``m`` is used, the script's arguments)."""
    if script is not None and m is not None:
        raise ValueError("give either --script (or a positional script) or -m, not both")
    if script is None and m is None:
        if args and _looks_like_script(args[0]):
            script, args = args[0], args[1:]
        else:
            script = DEFAULT_SCRIPT
    elif script is not None and args and args[0] == script:
        args = args[1:]  # --script from .torchxconfig plus the same path positionally
    if args and args[0] == "--":  # `pipeline/train.py -- --cfg job`: the delimiter is torchx's, not Hydra's
        args = args[1:]
    return script, args


def _check_config(args: List[str], world_size: int, device_type: str) -> None:
    """The training config these overrides give, checked before anything is submitted.

    Raises:
        ComponentValidationException: naming the key and the fix (TorchX prints it and submits nothing).
    """
    from torchx.specs.finder import ComponentValidationException

    from pipeline.compose import compose_config
    from pipeline.errors import ConfigError

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        compose_config(overrides, world_size=world_size, device_type=device_type)
    except ConfigError as e:
        raise ComponentValidationException(f"invalid config: {e}") from None
