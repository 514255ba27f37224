// Tests of include/fpdt/attention/online_softmax.hpp: the stable merge of partial attention states
// (docs/design.md 3.2), CASES.md A7 (merge with empty states) and A9 (merge overflow), large LSE gaps,
// shape errors, strided views, and associativity / commutativity within fp32 rounding.
#include "reference.hpp"

#include <fpdt/attention/chunk_kernel.hpp>
#include <fpdt/attention/host/chunk_attention.hpp>
#include <fpdt/attention/online_softmax.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using fpdt::index_t;
using fpdt::partial_cview;
using fpdt::partial_view;

namespace {

constexpr float ninf = -std::numeric_limits<float>::infinity();
constexpr float fnan = std::numeric_limits<float>::quiet_NaN();

bool contains(std::string const& s, std::string const& part) {
  return s.find(part) != std::string::npos;
}

// A partial state [Sq, H, D] / [H, Sq] in owned contiguous buffers.
struct state {
  index_t sq, h, d;
  std::vector<float> out, lse;
  state(index_t sq_, index_t h_, index_t d_)
      : sq(sq_), h(h_), d(d_), out(static_cast<std::size_t>(sq_ * h_ * d_), 0.0f),
        lse(static_cast<std::size_t>(h_ * sq_), ninf) {}
  partial_view view() {
    return {fpdt_test::view(out, std::array<index_t, 3>{sq, h, d}),
            fpdt_test::view(lse, std::array<index_t, 2>{h, sq})};
  }
  float* row(index_t s, index_t hh) { return &out[static_cast<std::size_t>((s * h + hh) * d)]; }
  float const* row(index_t s, index_t hh) const {
    return &out[static_cast<std::size_t>((s * h + hh) * d)];
  }
  float& l(index_t s, index_t hh) { return lse[static_cast<std::size_t>(hh * sq + s)]; }
  float const& l(index_t s, index_t hh) const { return lse[static_cast<std::size_t>(hh * sq + s)]; }
};

// Bitwise equality of two float ranges (so -0.0 vs 0.0 and NaN payloads count).
bool same_bits(float const* a, float const* b, index_t n) {
  return std::memcmp(a, b, static_cast<std::size_t>(n) * sizeof(float)) == 0;
}

// The float64 merge of rows (o1, l1) and (o2, l2) given as floats: docs/design.md 3.2's formula.
struct merged64 {
  std::vector<double> o;
  double l;
  double scale; // |o1| w1 + |o2| w2 per element, max over the row: the size of the terms summed
};
merged64 merge64(float const* o1, float l1, float const* o2, float l2, index_t d) {
  double const m = std::max<double>(l1, l2);
  double const l = m + std::log(std::exp(double{l1} - m) + std::exp(double{l2} - m));
  double const w1 = std::exp(double{l1} - l), w2 = std::exp(double{l2} - l);
  merged64 r{std::vector<double>(static_cast<std::size_t>(d)), l, 0.0};
  for (index_t i = 0; i < d; ++i) {
    r.o[static_cast<std::size_t>(i)] = double{o1[i]} * w1 + double{o2[i]} * w2;
    r.scale = std::max(r.scale, std::abs(double{o1[i]}) * w1 + std::abs(double{o2[i]}) * w2);
  }
  return r;
}

void fill_finite(state& s, std::uint32_t seed, double lse_lo, double lse_hi) {
  auto o = fpdt_test::random_uniform(s.out.size(), seed, -1.0, 1.0);
  auto l = fpdt_test::random_uniform(s.lse.size(), seed + 1, lse_lo, lse_hi);
  for (std::size_t i = 0; i < o.size(); ++i)
    s.out[i] = static_cast<float>(o[i]);
  for (std::size_t i = 0; i < l.size(); ++i)
    s.lse[i] = static_cast<float>(l[i]);
}

void make_empty(state& s, index_t row_s, index_t row_h) {
  std::fill(s.row(row_s, row_h), s.row(row_s, row_h) + s.d, 0.0f);
  s.l(row_s, row_h) = ninf;
}

} // namespace

