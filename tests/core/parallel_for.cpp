// Tests of include/fpdt/core/parallel_for.hpp.
#include <fpdt/core/parallel_for.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <set>
#include <stdexcept>
#include <string>
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
  std::atomic<int> ran{0};
  auto r = fpdt::parallel_for(10000, 2, [&](std::size_t i, unsigned) {
    ran.fetch_add(1);
    if (i == 10) throw std::runtime_error("tile 10 failed");
  });
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == fpdt::errc::backend_error);
  CHECK(r.error().message().find("tile 10 failed") != std::string::npos);
  CHECK(ran.load() < 10000);
}
