// Tests of include/fpdt/memory/device_arena.hpp: exact counters, budget, count-only mode.
#include <fpdt/backend/host/host_memory.hpp>
#include <fpdt/memory/device_arena.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }
constexpr std::size_t G = fpdt::device_arena::granularity;
} // namespace

TEST_CASE("device_arena: current and peak bytes are exact") {
  fpdt::device_arena arena(fpdt::host::host_memory_resource(), 64 * G);
  CHECK(fpdt::device_arena::rounded_size(1) == G);
  CHECK(fpdt::device_arena::rounded_size(G) == G);
  CHECK(fpdt::device_arena::rounded_size(G + 1) == 2 * G);
  {
    auto a = arena.allocate(100, "a");
    REQUIRE(a.ok());
    CHECK(a->size_bytes() == 100);
    CHECK(a->capacity_bytes() == G);
    REQUIRE(a->data() != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(a->data()) % G == 0);
    std::memset(a->data(), 0xab, 100); // really usable (ASan checks the bounds)
    CHECK(arena.current_bytes() == G);
    auto b = arena.allocate(3 * G, "b");
    REQUIRE(b.ok());
    CHECK(arena.current_bytes() == 4 * G);
    b->reset();
    CHECK(arena.current_bytes() == G);
    auto c = arena.allocate(2 * G + 5, "c");
    REQUIRE(c.ok());
    CHECK(arena.current_bytes() == 4 * G);
    CHECK(arena.peak_bytes() == 4 * G);
    auto d = arena.allocate(G, "d");
    REQUIRE(d.ok());
    CHECK(arena.peak_bytes() == 5 * G);
    auto st = arena.stats();
    CHECK(st.live_allocations == 3);
    CHECK(st.total_allocations == 4);
  }
  CHECK(arena.current_bytes() == 0);
  CHECK(arena.peak_bytes() == 5 * G);
  arena.reset_peak();
  CHECK(arena.peak_bytes() == 0);
  auto z = arena.allocate(0);
  REQUIRE(z.ok());
  CHECK_FALSE(z->owns());
  CHECK(arena.stats().total_allocations == 4);
}

TEST_CASE("device_arena: over-budget allocation is a clear out-of-memory error") {
  fpdt::device_arena arena(fpdt::host::host_memory_resource(), 8 * G);
  auto a = arena.allocate(6 * G, "q chunk");
  REQUIRE(a.ok());
  auto b = arena.allocate(3 * G, "k chunk");
  REQUIRE_FALSE(b.ok());
  CHECK(b.error().code() == fpdt::errc::out_of_memory);
  std::string const m = b.error().message();
  CHECK(contains(m, "allocating 768 bytes for k chunk"));
  CHECK(contains(m, "from 1536 to 2304"));
  CHECK(contains(m, "budget of 2048 bytes"));
  // The failed request changes nothing.
  CHECK(arena.current_bytes() == 6 * G);
  CHECK(arena.peak_bytes() == 6 * G);
  CHECK(arena.stats().live_allocations == 1);
  // A request larger than the whole budget (no overflow in the check).
  auto huge = arena.allocate(~std::size_t{0} - 2 * G);
  CHECK(huge.error().code() == fpdt::errc::out_of_memory);
  // Sizes so large that rounding would wrap are refused, never rounded to a tiny block.
  for (std::size_t bad : {~std::size_t{0}, ~std::size_t{0} - 100, fpdt::device_arena::max_request + 1}) {
    auto wrapped = arena.allocate(bad, "wrapped");
    REQUIRE_FALSE(wrapped.ok());
    CHECK(wrapped.error().code() == fpdt::errc::out_of_memory);
    CHECK(contains(wrapped.error().message(), std::to_string(bad)));
  }
  CHECK(arena.current_bytes() == 6 * G);
  // Exactly filling the budget is allowed.
  auto c = arena.allocate(2 * G);
  CHECK(c.ok());
  CHECK(arena.current_bytes() == 8 * G);
}

TEST_CASE("device_arena: count-only mode counts without allocating") {
  fpdt::device_arena arena(fpdt::host::host_memory_resource(), 4 * G, fpdt::arena_mode::count_only);
  auto a = arena.allocate(3 * G);
  REQUIRE(a.ok());
  CHECK(a->data() == nullptr);
  CHECK(a->owns());
  CHECK(arena.current_bytes() == 3 * G);
  CHECK(arena.allocate(2 * G).error().code() == fpdt::errc::out_of_memory);
  a->reset();
  CHECK(arena.current_bytes() == 0);
  CHECK(arena.peak_bytes() == 3 * G);
}

TEST_CASE("device_arena: upstream failure is reported and counts nothing") {
  fpdt::memory_resource failing{};
  failing.allocate = [](void*, std::size_t bytes, std::size_t) -> fpdt::result<void*> {
    return fpdt::make_error(fpdt::errc::out_of_memory, "test upstream refuses ", bytes, " bytes");
  };
  failing.deallocate = [](void*, void*, std::size_t, std::size_t) noexcept {};
  failing.name = "failing";
  fpdt::device_arena arena(failing, 100 * G);
  auto a = arena.allocate(G, "slot");
  REQUIRE_FALSE(a.ok());
  CHECK(a.error().code() == fpdt::errc::out_of_memory);
  CHECK(contains(a.error().message(), "slot"));
  CHECK(contains(a.error().message(), "test upstream refuses 256 bytes"));
  CHECK(arena.current_bytes() == 0);
  CHECK(arena.peak_bytes() == 0);
}

TEST_CASE("device_arena: concurrent allocations never exceed the budget") {
  fpdt::device_arena arena(fpdt::host::host_memory_resource(), 16 * G);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        auto a = arena.allocate(3 * G);
        if (!a.ok()) {
          failures.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        static_cast<char*>(a->data())[0] = 1;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(arena.current_bytes() == 0);
  CHECK(arena.peak_bytes() <= 15 * G); // at most 5 blocks of 3 fit in 16
  CHECK(arena.stats().total_allocations + static_cast<std::size_t>(failures.load()) == 2000);
}
