// Tests of include/fpdt/schedule/schedule.hpp: pair counts, the safety checks, and schedules the
// checker must reject.
#include <fpdt/schedule/schedule.hpp>

#include <doctest/doctest.h>

#include <set>
#include <string>
#include <utility>

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

fpdt::schedule_params params(fpdt::index_t u, bool causal, bool offload, fpdt::index_t ring,
                             fpdt::index_t ranks = 1) {
  fpdt::schedule_params p;
  p.chunks = u;
  p.ranks = ranks;
  p.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
  p.offload = offload;
  p.ring_slots = ring;
  p.bytes = {1000, 2000, 1100};
  p.q_bytes = 1000;
  p.kv_bytes = 2000;
  p.out_bytes = 1100;
  p.q_side_bytes = 3200;
  p.dout_bytes = 1000;
  p.dq_bytes = 2000;
  p.dkv_bytes = 4000;
  return p;
}

// Index of the first step matching `pred`, or -1.
template <class P> std::ptrdiff_t find_step(fpdt::schedule const& s, P pred) {
  for (std::size_t k = 0; k < s.steps.size(); ++k)
    if (pred(s.steps[k])) return static_cast<std::ptrdiff_t>(k);
  return -1;
}
} // namespace

TEST_CASE("schedule: every chunk pair computed once and every check holds for u in 1..16, P = 1 and 3") {
  for (fpdt::index_t ranks : {1, 3})
  for (fpdt::index_t u = 1; u <= 16; ++u)
    for (bool causal : {true, false})
      for (bool offload : {true, false})
        for (fpdt::index_t ring : {2, 3}) {
          CAPTURE(ranks);
          CAPTURE(u);
          CAPTURE(causal);
          CAPTURE(offload);
          CAPTURE(ring);
          auto const p = params(u, causal, offload, ring, ranks);
          for (auto const& made : {fpdt::forward_schedule(p), fpdt::backward_schedule(p)}) {
            REQUIRE(made.ok());
            fpdt::schedule const& s = *made;
            fpdt::status const st = fpdt::check_schedule(s);
            REQUIRE_MESSAGE(st.ok(), st.to_string());
            std::set<std::pair<int, int>> pairs;
            for (auto const& step : s.steps)
              if (step.kind == fpdt::step_kind::compute) {
                CHECK((!causal || step.j <= step.i));
                CHECK(pairs.insert({step.i, step.j}).second); // each pair once
              }
            CHECK(pairs.size() == static_cast<std::size_t>(causal ? u * (u + 1) / 2 : u * u));
            if (s.which == fpdt::pass::backward) { // the caller's dout once per chunk
              std::size_t from_caller = 0;
              for (auto const& step : s.steps)
                from_caller += ranks == 1 ? step.kind == fpdt::step_kind::fetch && step.what == fpdt::payload::q_side
                                          : step.kind == fpdt::step_kind::exchange && step.what == fpdt::payload::dout;
              CHECK(from_caller == static_cast<std::size_t>(u));
            }
            // Exchanges: none on one rank; on P ranks q/k/v in and out/lse out per chunk
            // (forward), dout in and dq, dk/dv out per chunk (backward), all on the comm lane,
            // each chunk handed to the caller after its exchange.
            std::size_t const ex = s.count(fpdt::step_kind::exchange);
            CHECK(ex == (ranks == 1 ? 0 : static_cast<std::size_t>((s.which == fpdt::pass::forward ? 2 : 3) * u)));
            for (auto const& step : s.steps)
              if (step.kind == fpdt::step_kind::exchange || (ranks > 1 && step.kind == fpdt::step_kind::sink))
                CHECK(step.on == fpdt::lane::comm);
            if (offload) {
              CHECK(fpdt::peak_slots(s, fpdt::ring::kv) <= s.ring_size[1]);
              CHECK(fpdt::peak_slots(s, fpdt::ring::q) <= s.ring_size[0]);
              CHECK(s.ring_size == fpdt::ring_sizes(s.which, s.params));
              // P > 1 forward: a second q slot and two kv slots for the exchange one chunk ahead.
              bool const ahead = ranks > 1 && s.which == fpdt::pass::forward;
              CHECK(s.ring_size[1] <= ring + (ahead ? 2 : 0));
              CHECK(s.ring_size[0] <= (ahead ? 2 : ring));
            } else {
              CHECK(s.count(fpdt::step_kind::fetch) <= static_cast<std::size_t>(u)); // dout only
              CHECK(s.count(fpdt::step_kind::offload) == 0);
            }
          }
        }
}

