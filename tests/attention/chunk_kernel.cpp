// Tests of include/fpdt/attention/chunk_kernel.hpp and host/chunk_attention.hpp: the host chunk
// kernel against the float64 dense reference in reference.hpp. CASES.md A4, A5, A6, A8, A10, A11,
// A13; chunked forward/backward over arbitrary key splits merged with merge_partials; GQA; odd
// lengths; global offsets; thread counts; finite differences; extreme scores; argument errors.
#include "chunked_driver.hpp"
#include "padded_buffers_case.hpp"
#include "reference.hpp"

#include <fpdt/attention/chunk_kernel.hpp>
#include <fpdt/attention/host/chunk_attention.hpp>
#include <fpdt/attention/mask.hpp>
#include <fpdt/attention/online_softmax.hpp>
#include <fpdt/core/bfloat16.hpp>
#include <fpdt/core/half.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

using fpdt::index_t;
using fpdt_test::attn_shape;
using fpdt_test::cview;
using fpdt_test::ref_options;
using fpdt_test::ref_result;
using fpdt_test::view;

static_assert(fpdt::chunk_kernel<fpdt::host_chunk_kernel, float>);
static_assert(fpdt::chunk_kernel<fpdt::host_chunk_kernel, fpdt::bfloat16>);
static_assert(fpdt::chunk_kernel<fpdt::host_chunk_kernel, fpdt::half>);

using namespace fpdt_test::chunked;

// ---------------------------------------------------------------------------------------------
// CASES.md
// ---------------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("chunk kernel: A4 GQA head order and lse", T, float, fpdt::bfloat16,
                   fpdt::half) {
  // S = 4, H = 8, H_kv = 2, D = 4, K = 0, V of kv head g filled with g + 1: query head h must read
  // kv head h / 4, giving [1,1,1,1,2,2,2,2] (tiled order would give 1,2,1,2,...).
  attn_shape const s{4, 4, 8, 2, 4};
  std::vector<double> q = fpdt_test::random_normal(s.q_size(), 41), k(s.kv_size(), 0.0),
                      v(s.kv_size());
  for (index_t j = 0; j < s.sk; ++j)
    for (index_t g = 0; g < s.hkv; ++g)
      for (index_t x = 0; x < s.d; ++x)
        v[static_cast<std::size_t>((j * s.hkv + g) * s.d + x)] = double(g + 1);
  auto p = from_double<T>(s, q, k, v, fpdt_test::random_normal(s.q_size(), 42));
  for (bool causal : {false, true}) {
    CAPTURE(causal);
    run_options o;
    o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
    run_result const r = run_chunked(p, o);
    for (index_t i = 0; i < s.sq; ++i)
      for (index_t hh = 0; hh < s.h; ++hh) {
        CAPTURE(i);
        CAPTURE(hh);
        double const want = hh < 4 ? 1.0 : 2.0;
        for (index_t x = 0; x < s.d; ++x)
          CHECK(r.out[static_cast<std::size_t>((i * s.h + hh) * s.d + x)] ==
                doctest::Approx(want).epsilon(1e-6));
        double const want_lse = std::log(causal ? double(i + 1) : 4.0);
        CHECK(r.lse[static_cast<std::size_t>(hh * s.sq + i)] ==
              doctest::Approx(want_lse).epsilon(1e-6));
      }
    check_against_reference(r, reference_of(p, o), p, fp32_tol);
  }
}

TEST_CASE_TEMPLATE("chunk kernel: A5 causal alignment with uneven chunks", T, float, fpdt::bfloat16,
                   fpdt::half) {
  SUBCASE("queries at 2 3 4 against keys 0..4") {
    // H = 1, D = 4, K = 0, V at key j = j: rows are means of keys 0..2, 0..3, 0..4.
    attn_shape const s{3, 5, 1, 1, 4};
    std::vector<double> v(s.kv_size());
    for (index_t j = 0; j < 5; ++j)
      for (index_t x = 0; x < 4; ++x)
        v[static_cast<std::size_t>(j * 4 + x)] = double(j);
    auto p = from_double<T>(s, fpdt_test::random_normal(s.q_size(), 51),
                            std::vector<double>(s.kv_size(), 0.0), v,
                            fpdt_test::random_normal(s.q_size(), 52));
    run_options o;
    o.mask = fpdt::causal_mask;
    o.q_offset = 2;
    run_result const r = run_chunked(p, o);
    double const want[3] = {1.0, 1.5, 2.0};
    for (index_t i = 0; i < 3; ++i) {
      for (index_t x = 0; x < 4; ++x)
        CHECK(r.out[static_cast<std::size_t>(i * 4 + x)] == doctest::Approx(want[i]).epsilon(1e-6));
      CHECK(r.lse[static_cast<std::size_t>(i)] ==
            doctest::Approx(std::log(3.0 + double(i))).epsilon(1e-6));
    }
    check_against_reference(r, reference_of(p, o), p, fp32_tol);
    // The same keys split 2 + 3 (the second chunk straddles every query position).
    o.k_chunks = {2, 3};
    check_against_reference(run_chunked(p, o), reference_of(p, o), p, fp32_tol);
  }
  SUBCASE("S = 10 in chunks 4 4 2 equals dense causal") {
    attn_shape const s{10, 10, 2, 1, 8};
    auto p = random_problem<T>(s, 53);
    run_options o;
    o.mask = fpdt::causal_mask;
    o.q_chunks = {4, 4, 2};
    o.k_chunks = {4, 4, 2};
    ref_result const ref = reference_of(p, o);
    check_against_reference(run_chunked(p, o), ref, p, fp32_tol);
    o.skip_invisible = true; // as FPDT's causal schedule runs it: pairs j <= i only
    check_against_reference(run_chunked(p, o), ref, p, fp32_tol);
  }
}

