// GPU tests of fpdt_attention on cuda_backend (layers/cuda/attention_step_ops.cuh): the same
// problems and float64 reference as the host layer's tests (tests/layers/fpdt_attention.cpp), run
// with the tensor-core and reference kernels, offload on and off, causal and full; the device
// peak equals the schedule's prediction as on the host; a stream-form source and sink; CASES.md
// A12 (the backward reads the chunk that was offloaded) and A18 (copies racing compute). Skipped
// without a device (tests/backend/cuda/main.cu).
#include "../../attention/chunked_driver.hpp"
#include "../../attention/cuda/device_kernel.cuh"
#include "../../attention/cuda/device_tensor.cuh"
#include "../../attention/cuda/external_impls.cuh"
#include "../../attention/reference.hpp"
#include "../a12_case.hpp"

#include <fpdt/fpdt.cuh>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

using fpdt::index_t;
using fpdt_test::attn_shape;
using fpdt_test::device_buffer;
using fpdt_test::device_tensor;
using namespace fpdt_test::chunked;

static_assert(fpdt::times_steps_with_events<fpdt::cuda_backend>, "GPU traces are timed with events");

namespace {

// A kernel, an element type, a head dimension and the tolerance of the layer's scaled errors
// against float64 (the host layer uses 2e-2 for bf16 and 1e-4 for fp32).
struct flash_bf16 {
  using kernel = fpdt::cuda_flash_chunk_kernel;
  using type = fpdt::bfloat16;
  static constexpr index_t d = 64;
  static constexpr double tol = 2e-2;
};
struct flash_f16 {
  using kernel = fpdt::cuda_flash_chunk_kernel;
  using type = fpdt::half;
  static constexpr index_t d = 128;
  static constexpr double tol = 5e-3;
};
struct ref_f32 {
  using kernel = fpdt::cuda_reference_chunk_kernel;
  using type = float;
  static constexpr index_t d = 32;
  static constexpr double tol = 1e-4;
};
// A user's kernel through the adapter point (LSE in base 2, +inf for empty rows): the layer sets
// the adapter's stream and the adapter converts conventions at every chunk pair.
struct external_f32 {
  using kernel = fpdt::external_chunk_kernel<fpdt_test::log2_plus_inf_kernel>;
  using type = float;
  static constexpr index_t d = 16;
  static constexpr double tol = 1e-4;
};

// Forward and backward of the layer on device copies of p; results downloaded as fp32. Checks the
// arena's peak against the layer's predictions, as the host test does.
template <class T, class K>
run_result run_on_device(fpdt::cuda_backend& be, problem<T> const& p,
                         fpdt::fpdt_attention_options const& o, K kernel = {}) {
  attn_shape const& s = p.s;
  auto layer = fpdt::fpdt_attention<T, fpdt::cuda_backend, K>::create(be, {s.sq, s.h, s.hkv, s.d}, o,
                                                                      std::move(kernel));
  REQUIRE_MESSAGE(layer.ok(), layer.error().to_string());
  device_tensor<T> q(p.q), k(p.k), v(p.v), dout(p.dout);
  device_tensor<T> out(s.q_size());
  device_tensor<float> lse(s.lse_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  // The uploads and the poison fill ran on the legacy stream; the layer's lanes are non-blocking
  // streams that do not wait for it.
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  be.device_memory().reset_peak();
  fpdt::status st = layer->forward(
      q.cview(s.q_ext()), k.cview(s.kv_ext()), v.cview(s.kv_ext()), out.view(s.q_ext()), lse.view(s.lse_ext()));
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  CHECK(be.device_memory().stats().peak_bytes == layer->predicted_forward_bytes());
  std::size_t timed = 0;
  for (auto const& e : layer->trace().events) timed += e.begin_us >= 0 && e.end_us >= e.begin_us;
  CHECK(timed == layer->trace().events.size()); // device time from the executor's events
  be.device_memory().reset_peak();
  st = layer->backward(dout.cview(s.q_ext()), dq.view(s.q_ext()),
                       dk.view(s.kv_ext()), dv.view(s.kv_ext()));
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  CHECK(be.device_memory().stats().peak_bytes == layer->predicted_backward_bytes());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  run_result r;
  out.download(r.out);
  lse.download(r.lse);
  dq.download(r.dq);
  dk.download(r.dk);
  dv.download(r.dv);
  return r;
}

std::unique_ptr<fpdt::cuda_backend> make_backend() {
  auto be = fpdt::cuda_backend::create();
  REQUIRE_MESSAGE(be.ok(), be.error().to_string());
  return std::move(*be);
}

} // namespace

TEST_CASE_TEMPLATE("cuda fpdt_attention: equals float64 dense attention with offload on and off", C,
                   flash_bf16, flash_f16, ref_f32, external_f32) {
  using T = typename C::type;
  auto be = make_backend();
  for (index_t u : {1, 3, 4})
    for (bool causal : {true, false})
      for (bool offload : {true, false}) {
        CAPTURE(u);
        CAPTURE(causal);
        CAPTURE(offload);
        // C = 64 tokens (a multiple of the tensor-core tiles), GQA 4:2, u chunks.
        attn_shape const s{64 * u, 64 * u, 4, 2, C::d};
        auto p = random_problem<T>(s, 300 + static_cast<std::uint32_t>(u));
        fpdt::fpdt_attention_options o;
        o.chunk = 64;
        o.offload = offload;
        o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
        run_options ro;
        ro.mask = o.mask;
        run_result const r = run_on_device<T, typename C::kernel>(*be, p, o);
        check_against_reference(r, reference_of(p, ro), p, C::tol);
      }
  CHECK(be->device_memory().stats().live_allocations == 0);
}

namespace {
// A stream-form source and sink, as a trainer would write them: the source writes chunk c's
// q, k, v from its own device tensors with the layer's row copies on the lane's stream, and the
// sink records which chunks it saw and copies out into its own tensor.
template <class T> struct stream_source {
  fpdt::cuda_backend* be;
  fpdt::tensor_view<T const, 3> q, k, v;
  fpdt::status produce(index_t, index_t first, fpdt::tensor_view<T, 3> const& qc,
                       fpdt::tensor_view<T, 3> const& kc, fpdt::tensor_view<T, 3> const& vc,
                       fpdt::cuda::stream& s) const {
    using ops = fpdt::attention_step_ops<fpdt::cuda_backend>;
    FPDT_TRY(ops::copy_rows(*be, s, q, first, qc, 0, qc.extent(0)));
    FPDT_TRY(ops::copy_rows(*be, s, k, first, kc, 0, kc.extent(0)));
    return ops::copy_rows(*be, s, v, first, vc, 0, vc.extent(0));
  }
};
template <class T> struct stream_sink {
  fpdt::cuda_backend* be;
  fpdt::tensor_view<T, 3> out;
  fpdt::tensor_view<float, 2> lse;
  std::vector<index_t> seen{};
  fpdt::status consume(index_t c, index_t first, fpdt::tensor_view<T const, 3> const& o,
                       fpdt::tensor_view<float const, 2> const& l, fpdt::cuda::stream& s) {
    seen.push_back(c);
    using ops = fpdt::attention_step_ops<fpdt::cuda_backend>;
    FPDT_TRY(ops::copy_rows(*be, s, o, 0, out, first, o.extent(0)));
    return ops::copy_columns(*be, s, l, 0, lse, first, l.extent(1));
  }
};
} // namespace

TEST_CASE("cuda fpdt_attention: a stream-form source and sink are called in chunk order") {
  using T = fpdt::bfloat16;
  auto be = make_backend();
  attn_shape const s{256, 256, 4, 4, 64};
  auto p = random_problem<T>(s, 41);
  fpdt::fpdt_attention_options o;
  o.chunk = 64;
  auto layer = fpdt::fpdt_attention<T, fpdt::cuda_backend, fpdt::cuda_flash_chunk_kernel>::create(
      *be, {s.sq, s.h, s.hkv, s.d}, o);
  REQUIRE(layer.ok());
  device_tensor<T> q(p.q), k(p.k), v(p.v), out(s.q_size());
  device_tensor<float> lse(s.lse_size());
  stream_source<T> src{be.get(), q.view(s.q_ext()), k.view(s.kv_ext()), v.view(s.kv_ext())};
  stream_sink<T> snk{be.get(), out.view(s.q_ext()), lse.view(s.lse_ext())};
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess); // uploads and poison before the lanes
  fpdt::status const st = layer->forward(src, snk);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  CHECK(snk.seen == std::vector<index_t>{0, 1, 2, 3});
  run_result r;
  out.download(r.out);
  lse.download(r.lse);
  run_options ro;
  ro.mask = o.mask;
  check_against_reference(r, reference_of(p, ro), p, flash_bf16::tol, false); // NaN fails too
}

