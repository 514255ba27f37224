// Tests of include/fpdt/schedule/token_layout.hpp: the chunk-interleaved token layout of
// docs/design.md 2.1. Divisibility errors (CASES.md A2), the interleaving spelled out by hand, and for
// many (S, P, C) with tokens that encode their global index: scatter/gather round trips, every
// token on exactly one rank, the all-to-all property (local chunk j of all ranks, rank-major, is
// global chunk j), position ids, the inverse map, strided views, and errors that write nothing.
#include <fpdt/schedule/token_layout.hpp>

#include <doctest/doctest.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using fpdt::errc;
using fpdt::index_t;
using fpdt::token_layout;

namespace {

bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

// A row-major [rows, w] view of `buf` (sized rows * w).
template <class T> fpdt::tensor_view<T, 2> view2(std::vector<T>& buf, index_t rows, index_t w) {
  REQUIRE(static_cast<index_t>(buf.size()) == rows * w);
  return fpdt::contiguous_view(buf.data(), std::array<index_t, 2>{rows, w},
                               static_cast<index_t>(buf.size()))
      .value();
}

// Value of element (token t, column c) of a global `[S, w]` tensor: its row-major index, so each
// element is distinct and exactly representable (the callers keep S * w within T's range).
template <class T> T encode(index_t t, index_t c, index_t w) { return static_cast<T>(t * w + c); }

token_layout make_ok(index_t S, index_t P, index_t C) {
  auto l = token_layout::make(S, P, C);
  REQUIRE_MESSAGE(l.ok(), l.error().to_string());
  return *l;
}

// make(S, P, C) must fail with invalid_argument and a message holding every part of `parts`.
void check_make_error(index_t S, index_t P, index_t C, std::vector<std::string> const& parts) {
  CAPTURE(S);
  CAPTURE(P);
  CAPTURE(C);
  auto l = token_layout::make(S, P, C);
  REQUIRE_FALSE(l.ok());
  CHECK(l.error().code() == errc::invalid_argument);
  std::string const msg = l.error().message();
  CAPTURE(msg);
  for (auto const& p : parts) CHECK(contains(msg, p));
}

// Full property check of one layout with row width w and element type T.
template <class T> void check_layout(index_t S, index_t P, index_t C, index_t w) {
  CAPTURE(S);
  CAPTURE(P);
  CAPTURE(C);
  CAPTURE(w);
  token_layout const L = make_ok(S, P, C);
  REQUIRE(L.sequence() == S);
  REQUIRE(L.ranks() == P);
  REQUIRE(L.chunk() == C);
  REQUIRE(L.chunks() == S / C);
  REQUIRE(L.local_tokens() == S / P);
  REQUIRE(L.piece() == C / P);
  index_t const n = S / P;

  std::vector<T> gbuf(static_cast<std::size_t>(S * w));
  for (index_t t = 0; t < S; ++t)
    for (index_t c = 0; c < w; ++c) gbuf[static_cast<std::size_t>(t * w + c)] = encode<T>(t, c, w);
  auto global = view2(gbuf, S, w); // mutable: scatter must accept it as its read-only input

  std::vector<std::vector<T>> locals(static_cast<std::size_t>(P));
  std::vector<index_t> seen(static_cast<std::size_t>(S), 0);
  for (index_t r = 0; r < P; ++r) {
    CAPTURE(r);
    auto& lbuf = locals[static_cast<std::size_t>(r)];
    lbuf.assign(static_cast<std::size_t>(n * w), static_cast<T>(-1));
    auto local = view2(lbuf, n, w);
    REQUIRE(L.scatter(global, r, local).ok());

    std::vector<index_t> pos(static_cast<std::size_t>(n), -1);
    auto pv = fpdt::contiguous_view(pos.data(), std::array<index_t, 1>{n}, n).value();
    REQUIRE(L.position_ids(r, pv).ok());

    for (index_t l = 0; l < n; ++l) {
      CAPTURE(l);
      index_t const g = L.global_position(r, l);
      REQUIRE(g >= 0);
      REQUIRE(g < S);
      CHECK(pos[static_cast<std::size_t>(l)] == g);            // position ids are global
      for (index_t c = 0; c < w; ++c) CHECK(local(l, c) == encode<T>(g, c, w)); // the right row
      ++seen[static_cast<std::size_t>(g)];
      // local_of inverts global_position; the checked variants agree.
      auto const rl = L.local_of(g);
      CHECK(rl.first == r);
      CHECK(rl.second == l);
      auto const cg = L.checked_global_position(r, l);
      REQUIRE(cg.ok());
      CHECK(*cg == g);
      auto const cl = L.checked_local_of(g);
      REQUIRE(cl.ok());
      CHECK(*cl == std::make_pair(r, l));
      // The closed form of docs/design.md 2.1: local chunk j of rank r is global piece j*P + r.
      index_t const j = l / (C / P);
      CHECK(g == j * C + r * (C / P) + l % (C / P));
    }
  }
  // Every global token is on exactly one rank.
  for (index_t t = 0; t < S; ++t) {
    CAPTURE(t);
    CHECK(seen[static_cast<std::size_t>(t)] == 1);
    auto const rl = L.local_of(t);
    CHECK(L.global_position(rl.first, rl.second) == t);
  }

  // The all-to-all property: local chunk j of ranks 0..P-1, concatenated rank-major, is exactly
  // global chunk j, tokens [jC, (j+1)C) in order.
  index_t const pc = C / P;
  for (index_t j = 0; j < S / C; ++j) {
    CAPTURE(j);
    std::vector<T> cat;
    for (index_t r = 0; r < P; ++r) {
      auto const& lbuf = locals[static_cast<std::size_t>(r)];
      cat.insert(cat.end(), lbuf.begin() + static_cast<std::ptrdiff_t>(j * pc * w),
                 lbuf.begin() + static_cast<std::ptrdiff_t>((j + 1) * pc * w));
    }
    std::vector<T> const want(gbuf.begin() + static_cast<std::ptrdiff_t>(j * C * w),
                              gbuf.begin() + static_cast<std::ptrdiff_t>((j + 1) * C * w));
    CHECK(cat == want);
  }

  // gather on every rank reproduces the global tensor exactly; each gather writes only its rows.
  std::vector<T> back(gbuf.size(), static_cast<T>(-1));
  auto bv = view2(back, S, w);
  for (index_t r = 0; r < P; ++r) {
    CAPTURE(r);
    auto& lbuf = locals[static_cast<std::size_t>(r)];
    REQUIRE(L.gather(view2(lbuf, n, w), r, bv).ok());
    for (index_t t = 0; t < S; ++t) {
      bool const mine = L.local_of(t).first <= r;
      for (index_t c = 0; c < w; ++c)
        CHECK(bv(t, c) == (mine ? encode<T>(t, c, w) : static_cast<T>(-1)));
    }
  }
  CHECK(back == gbuf);
}

struct shape {
  index_t S, P, C;
};

// Layouts of several kinds: one chunk (plain Ulysses), one rank, pieces of one token, P == S,
// odd P, many chunks.
std::vector<shape> const shapes = {
    {16, 2, 8},  {16, 4, 8},  {16, 2, 16}, {16, 4, 4},   {12, 3, 6},  {24, 4, 8},
    {8, 1, 4},   {8, 8, 8},   {30, 3, 15}, {48, 2, 4},   {64, 4, 16}, {6, 2, 2},
    {5, 5, 5},   {1, 1, 1},   {7, 1, 7},   {96, 4, 32},  {60, 2, 6},  {40, 5, 10},
};

} // namespace