TEST_CASE("merge: reset_partial gives the merge identity (0 and -inf) and touches only the view") {
  // lse [H, Sq] = [2, 3] inside a buffer with row stride 5: padding must stay as it was.
  std::vector<float> out(3 * 2 * 4, 7.0f), lse_buf(2 * 5, fnan);
  auto o = fpdt_test::view(out, std::array<index_t, 3>{3, 2, 4});
  auto l =
      fpdt::make_tensor_view(lse_buf.data(), std::array<index_t, 2>{2, 3},
                             std::array<index_t, 2>{5, 1}, static_cast<index_t>(lse_buf.size()));
  REQUIRE(l.ok());
  fpdt::reset_partial(partial_view{o, *l});
  for (float x : out)
    CHECK(x == 0.0f);
  for (index_t hh = 0; hh < 2; ++hh)
    for (index_t s = 0; s < 5; ++s) {
      float const x = lse_buf[static_cast<std::size_t>(hh * 5 + s)];
      if (s < 3)
        CHECK(x == ninf);
      else
        CHECK(std::isnan(x));
    }
}

TEST_CASE("merge: A7 merge with empty states (64 rows D=16)") {
  // CASES.md A7. Sq = 32, H = 2: 64 (token, head) rows; categories are spread over the rows by a
  // fixed shuffle so that neither the token nor the head index decides the category.
  constexpr index_t sq = 32, h = 2, d = 16, rows = sq * h;
  state acc(sq, h, d), other(sq, h, d);
  // lse in [-4, 4]: see the tolerance below.
  fill_finite(acc, 101, -4.0, 4.0);
  fill_finite(other, 202, -4.0, 4.0);
  std::vector<index_t> order(static_cast<std::size_t>(rows));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(7));
  enum kind { both_empty, acc_empty, other_empty, finite };
  std::vector<kind> cat(static_cast<std::size_t>(rows));
  for (index_t k = 0; k < rows; ++k) {
    kind const c = k < 16 ? both_empty : k < 24 ? acc_empty : k < 32 ? other_empty : finite;
    cat[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])] = c;
  }
  for (index_t r = 0; r < rows; ++r) {
    index_t const s = r / h, hh = r % h;
    kind const c = cat[static_cast<std::size_t>(r)];
    if (c == both_empty || c == acc_empty) make_empty(acc, s, hh);
    if (c == both_empty || c == other_empty) make_empty(other, s, hh);
  }
  // Two finite rows with equal LSE (gap 0) and one with the largest gap of the range.
  {
    index_t const r0 = order[40], r1 = order[41];
    other.l(r0 / h, r0 % h) = acc.l(r0 / h, r0 % h);
    acc.l(r1 / h, r1 % h) = -4.0f;
    other.l(r1 / h, r1 % h) = 4.0f;
  }
  state const acc0 = acc; // before the merge
  REQUIRE(fpdt::merge_partials(acc.view(), partial_cview(other.view())).ok());

  int n_finite = 0;
  double worst_o = 0.0, worst_l = 0.0;
  for (index_t r = 0; r < rows; ++r) {
    index_t const s = r / h, hh = r % h;
    CAPTURE(s);
    CAPTURE(hh);
    state const& a0 = acc0;
    switch (cat[static_cast<std::size_t>(r)]) {
    case both_empty: {
      std::vector<float> zeros(static_cast<std::size_t>(d), 0.0f);
      CHECK(same_bits(acc.row(s, hh), zeros.data(), d)); // +0.0 exactly
      CHECK(acc.l(s, hh) == ninf);
      break;
    }
    case acc_empty: // takes the other state bit for bit
      CHECK(same_bits(acc.row(s, hh), other.row(s, hh), d));
      CHECK(same_bits(&acc.l(s, hh), &other.l(s, hh), 1));
      break;
    case other_empty: // keeps its own state bit for bit
      CHECK(same_bits(acc.row(s, hh), a0.row(s, hh), d));
      CHECK(same_bits(&acc.l(s, hh), &a0.l(s, hh), 1));
      break;
    case finite: {
      ++n_finite;
      merged64 const m = merge64(a0.row(s, hh), a0.l(s, hh), other.row(s, hh), other.l(s, hh), d);
      // Tolerance: the inputs are fp32; the merged lse carries ~0.5 ulp(|l|) + the log1p/exp
      // rounding (|l| <= 4.7 here: < 4e-7 absolute), which enters each weight exp(l_i - l) as a
      // relative error of the same size, plus the two products' rounding: < 1e-6 relative to the
      // terms' magnitude |o1| w1 + |o2| w2 (relative to the result itself would be unsound where
      // the terms cancel).
      double const el = std::abs(double{acc.l(s, hh)} - m.l);
      CHECK(el <= 1e-6 * std::max(1.0, std::abs(m.l)));
      worst_l = std::max(worst_l, el);
      for (index_t i = 0; i < d; ++i) {
        double const eo = std::abs(double{acc.row(s, hh)[i]} - m.o[static_cast<std::size_t>(i)]);
        worst_o = std::max(worst_o, eo / m.scale);
        CHECK(eo <= 1e-6 * m.scale);
      }
      break;
    }
    }
  }
  CHECK(n_finite == 32);
  MESSAGE("A7 finite rows: worst lse abs error " << worst_l << ", worst out error / scale "
                                                 << worst_o);
}

