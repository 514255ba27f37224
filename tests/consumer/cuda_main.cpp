// Consumer of fpdt::cuda from a plain C++ file: the CUDA runtime headers and library come with it.
#include <fpdt/backend/cuda/cuda_check.hpp>

#include <cstdio>

namespace {
fpdt::status version(int& v) {
  FPDT_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return {};
}
} // namespace

int main() {
  int v = 0;
  fpdt::status s = version(v);
  std::printf("consumer_cuda ok: CUDA runtime %d (%s)\n", v, s.to_string().c_str());
  return s.ok() ? 0 : 1;
}
