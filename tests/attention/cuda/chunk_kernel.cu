// GPU tests of include/fpdt/attention/cuda/: the reference and tensor-core chunk kernels, driven
// by the same chunked driver as the host kernel's tests (chunked_driver.hpp: forward partials
// merged with merge_partials, delta, a backward per chunk pair) against the float64 dense
// reference. CASES.md A4, A5, A6, A8, A10, A11, A13; random chunk splits with global offsets, GQA,
// odd lengths; extreme scores; layouts; argument errors. Skipped without a device (main.cu).
#include "../chunked_driver.hpp"
#include "../padded_buffers_case.hpp"
#include "../reference.hpp"
#include "device_kernel.cuh"
#include "external_impls.cuh"

#include <fpdt/attention/cuda/external_kernel.cuh>
#include <fpdt/attention/cuda/flash_attention.cuh>
#include <fpdt/attention/cuda/reference_attention.cuh>

#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

using fpdt::index_t;
using namespace fpdt_test::chunked;
using fpdt_test::attn_shape;
using fpdt_test::on_device;

static_assert(fpdt::chunk_kernel<fpdt::cuda_reference_chunk_kernel, float>);
static_assert(fpdt::chunk_kernel<fpdt::cuda_reference_chunk_kernel, fpdt::bfloat16>);
static_assert(fpdt::chunk_kernel<fpdt::cuda_flash_chunk_kernel, fpdt::bfloat16>);
static_assert(fpdt::chunk_kernel<fpdt::cuda_flash_chunk_kernel, fpdt::half>);
static_assert(!fpdt::chunk_kernel<fpdt::cuda_flash_chunk_kernel, float>);

namespace {

// A kernel, an element type, the head dimension the exact cases use, and the tolerance of its
// scaled errors against float64 (see errors_against_reference). The reference kernel computes in
// fp32 throughout; the tensor-core kernel rounds P and dS to the 16-bit type before the second
// product of each pair (as FlashAttention does), which bounds its error by that type's epsilon.
struct ref_f32 {
  using kernel = fpdt::cuda_reference_chunk_kernel;
  using type = float;
  static constexpr index_t d = 8;
  static constexpr double tol = 5e-5;
};
struct ref_bf16 {
  using kernel = fpdt::cuda_reference_chunk_kernel;
  using type = fpdt::bfloat16;
  static constexpr index_t d = 8;
  static constexpr double tol = 5e-5;
};
struct flash_bf16 {
  using kernel = fpdt::cuda_flash_chunk_kernel;
  using type = fpdt::bfloat16;
  static constexpr index_t d = 64;
  static constexpr double tol = 1e-2; // H200, 2026-11-29: worst 2.9e-3
};
struct flash_f16 {
  using kernel = fpdt::cuda_flash_chunk_kernel;
  using type = fpdt::half;
  static constexpr index_t d = 64;
  static constexpr double tol = 2e-3; // H200, 2026-11-29: worst 3.3e-4
};

template <class C> on_device<typename C::kernel> device_kernel() { return {}; }

template <class T>
problem<T> filled(attn_shape s, auto q_fn, auto k_fn, auto v_fn) {
  std::vector<double> q(s.q_size()), k(s.kv_size()), v(s.kv_size()), dout(s.q_size());
  for (index_t i = 0; i < s.sq; ++i)
    for (index_t h = 0; h < s.h; ++h)
      for (index_t x = 0; x < s.d; ++x) {
        auto const at = static_cast<std::size_t>((i * s.h + h) * s.d + x);
        q[at] = q_fn(i, h, x);
        dout[at] = 0.25 * static_cast<double>((i + h + x) % 5) - 0.5;
      }
  for (index_t j = 0; j < s.sk; ++j)
    for (index_t g = 0; g < s.hkv; ++g)
      for (index_t x = 0; x < s.d; ++x) {
        auto const at = static_cast<std::size_t>((j * s.hkv + g) * s.d + x);
        k[at] = k_fn(j, g, x);
        v[at] = v_fn(j, g, x);
      }
  return from_double<T>(s, q, k, v, dout);
}

double at_out(run_result const& r, attn_shape const& s, index_t i, index_t h, index_t x) {
  return r.out[static_cast<std::size_t>((i * s.h + h) * s.d + x)];
}
double at_lse(run_result const& r, attn_shape const& s, index_t h, index_t i) {
  return r.lse[static_cast<std::size_t>(h * s.sq + i)];
}

} // namespace