TEST_CASE("merge: A9 merge overflow by hand (out 2.0 and lse 100.0 in both orders)") {
  // Chunk A: 4 keys with score 0 and V = 1: out 1, lse ln 4. Chunk B: 1 key with score 100, V = 2:
  // out 2, lse 100. Merged: lse = 100 + log1p(4 e^-100) = 100.0f, out = 2.0f.
  for (bool a_first : {true, false}) {
    CAPTURE(a_first);
    state a(1, 1, 1), b(1, 1, 1);
    a.out[0] = 1.0f;
    a.lse[0] = static_cast<float>(std::log(4.0));
    b.out[0] = 2.0f;
    b.lse[0] = 100.0f;
    state& acc = a_first ? a : b;
    state& other = a_first ? b : a;
    REQUIRE(fpdt::merge_partials(acc.view(), partial_cview(other.view())).ok());
    CHECK(acc.out[0] == 2.0f);
    CHECK(acc.lse[0] == 100.0f);
    CHECK(std::isfinite(acc.out[0]));
    CHECK(std::isfinite(acc.lse[0]));
  }
  // merge_row directly, with the same numbers.
  float o1 = 1.0f, l1 = static_cast<float>(std::log(4.0));
  float const o2 = 2.0f;
  fpdt::merge_row(&o1, l1, &o2, 100.0f, 1);
  CHECK(o1 == 2.0f);
  CHECK(l1 == 100.0f);
}

TEST_CASE_TEMPLATE("merge: A9 merge overflow from host kernel states", T, float, fpdt::bfloat16,
                   fpdt::half) {
  // The two partial states come from the host kernel: scale 1, one query q = 1, D = 1.
  using fpdt_test::to;
  std::vector<T> q{to<T>(1.0)};
  std::vector<T> ka(4, to<T>(0.0)), va(4, to<T>(1.0));
  std::vector<T> kb{to<T>(100.0)}, vb{to<T>(2.0)};
  state a(1, 1, 1), b(1, 1, 1);
  fpdt::host_chunk_kernel const kernel{1};
  auto run = [&](std::vector<T> const& k, std::vector<T> const& v, state& st) {
    fpdt::chunk_forward_args<T> args{};
    args.q = fpdt_test::cview(q, std::array<index_t, 3>{1, 1, 1});
    index_t const sk = static_cast<index_t>(k.size());
    args.k = fpdt_test::cview(k, std::array<index_t, 3>{sk, 1, 1});
    args.v = fpdt_test::cview(v, std::array<index_t, 3>{sk, 1, 1});
    args.out = st.view();
    args.scale = 1.0f;
    return kernel.forward(args);
  };
  REQUIRE(run(ka, va, a).ok());
  REQUIRE(run(kb, vb, b).ok());
  CHECK(a.out[0] == doctest::Approx(1.0).epsilon(1e-6));
  CHECK(a.lse[0] == doctest::Approx(std::log(4.0)).epsilon(1e-6));
  CHECK(b.out[0] == 2.0f);
  CHECK(b.lse[0] == doctest::Approx(100.0).epsilon(1e-6));
  for (bool a_first : {true, false}) {
    CAPTURE(a_first);
    state acc = a_first ? a : b;
    state const other = a_first ? b : a;
    state other_copy = other;
    REQUIRE(fpdt::merge_partials(acc.view(), partial_cview(other_copy.view())).ok());
    CHECK(std::isfinite(acc.out[0]));
    CHECK(std::isfinite(acc.lse[0]));
    CHECK(acc.out[0] == 2.0f); // e^(ln4 - 100) is far below half an ulp of 2
    CHECK(acc.lse[0] == doctest::Approx(100.0).epsilon(1e-6));
    CHECK(acc.lse[0] == b.lse[0]); // log1p(4 e^-100) vanishes next to 100 in fp32
  }
}