TEST_CASE("schedule: forward with offload offloads every chunk and fetches each earlier one") {
  auto const s = fpdt::forward_schedule(params(5, true, true, 2)).value();
  CHECK(s.count(fpdt::step_kind::produce) == 5);
  CHECK(s.count(fpdt::step_kind::offload) == 15); // q, kv and out of each chunk
  CHECK(s.count(fpdt::step_kind::fetch) == 10);   // kv_j for j < i
  CHECK(s.count(fpdt::step_kind::merge) == 15);
  CHECK(s.count(fpdt::step_kind::sink) == 5);
  // Fetches are on the h2d lane and offloads on d2h; compute on compute.
  for (auto const& st : s.steps) {
    if (st.kind == fpdt::step_kind::fetch) CHECK(st.on == fpdt::lane::h2d);
    if (st.kind == fpdt::step_kind::offload) CHECK(st.on == fpdt::lane::d2h);
    if (st.kind == fpdt::step_kind::compute) CHECK(st.on == fpdt::lane::compute);
  }
  CHECK(s.ring_bytes() == 1024 + 2 * 2048 + 1280);
}

TEST_CASE("schedule: a deliberately reused slot is rejected") {
  auto s = fpdt::forward_schedule(params(4, true, true, 2)).value();
  REQUIRE(fpdt::check_schedule(s).ok());
  // The second fetch into a kv slot loses its wait for the slot's release.
  std::ptrdiff_t const f = find_step(s, [](fpdt::schedule_step const& st) {
    return st.kind == fpdt::step_kind::fetch && st.j == 1;
  });
  REQUIRE(f >= 0);
  auto broken = s;
  broken.steps[static_cast<std::size_t>(f)].deps_count = 0;
  fpdt::status const st = fpdt::check_schedule(broken);
  CHECK(st.code() == fpdt::errc::internal);
  CHECK(contains(st.message(), "reloads slot"));
}

TEST_CASE("schedule: non-resident operands and bad slots and lanes and early fetches are rejected") {
  auto s = fpdt::forward_schedule(params(4, true, true, 3)).value();
  std::ptrdiff_t const c = find_step(s, [](fpdt::schedule_step const& st) {
    return st.kind == fpdt::step_kind::compute && st.i == 3 && st.j == 1;
  });
  REQUIRE(c >= 0);
  {
    auto broken = s; // compute reads a slot that holds another chunk
    auto& slot = broken.steps[static_cast<std::size_t>(c)].slot[1];
    slot = (slot + 1) % 3;
    fpdt::status const st = fpdt::check_schedule(broken);
    CHECK(st.code() == fpdt::errc::internal);
    CHECK(contains(st.message(), "does not hold chunk 1"));
  }
  {
    auto broken = s;
    broken.steps[static_cast<std::size_t>(c)].slot[1] = 3; // outside the 3-slot ring
    CHECK(contains(fpdt::check_schedule(broken).message(), "which has 3 slots"));
  }
  {
    auto broken = s;
    broken.steps[static_cast<std::size_t>(c)].on = fpdt::lane::h2d;
    CHECK(contains(fpdt::check_schedule(broken).message(), "expected compute"));
  }
  {
    // The first fetch (kv_0 for query chunk 1; nothing earlier on its lane) no longer waits for
    // the offload that wrote its host copy.
    auto broken = fpdt::forward_schedule(params(3, true, true, 3)).value();
    std::ptrdiff_t const f = find_step(broken, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::fetch && st.what == fpdt::payload::kv;
    });
    REQUIRE(f >= 0);
    broken.steps[static_cast<std::size_t>(f)].deps_count = 0;
    fpdt::status const st = fpdt::check_schedule(broken);
    CHECK(st.code() == fpdt::errc::internal);
    CHECK(contains(st.message(), "was not written before it"));
  }
}

