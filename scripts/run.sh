#!/usr/bin/env bash
# The main job: builds the default preset and trains a small byte-level transformer with FPDT
# attention, chunked MLP and chunked loss on 4 in-process ranks (host backend) at a 16384-token
# context on the licence texts Debian ships; each step prints "step N loss X ...", the end prints
# the peak device bytes per rank with and without chunking and offload, and a Perfetto trace is
# written. Extra arguments go to fpdt-train (--help lists them), e.g.
#   ./scripts/run.sh --seq 32768 --chunk 8192 --steps 20 --data my.txt
# Under MPI: mpirun -np 4 build/default/examples/fpdt-train (one rank per process).
# The attention-only demo is build/default/examples/fpdt-attention (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/deps.sh
cmake --preset default >/dev/null
cmake --build --preset default --target fpdt-train
exec build/default/examples/fpdt-train --trace build/default/fpdt-train-trace.json "$@"
