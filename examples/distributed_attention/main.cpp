// fpdt-attention: FPDT attention forward and backward on P ranks (docs/design.md 2, FPDT paper section
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
#include "attention_common.hpp"
#if defined(FPDT_EXAMPLE_WITH_MPI)
#include <fpdt/comm/mpi/mpi_communicator.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace fpdt_examples::attention;

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: fpdt-attention [--ranks P] [--seq S] [--chunk C] [--heads H] [--kv-heads H_kv]\n"
               "                      [--head-dim D] [--offload on|off] [--check] [--trace FILE]\n"
               "  FPDT attention forward + backward (bf16, causal) on P ranks: threads of this\n"
               "  process, or MPI processes under mpirun. Defaults: P=2 S=1024 C=256 H=32 H_kv=8 D=128,\n"
               "  offload on. Rules: S %% C == 0, C %% P == 0, H %% P == 0, H_kv %% P == 0 or P %% H_kv == 0.\n"
               "  --check compares with dense float64 attention (slow for large S; exit 1 on mismatch).\n");
}

// One rank: local inputs from the layout, the layer forward and backward, timings and peaks.
template <class Comm>
fpdt::status run_rank(options const& o, Comm& comm, rank_data& rd, bool write_trace) {
  auto tl = fpdt::token_layout::make(o.seq, static_cast<index_t>(comm.size()), o.chunk);
  if (!tl) return tl.error();
  index_t const lt = tl->local_tokens(), r = comm.rank();
  fill_local(o, *tl, r, rd);
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

} // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv, usage);
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
      if (!any && comm->rank() == 0) report("fpdt-attention", *o, comm->size(), rd, "MPI processes");
      int bad = !any ? finish_check("fpdt-attention", *o, comm->size(), rd, comm->rank()) : 1, worst = 0;
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
  report("fpdt-attention", *o, p, rd, "threads");
  return finish_check("fpdt-attention", *o, p, rd, 0);
}
