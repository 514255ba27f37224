// GPU test of sequence_parallel_attention on cuda_backend with nccl_communicator (the device path
// of layers/sequence_parallel_attention.hpp): a one-rank NCCL world on device 0, so every
// all-to-all is a copy, but the whole device path runs for real: the exchanges enqueued on the
// layer's comm stream, the Ulysses pack and unpack kernels, ncclAlltoAll (or grouped send/receive)
// on the comm stream, event hand-overs between the per-rank layer's lanes and the comm stream,
// stream-form tensor sources and sinks. The result must equal float64 dense attention, offload on
// and off, and equal fpdt_attention on the same backend bit for bit (P = 1 adds nothing but
// copies). The P > 1 logic of the same code is tested on host threads
// (tests/layers/sequence_parallel.cpp, device_like_backend).
// Skipped without a device (main.cpp).
#include "../../attention/chunked_driver.hpp"
#include "../../attention/cuda/device_tensor.cuh"
#include "../../attention/reference.hpp"

#include <fpdt/comm/nccl/nccl_communicator.hpp>
#include <fpdt/fpdt.cuh>

#include <doctest/doctest.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <vector>

using fpdt::index_t;
using fpdt_test::attn_shape;
using fpdt_test::device_tensor;
using namespace fpdt_test::chunked;

static_assert(fpdt::stream_communicator<fpdt::nccl_communicator, fpdt::cuda::stream>);

namespace {

// Forward and backward of `layer` (sequence_parallel_attention or fpdt_attention: the same tensor
// overloads, minus lse) on device copies of p.
template <class T, class Layer> run_result run_layer_on_device(Layer& layer, problem<T> const& p) {
  attn_shape const& s = p.s;
  device_tensor<T> q(p.q), k(p.k), v(p.v), dout(p.dout), out(s.q_size());
  device_tensor<float> dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess); // uploads before the layer's non-blocking lanes
  fpdt::status st = layer.forward(q.cview(s.q_ext()), k.cview(s.kv_ext()), v.cview(s.kv_ext()), out.view(s.q_ext()));
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  st = layer.backward(dout.cview(s.q_ext()), dq.view(s.q_ext()), dk.view(s.kv_ext()), dv.view(s.kv_ext()));
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  run_result r;
  out.download(r.out);
  dq.download(r.dq);
  dk.download(r.dk);
  dv.download(r.dv);
  return r;
}

} // namespace

TEST_CASE("nccl sequence_parallel_attention: one rank on cuda_backend equals float64 and fpdt_attention") {
  using T = fpdt::bfloat16;
  using K = fpdt::cuda_flash_chunk_kernel;
  int const devices[1] = {0};
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  ncclComm_t raw = nullptr;
  REQUIRE(ncclCommInitAll(&raw, 1, devices) == ncclSuccess);
  {
    auto comm = fpdt::nccl_communicator::create(raw);
    REQUIRE_MESSAGE(comm.ok(), comm.error().to_string());
    auto be = fpdt::cuda_backend::create();
    REQUIRE_MESSAGE(be.ok(), be.error().to_string());
    for (bool causal : {true, false})
      for (bool offload : {true, false}) {
        CAPTURE(causal);
        CAPTURE(offload);
        attn_shape const s{192, 192, 4, 2, 64}; // u = 3 chunks of 64
        auto p = random_problem<T>(s, 808);
        fpdt::fpdt_attention_options o;
        o.chunk = 64;
        o.offload = offload;
        o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
        auto sp = fpdt::sequence_parallel_attention<T, fpdt::nccl_communicator, fpdt::cuda_backend, K>::create(
            **be, *comm, {s.sq, s.h, s.hkv, s.d}, o);
        REQUIRE_MESSAGE(sp.ok(), sp.error().to_string());
        (*be)->device_memory().reset_peak();
        run_result const got = run_layer_on_device<T>(*sp, p);
        CHECK((*be)->device_memory().stats().peak_bytes <=
              std::max(sp->local_layer().predicted_forward_bytes() + sp->forward_exchange_bytes(),
                       sp->local_layer().predicted_backward_bytes() + sp->backward_exchange_bytes()));
        auto one = fpdt::fpdt_attention<T, fpdt::cuda_backend, K>::create(**be, {s.sq, s.h, s.hkv, s.d}, o);
        REQUIRE(one.ok());
        run_result const want = run_layer_on_device<T>(*one, p);
        run_options ro;
        ro.mask = o.mask;
        ref_result const ref = reference_of(p, ro);
        run_result checked = got;
        checked.lse.assign(ref.lse.begin(), ref.lse.end()); // the tensor overload returns no lse
        check_against_reference(checked, ref, p, 2e-2);
        CHECK(got.out == want.out);
        CHECK(got.dk == want.dk);
        CHECK(got.dv == want.dv);
        CHECK(fpdt_test::no_nan(got.dq));
      }
    CHECK((*be)->device_memory().stats().live_allocations == 0);
  }
  REQUIRE(ncclCommDestroy(raw) == ncclSuccess);
}
