"""``dlrm-pipeline``: one command for the pipeline, from any folder once the package is installed.

    dlrm-pipeline train [overrides]         torchrun on NPROC ranks (NNODES, RDZV_ENDPOINT for several nodes)
    dlrm-pipeline sweep [overrides]         train -m: every point its own torchrun job
    dlrm-pipeline tune [overrides]          an Optuna search (train -m tune=default)
    dlrm-pipeline preprocess [overrides]    generate (synthetic) and preprocess a dataset
    dlrm-pipeline export|predict|plan|report|doctor [arguments]

``./launch.sh`` installs the stack and calls it. The config is composed and checked here first, in one
process: a bad key or value stops before torchrun starts (no run folder, one message). An expected
error of any command (config, data, checkpoint, serving) prints its message in a few lines and exits
with its kind's code (2 config, 3 checkpoint/training, 4 data, 5 serving); ``PIPELINE_DEBUG=1`` shows
the traceback. Ctrl-C says where the run stopped and how to resume it.

Environment: NPROC (ranks per node; default one per GPU, else one per NUMA node: pipeline/launch/ranks.py),
NNODES (default 1), RDZV_ENDPOINT (host:port of the first node), PIPELINE_RUN_ID (the run folder and rendezvous
id; default a timestamp), MAX_RESTARTS (torchrun's --max-restarts), PIPELINE_DRY_RUN=1 (print the command
instead of running it), PIPELINE_DEBUG=1.
"""

from __future__ import annotations

import datetime
import os
import shlex
import signal
import sys
from pathlib import Path

from pipeline.errors import ConfigError, UserError

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
PREEMPTED = 143  # 128 + SIGTERM: the ranks saved a checkpoint at the step they reached (pipeline.errors.Preempted)
USER_EXIT_CODES = {2, 3, 4, 5}
# Hydra flags that inspect the config instead of running it: one process, no torchrun.
_INSPECT = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--package", "-p"}
_MULTIRUN = {"-m", "--multirun"}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _debug() -> bool:
    return os.environ.get("PIPELINE_DEBUG", "0") not in ("", "0")


def _run_id() -> str:
    return os.environ.get("PIPELINE_RUN_ID") or datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _hydra_main(module: str, args: list[str]) -> int:
    """Run a ``@hydra.main`` entry point in this process with ``args`` as its command line."""
    import importlib

    mod = importlib.import_module(module)
    sys.argv = [str(Path(mod.__file__)), *args]
    try:
        mod.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def torchrun_argv(args: list[str], nproc: int, nnodes: int, run_id: str) -> list[str]:
    """torchrun's arguments for a training job of ``nnodes`` x ``nproc`` ranks running ``pipeline/train.py``."""
    restarts = ["--max-restarts", os.environ["MAX_RESTARTS"]] if os.environ.get("MAX_RESTARTS") else []
    if nnodes == 1:
        # The ranks reach the local store at 127.0.0.1, not at this host's name (unresolvable in a container
        # without a network, or on a host missing from its own /etc/hosts).
        return [
            "--standalone",
            "--local-addr",
            "127.0.0.1",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            *restarts,
            str(TRAIN_SCRIPT),
            *args,
        ]
    endpoint = os.environ["RDZV_ENDPOINT"]
    return [
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        run_id,
        *restarts,
        str(TRAIN_SCRIPT),
        *args,
    ]


def _run_dir(args: list[str], run_id: str) -> Path:
    for a in args:
        if a.startswith("hydra.run.dir="):
            return Path(a.split("=", 1)[1])
    return Path("outputs") / run_id


def _resume_hint(args: list[str], run_id: str) -> str:
    """Where an interrupted run stopped (its latest checkpoint) and the command that resumes it."""
    from pipeline import storage

    run_dir = _run_dir(args, run_id)
    given = [a.split("=", 1)[1] for a in args if a.startswith("checkpoint.dir=")]
    root = storage.location(given[-1]) if given and given[-1] not in ("", "null") else run_dir / "checkpoints"
    where = "no checkpoint yet, so it starts over"
    try:
        latest = storage.join(root, "latest")
        name = storage.read_text(latest).strip() if storage.is_file(latest) else None
    except OSError as e:
        name, where = None, f"the latest checkpoint could not be read ({storage.describe_error(e)})"
    if name:
        path = storage.display(storage.join(root, name))
        where = f"the latest checkpoint is step {int(name.split('_')[-1])} ({path})"
    command = f"PIPELINE_RUN_ID={run_id} ./launch.sh train {' '.join(shlex.quote(a) for a in args)}".rstrip()
    return f"stopped: {where}; this resumes it:\n  {command}"