TEST_CASE("schedule: a backward fetch of dout from host needs the write-back of its first use") {
  // With offload, query chunk i's first pair writes dq_i and dout_i back (dq_dout); later pairs
  // fetch both from host (q_side_dq). A first write-back that wrote dq_i only leaves the later
  // fetches reading a dout_i never written.
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    auto s = fpdt::backward_schedule(params(4, causal, true, 2)).value();
    REQUIRE(fpdt::check_schedule(s).ok());
    std::ptrdiff_t const w = find_step(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::write_back && st.i == 2;
    });
    REQUIRE(w >= 0);
    CHECK(s.steps[static_cast<std::size_t>(w)].what == fpdt::payload::dq_dout);
    auto broken = s;
    broken.steps[static_cast<std::size_t>(w)].what = fpdt::payload::dq;
    fpdt::status const st = fpdt::check_schedule(broken);
    CHECK(st.code() == fpdt::errc::internal);
    CHECK(contains(st.message(), "was not written before it"));
  }
}

TEST_CASE("schedule: parameter errors name the numbers") {
  auto p = params(0, true, true, 2);
  fpdt::status st = fpdt::forward_schedule(p).error();
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(contains(st.message(), "u = 0"));
  p = params(4, true, true, 1);
  st = fpdt::backward_schedule(p).error();
  CHECK(contains(st.message(), "ring_slots = 1"));
  p.offload = false; // no ring without offload
  CHECK(fpdt::backward_schedule(p).ok());
}

