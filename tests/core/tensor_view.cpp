// Tests of include/fpdt/core/tensor_view.hpp: checked creation, indexing, slicing, shape checks.
#include <fpdt/core/tensor_view.hpp>

#include <doctest/doctest.h>

#include <array>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

using fpdt::index_t;

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }
} // namespace

// A view converts to a read-only view of the same element type, never to another element type.
static_assert(std::is_convertible_v<fpdt::tensor_view<float, 3>, fpdt::tensor_view<float const, 3>>);
static_assert(!std::is_convertible_v<fpdt::tensor_view<float, 3>, fpdt::tensor_view<double const, 3>>);
static_assert(!std::is_convertible_v<fpdt::tensor_view<float const, 3>, fpdt::tensor_view<float, 3>>);

TEST_CASE("tensor_view: row-major [S, H, D] indexing with distinct extents") {
  // Extents all differ (CASES.md A13): a transposed index would read a different element.
  constexpr index_t S = 5, H = 3, D = 4;
  std::vector<float> buf(S * H * D);
  std::iota(buf.begin(), buf.end(), 0.0f);
  auto v = fpdt::contiguous_view(buf.data(), std::array<index_t, 3>{S, H, D},
                                 static_cast<index_t>(buf.size()));
  REQUIRE(v.ok());
  CHECK(v->size() == S * H * D);
  CHECK(v->is_contiguous());
  CHECK(v->stride(0) == H * D);
  CHECK(v->stride(1) == D);
  CHECK(v->stride(2) == 1);
  for (index_t s = 0; s < S; ++s)
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) CHECK((*v)(s, h, d) == static_cast<float>((s * H + h) * D + d));
  fpdt::tensor_view<float const, 3> cv = *v; // read-only conversion
  CHECK(cv(4, 2, 3) == buf.back());
}

TEST_CASE("tensor_view: transposed strides are accepted and index correctly") {
  // A [H, S] view of [S, H] data (the LSE layout question): strides {1, H}.
  constexpr index_t S = 6, H = 2;
  std::vector<int> buf(S * H);
  std::iota(buf.begin(), buf.end(), 0);
  auto t = fpdt::make_tensor_view(buf.data(), std::array<index_t, 2>{H, S}, std::array<index_t, 2>{1, H},
                                  static_cast<index_t>(buf.size()));
  REQUIRE(t.ok());
  CHECK_FALSE(t->is_contiguous());
  for (index_t h = 0; h < H; ++h)
    for (index_t s = 0; s < S; ++s) CHECK((*t)(h, s) == s * H + h);
}

TEST_CASE("tensor_view: bad shapes give errors naming the values") {
  std::vector<float> buf(24);
  auto neg = fpdt::contiguous_view(buf.data(), std::array<index_t, 2>{4, -6});
  REQUIRE_FALSE(neg.ok());
  CHECK(neg.error().code() == fpdt::errc::shape_mismatch);
  CHECK(contains(neg.error().message(), "extent -6 of dim 1 is negative"));

  auto null = fpdt::contiguous_view(static_cast<float*>(nullptr), std::array<index_t, 2>{4, 6});
  REQUIRE_FALSE(null.ok());
  CHECK(contains(null.error().message(), "null data pointer"));

  auto small = fpdt::contiguous_view(buf.data(), std::array<index_t, 3>{2, 3, 5}, 24);
  REQUIRE_FALSE(small.ok());
  CHECK(contains(small.error().message(), "reaches element 29"));
  CHECK(contains(small.error().message(), "holds only 24"));

  auto zero_stride = fpdt::make_tensor_view(buf.data(), std::array<index_t, 2>{4, 6},
                                            std::array<index_t, 2>{0, 1});
  REQUIRE_FALSE(zero_stride.ok());
  CHECK(contains(zero_stride.error().message(), "stride 0 of dim 0 (extent 4)"));

  auto overlap = fpdt::make_tensor_view(buf.data(), std::array<index_t, 2>{4, 6},
                                        std::array<index_t, 2>{3, 1});
  REQUIRE_FALSE(overlap.ok());
  CHECK(contains(overlap.error().message(), "overlaps"));

  auto huge = fpdt::make_tensor_view(buf.data(), std::array<index_t, 2>{index_t{1} << 40, index_t{1} << 40},
                                     std::array<index_t, 2>{index_t{1} << 40, 1});
  REQUIRE_FALSE(huge.ok());
  CHECK(contains(huge.error().message(), "overflows"));

  auto too_many = fpdt::contiguous_view(buf.data(), std::array<index_t, 4>{1 << 20, 1 << 20, 1 << 20, 1 << 20});
  REQUIRE_FALSE(too_many.ok());
  CHECK(contains(too_many.error().message(), "64-bit"));

  auto negative_stride = fpdt::make_tensor_view(buf.data(), std::array<index_t, 2>{4, 4},
                                                std::array<index_t, 2>{-1, 1});
  REQUIRE_FALSE(negative_stride.ok());
  CHECK(contains(negative_stride.error().message(), "strides [-1, 1]"));

  // Empty views are fine, even with a null pointer; extent-1 dimensions may have any stride.
  CHECK(fpdt::contiguous_view(static_cast<float*>(nullptr), std::array<index_t, 2>{0, 6}).ok());
  CHECK(fpdt::make_tensor_view(buf.data(), std::array<index_t, 2>{1, 6}, std::array<index_t, 2>{0, 1}, 24).ok());
}