TEST_CASE("merge: LSE gaps from 0 to 1e4 stay finite and match float64") {
  // Gaps of every size, either side larger, around bases from -1e4 to 1e4. Checks:
  // - the merged state is finite;
  // - lse equals the float64 formula within 1e-6 relative;
  // - out equals the float64 formula within 2e-6 of the terms' magnitude at any |lse|: the merge
  //   takes its weights from the gap alone (1 / (1 + e), e / (1 + e) with e = exp(-gap)), so the
  //   rounding of the stored lse (half an ulp of |l|, 5e-4 at 1e4) must not reach out.
  std::vector<double> const gaps{0.0,   1e-6,  1e-3,   0.5,    1.0,   10.0,  30.0,
                                 87.0,  88.7,  89.0,   100.0,  103.0, 104.0, 150.0,
                                 700.0, 710.0, 1000.0, 5000.0, 1e4};
  std::vector<double> const bases{-1e4, -100.0, 0.0, 3.0, 100.0, 1e4};
  constexpr index_t d = 8;
  double worst_small = 0.0, worst_large = 0.0; // out error / scale for |l| <= 10 and any |l|
  for (double base : bases)
    for (double gap : gaps)
      for (bool acc_larger : {true, false}) {
        CAPTURE(base);
        CAPTURE(gap);
        CAPTURE(acc_larger);
        state acc(1, 1, d), other(1, 1, d);
        fill_finite(acc, 11, 0.0, 0.0);
        fill_finite(other, 12, 0.0, 0.0);
        float const lo = static_cast<float>(base), hi = static_cast<float>(base + gap);
        acc.lse[0] = acc_larger ? hi : lo;
        other.lse[0] = acc_larger ? lo : hi;
        state const before = acc;
        REQUIRE(fpdt::merge_partials(acc.view(), partial_cview(other.view())).ok());
        REQUIRE(std::isfinite(acc.lse[0]));
        CHECK(fpdt_test::all_finite(acc.out));
        merged64 const m =
            merge64(before.out.data(), before.lse[0], other.out.data(), other.lse[0], d);
        CHECK(std::abs(double{acc.lse[0]} - m.l) <= 1e-6 * std::max(1.0, std::abs(m.l)));
        for (index_t i = 0; i < d; ++i) {
          auto const u = static_cast<std::size_t>(i);
          double const err = std::abs(double{acc.out[u]} - m.o[u]) / m.scale;
          CHECK(err <= 2e-6);
          (std::abs(m.l) <= 10 ? worst_small : worst_large) =
              std::max(std::abs(m.l) <= 10 ? worst_small : worst_large, err);
        }
      }
  MESSAGE("LSE gap merge: worst out error / terms for |lse| <= 10: "
          << worst_small << ", for larger |lse|: " << worst_large);
}

