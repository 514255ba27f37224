// Benchmarks of include/fpdt/core/{bfloat16,half}.hpp: float -> 16-bit conversion throughput,
// side by side with a plain float copy of the same elements (the memory-bound ceiling).
#include <fpdt/core/bfloat16.hpp>
#include <fpdt/core/half.hpp>

#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

namespace {

std::vector<float> inputs(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i) * 0.37f - 1000.0f;
  return v;
}

template <class T> void convert_from_float(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const in = inputs(n);
  std::vector<T> out(n);
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) out[i] = T(in[i]);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["elements/s"] = benchmark::Counter(static_cast<double>(n * state.iterations()), benchmark::Counter::kIsRate);
  state.SetBytesProcessed(static_cast<std::int64_t>(n * (sizeof(float) + sizeof(T)) * state.iterations()));
}

void copy_float(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const in = inputs(n);
  std::vector<float> out(n);
  for (auto _ : state) {
    std::memcpy(out.data(), in.data(), n * sizeof(float));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["elements/s"] = benchmark::Counter(static_cast<double>(n * state.iterations()), benchmark::Counter::kIsRate);
  state.SetBytesProcessed(static_cast<std::int64_t>(n * 2 * sizeof(float) * state.iterations()));
}

} // namespace

BENCHMARK(convert_from_float<fpdt::bfloat16>)->RangeMultiplier(16)->Range(4096, 1 << 20);
BENCHMARK(convert_from_float<fpdt::half>)->RangeMultiplier(16)->Range(4096, 1 << 20);
BENCHMARK(copy_float)->RangeMultiplier(16)->Range(4096, 1 << 20);