TEST_CASE("tensor_view: slice along a dimension") {
  constexpr index_t S = 8, H = 2, D = 3;
  std::vector<float> buf(S * H * D);
  std::iota(buf.begin(), buf.end(), 0.0f);
  auto v = fpdt::contiguous_view(buf.data(), std::array<index_t, 3>{S, H, D});
  REQUIRE(v.ok());
  auto chunk = v->slice(0, 4, 6); // tokens [4, 6): one chunk
  REQUIRE(chunk.ok());
  CHECK(chunk->extent(0) == 2);
  CHECK((*chunk)(0, 0, 0) == (*v)(4, 0, 0));
  CHECK((*chunk)(1, 1, 2) == (*v)(5, 1, 2));
  auto head = v->slice(1, 1, 2);
  REQUIRE(head.ok());
  CHECK((*head)(3, 0, 1) == (*v)(3, 1, 1));
  CHECK_FALSE(head->is_contiguous());
  auto bad = v->slice(0, 6, 9);
  REQUIRE_FALSE(bad.ok());
  CHECK(contains(bad.error().message(), "range [6, 9) of dim 0"));
  CHECK(contains(bad.error().message(), "extent 8"));
  CHECK_FALSE(v->slice(3, 0, 1).ok());
  auto empty = v->slice(0, 8, 8);
  REQUIRE(empty.ok());
  CHECK(empty->empty());
}

TEST_CASE("tensor_view: check_extents names the tensor and both shapes") {
  std::vector<float> buf(8 * 4 * 3);
  auto q = fpdt::contiguous_view(buf.data(), std::array<index_t, 3>{8, 4, 3});
  REQUIRE(q.ok());
  CHECK(fpdt::check_extents(*q, {8, 4, 3}, "q").ok());
  CHECK(fpdt::check_extents(*q, {fpdt::any_extent, 4, 3}, "q").ok());
  fpdt::status s = fpdt::check_extents(*q, {8, 4, 2}, "q");
  CHECK(s.code() == fpdt::errc::shape_mismatch);
  CHECK(s.message() == "q: expected extents [8, 4, 2], got [8, 4, 3]");
}

