// GPU benchmark of the tensor-core chunk kernel: one chunk pair of S = 16K tokens (the whole
// sequence), H = 16, D = 128, bf16, causal and full, forward and backward, timed with CUDA events
// (manual time). Counters: TFLOP/s with the FlashAttention convention (forward 4 S^2 H D, halved
// when causal; backward 2.5x the forward). The same shapes through PyTorch's
// scaled_dot_product_attention are timed by scripts/bench_sdpa_torch.py (scripts/gpu-check.sh
// prints both side by side).
#include <fpdt/attention/cuda/flash_attention.cuh>
#include <fpdt/backend/cuda/cuda_check.hpp>

#include "device_data.cuh"

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using fpdt::index_t;

using fpdt_bench::device_mem;
using fpdt_bench::fill_random;

void bm_flash(benchmark::State& state) {
  index_t const s = state.range(0), h = state.range(1), d = state.range(2);
  bool const causal = state.range(3) != 0, backward = state.range(4) != 0;
  if (!fpdt_bench::has_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  using bf = fpdt::bfloat16;
  std::size_t const n = static_cast<std::size_t>(s * h * d);
  device_mem q(n * 2), k(n * 2), v(n * 2), dout(n * 2), out(n * 4), lse(static_cast<std::size_t>(h * s) * 4),
      delta(static_cast<std::size_t>(h * s) * 4), dq(n * 4), dk(n * 4), dv(n * 4);
  if (!q.p || !k.p || !v.p || !dout.p || !out.p || !lse.p || !delta.p || !dq.p || !dk.p || !dv.p) {
    state.SkipWithError("cudaMalloc failed");
    return;
  }
  fill_random(q.p, n, 1);
  fill_random(k.p, n, 2);
  fill_random(v.p, n, 3);
  fill_random(dout.p, n, 4);
  cudaMemset(dq.p, 0, n * 4);
  cudaMemset(dk.p, 0, n * 4);
  cudaMemset(dv.p, 0, n * 4);
  cudaMemset(delta.p, 0, static_cast<std::size_t>(h * s) * 4);
  std::array<index_t, 3> const ext{s, h, d};
  std::array<index_t, 2> const lext{h, s};
  auto qv = fpdt::contiguous_view(static_cast<bf const*>(q.p), ext).value();
  auto kv = fpdt::contiguous_view(static_cast<bf const*>(k.p), ext).value();
  auto vv = fpdt::contiguous_view(static_cast<bf const*>(v.p), ext).value();
  cudaStream_t stream{};
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  fpdt::cuda_flash_chunk_kernel const kernel{stream};
  fpdt::chunk_forward_args<bf> f{};
  f.q = qv;
  f.k = kv;
  f.v = vv;
  f.out = {fpdt::contiguous_view(static_cast<float*>(out.p), ext).value(),
           fpdt::contiguous_view(static_cast<float*>(lse.p), lext).value()};
  f.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
  fpdt::chunk_backward_args<bf> b{};
  b.q = qv;
  b.k = kv;
  b.v = vv;
  b.dout = fpdt::contiguous_view(static_cast<bf const*>(dout.p), ext).value();
  b.lse = fpdt::contiguous_view(static_cast<float const*>(lse.p), lext).value();
  b.delta = fpdt::contiguous_view(static_cast<float const*>(delta.p), lext).value();
  b.dq = fpdt::contiguous_view(static_cast<float*>(dq.p), ext).value();
  b.dk = fpdt::contiguous_view(static_cast<float*>(dk.p), ext).value();
  b.dv = fpdt::contiguous_view(static_cast<float*>(dv.p), ext).value();
  b.mask = f.mask;
  // The forward gives the real lse the backward needs; also the warm-up.
  if (fpdt::status st = kernel.forward(f); !st.ok()) {
    state.SkipWithError(st.to_string().c_str());
    return;
  }
  auto run = [&] { return backward ? kernel.backward(b) : kernel.forward(f); };
  if (fpdt::status st = run(); !st.ok()) {
    state.SkipWithError(st.to_string().c_str());
    return;
  }
  cudaEvent_t start{}, stop{};
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    fpdt::status const st = run();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    if (!st.ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  if (cudaError_t const err = cudaGetLastError(); err != cudaSuccess)
    state.SkipWithError(cudaGetErrorString(err));
  double flops = 4.0 * static_cast<double>(s) * static_cast<double>(s) * static_cast<double>(h * d);
  if (causal) flops /= 2;
  if (backward) flops *= 2.5;
  state.counters["TFLOP/s"] =
      benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

} // namespace

BENCHMARK(bm_flash)
    ->Name("cuda/attention/flash")
    ->ArgNames({"S", "H", "D", "causal", "bwd"})
    ->ArgsProduct({{16384}, {16}, {128}, {0, 1}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinWarmUpTime(0.2)
    ->MinTime(1.0);