TEST_CASE("schedule: exchange steps on P ranks fill and read slots, and the checker enforces their order") {
  auto first = [](fpdt::schedule const& s, auto pred) {
    std::ptrdiff_t const k = find_step(s, pred);
    REQUIRE(k >= 0);
    return static_cast<std::size_t>(k);
  };
  auto drop_dep = [](fpdt::schedule& s, std::size_t k, std::uint32_t dep) {
    // Rebuilds step k's dependency list without `dep` (appended at the end of `deps`).
    std::vector<std::uint32_t> keep;
    for (std::uint32_t d : s.deps_of(k))
      if (d != dep) keep.push_back(d);
    REQUIRE(keep.size() < s.steps[k].deps_count);
    s.steps[k].deps_begin = static_cast<std::uint32_t>(s.deps.size());
    s.steps[k].deps_count = static_cast<std::uint32_t>(keep.size());
    s.deps.insert(s.deps.end(), keep.begin(), keep.end());
  };
  SUBCASE("a compute that does not wait for its q/k/v exchange reads a slot not loaded before it") {
    auto s = fpdt::forward_schedule(params(3, true, true, 2, 4)).value();
    REQUIRE(fpdt::check_schedule(s).ok());
    std::size_t const ex = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::exchange && st.what == fpdt::payload::qkv && st.i == 1;
    });
    std::size_t const diag = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::compute && st.i == 1 && st.j == 1;
    });
    CHECK(s.steps[ex].slot_of(fpdt::ring::q) == s.steps[diag].slot_of(fpdt::ring::q));
    drop_dep(s, diag, static_cast<std::uint32_t>(ex));
    fpdt::status const st = fpdt::check_schedule(s);
    CHECK(st.code() == fpdt::errc::internal);
    CHECK(contains(st.message(), "which does not hold chunk 1 loaded before it"));
  }
  SUBCASE("a step reading the bundle before dout's exchange lands in it") {
    auto s = fpdt::backward_schedule(params(3, true, true, 2, 2)).value();
    REQUIRE(fpdt::check_schedule(s).ok());
    std::size_t const ex = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::exchange && st.what == fpdt::payload::dout && st.i == 2;
    });
    std::size_t const zero = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::zero && st.what == fpdt::payload::dq && st.i == 2;
    });
    // The zero of dq_2 waits for the fetch of q_2, out_2, lse_2 but not for dout_2's exchange.
    REQUIRE(s.steps[zero].deps_count == 1);
    REQUIRE(s.deps[s.steps[zero].deps_begin] == ex);
    REQUIRE(s.deps_of(ex).size() == 1);
    s.deps[s.steps[zero].deps_begin] = s.deps_of(ex)[0];
    fpdt::status const st = fpdt::check_schedule(s);
    CHECK(st.code() == fpdt::errc::internal);
    CHECK(contains(st.message(), "(exchange i=2 j=-1) lands in it"));
  }
  SUBCASE("an out slot reused while its exchange still reads it") {
    // Full attention: nothing else orders chunk 0's output exchange before chunk 1's finalize.
    auto s = fpdt::forward_schedule(params(3, false, true, 2, 2)).value();
    REQUIRE(fpdt::check_schedule(s).ok());
    std::size_t const ex = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::exchange && st.what == fpdt::payload::out_lse && st.i == 0;
    });
    std::size_t const rel = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::release && st.slot_of(fpdt::ring::out) >= 0 && st.i == 0;
    });
    drop_dep(s, rel, static_cast<std::uint32_t>(ex));
    fpdt::status const st = fpdt::check_schedule(s);
    CHECK(st.code() == fpdt::errc::internal);
    CHECK(contains(st.message(), "before its reader"));
    CHECK(contains(st.message(), "(exchange i=0 j=-1)"));
  }
  SUBCASE("a sink with no exchange of its chunk before it, an exchange on one rank, a wrong lane") {
    auto s = fpdt::backward_schedule(params(3, true, true, 2, 2)).value();
    std::size_t const ex = first(s, [](fpdt::schedule_step const& st) {
      return st.kind == fpdt::step_kind::exchange && st.what == fpdt::payload::dkv && st.j == 0;
    });
    {
      auto broken = s;
      broken.steps[ex].j = 1; // exchanges dk_1, dv_1 where the sink hands over dk_0, dv_0
      fpdt::status const st = fpdt::check_schedule(broken);
      CHECK(contains(st.message(), "hands the caller a chunk before its exchange on P = 2 ranks"));
    }
    {
      auto broken = s;
      broken.params.ranks = 1;
      CHECK(contains(fpdt::check_schedule(broken).message(), "exchanges on P = 1 rank"));
    }
    {
      auto broken = s;
      broken.steps[ex].on = fpdt::lane::compute;
      CHECK(contains(fpdt::check_schedule(broken).message(), "expected comm"));
    }
    {
      auto broken = s;
      broken.steps[ex].j = 7;
      CHECK(contains(fpdt::check_schedule(broken).message(), "names no chunk in [0, 3)"));
    }
  }
}

TEST_CASE("schedule: exchanges move each chunk's bytes and leave the pairs and copies of one rank alone") {
  for (bool causal : {true, false})
    for (bool offload : {true, false}) {
      CAPTURE(causal);
      CAPTURE(offload);
      auto const one = params(4, causal, offload, 2, 1), four = params(4, causal, offload, 2, 4);
      auto f1 = fpdt::forward_schedule(one).value(), f4 = fpdt::forward_schedule(four).value();
      auto b1 = fpdt::backward_schedule(one).value(), b4 = fpdt::backward_schedule(four).value();
      for (auto k : {fpdt::step_kind::compute, fpdt::step_kind::merge, fpdt::step_kind::offload,
                     fpdt::step_kind::produce, fpdt::step_kind::sink, fpdt::step_kind::write_back})
        CHECK(f1.count(k) == f4.count(k));
      CHECK(b1.count(fpdt::step_kind::compute) == b4.count(fpdt::step_kind::compute));
      CHECK(b1.count(fpdt::step_kind::write_back) == b4.count(fpdt::step_kind::write_back));
      std::uint64_t moved = 0;
      for (auto const* s : {&f4, &b4})
        for (auto const& st : s->steps)
          if (st.kind == fpdt::step_kind::exchange) moved += st.bytes;
      // Per chunk: q, k, v and out, lse in the forward; dout, dq, dk and dv in the backward.
      CHECK(moved == 4 * (1000 + 2000 + 1100 + 1000 + 2000 + 4000));
      // With offload the backward's first fetch of a query chunk moves q, out, lse only: dout
      // arrives by its exchange.
      for (auto const& st : b4.steps)
        if (st.kind == fpdt::step_kind::fetch && st.what != fpdt::payload::kv)
          CHECK(st.bytes == (st.what == fpdt::payload::q_out_lse ? 3200 - 1000 : 3200 + 2000));
    }
}

