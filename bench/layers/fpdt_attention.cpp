// The FPDT attention layer's forward + backward on the host backend with offload on (chunks in
// pinned host memory, fetched back through a 2-slot staging ring on the copy lanes) versus the same
// chunked compute with offload off (every chunk resident), side by side. Target (issue 4): offload
// on <= 1.10x offload off. Counter: attention GFLOP/s (forward 4 S^2 H D / 2 causal, backward 2.5x).
#include <fpdt/layers/fpdt_attention.hpp>
#include <fpdt/layers/host_defaults.hpp>

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

namespace {

using fpdt::index_t;

void bm_layer(benchmark::State& state) {
  index_t const s = state.range(0), c = state.range(1);
  bool const offload = state.range(2) != 0;
  index_t const h = 8, hkv = 2, d = 64;
  std::vector<float> q(static_cast<std::size_t>(s * h * d)), k(static_cast<std::size_t>(s * hkv * d)),
      v(k.size()), out(q.size()), dout(q.size()), dq(q.size()), dk(k.size()), dv(k.size());
  std::mt19937 gen(1);
  std::normal_distribution<float> n;
  for (auto* x : {&q, &k, &v, &dout})
    for (float& e : *x)
      e = n(gen);
  std::array<index_t, 3> const qe{s, h, d}, ke{s, hkv, d};
  auto qv = fpdt::contiguous_view<float const>(q.data(), qe).value();
  auto kv = fpdt::contiguous_view<float const>(k.data(), ke).value();
  auto vv = fpdt::contiguous_view<float const>(v.data(), ke).value();
  auto ov = fpdt::contiguous_view(out.data(), qe).value();
  auto dov = fpdt::contiguous_view<float const>(dout.data(), qe).value();
  auto dqv = fpdt::contiguous_view(dq.data(), qe).value();
  auto dkv = fpdt::contiguous_view(dk.data(), ke).value();
  auto dvv = fpdt::contiguous_view(dv.data(), ke).value();
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {s, h, hkv, d}, {.chunk = c, .offload = offload});
  if (!layer) {
    state.SkipWithError(layer.error().to_string().c_str());
    return;
  }
  for (auto _ : state) {
    fpdt::status st = layer->forward(qv, kv, vv, ov);
    if (st.ok()) st = layer->backward(dov, dqv, dkv, dvv);
    if (!st.ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
  }
  double const flops = 4.0 * static_cast<double>(s) * static_cast<double>(s) * static_cast<double>(h * d) / 2 * 3.5;
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["device_peak_MiB"] =
      static_cast<double>(be.device_memory().stats().peak_bytes) / (1 << 20);
  auto const& t = layer->trace(); // of the last backward
  state.counters["copy_hidden_%"] =
      t.busy_us(fpdt::lane::h2d) + t.busy_us(fpdt::lane::d2h) > 0
          ? 100.0 * t.overlap_us() / (t.busy_us(fpdt::lane::h2d) + t.busy_us(fpdt::lane::d2h))
          : 0.0;
}

} // namespace

BENCHMARK(bm_layer)
    ->Name("layers/fpdt_attention/fwd_bwd")
    ->ArgNames({"S", "C", "offload"})
    ->Args({2048, 256, 0})
    ->Args({2048, 256, 1})
    ->Args({4096, 512, 0})
    ->Args({4096, 512, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
