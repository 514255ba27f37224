// fpdt-attention-gpu: FPDT attention forward and backward on P GPUs (docs/design.md 2, FPDT paper
// section 3): sequence_parallel_attention on cuda_backend with the tensor-core chunk kernel and an
// NCCL communicator, at Llama-3-8B attention shapes by default (H = 32, H_kv = 8, D = 128), bf16,
// causal. How a trainer wires it:
// - one rank per GPU, here threads of this process (one NCCL world from ncclCommInitAll; with MPI
//   you would broadcast an ncclUniqueId and call ncclCommInitRank per process instead);
// - per rank a cuda_backend on its device and an nccl_communicator over the rank's ncclComm_t
//   (fpdt never creates, aborts or destroys it);
// - the rank's S/P tokens in FPDT's chunk-interleaved layout (token_layout) as device tensors;
// - forward and backward through the layer's tensor overloads, which return when the pass has run.
// --check compares every rank's outputs and gradients with dense float64 attention over the global
// sequence (exit status 1 on a mismatch); --trace writes rank 0's last pass (Perfetto). Without a
// CUDA device it says so and exits with status 77.
//
//   fpdt-attention-gpu [--ranks P] [--seq S] [--chunk C] [--heads H] [--kv-heads H_kv]
//                      [--head-dim 64|128] [--offload on|off] [--check] [--trace FILE] [--help]
#include "attention_common.hpp"

#include <fpdt/comm/nccl/nccl_communicator.hpp>
#include <fpdt/fpdt.cuh>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace fpdt_examples::attention;

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: fpdt-attention-gpu [--ranks P] [--seq S] [--chunk C] [--heads H] [--kv-heads H_kv]\n"
               "                          [--head-dim 64|128] [--offload on|off] [--check] [--trace FILE]\n"
               "  FPDT attention forward + backward (bf16, causal) on P GPUs of this machine (default:\n"
               "  all), one thread and one NCCL rank each. Defaults: S=1024 C=256 H=32 H_kv=8 D=128,\n"
               "  offload on. Rules: S %% C == 0, C %% P == 0, H %% P == 0, H_kv %% P == 0 or P %% H_kv == 0.\n"
               "  --check compares with dense float64 attention (slow for large S; exit 1 on mismatch).\n");
}

// A device copy of a host vector (or `n` zeroed elements), freed on destruction.
template <class U> struct device_vector {
  U* ptr = nullptr;
  std::size_t n = 0;
  fpdt::status st;
  explicit device_vector(std::vector<U> const& host) : n(host.size()) {
    st = fpdt::cuda_status(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(U)), "cudaMalloc", __FILE__, __LINE__);
    if (st.ok())
      st = fpdt::cuda_status(cudaMemcpy(ptr, host.data(), n * sizeof(U), cudaMemcpyHostToDevice), "cudaMemcpy",
                             __FILE__, __LINE__);
  }
  device_vector(device_vector const&) = delete;
  device_vector& operator=(device_vector const&) = delete;
  ~device_vector() { (void)cudaFree(ptr); }
  [[nodiscard]] fpdt::status download(std::vector<U>& host) const {
    return fpdt::cuda_status(cudaMemcpy(host.data(), ptr, n * sizeof(U), cudaMemcpyDeviceToHost), "cudaMemcpy",
                             __FILE__, __LINE__);
  }
};

