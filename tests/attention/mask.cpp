// Tests of include/fpdt/attention/mask.hpp: visible, visible_keys and local_keys for the full and
// causal masks, by global position (docs/design.md 3.4), including key chunks entirely before, after
// or straddling the query position and empty key chunks.
#include <fpdt/attention/mask.hpp>

#include <doctest/doctest.h>

#include <limits>
#include <vector>

using fpdt::attention_mask;
using fpdt::causal_mask;
using fpdt::full_mask;
using fpdt::index_t;
using fpdt::key_range;

namespace {

// Local indices j in [0, sk) with mask.visible(q_pos, k_offset + j), by brute force.
std::vector<index_t> brute_visible(attention_mask m, index_t q_pos, index_t k_offset, index_t sk) {
  std::vector<index_t> r;
  for (index_t j = 0; j < sk; ++j)
    if (m.visible(q_pos, k_offset + j)) r.push_back(j);
  return r;
}

// local_keys must be a valid range inside [0, sk] that holds exactly the brute-force keys.
void check_local_matches_brute(attention_mask m, index_t q_pos, index_t k_offset, index_t sk) {
  CAPTURE(q_pos);
  CAPTURE(k_offset);
  CAPTURE(sk);
  key_range const r = m.local_keys(q_pos, k_offset, sk);
  CHECK(r.begin >= 0);
  CHECK(r.end <= sk);
  CHECK(r.begin <= r.end);
  std::vector<index_t> const want = brute_visible(m, q_pos, k_offset, sk);
  std::vector<index_t> got;
  for (index_t j = r.begin; j < r.end; ++j)
    got.push_back(j);
  CHECK(got == want);
}

} // namespace

// The masks are constexpr values usable in device code; their rules hold at compile time too.
static_assert(causal_mask.visible(3, 3));
static_assert(causal_mask.visible(3, 0));
static_assert(!causal_mask.visible(3, 4));
static_assert(full_mask.visible(3, 4));
static_assert(causal_mask.local_keys(5, 3, 6).begin == 0 &&
              causal_mask.local_keys(5, 3, 6).end == 3);

TEST_CASE("mask: names and kinds") {
  CHECK(fpdt::to_string(fpdt::mask_kind::full) == "full");
  CHECK(fpdt::to_string(fpdt::mask_kind::causal) == "causal");
  CHECK(full_mask.kind == fpdt::mask_kind::full);
  CHECK(causal_mask.kind == fpdt::mask_kind::causal);
  attention_mask const def{};
  CHECK(def.kind == fpdt::mask_kind::full); // default-constructed args are bidirectional
}

TEST_CASE("mask: full mask sees every key at any position") {
  for (index_t q : {index_t{0}, index_t{1}, index_t{7}, index_t{1} << 40})
    for (index_t k : {index_t{0}, index_t{1}, index_t{6}, index_t{8}, index_t{1} << 41}) {
      CAPTURE(q);
      CAPTURE(k);
      CHECK(full_mask.visible(q, k));
    }
  key_range const r = full_mask.visible_keys(5);
  CHECK(r.begin <= 0);
  CHECK(r.end == std::numeric_limits<index_t>::max());
  // local_keys: the whole chunk, wherever it sits relative to the query.
  for (index_t q : {index_t{0}, index_t{10}, index_t{1000}})
    for (index_t koff : {index_t{0}, index_t{5}, index_t{10}, index_t{11}, index_t{5000}})
      for (index_t sk : {index_t{0}, index_t{1}, index_t{4}, index_t{64}}) {
        CAPTURE(q);
        CAPTURE(koff);
        CAPTURE(sk);
        key_range const l = full_mask.local_keys(q, koff, sk);
        CHECK(l.begin == 0);
        CHECK(l.end == sk);
      }
  // Large offsets must not overflow (hi = max index).
  key_range const big = full_mask.local_keys(0, index_t{1} << 50, 1000);
  CHECK(big.begin == 0);
  CHECK(big.end == 1000);
}

