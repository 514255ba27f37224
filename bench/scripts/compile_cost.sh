#!/usr/bin/env bash
# Compile cost of fpdt, one tree beside another in the same run (interleaved, so machine load hits
# both alike): -fsyntax-only of <fpdt/fpdt.hpp>, and -O2 -c of one P-rank layer instantiation
# (sequence_parallel_attention<float, local_communicator> with its tensor forward and backward).
# Usage: bench/scripts/compile_cost.sh OLD_TREE NEW_TREE [REPEATS]   (trees: checkouts of fpdt)
# Prints one line per measurement and the median ratio new/old.
set -euo pipefail
old=$(cd "$1" && pwd) new=$(cd "$2" && pwd) reps=${3:-3}
cxx=${CXX:-g++}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/umbrella.cpp" <<'CPP'
#include <fpdt/fpdt.hpp>
CPP
cat >"$tmp/layer.cpp" <<'CPP'
#include <fpdt/fpdt.hpp>
using L = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>;
fpdt::status run(L& l, fpdt::tensor_view<float const, 3> q, fpdt::tensor_view<float const, 3> k,
                 fpdt::tensor_view<float, 3> o, fpdt::tensor_view<float, 3> g) {
  FPDT_TRY(l.forward(q, k, k, o));
  return l.backward(q, g, g, g);
}
CPP
time_of() { # tree, flags, source
  local t0 t1
  t0=$(date +%s%N)
  $cxx -std=c++20 -I"$1/include" $2 "$3" -o "$tmp/out.o" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  t1=$(date +%s%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", (b - a) / 1e9 }'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
for what in "syntax:-fsyntax-only:umbrella.cpp" "layer-O2:-O2 -c:layer.cpp"; do
  IFS=: read -r name flags src <<<"$what"
  : >"$tmp/old.txt"; : >"$tmp/new.txt"
  for ((r = 0; r < reps; r++)); do
    time_of "$old" "$flags" "$tmp/$src" >>"$tmp/old.txt"
    time_of "$new" "$flags" "$tmp/$src" >>"$tmp/new.txt"
  done
  mo=$(median <"$tmp/old.txt") mn=$(median <"$tmp/new.txt")
  echo "$name: old $(tr '\n' ' ' <"$tmp/old.txt")s | new $(tr '\n' ' ' <"$tmp/new.txt")s | median new/old $(awk -v a="$mn" -v b="$mo" 'BEGIN { printf "%.3f", a / b }')"
done