#define FPDT_CUDA_CONFIGS ref_f32, ref_bf16, flash_bf16, flash_f16

TEST_CASE_TEMPLATE("cuda chunk kernel: A4 GQA head order and lse", C, FPDT_CUDA_CONFIGS) {
  using T = typename C::type;
  attn_shape const s{4, 4, 8, 2, C::d};
  auto p = filled<T>(
      s, [](index_t i, index_t h, index_t x) { return 0.1 * static_cast<double>(i + h + x); },
      [](index_t, index_t, index_t) { return 0.0; },
      [](index_t, index_t g, index_t) { return static_cast<double>(g + 1); });
  for (bool causal : {false, true}) {
    CAPTURE(causal);
    run_options o;
    o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
    run_result const r = run_chunked(p, o, device_kernel<C>());
    for (index_t i = 0; i < s.sq; ++i)
      for (index_t h = 0; h < s.h; ++h) {
        CHECK(at_out(r, s, i, h, 0) == static_cast<double>(h / 4 + 1));
        CHECK(at_out(r, s, i, h, s.d - 1) == static_cast<double>(h / 4 + 1));
        double const want = causal ? std::log(static_cast<double>(i + 1)) : std::log(4.0);
        CHECK(std::abs(at_lse(r, s, h, i) - want) < 1e-6);
      }
    check_against_reference(r, reference_of(p, o), p, C::tol);
  }
}

TEST_CASE_TEMPLATE("cuda chunk kernel: A5 causal alignment with global offsets", C,
                   FPDT_CUDA_CONFIGS) {
  using T = typename C::type;
  attn_shape const s{3, 5, 1, 1, C::d};
  auto p = filled<T>(
      s, [](index_t, index_t, index_t) { return 1.0; },
      [](index_t, index_t, index_t) { return 0.0; },
      [](index_t j, index_t, index_t) { return static_cast<double>(j); });
  run_options o;
  o.mask = fpdt::causal_mask;
  o.q_offset = 2; // queries at global positions 2, 3, 4; keys at 0..4
  run_result const r = run_chunked(p, o, device_kernel<C>());
  double const want_out[] = {1.0, 1.5, 2.0};
  for (index_t i = 0; i < 3; ++i) {
    CHECK(at_out(r, s, i, 0, 0) == want_out[i]);
    CHECK(std::abs(at_lse(r, s, 0, i) - std::log(static_cast<double>(i + 3))) < 1e-6);
  }
  // S = 10 in uneven chunks 4, 4, 2 equals dense causal.
  attn_shape const s10{10, 10, 2, 1, C::d};
  auto p10 = random_problem<T>(s10, 55);
  run_options o10;
  o10.mask = fpdt::causal_mask;
  o10.q_chunks = {4, 4, 2};
  o10.k_chunks = {4, 4, 2};
  check_against_reference(run_chunked(p10, o10, device_kernel<C>()), reference_of(p10, o10), p10,
                          C::tol);
}