// The default layout is a valid trivial one, usable at compile time (and in kernels).
static_assert(token_layout{}.sequence() == 1 && token_layout{}.ranks() == 1 &&
              token_layout{}.chunk() == 1 && token_layout{}.chunks() == 1 &&
              token_layout{}.local_tokens() == 1 && token_layout{}.piece() == 1);
static_assert(token_layout{}.global_position(0, 0) == 0);
static_assert(std::is_trivially_copyable_v<token_layout>);

TEST_CASE("token_layout: accessors and equality") {
  token_layout const L = make_ok(48, 4, 12);
  CHECK(L.sequence() == 48);
  CHECK(L.ranks() == 4);
  CHECK(L.chunk() == 12);
  CHECK(L.chunks() == 4);
  CHECK(L.local_tokens() == 12);
  CHECK(L.piece() == 3);
  CHECK(L == make_ok(48, 4, 12));
  CHECK_FALSE(L == make_ok(48, 4, 16));
  CHECK_FALSE(L == make_ok(48, 2, 12));
  CHECK(token_layout{} == make_ok(1, 1, 1));
}

TEST_CASE("token_layout: CASES A2 divisibility errors name the numbers and the rule") {
  // (a) S = 7, P = 2: whatever the chunk, the S/P rule is named (never a dropped token).
  for (index_t C : {index_t{1}, index_t{2}, index_t{7}})
    check_make_error(7, 2, C, {"S = 7", "P = 2", "not a multiple"});
  // (b) S = 2, P = 3: a rank would be empty.
  for (index_t C : {index_t{1}, index_t{2}, index_t{3}, index_t{6}})
    check_make_error(2, 3, C, {"S = 2", "smaller than P = 3", "no token"});
  // (c) S not a multiple of C.
  check_make_error(48, 2, 20, {"S = 48 is not a multiple of the chunk C = 20", "S % C = 8"});
  // (d) C not a multiple of P.
  check_make_error(60, 2, 15, {"C = 15 is not a multiple of P = 2", "C % P = 1"});
  // Non-divisible S % P even when S >= P.
  check_make_error(10, 4, 5, {"S = 10 is not a multiple of P = 4"});
  // C larger than S cannot divide it.
  check_make_error(8, 2, 16, {"S = 8 is not a multiple of the chunk C = 16"});
}

