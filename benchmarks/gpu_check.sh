#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and the package index in reach:
#
#   benchmarks/gpu_check.sh                 # WORKDIR=/tmp/gpu_check, ROWS=1000000 rows per table
#
# 1. installs the CUDA lock (requirements/cuda.txt: fbgemm-gpu, the CUDA torch) into .venv-cuda;
# 2. ./launch.sh doctor: torch / fbgemm-gpu / torchrec belong together, the GPU is seen, nccl is there;
# 3. train_throughput.py --device cuda at batch 16384 on 1 rank: (a) this pipeline (a short training run with
#    the tables as fused TBE kernels on the card and its evaluation pass) against (b) the minimal TorchRec loop
#    on the same shapes; then with 2 ranks when the machine has 2 GPUs.
# Everything it prints is what to record (benchmarks/README.md, a section per GPU kind).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIPELINE_VARIANT=cuda PIPELINE_VENV="${PIPELINE_VENV:-.venv-cuda}"
WORKDIR="${WORKDIR:-/tmp/gpu_check}"
ROWS="${ROWS:-1000000}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
./launch.sh setup
./launch.sh doctor
gpus=$("$PIPELINE_VENV/bin/python" -c "import torch; print(torch.cuda.device_count())")
if [[ "$gpus" -lt 1 ]]; then
  echo "gpu_check: torch sees no GPU (see the doctor's report above)" >&2
  exit 1
fi
ranks=1
[[ "$gpus" -ge 2 ]] && ranks=1,2
"$PIPELINE_VENV/bin/python" benchmarks/train_throughput.py --device cuda --batch-sizes 16384 --ranks "$ranks" \
  --rows "$ROWS" --workdir "$WORKDIR"
