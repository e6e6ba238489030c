#!/usr/bin/env bash
# One entry point for the pipeline. First use creates .venv and installs the pinned stack into it;
# later calls skip that in well under a second. See ./launch.sh --help.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${PIPELINE_VENV:-$ROOT/.venv}"
# The interpreter for the venv: $PYTHON, else the first of python3.11, python3.12, python3 that runs and is
# 3.11 or 3.12 (the versions the lock files are made for).
SUPPORTED_PYTHON='import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))'
pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
    return
  fi
  local candidate
  for candidate in python3.11 python3.12 python3; do
    if "$candidate" -c "$SUPPORTED_PYTHON" >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  echo python3
}
VARIANT="${PIPELINE_VARIANT:-cpu}"   # cpu | cuda: which lock file to install
STAMP="$VENV/.pipeline-installed"
PIPELINE_RUN_ID_GIVEN="${PIPELINE_RUN_ID:-}"

usage() {
  cat <<'TXT'
Usage: ./launch.sh <command> [arguments...]

  train       Train with torchrun on NPROC ranks on this machine (default one per GPU, else one per NUMA node);
              arguments are Hydra overrides.
                ./launch.sh train                              # main job: synthetic data, paper's DLRM
                ./launch.sh train model.embedding_dim=64       # any Hydra override
                NPROC=2 ./launch.sh train model=tiny data=tiny # two ranks, tiny preset
                ./launch.sh train --cfg job                    # print the resolved config, no training
              With -m (--multirun): a sweep. One process expands the sweep and starts every point as its
              own torchrun job of NPROC ranks, one after another, into multirun/<run id>/<num>/, then
              writes results.csv/.json there (each point's overrides, status, final metrics) and prints it.
              A failed point does not stop the others; the sweep exits non-zero if any failed.
                ./launch.sh train -m model.embedding_dim=64,128 optimizer.lr=0.01,0.1
                ./launch.sh train -m optimizer.lr=0.01,0.1 hydra.launcher.max_parallel=2
                ./launch.sh train -m hydra/launcher=slurm hydra.launcher.partition=gpu optimizer.lr=0.01,0.1
              Several nodes: run the same command on every node with NNODES, RDZV_ENDPOINT (host:port of
              the first node) and the same PIPELINE_RUN_ID (rendezvous id and run folder):
                NNODES=2 RDZV_ENDPOINT=node0:29500 PIPELINE_RUN_ID=job1 ./launch.sh train
  sweep       The same as train -m.
                ./launch.sh sweep optimizer.lr=0.01,0.1 trainer.max_steps=500
  tune        Search hyper-parameters with Optuna (pipeline/conf/tune/default.yaml: learning rates, batch size, embedding
              dimension, frequency threshold, epochs, model variant) on the validation AUC; each trial a torchrun
              job of NPROC ranks, several side by side where the cores allow. Prints the results and the best
              overrides, and writes them to configs/tuned/<run id>.yaml. The same PIPELINE_RUN_ID resumes it.
                NPROC=1 ./launch.sh tune data=files data.train_files=[train.tsv] data.val_files=[val.tsv]
                ./launch.sh train +tuned=<run id> data=files data.train_files=[train.tsv] data.val_files=[val.tsv]
                ./launch.sh tune hydra.sweeper.n_trials=50 model.embedding_dim=64   # more trials; fix a parameter
  test        Run ruff (check and format --check), then the test suite (pytest; extra args go to pytest).
                ./launch.sh test -k config
  preprocess  Generate (synthetic) and preprocess a dataset without training.
                ./launch.sh preprocess data=tsv data.raw_files=[my_sample.tsv]
  doctor      Check that torch, fbgemm-gpu and torchrec belong together; list devices and backends.
                ./launch.sh doctor
  setup       Create .venv and install the pinned stack (done automatically by the others).
                PIPELINE_VARIANT=cuda ./launch.sh setup        # CUDA lock instead of CPU
  image       Build the image (docker/Dockerfile) as $PIPELINE_IMAGE (default dlrm-pipeline:latest); extra
              arguments go to docker build.
                ./launch.sh image                              # FROM python:3.11-slim-bookworm (needs a registry)
                ./launch.sh image --local-base                 # no registry: a Debian base made here (root, debootstrap)
  compose     docker compose -p dlrm-pipeline -f docker/docker-compose.yml <arguments>: a 2-node job (node0,
              node1) from the image, data/outputs/checkpoints on shared volumes, one run folder
              (PIPELINE_RUN_ID). PIPELINE_TRAIN_ARGS holds the Hydra overrides. Compose v2 (docker compose)
              or docker-compose 1.29, and a running engine (config only needs the CLI).
                ./launch.sh compose config                     # the resolved compose file
                PIPELINE_TRAIN_ARGS="model=tiny data=tiny" PIPELINE_RUN_ID=job1 ./launch.sh compose up
                ./launch.sh compose stop                       # preempt: both nodes save their step (exit 143)
                PIPELINE_RUN_ID=job1 ./launch.sh compose up    # resumes from that step
                ./launch.sh compose --profile tensorboard up -d tensorboard   # http://127.0.0.1:6006
                ./launch.sh compose down -v                    # stop, and drop the volumes
  submit      Submit with TorchX: torchx run --scheduler <scheduler> dist.ddp <arguments>.
                ./launch.sh submit local_cwd -j 2x1 pipeline/train.py model=tiny data=tiny
                ./launch.sh submit slurm -j 2x8 pipeline/train.py    # on a Slurm login node
                ./launch.sh submit slurm --dryrun -cfg partition=cpu -j 2x8 model=tiny   # print the sbatch script
  report      Plot and summarise runs: report.png + report.md (AUC/logloss against samples seen).
                ./launch.sh report outputs/<run_id>                  # one run (written into its folder)
                ./launch.sh report multirun/<id>                     # a sweep: one plot comparing its runs
                ./launch.sh report outputs/a outputs/b --out reports/ab
  export      Export a run's checkpoint as a plain, unsharded CPU model (loads without torch.distributed).
                ./launch.sh export outputs/<run_id> --out outputs/<run_id>/export
  predict     Score a raw Criteo TSV (with or without the label column, plain or .gz) or a preprocessed split.
                ./launch.sh predict --model outputs/<run_id>/export --input test.tsv --out predictions.tsv
                ./launch.sh predict --model outputs/<run_id>/export --split val --out predictions_val.npy
  plan        The sharding plan and memory per rank for a cluster you don't have (TorchRec's planner, offline);
              refuses a plan that cannot fit, saying by how much and which tables.
                ./launch.sh plan -j 2x8 --device cuda --hbm-gb 80 --data criteo_1tb --cap 40000000
                ./launch.sh plan -j 1x2 --device cpu --data processed:data/synthetic/processed

Environment: NPROC (ranks per node, default one per GPU, else one per NUMA node), NNODES (nodes, default
1) and RDZV_ENDPOINT (first node's host:port, when NNODES > 1), PIPELINE_RUN_ID (run folder name,
default a timestamp), PIPELINE_VENV (virtualenv path, default .venv), PYTHON (interpreter for the venv, default python3.11),
PIPELINE_DRY_RUN=1 (print the command train/sweep/compose/submit would run, and exit), MAX_RESTARTS
(train: torchrun restarts all ranks up to this many times when one dies; they resume from the last
checkpoint), PIPELINE_VARIANT (cpu or cuda lock file).
TXT
}