TEST_CASE("mask: causal visibility is by global position (key <= query)") {
  CHECK(causal_mask.visible(0, 0));
  CHECK_FALSE(causal_mask.visible(0, 1));
  CHECK(causal_mask.visible(4, 2));
  CHECK(causal_mask.visible(4, 4));
  CHECK_FALSE(causal_mask.visible(4, 5));
  CHECK(causal_mask.visible(index_t{1} << 40, (index_t{1} << 40) - 1));
  CHECK_FALSE(causal_mask.visible(index_t{1} << 40, (index_t{1} << 40) + 1));
  key_range const r = causal_mask.visible_keys(5);
  CHECK(r.end == 6);
  CHECK(r.begin <= 0);
}

TEST_CASE("mask: causal local_keys for chunks before or after or straddling the query") {
  // Chunk entirely before the query (keys 0..3, query at 10): all visible.
  key_range r = causal_mask.local_keys(10, 0, 4);
  CHECK(r.begin == 0);
  CHECK(r.end == 4);
  // Chunk ending exactly at the query (keys 0..3, query 3): all visible, key 3 included.
  r = causal_mask.local_keys(3, 0, 4);
  CHECK(r.begin == 0);
  CHECK(r.end == 4);
  // Straddling (keys 3..8, query 5): keys 3, 4, 5 = local [0, 3).
  r = causal_mask.local_keys(5, 3, 6);
  CHECK(r.begin == 0);
  CHECK(r.end == 3);
  // Chunk starting at the query (keys 5..8, query 5): only the first key.
  r = causal_mask.local_keys(5, 5, 4);
  CHECK(r.begin == 0);
  CHECK(r.end == 1);
  // Chunk entirely after the query (keys 6..9, query 5): empty.
  r = causal_mask.local_keys(5, 6, 4);
  CHECK(r.begin >= r.end);
  CHECK(r.begin >= 0);
  CHECK(r.end <= 4);
  // Far after (keys 100..103, query 0): empty, clamped into [0, sk].
  r = causal_mask.local_keys(0, 100, 4);
  CHECK(r.begin == r.end);
  CHECK(r.begin >= 0);
  CHECK(r.end <= 4);
  // Uneven global alignment (CASES.md A5): queries 2, 3, 4 against keys 0..4.
  for (index_t i = 0; i < 3; ++i) {
    key_range const a5 = causal_mask.local_keys(2 + i, 0, 5);
    CHECK(a5.begin == 0);
    CHECK(a5.end == 3 + i);
  }
  // Fully masked rows (CASES.md A6): queries 0..4 against keys at 2, 3, 4.
  for (index_t q = 0; q < 5; ++q) {
    key_range const a6 = causal_mask.local_keys(q, 2, 3);
    CHECK(a6.end - a6.begin == (q < 2 ? 0 : q - 1));
  }
}

TEST_CASE("mask: empty key chunks (sk = 0) give empty ranges for both masks") {
  for (attention_mask m : {full_mask, causal_mask})
    for (index_t q : {index_t{0}, index_t{3}, index_t{100}})
      for (index_t koff : {index_t{0}, index_t{3}, index_t{4}, index_t{200}}) {
        CAPTURE(fpdt::to_string(m.kind));
        CAPTURE(q);
        CAPTURE(koff);
        key_range const r = m.local_keys(q, koff, 0);
        CHECK(r.begin == 0);
        CHECK(r.end == 0);
      }
}

TEST_CASE("mask: local_keys equals brute force over all small placements") {
  for (attention_mask m : {full_mask, causal_mask})
    for (index_t q = 0; q < 24; ++q)
      for (index_t koff = 0; koff < 24; ++koff)
        for (index_t sk = 0; sk <= 9; ++sk)
          check_local_matches_brute(m, q, koff, sk);
  // And around a large global position (long contexts).
  index_t const base = index_t{1} << 36;
  for (index_t dq = -3; dq <= 12; ++dq)
    for (index_t sk : {index_t{0}, index_t{1}, index_t{5}, index_t{8}})
      check_local_matches_brute(causal_mask, base + dq, base, sk);
}

// The window's definition, written here: q - left <= k <= q + right, and k <= q when causal.
static bool window_visible(bool causal, index_t left, index_t right, index_t q, index_t k) {
  return (left < 0 || k >= q - left) && (causal ? k <= q : (right < 0 || k <= q + right));
}