def _torchrun(argv: list[str], run_id: str) -> int:
    """torchrun in this process, its report of a failed rank reduced to what a person needs."""
    import logging

    # torchrun's agent logs a failed worker and each signal it forwards: the ranks say what went wrong.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torchrun's agent forwards SIGTERM (not SIGUSR1) to the ranks: a SIGUSR1 here (Slurm's --signal) becomes one.
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes <= USER_EXIT_CODES:  # the rank printed its message
            return min(codes)
        if PREEMPTED in codes and codes <= {PREEMPTED, -15}:  # signalled: the ranks saved the same step
            return PREEMPTED
        if codes == {INTERRUPTED} or codes <= {-2, INTERRUPTED, -15}:
            return INTERRUPTED
        rank, failure = e.get_first_failure()
        _say(f"rank {rank} failed (exit code {failure.exitcode}); its log: rank{rank}.log in the run folder")
        return 1
    except SignalException as e:  # the ranks got the same signal from the agent and saved their step
        return PREEMPTED if e.sigval == signal.SIGTERM else INTERRUPTED
    except KeyboardInterrupt:
        return INTERRUPTED
    return 0


def train(args: list[str], sweep: bool = False) -> int:
    """``train``: check the config, then torchrun (or Hydra in this process for sweeps and inspection)."""
    if os.environ.get("NPROC"):
        nproc = int(os.environ["NPROC"])
    else:
        from pipeline.launch.ranks import default_ranks_per_node

        nproc, why = default_ranks_per_node()
        _say(f"NPROC={nproc}: {why}; set NPROC for another count")
    nnodes = int(os.environ.get("NNODES", "1"))
    if nnodes > 1 and not (os.environ.get("RDZV_ENDPOINT") and os.environ.get("PIPELINE_RUN_ID")):
        raise ConfigError(
            f"NNODES={nnodes} needs RDZV_ENDPOINT (host:port of the first node) and the same "
            "PIPELINE_RUN_ID on every node (the rendezvous id and run folder), e.g.\n  NNODES=2 "
            "RDZV_ENDPOINT=node0:29500 PIPELINE_RUN_ID=job1 ./launch.sh train"
        )
    run_id = _run_id()
    os.environ["PIPELINE_RUN_ID"] = run_id
    os.environ.setdefault("NPROC", str(nproc))  # each sweep point's ranks (pipeline/conf/hydra/launcher/torchrun.yaml)
    # A fresh rendezvous store per torchrun restart: the shared one keeps the previous attempt's
    # addresses, which restarted ranks can read and hang on (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun prints a banner when OMP_NUM_THREADS is unset; each rank sets its own (trainer.num_threads).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sweep and not _MULTIRUN & set(args):
        args = ["-m", *args]
    if _MULTIRUN & set(args) or _INSPECT & set(args):
        if os.environ.get("PIPELINE_DRY_RUN") == "1":
            print(shlex.join([sys.executable, str(TRAIN_SCRIPT), *args]))
            return 0
        return _hydra_main("pipeline.train", args)
    argv = torchrun_argv(args, nproc, nnodes, run_id)
    if os.environ.get("PIPELINE_DRY_RUN") == "1":
        print(shlex.join([str(Path(sys.executable).parent / "torchrun"), *argv]))
        return 0
    from pipeline.compose import compose_config

    compose_config(args, world_size=nproc * nnodes)  # fails here, before any process or run folder
    code = _torchrun(argv, run_id)
    if code in (INTERRUPTED, PREEMPTED):
        _say(_resume_hint(args, run_id))
    return code


def _tool(module: str, args: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(args) or 0


COMMANDS = {
    "train": lambda a: train(a),
    "sweep": lambda a: train(a, sweep=True),
    "tune": lambda a: train(["tune=default", *a], sweep=True),
    "preprocess": lambda a: _preprocess(a),
    "export": lambda a: _export(a),
    "predict": lambda a: _tool("pipeline.serving.predict", a),
    "plan": lambda a: _tool("pipeline.tools.plan", a),
    "report": lambda a: _tool("pipeline.tools.report", a),
    "doctor": lambda a: _tool("pipeline.tools.doctor", a),
}


def _export(args: list[str]) -> int:
    """``export``; a run tracked with MLflow (its folder has mlflow_run.json) also gets the export as artifacts."""
    code = _tool("pipeline.serving.export", args)
    if code == 0:
        import argparse

        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("checkpoint", nargs="?")
        parser.add_argument("--out")
        for option in ("--checkpoint", "--processed-dir", "--format", "--quantize"):  # export's options with a value
            parser.add_argument(option)
        known, _ = parser.parse_known_args(args)
        from pipeline.storage import is_remote

        # A run folder is local; an export in an object store is not copied into the tracking server.
        if known.checkpoint and known.out and not is_remote(known.checkpoint) and not is_remote(known.out):
            from pipeline.metrics.tracking import RUN_FILE, log_export

            source = Path(known.checkpoint).absolute()
            # A run folder, its checkpoints folder or one step_<N>: the run folder is the nearest with the run file.
            run_dir = next((d for d in (source, *source.parents[:2]) if (d / RUN_FILE).is_file()), None)
            if run_dir is not None:
                log_export(run_dir, known.out)
    return code


def _preprocess(args: list[str]) -> int:
    from pipeline.compose import compose_config

    if not _INSPECT & set(args):
        compose_config(args)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [f"hydra.run.dir=outputs/preprocess-{_run_id()}", *args]
    return _hydra_main("pipeline.preprocess", args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help", "help") else 2
    command, args = argv[0], argv[1:]
    try:
        return COMMANDS[command](args)
    except UserError as e:
        if _debug():
            raise
        _say(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        if _debug():
            raise
        _say("interrupted")
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