lock_hash() {
  cat requirements/"$VARIANT".txt requirements/torchrec.txt requirements/dev.txt pyproject.toml | sha256sum | cut -c1-16
}

setup() {
  [[ "${PIPELINE_DRY_RUN:-0}" == 1 ]] && return 0
  local want; want="$VARIANT-$(lock_hash)"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0
  fi
  echo "[launch.sh] installing the pinned $VARIANT stack into $VENV (first use only)" >&2
  if [[ ! -x "$VENV/bin/python" ]]; then
    local python_bin; python_bin="$(pick_python)"
    if ! "$python_bin" -c "$SUPPORTED_PYTHON" 2>/dev/null; then
      echo "[launch.sh] need Python 3.11 or 3.12 (the lock files' wheels); found: $("$python_bin" --version 2>&1)." >&2
      echo "[launch.sh] install one, or point PYTHON at it: PYTHON=/path/to/python3.12 ./launch.sh setup" >&2
      exit 1
    fi
    "$python_bin" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "requirements/$VARIANT.txt" -r requirements/dev.txt
  # torchrec's metadata asks for the CUDA fbgemm-gpu even on CPU: install it without dependencies
  # (its real needs are pinned in the lock file above).
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements/torchrec.txt
  # The project itself, editable, without dependencies (pinned above): registers pyproject.toml's
  # torchx.components entry point, so `torchx run dist.ddp ...` is pipeline/launch/components.py.
  # Skipped where the sources are not copied yet (docker/Dockerfile runs setup with the lock files only).
  if [[ -d pipeline && -f README.md ]]; then
    PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
  fi
  echo "$want" > "$STAMP"
}

