// fpdt-attention: FPDT attention forward and backward on P ranks (DESIGN.md 2, FPDT paper section
// 3), at Llama-3-8B attention shapes by default (H = 32, H_kv = 8, D = 128), bf16, causal.
//
// Ranks are threads of this process with the in-process communicator (--ranks P), or MPI
// processes when started by mpirun and built with MPI (mpirun -np P fpdt-attention ...). Each rank
// holds S/P tokens in FPDT's chunk-interleaved layout, runs the layer on its own host backend
// (a budgeted "device" arena and a pinned pool), and reports its time and peak device bytes.
// --check compares every rank's outputs and gradients with dense float64 attention over the
// global sequence (exit status 1 on a mismatch); --trace writes rank 0's last pass as Chrome
// trace JSON (open it in Perfetto).
//
//   fpdt-attention [--ranks P] [--seq S] [--chunk C] [--heads H] [--kv-heads H_kv]
//                  [--head-dim D] [--offload on|off] [--check] [--trace FILE] [--help]
#include <fpdt/attention/host/dense_reference.hpp>
#include <fpdt/fpdt.hpp>

#include "../common/cli.hpp"
#if defined(FPDT_EXAMPLE_WITH_MPI)
#include <fpdt/comm/mpi/mpi_communicator.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using fpdt::index_t;
using T = fpdt::bfloat16;

struct options {
  index_t ranks = 2, seq = 1024, chunk = 256, heads = 32, kv_heads = 8, head_dim = 128;
  bool offload = true, check = false;
  std::string trace;
};

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: fpdt-attention [--ranks P] [--seq S] [--chunk C] [--heads H] [--kv-heads H_kv]\n"
               "                      [--head-dim D] [--offload on|off] [--check] [--trace FILE]\n"
               "  FPDT attention forward + backward (bf16, causal) on P ranks: threads of this\n"
               "  process, or MPI processes under mpirun. Defaults: P=2 S=1024 C=256 H=32 H_kv=8 D=128,\n"
               "  offload on. Rules: S %% C == 0, C %% P == 0, H %% P == 0, H_kv %% P == 0 or P %% H_kv == 0.\n"
               "  --check compares with dense float64 attention (slow for large S; exit 1 on mismatch).\n");
}

