// Tests of include/fpdt/schedule/schedule.hpp: pair counts, the safety checks, and schedules the
// checker must reject.
#include <fpdt/schedule/schedule.hpp>

#include <doctest/doctest.h>

#include <set>
#include <string>
#include <utility>

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

fpdt::schedule_params params(fpdt::index_t u, bool causal, bool offload, fpdt::index_t ring) {
  fpdt::schedule_params p;
  p.chunks = u;
  p.causal = causal;
  p.offload = offload;
  p.ring_slots = ring;
  p.bytes = {1000, 2000, 1100};
  p.q_bytes = 1000;
  p.kv_bytes = 2000;
  return p;
}

// Index of the first step matching `pred`, or -1.
template <class P> std::ptrdiff_t find_step(fpdt::schedule const& s, P pred) {
  for (std::size_t k = 0; k < s.steps.size(); ++k)
    if (pred(s.steps[k])) return static_cast<std::ptrdiff_t>(k);
  return -1;
}
} // namespace

TEST_CASE("schedule: every chunk pair computed once and every check holds for u in 1..16") {
  for (fpdt::index_t u = 1; u <= 16; ++u)
    for (bool causal : {true, false})
      for (bool offload : {true, false})
        for (fpdt::index_t ring : {2, 3}) {
          CAPTURE(u);
          CAPTURE(causal);
          CAPTURE(offload);
          CAPTURE(ring);
          auto const p = params(u, causal, offload, ring);
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
                from_caller += step.kind == fpdt::step_kind::fetch && step.what == fpdt::payload::q_side;
              CHECK(from_caller == static_cast<std::size_t>(u));
            }
            if (offload) {
              CHECK(fpdt::peak_slots(s, fpdt::ring::kv) <= s.ring_size[1]);
              CHECK(fpdt::peak_slots(s, fpdt::ring::q) <= s.ring_size[0]);
              CHECK(s.ring_size[1] <= ring);
              CHECK(s.ring_size[0] <= ring);
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
