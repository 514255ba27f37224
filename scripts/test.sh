#!/usr/bin/env bash
# The whole test suite: installs missing Debian packages (as root), then configures, builds and
# tests four presets: default (everything, CUDA compiled when nvcc exists), asan (address and
# undefined-behaviour sanitizers) and tsan (thread sanitizer), the last two on the host code, and
# fuzz (clang's libFuzzer targets in fuzz/, FPDT_FUZZ_RUNS inputs each from a fixed seed).
# Prints one summary line at the end; exits non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/deps.sh

presets=(${FPDT_TEST_PRESETS:-default asan tsan fuzz})
start=$(date +%s)
passed=0 failed=0 skipped=0 status=0
mkdir -p build
for preset in "${presets[@]}"; do
  echo "=== fpdt: workflow preset '$preset' ==="
  log="build/test-$preset.log"
  set +e
  if [[ $preset == tsan ]] && setarch "$(uname -m)" -R true 2>/dev/null; then
    # ThreadSanitizer cannot map its shadow memory under high ASLR entropy on some kernels.
    setarch "$(uname -m)" -R cmake --workflow --preset "$preset" 2>&1 | tee "$log"
  else
    cmake --workflow --preset "$preset" 2>&1 | tee "$log"
  fi
  rc=${PIPESTATUS[0]}
  set -e
  line=$(grep -E 'tests? passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1 || true)
  if [[ -n $line ]]; then
    f=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
    t=$(sed -E 's/.* failed out of ([0-9]+).*/\1/' <<<"$line")
    s=$(grep -cE '^\s+[0-9]+ - .* \((Skipped|Not Run|Disabled)\)' "$log" || true)
    passed=$((passed + t - f - s)) failed=$((failed + f)) skipped=$((skipped + s))
  fi
  if ((rc != 0)); then
    echo "=== fpdt: preset '$preset' FAILED (exit $rc) ==="
    status=1
    [[ -z $line ]] && failed=$((failed + 1))
  fi
done
echo "fpdt test suite: presets ${presets[*]}, wall time $(( $(date +%s) - start )) s"
echo "fpdt: $passed passed, $failed failed, $skipped skipped"
exit $status