TEST_CASE("schedule: on P ranks chunk i + 1's q/k/v exchange is issued before chunk i's pairs, and dk/dv alternate") {
  for (bool offload : {true, false}) {
    CAPTURE(offload);
    auto const f = fpdt::forward_schedule(params(5, true, offload, 2, 4)).value();
    for (std::int32_t i = 0; i + 1 < 5; ++i) {
      std::ptrdiff_t const next = find_step(f, [&](fpdt::schedule_step const& st) {
        return st.kind == fpdt::step_kind::exchange && st.what == fpdt::payload::qkv && st.i == i + 1;
      });
      std::ptrdiff_t const diag = find_step(f, [&](fpdt::schedule_step const& st) {
        return st.kind == fpdt::step_kind::compute && st.i == i && st.j == i;
      });
      CHECK(next >= 0);
      CHECK(next < diag);
    }
    // dk_j, dv_j: the zero of pair j waits for the exchange of j - 2 (same accumulator pair).
    auto const b = fpdt::backward_schedule(params(5, true, offload, 2, 4)).value();
    for (std::int32_t j = 2; j < 5; ++j) {
      std::ptrdiff_t const z = find_step(b, [&](fpdt::schedule_step const& st) {
        return st.kind == fpdt::step_kind::zero && st.what == fpdt::payload::dkv && st.j == j;
      });
      REQUIRE(z >= 0);
      REQUIRE(b.deps_of(static_cast<std::size_t>(z)).size() == 1);
      auto const& waited = b.steps[b.deps_of(static_cast<std::size_t>(z))[0]];
      CHECK(waited.kind == fpdt::step_kind::exchange);
      CHECK(waited.j == j - 2);
    }
  }
}