TEST_CASE("token_layout: zero and negative sizes are rejected without dividing by zero") {
  check_make_error(0, 2, 2, {"S = 0", "positive"});
  check_make_error(-8, 2, 4, {"S = -8", "positive"});
  check_make_error(8, 0, 4, {"P = 0", "positive"});
  check_make_error(8, -2, 4, {"P = -2", "positive"});
  check_make_error(8, 2, 0, {"C = 0", "positive"});
  check_make_error(8, 2, -4, {"C = -4", "positive"});
}

TEST_CASE("token_layout: interleaving spelled out for S=16 P=2 C=8") {
  token_layout const L = make_ok(16, 2, 8);
  CHECK(L.piece() == 4);
  CHECK(L.chunks() == 2);
  std::vector<std::vector<index_t>> const want = {{0, 1, 2, 3, 8, 9, 10, 11},
                                                  {4, 5, 6, 7, 12, 13, 14, 15}};
  // Labels: W = 1, element type index_t, value = global token index.
  std::vector<index_t> labels(16);
  for (index_t t = 0; t < 16; ++t) labels[static_cast<std::size_t>(t)] = t;
  for (index_t r = 0; r < 2; ++r) {
    CAPTURE(r);
    std::vector<index_t> got(8, -1);
    REQUIRE(L.scatter(view2(labels, 16, 1), r, view2(got, 8, 1)).ok());
    CHECK(got == want[static_cast<std::size_t>(r)]);
    std::vector<index_t> pos(8, -1);
    REQUIRE(L.position_ids(r, fpdt::contiguous_view(pos.data(), std::array<index_t, 1>{8}).value()).ok());
    CHECK(pos == want[static_cast<std::size_t>(r)]);
    for (index_t l = 0; l < 8; ++l)
      CHECK(L.global_position(r, l) == want[static_cast<std::size_t>(r)][static_cast<std::size_t>(l)]);
  }
  CHECK(L.local_of(0) == std::make_pair(index_t{0}, index_t{0}));
  CHECK(L.local_of(5) == std::make_pair(index_t{1}, index_t{1}));
  CHECK(L.local_of(9) == std::make_pair(index_t{0}, index_t{5}));
  CHECK(L.local_of(12) == std::make_pair(index_t{1}, index_t{4}));
  CHECK(L.local_of(15) == std::make_pair(index_t{1}, index_t{7}));
}

TEST_CASE("token_layout: interleaving spelled out for S=16 P=4 C=8") {
  token_layout const L = make_ok(16, 4, 8); // pieces of 2 tokens
  std::vector<std::vector<index_t>> const want = {
      {0, 1, 8, 9}, {2, 3, 10, 11}, {4, 5, 12, 13}, {6, 7, 14, 15}};
  for (index_t r = 0; r < 4; ++r)
    for (index_t l = 0; l < 4; ++l) {
      CAPTURE(r);
      CAPTURE(l);
      CHECK(L.global_position(r, l) == want[static_cast<std::size_t>(r)][static_cast<std::size_t>(l)]);
    }
}

TEST_CASE("token_layout: properties for many shapes with labels W=1") {
  for (auto const& s : shapes) check_layout<index_t>(s.S, s.P, s.C, 1);
}

TEST_CASE("token_layout: properties for many shapes with hidden states W>1") {
  for (auto const& s : shapes) {
    check_layout<float>(s.S, s.P, s.C, 3);
    check_layout<double>(s.S, s.P, s.C, 8);
  }
}

