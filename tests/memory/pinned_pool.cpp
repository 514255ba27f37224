// Tests of include/fpdt/memory/pinned_pool.hpp: reuse, no growth across calls, limit, trim.
#include <fpdt/backend/host/host_memory.hpp>
#include <fpdt/memory/pinned_pool.hpp>

#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

namespace {
constexpr std::size_t P = fpdt::pinned_pool::granularity;
constexpr std::size_t MiB = std::size_t{1} << 20;
} // namespace

TEST_CASE("pinned_pool: released blocks are reused and repeated cycles do not grow the pool") {
  // CASES.md A19 in miniature: many offload/fetch cycles, the pinned bytes stay flat.
  fpdt::pinned_pool pool(fpdt::host::host_memory_resource("pinned"));
  auto const start = pool.stats();
  for (int cycle = 0; cycle < 1000; ++cycle) {
    std::vector<fpdt::pinned_block> chunks;
    for (int c = 0; c < 4; ++c) {
      auto b = pool.acquire(MiB + 3);
      REQUIRE(b.ok());
      static_cast<unsigned char*>(b->data())[MiB + 2] = static_cast<unsigned char>(cycle);
      chunks.push_back(std::move(*b));
    }
  }
  auto const st = pool.stats();
  CHECK(st.upstream_allocations == 4);
  CHECK(st.in_use_bytes == start.in_use_bytes);
  CHECK(st.reserved_bytes == 4 * (MiB + P));
  CHECK(st.peak_reserved_bytes == 4 * (MiB + P));
  CHECK(st.cached_blocks == 4);
  pool.trim();
  CHECK(pool.stats().reserved_bytes == 0);
  CHECK(pool.stats().cached_blocks == 0);
}

TEST_CASE("pinned_pool: best fit picks the smallest cached block that is large enough") {
  fpdt::pinned_pool pool(fpdt::host::host_memory_resource());
  void* small_p = nullptr;
  void* large_p = nullptr;
  {
    auto small = pool.acquire(2 * P);
    auto large = pool.acquire(8 * P);
    REQUIRE(small.ok());
    REQUIRE(large.ok());
    small_p = small->data();
    large_p = large->data();
  }
  auto a = pool.acquire(P + 1);
  REQUIRE(a.ok());
  CHECK(a->data() == small_p);
  CHECK(a->capacity_bytes() == 2 * P);
  auto b = pool.acquire(3 * P);
  REQUIRE(b.ok());
  CHECK(b->data() == large_p);
  auto c = pool.acquire(P);
  REQUIRE(c.ok());
  CHECK(pool.stats().upstream_allocations == 3);
}

TEST_CASE("pinned_pool: the limit trims the cache first, then reports out of memory") {
  fpdt::pinned_pool pool(fpdt::host::host_memory_resource("pinned"), 4 * P);
  { auto a = pool.acquire(3 * P); REQUIRE(a.ok()); } // cached: 3 pages held
  auto b = pool.acquire(4 * P); // needs the cache freed to fit
  REQUIRE(b.ok());
  CHECK(pool.stats().reserved_bytes == 4 * P);
  auto c = pool.acquire(1);
  REQUIRE_FALSE(c.ok());
  CHECK(c.error().code() == fpdt::errc::out_of_memory);
  CHECK(c.error().message().find("limit of 16384 bytes") != std::string::npos);
  CHECK(pool.stats().in_use_bytes == 4 * P);
  // A size whose rounding would wrap is refused, even with a block in the cache.
  b->reset();
  auto wrapped = pool.acquire(~std::size_t{0});
  REQUIRE_FALSE(wrapped.ok());
  CHECK(wrapped.error().code() == fpdt::errc::out_of_memory);
  CHECK(pool.stats().cached_blocks == 1);
  auto z = pool.acquire(0);
  REQUIRE(z.ok());
  CHECK_FALSE(z->owns());
}
