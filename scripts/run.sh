#!/usr/bin/env bash
# The main job: builds the default preset and runs FPDT attention forward and backward on P ranks
# (threads of one process; under mpirun, MPI processes) at Llama-3-8B attention shapes, with
# offload to pinned host memory, and checks the result against dense float64 attention.
# Extra arguments go to fpdt-attention (--help lists them), e.g.
#   ./scripts/run.sh --ranks 4 --seq 4096 --chunk 1024 --offload on --trace fpdt.json
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/deps.sh
cmake --preset default >/dev/null
cmake --build --preset default --target fpdt-attention
if (($# == 0)); then
  set -- --ranks 2 --seq 512 --chunk 128 --check
fi
exec build/default/examples/fpdt-attention "$@"