TEST_CASE("token_layout: loss masks as bytes") {
  check_layout<std::uint8_t>(8, 2, 4, 1);   // values 0..7, sentinel 255
  check_layout<std::uint8_t>(48, 4, 12, 2); // values 0..95
}

TEST_CASE("token_layout: zero-width rows are accepted and copy nothing") {
  token_layout const L = make_ok(8, 2, 4);
  fpdt::tensor_view<float const, 2> const g(nullptr, {8, 0}, {0, 1});
  fpdt::tensor_view<float, 2> const l(nullptr, {4, 0}, {0, 1});
  CHECK(L.scatter(g, 1, l).ok());
  fpdt::tensor_view<float, 2> const gm(nullptr, {8, 0}, {0, 1});
  CHECK(L.gather(fpdt::tensor_view<float const, 2>(l), 1, gm).ok());
}

TEST_CASE("token_layout: strided global and column-strided local views") {
  // Global rows padded to stride 5 (W = 3); the local tensor stored transposed ([W, S/P] in
  // memory, so the view [S/P, W] has strides {1, S/P}).
  token_layout const L = make_ok(24, 3, 6);
  index_t const S = 24, W = 3, n = 8;
  std::vector<int> gbuf(static_cast<std::size_t>(S * 5), -7);
  for (index_t t = 0; t < S; ++t)
    for (index_t c = 0; c < W; ++c) gbuf[static_cast<std::size_t>(t * 5 + c)] = static_cast<int>(t * 10 + c);
  auto g = fpdt::make_tensor_view(gbuf.data(), std::array<index_t, 2>{S, W},
                                  std::array<index_t, 2>{5, 1}, static_cast<index_t>(gbuf.size()))
               .value();
  std::vector<int> const gorig = gbuf;
  std::vector<int> back(gbuf.size(), -7);
  auto bv = fpdt::make_tensor_view(back.data(), std::array<index_t, 2>{S, W},
                                   std::array<index_t, 2>{5, 1}, static_cast<index_t>(back.size()))
                .value();
  for (index_t r = 0; r < 3; ++r) {
    CAPTURE(r);
    std::vector<int> lbuf(static_cast<std::size_t>(n * W), -1);
    auto lv = fpdt::make_tensor_view(lbuf.data(), std::array<index_t, 2>{n, W},
                                     std::array<index_t, 2>{1, n}, static_cast<index_t>(lbuf.size()))
                  .value();
    REQUIRE(L.scatter(fpdt::tensor_view<int const, 2>(g), r, lv).ok());
    for (index_t l = 0; l < n; ++l)
      for (index_t c = 0; c < W; ++c) {
        CHECK(lv(l, c) == static_cast<int>(L.global_position(r, l) * 10 + c));
        CHECK(lbuf[static_cast<std::size_t>(c * n + l)] == lv(l, c)); // transposed storage
      }
    REQUIRE(L.gather(fpdt::tensor_view<int const, 2>(lv), r, bv).ok());
  }
  CHECK(back == gorig); // the padding columns stay untouched too (-7 in both)
  CHECK(gbuf == gorig); // scatter never writes its input
}

