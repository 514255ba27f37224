#!/usr/bin/env bash
# Plots per-rank device memory against sequence length for FPDT, Ulysses and Megatron-SP (one
# training step, the planner's memory model) with gnuplot, as a PNG.
#   scripts/plot-plan.sh [-o FILE.png] [fpdt-plan options]   (-o anywhere; -h prints this)
#   scripts/plot-plan.sh -o plan.png --model llama3-8b --gpus 8 --gpu a100-80gb
# Defaults: -o build/plan/plan-memory.png --model llama3-8b --gpus 8 --gpu a100-80gb. The options
# go to `fpdt-plan --sweep` (ZeRO stage, checkpointing, --config ...). FPDT_PLAN_BIN names a
# prebuilt fpdt-plan; otherwise it is built in build/default.
set -euo pipefail
# Paths the caller gives (-o, FPDT_PLAN_BIN, a --config file) are relative to the caller's
# directory, so the script stays there and names the repository's files by absolute path.
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build/plan/plan-memory.png
args=()
while (($# > 0)); do
  case $1 in
    -h | --help)
      sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -o)
      if (($# < 2)); then
        echo "plot-plan: -o needs a file name" >&2
        exit 2
      fi
      out=$2
      shift 2
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
if ((${#args[@]} == 0)); then
  args=(--model llama3-8b --gpus 8 --gpu a100-80gb)
fi
set -- "${args[@]}"
if ! command -v gnuplot >/dev/null 2>&1; then
  "$root/scripts/deps.sh"
fi
bin=${FPDT_PLAN_BIN:-}
if [[ -z "$bin" ]]; then
  source "$root/scripts/env.sh"
  "$root/scripts/deps.sh"
  (cd "$root" && cmake --preset default >/dev/null && cmake --build --preset default --target fpdt-plan >/dev/null)
  bin=$root/build/default/examples/fpdt-plan
fi
if [[ ! -x "$bin" ]]; then
  echo "plot-plan: fpdt-plan not found or not executable at '$bin' (FPDT_PLAN_BIN)" >&2
  exit 2
fi
mkdir -p "$(dirname "$out")"
csv="${out%.png}.csv"
if ! "$bin" "$@" --sweep >"$csv"; then
  rm -f "$csv"
  echo "plot-plan: fpdt-plan $* --sweep failed" >&2
  exit 2
fi
title="per-rank device memory, one training step: $*"
gnuplot <<GNUPLOT
set terminal pngcairo size 1000,650 font "sans,11"
set output "$out"
set datafile separator ","
set key top left
set title "$title" noenhanced
set xlabel "sequence length (tokens)"
set ylabel "device memory per rank (GiB)"
set logscale x 2
set logscale y 2
set xtics ("4K" 4096, "16K" 16384, "64K" 65536, "256K" 262144, "1M" 1048576, "4M" 4194304, "16M" 16777216)
set grid
plot "$csv" every ::1 using 1:2 with linespoints lw 2 title "FPDT", \
     "" every ::1 using 1:3 with linespoints lw 2 title "Ulysses", \
     "" every ::1 using 1:4 with linespoints lw 2 title "Megatron-SP", \
     "" every ::1 using 1:5 with lines dt 2 lw 2 lc rgb "black" title "GPU memory"
GNUPLOT
echo "plot-plan: wrote $out (data: $csv)"
