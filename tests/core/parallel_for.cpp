// Tests of include/fpdt/core/parallel_for.hpp.
#include <fpdt/core/parallel_for.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

TEST_CASE("parallel_for: every item runs exactly once on at most the requested workers") {
  for (unsigned threads : {1u, 2u, 3u, 8u}) {
    std::vector<std::atomic<int>> hits(1000);
    std::vector<std::atomic<int>> per_worker(threads);
    auto r = fpdt::parallel_for(hits.size(), threads, [&](std::size_t i, unsigned w) {
      hits[i].fetch_add(1);
      REQUIRE(w < threads);
      per_worker[w].fetch_add(1);
    });
    REQUIRE(r.ok());
    CHECK(*r <= threads);
    CHECK(*r == fpdt::parallel_workers(hits.size(), threads));
    for (auto& h : hits) CHECK(h.load() == 1);
  }
  CHECK(fpdt::parallel_workers(3, 8) == 3);
  CHECK(fpdt::parallel_workers(0, 8) == 1);
  auto none = fpdt::parallel_for(0, 4, [](std::size_t, unsigned) { FAIL("no item expected"); });
  REQUIRE(none.ok());
}

TEST_CASE("parallel_for: an exception becomes a backend_error and stops the rest") {
  // One worker: exactly the items up to the failing one run.
  std::atomic<int> ran{0};
  auto r1 = fpdt::parallel_for(10000, 1, [&](std::size_t i, unsigned) {
    ran.fetch_add(1);
    if (i == 10) throw std::runtime_error("tile 10 failed");
  });
  REQUIRE_FALSE(r1.ok());
  CHECK(r1.error().code() == fpdt::errc::backend_error);
  CHECK(r1.error().message().find("tile 10 failed") != std::string::npos);
  CHECK(ran.load() == 11);
  // Two workers: the other one stops too. Each other item takes 100 us, so finishing all of them
  // would take the other worker about a second, against the microseconds (milliseconds under
  // ASan) the exception takes to unwind; with instant items it could, and did under ASan, finish
  // them all first.
  ran = 0;
  auto r2 = fpdt::parallel_for(10000, 2, [&](std::size_t i, unsigned) {
    ran.fetch_add(1);
    if (i == 10) throw std::runtime_error("tile 10 failed");
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  });
  REQUIRE_FALSE(r2.ok());
  CHECK(r2.error().code() == fpdt::errc::backend_error);
  CHECK(ran.load() < 10000);
}