TEST_CASE("token_layout: wrong shapes and ranks are errors that write nothing") {
  token_layout const L = make_ok(16, 2, 8);
  std::vector<float> gbuf(16 * 4);
  for (std::size_t i = 0; i < gbuf.size(); ++i) gbuf[i] = static_cast<float>(i);
  std::vector<float> const gorig = gbuf;
  auto const g = view2(gbuf, 16, 4);

  auto expect_untouched = [](std::vector<float> const& v, float fill) {
    for (float x : v) CHECK(x == fill);
  };

  SUBCASE("rank out of range") {
    std::vector<float> lbuf(8 * 4, -1.0f);
    for (index_t r : {index_t{-1}, index_t{2}, index_t{100}}) {
      CAPTURE(r);
      auto const s = L.scatter(fpdt::tensor_view<float const, 2>(g), r, view2(lbuf, 8, 4));
      REQUIRE_FALSE(s.ok());
      CHECK(s.code() == errc::invalid_argument);
      CHECK(contains(s.message(), "rank " + std::to_string(r)));
      CHECK(contains(s.message(), "P = 2"));
      expect_untouched(lbuf, -1.0f);

      std::vector<float> back(16 * 4, -1.0f);
      auto const s2 = L.gather(fpdt::tensor_view<float const, 2>(view2(lbuf, 8, 4)), r, view2(back, 16, 4));
      REQUIRE_FALSE(s2.ok());
      CHECK(s2.code() == errc::invalid_argument);
      CHECK(contains(s2.message(), "token_layout::gather"));
      CHECK(contains(s2.message(), "rank " + std::to_string(r)));
      expect_untouched(back, -1.0f);

      std::vector<index_t> pos(8, -1);
      auto const s3 = L.position_ids(r, fpdt::contiguous_view(pos.data(), std::array<index_t, 1>{8}).value());
      REQUIRE_FALSE(s3.ok());
      CHECK(s3.code() == errc::invalid_argument);
      CHECK(contains(s3.message(), "rank " + std::to_string(r)));
      for (index_t p : pos) CHECK(p == -1);
    }
  }

  SUBCASE("local with the wrong number of rows") {
    std::vector<float> lbuf(7 * 4, -1.0f);
    auto const s = L.scatter(fpdt::tensor_view<float const, 2>(g), 1, view2(lbuf, 7, 4));
    REQUIRE_FALSE(s.ok());
    CHECK(s.code() == errc::shape_mismatch);
    CHECK(contains(s.message(), "rank 1"));
    CHECK(contains(s.message(), "[8, W]"));
    CHECK(contains(s.message(), "local [7, 4]"));
    CHECK(contains(s.message(), "global [16, 4]"));
    expect_untouched(lbuf, -1.0f);
  }

  SUBCASE("global with the wrong number of rows") {
    std::vector<float> g15(15 * 4, 2.0f);
    std::vector<float> lbuf(8 * 4, -1.0f);
    auto const s = L.scatter(fpdt::tensor_view<float const, 2>(view2(g15, 15, 4)), 0, view2(lbuf, 8, 4));
    REQUIRE_FALSE(s.ok());
    CHECK(s.code() == errc::shape_mismatch);
    CHECK(contains(s.message(), "rank 0"));
    CHECK(contains(s.message(), "global [15, 4]"));
    CHECK(contains(s.message(), "S = 16"));
    expect_untouched(lbuf, -1.0f);

    // gather into a global of the wrong length writes nothing either.
    std::vector<float> lsrc(8 * 4, 3.0f);
    std::vector<float> back(15 * 4, -1.0f);
    auto const s2 = L.gather(fpdt::tensor_view<float const, 2>(view2(lsrc, 8, 4)), 0, view2(back, 15, 4));
    REQUIRE_FALSE(s2.ok());
    CHECK(s2.code() == errc::shape_mismatch);
    CHECK(contains(s2.message(), "global [15, 4]"));
    expect_untouched(back, -1.0f);
  }

  SUBCASE("row widths differ") {
    std::vector<float> lbuf(8 * 3, -1.0f);
    auto const s = L.scatter(fpdt::tensor_view<float const, 2>(g), 0, view2(lbuf, 8, 3));
    REQUIRE_FALSE(s.ok());
    CHECK(s.code() == errc::shape_mismatch);
    CHECK(contains(s.message(), "same W"));
    CHECK(contains(s.message(), "local [8, 3]"));
    expect_untouched(lbuf, -1.0f);

    std::vector<float> lsrc(8 * 3, 3.0f);
    std::vector<float> back(16 * 4, -1.0f);
    auto const s2 = L.gather(fpdt::tensor_view<float const, 2>(view2(lsrc, 8, 3)), 0, view2(back, 16, 4));
    REQUIRE_FALSE(s2.ok());
    CHECK(s2.code() == errc::shape_mismatch);
    expect_untouched(back, -1.0f);
  }

  SUBCASE("position ids of the wrong length") {
    std::vector<index_t> pos(9, -1);
    auto const s = L.position_ids(1, fpdt::contiguous_view(pos.data(), std::array<index_t, 1>{9}).value());
    REQUIRE_FALSE(s.ok());
    CHECK(s.code() == errc::shape_mismatch);
    CHECK(contains(s.message(), "rank 1"));
    CHECK(contains(s.message(), "[S/P] = [8]"));
    CHECK(contains(s.message(), "got [9]"));
    for (index_t p : pos) CHECK(p == -1);
  }

  SUBCASE("overlapping global and local views") {
    // local aliases the last 8 rows of global: refused, global unchanged.
    auto const tail = g.slice(0, 8, 16).value();
    auto const s = L.scatter(fpdt::tensor_view<float const, 2>(g), 0, tail);
    REQUIRE_FALSE(s.ok());
    CHECK(s.code() == errc::invalid_argument);
    CHECK(contains(s.message(), "overlap"));
    auto const s2 = L.gather(fpdt::tensor_view<float const, 2>(tail), 1, g);
    REQUIRE_FALSE(s2.ok());
    CHECK(s2.code() == errc::invalid_argument);
  }

  CHECK(gbuf == gorig); // no error path wrote the global input
}

