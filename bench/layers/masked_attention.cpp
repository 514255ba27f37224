// Masks that leave work out (issue 19): packed documents and a causal sliding window beside plain
// causal attention at the same S and C, forward + backward of the FPDT layer on the host backend,
// P = 1 (fpdt_attention) and P = 4 (sequence_parallel_attention, four rank threads of one process).
// The schedule skips chunk pairs the mask leaves empty and the kernel skips tiles; the goal is a
// speed-up of at least 70% of the ideal one, the causal mask's visible pairs over this mask's.
// Counters: visible (this mask's visible (query, key) pairs over the causal mask's), ideal_speedup
// (1 / visible), GFLOP/s of visible work (forward 4 x pairs x H x D, backward 2.5x), device peak.
// Compare the rows of one run: speed-up = causal time / masked time.
#include <fpdt/comm/communicator.hpp>
#include <fpdt/layers/fpdt_attention.hpp>
#include <fpdt/layers/host_defaults.hpp>
#include <fpdt/layers/sequence_parallel_attention.hpp>
#include <fpdt/schedule/token_layout.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <thread>
#include <vector>

namespace {

using fpdt::index_t;

// 0: causal; 1: documents of `doc` tokens; 2: causal window of `doc` tokens.
struct mask_case {
  fpdt::attention_mask mask;
  std::vector<index_t> offsets;
};
mask_case make_mask(index_t s, int kind, index_t doc) {
  mask_case m{fpdt::causal_mask, {}};
  if (kind == 1) {
    m.offsets = fpdt::document_offsets_from_lengths(std::vector<index_t>(static_cast<std::size_t>(s / doc), doc)).value();
    m.mask = fpdt::with_documents(fpdt::causal_mask, m.offsets);
  } else if (kind == 2) {
    m.mask = fpdt::causal_window_mask(doc);
  }
  return m;
}

std::vector<float> random_vec(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& e : v) e = d(gen);
  return v;
}

void counters(benchmark::State& state, fpdt::attention_mask const& m, index_t s, index_t h, index_t d) {
  double const pairs = m.visible_pairs(0, s, 0, s);
  double const frac = pairs / fpdt::causal_mask.visible_pairs(0, s, 0, s);
  state.counters["visible"] = frac;
  state.counters["ideal_speedup"] = 1.0 / frac;
  double const flops = 4.0 * pairs * static_cast<double>(h * d) * 3.5;
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// One rank: S, C, mask kind, document (or window) tokens.
void bm_one_rank(benchmark::State& state) {
  index_t const s = state.range(0), c = state.range(1), doc = state.range(3);
  int const kind = static_cast<int>(state.range(2));
  index_t const h = 1, hkv = 1, d = 64;
  mask_case const mc = make_mask(s, kind, doc);
  auto q = random_vec(static_cast<std::size_t>(s * h * d), 1), k = random_vec(static_cast<std::size_t>(s * hkv * d), 2),
       v = random_vec(k.size(), 3), dout = random_vec(q.size(), 4);
  std::vector<float> out(q.size()), dq(q.size()), dk(k.size()), dv(k.size());
  std::array<index_t, 3> const qe{s, h, d}, ke{s, hkv, d};
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {s, h, hkv, d}, {.chunk = c, .mask = mc.mask});
  if (!layer) {
    state.SkipWithError(layer.error().to_string().c_str());
    return;
  }
  for (auto _ : state) {
    fpdt::status st = layer->forward(fpdt::contiguous_view<float const>(q.data(), qe).value(),
                                     fpdt::contiguous_view<float const>(k.data(), ke).value(),
                                     fpdt::contiguous_view<float const>(v.data(), ke).value(),
                                     fpdt::contiguous_view(out.data(), qe).value());
    if (st.ok())
      st = layer->backward(fpdt::contiguous_view<float const>(dout.data(), qe).value(),
                           fpdt::contiguous_view(dq.data(), qe).value(), fpdt::contiguous_view(dk.data(), ke).value(),
                           fpdt::contiguous_view(dv.data(), ke).value());
    if (!st.ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
  }
  counters(state, mc.mask, s, h, d);
  state.counters["device_peak_MiB"] = static_cast<double>(be.device_memory().stats().peak_bytes) / (1 << 20);
}

// P = 4 rank threads, each with its own host backend and a one-thread kernel.
void bm_four_ranks(benchmark::State& state) {
  index_t const s = state.range(0), c = state.range(1), doc = state.range(3), ranks = 4;
  int const kind = static_cast<int>(state.range(2));
  index_t const h = 4, hkv = 4, d = 64, local = s / ranks;
  mask_case const mc = make_mask(s, kind, doc);
  std::array<index_t, 3> const qe{local, h, d}, ke{local, hkv, d};
  std::vector<std::vector<float>> in(4);
  for (unsigned i = 0; i < 4; ++i) in[i] = random_vec(static_cast<std::size_t>(local * h * d), 10 + i);
  for (auto _ : state) {
    fpdt::local_world world(static_cast<int>(ranks), std::chrono::seconds(600));
    std::vector<fpdt::status> st(static_cast<std::size_t>(ranks));
    std::vector<std::thread> ts;
    for (index_t r = 0; r < ranks; ++r)
      ts.emplace_back([&, r] {
        auto comm = world.communicator(static_cast<int>(r)).value();
        fpdt::host_backend be;
        auto layer = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(
            be, comm, {s, h, hkv, d}, {.chunk = c, .mask = mc.mask}, 0, fpdt::host_chunk_kernel{1});
        auto& x = st[static_cast<std::size_t>(r)];
        if (!layer) {
          x = layer.error();
          return;
        }
        std::vector<float> out(in[0].size()), dq(out.size()), dk(out.size()), dv(out.size());
        auto cv = [&](unsigned i) { return fpdt::contiguous_view<float const>(in[i].data(), qe).value(); };
        x = layer->forward(cv(0), cv(1), cv(2), fpdt::contiguous_view(out.data(), qe).value());
        if (x.ok())
          x = layer->backward(cv(3), fpdt::contiguous_view(dq.data(), qe).value(),
                              fpdt::contiguous_view(dk.data(), ke).value(), fpdt::contiguous_view(dv.data(), ke).value());
      });
    for (auto& t : ts) t.join();
    for (auto const& x : st)
      if (!x.ok()) {
        state.SkipWithError(x.to_string().c_str());
        return;
      }
  }
  counters(state, mc.mask, s, h, d);
}

} // namespace

// The sizes on one rank: S = 65536, C = 4096; 64 documents of 1024; a window of 4096.
BENCHMARK(bm_one_rank)
    ->Name("layers/masked_attention/P1")
    ->ArgNames({"S", "C", "mask", "doc"})
    ->Args({65536, 4096, 0, 0})
    ->Args({65536, 4096, 1, 1024})
    ->Args({65536, 4096, 2, 4096})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// Four ranks at S = 16384 (the two cores of the CI machine run all four): 16 documents of 1024,
// a window of 1024.
BENCHMARK(bm_four_ranks)
    ->Name("layers/masked_attention/P4")
    ->ArgNames({"S", "C", "mask", "doc"})
    ->Args({16384, 2048, 0, 0})
    ->Args({16384, 2048, 1, 1024})
    ->Args({16384, 2048, 2, 1024})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