fpdt::result<options> parse(int argc, char** argv) {
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
float value(std::uint64_t tensor, index_t pos, index_t head, index_t d) {
  std::uint64_t x = (tensor * 0x9E3779B97F4A7C15ull) ^ (static_cast<std::uint64_t>(pos) * 0xBF58476D1CE4E5B9ull) ^
                    (static_cast<std::uint64_t>(head) * 0x94D049BB133111EBull) ^ static_cast<std::uint64_t>(d);
  x ^= x >> 31;
  x *= 0xD6E9C2B64F2E1E93ull;
  x ^= x >> 29;
  return static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

struct rank_data {
  std::vector<T> q, k, v, dout, out;
  std::vector<float> dq, dk, dv;
  double fwd_s = 0, bwd_s = 0;
  std::size_t fwd_peak = 0, bwd_peak = 0, pinned = 0;
};

// One rank: local inputs from the layout, the layer forward and backward, timings and peaks.
template <class Comm>
fpdt::status run_rank(options const& o, Comm& comm, rank_data& rd, bool write_trace) {
  auto tl = fpdt::token_layout::make(o.seq, static_cast<index_t>(comm.size()), o.chunk);
  if (!tl) return tl.error();
  index_t const lt = tl->local_tokens(), r = comm.rank();
  auto fill = [&](std::vector<T>& x, std::uint64_t tensor, index_t heads) {
    x.resize(static_cast<std::size_t>(lt * heads * o.head_dim));
    for (index_t t = 0; t < lt; ++t) {
      index_t const g = tl->global_position(r, t);
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
  fpdt::host_backend be({.device_budget_bytes = std::size_t{16} << 30});
  unsigned const threads = std::max(1u, std::thread::hardware_concurrency() / static_cast<unsigned>(comm.size()));
  auto layer = fpdt::sequence_parallel_attention<T, Comm>::create(
      be, comm, {o.seq, o.heads, o.kv_heads, o.head_dim},
      {.chunk = o.chunk, .offload = o.offload, .ring_slots = 2, .mask = fpdt::causal_mask}, 0,
      fpdt::host_chunk_kernel{threads});
  if (!layer) return layer.error();
  std::array<index_t, 3> const qe{lt, o.heads, o.head_dim}, ke{lt, o.kv_heads, o.head_dim};
  auto t0 = std::chrono::steady_clock::now();
  FPDT_TRY(layer->forward(fpdt::contiguous_view<T const>(rd.q.data(), qe).value(),
                          fpdt::contiguous_view<T const>(rd.k.data(), ke).value(),
                          fpdt::contiguous_view<T const>(rd.v.data(), ke).value(),
                          fpdt::contiguous_view(rd.out.data(), qe).value()));
  auto t1 = std::chrono::steady_clock::now();
  rd.fwd_peak = be.device_memory().stats().peak_bytes;
  be.device_memory().reset_peak();
  FPDT_TRY(layer->backward(fpdt::contiguous_view<T const>(rd.dout.data(), qe).value(),
                           fpdt::contiguous_view(rd.dq.data(), qe).value(),
                           fpdt::contiguous_view(rd.dk.data(), ke).value(),
                           fpdt::contiguous_view(rd.dv.data(), ke).value()));
  auto t2 = std::chrono::steady_clock::now();
  rd.bwd_peak = be.device_memory().stats().peak_bytes;
  rd.pinned = be.pinned_memory().stats().reserved_bytes;
  rd.fwd_s = std::chrono::duration<double>(t1 - t0).count();
  rd.bwd_s = std::chrono::duration<double>(t2 - t1).count();
  if (write_trace) FPDT_TRY(layer->trace().write_chrome_json(o.trace));
  return {};
}

using dense_result = fpdt::dense_reference_result;

// Dense float64 causal GQA attention (forward and backward) of the global inputs, on all threads.
fpdt::result<dense_result> dense_reference(options const& o) {
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
double rank_error(options const& o, index_t ranks, index_t r, rank_data const& rd, dense_result const& ref) {
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

void report(options const& o, index_t ranks, std::vector<rank_data> const& rd, char const* how) {
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
  std::printf("fpdt-attention: P=%lld (%s) S=%lld C=%lld H=%lld H_kv=%lld D=%lld bf16 causal, offload %s\n",
              static_cast<long long>(ranks), how, static_cast<long long>(o.seq), static_cast<long long>(o.chunk),
              static_cast<long long>(o.heads), static_cast<long long>(o.kv_heads),
              static_cast<long long>(o.head_dim), o.offload ? "on" : "off");
  std::printf("  forward  %.3f s  (%.1f GFLOP/s over all ranks)\n", fwd, flops / fwd * 1e-9);
  std::printf("  backward %.3f s  (%.1f GFLOP/s over all ranks)\n", bwd, 2.5 * flops / bwd * 1e-9);
  std::printf("  peak device bytes per rank %zu (%.1f MiB), pinned host bytes per rank %zu (%.1f MiB)\n", peak,
              static_cast<double>(peak) / (1 << 20), pinned, static_cast<double>(pinned) / (1 << 20));
  if (!o.trace.empty()) std::printf("  trace of rank 0's backward pass: %s\n", o.trace.c_str());
}

int finish_check(options const& o, index_t ranks, std::vector<rank_data> const& rd, int first_rank) {
  if (!o.check) return 0;
  std::printf("  computing the dense float64 reference (all threads, O(S^2 H D))...\n");
  std::fflush(stdout);
  auto const ref = dense_reference(o); // once, for every rank of this process
  if (!ref) {
    std::fprintf(stderr, "fpdt-attention: %s\n", ref.error().to_string().c_str());
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

} // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv);
  if (!o) {
    std::fprintf(stderr, "fpdt-attention: %s\n", o.error().message().c_str());
    usage(stderr);
    return 2;
  }
#if defined(FPDT_EXAMPLE_WITH_MPI)
  if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE")) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    auto comm = fpdt::mpi_communicator::create(MPI_COMM_WORLD);
    int rc = 0;
    if (!comm) {
      std::fprintf(stderr, "fpdt-attention: %s\n", comm.error().to_string().c_str());
      rc = 2;
    } else {
      std::vector<rank_data> rd(1);
      fpdt::status st = run_rank(*o, *comm, rd[0], comm->rank() == 0 && !o->trace.empty());
      int failed = st.ok() ? 0 : 1, any = 0;
      MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
      if (!st.ok()) std::fprintf(stderr, "fpdt-attention rank %d: %s\n", comm->rank(), st.to_string().c_str());
      double times[2] = {rd[0].fwd_s, rd[0].bwd_s}, tmax[2] = {};
      MPI_Allreduce(times, tmax, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      rd[0].fwd_s = tmax[0];
      rd[0].bwd_s = tmax[1];
      if (!any && comm->rank() == 0) report(*o, comm->size(), rd, "MPI processes");
      int bad = !any ? finish_check(*o, comm->size(), rd, comm->rank()) : 1, worst = 0;
      MPI_Allreduce(&bad, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
      rc = any ? 2 : worst;
    }
    MPI_Finalize();
    return rc;
  }
#endif
  index_t const p = o->ranks;
  fpdt::local_world world(static_cast<int>(p), std::chrono::seconds(120));
  std::vector<rank_data> rd(static_cast<std::size_t>(p));
  std::vector<fpdt::status> st(rd.size());
  std::vector<std::thread> ts;
  for (index_t r = 0; r < p; ++r)
    ts.emplace_back([&, r] {
      auto comm = world.communicator(static_cast<int>(r)).value();
      st[static_cast<std::size_t>(r)] =
          run_rank(*o, comm, rd[static_cast<std::size_t>(r)], r == 0 && !o->trace.empty());
    });
  for (auto& t : ts)
    t.join();
  for (index_t r = 0; r < p; ++r)
    if (!st[static_cast<std::size_t>(r)].ok()) {
      std::fprintf(stderr, "fpdt-attention rank %lld: %s\n", static_cast<long long>(r),
                   st[static_cast<std::size_t>(r)].to_string().c_str());
      return 2;
    }
  report(*o, p, rd, "threads");
  return finish_check(*o, p, rd, 0);
}
