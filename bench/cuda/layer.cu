// GPU benchmark of the FPDT attention layer (fpdt_attention on cuda_backend, tensor-core kernel):
// forward + backward of one layer with offload on (inactive chunks in pinned host memory, fetched
// back on the h2d lane while compute runs) versus off (every chunk resident), side by side in one
// run. Shape: C = 64K tokens, S = 4C, H = H_kv = 8 (a rank's share of 32 heads at P = 4), D = 128,
// bf16, causal. Wall time of forward + backward per iteration (each pass ends with its lanes
// synchronized). Counters: TFLOP/s (forward 4 S^2 H D / 2, backward 2.5x), device peak bytes of
// the layer's arena, pinned host bytes, and from the backward's trace (event-timed) the share of
// copy time hidden behind compute and the compute lane's busy share. FPDT_BENCH_LAYER_CHUNK
// overrides C (tokens); FPDT_BENCH_TRACE_DIR=DIR writes the offload run's backward trace there.
#include <fpdt/fpdt.cuh>

#include "device_data.cuh"

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

using fpdt::index_t;

using fpdt_bench::device_mem;
using fpdt_bench::fill_random;

index_t chunk_tokens() {
  char const* e = std::getenv("FPDT_BENCH_LAYER_CHUNK");
  long long const c = e ? std::atoll(e) : 0;
  return c > 0 ? static_cast<index_t>(c) : index_t{65536};
}

void bm_layer(benchmark::State& state) {
  bool const offload = state.range(0) != 0;
  index_t const c = chunk_tokens(), s = 4 * c, h = 8, d = 128;
  state.SetLabel("C=" + std::to_string(c) + " S=" + std::to_string(s));
  if (!fpdt_bench::has_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  using bf = fpdt::bfloat16;
  std::size_t const n = static_cast<std::size_t>(s * h * d);
  device_mem q(n * 2), k(n * 2), v(n * 2), dout(n * 2), out(n * 2), lse(static_cast<std::size_t>(h * s) * 4),
      dq(n * 4), dk(n * 4), dv(n * 4);
  if (!q.p || !k.p || !v.p || !dout.p || !out.p || !lse.p || !dq.p || !dk.p || !dv.p) {
    state.SkipWithError("cudaMalloc failed");
    return;
  }
  fill_random(q.p, n, 1);
  fill_random(k.p, n, 2);
  fill_random(v.p, n, 3);
  fill_random(dout.p, n, 4);
  auto be = fpdt::cuda_backend::create();
  if (!be) {
    state.SkipWithError(be.error().to_string().c_str());
    return;
  }
  fpdt::fpdt_attention_options o;
  o.chunk = c;
  o.offload = offload;
  auto layer = fpdt::fpdt_attention<bf, fpdt::cuda_backend, fpdt::cuda_flash_chunk_kernel>::create(
      **be, {s, h, h, d}, o);
  if (!layer) {
    state.SkipWithError(layer.error().to_string().c_str());
    return;
  }
  std::array<index_t, 3> const ext{s, h, d};
  auto qv = fpdt::contiguous_view(static_cast<bf const*>(q.p), ext).value();
  auto kv = fpdt::contiguous_view(static_cast<bf const*>(k.p), ext).value();
  auto vv = fpdt::contiguous_view(static_cast<bf const*>(v.p), ext).value();
  auto ov = fpdt::contiguous_view(static_cast<bf*>(out.p), ext).value();
  auto lv = fpdt::contiguous_view(static_cast<float*>(lse.p), std::array<index_t, 2>{h, s}).value();
  auto dov = fpdt::contiguous_view(static_cast<bf const*>(dout.p), ext).value();
  auto dqv = fpdt::contiguous_view(static_cast<float*>(dq.p), ext).value();
  auto dkv = fpdt::contiguous_view(static_cast<float*>(dk.p), ext).value();
  auto dvv = fpdt::contiguous_view(static_cast<float*>(dv.p), ext).value();
  // The fills ran on the legacy stream; the layer's lanes are non-blocking streams.
  if (cudaDeviceSynchronize() != cudaSuccess) {
    state.SkipWithError("cudaDeviceSynchronize after the fills failed");
    return;
  }
  auto step = [&]() -> fpdt::status {
    FPDT_TRY(layer->forward(qv, kv, vv, ov, lv));
    return layer->backward(dov, dqv, dkv, dvv);
  };
  if (fpdt::status st = step(); !st.ok()) { // warm-up: pinned pool, streams, kernel attributes
    state.SkipWithError(st.to_string().c_str());
    return;
  }
  for (auto _ : state) {
    auto const t0 = std::chrono::steady_clock::now();
    fpdt::status const st = step();
    auto const t1 = std::chrono::steady_clock::now();
    if (!st.ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  double const flops = 3.5 * 4.0 * static_cast<double>(s) * static_cast<double>(s) *
                       static_cast<double>(h * d) / 2;
  state.counters["TFLOP/s"] =
      benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["device_peak_bytes"] =
      static_cast<double>((*be)->device_memory().stats().peak_bytes);
  state.counters["pinned_bytes"] = static_cast<double>(layer->host_bytes());
  // The backward (the last pass) from the executor's event timing: how much of the copy lanes'
  // busy time ran while compute was busy, and the trace itself for Perfetto when asked for.
  fpdt::pipeline_trace const& tr = layer->trace();
  double const copy_us = tr.busy_us(fpdt::lane::h2d) + tr.busy_us(fpdt::lane::d2h);
  state.counters["bwd_copy_hidden"] = copy_us > 0 ? tr.overlap_us() / copy_us : 1.0;
  state.counters["bwd_compute_busy"] = tr.span_us() > 0 ? tr.busy_us(fpdt::lane::compute) / tr.span_us() : 0.0;
  if (char const* dir = std::getenv("FPDT_BENCH_TRACE_DIR"); dir != nullptr && offload)
    (void)tr.write_chrome_json(std::string(dir) + "/fpdt-layer-backward-trace.json");
}

} // namespace

BENCHMARK(bm_layer)
    ->Name("cuda/layer/fpdt")
    ->ArgNames({"offload"})
    ->Args({1})
    ->Args({0})
    ->Args({1})
    ->Args({0})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2);