TEST_CASE("merge: merge_partials shape errors name the shapes and leave acc unchanged") {
  SUBCASE("outs differ in D") {
    state acc(4, 2, 8), other(4, 2, 4);
    fill_finite(acc, 1, -1, 1);
    fill_finite(other, 2, -1, 1);
    state const before = acc;
    auto st = fpdt::merge_partials(acc.view(), partial_cview(other.view()));
    REQUIRE_FALSE(st.ok());
    CHECK(st.code() == fpdt::errc::shape_mismatch);
    CHECK(contains(st.message(), "[4, 2, 8]"));
    CHECK(contains(st.message(), "[4, 2, 4]"));
    CHECK(acc.out == before.out);
    CHECK(acc.lse == before.lse);
  }
  SUBCASE("outs differ in Sq") {
    state acc(5, 2, 8), other(3, 2, 8);
    auto st = fpdt::merge_partials(acc.view(), partial_cview(other.view()));
    REQUIRE_FALSE(st.ok());
    CHECK(st.code() == fpdt::errc::shape_mismatch);
    CHECK(contains(st.message(), "[5, 2, 8]"));
    CHECK(contains(st.message(), "[3, 2, 8]"));
  }
  SUBCASE("accumulator lse does not match its out") {
    state acc(4, 2, 8), other(4, 2, 8);
    fill_finite(acc, 3, -1, 1);
    fill_finite(other, 4, -1, 1);
    std::vector<float> bad_lse(4 * 2, 0.5f); // [Sq, H] instead of [H, Sq]
    partial_view bad{acc.view().out, fpdt_test::view(bad_lse, std::array<index_t, 2>{4, 2})};
    state const before = acc;
    auto st = fpdt::merge_partials(bad, partial_cview(other.view()));
    REQUIRE_FALSE(st.ok());
    CHECK(st.code() == fpdt::errc::shape_mismatch);
    CHECK(contains(st.message(), "accumulator"));
    CHECK(contains(st.message(), "[2, 4]"));     // the lse shape required
    CHECK(contains(st.message(), "got [4, 2]")); // the lse shape given
    CHECK(contains(st.message(), "[4, 2, 8]"));  // the out it must match
    CHECK(acc.out == before.out);
    for (float x : bad_lse)
      CHECK(x == 0.5f);
  }
  SUBCASE("other lse does not match its out") {
    state acc(4, 2, 8), other(4, 2, 8);
    std::vector<float> bad_lse(2 * 3, 0.0f);
    partial_view bad{other.view().out, fpdt_test::view(bad_lse, std::array<index_t, 2>{2, 3})};
    state const before = acc;
    auto st = fpdt::merge_partials(acc.view(), partial_cview(bad));
    REQUIRE_FALSE(st.ok());
    CHECK(st.code() == fpdt::errc::shape_mismatch);
    CHECK(contains(st.message(), "other"));
    CHECK(contains(st.message(), "got [2, 3]"));
    CHECK(acc.out == before.out);
    CHECK(acc.lse == before.lse);
  }
  SUBCASE("check_partial names the state") {
    state s(6, 3, 2);
    std::vector<float> bad_lse(6 * 3, 0.0f);
    partial_view bad{s.view().out, fpdt_test::view(bad_lse, std::array<index_t, 2>{6, 3})};
    auto st = fpdt::check_partial(bad, "my state");
    REQUIRE_FALSE(st.ok());
    CHECK(contains(st.message(), "my state"));
    CHECK(contains(st.message(), "[3, 6]"));
    CHECK(contains(st.message(), "[6, 3, 2]"));
    CHECK(fpdt::check_partial(s.view(), "ok state").ok());
  }
}

TEST_CASE("merge: strided views merge like contiguous ones and touch only their elements") {
  // out [Sq, H, D] with D interleaved (stride 2) and lse [H, Sq] transposed over an [Sq, H] buffer.
  constexpr index_t sq = 5, h = 3, d = 4;
  state a(sq, h, d), b(sq, h, d);
  fill_finite(a, 21, -3, 3);
  fill_finite(b, 22, -3, 3);
  make_empty(a, 1, 2);
  make_empty(b, 3, 0);
  state ref = a;
  REQUIRE(fpdt::merge_partials(ref.view(), partial_cview(b.view())).ok());

  std::vector<float> out_buf(static_cast<std::size_t>(sq * h * d * 2), fnan);
  std::vector<float> lse_buf(static_cast<std::size_t>(sq * h), fnan);
  auto out = fpdt::make_tensor_view(out_buf.data(), std::array<index_t, 3>{sq, h, d},
                                    std::array<index_t, 3>{h * d * 2, d * 2, 2},
                                    static_cast<index_t>(out_buf.size()));
  auto lse =
      fpdt::make_tensor_view(lse_buf.data(), std::array<index_t, 2>{h, sq},
                             std::array<index_t, 2>{1, h}, static_cast<index_t>(lse_buf.size()));
  REQUIRE(out.ok());
  REQUIRE(lse.ok());
  for (index_t s = 0; s < sq; ++s)
    for (index_t hh = 0; hh < h; ++hh) {
      (*lse)(hh, s) = a.l(s, hh);
      for (index_t i = 0; i < d; ++i)
        (*out)(s, hh, i) = a.row(s, hh)[i];
    }
  REQUIRE(fpdt::merge_partials(partial_view{*out, *lse}, partial_cview(b.view())).ok());
  for (index_t s = 0; s < sq; ++s)
    for (index_t hh = 0; hh < h; ++hh) {
      CHECK(same_bits(&(*lse)(hh, s), &ref.l(s, hh), 1));
      for (index_t i = 0; i < d; ++i)
        CHECK(same_bits(&(*out)(s, hh, i), &ref.row(s, hh)[i], 1));
    }
  for (std::size_t i = 1; i < out_buf.size(); i += 2)
    CHECK(std::isnan(out_buf[i])); // gaps untouched
}

