# Sourced by the other scripts: puts the CUDA toolkit on PATH when it sits in its default place.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