TEST_CASE_TEMPLATE("cuda chunk kernel: A6 fully masked rows", C, FPDT_CUDA_CONFIGS) {
  using T = typename C::type;
  attn_shape const s{5, 3, 1, 1, C::d};
  auto p = filled<T>(
      s, [](index_t i, index_t, index_t x) { return 0.5 * static_cast<double>((i + x) % 3); },
      [](index_t, index_t, index_t) { return 0.0; },
      [](index_t j, index_t, index_t) { return static_cast<double>(j); });
  run_options o;
  o.mask = fpdt::causal_mask;
  o.k_offset = 2; // keys at global positions 2, 3, 4: rows 0 and 1 see nothing
  run_result const r = run_chunked(p, o, device_kernel<C>());
  for (index_t i = 0; i < 2; ++i) {
    CHECK(at_lse(r, s, 0, i) == -fpdt_test::inf64);
    for (index_t x = 0; x < s.d; ++x) {
      CHECK(at_out(r, s, i, 0, x) == 0.0);
      CHECK(r.dq[static_cast<std::size_t>(i * s.d + x)] == 0.0f);
    }
  }
  double const want_out[] = {0.0, 0.5, 1.0};
  for (index_t i = 2; i < 5; ++i) {
    CHECK(at_out(r, s, i, 0, 0) == want_out[i - 2]);
    CHECK(std::abs(at_lse(r, s, 0, i) - std::log(static_cast<double>(i - 1))) < 1e-6);
  }
  CHECK(fpdt_test::no_nan(r.dq));
  CHECK(fpdt_test::no_nan(r.dk));
  CHECK(fpdt_test::no_nan(r.dv));
  check_against_reference(r, reference_of(p, o), p, C::tol);
}

TEST_CASE_TEMPLATE("cuda chunk kernel: A8 zero keys", C, FPDT_CUDA_CONFIGS) {
  using T = typename C::type;
  attn_shape const s{4, 0, 2, 2, C::d};
  auto p = random_problem<T>(s, 8);
  run_options o;
  run_result const r = run_chunked(p, o, device_kernel<C>());
  for (float x : r.out)
    CHECK(x == 0.0f);
  for (float x : r.lse)
    CHECK(x == -fpdt_test::inf32);
  for (float x : r.dq)
    CHECK(x == 0.0f);
}

TEST_CASE_TEMPLATE("cuda chunk kernel: random chunk splits with offsets and GQA match float64", C,
                   FPDT_CUDA_CONFIGS) {
  using T = typename C::type;
  for (index_t d : {C::d, index_t{2} * C::d})
    for (bool causal : {false, true}) {
      CAPTURE(d);
      CAPTURE(causal);
      attn_shape const s{150, 211, 4, 2, d};
      auto p = random_problem<T>(s, 1000 + static_cast<std::uint32_t>(d) + causal);
      run_options o;
      o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
      o.q_offset = 61; // queries at 61..210, keys at 0..210: the last rows see every key
      o.q_chunks = random_split(s.sq, 7, true);
      o.k_chunks = random_split(s.sk, 9, false, true);
      scaled_errors const e = check_against_reference(run_chunked(p, o, device_kernel<C>()),
                                                      reference_of(p, o), p, C::tol);
      MESSAGE(type_name<T>(), " D=", d, " causal=", causal, ": out ", e.out, " lse ", e.lse,
              " dq ", e.dq, " dk ", e.dk, " dv ", e.dv);
    }
}

TEST_CASE_TEMPLATE("cuda chunk kernel: scores of standard deviation 30 give no NaN or inf", C,
                   FPDT_CUDA_CONFIGS) {
  using T = typename C::type;
  attn_shape const s{70, 70, 2, 1, C::d};
  auto p = random_problem<T>(s, 77, 30.0); // scaled scores of standard deviation ~30
  run_options o;
  o.mask = fpdt::causal_mask;
  run_result const r = run_chunked(p, o, device_kernel<C>());
  for (auto const* v : {&r.out, &r.dq, &r.dk, &r.dv})
    for (float x : *v)
      CHECK(std::isfinite(x));
  for (float x : r.lse)
    CHECK(std::isfinite(x));
}