// One rank on `device` with the rank's NCCL comm: local inputs, the layer forward and backward,
// timings and peaks; outputs and gradients downloaded into rd for --check.
fpdt::status run_rank(options const& o, int device, ncclComm_t raw, rank_data& rd, bool write_trace) {
  FPDT_CUDA_CHECK(cudaSetDevice(device));
  auto comm = fpdt::nccl_communicator::create(raw);
  if (!comm) return comm.error();
  auto tl = fpdt::token_layout::make(o.seq, static_cast<index_t>(comm->size()), o.chunk);
  if (!tl) return tl.error();
  index_t const lt = tl->local_tokens();
  fill_local(o, *tl, comm->rank(), rd);
  auto be = fpdt::cuda_backend::create({.device = device});
  if (!be) return be.error();
  using layer_t = fpdt::sequence_parallel_attention<T, fpdt::nccl_communicator, fpdt::cuda_backend,
                                                    fpdt::cuda_flash_chunk_kernel>;
  auto layer = layer_t::create(**be, *comm, {o.seq, o.heads, o.kv_heads, o.head_dim},
                               {.chunk = o.chunk, .offload = o.offload, .ring_slots = 2, .mask = fpdt::causal_mask});
  if (!layer) return layer.error();
  device_vector<T> q(rd.q), k(rd.k), v(rd.v), dout(rd.dout), out(rd.out);
  device_vector<float> dq(rd.dq), dk(rd.dk), dv(rd.dv);
  for (fpdt::status const* s : {&q.st, &k.st, &v.st, &dout.st, &out.st, &dq.st, &dk.st, &dv.st})
    FPDT_TRY(*s);
  // The layer's lanes are non-blocking streams: the uploads must be complete before the pass.
  FPDT_CUDA_CHECK(cudaDeviceSynchronize());
  std::array<index_t, 3> const qe{lt, o.heads, o.head_dim}, ke{lt, o.kv_heads, o.head_dim};
  auto t0 = std::chrono::steady_clock::now();
  FPDT_TRY(layer->forward(fpdt::contiguous_view<T const>(q.ptr, qe).value(),
                          fpdt::contiguous_view<T const>(k.ptr, ke).value(),
                          fpdt::contiguous_view<T const>(v.ptr, ke).value(),
                          fpdt::contiguous_view(out.ptr, qe).value()));
  auto t1 = std::chrono::steady_clock::now();
  rd.fwd_peak = (*be)->device_memory().stats().peak_bytes;
  (*be)->device_memory().reset_peak();
  FPDT_TRY(layer->backward(fpdt::contiguous_view<T const>(dout.ptr, qe).value(),
                           fpdt::contiguous_view(dq.ptr, qe).value(),
                           fpdt::contiguous_view(dk.ptr, ke).value(),
                           fpdt::contiguous_view(dv.ptr, ke).value()));
  auto t2 = std::chrono::steady_clock::now();
  rd.bwd_peak = (*be)->device_memory().stats().peak_bytes;
  rd.pinned = (*be)->pinned_memory().stats().reserved_bytes;
  rd.fwd_s = std::chrono::duration<double>(t1 - t0).count();
  rd.bwd_s = std::chrono::duration<double>(t2 - t1).count();
  if (write_trace) FPDT_TRY(layer->trace().write_chrome_json(o.trace));
  FPDT_TRY(out.download(rd.out));
  FPDT_TRY(dq.download(rd.dq));
  FPDT_TRY(dk.download(rd.dk));
  return dv.download(rd.dv);
}

} // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv, usage);
  if (!o) {
    std::fprintf(stderr, "fpdt-attention-gpu: %s\n", o.error().message().c_str());
    usage(stderr);
    return 2;
  }
  int devices = 0;
  if (cudaError_t const e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0) {
    std::printf("fpdt-attention-gpu: no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 77;
  }
  bool ranks_given = false;
  for (int i = 1; i < argc; ++i) ranks_given = ranks_given || std::strcmp(argv[i], "--ranks") == 0;
  index_t const p = ranks_given ? o->ranks : devices;
  if (p > devices) {
    std::fprintf(stderr, "fpdt-attention-gpu: --ranks %lld needs as many GPUs, %d present\n",
                 static_cast<long long>(p), devices);
    return 2;
  }
  // All ranks are threads of this process: NCCL's P2P transport would then read and write peers'
  // buffers directly, but cuda_backend's buffers come from the device's stream-ordered pool
  // (cudaMallocAsync), which peer access does not open to other GPUs (only cudaMemPoolSetAccess
  // does). NCCL_P2P_DIRECT_DISABLE=1 keeps P2P through NCCL's own buffers. A caller's setting wins;
  // one process per GPU needs nothing.
  setenv("NCCL_P2P_DIRECT_DISABLE", "1", 0);
  // The caller's NCCL world: one comm per rank, rank r on device r.
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(p), nullptr);
  std::vector<int> devs(static_cast<std::size_t>(p));
  for (index_t r = 0; r < p; ++r) devs[static_cast<std::size_t>(r)] = static_cast<int>(r);
  if (ncclResult_t const nr = ncclCommInitAll(comms.data(), static_cast<int>(p), devs.data()); nr != ncclSuccess) {
    std::fprintf(stderr, "fpdt-attention-gpu: ncclCommInitAll: %s\n", ncclGetErrorString(nr));
    return 2;
  }
  std::vector<rank_data> rd(static_cast<std::size_t>(p));
  std::vector<fpdt::status> st(rd.size());
  std::vector<std::thread> ts;
  for (index_t r = 0; r < p; ++r)
    ts.emplace_back([&, r] {
      auto const ri = static_cast<std::size_t>(r);
      st[ri] = run_rank(*o, devs[ri], comms[ri], rd[ri], r == 0 && !o->trace.empty());
      if (!st[ri].ok()) {
        // fpdt cannot abort the caller's NCCL comms, and the other ranks' exchanges would wait
        // for this one forever: a trainer aborts its communicators here (ncclCommAbort on every
        // rank, e.g. from a watchdog); this example ends the process.
        std::fprintf(stderr, "fpdt-attention-gpu rank %lld: %s\n", static_cast<long long>(r),
                     st[ri].to_string().c_str());
        std::fflush(stderr);
        std::_Exit(2);
      }
    });
  for (auto& t : ts) t.join();
  for (ncclComm_t c : comms) (void)ncclCommDestroy(c);
  report("fpdt-attention-gpu", *o, p, rd, "GPUs, NCCL");
  return finish_check("fpdt-attention-gpu", *o, p, rd, 0);
}