run_id() {
  echo "${PIPELINE_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}"
}

# exec the command, or with PIPELINE_DRY_RUN=1 print it (shell-quoted) and exit.
run() {
  if [[ "${PIPELINE_DRY_RUN:-0}" == 1 ]]; then
    local out; out="$(printf '%q ' "$@")"; echo "${out% }"; exit 0
  fi
  exec "$@"
}

# The Compose CLI: the v2 plugin (docker compose), else the standalone docker-compose.
compose_cli() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
  elif [[ "${PIPELINE_DRY_RUN:-0}" == 1 ]]; then
    COMPOSE=(docker compose)
  else
    echo "[launch.sh] compose needs Docker Compose: the docker CLI with its compose plugin (docker compose)," \
      "or docker-compose; neither was found." >&2
    exit 1
  fi
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  -h|--help|help|"")
    usage ;;
  setup)
    setup ;;
  test)
    setup
    # Lint and format first (seconds); "$VENV/bin/ruff" check --fix . && "$VENV/bin/ruff" format . fixes most.
    "$VENV/bin/ruff" check --quiet . || { echo "[launch.sh] ruff check failed (see above)" >&2; exit 1; }
    "$VENV/bin/ruff" format --check --quiet . || { echo "[launch.sh] files not formatted: $VENV/bin/ruff format ." >&2; exit 1; }
    exec "$VENV/bin/python" -m pytest "$@" ;;
  train|sweep|tune|preprocess|export|predict|plan|report|doctor)
    # dlrm-pipeline (pipeline/cli.py) checks the config in one process, then starts torchrun (or a sweep).
    setup; exec "$VENV/bin/dlrm-pipeline" "$cmd" "$@" ;;
  compose)
    compose_cli
    # Every command but config talks to the engine: say so plainly when there is none.
    if [[ "${1:-}" != config && "${PIPELINE_DRY_RUN:-0}" != 1 ]] && ! docker info >/dev/null 2>&1; then
      echo "[launch.sh] no Docker engine reachable (docker info failed): start Docker, or point DOCKER_HOST" \
        "at one. './launch.sh compose config' checks the compose file without an engine." >&2
      exit 1
    fi
    export PIPELINE_RUN_ID; PIPELINE_RUN_ID="$(run_id)"
    run "${COMPOSE[@]}" -p "${PIPELINE_COMPOSE_PROJECT:-dlrm-pipeline}" -f docker/docker-compose.yml "$@" ;;
  image)
    build_args=()
    if [[ "${1:-}" == --local-base ]]; then
      shift
      docker/base-image.sh dlrm-pipeline/base:bookworm
      # The local base brings its own wheels (PIP_FIND_LINKS): no PyTorch index.
      build_args=(--build-arg BASE_IMAGE=dlrm-pipeline/base:bookworm --build-arg TORCH_CPU_INDEX=)
    fi
    run docker build --network host -f docker/Dockerfile --build-arg "VARIANT=$VARIANT" "${build_args[@]}" \
      -t "${PIPELINE_IMAGE:-dlrm-pipeline:latest}" "$@" . ;;
  submit)
    if [[ $# -lt 1 || "$1" == -* ]]; then
      echo "usage: ./launch.sh submit <scheduler> [--dryrun|--wait|--log|-cfg K=V,...] [-j NxM] [dist.ddp options] [script] [overrides]" \
        "(the schedulers: $VENV/bin/torchx runopts)" >&2
      exit 2
    fi
    setup
    SCHED="$1"; shift
    run_opts=()  # options of `torchx run` itself go before the component's name
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --dryrun|--wait|--log) run_opts+=("$1"); shift ;;
        -cfg|--scheduler_args|--workspace|--parent_run_id) run_opts+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        *) break ;;
      esac
    done
    export PATH="$VENV/bin:$PATH"
    run "$VENV/bin/torchx" run --scheduler "$SCHED" "${run_opts[@]}" dist.ddp "$@" ;;
  *)
    echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
