// Benchmarks of include/fpdt/core/gemm.hpp (host_gemm) and include/fpdt/core/cblas_gemm.hpp
// (cblas_gemm, only in builds with fpdt::blas, which defines FPDT_HAVE_CBLAS), side by side at the
// same fp32 shapes: squares, and the products the chunked layers run (names in the comments of
// `shapes`). Counter "FLOP/s": 2 M N K per call.
//
// host_gemm runs on one thread (its default, as the layers use it) and on all hardware threads
// (threads = 0). OpenBLAS picks its own thread count: run with OPENBLAS_NUM_THREADS=1 to compare it
// with host_gemm/threads:1. A DYNAMIC_ARCH OpenBLAS that does not recognise the CPU (a VM's CPUID)
// falls back to its generic "Prescott" kernel, several times slower; OPENBLAS_CORETYPE=Haswell or
// SkylakeX selects the right one (OPENBLAS_VERBOSE=2 prints the kernel chosen).
#include <fpdt/core/gemm.hpp>
#if defined(FPDT_HAVE_CBLAS)
#include <fpdt/core/cblas_gemm.hpp>
#endif

#include <benchmark/benchmark.h>

#include <cstddef>
#include <random>
#include <string>
#include <vector>

namespace {

using fpdt::index_t;

#if defined(FPDT_HAVE_CBLAS)
// Said once, in the benchmark's context header, when OpenBLAS runs kernels older than the CPU.
[[maybe_unused]] bool const blas_noted = [] {
  if (std::string const note = fpdt::cblas_kernel_note(); !note.empty()) benchmark::AddCustomContext("cblas", note);
  return true;
}();
#endif

// Arguments: M, N, K, trans_a, trans_b. C = op(A) op(B), beta = 0.
template <class Gemm> void bm_gemm(benchmark::State& state, Gemm gemm) {
  index_t const m = state.range(0), n = state.range(1), k = state.range(2);
  bool const ta = state.range(3) != 0, tb = state.range(4) != 0;
  std::vector<float> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n)),
      c(static_cast<std::size_t>(m * n), 0.0f);
  std::mt19937 gen(3);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto* v : {&a, &b})
    for (float& e : *v) e = dist(gen);
  index_t const lda = ta ? m : k, ldb = tb ? k : n;
  for (auto _ : state) {
    fpdt::status const st = gemm(ta, tb, m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, c.data(), n);
    if (!st.ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    benchmark::ClobberMemory();
  }
  double const flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K", "ta", "tb"});
  b->Args({256, 256, 256, 0, 0});
  b->Args({1024, 1024, 1024, 0, 0});
  b->Args({2048, 1024, 256, 0, 1}); // chunked_mlp up projection x W_up^T: N = 2048, Hd = 256, F = 1024
  b->Args({1024, 256, 2048, 1, 0}); // chunked_mlp dW_up += d(up)^T x over 2048 tokens
  b->Args({1024, 4096, 128, 0, 1}); // chunked_cross_entropy logits x W^T: C = 1024, Hd = 128, V = 4096
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

} // namespace

BENCHMARK_CAPTURE(bm_gemm, host_gemm_1, fpdt::host_gemm{.threads = 1})->Name("core/gemm/host_gemm/threads:1")->Apply(shapes);
BENCHMARK_CAPTURE(bm_gemm, host_gemm_all, fpdt::host_gemm{.threads = 0})->Name("core/gemm/host_gemm/threads:all")->Apply(shapes);
#if defined(FPDT_HAVE_CBLAS)
BENCHMARK_CAPTURE(bm_gemm, cblas_gemm, fpdt::cblas_gemm{})->Name("core/gemm/cblas_gemm")->Apply(shapes);
#endif
