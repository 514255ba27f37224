// Tests of include/fpdt/pipeline/executor.hpp and trace.hpp: dependencies across lanes are
// honoured with events only, errors are reported with the step named, and the trace is written
// as Chrome trace JSON.
#include <fpdt/backend/host/host_backend.hpp>
#include <fpdt/pipeline/executor.hpp>
#include <fpdt/pipeline/trace.hpp>
#include <fpdt/schedule/schedule.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

// runs_host_tasks_in_order is opt-in: the host backend declares it; absent or false, it is false.
struct declares_false {
  static constexpr bool runs_host_tasks = false;
};
struct declares_nothing {};
static_assert(fpdt::runs_host_tasks_in_order<fpdt::host_backend>);
static_assert(!fpdt::runs_host_tasks_in_order<declares_false>);
static_assert(!fpdt::runs_host_tasks_in_order<declares_nothing>);
} // namespace

TEST_CASE("executor: a fetch waits for the release of its slot and compute for its fetch") {
  // Real schedule, fake work: each step records when it ran; copies sleep to race compute.
  fpdt::schedule_params p;
  p.chunks = 6;
  p.mask = fpdt::causal_mask;
  p.offload = true;
  p.ring_slots = 2;
  auto const s = fpdt::forward_schedule(p).value();
  fpdt::host_backend be;
  auto ex = fpdt::executor<fpdt::host_backend>::create(be);
  REQUIRE(ex.ok());
  std::vector<std::atomic<int>> order(s.steps.size());
  std::atomic<int> clock{0};
  for (auto& o : order)
    o = -1;
  auto work = [&](fpdt::schedule_step const& st, std::size_t k, fpdt::host::stream& str) {
    bool const copy = st.on != fpdt::lane::compute;
    return be.launch(str, [&, k, copy] {
      if (copy) std::this_thread::sleep_for(200us);
      order[k] = clock++;
    });
  };
  fpdt::pipeline_trace trace;
  REQUIRE(ex->run(s, work, &trace).ok());
  // Every step ran after every (non-marker) step it depends on, transitively through markers.
  std::vector<int> done(s.steps.size(), -1);
  for (std::size_t k = 0; k < s.steps.size(); ++k) {
    if (s.steps[k].kind == fpdt::step_kind::release) {
      for (auto d : s.deps_of(k))
        done[k] = std::max(done[k], done[d]);
      continue;
    }
    done[k] = order[k];
    CHECK(order[k] >= 0);
    for (auto d : s.deps_of(k))
      CHECK(done[d] < order[k]);
  }
  CHECK(trace.events.size() == s.steps.size() - s.count(fpdt::step_kind::release));
  for (auto const& e : trace.events) {
    CHECK(e.begin_us >= 0);
    CHECK(e.end_us >= e.begin_us);
  }
  CHECK(trace.span_us() > 0);
  CHECK(trace.busy_us(fpdt::lane::h2d) > 0);
  // A second run on the same executor reuses its streams and events.
  REQUIRE(ex->run(s, work, nullptr).ok());
}

TEST_CASE("executor: errors name the step and a failing task stops the pass without a hang") {
  fpdt::schedule_params p;
  p.chunks = 3;
  auto const s = fpdt::forward_schedule(p).value();
  fpdt::host_backend be;
  auto ex = fpdt::executor<fpdt::host_backend>::create(be).value();
  // An error returned while enqueuing.
  fpdt::status st = ex.run(s, [](fpdt::schedule_step const& step, std::size_t, fpdt::host::stream&) {
    return step.kind == fpdt::step_kind::merge && step.i == 1
               ? fpdt::make_error(fpdt::errc::invalid_argument, "bad merge")
               : fpdt::status{};
  });
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(contains(st.message(), "(merge i=1 j=1)"));
  CHECK(contains(st.message(), "bad merge"));
  // An error raised by a task on a lane: every later step is skipped and run() returns it.
  std::atomic<int> ran{0};
  st = ex.run(s, [&](fpdt::schedule_step const& step, std::size_t, fpdt::host::stream& str) {
    return be.launch(str, [&ran, step]() -> fpdt::status {
      ++ran;
      if (step.kind == fpdt::step_kind::produce && step.i == 0)
        return fpdt::make_error(fpdt::errc::backend_error, "source failed");
      return {};
    });
  });
  CHECK(st.code() == fpdt::errc::backend_error);
  CHECK(contains(st.message(), "source failed"));
}

TEST_CASE("trace: Chrome trace JSON names the lanes and every timed step") {
  fpdt::pipeline_trace t;
  t.events.push_back({fpdt::step_kind::fetch, fpdt::lane::h2d, -1, 2, 4096, 1.0, 5.0});
  t.events.push_back({fpdt::step_kind::compute, fpdt::lane::compute, 3, 2, 0, 2.0, 9.0});
  t.events.push_back({fpdt::step_kind::merge, fpdt::lane::compute, 3, 2, 0, -1, -1}); // untimed
  std::ostringstream os;
  t.write_chrome_json(os);
  std::string const j = os.str();
  CHECK(contains(j, "\"traceEvents\""));
  CHECK(contains(j, "\"name\":\"h2d\""));
  CHECK(contains(j, "\"name\":\"fetch j2\""));
  CHECK(contains(j, "\"name\":\"compute i3 j2\""));
  CHECK(contains(j, "\"bytes\":4096"));
  CHECK_FALSE(contains(j, "merge"));
  CHECK(t.overlap_us() == doctest::Approx(3.0)); // [2, 5]
  CHECK(t.span_us() == doctest::Approx(8.0));
  CHECK(t.busy_us(fpdt::lane::compute) == doctest::Approx(7.0));
  // Long passes keep microsecond precision; the process name is escaped.
  fpdt::pipeline_trace longer;
  longer.name = "layer \"3\"";
  longer.events.push_back({fpdt::step_kind::compute, fpdt::lane::compute, 0, 0, 0, 123456789.25, 123456800.5});
  std::ostringstream os2;
  longer.write_chrome_json(os2);
  CHECK(contains(os2.str(), "\"ts\":123456789.250"));
  CHECK(contains(os2.str(), "\"dur\":11.250"));
  CHECK(contains(os2.str(), "layer \\\"3\\\""));
  fpdt::status const bad = t.write_chrome_json(std::string("/nonexistent-dir/x/trace.json"));
  CHECK(bad.code() == fpdt::errc::invalid_argument);
  CHECK(contains(bad.message(), "/nonexistent-dir/x/trace.json"));
}
