// The parts of the fpdt-attention examples (host: main.cpp; GPU: gpu_main.cu) that do not depend
// on where the layer runs: options, deterministic inputs from global token positions, the dense
// float64 check through token_layout, and the report.
#pragma once

#include <fpdt/attention/host/dense_reference.hpp>
#include <fpdt/fpdt.hpp>

#include "../common/cli.hpp"
#include "../common/random.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace fpdt_examples::attention {

using fpdt::index_t;
using T = fpdt::bfloat16;

struct options {
  index_t ranks = 2, seq = 1024, chunk = 256, heads = 32, kv_heads = 8, head_dim = 128;
  bool offload = true, check = false;
  std::string trace;
};

// Parses the options; --help prints `usage` and exits.
inline fpdt::result<options> parse(int argc, char** argv, void (*usage)(std::FILE*)) {
  options o;
  fpdt_examples::int_option const specs[] = {
      {"--ranks", &o.ranks, 1, 64},          {"--seq", &o.seq, 1, index_t{1} << 24},
      {"--chunk", &o.chunk, 1, index_t{1} << 24}, {"--heads", &o.heads, 1, 1024},
      {"--kv-heads", &o.kv_heads, 1, 1024},  {"--head-dim", &o.head_dim, 1, 1024}};
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    }
    if (a == "--check") {
      o.check = true;
      continue;
    }
    auto const* spec = fpdt_examples::find(specs, a);
    if (a != "--offload" && a != "--trace" && spec == nullptr)
      return fpdt::make_error(fpdt::errc::invalid_argument, "unknown option ", a, " (--help lists them)");
    if (i + 1 >= argc) return fpdt::make_error(fpdt::errc::invalid_argument, "option ", a, " needs a value");
    std::string const val = argv[++i];
    if (a == "--offload") {
      auto on = fpdt_examples::on_off("--offload", val);
      if (!on) return on.error();
      o.offload = *on;
    } else if (a == "--trace") {
      o.trace = val;
    } else {
      FPDT_TRY(fpdt_examples::set(*spec, val));
    }
  }
  FPDT_TRY(fpdt_examples::check_writable("--trace", o.trace));
  return o;
}

// Deterministic inputs: every rank computes the values of its own tokens from their global
// positions, so no rank needs the global tensors (except for --check).
inline float value(std::uint64_t tensor, index_t pos, index_t head, index_t d) {
  return static_cast<float>(fpdt_examples::uniform_pm1(
      (tensor * 0x9E3779B97F4A7C15ull) ^ (static_cast<std::uint64_t>(pos) * 0xBF58476D1CE4E5B9ull) ^
      (static_cast<std::uint64_t>(head) * 0x94D049BB133111EBull) ^ static_cast<std::uint64_t>(d)));
}

struct rank_data {
  std::vector<T> q, k, v, dout, out;
  std::vector<float> dq, dk, dv;
  double fwd_s = 0, bwd_s = 0;
  std::size_t fwd_peak = 0, bwd_peak = 0, pinned = 0;
};

// Rank r's local q, k, v, dout (bf16, [S/P, heads, D] in the chunk-interleaved layout) from the
// global positions of its tokens, and zeroed outputs.
inline void fill_local(options const& o, fpdt::token_layout const& tl, index_t r, rank_data& rd) {
  index_t const lt = tl.local_tokens();
  auto fill = [&](std::vector<T>& x, std::uint64_t tensor, index_t heads) {
    x.resize(static_cast<std::size_t>(lt * heads * o.head_dim));
    for (index_t t = 0; t < lt; ++t) {
      index_t const g = tl.global_position(r, t);
      for (index_t h = 0; h < heads; ++h)
        for (index_t d = 0; d < o.head_dim; ++d)
          x[static_cast<std::size_t>((t * heads + h) * o.head_dim + d)] = T(value(tensor, g, h, d));
    }
  };
  fill(rd.q, 1, o.heads);
  fill(rd.k, 2, o.kv_heads);
  fill(rd.v, 3, o.kv_heads);
  fill(rd.dout, 4, o.heads);
  rd.out.assign(rd.q.size(), T(0.0f));
  rd.dq.assign(rd.q.size(), 0.0f);
  rd.dk.assign(rd.k.size(), 0.0f);
  rd.dv.assign(rd.k.size(), 0.0f);
}

using dense_result = fpdt::dense_reference_result;