TEST_CASE_TEMPLATE("chunk kernel: A6 fully masked rows", T, float, fpdt::bfloat16, fpdt::half) {
  // Queries at global positions 0..4, keys at 2, 3, 4 (rows 0 and 1 see nothing), causal.
  attn_shape const s{5, 3, 2, 1, 4};
  std::vector<double> v(s.kv_size());
  for (index_t j = 0; j < 3; ++j)
    for (index_t x = 0; x < 4; ++x)
      v[static_cast<std::size_t>(j * 4 + x)] = double(j);
  for (bool zero_k : {true, false}) {
    // K = 0 is the case as given; with random K, dq of the visible rows is not trivially 0, so
    // "dq exactly 0" on the masked rows is a real check.
    CAPTURE(zero_k);
    std::vector<double> const k =
        zero_k ? std::vector<double>(s.kv_size(), 0.0) : fpdt_test::random_normal(s.kv_size(), 61);
    auto p = from_double<T>(s, fpdt_test::random_normal(s.q_size(), 62), k, v,
                            fpdt_test::random_normal(s.q_size(), 63));
    run_options o;
    o.mask = fpdt::causal_mask;
    o.k_offset = 2;
    run_result const r = run_chunked(p, o);
    for (index_t i = 0; i < 5; ++i)
      for (index_t hh = 0; hh < s.h; ++hh) {
        CAPTURE(i);
        CAPTURE(hh);
        float const lse = r.lse[static_cast<std::size_t>(hh * 5 + i)];
        for (index_t x = 0; x < 4; ++x) {
          std::size_t const at = static_cast<std::size_t>((i * s.h + hh) * 4 + x);
          if (i < 2) {
            CHECK(r.out[at] == 0.0f);
            CHECK_FALSE(std::signbit(r.out[at]));
            CHECK(r.dq[at] == 0.0f);
          } else if (zero_k) {
            CHECK(r.out[at] == doctest::Approx(0.5 * double(i - 2)).epsilon(1e-6));
          }
        }
        if (i < 2)
          CHECK(lse == ninf);
        else if (zero_k)
          CHECK(lse == doctest::Approx(std::log(double(i - 1))).epsilon(1e-6));
      }
    CHECK(fpdt_test::no_nan(r.dq));
    CHECK(fpdt_test::no_nan(r.dk));
    CHECK(fpdt_test::no_nan(r.dv));
    check_against_reference(r, reference_of(p, o), p, fp32_tol);
    if (!zero_k) {
      double dq_visible = 0.0;
      for (std::size_t at = 2 * s.h * 4; at < r.dq.size(); ++at)
        dq_visible = std::max(dq_visible, double{std::abs(r.dq[at])});
      CHECK(dq_visible > 0.0);
    }
  }
}

