// Benchmarks of include/fpdt/backend/cuda/cuda_backend.hpp: pinned host <-> device copies through
// cuda_backend::copy_async (a pinned_pool block and a device_arena block, on an h2d or d2h lane
// stream) beside a bare cudaMemcpyAsync between a raw cudaHostAlloc buffer and a raw cudaMalloc
// buffer on a plain stream. Each pair runs side by side in one process; the ratio is the
// backend's overhead. Timed with CUDA events around the copy alone (manual time).
#include <fpdt/backend/cuda/cuda_backend.hpp>

#include <benchmark/benchmark.h>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace {

enum class direction { h2d, d2h };

// Times one enqueued copy per iteration with two events on `stream`. `copy` returns true on
// success.
template <class Copy>
void time_copies(benchmark::State& state, cudaStream_t stream, std::size_t bytes, Copy copy) {
  cudaEvent_t start = nullptr, stop = nullptr;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
    state.SkipWithError("cudaEventCreate failed");
    return;
  }
  for (auto _ : state) {
    float ms = 0;
    if (cudaEventRecord(start, stream) != cudaSuccess || !copy() ||
        cudaEventRecord(stop, stream) != cudaSuccess || cudaEventSynchronize(stop) != cudaSuccess ||
        cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) {
      state.SkipWithError("copy failed");
      break;
    }
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

void fpdt_copy(benchmark::State& state, direction dir, std::size_t bytes) {
  auto be = fpdt::cuda_backend::create();
  if (!be.ok()) {
    state.SkipWithError(be.error().to_string().c_str());
    return;
  }
  fpdt::cuda_backend& b = **be;
  auto s = b.create_stream(dir == direction::h2d ? fpdt::lane::h2d : fpdt::lane::d2h);
  auto dev = b.device_memory().allocate(bytes, "benchmark buffer");
  auto host = b.pinned_memory().acquire(bytes);
  if (!s.ok() || !dev.ok() || !host.ok()) {
    state.SkipWithError("setup failed");
    return;
  }
  std::memset(host->data(), 0x5a, bytes);
  if (cudaMemset(dev->data(), 0x5a, bytes) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    state.SkipWithError("cudaMemset failed");
    return;
  }
  void* dst = dir == direction::h2d ? dev->data() : host->data();
  void const* src = dir == direction::h2d ? host->data() : dev->data();
  time_copies(state, s->native_handle(), bytes,
              [&] { return b.copy_async(dst, src, bytes, *s).ok(); });
}

void bare_copy(benchmark::State& state, direction dir, std::size_t bytes) {
  void* host = nullptr;
  void* dev = nullptr;
  cudaStream_t stream = nullptr;
  if (cudaHostAlloc(&host, bytes, cudaHostAllocDefault) != cudaSuccess ||
      cudaMalloc(&dev, bytes) != cudaSuccess || cudaStreamCreate(&stream) != cudaSuccess ||
      cudaMemset(dev, 0x5a, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    state.SkipWithError("no usable CUDA device (cudaHostAlloc, cudaMalloc or cudaStreamCreate "
                        "failed)");
  } else {
    std::memset(host, 0x5a, bytes);
    void* dst = dir == direction::h2d ? dev : host;
    void const* src = dir == direction::h2d ? host : dev;
    time_copies(state, stream, bytes, [&] {
      return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream) == cudaSuccess;
    });
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
  if (dev != nullptr) cudaFree(dev);
  if (host != nullptr) cudaFreeHost(host);
  (void)cudaGetLastError();
}

// "cuda/copy/<dir>/<kind>/<mib>MiB" (appends only: GCC 12's -Wrestrict misfires on operator+).
std::string bench_name(direction dir, char const* kind, std::size_t mib) {
  std::string name = "cuda/copy/";
  name += dir == direction::h2d ? "h2d" : "d2h";
  name += '/';
  name += kind;
  name += '/';
  name += std::to_string(mib);
  name += "MiB";
  return name;
}

// Registers the benchmarks, each fpdt/bare pair side by side.
int register_copies() {
  for (direction const dir : {direction::h2d, direction::d2h})
    for (std::size_t const mib : {64, 256}) {
      std::size_t const bytes = mib << 20;
      benchmark::RegisterBenchmark(bench_name(dir, "fpdt", mib).c_str(), fpdt_copy, dir, bytes)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(bench_name(dir, "bare", mib).c_str(), bare_copy, dir, bytes)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  return 0;
}

[[maybe_unused]] int const registered = register_copies();

} // namespace
