#!/usr/bin/env bash
# Installs what fpdt's build, tests and demo need from Debian's packages, when run as root;
# otherwise names exactly what to install. The CUDA toolkit (nvcc, NCCL) is optional and never
# installed here: CUDA code is compiled when nvcc is on PATH or in /usr/local/cuda/bin.
set -euo pipefail

packages=(cmake g++ make doctest-dev libbenchmark-dev libopenmpi-dev openmpi-bin libopenblas-dev doxygen gnuplot-nox
          libdlpack-dev clang libclang-rt-14-dev) # DLPack's header; clang and libFuzzer: the fuzz preset

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} > 0)); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "fpdt deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "fpdt deps: missing Debian packages: ${missing[*]}" >&2
    echo "install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# nvcc is usually not on PATH in a fresh shell; the toolkit's default place is enough.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "fpdt deps: CUDA toolkit found at /usr/local/cuda (add /usr/local/cuda/bin to PATH to use it outside these scripts)"
fi