TEST_CASE("merge: associative and commutative within fp32 rounding") {
  // Three states over disjoint key sets, with a few empty rows in each; every merge order must
  // agree with the float64 three-way merge l = log(sum e^l_i), o = sum o_i e^(l_i - l).
  constexpr index_t sq = 8, h = 2, d = 16;
  state a(sq, h, d), b(sq, h, d), c(sq, h, d);
  fill_finite(a, 31, -5, 5);
  fill_finite(b, 32, -5, 5);
  fill_finite(c, 33, -5, 5);
  make_empty(a, 0, 0);
  make_empty(b, 0, 0);
  make_empty(c, 0, 0); // a row empty everywhere
  make_empty(a, 1, 1);
  make_empty(b, 2, 0);
  make_empty(c, 3, 1);
  make_empty(a, 4, 0);
  make_empty(b, 4, 0); // only c has keys
  auto merge = [](state x, state const& y) {
    state yy = y;
    REQUIRE(fpdt::merge_partials(x.view(), partial_cview(yy.view())).ok());
    return x;
  };
  std::vector<state> orders{merge(merge(a, b), c), merge(a, merge(b, c)), merge(merge(a, c), b),
                            merge(merge(c, b), a), merge(c, merge(a, b)), merge(merge(b, a), c)};
  state const ab = merge(a, b), ba = merge(b, a);
  for (index_t s = 0; s < sq; ++s)
    for (index_t hh = 0; hh < h; ++hh) {
      CAPTURE(s);
      CAPTURE(hh);
      std::array<state*, 3> in{&a, &b, &c};
      double m = -fpdt_test::inf64;
      for (auto* p : in)
        m = std::max(m, double{p->l(s, hh)});
      double l = -fpdt_test::inf64, scale = 0.0;
      std::vector<double> o(static_cast<std::size_t>(d), 0.0);
      if (m > -fpdt_test::inf64) {
        double sum = 0.0;
        for (auto* p : in)
          sum += std::exp(double{p->l(s, hh)} - m);
        l = m + std::log(sum);
        std::vector<double> mag(static_cast<std::size_t>(d), 0.0);
        for (auto* p : in) {
          double const w = std::exp(double{p->l(s, hh)} - l);
          for (index_t i = 0; i < d; ++i) {
            o[static_cast<std::size_t>(i)] += double{p->row(s, hh)[i]} * w;
            mag[static_cast<std::size_t>(i)] += std::abs(double{p->row(s, hh)[i]}) * w;
          }
        }
        scale = *std::max_element(mag.begin(), mag.end());
      }
      for (state& r : orders) {
        if (l == -fpdt_test::inf64) {
          CHECK(r.l(s, hh) == ninf);
          for (index_t i = 0; i < d; ++i)
            CHECK(r.row(s, hh)[i] == 0.0f);
          continue;
        }
        // Two merges: the one-merge bound of A7 (< 1e-6, |l| <= 6.1 here: ulp 4.8e-7) twice,
        // plus the first merge's lse error carried into the second one's weights.
        CHECK(std::abs(double{r.l(s, hh)} - l) <= 2e-6 * std::max(1.0, std::abs(l)));
        for (index_t i = 0; i < d; ++i)
          CHECK(std::abs(double{r.row(s, hh)[i]} - o[static_cast<std::size_t>(i)]) <= 3e-6 * scale);
      }
      // Commutativity of a single merge: the formula is symmetric, so the two orders may differ
      // only by the rounding of the final sum.
      state const& ab_ = ab;
      state const& ba_ = ba;
      CHECK(ab_.l(s, hh) == ba_.l(s, hh));
      for (index_t i = 0; i < d; ++i)
        CHECK(std::abs(ab_.row(s, hh)[i] - ba_.row(s, hh)[i]) <=
              1e-6f * (1.0f + std::abs(ab_.row(s, hh)[i])));
    }
}