TEST_CASE("cuda chunk kernel: A11 precision vs chunk count (S=4096 bf16 causal)") {
  // Error of 16 chunks at most 1.5x the error of 1 chunk (plus a floor for the tiny errors).
  attn_shape const s{4096, 4096, 4, 4, 64};
  auto p = random_problem<fpdt::bfloat16>(s, 11);
  run_options o1;
  o1.mask = fpdt::causal_mask;
  run_options o16 = o1;
  o16.q_chunks.assign(16, 256);
  o16.k_chunks.assign(16, 256);
  o16.skip_invisible = true;
  ref_result const ref = reference_of(p, o1);
  auto const kernel = on_device<fpdt::cuda_flash_chunk_kernel>{};
  scaled_errors const e1 = errors_against_reference(run_chunked(p, o1, kernel), ref, p, true);
  scaled_errors const e16 = errors_against_reference(run_chunked(p, o16, kernel), ref, p, true);
  MESSAGE("1 chunk: out ", e1.out, " dq ", e1.dq, " dk ", e1.dk, " dv ", e1.dv, "; 16 chunks: out ",
          e16.out, " dq ", e16.dq, " dk ", e16.dk, " dv ", e16.dv);
  CHECK(e16.out <= 1.5 * e1.out + 1e-4);
  CHECK(e16.dq <= 1.5 * e1.dq + 1e-4);
  CHECK(e16.dk <= 1.5 * e1.dk + 1e-4);
  CHECK(e16.dv <= 1.5 * e1.dv + 1e-4);
  CHECK(e16.worst() <= flash_bf16::tol);
}

