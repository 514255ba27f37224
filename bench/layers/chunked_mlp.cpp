// Benchmarks of include/fpdt/layers/chunked_mlp.hpp: the chunked MLP's forward and backward on the
// host backend with the default policy (host_gemm, one thread), fp32, GeLU-tanh (GPT-2: biases) and
// SwiGLU (LLaMA: no biases), F = 4 Hd, over N tokens in chunks of C (C = N: one chunk; C < N: the
// [C, F] intermediate is formed, and in the backward recomputed, chunk by chunk).
//
// Counter "FLOP/s": the matrix products the pass executes, 2 N Hd F each, the backward's
// recomputation of the intermediate included (elementwise work is not counted):
//   forward   GeLU: up, down                                          = 2 products ->  4 N Hd F
//             SwiGLU: up, gate, down                                  = 3 products ->  6 N Hd F
//   backward  GeLU: up (recompute), dW_down, d(act), dW_up, dx        = 5 products -> 10 N Hd F
//             SwiGLU: up, gate (recompute), dW_down, d(act), dW_up, dx, dW_gate, dx += ...
//                                                                     = 8 products -> 16 N Hd F
// Divide by the single-thread share of core/fp32_fma_peak, or compare with core/gemm/host_gemm at
// the same shapes, for the layer's overhead over its products. Counter "workspace_MiB": the arena
// bytes the pass holds at its peak (independent of N once C < N).
#include <fpdt/layers/chunked_mlp.hpp>
#include <fpdt/layers/host_defaults.hpp>

#include <benchmark/benchmark.h>

#include <array>
#include <cstddef>
#include <random>
#include <vector>

namespace {

using fpdt::index_t;

struct mlp_problem {
  index_t n, hd, f;
  bool swiglu;
  std::vector<float> x, dy, y, dx, w_up, w_gate, w_down, b_up, b_down, g_up, g_gate, g_down, gb_up, gb_down;

  mlp_problem(index_t n_, index_t hd_, bool swiglu_) : n(n_), hd(hd_), f(4 * hd_), swiglu(swiglu_) {
    auto const sz = [](index_t a, index_t b) { return static_cast<std::size_t>(a * b); };
    std::mt19937 gen(7);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    auto fill = [&](std::vector<float>& v, std::size_t count, float scale) {
      v.resize(count);
      for (float& e : v) e = scale * dist(gen);
    };
    fill(x, sz(n, hd), 1.0f);
    fill(dy, sz(n, hd), 1.0f);
    fill(w_up, sz(f, hd), 0.02f);
    fill(w_down, sz(hd, f), 0.02f);
    if (swiglu) fill(w_gate, sz(f, hd), 0.02f);
    else {
      fill(b_up, static_cast<std::size_t>(f), 0.02f);
      fill(b_down, static_cast<std::size_t>(hd), 0.02f);
    }
    y.assign(sz(n, hd), 0.0f);
    dx.assign(sz(n, hd), 0.0f);
    g_up.assign(w_up.size(), 0.0f);
    g_gate.assign(w_gate.size(), 0.0f);
    g_down.assign(w_down.size(), 0.0f);
    gb_up.assign(b_up.size(), 0.0f);
    gb_down.assign(b_down.size(), 0.0f);
  }

  template <class T> static fpdt::tensor_view<T, 2> mat(std::vector<float>& v, index_t rows, index_t cols) {
    if (v.empty()) return {};
    return *fpdt::contiguous_view<T, 2>(v.data(), {rows, cols});
  }
  template <class T> static fpdt::tensor_view<T, 1> vec(std::vector<float>& v) {
    if (v.empty()) return {};
    return *fpdt::contiguous_view<T, 1>(v.data(), {static_cast<index_t>(v.size())});
  }
  fpdt::mlp_weights<float> weights() {
    return {mat<float const>(w_up, f, hd), mat<float const>(w_gate, f, hd), mat<float const>(w_down, hd, f),
            vec<float const>(b_up), vec<float const>(b_down)};
  }
  fpdt::mlp_gradients<float> gradients() {
    return {mat<float>(g_up, f, hd), mat<float>(g_gate, f, hd), mat<float>(g_down, hd, f), vec<float>(gb_up),
            vec<float>(gb_down)};
  }
};

// Arguments: N, Hd, C (F = 4 Hd). `backward` selects the pass.
void bm_mlp(benchmark::State& state, fpdt::mlp_activation act, bool backward) {
  index_t const n = state.range(0), hd = state.range(1), c = state.range(2);
  bool const swiglu = act == fpdt::mlp_activation::swiglu;
  mlp_problem p(n, hd, swiglu);
  fpdt::host_backend be;
  auto mlp = fpdt::chunked_mlp<float>::create(be, {hd, p.f, act}, {.chunk = c});
  if (!mlp) {
    state.SkipWithError(mlp.error().to_string().c_str());
    return;
  }
  auto const w = p.weights();
  auto const g = p.gradients();
  auto const x = mlp_problem::mat<float const>(p.x, n, hd);
  auto const dy = mlp_problem::mat<float const>(p.dy, n, hd);
  auto const y = mlp_problem::mat<float>(p.y, n, hd);
  auto const dx = mlp_problem::mat<float>(p.dx, n, hd);
  for (auto _ : state) {
    fpdt::status const st = backward ? mlp->backward(w, x, dy, dx, g) : mlp->forward(w, x, y);
    if (!st.ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    benchmark::ClobberMemory();
  }
  double const products = backward ? (swiglu ? 8 : 5) : (swiglu ? 3 : 2);
  double const flops = products * 2.0 * static_cast<double>(n) * static_cast<double>(hd) * static_cast<double>(p.f);
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["workspace_MiB"] =
      static_cast<double>(backward ? mlp->backward_workspace_bytes(n) : mlp->forward_workspace_bytes(n)) / (1 << 20);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "Hd", "C"});
  for (std::array<index_t, 2> const s : {std::array<index_t, 2>{512, 128}, std::array<index_t, 2>{2048, 256}})
    for (index_t c : {s[0], s[0] / 4}) b->Args({s[0], s[1], c});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

} // namespace

BENCHMARK_CAPTURE(bm_mlp, gelu_fwd, fpdt::mlp_activation::gelu_tanh, false)
    ->Name("layers/chunked_mlp/gelu/fwd")
    ->Apply(shapes);
BENCHMARK_CAPTURE(bm_mlp, gelu_bwd, fpdt::mlp_activation::gelu_tanh, true)
    ->Name("layers/chunked_mlp/gelu/bwd")
    ->Apply(shapes);
BENCHMARK_CAPTURE(bm_mlp, swiglu_fwd, fpdt::mlp_activation::swiglu, false)
    ->Name("layers/chunked_mlp/swiglu/fwd")
    ->Apply(shapes);
BENCHMARK_CAPTURE(bm_mlp, swiglu_bwd, fpdt::mlp_activation::swiglu, true)
    ->Name("layers/chunked_mlp/swiglu/bwd")
    ->Apply(shapes);