TEST_CASE("mask: sliding windows match their definition, and local_keys and visible_pairs match brute force") {
  struct win { bool causal; index_t left, right; };
  for (win w : {win{true, 0, -1}, win{true, 3, -1}, win{true, 3, 0}, win{false, 2, 5}, win{false, 0, 0},
                win{false, -1, 4}, win{false, 6, -1}}) {
    attention_mask const m{w.causal ? fpdt::mask_kind::causal : fpdt::mask_kind::full, w.left, w.right};
    CAPTURE(fpdt::to_string(m));
    REQUIRE(fpdt::check_mask(m).ok());
    for (index_t q = 0; q < 20; ++q)
      for (index_t k = 0; k < 24; ++k) CHECK(m.visible(q, k) == window_visible(w.causal, w.left, w.right, q, k));
    for (index_t q = 0; q < 20; ++q)
      for (index_t koff = 0; koff < 20; koff += 3)
        for (index_t sk : {index_t{0}, index_t{1}, index_t{4}, index_t{7}}) check_local_matches_brute(m, q, koff, sk);
    for (index_t qb = 0; qb < 14; qb += 3)
      for (index_t sq : {index_t{0}, index_t{1}, index_t{5}})
        for (index_t kb = 0; kb < 16; kb += 2)
          for (index_t sk : {index_t{1}, index_t{3}, index_t{6}}) {
            double n = 0;
            for (index_t q = qb; q < qb + sq; ++q)
              for (index_t k = kb; k < kb + sk; ++k) n += window_visible(w.causal, w.left, w.right, q, k) ? 1 : 0;
            CAPTURE(qb);
            CAPTURE(sq);
            CAPTURE(kb);
            CAPTURE(sk);
            CHECK(m.visible_pairs(qb, sq, kb, sk) == n);
          }
  }
  // Long contexts: no overflow at far positions, a huge window is the unwindowed mask.
  attention_mask const huge{fpdt::mask_kind::full, index_t{1} << 62, index_t{1} << 62};
  CHECK(huge.visible(index_t{1} << 40, 0));
  CHECK(huge.visible(0, index_t{1} << 40));
  CHECK(huge.visible_pairs(0, 1 << 20, 1 << 20, 1 << 20) == 1099511627776.0);
  CHECK(causal_mask.visible_pairs(1 << 20, 1 << 20, 1 << 20, 1 << 20) == 549756338176.0); // C (C + 1) / 2
  CHECK(fpdt::causal_window_mask(4096).window_left == 4095);
  CHECK_FALSE(fpdt::check_mask(fpdt::causal_window_mask(0)).ok()); // not silently unbounded
  CHECK(fpdt::to_string(fpdt::causal_window_mask(8)) == "causal, window (7, 0)");
  CHECK(fpdt::to_string(attention_mask{fpdt::mask_kind::full, -1, 3}) == "full, window (inf, 3)");
}

TEST_CASE("mask: check_mask refuses negative windows, a causal right window and unknown kinds, naming them") {
  auto msg = [](attention_mask m) { return fpdt::check_mask(m, "t").to_string(); };
  CHECK(fpdt::check_mask(causal_mask).ok());
  CHECK(fpdt::check_mask(full_mask).ok());
  CHECK(fpdt::check_mask({fpdt::mask_kind::causal, 5, 0}).ok());
  CHECK(msg({fpdt::mask_kind::full, -2, 1}).find("window (-2, 1)") != std::string::npos);
  CHECK(msg({fpdt::mask_kind::causal, 1, 3}).find("window_right = 3") != std::string::npos);
  CHECK(msg({static_cast<fpdt::mask_kind>(9), -1, -1}).find("mask kind 9") != std::string::npos);
}