// Dense float64 causal GQA attention (forward and backward) of the global inputs, on all threads.
inline fpdt::result<dense_result> dense_reference(options const& o) {
  index_t const s = o.seq, h = o.heads, hk = o.kv_heads, dd = o.head_dim;
  auto at = [&](index_t pos, index_t head, index_t heads, index_t d) {
    return static_cast<std::size_t>((pos * heads + head) * dd + d);
  };
  auto input = [&](std::uint64_t tensor, index_t heads) {
    std::vector<double> x(static_cast<std::size_t>(s * heads * dd));
    for (index_t g = 0; g < s; ++g)
      for (index_t hh = 0; hh < heads; ++hh)
        for (index_t d = 0; d < dd; ++d)
          x[at(g, hh, heads, d)] = static_cast<float>(T(value(tensor, g, hh, d)));
    return x;
  };
  auto q = input(1, h), k = input(2, hk), v = input(3, hk), dout = input(4, h);
  auto view = [&](std::vector<double> const& x, index_t heads) {
    return fpdt::contiguous_view(x.data(), std::array<index_t, 3>{s, heads, dd}).value();
  };
  return fpdt::dense_reference_backward(view(q, h), view(k, hk), view(v, hk), view(dout, h),
                                        {.causal = true});
}

// The largest error of rank r's out, dq, dk, dv relative to each tensor's largest reference value.
inline double rank_error(options const& o, index_t ranks, index_t r, rank_data const& rd, dense_result const& ref) {
  index_t const dd = o.head_dim, h = o.heads, hk = o.kv_heads;
  auto at = [&](index_t pos, index_t head, index_t heads, index_t d) {
    return static_cast<std::size_t>((pos * heads + head) * dd + d);
  };
  auto tl = fpdt::token_layout::make(o.seq, ranks, o.chunk).value();
  auto err = [&](auto const& got, std::vector<double> const& want, index_t heads) {
    double mref = 1e-30, worst = 0;
    for (double x : want)
      mref = std::max(mref, std::abs(x));
    for (index_t t = 0; t < tl.local_tokens(); ++t) {
      index_t const gpos = tl.global_position(r, t);
      for (index_t hh = 0; hh < heads; ++hh)
        for (index_t d = 0; d < dd; ++d)
          worst = std::max(worst, std::abs(static_cast<double>(static_cast<float>(got[at(t, hh, heads, d)])) -
                                           want[at(gpos, hh, heads, d)]));
    }
    return worst / mref;
  };
  return std::max({err(rd.out, ref.out, h), err(rd.dq, ref.dq, h), err(rd.dk, ref.dk, hk), err(rd.dv, ref.dv, hk)});
}

inline void report(char const* name, options const& o, index_t ranks, std::vector<rank_data> const& rd,
                   char const* how) {
  double fwd = 0, bwd = 0;
  std::size_t peak = 0, pinned = 0;
  for (auto const& x : rd) {
    fwd = std::max(fwd, x.fwd_s);
    bwd = std::max(bwd, x.bwd_s);
    peak = std::max({peak, x.fwd_peak, x.bwd_peak});
    pinned = std::max(pinned, x.pinned);
  }
  double const flops = 4.0 * static_cast<double>(o.seq) * static_cast<double>(o.seq) *
                       static_cast<double>(o.heads * o.head_dim) / 2;
  std::printf("%s: P=%lld (%s) S=%lld C=%lld H=%lld H_kv=%lld D=%lld bf16 causal, offload %s\n",
              name, static_cast<long long>(ranks), how, static_cast<long long>(o.seq), static_cast<long long>(o.chunk),
              static_cast<long long>(o.heads), static_cast<long long>(o.kv_heads),
              static_cast<long long>(o.head_dim), o.offload ? "on" : "off");
  std::printf("  forward  %.3f s  (%.1f GFLOP/s over all ranks)\n", fwd, flops / fwd * 1e-9);
  std::printf("  backward %.3f s  (%.1f GFLOP/s over all ranks)\n", bwd, 2.5 * flops / bwd * 1e-9);
  std::printf("  peak device bytes per rank %zu (%.1f MiB), pinned host bytes per rank %zu (%.1f MiB)\n", peak,
              static_cast<double>(peak) / (1 << 20), pinned, static_cast<double>(pinned) / (1 << 20));
  if (!o.trace.empty()) std::printf("  trace of rank 0's backward pass: %s\n", o.trace.c_str());
}

inline int finish_check(char const* name, options const& o, index_t ranks, std::vector<rank_data> const& rd,
                        int first_rank) {
  if (!o.check) return 0;
  std::printf("  computing the dense float64 reference (all threads, O(S^2 H D))...\n");
  std::fflush(stdout);
  auto const ref = dense_reference(o); // once, for every rank of this process
  if (!ref) {
    std::fprintf(stderr, "%s: %s\n", name, ref.error().to_string().c_str());
    return 2;
  }
  double worst = 0;
  for (std::size_t i = 0; i < rd.size(); ++i)
    worst = std::max(worst, rank_error(o, ranks, first_rank + static_cast<index_t>(i), rd[i], *ref));
  bool const ok = worst <= 2e-2; // bf16 outputs and inputs; fp32 accumulation
  std::printf("  check against dense float64: max scaled error %.3g (tolerance 2e-2): %s\n", worst,
              ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}

} // namespace fpdt_examples::attention
