// Benchmarks of include/fpdt/layers/chunked_cross_entropy.hpp: LM head + cross-entropy loss + its
// gradient (forward_backward, one rank) on the host backend with the default policy (host_gemm, one
// thread), fp32, reduction mean, every label valid, N tokens in chunks of C (C = N: the [N, V]
// logits at once; C < N: a [C, V] buffer reused chunk by chunk).
//
// Counters: "tokens/s"; "FLOP/s" counts the three products per token, logits x W^T, dx = dlogits W
// and dW += dlogits^T x, 2 Hd V each: 6 N Hd V (the softmax's exp and log, about 2 N V of them in
// double, are not counted); "workspace_MiB": the logits buffer the call holds, V min(C, N) floats.
#include <fpdt/layers/chunked_cross_entropy.hpp>
#include <fpdt/layers/host_defaults.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace {

using fpdt::index_t;

// Arguments: N, Hd, V, C.
void bm_cross_entropy(benchmark::State& state) {
  index_t const n = state.range(0), hd = state.range(1), v = state.range(2), c = state.range(3);
  std::size_t const nh = static_cast<std::size_t>(n * hd), vh = static_cast<std::size_t>(v * hd);
  std::vector<float> x(nh), w(vh), dx(nh, 0.0f), dw(vh, 0.0f);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  std::mt19937 gen(11);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& e : x) e = dist(gen);
  for (float& e : w) e = 0.02f * dist(gen);
  std::uniform_int_distribution<std::int32_t> label(0, static_cast<std::int32_t>(v - 1));
  for (auto& l : labels) l = label(gen);
  fpdt::host_backend be;
  auto ce = fpdt::chunked_cross_entropy<float>::create(be, hd, v, {.chunk = c});
  if (!ce) {
    state.SkipWithError(ce.error().to_string().c_str());
    return;
  }
  auto const xv = *fpdt::contiguous_view<float const, 2>(x.data(), {n, hd});
  auto const wv = *fpdt::contiguous_view<float const, 2>(w.data(), {v, hd});
  auto const dxv = *fpdt::contiguous_view<float, 2>(dx.data(), {n, hd});
  auto const dwv = *fpdt::contiguous_view<float, 2>(dw.data(), {v, hd});
  std::span<std::int32_t const> const lv(labels);
  double loss = 0.0;
  for (auto _ : state) {
    auto r = ce->forward_backward(xv, wv, lv, dxv, dwv);
    if (!r) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    loss = r->loss; // read after the loop (benchmark 1.7's DoNotOptimize on a double miscompiles with g++ 12 -O3)
    benchmark::ClobberMemory();
  }
  double const flops = 6.0 * static_cast<double>(n) * static_cast<double>(hd) * static_cast<double>(v);
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["workspace_MiB"] = static_cast<double>(ce->workspace_bytes(n)) / (1 << 20);
  state.counters["loss"] = loss; // about ln V for these logits: a sanity check, not a timing
}

} // namespace

BENCHMARK(bm_cross_entropy)
    ->Name("layers/chunked_cross_entropy/fwd_bwd")
    ->ArgNames({"N", "Hd", "V", "C"})
    ->Args({1024, 128, 4096, 1024})
    ->Args({1024, 128, 4096, 256})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
