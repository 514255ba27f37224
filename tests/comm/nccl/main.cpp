// Main of the NCCL tests: runs doctest only when a CUDA device answers; otherwise exits with 77,
// which ctest reports as "Skipped" (SKIP_RETURN_CODE), never as passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  cudaError_t const err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("fpdt-nccl-tests: skipped, no CUDA device (%s)\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
