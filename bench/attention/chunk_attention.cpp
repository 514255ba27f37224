// Benchmarks of include/fpdt/attention/host/chunk_attention.hpp: the host chunk kernel forward and
// backward on one chunk pair, S = Sq = Sk in 1K..8K, H = 8, D in {64, 128}, fp32 and bf16, full and
// causal. Counter "FLOP/s": forward 4 S^2 H D, backward 2.5x that, halved for causal (docs/design.md 5).
// scripts/bench_attention_vs_torch.py runs these beside PyTorch's CPU scaled_dot_product_attention.
#include <fpdt/attention/host/chunk_attention.hpp>
#include <fpdt/core/bfloat16.hpp>

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

namespace {

using fpdt::index_t;

template <class T> struct problem {
  index_t s, h, d;
  std::vector<T> q, k, v, dout, out_t;
  std::vector<float> out, lse, delta, dq, dk, dv;

  problem(index_t s_, index_t h_, index_t d_) : s(s_), h(h_), d(d_) {
    std::size_t const n = static_cast<std::size_t>(s * h * d);
    std::mt19937 rng(42);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (auto* x : {&q, &k, &v, &dout}) {
      x->resize(n);
      for (auto& e : *x) e = T(dist(rng));
    }
    out.assign(n, 0.0f);
    out_t.assign(n, T(0.0f));
    dq.assign(n, 0.0f);
    dk.assign(n, 0.0f);
    dv.assign(n, 0.0f);
    lse.assign(static_cast<std::size_t>(h * s), 0.0f);
    delta.assign(static_cast<std::size_t>(h * s), 0.0f);
  }
  auto view(std::vector<T> const& x) const { return *fpdt::contiguous_view<T const, 3>(x.data(), {s, h, d}); }
  auto view(std::vector<float>& x) { return *fpdt::contiguous_view<float, 3>(x.data(), {s, h, d}); }
  auto lse_view() { return *fpdt::contiguous_view<float, 2>(lse.data(), {h, s}); }
};

double attention_flops(index_t s, index_t h, index_t d, bool causal) {
  double const f = 4.0 * static_cast<double>(s) * static_cast<double>(s) * static_cast<double>(h) * static_cast<double>(d);
  return causal ? f / 2 : f;
}

// Arguments: S, D, causal (0/1). H = 8.
template <class T> void chunk_forward(benchmark::State& state) {
  index_t const s = state.range(0), d = state.range(1), h = 8;
  bool const causal = state.range(2) != 0;
  problem<T> p(s, h, d);
  fpdt::host_chunk_kernel kernel{};
  fpdt::chunk_forward_args<T> args{p.view(p.q), p.view(p.k), p.view(p.v),
                                   fpdt::partial_view{p.view(p.out), p.lse_view()},
                                   causal ? fpdt::causal_mask : fpdt::full_mask};
  for (auto _ : state) {
    if (!kernel.forward(args).ok()) {
      state.SkipWithError("forward failed");
      break;
    }
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(attention_flops(s, h, d, causal) * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
}

template <class T> void chunk_backward(benchmark::State& state) {
  index_t const s = state.range(0), d = state.range(1), h = 8;
  bool const causal = state.range(2) != 0;
  problem<T> p(s, h, d);
  fpdt::host_chunk_kernel kernel{};
  auto const mask = causal ? fpdt::causal_mask : fpdt::full_mask;
  fpdt::chunk_forward_args<T> fwd{p.view(p.q), p.view(p.k), p.view(p.v), fpdt::partial_view{p.view(p.out), p.lse_view()}, mask};
  if (!kernel.forward(fwd).ok()) {
    state.SkipWithError("forward failed");
    return;
  }
  for (std::size_t i = 0; i < p.out.size(); ++i) p.out_t[i] = T(p.out[i]);
  auto delta = *fpdt::contiguous_view<float, 2>(p.delta.data(), {h, s});
  if (!fpdt::compute_delta(p.view(p.out_t), p.view(p.dout), delta).ok()) {
    state.SkipWithError("delta failed");
    return;
  }
  fpdt::chunk_backward_args<T> args{p.view(p.q), p.view(p.k), p.view(p.v), p.view(p.out_t), p.view(p.dout),
                                    *fpdt::contiguous_view<float const, 2>(p.lse.data(), {h, s}),
                                    *fpdt::contiguous_view<float const, 2>(p.delta.data(), {h, s}),
                                    p.view(p.dq), p.view(p.dk), p.view(p.dv), mask};
  for (auto _ : state) {
    if (!kernel.backward(args).ok()) {
      state.SkipWithError("backward failed");
      break;
    }
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.5 * attention_flops(s, h, d, causal) * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"S", "D", "causal"});
  for (index_t causal : {0, 1})
    for (index_t d : {64, 128})
      for (index_t s : {1024, 2048, 4096, 8192}) b->Args({s, d, causal});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

} // namespace

BENCHMARK_TEMPLATE(chunk_forward, float)->Apply(shapes);
BENCHMARK_TEMPLATE(chunk_forward, fpdt::bfloat16)->Apply(shapes);
BENCHMARK_TEMPLATE(chunk_backward, float)->Apply(shapes);
BENCHMARK_TEMPLATE(chunk_backward, fpdt::bfloat16)->Apply(shapes);