TEST_CASE("schedule: windowed masks compute exactly the chunk pairs with a visible key, once, and every check holds") {
  // The visible pairs by brute force over tokens, from the window's definition (not the mask code).
  // Documents: lengths 0, c + 1, 1, 0, then runs of 3 to the end (document of token t below).
  auto doc_of = [](fpdt::index_t c, fpdt::index_t t) -> fpdt::index_t {
    if (t < c + 1) return 1;
    if (t < c + 2) return 2;
    return 4 + (t - c - 2) / 3;
  };
  auto visible = [&](bool causal, fpdt::index_t left, fpdt::index_t right, bool docs, fpdt::index_t c, int i, int j) {
    for (fpdt::index_t a = i * c; a < (i + 1) * c; ++a)
      for (fpdt::index_t b = j * c; b < (j + 1) * c; ++b)
        if ((left < 0 || b >= a - left) && (causal ? b <= a : (right < 0 || b <= a + right)) &&
            (!docs || doc_of(c, a) == doc_of(c, b)))
          return true;
    return false;
  };
  struct win { bool causal; fpdt::index_t left, right; bool docs = false; };
  for (fpdt::index_t c : {1, 4, 5})
    for (win w : {win{true, 0, -1}, win{true, 3, -1}, win{true, 4, -1}, win{true, 9, -1}, win{false, 2, 0},
                  win{false, 0, 7}, win{false, 4, 4}, win{false, -1, 3}, win{false, 11, -1},
                  win{true, -1, -1, true}, win{false, -1, -1, true}, win{true, 2, -1, true}, win{false, 3, 1, true}})
      for (fpdt::index_t ranks : {1, 3})
        for (bool offload : {true, false}) {
          fpdt::index_t const u = 7;
          CAPTURE(c);
          CAPTURE(w.causal);
          CAPTURE(w.left);
          CAPTURE(w.right);
          CAPTURE(w.docs);
          CAPTURE(ranks);
          CAPTURE(offload);
          auto p = params(u, w.causal, offload, 3, ranks);
          p.mask = {w.causal ? fpdt::mask_kind::causal : fpdt::mask_kind::full, w.left,
                    w.causal ? fpdt::unbounded_window : w.right};
          p.chunk_tokens = c;
          std::vector<fpdt::index_t> offsets{0, 0, c + 1, c + 2, c + 2};
          while (offsets.back() < u * c) offsets.push_back(std::min(u * c, offsets.back() + 3));
          if (w.docs) p.mask = fpdt::with_documents(p.mask, offsets);
          std::set<std::pair<int, int>> want;
          for (int i = 0; i < u; ++i)
            for (int j = 0; j < u; ++j)
              if (visible(w.causal, w.left, w.right, w.docs, c, i, j)) want.insert({i, j});
          for (auto const& made : {fpdt::forward_schedule(p), fpdt::backward_schedule(p)}) {
            REQUIRE(made.ok());
            fpdt::status const st = fpdt::check_schedule(*made);
            REQUIRE_MESSAGE(st.ok(), st.to_string());
            std::set<std::pair<int, int>> got;
            std::vector<int> first_pair(u, -1);
            for (auto const& step : made->steps)
              if (step.kind == fpdt::step_kind::compute) {
                CHECK(got.insert({step.i, step.j}).second);
                if (first_pair[static_cast<std::size_t>(step.i)] < 0) first_pair[static_cast<std::size_t>(step.i)] = step.j;
              }
            CHECK(got == want);
            if (made->which == fpdt::pass::forward) // the merge starts where the layer expects
              for (int i = 0; i < u; ++i)
                CHECK(first_pair[static_cast<std::size_t>(i)] == fpdt::forward_first_key_chunk(p, i));
            std::size_t from_caller = 0; // the caller's dout still once per chunk
            for (auto const& step : made->steps)
              from_caller += ranks == 1 ? step.kind == fpdt::step_kind::fetch && step.what == fpdt::payload::q_side
                                        : step.kind == fpdt::step_kind::exchange && step.what == fpdt::payload::dout;
            if (made->which == fpdt::pass::backward) CHECK(from_caller == static_cast<std::size_t>(u));
          }
          for (int i = 0; i < u; ++i) // ranges agree with the pairs, both ways
            for (int j = 0; j < u; ++j) {
              fpdt::chunk_span const ks = fpdt::key_chunks_of(p, i), qs = fpdt::query_chunks_of(p, j);
              bool const in = want.count({i, j}) != 0;
              CHECK(in == (j >= ks.first && j <= ks.last));
              CHECK(in == (i >= qs.first && i <= qs.last));
            }
        }
}

TEST_CASE("schedule: a window without chunk_tokens, or a bad window, is refused naming it") {
  auto p = params(4, true, true, 2);
  p.mask = fpdt::causal_window_mask(16);
  auto f = fpdt::forward_schedule(p);
  REQUIRE_FALSE(f.ok());
  CHECK(contains(f.error().to_string(), "chunk_tokens"));
  p.chunk_tokens = 8;
  CHECK(fpdt::forward_schedule(p).ok());
  p.mask.window_left = -3;
  auto g = fpdt::backward_schedule(p);
  REQUIRE_FALSE(g.ok());
  CHECK(contains(g.error().to_string(), "window (-3"));
}