TEST_CASE("cuda fpdt_attention: a pageable host tensor is an error naming it, not a fault") {
  using T = fpdt::bfloat16;
  auto be = make_backend();
  attn_shape const s{128, 128, 2, 2, 64};
  auto p = random_problem<T>(s, 43);
  fpdt::fpdt_attention_options o;
  o.chunk = 64;
  auto layer = fpdt::fpdt_attention<T, fpdt::cuda_backend, fpdt::cuda_flash_chunk_kernel>::create(
      *be, {s.sq, s.h, s.hkv, s.d}, o);
  REQUIRE(layer.ok());
  std::vector<T> out(s.q_size(), T(7.0f)); // pageable: the host tensors of the problem too
  fpdt::status const st = layer->forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()),
                                         cview(p.v, s.kv_ext()), view(out, s.q_ext()));
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(contains(st.message(), "pageable host memory"));
  CHECK(cudaGetLastError() == cudaSuccess); // nothing sticky
  CHECK(static_cast<float>(out[0]) == 7.0f);
}

TEST_CASE("cuda fpdt_attention: A18 offload on equals offload off bit for bit, over repeated passes") {
  // On a GPU the lanes really run concurrently: a fetch that did not wait for its offload, or a
  // compute that did not wait for its fetch, shows as a difference. The forward and dk, dv are
  // deterministic (one writer per element, chunk pairs in schedule order); dq is accumulated with
  // atomics, so it is compared to fp32 rounding.
  using T = fpdt::bfloat16;
  using K = fpdt::cuda_flash_chunk_kernel;
  auto be = make_backend();
  attn_shape const s{512, 512, 4, 2, 64};
  auto p = random_problem<T>(s, 18);
  fpdt::fpdt_attention_options o;
  o.chunk = 64; // u = 8
  o.offload = false;
  run_result const want = run_on_device<T, K>(*be, p, o);
  o.offload = true;
  for (int it = 0; it < 10; ++it) {
    CAPTURE(it);
    o.ring_slots = 2 + it % 2;
    run_result const got = run_on_device<T, K>(*be, p, o);
    CHECK(got.out == want.out);
    CHECK(got.lse == want.lse);
    CHECK(got.dk == want.dk);
    CHECK(got.dv == want.dv);
    double worst = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < got.dq.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::abs(got.dq[i] - want.dq[i])));
      scale = std::max(scale, static_cast<double>(std::abs(want.dq[i])));
    }
    CHECK(fpdt_test::no_nan(got.dq));
    CHECK(worst <= 1e-5 * scale);
  }
}

