#!/usr/bin/env bash
# The main job. Until the training demo exists, this builds the default preset and runs the most
# complete thing the library does today: the FPDT offload pipeline on the host backend (chunks
# produced into a budgeted staging ring, offloaded to pinned memory while the next computes,
# fetched back in reverse and verified). Extra arguments go to fpdt-offload-demo (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/deps.sh
cmake --preset default >/dev/null
cmake --build --preset default --target fpdt-offload-demo
exec build/default/examples/fpdt-offload-demo "$@"
