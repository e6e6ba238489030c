#!/usr/bin/env bash
# One entry point for the pipeline. First use creates .venv and installs the pinned stack into it;
# later calls skip that in well under a second. See ./launch.sh --help.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${PIPELINE_VENV:-$ROOT/.venv}"
# The interpreter for the venv: $PYTHON, else python3.11, else python3 if it is 3.11.
if [[ -n "${PYTHON:-}" ]]; then
  PYTHON_BIN="$PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
  PYTHON_BIN=python3.11
else
  PYTHON_BIN=python3
fi
VARIANT="${PIPELINE_VARIANT:-cpu}"   # cpu | cuda: which lock file to install
STAMP="$VENV/.pipeline-installed"

usage() {
  cat <<'TXT'
Usage: ./launch.sh <command> [hydra overrides...]

  train       Train with torchrun on NPROC ranks (default 2) on this machine.
                ./launch.sh train                              # main job: synthetic data, paper's DLRM
                ./launch.sh train model.embedding_dim=64       # any Hydra override
                NPROC=1 ./launch.sh train model=tiny data=tiny # one rank, tiny preset
                ./launch.sh train --cfg job                    # print the resolved config, no training
  test        Run the test suite (pytest; extra args go to pytest).
                ./launch.sh test -k config
  preprocess  Generate (synthetic) and preprocess a dataset without training.
                ./launch.sh preprocess data=tsv data.raw_files=[my_sample.tsv]
  doctor      Check that torch, fbgemm-gpu and torchrec belong together; list devices and backends.
  setup       Create .venv and install the pinned stack (done automatically by the others).
                PIPELINE_VARIANT=cuda ./launch.sh setup        # CUDA lock instead of CPU

Environment: NPROC (ranks, default 2), PIPELINE_RUN_ID (run folder name, default a timestamp),
PIPELINE_VENV (virtualenv path, default .venv), PYTHON (interpreter for the venv, default python3.11).
TXT
}

lock_hash() {
  cat requirements/"$VARIANT".txt requirements/torchrec.txt requirements/dev.txt pyproject.toml | sha256sum | cut -c1-16
}

setup() {
  local want; want="$VARIANT-$(lock_hash)"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0
  fi
  echo "[launch.sh] installing the pinned $VARIANT stack into $VENV (first use only)" >&2
  if [[ ! -x "$VENV/bin/python" ]]; then
    if ! "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "[launch.sh] need Python 3.11 (the pinned torch/fbgemm wheels are cp311); found: $("$PYTHON_BIN" --version 2>&1)." >&2
      echo "[launch.sh] install it, or point PYTHON at one: PYTHON=/path/to/python3.11 ./launch.sh setup" >&2
      exit 1
    fi
    "$PYTHON_BIN" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "requirements/$VARIANT.txt" -r requirements/dev.txt
  # torchrec's metadata asks for the CUDA fbgemm-gpu even on CPU: install it without dependencies
  # (its real needs are pinned in the lock file above).
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements/torchrec.txt
  echo "$want" > "$STAMP"
}

run_id() {
  echo "${PIPELINE_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  -h|--help|help|"")
    usage ;;
  setup)
    setup ;;
  doctor)
    setup; exec "$VENV/bin/python" -m pipeline.doctor "$@" ;;
  test)
    setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  preprocess)
    setup; exec "$VENV/bin/python" -m pipeline.preprocess "hydra.run.dir=outputs/preprocess-$(run_id)" "$@" ;;
  train)
    setup
    export PIPELINE_RUN_ID; PIPELINE_RUN_ID="$(run_id)"
    NPROC="${NPROC:-2}"
    # torchrun prints a banner when OMP_NUM_THREADS is unset; each rank sets its own thread count
    # from trainer.num_threads (default: cores / ranks on this node).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    for arg in "$@"; do  # config inspection needs one process, not NPROC copies of the output
      case "$arg" in --cfg|-c|--help|--hydra-help|--info|-i|--resolve) exec "$VENV/bin/python" pipeline/train.py "$@" ;; esac
    done
    exec "$VENV/bin/torchrun" --standalone --nnodes 1 --nproc_per_node "$NPROC" pipeline/train.py "$@" ;;
  *)
    echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