namespace {
// The flash kernel called directly on device views whose layout the test picks: q, k, v, dout in
// [S, H, D] (contiguous) or [H, S, D] (head-major) memory; out, lse, dq, dk, dv contiguous.
template <class T>
run_result run_layout(problem<T> const& p, bool head_major, fpdt::attention_mask mask) {
  attn_shape const& s = p.s;
  auto device_in = [&](std::vector<T> const& host, index_t rows, index_t heads) {
    std::vector<T> arranged(host.size());
    for (index_t i = 0; i < rows; ++i)
      for (index_t h = 0; h < heads; ++h)
        for (index_t x = 0; x < s.d; ++x) {
          auto const src = static_cast<std::size_t>((i * heads + h) * s.d + x);
          auto const dst = head_major ? static_cast<std::size_t>((h * rows + i) * s.d + x) : src;
          arranged[dst] = host[src];
        }
    auto buf = std::make_unique<fpdt_test::device_buffer<T>>(arranged.size());
    cudaMemcpy(buf->ptr, arranged.data(), arranged.size() * sizeof(T), cudaMemcpyHostToDevice);
    std::array<index_t, 3> const ext{rows, heads, s.d};
    std::array<index_t, 3> const str = head_major ? std::array<index_t, 3>{s.d, rows * s.d, 1}
                                                  : std::array<index_t, 3>{heads * s.d, s.d, 1};
    auto v = fpdt::make_tensor_view<T const>(buf->ptr, ext, str).value();
    return std::pair{std::move(buf), v};
  };
  auto [qb, q] = device_in(p.q, s.sq, s.h);
  auto [kb, k] = device_in(p.k, s.sk, s.hkv);
  auto [vb, v] = device_in(p.v, s.sk, s.hkv);
  auto [db, dout] = device_in(p.dout, s.sq, s.h);
  fpdt_test::device_buffer<float> out(s.q_size()), lse(s.lse_size()), delta(s.lse_size());
  fpdt_test::device_buffer<float> dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  out.poison();
  lse.poison();
  cudaMemset(dq.ptr, 0, dq.n * 4);
  cudaMemset(dk.ptr, 0, dk.n * 4);
  cudaMemset(dv.ptr, 0, dv.n * 4);
  fpdt::cuda_flash_chunk_kernel const kernel{};
  fpdt::chunk_forward_args<T> f{};
  f.q = q;
  f.k = k;
  f.v = v;
  f.out = {fpdt::contiguous_view(out.ptr, s.q_ext()).value(),
           fpdt::contiguous_view(lse.ptr, s.lse_ext()).value()};
  f.mask = mask;
  REQUIRE(kernel.forward(f).ok());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  run_result r;
  r.out.resize(out.n);
  r.lse.resize(lse.n);
  cudaMemcpy(r.out.data(), out.ptr, out.n * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(r.lse.data(), lse.ptr, lse.n * 4, cudaMemcpyDeviceToHost);
  std::vector<float> delta_h(s.lse_size());
  REQUIRE(fpdt::compute_delta(fpdt_test::cview(r.out, s.q_ext()), fpdt_test::cview(p.dout, s.q_ext()),
                              fpdt_test::view(delta_h, s.lse_ext()))
              .ok());
  cudaMemcpy(delta.ptr, delta_h.data(), delta.n * 4, cudaMemcpyHostToDevice);
  fpdt::chunk_backward_args<T> b{};
  b.q = q;
  b.k = k;
  b.v = v;
  b.dout = dout;
  b.lse = fpdt::contiguous_view<float const>(lse.ptr, s.lse_ext()).value();
  b.delta = fpdt::contiguous_view<float const>(delta.ptr, s.lse_ext()).value();
  b.dq = fpdt::contiguous_view(dq.ptr, s.q_ext()).value();
  b.dk = fpdt::contiguous_view(dk.ptr, s.kv_ext()).value();
  b.dv = fpdt::contiguous_view(dv.ptr, s.kv_ext()).value();
  b.mask = mask;
  REQUIRE(kernel.backward(b).ok());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  r.dq.resize(dq.n);
  r.dk.resize(dk.n);
  r.dv.resize(dv.n);
  cudaMemcpy(r.dq.data(), dq.ptr, dq.n * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(r.dk.data(), dk.ptr, dk.n * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(r.dv.data(), dv.ptr, dv.n * 4, cudaMemcpyDeviceToHost);
  return r;
}
} // namespace

TEST_CASE_TEMPLATE("cuda chunk kernel: A10 lse and out buffers with NaN padding", C, ref_f32,
                   flash_bf16, flash_f16) {
  // The host test's body (padded_buffers_case.hpp) on device buffers: the padding must stay NaN
  // in device memory too.
  fpdt_test::padded_buffers_case<typename C::type, fpdt_test::device_memory>(typename C::kernel{}, C::tol);
}

TEST_CASE("cuda chunk kernel: A13 S=16 H=16 D=64 in contiguous and head-major layouts") {
  attn_shape const s{16, 16, 16, 16, 64};
  auto p = random_problem<fpdt::bfloat16>(s, 13);
  for (bool causal : {false, true})
    for (bool head_major : {false, true}) {
      CAPTURE(causal);
      CAPTURE(head_major);
      run_options o;
      o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
      check_against_reference(run_layout(p, head_major, o.mask), reference_of(p, o), p,
                              flash_bf16::tol);
    }
}

TEST_CASE("cuda chunk kernel: argument errors name the rule and leave outputs untouched") {
  attn_shape const s{8, 8, 2, 2, 64};
  auto p = random_problem<fpdt::bfloat16>(s, 3);
  std::vector<float> out(s.q_size(), 7.0f), lse(s.lse_size(), 7.0f);
  fpdt::chunk_forward_args<fpdt::bfloat16> f{};
  f.q = fpdt_test::cview(p.q, s.q_ext());
  f.k = fpdt_test::cview(p.k, s.kv_ext());
  f.v = fpdt_test::cview(p.v, s.kv_ext());
  f.out = {fpdt_test::view(out, s.q_ext()), fpdt_test::view(lse, s.lse_ext())};
  // Pageable host memory: refused before any launch.
  for (fpdt::status st : {fpdt::cuda_flash_chunk_kernel{}.forward(f),
                          fpdt::cuda_reference_chunk_kernel{}.forward(f)}) {
    CHECK(st.code() == fpdt::errc::invalid_argument);
    CHECK(contains(st.message(), "pageable host memory"));
  }
  // Head dimension 96: not supported by the tensor-core kernel.
  attn_shape const s96{8, 8, 2, 2, 96};
  auto p96 = random_problem<fpdt::bfloat16>(s96, 4);
  std::vector<float> out96(s96.q_size(), 7.0f);
  f.q = fpdt_test::cview(p96.q, s96.q_ext());
  f.k = fpdt_test::cview(p96.k, s96.kv_ext());
  f.v = fpdt_test::cview(p96.v, s96.kv_ext());
  f.out = {fpdt_test::view(out96, s96.q_ext()), fpdt_test::view(lse, s96.lse_ext())};
  fpdt::status const st96 = fpdt::cuda_flash_chunk_kernel{}.forward(f);
  CHECK(st96.code() == fpdt::errc::not_supported);
  CHECK(contains(st96.message(), "D = 96"));
  // A row stride that is not a multiple of 8 elements (device memory, so only the layout fails).
  fpdt_test::device_buffer<fpdt::bfloat16> q(static_cast<std::size_t>(8 * 2 * 68));
  f = {};
  f.q = fpdt::make_tensor_view<fpdt::bfloat16 const>(q.ptr, std::array<index_t, 3>{8, 2, 64},
                                                     std::array<index_t, 3>{2 * 68 - 4, 64, 1})
            .value();
  f.k = f.q;
  f.v = f.q;
  f.out = {fpdt_test::view(out, s.q_ext()), fpdt_test::view(lse, s.lse_ext())};
  fpdt::status const sts = fpdt::cuda_flash_chunk_kernel{}.forward(f);
  CHECK(sts.code() == fpdt::errc::not_supported);
  CHECK(contains(sts.message(), "multiples of 8"));
  for (float x : out)
    CHECK(x == 7.0f);
  for (float x : lse)
    CHECK(x == 7.0f);
  CHECK(cudaGetLastError() == cudaSuccess);
}


TEST_CASE("cuda chunk kernel: external_chunk_kernel converts LSE base and empty rows") {
  using kernel = on_device<fpdt::external_chunk_kernel<fpdt_test::log2_plus_inf_kernel>>;
  static_assert(fpdt::chunk_kernel<fpdt::external_chunk_kernel<fpdt_test::log2_plus_inf_kernel>, float>);
  // Inside fpdt_attention its backward's lse scratch comes from the layer's arena (the layer test
  // checks the peak against the prediction); called alone, as here, it allocates its own.
  static_assert(fpdt::kernel_with_workspace<fpdt::external_chunk_kernel<fpdt_test::log2_plus_inf_kernel>>);
  // A6's fully masked rows, then random chunk splits: both as the reference kernel gives them.
  attn_shape const s{5, 3, 1, 1, 8};
  auto p = random_problem<float>(s, 21);
  run_options o;
  o.mask = fpdt::causal_mask;
  o.k_offset = 2;
  run_result const r = run_chunked(p, o, kernel{});
  for (index_t i = 0; i < 2; ++i) {
    CHECK(at_lse(r, s, 0, i) == -fpdt_test::inf64);
    CHECK(at_out(r, s, i, 0, 0) == 0.0);
  }
  check_against_reference(r, reference_of(p, o), p, ref_f32::tol);
  attn_shape const s2{90, 120, 4, 2, 16};
  auto p2 = random_problem<float>(s2, 22);
  run_options o2;
  o2.mask = fpdt::causal_mask;
  o2.q_offset = 30;
  o2.q_chunks = random_split(s2.sq, 5, true);
  o2.k_chunks = random_split(s2.sk, 6, false);
  check_against_reference(run_chunked(p2, o2, kernel{}), reference_of(p2, o2), p2, ref_f32::tol);
}