TEST_CASE("mask: documents (cu_seqlens) with and without windows match their definition and brute-force counts") {
  // Documents of lengths 0, 3, 1, 0, 7, 5, 0 (16 tokens): doc[t] from the lengths, written here.
  std::vector<index_t> const lengths{0, 3, 1, 0, 7, 5, 0};
  std::vector<index_t> const offsets = fpdt::document_offsets_from_lengths(lengths).value();
  CHECK(offsets == std::vector<index_t>{0, 0, 3, 4, 4, 11, 16, 16});
  std::vector<index_t> doc;
  for (std::size_t d = 0; d < lengths.size(); ++d)
    for (index_t x = 0; x < lengths[d]; ++x) doc.push_back(static_cast<index_t>(d));
  index_t const s = 16;
  struct win { bool causal; index_t left, right; };
  for (win w : {win{true, -1, -1}, win{false, -1, -1}, win{true, 2, -1}, win{false, 1, 3}}) {
    attention_mask const m = fpdt::with_documents(
        {w.causal ? fpdt::mask_kind::causal : fpdt::mask_kind::full, w.left, w.right}, offsets);
    CAPTURE(fpdt::to_string(m));
    REQUIRE(fpdt::check_documents(m, s).ok());
    auto def = [&](index_t q, index_t k) {
      return window_visible(w.causal, w.left, w.right, q, k) && doc[static_cast<std::size_t>(q)] == doc[static_cast<std::size_t>(k)];
    };
    for (index_t q = 0; q < s; ++q) {
      for (index_t k = 0; k < s; ++k) CHECK(m.visible(q, k) == def(q, k));
      for (index_t koff = 0; koff < s; koff += 3) check_local_matches_brute(m, q, koff, std::min<index_t>(5, s - koff));
    }
    for (index_t qb = 0; qb < s; qb += 2)
      for (index_t sq = 1; qb + sq <= s; sq += 5)
        for (index_t kb = 0; kb < s; kb += 3)
          for (index_t sk = 1; kb + sk <= s; sk += 4) {
            double n = 0;
            for (index_t q = qb; q < qb + sq; ++q)
              for (index_t k = kb; k < kb + sk; ++k) n += def(q, k) ? 1 : 0;
            CAPTURE(qb);
            CAPTURE(sq);
            CAPTURE(kb);
            CAPTURE(sk);
            CHECK(m.visible_pairs(qb, sq, kb, sk) == n);
          }
  }
  CHECK(fpdt::to_string(fpdt::with_documents(causal_mask, offsets)) == "causal, 7 documents");
  // Offsets that do not end at S, or go down, are refused naming the values.
  CHECK(fpdt::check_documents(fpdt::with_documents(causal_mask, offsets), 17).to_string().find("hold 16 tokens, not S = 17") !=
        std::string::npos);
}

TEST_CASE("mask: canonical spells masks that see the same keys alike, and only those, and limits_by_position") {
  index_t const s = 6;
  std::vector<attention_mask> all;
  for (auto kind : {fpdt::mask_kind::full, fpdt::mask_kind::causal})
    for (index_t left : {index_t{-1}, index_t{0}, index_t{1}, s - 2, s - 1, s, s + 5})
      for (index_t right : {index_t{-1}, index_t{0}, index_t{1}, s - 2, s - 1, s}) {
        attention_mask const m{kind, left, right};
        if (fpdt::check_mask(m).ok()) all.push_back(m);
      }
  auto seen = [&](attention_mask const& m) {
    std::vector<char> v;
    for (index_t q = 0; q < s; ++q)
      for (index_t k = 0; k < s; ++k) v.push_back(m.visible(q, k) ? 1 : 0);
    return v;
  };
  auto same = [](attention_mask const& a, attention_mask const& b) {
    return a.kind == b.kind && a.window_left == b.window_left && a.window_right == b.window_right;
  };
  for (auto const& a : all)
    for (auto const& b : all) {
      CAPTURE(fpdt::to_string(a));
      CAPTURE(fpdt::to_string(b));
      CHECK(same(a.canonical(s), b.canonical(s)) == (seen(a) == seen(b)));
    }
  CHECK_FALSE(fpdt::causal_mask.limits_by_position());
  CHECK_FALSE(fpdt::full_mask.limits_by_position());
  CHECK_FALSE((attention_mask{fpdt::mask_kind::causal, -1, 0}).limits_by_position());
  CHECK(fpdt::causal_window_mask(4).limits_by_position());
  CHECK((attention_mask{fpdt::mask_kind::full, -1, 3}).limits_by_position());
  std::vector<index_t> const offsets{0, 2, 6};
  CHECK(fpdt::with_documents(fpdt::causal_mask, offsets).limits_by_position());
}
