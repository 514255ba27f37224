// The machine's fp32 FMA ceiling, measured (docs/design.md 5: ceilings are measured once):
// independent chains of fused multiply-adds on all host threads, counted as 2 FLOP each. Kernel
// benchmarks divide their FLOP/s by this to report the fraction of peak.
#include <fpdt/core/parallel_for.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <vector>

namespace {

constexpr int lanes = 16 * 16; // 16 vectors of chains: twice what 2 FMA ports x 4 cycles latency need
constexpr long steps = 1 << 20; // ~3 ms per thread: thread start-up is noise

float fma_chains(float seed) {
  float acc[lanes];
  for (int i = 0; i < lanes; ++i) acc[i] = seed + static_cast<float>(i);
  float const a = 0.999999f, b = 1e-7f;
  for (long s = 0; s < steps; ++s)
    for (int i = 0; i < lanes; ++i) acc[i] = acc[i] * a + b;
  float sum = 0;
  for (int i = 0; i < lanes; ++i) sum += acc[i];
  return sum;
}

void fp32_fma_peak(benchmark::State& state) {
  unsigned const threads = fpdt::resolve_threads(0);
  std::vector<float> sink(threads);
  for (auto _ : state) {
    auto r = fpdt::parallel_for(threads, threads, [&](std::size_t i, unsigned) { sink[i] = fma_chains(static_cast<float>(i)); });
    benchmark::DoNotOptimize(sink.data());
    if (!r.ok()) state.SkipWithError("parallel_for failed");
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * lanes * steps * threads * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

} // namespace

BENCHMARK(fp32_fma_peak)->UseRealTime()->Unit(benchmark::kMillisecond);