TEST_CASE("tensor_view: views_overlap compares memory spans, any strides and element types") {
  std::vector<float> buf(64);
  auto at = [&](index_t off, std::array<index_t, 2> e) {
    return fpdt::contiguous_view(buf.data() + off, e).value();
  };
  CHECK(fpdt::views_overlap(at(0, {2, 4}), at(0, {2, 4})));
  CHECK_FALSE(fpdt::views_overlap(at(0, {2, 4}), at(8, {2, 4}))); // adjacent: elements 0-7, 8-15
  CHECK(fpdt::views_overlap(at(0, {2, 4}), at(7, {2, 4})));       // one element shared
  CHECK(fpdt::views_overlap(at(7, {2, 4}), at(0, {2, 4})));
  // Column slices of one buffer (columns 0-1 and 2-3 of [4, 4]) interleave but share nothing:
  // exact for views with one outer stride whose rows are contiguous.
  auto cols = [&](index_t c0, index_t w) {
    return fpdt::make_tensor_view(buf.data() + c0, std::array<index_t, 2>{4, w}, std::array<index_t, 2>{4, 1}).value();
  };
  CHECK_FALSE(fpdt::views_overlap(cols(0, 2), cols(2, 2)));
  CHECK(fpdt::views_overlap(cols(0, 3), cols(2, 2)));
  // Interleaved views of different strides: their spans decide (conservative).
  auto every_other = fpdt::make_tensor_view(buf.data() + 1, std::array<index_t, 1>{8}, std::array<index_t, 1>{2}).value();
  CHECK(fpdt::views_overlap(every_other, cols(0, 1)));
  // Another element type and rank: bytes count, not elements.
  auto bytes = reinterpret_cast<unsigned char*>(buf.data());
  auto tail = fpdt::contiguous_view(bytes + 8 * sizeof(float), std::array<index_t, 1>{4}).value();
  CHECK_FALSE(fpdt::views_overlap(at(0, {2, 4}), tail));
  auto last_byte = fpdt::contiguous_view(bytes + 8 * sizeof(float) - 1, std::array<index_t, 1>{1}).value();
  CHECK(fpdt::views_overlap(at(0, {2, 4}), last_byte));
  // Empty views overlap nothing.
  CHECK_FALSE(fpdt::views_overlap(at(0, {0, 4}), at(0, {2, 4})));
  CHECK_FALSE(fpdt::views_overlap(fpdt::tensor_view<float, 3>{}, at(0, {2, 4})));
  // A negative stride: the span runs down from data().
  fpdt::tensor_view<float, 1> down(buf.data() + 20, {4}, {-2}); // elements 20, 18, 16, 14
  CHECK(fpdt::views_overlap(down, at(14, {1, 1})));
  CHECK_FALSE(fpdt::views_overlap(down, at(21, {1, 1})));
  CHECK_FALSE(fpdt::views_overlap(down, at(13, {1, 1})));
  auto const sp = fpdt::span_of(down);
  CHECK(sp.first == static_cast<void const*>(buf.data() + 14));
  CHECK(sp.last == static_cast<void const*>(buf.data() + 21));
}

TEST_CASE("tensor_view: views_overlap is exact for column slices of one buffer (every placement)") {
  // Every pair of [rows, w] column-block views with row stride R placed at element offsets 0..2R
  // of one buffer (so their rows interleave in every way): views_overlap must equal whether the
  // two element sets meet, and the same for [rows, h, d] views of a fused [rows, H, d] tensor.
  std::vector<float> buf(256);
  index_t const r = 6;
  int pairs = 0;
  for (index_t rows_a : {1, 3})
    for (index_t rows_b : {1, 2, 4})
      for (index_t wa : {1, 2, 6})
        for (index_t wb : {1, 3})
          for (index_t oa = 0; oa <= 2 * r; ++oa)
            for (index_t ob = 0; ob <= 2 * r; ++ob) {
              auto a = fpdt::make_tensor_view(buf.data() + oa, std::array<index_t, 2>{rows_a, wa},
                                              std::array<index_t, 2>{r, 1}).value();
              auto b = fpdt::make_tensor_view(buf.data() + ob, std::array<index_t, 2>{rows_b, wb},
                                              std::array<index_t, 2>{r, 1}).value();
              bool meet = false;
              for (index_t i = 0; i < rows_a; ++i)
                for (index_t j = 0; j < wa; ++j)
                  for (index_t k = 0; k < rows_b; ++k)
                    for (index_t l = 0; l < wb; ++l) meet = meet || &a(i, j) == &b(k, l);
              CAPTURE(rows_a);
              CAPTURE(rows_b);
              CAPTURE(wa);
              CAPTURE(wb);
              CAPTURE(oa);
              CAPTURE(ob);
              REQUIRE(fpdt::views_overlap(a, b) == meet);
              REQUIRE(fpdt::views_overlap(b, a) == meet);
              ++pairs;
            }
  CHECK(pairs == 2 * 3 * 3 * 2 * 13 * 13);
  // dq, dk, dv as head slices of one fused gradient [S, H + 2 H_kv, D]: apart.
  index_t const s = 4, h = 4, hkv = 2, d = 8;
  std::vector<float> fused(static_cast<std::size_t>(s * (h + 2 * hkv) * d));
  auto g = fpdt::contiguous_view(fused.data(), std::array<index_t, 3>{s, h + 2 * hkv, d}).value();
  auto dq = g.slice(1, 0, h).value();
  auto dk = g.slice(1, h, h + hkv).value();
  auto dv = g.slice(1, h + hkv, h + 2 * hkv).value();
  CHECK_FALSE(fpdt::views_overlap(dq, dk));
  CHECK_FALSE(fpdt::views_overlap(dk, dv));
  CHECK_FALSE(fpdt::views_overlap(dq, dv));
  CHECK(fpdt::views_overlap(dq, g.slice(1, h - 1, h + 1).value()));
}
