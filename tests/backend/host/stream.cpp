// Tests of include/fpdt/backend/host/{stream,event}.hpp: FIFO order, which record a wait refers
// to, error propagation. Run under the tsan preset too. Event ordering across streams is tested
// through the backend (tests/backend/backend_cases.hpp, run by host_backend.cpp).
#include <fpdt/backend/host/event.hpp>
#include <fpdt/backend/host/stream.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using fpdt::host::event;
using fpdt::host::stream;

TEST_CASE("host stream: tasks run in FIFO order") {
  stream s("fifo");
  std::vector<int> order; // touched only by the worker until synchronize returns
  for (int i = 0; i < 1000; ++i) s.enqueue([&order, i] { order.push_back(i); });
  REQUIRE(s.synchronize().ok());
  REQUIRE(order.size() == 1000);
  for (int i = 0; i < 1000; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
  CHECK(s.query());
  CHECK(s.name() == "fifo");
}

TEST_CASE("host stream: a wait refers to the latest record issued before it") {
  stream a("a"), b("b");
  event e;
  std::atomic<int> stage{0};
  // Record 1 completes quickly; record 2 only after a delay. A wait issued between them must not
  // wait for record 2, and a wait issued after record 2 must.
  a.record(e);
  REQUIRE(e.synchronize().ok());
  std::atomic<bool> early_done{false};
  b.wait(e); // refers to record 1 (complete)
  b.enqueue([&] { early_done = true; });
  REQUIRE(b.synchronize().ok());
  CHECK(early_done.load());
  a.enqueue([&] {
    std::this_thread::sleep_for(20ms);
    stage = 1;
  });
  a.record(e); // record 2
  int observed = -1;
  b.wait(e);
  b.enqueue([&] { observed = stage.load(); });
  REQUIRE(b.synchronize().ok());
  CHECK(observed == 1);
  REQUIRE(a.synchronize().ok());
}

TEST_CASE("host stream: waiting on a never-recorded event does not block") {
  stream s("s");
  event never;
  CHECK(never.query());
  CHECK(never.synchronize().ok());
  s.wait(never);
  bool ran = false;
  s.enqueue([&] { ran = true; });
  REQUIRE(s.synchronize().ok());
  CHECK(ran);
}

TEST_CASE("host stream: errors skip later work, travel through events, and are cleared") {
  stream a("compute"), b("copy");
  event e;
  bool skipped_ran = false;
  bool b_work_ran = false;
  a.enqueue([] { return fpdt::make_error(fpdt::errc::invalid_argument, "bad chunk 3"); });
  a.enqueue([&] { skipped_ran = true; });
  a.record(e);
  b.wait(e);
  b.enqueue([&] { b_work_ran = true; });
  fpdt::status sa = a.synchronize();
  CHECK(sa.code() == fpdt::errc::invalid_argument);
  CHECK(sa.message() == "task on stream 'compute': bad chunk 3");
  CHECK_FALSE(skipped_ran);
  fpdt::status sb = b.synchronize();
  CHECK(sb.code() == fpdt::errc::invalid_argument); // carried by the event
  CHECK_FALSE(b_work_ran);
  CHECK(e.synchronize().code() == fpdt::errc::invalid_argument);
  // Cleared: the streams work again.
  bool after = false;
  a.enqueue([&] { after = true; });
  CHECK(a.synchronize().ok());
  CHECK(after);
}

TEST_CASE("host event: a wait takes the error of the record it waits for, not of another one") {
  // Stream c's wait refers to record 1 of e (on stream a); while c is held back, record 2 of e
  // completes on stream b. c must take record 1's error, whatever record 2 carried (as with
  // cudaStreamWaitEvent, which waits for the record made before it).
  for (bool first_fails : {false, true}) {
    CAPTURE(first_fails);
    stream a("a"), b("b"), c("c");
    event e;
    std::atomic<bool> open{false};
    bool c_ran = false;
    if (first_fails) a.enqueue([] { return fpdt::make_error(fpdt::errc::invalid_argument, "record 1 fails"); });
    a.record(e); // record 1
    c.enqueue([&] {
      while (!open.load()) std::this_thread::sleep_for(1ms);
    });
    c.wait(e); // refers to record 1
    c.enqueue([&] { c_ran = true; });
    CHECK((a.synchronize().code() == fpdt::errc::invalid_argument) == first_fails);
    if (!first_fails) b.enqueue([] { return fpdt::make_error(fpdt::errc::out_of_memory, "record 2 fails"); });
    b.record(e); // record 2, completes while c still waits at its gate
    CHECK((b.synchronize().code() == fpdt::errc::out_of_memory) == !first_fails);
    open = true;
    fpdt::status const sc = c.synchronize();
    if (first_fails) {
      CHECK(sc.code() == fpdt::errc::invalid_argument);
      CHECK_FALSE(c_ran);
    } else {
      CHECK(sc.ok());
      CHECK(c_ran);
    }
    CHECK(e.synchronize().code() == (first_fails ? fpdt::errc::ok : fpdt::errc::out_of_memory)); // the latest record
  }
}

TEST_CASE("host stream: a throwing task becomes a backend_error naming the stream") {
  stream s("h2d");
  s.enqueue([] { throw std::runtime_error("copy engine on fire"); });
  fpdt::status st = s.synchronize();
  CHECK(st.code() == fpdt::errc::backend_error);
  CHECK(st.message().find("'h2d'") != std::string::npos);
  CHECK(st.message().find("copy engine on fire") != std::string::npos);
}

TEST_CASE("host stream: destruction runs the queued work first") {
  std::atomic<int> count{0};
  {
    stream s("s");
    for (int i = 0; i < 100; ++i)
      s.enqueue([&] {
        std::this_thread::sleep_for(10us);
        count.fetch_add(1);
      });
  }
  CHECK(count.load() == 100);
}

TEST_CASE("host stream: synchronize from several threads while others enqueue") {
  stream s("shared");
  std::atomic<int> ran{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        s.enqueue([&] { ran.fetch_add(1); });
        if (i % 50 == 0) CHECK(s.synchronize().ok());
      }
    });
  for (auto& th : threads) th.join();
  CHECK(s.synchronize().ok());
  CHECK(ran.load() == 800);
}

TEST_CASE("host event: elapsed time between two records") {
  stream s("timed");
  event start, stop;
  CHECK_FALSE(elapsed_seconds(start, stop).ok());
  s.record(start);
  s.enqueue([] { std::this_thread::sleep_for(5ms); });
  s.record(stop);
  REQUIRE(s.synchronize().ok());
  auto dt = elapsed_seconds(start, stop);
  REQUIRE(dt.ok());
  CHECK(*dt >= 0.004);
}

TEST_CASE("host stream: synchronize from one of its own tasks is an error, not a hang") {
  stream s("self");
  fpdt::status inner;
  s.enqueue([&] { inner = s.synchronize(); });
  CHECK(s.synchronize().ok());
  CHECK(inner.code() == fpdt::errc::invalid_argument);
  CHECK(inner.message().find("'self'") != std::string::npos);
}
