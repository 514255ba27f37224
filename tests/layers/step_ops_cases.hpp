// Test bodies for attention_step_ops<B> (the FPDT layer's merge, finalize, delta, zero and row
// copies), shared by the host backend (tests/layers/step_ops.cpp) and the CUDA backend
// (tests/layers/cuda/step_ops.cu): one body, instantiated once per backend. Device memory is only
// touched through the backend: inputs go pinned -> device with copy_async, results come back the
// same way. Expected values come from the host functions (merge_partials, compute_delta, the
// bfloat16 conversion) or float64. CASES.md A7 and A9 (merge with empty states, merge overflow)
// for the merge step.
//
// A fixture `Fx` supplies `using backend = ...;` and `static std::unique_ptr<backend> make(
// std::size_t device_budget_bytes, fpdt::arena_mode, std::size_t pinned_limit_bytes)`.
#pragma once

#include "../backend/backend_cases.hpp"

#include <fpdt/attention/chunk_kernel.hpp>
#include <fpdt/attention/online_softmax.hpp>
#include <fpdt/core/bfloat16.hpp>
#include <fpdt/core/tensor_view.hpp>
#include <fpdt/layers/attention_step_ops.hpp>

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace fpdt_test::step_ops {

using fpdt::index_t;
inline constexpr float ninf = -std::numeric_limits<float>::infinity();

// A device array holding a copy of `v`.
template <class B, class T>
fpdt::arena_allocation upload(B& be, typename B::stream_type& s, std::vector<T> const& v) {
  std::size_t const bytes = v.size() * sizeof(T);
  auto dev = device_block(be, bytes);
  auto pin = pinned_block(be, bytes);
  std::memcpy(pin.data(), v.data(), bytes);
  FPDT_TEST_OK(be.copy_async(dev.data(), pin.data(), bytes, s));
  FPDT_TEST_OK(be.synchronize(s));
  return dev;
}

// The n elements at device address `p`, after the stream's work.
template <class T, class B>
std::vector<T> download(B& be, typename B::stream_type& s, void const* p, std::size_t n) {
  auto pin = pinned_block(be, n * sizeof(T));
  FPDT_TEST_OK(be.copy_async(pin.data(), p, n * sizeof(T), s));
  FPDT_TEST_OK(be.synchronize(s));
  std::vector<T> v(n);
  std::memcpy(v.data(), pin.data(), n * sizeof(T));
  return v;
}

template <class T, std::size_t R>
fpdt::tensor_view<T, R> dview(fpdt::arena_allocation const& a, std::array<index_t, R> e) {
  return fpdt::contiguous_view(a.template as<T>(), e).value();
}

inline std::vector<float> normal(std::size_t n, std::uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// merge(acc, part) and merge into the empty state (first) on the backend equal the host's
// merge_partials: bit for bit wherever a side is empty (A7), to fp32 rounding otherwise, and finite
// with LSEs of 1e4 and gaps of 100 (A9). D = 16 and 40 exercise lanes without work and lanes with
// two elements in the CUDA kernel's warp-per-row loop.
template <class Fx> void merge_matches_host() {
  auto be = make_backend<Fx>();
  auto s = make_stream(*be, fpdt::lane::compute);
  using ops = fpdt::attention_step_ops<typename Fx::backend>;
  for (index_t const d : {16, 40})
    for (bool const first : {false, true}) {
      CAPTURE(d);
      CAPTURE(first);
      index_t const sq = 8, h = 8; // 64 rows
      std::size_t const n = static_cast<std::size_t>(sq * h * d), rows = static_cast<std::size_t>(sq * h);
      std::vector<float> ao = normal(n, 1), po = normal(n, 2), al(rows), pl(rows);
      std::vector<float> const big = normal(rows, 3, 1e4f);
      for (index_t hh = 0; hh < h; ++hh)
        for (index_t i = 0; i < sq; ++i) {
          auto const r = static_cast<std::size_t>(hh * sq + i); // lse [H, Sq]
          switch ((hh + i) % 4) {
          case 0: al[r] = ninf; pl[r] = ninf; break;          // both empty
          case 1: al[r] = ninf; pl[r] = big[r]; break;        // ours empty
          case 2: al[r] = big[r]; pl[r] = ninf; break;        // theirs empty
          default: al[r] = big[r]; pl[r] = big[r] + (i % 2 ? 100.0f : -3.5f); break;
          }
          if (al[r] == ninf)
            for (index_t x = 0; x < d; ++x) ao[static_cast<std::size_t>((i * h + hh) * d + x)] = 0.0f;
          if (pl[r] == ninf)
            for (index_t x = 0; x < d; ++x) po[static_cast<std::size_t>((i * h + hh) * d + x)] = 0.0f;
        }
      // Expected: the host merge on copies.
      std::vector<float> eo = ao, el = al;
      fpdt::partial_view const exp{fpdt::contiguous_view(eo.data(), std::array<index_t, 3>{sq, h, d}).value(),
                                   fpdt::contiguous_view(el.data(), std::array<index_t, 2>{h, sq}).value()};
      std::vector<float> po_h = po, pl_h = pl;
      fpdt::partial_view const part_h{
          fpdt::contiguous_view(po_h.data(), std::array<index_t, 3>{sq, h, d}).value(),
          fpdt::contiguous_view(pl_h.data(), std::array<index_t, 2>{h, sq}).value()};
      if (first) fpdt::reset_partial(exp);
      REQUIRE(fpdt::merge_partials(exp, fpdt::partial_cview(part_h)).ok());

      auto dao = upload(*be, s, ao), dal = upload(*be, s, al), dpo = upload(*be, s, po), dpl = upload(*be, s, pl);
      fpdt::partial_view const acc{dview<float>(dao, std::array<index_t, 3>{sq, h, d}),
                                   dview<float>(dal, std::array<index_t, 2>{h, sq})};
      fpdt::partial_view const part{dview<float>(dpo, std::array<index_t, 3>{sq, h, d}),
                                    dview<float>(dpl, std::array<index_t, 2>{h, sq})};
      FPDT_TEST_OK(ops::merge(*be, s, acc, part, first));
      auto const go = download<float>(*be, s, dao.data(), n);
      auto const gl = download<float>(*be, s, dal.data(), rows);
      int exact_rows = 0;
      for (index_t hh = 0; hh < h; ++hh)
        for (index_t i = 0; i < sq; ++i) {
          auto const r = static_cast<std::size_t>(hh * sq + i);
          bool const exact = first || al[r] == ninf || pl[r] == ninf;
          exact_rows += exact;
          CAPTURE(i);
          CAPTURE(hh);
          if (exact) {
            CHECK(same_bits(gl[r], el[r]));
          } else {
            CHECK(std::isfinite(gl[r]));
            CHECK(std::abs(gl[r] - el[r]) <= 2e-7f * std::max(1.0f, std::abs(el[r])));
          }
          for (index_t x = 0; x < d; ++x) {
            auto const e = static_cast<std::size_t>((i * h + hh) * d + x);
            if (exact)
              CHECK(same_bits(go[e], eo[e]));
            else
              CHECK(std::abs(go[e] - eo[e]) <= 1e-6f * (std::abs(ao[e]) + std::abs(po[e]) + 1e-30f));
          }
        }
      CHECK(exact_rows >= 48); // the empty cases really occurred
    }
}

// finalize: out = T(acc.out) with the host's round-to-nearest-even, bit for bit; lse copied.
template <class Fx> void finalize_rounds_like_host() {
  auto be = make_backend<Fx>();
  auto s = make_stream(*be, fpdt::lane::compute);
  using ops = fpdt::attention_step_ops<typename Fx::backend>;
  index_t const c = 5, h = 3, d = 24;
  std::size_t const n = static_cast<std::size_t>(c * h * d), rows = static_cast<std::size_t>(c * h);
  std::vector<float> ao = normal(n, 7, 3.0f), al = normal(rows, 8, 10.0f);
  ao[0] = 1.00390625f;  // halfway between two bf16 values: ties to even
  ao[1] = -0.0f;
  al[1] = ninf;
  auto dao = upload(*be, s, ao), dal = upload(*be, s, al);
  auto dout = upload(*be, s, std::vector<fpdt::bfloat16>(n, fpdt::bfloat16(7.0f)));
  auto dlse = upload(*be, s, std::vector<float>(rows, 7.0f));
  fpdt::partial_view const acc{dview<float>(dao, std::array<index_t, 3>{c, h, d}),
                               dview<float>(dal, std::array<index_t, 2>{h, c})};
  FPDT_TEST_OK(ops::finalize(*be, s, acc, dview<fpdt::bfloat16>(dout, std::array<index_t, 3>{c, h, d}),
                             dview<float>(dlse, std::array<index_t, 2>{h, c})));
  auto const go = download<fpdt::bfloat16>(*be, s, dout.data(), n);
  auto const gl = download<float>(*be, s, dlse.data(), rows);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < n; ++i) wrong += go[i].bits != fpdt::bfloat16(ao[i]).bits;
  CHECK(wrong == 0);
  CHECK(go[0].bits == fpdt::bfloat16(1.0f).bits);
  for (std::size_t i = 0; i < rows; ++i) CHECK(same_bits(gl[i], al[i]));
}

// delta[h, s] = sum_i dout * out in fp32 equals the float64 sum to fp32 accumulation error.
template <class Fx> void delta_matches_float64() {
  auto be = make_backend<Fx>();
  auto s = make_stream(*be, fpdt::lane::compute);
  using ops = fpdt::attention_step_ops<typename Fx::backend>;
  index_t const c = 7, h = 3, d = 72;
  std::size_t const n = static_cast<std::size_t>(c * h * d);
  std::vector<fpdt::bfloat16> o(n), g(n);
  auto const on = normal(n, 11), gn = normal(n, 12);
  for (std::size_t i = 0; i < n; ++i) {
    o[i] = fpdt::bfloat16(on[i]);
    g[i] = fpdt::bfloat16(gn[i]);
  }
  auto dob = upload(*be, s, o), dgb = upload(*be, s, g);
  auto ddl = upload(*be, s, std::vector<float>(static_cast<std::size_t>(h * c), std::nanf("")));
  FPDT_TEST_OK(ops::delta(*be, s, dview<fpdt::bfloat16 const>(dob, std::array<index_t, 3>{c, h, d}),
                          dview<fpdt::bfloat16 const>(dgb, std::array<index_t, 3>{c, h, d}),
                          dview<float>(ddl, std::array<index_t, 2>{h, c})));
  auto const got = download<float>(*be, s, ddl.data(), static_cast<std::size_t>(h * c));
  for (index_t i = 0; i < c; ++i)
    for (index_t hh = 0; hh < h; ++hh) {
      double sum = 0.0, mag = 0.0;
      for (index_t x = 0; x < d; ++x) {
        auto const e = static_cast<std::size_t>((i * h + hh) * d + x);
        double const t = static_cast<double>(static_cast<float>(o[e])) * static_cast<float>(g[e]);
        sum += t;
        mag += std::abs(t);
      }
      CHECK(std::abs(got[static_cast<std::size_t>(hh * c + i)] - sum) <= 1e-6 * mag + 1e-30);
    }
}

// copy_rows converts and writes exactly the rows asked for, from a strided (head-major) source;
// copy_columns likewise for [H, S]; zero clears exactly its bytes.
template <class Fx> void copies_and_zero_touch_only_their_range() {
  auto be = make_backend<Fx>();
  auto s = make_stream(*be, fpdt::lane::compute);
  using ops = fpdt::attention_step_ops<typename Fx::backend>;
  index_t const S = 10, h = 3, d = 5, rows = 4;
  std::size_t const n = static_cast<std::size_t>(S * h * d);
  std::vector<float> src(n);
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<float>(i) + 0.25f;
  auto dsrc = upload(*be, s, src);
  // The buffer is head-major [H, S, D]; the view is [S, H, D] with strides {D, S D, 1}.
  fpdt::tensor_view<float const, 3> const sv(dsrc.template as<float const>(), {S, h, d}, {d, S * d, 1});
  index_t const drows = 8;
  std::vector<fpdt::bfloat16> init(static_cast<std::size_t>(drows * h * d), fpdt::bfloat16(-9.0f));
  auto ddst = upload(*be, s, init);
  FPDT_TEST_OK(ops::copy_rows(*be, s, sv, 2, dview<fpdt::bfloat16>(ddst, std::array<index_t, 3>{drows, h, d}), 3, rows));
  auto const got = download<fpdt::bfloat16>(*be, s, ddst.data(), init.size());
  for (index_t r = 0; r < drows; ++r)
    for (index_t hh = 0; hh < h; ++hh)
      for (index_t x = 0; x < d; ++x) {
        float const g = static_cast<float>(got[static_cast<std::size_t>((r * h + hh) * d + x)]);
        bool const inside = r >= 3 && r < 3 + rows;
        float const want = inside ? static_cast<float>(fpdt::bfloat16(src[static_cast<std::size_t>((hh * S + (r - 3 + 2)) * d + x)]))
                                  : -9.0f;
        CHECK(g == want);
      }
  // copy_columns: columns 4..6 of [H, S] into columns 2..4 of [H, 6].
  std::vector<float> lse(static_cast<std::size_t>(h * S));
  for (std::size_t i = 0; i < lse.size(); ++i) lse[i] = static_cast<float>(i);
  auto dl = upload(*be, s, lse);
  auto dd = upload(*be, s, std::vector<float>(static_cast<std::size_t>(h * 6), -1.0f));
  FPDT_TEST_OK(ops::copy_columns(*be, s, dview<float const>(dl, std::array<index_t, 2>{h, S}), 4,
                                 dview<float>(dd, std::array<index_t, 2>{h, 6}), 2, 3));
  auto const gl = download<float>(*be, s, dd.data(), static_cast<std::size_t>(h * 6));
  for (index_t hh = 0; hh < h; ++hh)
    for (index_t c = 0; c < 6; ++c)
      CHECK(gl[static_cast<std::size_t>(hh * 6 + c)] ==
            (c >= 2 && c < 5 ? static_cast<float>(hh * S + c - 2 + 4) : -1.0f));
  // zero: bytes [16, 16 + 40) of a 96-byte block.
  auto dz = upload(*be, s, std::vector<float>(24, 3.0f));
  FPDT_TEST_OK(ops::zero(*be, s, dz.template as<char>() + 16, 40));
  auto const gz = download<float>(*be, s, dz.data(), 24);
  for (std::size_t i = 0; i < 24; ++i) CHECK(gz[i] == (i >= 4 && i < 14 ? 0.0f : 3.0f));
}

// The Ulysses pack and unpack around sequence_parallel_attention's all-to-all on device backends,
// against the block formula written out here: a packed [P][rows][heads][D] buffer from a strided
// (head-major) local view; unpacks into the head side; and the summing unpack of replicated
// key/value heads (CASES.md A3's shape: P = 4, H_kv = 2), which must add the replicas of each head
// in rank order (the first assigned), so device and host agree bit for bit.
template <class Fx> void ulysses_pack_unpack_match_formula() {
  auto be = make_backend<Fx>();
  auto s = make_stream(*be, fpdt::lane::comm);
  using ops = fpdt::attention_step_ops<typename Fx::backend>;
  struct lay_case {
    index_t p, h, hkv, d, c;
  };
  // D = 37: more than a warp's 32 lanes (the CUDA kernels run a warp per row along D).
  for (lay_case const lc : {lay_case{4, 8, 2, 3, 8}, lay_case{2, 4, 4, 5, 6}, lay_case{4, 8, 2, 37, 8}})
    for (fpdt::head_kind const kind : {fpdt::head_kind::query, fpdt::head_kind::key_value}) {
      CAPTURE(lc.p);
      CAPTURE(lc.hkv);
      CAPTURE(static_cast<int>(kind));
      auto const l = fpdt::ulysses_layout::make(lc.p, lc.h, lc.hkv, lc.d, lc.c).value();
      index_t const pc = l.piece(), ht = l.total_heads(kind), hr = l.heads_per_rank(kind), d = lc.d;
      fpdt::ulysses_blocks const seq = fpdt::ulysses_blocks::local_side(l, kind);
      fpdt::ulysses_blocks const heads = fpdt::ulysses_blocks::head_side(l, kind);
      CHECK(seq.add == (kind == fpdt::head_kind::key_value && lc.hkv < lc.p));
      // Pack the local side from a head-major buffer [Ht, pc, D] seen as [pc, Ht, D].
      std::vector<float> const src = normal(static_cast<std::size_t>(pc * ht * d), 61);
      auto dsrc = upload(*be, s, src);
      fpdt::tensor_view<float const, 3> const sv(dsrc.template as<float const>(), {pc, ht, d}, {d, pc * d, 1});
      std::size_t const n = static_cast<std::size_t>(lc.p * pc * hr * d);
      auto dsend = upload(*be, s, std::vector<float>(n, -7.0f));
      FPDT_TEST_OK(ops::ulysses_pack(*be, s, sv, dsend.template as<float>(), seq));
      auto const sent = download<float>(*be, s, dsend.data(), n);
      for (index_t r = 0; r < lc.p; ++r)
        for (index_t t = 0; t < pc; ++t)
          for (index_t hh = 0; hh < hr; ++hh)
            for (index_t x = 0; x < d; ++x) {
              index_t const head = l.first_head(kind, r) + hh;
              CHECK(same_bits(sent[static_cast<std::size_t>(((r * pc + t) * hr + hh) * d + x)],
                              src[static_cast<std::size_t>((head * pc + t) * d + x)]));
            }
      // Unpack into the head side [C, hr, D]: block r is rows [r pc, (r + 1) pc).
      auto dhead = upload(*be, s, std::vector<float>(n, -7.0f));
      FPDT_TEST_OK(ops::ulysses_unpack(*be, s, dsend.template as<float const>(),
                                       dview<float>(dhead, std::array<index_t, 3>{lc.c, hr, d}), heads));
      auto const gh = download<float>(*be, s, dhead.data(), n);
      CHECK(gh == sent); // the head side's blocks are its consecutive row ranges
      // Unpack the head side's blocks back into the local side [pc, Ht, D] (head_to_seq's half),
      // summing replicas in rank order.
      std::size_t const nl = static_cast<std::size_t>(pc * ht * d);
      auto dloc = upload(*be, s, std::vector<float>(nl, -7.0f));
      FPDT_TEST_OK(ops::ulysses_unpack(*be, s, dsend.template as<float const>(),
                                       dview<float>(dloc, std::array<index_t, 3>{pc, ht, d}), seq));
      auto const gl = download<float>(*be, s, dloc.data(), nl);
      for (index_t t = 0; t < pc; ++t)
        for (index_t head = 0; head < ht; ++head)
          for (index_t x = 0; x < d; ++x) {
            float want = 0.0f;
            bool any = false;
            for (index_t r = 0; r < lc.p; ++r) {
              index_t const h0 = l.first_head(kind, r);
              if (head < h0 || head >= h0 + hr) continue;
              float const v = sent[static_cast<std::size_t>(((r * pc + t) * hr + (head - h0)) * d + x)];
              want = any ? want + v : v;
              any = true;
            }
            REQUIRE(any);
            CHECK(same_bits(gl[static_cast<std::size_t>((t * ht + head) * d + x)], want));
          }
    }
  // The lse exchange of sequence_parallel_attention: D = 1 and transposed views on both sides,
  // [H/P, C] read as [C, H/P, 1] (strides {1, C, 1}) and [H, C/P] written as [C/P, H, 1].
  auto const one = fpdt::ulysses_layout::make(4, 8, 8, 1, 8).value();
  index_t const c = one.chunk, pc = one.piece(), hr = one.heads_per_rank(fpdt::head_kind::query);
  std::vector<float> const lse = normal(static_cast<std::size_t>(hr * c), 62); // [hr, C]
  auto dl = upload(*be, s, lse);
  fpdt::tensor_view<float const, 3> const in(dl.template as<float const>(), {c, hr, 1}, {1, c, 1});
  std::size_t const n = static_cast<std::size_t>(c * hr);
  auto dsend = upload(*be, s, std::vector<float>(n, -7.0f));
  FPDT_TEST_OK(ops::ulysses_pack(*be, s, in, dsend.template as<float>(),
                                 fpdt::ulysses_blocks::head_side(one, fpdt::head_kind::query)));
  auto dloc = upload(*be, s, std::vector<float>(static_cast<std::size_t>(one.heads * pc), -7.0f));
  fpdt::tensor_view<float, 3> const loc(dloc.template as<float>(), {pc, one.heads, 1}, {1, pc, 1});
  // Unpacking the packed blocks as if they had come back (P = 4 blocks of [pc, hr]) into the
  // local side: block r lands on heads [r hr, (r + 1) hr).
  FPDT_TEST_OK(ops::ulysses_unpack(*be, s, dsend.template as<float const>(), loc,
                                   fpdt::ulysses_blocks::local_side(one, fpdt::head_kind::query)));
  auto const got = download<float>(*be, s, dloc.data(), static_cast<std::size_t>(one.heads * pc));
  for (index_t r = 0; r < 4; ++r)
    for (index_t t = 0; t < pc; ++t)
      for (index_t hh = 0; hh < hr; ++hh) // block r held tokens [r pc, (r + 1) pc) of head hh
        CHECK(same_bits(got[static_cast<std::size_t>((r * hr + hh) * pc + t)],
                        lse[static_cast<std::size_t>(hh * c + r * pc + t)]));
}

} // namespace fpdt_test::step_ops
