// Device buffers and random bf16 inputs shared by the GPU benchmarks.
#pragma once

#include <fpdt/core/bfloat16.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace fpdt_bench {

// True when a CUDA device answers; benchmarks skip with an error otherwise.
inline bool has_device() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

// cudaMalloc'd bytes, freed on destruction; p is null when the allocation failed.
struct device_mem {
  void* p = nullptr;
  explicit device_mem(std::size_t bytes) {
    if (cudaMalloc(&p, bytes) != cudaSuccess) p = nullptr;
  }
  ~device_mem() { cudaFree(p); }
  device_mem(device_mem const&) = delete;
  device_mem& operator=(device_mem const&) = delete;
};

// Uniform random bf16 values in [-1, 1) (never zeros: they would flatter the timing).
inline void fill_random(void* dst, std::size_t count, std::uint32_t seed) {
  std::vector<fpdt::bfloat16> h(count);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (auto& x : h)
    x = fpdt::bfloat16(dist(gen));
  cudaMemcpy(dst, h.data(), count * sizeof(fpdt::bfloat16), cudaMemcpyHostToDevice);
}

} // namespace fpdt_bench