namespace {
// The reference kernel, handing the K and V each backward chunk pair reads (waiting for its
// stream, then reading the device slots) to an A12 recorder (tests/layers/a12_case.hpp).
struct recording_device_kernel {
  fpdt::cuda_reference_chunk_kernel inner{};
  cudaStream_t stream = nullptr; // set by the layer to its compute lane's stream
  fpdt_test::a12::recorder* rec = nullptr;
  // Host copy of a [S, H, D] view with contiguous D, on host or device, in index order.
  static std::vector<float> gather(fpdt::tensor_view<float const, 3> const& t) {
    std::vector<float> out(static_cast<std::size_t>(t.size()));
    REQUIRE((t.extent(2) == 1 || t.stride(2) == 1));
    std::size_t at = 0;
    for (index_t a = 0; a < t.extent(0); ++a)
      for (index_t b = 0; b < t.extent(1); ++b, at += static_cast<std::size_t>(t.extent(2)))
        REQUIRE(cudaMemcpy(out.data() + at, &t(a, b, 0), static_cast<std::size_t>(t.extent(2)) * 4,
                           cudaMemcpyDefault) == cudaSuccess);
    return out;
  }
  fpdt::status forward(fpdt::chunk_forward_args<float> const& a) const {
    fpdt::cuda_reference_chunk_kernel k = inner;
    k.stream = stream;
    return k.forward(a);
  }
  fpdt::status backward(fpdt::chunk_backward_args<float> const& a) const {
    FPDT_CUDA_CHECK(cudaStreamSynchronize(stream)); // the fetch of this chunk has been waited for
    rec->put(a.q_offset, a.k_offset, gather(a.k), gather(a.v));
    fpdt::cuda_reference_chunk_kernel k = inner;
    k.stream = stream;
    return k.backward(a);
  }
};
static_assert(fpdt::chunk_kernel<recording_device_kernel, float>);
} // namespace

TEST_CASE("cuda fpdt_attention: A12 the backward reads the chunk that was offloaded") {
  auto be = make_backend();
  fpdt_test::a12::check([&](problem<float> const& p, fpdt::fpdt_attention_options const& o,
                            fpdt_test::a12::recorder& rec) {
    recording_device_kernel kernel;
    kernel.rec = &rec;
    return run_on_device<float, recording_device_kernel>(*be, p, o, kernel);
  });
}