TEST_CASE_TEMPLATE("chunk kernel: A8 zero keys", T, float, fpdt::bfloat16, fpdt::half) {
  // 4 queries, H = 2, D = 8, Sk = 0 (null data: the kernel must not touch it).
  constexpr index_t sq = 4, h = 2, d = 8;
  std::vector<T> q =
      fpdt_test::convert<T>(fpdt_test::random_normal(static_cast<std::size_t>(sq * h * d), 81));
  fpdt::tensor_view<T const, 3> const empty_kv(nullptr, {0, h, d}, {h * d, d, 1});
  fpdt::host_chunk_kernel const kernel{2};
  std::vector<float> e_out(sq * h * d, fnan), e_lse(h * sq, fnan);
  fpdt::partial_view const empty_state{view(e_out, std::array<index_t, 3>{sq, h, d}),
                                       view(e_lse, std::array<index_t, 2>{h, sq})};
  for (fpdt::attention_mask m : {fpdt::full_mask, fpdt::causal_mask}) {
    CAPTURE(fpdt::to_string(m.kind));
    fpdt::chunk_forward_args<T> a{};
    a.q = cview(q, std::array<index_t, 3>{sq, h, d});
    a.k = empty_kv;
    a.v = empty_kv;
    a.out = empty_state;
    a.mask = m;
    a.k_offset = 3;
    REQUIRE(kernel.forward(a).ok());
    for (float x : e_out) {
      CHECK(x == 0.0f);
      CHECK_FALSE(std::signbit(x));
    }
    for (float x : e_lse)
      CHECK(x == ninf);
  }
  // A real chunk's state (5 keys, full mask).
  attn_shape const s{sq, 5, h, 1, d};
  auto p = random_problem<T>(s, 82);
  p.q = q;
  p.qd = fpdt_test::to_double(q);
  run_options o;
  run_result const real = run_chunked(p, o);
  // Merging the empty state into the real one, and the real one into the empty one, returns the
  // real state bit for bit.
  {
    std::vector<float> out = real.out, lse = real.lse;
    fpdt::partial_view acc{view(out, s.q_ext()), view(lse, s.lse_ext())};
    REQUIRE(fpdt::merge_partials(acc, fpdt::partial_cview(empty_state)).ok());
    CHECK(std::memcmp(out.data(), real.out.data(), out.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(lse.data(), real.lse.data(), lse.size() * sizeof(float)) == 0);
  }
  {
    std::vector<float> out = e_out, lse = e_lse;
    std::vector<float> rout = real.out, rlse = real.lse;
    fpdt::partial_view acc{view(out, s.q_ext()), view(lse, s.lse_ext())};
    fpdt::partial_view other{view(rout, s.q_ext()), view(rlse, s.lse_ext())};
    REQUIRE(fpdt::merge_partials(acc, fpdt::partial_cview(other)).ok());
    CHECK(std::memcmp(out.data(), real.out.data(), out.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(lse.data(), real.lse.data(), lse.size() * sizeof(float)) == 0);
  }
  // Backward with zero keys (final lse and delta of the real state) adds exactly 0 to dq.
  std::vector<float> delta(h * sq);
  REQUIRE(fpdt::compute_delta(cview(real.out, s.q_ext()), cview(p.dout, s.q_ext()),
                              view(delta, s.lse_ext()))
              .ok());
  std::vector<float> dq =
      fpdt_test::convert<float>(fpdt_test::random_normal(static_cast<std::size_t>(sq * h * d), 83));
  std::vector<float> const dq0 = dq;
  fpdt::chunk_backward_args<T> b{};
  b.q = cview(p.q, s.q_ext());
  b.k = empty_kv;
  b.v = empty_kv;
  b.dout = cview(p.dout, s.q_ext());
  b.lse = cview(real.lse, s.lse_ext());
  b.delta = cview(delta, s.lse_ext());
  b.dq = view(dq, s.q_ext());
  b.dk = fpdt::tensor_view<float, 3>(nullptr, {0, h, d}, {h * d, d, 1});
  b.dv = b.dk;
  b.mask = fpdt::causal_mask;
  REQUIRE(kernel.backward(b).ok());
  CHECK(std::memcmp(dq.data(), dq0.data(), dq.size() * sizeof(float)) == 0);
  // Zero queries: nothing to do, nothing written, no error.
  std::vector<float> z_out, z_lse;
  fpdt::chunk_forward_args<T> z{};
  z.q = fpdt::tensor_view<T const, 3>(nullptr, {0, h, d}, {h * d, d, 1});
  z.k = cview(p.k, s.kv_ext());
  z.v = cview(p.v, s.kv_ext());
  z.out = {fpdt::tensor_view<float, 3>(nullptr, {0, h, d}, {h * d, d, 1}),
           fpdt::tensor_view<float, 2>(nullptr, {h, 0}, {0, 1})};
  CHECK(kernel.forward(z).ok());
}

TEST_CASE("chunk kernel: A10 lse buffer with NaN padding") {
  // H = 2, S = 16, D = 128; lse, delta, out and dq inside NaN-padded buffers (see
  // padded_buffers_case.hpp, shared with the GPU test).
  fpdt_test::padded_buffers_case<float, fpdt_test::host_memory>(fpdt::host_chunk_kernel{2}, fp32_tol);
}

TEST_CASE("chunk kernel: A11 precision vs chunk count (S=4096 bf16 causal)") {
  // S = 4096, H = 4, D = 64, bf16 inputs from N(0, 1), causal. For u in {1, 2, 4, 8, 16}: queries
  // and keys split into u chunks, forward over the causal pairs j <= i merged with merge_partials,
  // out cast to bf16; backward per pair with the final lse and delta (delta from the fp32 merged
  // out). Against float64 dense on the same bf16 values: the error of out (bf16, and fp32 before
  // the cast) and the relative L2 error of dq, dk, dv at every u is at most 1.5x that at u = 1.
  auto const t0 = std::chrono::steady_clock::now();
  attn_shape const s{4096, 4096, 4, 4, 64};
  auto p = random_problem<fpdt::bfloat16>(s, 111);
  run_options o;
  o.mask = fpdt::causal_mask;
  o.skip_invisible = true;
  o.threads = 0;
  ref_result const ref = reference_of(p, o);
  auto const t_ref = std::chrono::steady_clock::now();
  struct errs {
    double out_bf16_l2, out_bf16_max, out_f32_l2, dq, dk, dv;
  };
  std::vector<errs> all;
  for (index_t u : {1, 2, 4, 8, 16}) {
    o.q_chunks.assign(static_cast<std::size_t>(u), s.sq / u);
    o.k_chunks = o.q_chunks;
    auto const tu = std::chrono::steady_clock::now();
    run_result const r = run_chunked(p, o);
    double const secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - tu).count();
    std::vector<fpdt::bfloat16> const out_bf16 =
        fpdt_test::convert<fpdt::bfloat16>(fpdt_test::to_double(r.out));
    auto const eb = fpdt_test::compare(out_bf16, ref.out);
    errs const e{eb.rel_l2,
                 eb.max_abs,
                 fpdt_test::compare(r.out, ref.out).rel_l2,
                 fpdt_test::compare(r.dq, ref.dq).rel_l2,
                 fpdt_test::compare(r.dk, ref.dk).rel_l2,
                 fpdt_test::compare(r.dv, ref.dv).rel_l2};
    MESSAGE("A11 u=" << u << ": out(bf16) rel_l2 " << e.out_bf16_l2 << " max_abs " << e.out_bf16_max
                     << ", out(fp32) rel_l2 " << e.out_f32_l2 << ", dq " << e.dq << ", dk " << e.dk
                     << ", dv " << e.dv << " (" << secs << " s)");
    CHECK(fpdt_test::all_finite(r.dq));
    CHECK(fpdt_test::all_finite(r.dk));
    CHECK(fpdt_test::all_finite(r.dv));
    // Sanity bounds independent of u: bf16 output rounding (2^-9 relative) and fp32 accumulation.
    CHECK(e.out_bf16_l2 < 4e-3);
    CHECK(e.out_f32_l2 < 1e-5);
    CHECK(e.dq < 1e-5);
    CHECK(e.dk < 1e-5);
    CHECK(e.dv < 1e-5);
    all.push_back(e);
  }
  errs const& one = all.front();
  for (std::size_t n = 1; n < all.size(); ++n) {
    CAPTURE(n);
    errs const& e = all[n];
    CHECK(e.out_bf16_l2 <= 1.5 * one.out_bf16_l2);
    CHECK(e.out_bf16_max <= 1.5 * one.out_bf16_max);
    CHECK(e.out_f32_l2 <= 1.5 * one.out_f32_l2);
    CHECK(e.dq <= 1.5 * one.dq);
    CHECK(e.dk <= 1.5 * one.dk);
    CHECK(e.dv <= 1.5 * one.dv);
  }
  auto const t1 = std::chrono::steady_clock::now();
  MESSAGE("A11 time: reference " << std::chrono::duration<double>(t_ref - t0).count()
                                 << " s, total " << std::chrono::duration<double>(t1 - t0).count()
                                 << " s");
}

TEST_CASE("chunk kernel: A13 S=16 H=16 D=64 fp32 in contiguous and head-major layouts") {
  // S == H == 16: a layout mix-up would keep the extents right. Max abs error < 1e-3 (the case),
  // and the fp32 tolerance; then q, k, v, dout, out, dq, dk, dv stored [H, S, D] and lse stored
  // [S, H], viewed through strides as [S, H, D] and [H, S]: same results.
  constexpr index_t S = 16, H = 16, D = 64;
  for (index_t hkv : {H, index_t{4}})
    for (bool causal : {false, true}) {
      CAPTURE(hkv);
      CAPTURE(causal);
      attn_shape const s{S, S, H, hkv, D};
      auto p = random_problem<float>(s, 131);
      run_options o;
      o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
      ref_result const ref = reference_of(p, o);
      run_result const r = run_chunked(p, o);
      CHECK(fpdt_test::compare(r.out, ref.out).max_abs < 1e-3);
      CHECK(fpdt_test::compare(r.lse, ref.lse).max_abs < 1e-3);
      CHECK(fpdt_test::compare(r.dq, ref.dq).max_abs < 1e-3);
      CHECK(fpdt_test::compare(r.dk, ref.dk).max_abs < 1e-3);
      CHECK(fpdt_test::compare(r.dv, ref.dv).max_abs < 1e-3);
      check_against_reference(r, ref, p, fp32_tol);

      // Head-major storage [heads, S, D]; element (s, h, x) at (h * S + s) * D + x.
      auto head_major = [](std::vector<float> const& src, index_t seq, index_t heads) {
        std::vector<float> dst(src.size());
        for (index_t i = 0; i < seq; ++i)
          for (index_t hh = 0; hh < heads; ++hh)
            for (index_t x = 0; x < D; ++x)
              dst[static_cast<std::size_t>((hh * seq + i) * D + x)] =
                  src[static_cast<std::size_t>((i * heads + hh) * D + x)];
        return dst;
      };
      auto hm_view = [](std::vector<float>& buf, index_t seq, index_t heads) {
        auto v = fpdt::make_tensor_view(buf.data(), std::array<index_t, 3>{seq, heads, D},
                                        std::array<index_t, 3>{D, seq * D, 1},
                                        static_cast<index_t>(buf.size()));
        REQUIRE(v.ok());
        return *v;
      };
      std::vector<float> qh = head_major(p.q, S, H), kh = head_major(p.k, S, hkv),
                         vh = head_major(p.v, S, hkv);
      std::vector<float> douth = head_major(p.dout, S, H);
      std::vector<float> outh(s.q_size(), fnan), lseh(s.lse_size(), fnan),
          deltah(s.lse_size(), fnan);
      std::vector<float> dqh(s.q_size(), 0.0f), dkh(s.kv_size(), 0.0f), dvh(s.kv_size(), 0.0f);
      auto lse_t =
          fpdt::make_tensor_view(lseh.data(), std::array<index_t, 2>{H, S},
                                 std::array<index_t, 2>{1, H}, static_cast<index_t>(lseh.size()));
      auto delta_t =
          fpdt::make_tensor_view(deltah.data(), std::array<index_t, 2>{H, S},
                                 std::array<index_t, 2>{1, H}, static_cast<index_t>(deltah.size()));
      REQUIRE(lse_t.ok());
      REQUIRE(delta_t.ok());
      fpdt::host_chunk_kernel const kernel{2};
      fpdt::chunk_forward_args<float> a{};
      a.q = hm_view(qh, S, H);
      a.k = hm_view(kh, S, hkv);
      a.v = hm_view(vh, S, hkv);
      a.out = {hm_view(outh, S, H), *lse_t};
      a.mask = o.mask;
      REQUIRE(kernel.forward(a).ok());
      REQUIRE(fpdt::compute_delta(fpdt::tensor_view<float const, 3>(a.out.out),
                                  fpdt::tensor_view<float const, 3>(hm_view(douth, S, H)), *delta_t)
                  .ok());
      fpdt::chunk_backward_args<float> b{};
      b.q = a.q;
      b.k = a.k;
      b.v = a.v;
      b.out = a.out.out;
      b.dout = hm_view(douth, S, H);
      b.lse = *lse_t;
      b.delta = *delta_t;
      b.dq = hm_view(dqh, S, H);
      b.dk = hm_view(dkh, S, hkv);
      b.dv = hm_view(dvh, S, hkv);
      b.mask = o.mask;
      REQUIRE(kernel.backward(b).ok());
      // Back to [S, H, D] / [H, S] order and compare.
      run_result g;
      g.out.resize(s.q_size());
      g.dq.resize(s.q_size());
      g.dk.resize(s.kv_size());
      g.dv.resize(s.kv_size());
      g.lse.resize(s.lse_size());
      for (index_t i = 0; i < S; ++i)
        for (index_t hh = 0; hh < H; ++hh) {
          g.lse[static_cast<std::size_t>(hh * S + i)] = (*lse_t)(hh, i);
          for (index_t x = 0; x < D; ++x) {
            g.out[static_cast<std::size_t>((i * H + hh) * D + x)] = a.out.out(i, hh, x);
            g.dq[static_cast<std::size_t>((i * H + hh) * D + x)] = b.dq(i, hh, x);
          }
        }
      for (index_t j = 0; j < S; ++j)
        for (index_t g_ = 0; g_ < hkv; ++g_)
          for (index_t x = 0; x < D; ++x) {
            g.dk[static_cast<std::size_t>((j * hkv + g_) * D + x)] = b.dk(j, g_, x);
            g.dv[static_cast<std::size_t>((j * hkv + g_) * D + x)] = b.dv(j, g_, x);
          }
      CHECK(fpdt_test::compare(g.out, ref.out).max_abs < 1e-3);
      CHECK(fpdt_test::compare(g.dq, ref.dq).max_abs < 1e-3);
      CHECK(fpdt_test::compare(g.dk, ref.dk).max_abs < 1e-3);
      CHECK(fpdt_test::compare(g.dv, ref.dv).max_abs < 1e-3);
      check_against_reference(g, ref, p, fp32_tol);
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked runs against the reference
// ---------------------------------------------------------------------------------------------

namespace {
struct config {
  char const* name;
  attn_shape s;
  fpdt::attention_mask mask;
  index_t q_offset, k_offset;
  std::optional<float> scale;
};

// Head dims 32, 64, 128, 256; H_kv in {1, 2, H}; odd lengths; nonzero offsets; rows with no key.
std::vector<config> const configs{
    {"Sq37 Sk53 H4 Hkv2 D32 causal offsets 40/10",
     {37, 53, 4, 2, 32},
     fpdt::causal_mask,
     40,
     10,
     {}},
    {"Sq37 Sk53 H4 Hkv1 D64 full offsets 5/100", {37, 53, 4, 1, 64}, fpdt::full_mask, 5, 100, {}},
    {"Sq33 Sk70 H2 Hkv2 D128 causal offsets 50/0",
     {33, 70, 2, 2, 128},
     fpdt::causal_mask,
     50,
     0,
     {}},
    {"Sq20 Sk29 H3 Hkv3 D256 causal offsets 0/0", {20, 29, 3, 3, 256}, fpdt::causal_mask, 0, 0, {}},
    {"Sq65 Sk130 H6 Hkv2 D64 causal offsets 100/0",
     {65, 130, 6, 2, 64},
     fpdt::causal_mask,
     100,
     0,
     {}},
    {"Sq19 Sk41 H2 Hkv1 D32 causal masked rows 0/12",
     {19, 41, 2, 1, 32},
     fpdt::causal_mask,
     0,
     12,
     {}},
    {"Sq9 Sk23 H4 Hkv4 D64 full scale 0.3", {9, 23, 4, 4, 64}, fpdt::full_mask, 7, 3, 0.3f},
};
} // namespace

TEST_CASE_TEMPLATE(
    "chunk kernel: chunked forward and backward over random key splits equal float64 dense", T,
    float, fpdt::bfloat16, fpdt::half) {
  std::uint32_t seed = 1000;
  double worst = 0.0;
  for (config const& c : configs) {
    INFO(c.name);
    auto p = random_problem<T>(c.s, seed += 10);
    run_options o;
    o.mask = c.mask;
    o.q_offset = c.q_offset;
    o.k_offset = c.k_offset;
    o.scale = c.scale;
    ref_result const ref = reference_of(p, o);
    std::vector<std::vector<index_t>> splits{
        {},                                                        // dense: one chunk
        std::vector<index_t>(static_cast<std::size_t>(c.s.sk), 1), // 1-token chunks
        random_split(c.s.sk, seed + 1, true),
        random_split(c.s.sk, seed + 2, false),
        random_split(c.s.sk, seed + 3, true, true), // with an empty chunk
    };
    for (auto const& split : splits) {
      std::string desc;
      for (index_t x : split)
        desc += std::to_string(x) + " ";
      CAPTURE(desc);
      o.k_chunks = split;
      scaled_errors const e = check_against_reference(run_chunked(p, o), ref, p, fp32_tol);
      worst = std::max(worst, e.worst());
    }
    // Query chunks too (uneven), with the key split above.
    o.q_chunks = random_split(c.s.sq, seed + 4, false);
    check_against_reference(run_chunked(p, o), ref, p, fp32_tol);
  }
  MESSAGE(std::string(type_name<T>()) << ": worst scaled error over configs and splits " << worst
                                      << " (tolerance " << fp32_tol << ")");
}

TEST_CASE("chunk kernel: threads=1 and threads=2 give the same results") {
  // Several work items each way (2 kv groups x 3 query blocks forward, 2 x 4 key blocks backward).
  attn_shape const s{70, 200, 4, 2, 64};
  auto p = random_problem<float>(s, 141);
  run_options o;
  o.mask = fpdt::causal_mask;
  o.q_offset = 150;
  o.k_chunks = {120, 80};
  o.threads = 1;
  run_result const r1 = run_chunked(p, o);
  for (unsigned t : {2u, 3u}) {
    CAPTURE(t);
    o.threads = t;
    run_result const r2 = run_chunked(p, o);
    // Forward items are independent: bitwise equal. dk, dv of a key block belong to one item:
    // bitwise equal. dq is summed over per-thread buffers in an order that depends on the
    // schedule: equal within fp32 rounding of the sum.
    CHECK(std::memcmp(r1.out.data(), r2.out.data(), r1.out.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(r1.lse.data(), r2.lse.data(), r1.lse.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(r1.dk.data(), r2.dk.data(), r1.dk.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(r1.dv.data(), r2.dv.data(), r1.dv.size() * sizeof(float)) == 0);
    double dq_max = 0.0, dq_diff = 0.0;
    for (std::size_t i = 0; i < r1.dq.size(); ++i) {
      dq_max = std::max(dq_max, double{std::abs(r1.dq[i])});
      dq_diff = std::max(dq_diff, double{std::abs(r1.dq[i] - r2.dq[i])});
    }
    CHECK(dq_diff <= 1e-6 * dq_max);
  }
}

TEST_CASE("chunk kernel: the same thread count gives bit-identical results, dq included") {
  // Backward items go to a fixed slot (round-robin) with its own dq buffer, summed in slot order,
  // so dq does not depend on which thread ran first. Several runs per thread count.
  attn_shape const s{150, 300, 4, 2, 64};
  auto p = random_problem<float>(s, 142);
  run_options o;
  o.mask = fpdt::causal_mask;
  o.q_offset = 150;
  for (unsigned t : {2u, 3u, 4u}) {
    CAPTURE(t);
    o.threads = t;
    run_result const r1 = run_chunked(p, o);
    for (int rep = 0; rep < 4; ++rep) {
      run_result const r2 = run_chunked(p, o);
      CHECK(std::memcmp(r1.out.data(), r2.out.data(), r1.out.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(r1.lse.data(), r2.lse.data(), r1.lse.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(r1.dq.data(), r2.dq.data(), r1.dq.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(r1.dk.data(), r2.dk.data(), r1.dk.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(r1.dv.data(), r2.dv.data(), r1.dv.size() * sizeof(float)) == 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------------------------

TEST_CASE("chunk kernel: reference gradients match central finite differences in float64") {
  // The kernel is fp32, so finite differences check the float64 reference (loss = sum(out * dout))
  // and the kernel is then held to the reference's gradients.
  struct fd_case {
    char const* name;
    attn_shape s;
    bool causal;
    index_t q_offset, k_offset;
  };
  std::vector<fd_case> const cases{{"causal partial rows", {5, 7, 2, 1, 4}, true, 3, 0},
                                   {"full GQA", {4, 6, 4, 2, 3}, false, 0, 0},
                                   {"causal with masked rows", {5, 4, 2, 2, 4}, true, 0, 2}};
  for (auto const& c : cases) {
    INFO(c.name);
    attn_shape const& s = c.s;
    std::vector<double> q = fpdt_test::random_normal(s.q_size(), 151),
                        k = fpdt_test::random_normal(s.kv_size(), 152),
                        v = fpdt_test::random_normal(s.kv_size(), 153),
                        dout = fpdt_test::random_normal(s.q_size(), 154);
    ref_options o;
    o.causal = c.causal;
    o.q_offset = c.q_offset;
    o.k_offset = c.k_offset;
    o.threads = 1;
    ref_result const g = fpdt_test::reference_backward(q, k, v, dout, s, o);
    auto loss = [&] {
      ref_result const f = fpdt_test::reference_forward(q, k, v, s, o);
      double l = 0.0;
      for (std::size_t i = 0; i < f.out.size(); ++i)
        l += f.out[i] * dout[i];
      return l;
    };
    constexpr double step = 1e-5;
    auto check_grad = [&](std::vector<double>& x, std::vector<double> const& grad,
                          char const* what) {
      CAPTURE(what);
      double const scale = std::max(1.0, fpdt_test::max_abs(grad));
      double worst = 0.0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        double const x0 = x[i];
        x[i] = x0 + step;
        double const lp = loss();
        x[i] = x0 - step;
        double const lm = loss();
        x[i] = x0;
        double const fd = (lp - lm) / (2 * step);
        worst = std::max(worst, std::abs(fd - grad[i]) / scale);
      }
      // Truncation ~ step^2 * |f'''| ~ 1e-10, cancellation ~ 1e-16 / step ~ 1e-11.
      CHECK(worst < 1e-7);
    };
    check_grad(q, g.dq, "dq");
    check_grad(k, g.dk, "dk");
    check_grad(v, g.dv, "dv");
    // The kernel against the reference gradients, on the same shapes (fp32 inputs).
    auto p = from_double<float>(s, q, k, v, dout);
    run_options ro;
    ro.mask = c.causal ? fpdt::causal_mask : fpdt::full_mask;
    ro.q_offset = c.q_offset;
    ro.k_offset = c.k_offset;
    check_against_reference(run_chunked(p, ro), reference_of(p, ro), p, fp32_tol);
    ro.k_chunks = std::vector<index_t>(static_cast<std::size_t>(s.sk), 1);
    check_against_reference(run_chunked(p, ro), reference_of(p, ro), p, fp32_tol);
  }
}

TEST_CASE("dense reference: any thread count gives the same bits, MQA and GQA alike") {
  // Work items are query heads; the dK, dV partials of a key/value head's group are summed in
  // head order afterwards, so neither the split nor the thread count may change a bit.
  for (index_t const hkv : {index_t{1}, index_t{2}, index_t{6}}) {
    CAPTURE(hkv);
    attn_shape const s{130, 150, 6, hkv, 8}; // 130 rows: a full 128-row block and a short one
    std::vector<double> const q = fpdt_test::random_normal(s.q_size(), 161),
                              k = fpdt_test::random_normal(s.kv_size(), 162),
                              v = fpdt_test::random_normal(s.kv_size(), 163),
                              dout = fpdt_test::random_normal(s.q_size(), 164);
    ref_options o;
    o.causal = true;
    o.q_offset = 20;
    o.threads = 1;
    ref_result const one = fpdt_test::reference_backward(q, k, v, dout, s, o);
    for (unsigned const t : {2u, 3u, 0u}) {
      CAPTURE(t);
      o.threads = t;
      ref_result const r = fpdt_test::reference_backward(q, k, v, dout, s, o);
      CHECK(r.out == one.out);
      CHECK(r.lse == one.lse);
      CHECK(r.dq == one.dq);
      CHECK(r.dk == one.dk);
      CHECK(r.dv == one.dv);
    }
    // And the sum over a group is the sum of the per-head gradients: dk of MQA equals the sum of
    // dk over single-head problems (each query head with the shared key/value head).
    if (hkv == 1) {
      std::vector<double> dk_sum(s.kv_size(), 0.0);
      for (index_t head = 0; head < s.h; ++head) {
        attn_shape const s1{s.sq, s.sk, 1, 1, s.d};
        std::vector<double> q1(s1.q_size()), do1(s1.q_size());
        for (index_t i = 0; i < s.sq; ++i)
          for (index_t x = 0; x < s.d; ++x) {
            q1[static_cast<std::size_t>(i * s.d + x)] = q[static_cast<std::size_t>((i * s.h + head) * s.d + x)];
            do1[static_cast<std::size_t>(i * s.d + x)] = dout[static_cast<std::size_t>((i * s.h + head) * s.d + x)];
          }
        ref_result const r1 = fpdt_test::reference_backward(q1, k, v, do1, s1, o);
        for (std::size_t i = 0; i < dk_sum.size(); ++i)
          dk_sum[i] += r1.dk[i];
      }
      for (std::size_t i = 0; i < dk_sum.size(); ++i)
        REQUIRE(one.dk[i] == doctest::Approx(dk_sum[i]).epsilon(1e-12));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Extreme scores
// ---------------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("chunk kernel: scores from -1e5 to 1e4 give no NaN or inf", T, float,
                   fpdt::bfloat16, fpdt::half) {
  // D = 2, scale 1. Keys k_j = (1000, 0) except k_3 = (1000, 1e4). Query rows (times fac):
  //   (-100, 0): every score -1e5;   (10, 0): every score 1e4;   (0, 1): key 3 dominates by 1e4;
  //   (-100, 1): scores -1e5 and -9e4 (key 3 dominates by 1e4);   (0.01, 0): every score 10;
  //   (-100, -0.5): key 3 is 5e3 below the others.
  // Every output must be finite (lse -inf only for a row that sees no key).
  //
  // Accuracy at such scores is limited by fp32 itself: the backward recomputes P = exp(s - lse)
  // from an fp32 score and the fp32 lse, both of magnitude up to max|s|, and a merge weighs the
  // partial states by exp(l_i - l) with l an fp32 lse; the ulp of those values (0.0078 at 1e5) is
  // an absolute error in the exponent, i.e. a relative error of a few 2^-23 max|s| in P and in the
  // merge weights (about 1% at 1e5) that no kernel keeping fp32 scores and an fp32 lse avoids. So
  // the outputs are held to fp32_tol + 4 * 2^-23 * max|lse|, except the unmerged forward (one key
  // chunk), whose exponents are differences of scores rounded alike: fp32_tol.
  attn_shape const s{6, 6, 1, 1, 2};
  std::vector<double> const k{1000, 0, 1000, 0, 1000, 0, 1000, 1e4, 1000, 0, 1000, 0};
  for (double fac : {1.0, 0.1, 0.01}) {
    CAPTURE(fac);
    std::vector<double> q{-100, 0, 10, 0, 0, 1, -100, 1, 0.01, 0, -100, -0.5};
    for (auto& x : q)
      x *= fac;
    auto p = from_double<T>(s, q, k, fpdt_test::random_normal(s.kv_size(), 161),
                            fpdt_test::random_normal(s.q_size(), 162));
    struct variant {
      char const* name;
      fpdt::attention_mask mask;
      index_t q_offset, k_offset;
      std::vector<index_t> k_chunks;
    };
    std::vector<variant> const variants{
        {"full", fpdt::full_mask, 0, 0, {}},
        {"full split 2 1 3", fpdt::full_mask, 0, 0, {2, 1, 3}},
        {"full split 3 1 2", fpdt::full_mask, 0, 0, {3, 1, 2}},
        {"causal offsets 3/0", fpdt::causal_mask, 3, 0, {}},
        {"causal offsets 3/0 split 1 3 2", fpdt::causal_mask, 3, 0, {1, 3, 2}},
        {"causal offsets 0/1 (row 0 empty)", fpdt::causal_mask, 0, 1, {4, 2}}};
    for (auto const& vr : variants) {
      INFO(vr.name);
      run_options o;
      o.mask = vr.mask;
      o.q_offset = vr.q_offset;
      o.k_offset = vr.k_offset;
      o.scale = 1.0f;
      o.k_chunks = vr.k_chunks;
      ref_result const ref = reference_of(p, o);
      run_result const r = run_chunked(p, o);
      CHECK(fpdt_test::all_finite(r.out));
      CHECK(fpdt_test::all_finite(r.dq));
      CHECK(fpdt_test::all_finite(r.dk));
      CHECK(fpdt_test::all_finite(r.dv));
      for (std::size_t i = 0; i < r.lse.size(); ++i) {
        CAPTURE(i);
        if (std::isfinite(ref.lse[i]))
          CHECK(std::isfinite(r.lse[i]));
        else
          CHECK(r.lse[i] == ninf);
      }
      double const tol = fp32_tol + 4 * std::ldexp(1.0, -23) * fpdt_test::max_abs(ref.lse);
      scaled_errors const e = check_against_reference(r, ref, p, tol);
      if (vr.k_chunks.empty()) {
        CHECK(e.out <= fp32_tol);
        CHECK(e.lse <= fp32_tol);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument errors
// ---------------------------------------------------------------------------------------------

namespace {
constexpr float sentinel = 777.0f;

// Valid buffers for Sq = 4, H = 2, D = 8, Sk = 5, H_kv = 2, plus sentinel-filled outputs.
template <class T>
struct arg_fixture {
  std::vector<T> q =
      fpdt_test::convert<T>(fpdt_test::random_normal(4 * 3 * 8, 171)); // room for [4, 3, 8]
  std::vector<T> k =
      fpdt_test::convert<T>(fpdt_test::random_normal(6 * 3 * 8, 172)); // room for bigger views
  std::vector<T> v = fpdt_test::convert<T>(fpdt_test::random_normal(6 * 3 * 8, 173));
  std::vector<T> dout = fpdt_test::convert<T>(fpdt_test::random_normal(4 * 3 * 8, 174));
  std::vector<float> out = std::vector<float>(4 * 3 * 8, sentinel),
                     lse = std::vector<float>(3 * 5, sentinel);
  std::vector<float> dq = std::vector<float>(4 * 3 * 8, sentinel),
                     dk = std::vector<float>(6 * 3 * 8, sentinel),
                     dv = std::vector<float>(6 * 3 * 8, sentinel),
                     delta = std::vector<float>(3 * 5, 0.25f);

  template <class U, std::size_t R>
  static fpdt::tensor_view<U, R> part(std::vector<U>& b, std::array<index_t, R> e) {
    auto r = fpdt::contiguous_view(b.data(), e, static_cast<index_t>(b.size()));
    REQUIRE(r.ok());
    return *r;
  }
  fpdt::chunk_forward_args<T> fwd() {
    fpdt::chunk_forward_args<T> a{};
    a.q = part(q, std::array<index_t, 3>{4, 2, 8});
    a.k = part(k, std::array<index_t, 3>{5, 2, 8});
    a.v = part(v, std::array<index_t, 3>{5, 2, 8});
    a.out = {part(out, std::array<index_t, 3>{4, 2, 8}), part(lse, std::array<index_t, 2>{2, 4})};
    return a;
  }
  fpdt::chunk_backward_args<T> bwd() {
    fpdt::chunk_backward_args<T> b{};
    b.q = part(q, std::array<index_t, 3>{4, 2, 8});
    b.k = part(k, std::array<index_t, 3>{5, 2, 8});
    b.v = part(v, std::array<index_t, 3>{5, 2, 8});
    b.dout = part(dout, std::array<index_t, 3>{4, 2, 8});
    b.lse = part(delta, std::array<index_t, 2>{2, 4}); // any finite values will do for the check
    b.delta = part(delta, std::array<index_t, 2>{2, 4});
    b.dq = part(dq, std::array<index_t, 3>{4, 2, 8});
    b.dk = part(dk, std::array<index_t, 3>{5, 2, 8});
    b.dv = part(dv, std::array<index_t, 3>{5, 2, 8});
    return b;
  }
  [[nodiscard]] bool untouched() const {
    auto all = [](std::vector<float> const& x) {
      return std::all_of(x.begin(), x.end(), [](float e) { return e == sentinel; });
    };
    return all(out) && all(lse) && all(dq) && all(dk) && all(dv);
  }
};

void check_error(fpdt::status const& st, fpdt::errc code, std::vector<std::string> const& parts) {
  INFO("status: " << st.to_string());
  REQUIRE_FALSE(st.ok());
  CHECK(st.code() == code);
  for (auto const& part : parts) {
    CAPTURE(part);
    CHECK(contains(st.message(), part));
  }
}
} // namespace

TEST_CASE_TEMPLATE("chunk kernel: argument errors name the numbers and leave outputs untouched", T,
                   float, fpdt::bfloat16, fpdt::half) {
  arg_fixture<T> f;
  fpdt::host_chunk_kernel const kernel{2};
  using fpdt::errc;
  using A3 = std::array<index_t, 3>;
  using A2 = std::array<index_t, 2>;
  auto both = [&](auto mutate, errc code, std::vector<std::string> const& parts) {
    auto a = f.fwd();
    mutate(a);
    {
      INFO("forward");
      check_error(kernel.forward(a), code, parts);
      CHECK(f.untouched());
    }
    auto b = f.bwd();
    // Apply the same q/k/v/offset/scale change to the backward arguments.
    b.q = a.q;
    b.k = a.k;
    b.v = a.v;
    b.q_offset = a.q_offset;
    b.k_offset = a.k_offset;
    b.scale = a.scale;
    {
      INFO("backward");
      check_error(kernel.backward(b), code, parts);
      CHECK(f.untouched());
    }
  };
  SUBCASE("H not a multiple of H_kv") {
    both(
        [&](auto& a) {
          a.q = f.part(f.q, A3{4, 3, 8});
          a.k = f.part(f.k, A3{5, 2, 8});
          a.v = f.part(f.v, A3{5, 2, 8});
        },
        errc::shape_mismatch, {"H = 3", "H_kv = 2"});
  }
  SUBCASE("H_kv = 0") {
    both(
        [&](auto& a) {
          a.k = f.part(f.k, A3{5, 0, 8});
          a.v = f.part(f.v, A3{5, 0, 8});
        },
        errc::shape_mismatch, {"H = 2", "H_kv = 0"});
  }
  SUBCASE("head dimension mismatch") {
    both(
        [&](auto& a) {
          a.k = f.part(f.k, A3{5, 2, 4});
          a.v = f.part(f.v, A3{5, 2, 4});
        },
        errc::shape_mismatch, {"[4, 2, 8]", "[5, 2, 4]", "8", "4"});
  }
  SUBCASE("D = 0") {
    both(
        [&](auto& a) {
          a.q = f.part(f.q, A3{4, 2, 0});
          a.k = f.part(f.k, A3{5, 2, 0});
          a.v = f.part(f.v, A3{5, 2, 0});
        },
        errc::shape_mismatch, {"D = 0"});
  }
  SUBCASE("k and v shapes differ") {
    both(
        [&](auto& a) {
          a.v = f.part(f.v, A3{6, 2, 8});
        },
        errc::shape_mismatch, {"[5, 2, 8]", "[6, 2, 8]"});
    both(
        [&](auto& a) {
          a.v = f.part(f.v, A3{5, 1, 8});
        },
        errc::shape_mismatch, {"[5, 2, 8]", "[5, 1, 8]"});
  }
  SUBCASE("negative offsets") {
    both([&](auto& a) { a.q_offset = -1; }, errc::invalid_argument, {"q_offset -1"});
    both([&](auto& a) { a.k_offset = -7; }, errc::invalid_argument, {"k_offset -7"});
  }
  SUBCASE("offsets near the int64 limit") {
    index_t const big = std::numeric_limits<index_t>::max() - 4;
    both([&](auto& a) { a.q_offset = big; }, errc::invalid_argument, {"2^62", std::to_string(big)});
    both([&](auto& a) { a.k_offset = big; }, errc::invalid_argument, {"2^62", std::to_string(big)});
  }
  SUBCASE("non-finite scale") {
    both([&](auto& a) { a.scale = std::numeric_limits<float>::quiet_NaN(); },
         errc::invalid_argument, {"scale", "nan"});
    both([&](auto& a) { a.scale = std::numeric_limits<float>::infinity(); }, errc::invalid_argument,
         {"scale", "inf"});
    both([&](auto& a) { a.scale = -std::numeric_limits<float>::infinity(); },
         errc::invalid_argument, {"scale", "-inf"});
  }
  SUBCASE("forward: wrong out shape") {
    auto a = f.fwd();
    a.out.out = f.part(f.out, A3{4, 2, 4});
    check_error(kernel.forward(a), errc::shape_mismatch, {"[4, 2, 4]", "[4, 2, 8]"});
    CHECK(f.untouched());
    a = f.fwd();
    a.out = {f.part(f.out, A3{3, 2, 8}), f.part(f.lse, A2{2, 3})}; // consistent state, wrong Sq
    check_error(kernel.forward(a), errc::shape_mismatch, {"[3, 2, 8]", "[4, 2, 8]"});
    CHECK(f.untouched());
  }
  SUBCASE("forward: wrong lse shape") {
    auto a = f.fwd();
    a.out.lse = f.part(f.lse, A2{4, 2}); // [Sq, H] instead of [H, Sq]
    check_error(kernel.forward(a), errc::shape_mismatch, {"[2, 4]", "got [4, 2]"});
    CHECK(f.untouched());
    a.out.lse = f.part(f.lse, A2{2, 5});
    check_error(kernel.forward(a), errc::shape_mismatch, {"[2, 4]", "got [2, 5]"});
    CHECK(f.untouched());
  }
  SUBCASE("backward: wrong dq dk dv dout out lse delta shapes") {
    auto b = f.bwd();
    b.dq = f.part(f.dq, A3{4, 2, 7});
    check_error(kernel.backward(b), errc::shape_mismatch, {"dq", "[4, 2, 7]", "[4, 2, 8]"});
    CHECK(f.untouched());
    b = f.bwd();
    b.dk = f.part(f.dk, A3{6, 2, 8});
    check_error(kernel.backward(b), errc::shape_mismatch, {"dk", "[6, 2, 8]", "[5, 2, 8]"});
    CHECK(f.untouched());
    b = f.bwd();
    b.dv = f.part(f.dv, A3{5, 3, 8});
    check_error(kernel.backward(b), errc::shape_mismatch, {"dv", "[5, 3, 8]", "[5, 2, 8]"});
    CHECK(f.untouched());
    b = f.bwd();
    b.dout = f.part(f.dout, A3{4, 3, 8});
    check_error(kernel.backward(b), errc::shape_mismatch, {"dout", "[4, 3, 8]", "[4, 2, 8]"});
    CHECK(f.untouched());
    b = f.bwd();
    b.out = f.part(f.dout, A3{3, 2, 8}); // a non-empty out must have q's shape
    check_error(kernel.backward(b), errc::shape_mismatch, {"out", "[3, 2, 8]", "[4, 2, 8]"});
    CHECK(f.untouched());
    b = f.bwd();
    b.lse = f.part(f.delta, A2{4, 2});
    check_error(kernel.backward(b), errc::shape_mismatch, {"lse", "[4, 2]", "[2, 4]"});
    CHECK(f.untouched());
    b = f.bwd();
    b.delta = f.part(f.delta, A2{2, 5});
    check_error(kernel.backward(b), errc::shape_mismatch, {"delta", "[2, 5]", "[2, 4]"});
    CHECK(f.untouched());
  }
  SUBCASE("valid arguments pass (control)") {
    auto a = f.fwd();
    CHECK(check_args(a).ok());
    auto b = f.bwd();
    CHECK(check_args(b).ok());
    CHECK(kernel.forward(a).ok());
    CHECK_FALSE(f.untouched());
  }
}

TEST_CASE("chunk kernel: compute_delta and resolve_scale") {
  CHECK(fpdt::resolve_scale(std::nullopt, 64) == 0.125f);
  CHECK(fpdt::resolve_scale(std::nullopt, 128) ==
        doctest::Approx(1.0 / std::sqrt(128.0)).epsilon(1e-7));
  CHECK(fpdt::resolve_scale(0.3f, 64) == 0.3f);
  // delta[h, s] = sum_d dout[s, h, d] * out[s, h, d], against float64.
  attn_shape const s{5, 1, 3, 1, 16};
  auto out = fpdt_test::convert<float>(fpdt_test::random_normal(s.q_size(), 181));
  auto dout = fpdt_test::convert<fpdt::bfloat16>(fpdt_test::random_normal(s.q_size(), 182));
  std::vector<float> delta(s.lse_size(), fnan);
  REQUIRE(
      fpdt::compute_delta(cview(out, s.q_ext()), cview(dout, s.q_ext()), view(delta, s.lse_ext()))
          .ok());
  for (index_t i = 0; i < s.sq; ++i)
    for (index_t hh = 0; hh < s.h; ++hh) {
      double want = 0.0, mag = 0.0;
      for (index_t x = 0; x < s.d; ++x) {
        auto const at = static_cast<std::size_t>((i * s.h + hh) * s.d + x);
        want += double{out[at]} * double{static_cast<float>(dout[at])};
        mag += std::abs(double{out[at]} * double{static_cast<float>(dout[at])});
      }
      CHECK(std::abs(delta[static_cast<std::size_t>(hh * s.sq + i)] - want) <= 1e-6 * mag);
    }
  std::vector<float> bad(15);
  auto st = fpdt::compute_delta(cview(out, s.q_ext()), cview(dout, s.q_ext()),
                                view(bad, std::array<index_t, 2>{5, 3}));
  REQUIRE_FALSE(st.ok());
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  CHECK(contains(st.message(), "[5, 3]"));
  CHECK(contains(st.message(), "[5, 3, 16]"));
}

TEST_CASE("chunk kernel: a huge finite scale keeps every probability at most 1 in the backward") {
  // With scale 1e20 the scores and the lse are ~1e20, and fp32 rounding of s - lse alone could
  // make exp(s - lse) far above 1 (dv would blow up to inf). P is clamped to <= 1, so
  // |dv_j| <= sum_i |dout_i| holds and every gradient stays finite.
  constexpr index_t sq = 9, sk = 11, h = 2, d = 4;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(sq * h * d), k(sk * h * d), v(sk * h * d), dout(sq * h * d);
  for (auto* x : {&q, &k, &v, &dout})
    for (auto& e : *x) e = dist(rng);
  for (float scale : {1e20f, 1e30f}) {
    CAPTURE(scale);
    std::vector<float> out(sq * h * d), lse(h * sq), delta(h * sq), dq(sq * h * d, 0.0f),
        dk(sk * h * d, 0.0f), dv(sk * h * d, 0.0f);
    auto c3 = [](std::vector<float> const& x, index_t s) {
      return *fpdt::contiguous_view<float const, 3>(x.data(), {s, h, d});
    };
    auto m3 = [](std::vector<float>& x, index_t s) {
      return *fpdt::contiguous_view<float, 3>(x.data(), {s, h, d});
    };
    fpdt::host_chunk_kernel const kernel{1};
    fpdt::chunk_forward_args<float> fa{c3(q, sq), c3(k, sk), c3(v, sk),
                                       fpdt::partial_view{m3(out, sq), *fpdt::contiguous_view<float, 2>(lse.data(), {h, sq})},
                                       fpdt::causal_mask, 5, 0, scale};
    REQUIRE(kernel.forward(fa).ok());
    REQUIRE(fpdt::compute_delta(c3(out, sq), c3(dout, sq), *fpdt::contiguous_view<float, 2>(delta.data(), {h, sq})).ok());
    fpdt::chunk_backward_args<float> ba{c3(q, sq), c3(k, sk), c3(v, sk), {}, c3(dout, sq),
                                        *fpdt::contiguous_view<float const, 2>(lse.data(), {h, sq}),
                                        *fpdt::contiguous_view<float const, 2>(delta.data(), {h, sq}),
                                        m3(dq, sq), m3(dk, sk), m3(dv, sk), fpdt::causal_mask, 5, 0, scale};
    REQUIRE(kernel.backward(ba).ok());
    for (auto const* g : {&dq, &dk, &dv})
      for (float x : *g) REQUIRE(std::isfinite(x));
    for (index_t hh = 0; hh < h; ++hh)
      for (index_t x = 0; x < d; ++x) {
        float bound = 0.0f;
        for (index_t i = 0; i < sq; ++i) bound += std::abs(dout[static_cast<std::size_t>((i * h + hh) * d + x)]);
        for (index_t j = 0; j < sk; ++j)
          CHECK(std::abs(dv[static_cast<std::size_t>((j * h + hh) * d + x)]) <= bound * 1.0001f);
      }
  }
}

static_assert(!fpdt::chunk_kernel<fpdt::host_chunk_kernel, double>);
static_assert(!fpdt::chunk_kernel<fpdt::host_chunk_kernel, int>);