TEST_CASE("token_layout: checked positions reject out-of-range arguments") {
  token_layout const L = make_ok(16, 2, 8);
  auto const a = L.checked_global_position(2, 0);
  REQUIRE_FALSE(a.ok());
  CHECK(a.error().code() == errc::invalid_argument);
  CHECK(contains(a.error().message(), "rank 2"));
  auto const b = L.checked_global_position(0, 8);
  REQUIRE_FALSE(b.ok());
  CHECK(contains(b.error().message(), "local index 8"));
  CHECK(contains(b.error().message(), "S/P = 8"));
  auto const c = L.checked_global_position(1, -1);
  REQUIRE_FALSE(c.ok());
  auto const d = L.checked_local_of(16);
  REQUIRE_FALSE(d.ok());
  CHECK(d.error().code() == errc::invalid_argument);
  CHECK(contains(d.error().message(), "global position 16"));
  CHECK(contains(d.error().message(), "S = 16"));
  CHECK_FALSE(L.checked_local_of(-1).ok());
  auto const e = L.checked_global_position(1, 7);
  REQUIRE(e.ok());
  CHECK(*e == 15);
}

TEST_CASE("token_layout: packed documents restart positions at 0 and mask each document's last label, on every rank") {
  // S = 24, P = 2, C = 8 (pieces of 4). Documents of lengths 0, 5, 0, 1, 11, 7: boundaries at
  // 5, 6 and 17 (inside pieces), empty documents first and in the middle, the last ending at S.
  auto tl = token_layout::make(24, 2, 8).value();
  std::vector<index_t> const offsets{0, 0, 5, 5, 6, 17, 24};
  // Expected, written from the lengths: position within the document and "last of its document".
  std::vector<index_t> want_pos, last;
  for (index_t len : {0, 5, 0, 1, 11, 7})
    for (index_t x = 0; x < len; ++x) {
      want_pos.push_back(x);
      last.push_back(x == len - 1 ? 1 : 0);
    }
  REQUIRE(want_pos.size() == 24);
  for (index_t r = 0; r < 2; ++r) {
    CAPTURE(r);
    std::vector<index_t> pos(12, -1);
    std::vector<std::int32_t> labels(12);
    for (index_t l = 0; l < 12; ++l) labels[static_cast<std::size_t>(l)] = static_cast<std::int32_t>(tl.global_position(r, l));
    REQUIRE(tl.document_position_ids(r, offsets, fpdt::tensor_view<index_t, 1>(pos.data(), {12}, {1})).ok());
    REQUIRE(tl.mask_document_ends(r, offsets, fpdt::tensor_view<std::int32_t, 1>(labels.data(), {12}, {1}),
                                  std::int32_t{-100}).ok());
    for (index_t l = 0; l < 12; ++l) {
      auto const g = static_cast<std::size_t>(tl.global_position(r, l));
      CHECK(pos[static_cast<std::size_t>(l)] == want_pos[g]);
      CHECK(labels[static_cast<std::size_t>(l)] == (last[g] ? -100 : static_cast<std::int32_t>(g)));
    }
  }
  // Errors name the values and write nothing.
  std::vector<index_t> pos(12, 7);
  auto v = fpdt::tensor_view<index_t, 1>(pos.data(), {12}, {1});
  std::vector<index_t> const short_docs{0, 5, 20}, down{0, 9, 4, 24};
  auto e1 = tl.document_position_ids(0, short_docs, v);
  CHECK(contains(e1.to_string(), "hold 20 tokens, not S = 24"));
  auto e2 = tl.document_position_ids(1, down, v);
  CHECK(contains(e2.to_string(), "document 1 has a negative length"));
  auto e3 = tl.document_position_ids(0, std::vector<index_t>{24}, v);
  CHECK(contains(e3.to_string(), "at least 2 values"));
  CHECK(pos == std::vector<index_t>(12, 7));
}
