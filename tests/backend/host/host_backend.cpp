// Tests of include/fpdt/backend/host/host_backend.hpp: the backend concept, copies, and the
// offload/fetch pattern of FPDT with copies racing compute (clean under the tsan preset).
#include <fpdt/backend/host/host_backend.hpp>

#include <doctest/doctest.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

static_assert(fpdt::backend<fpdt::host_backend>);

namespace {
struct look_alike { // has every member but did not opt in with the tag
  using stream_type = fpdt::host::stream;
  using event_type = fpdt::host::event;
};
static_assert(!fpdt::backend<look_alike>);

bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

std::uint64_t checksum(float const* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t b;
    std::memcpy(&b, p + i, sizeof b);
    h = (h ^ b) * 1099511628211ull;
  }
  return h;
}
} // namespace

TEST_CASE("host_backend: copy_async errors name the problem") {
  fpdt::host_backend be;
  auto s = be.create_stream(fpdt::lane::h2d);
  REQUIRE(s.ok());
  CHECK(s->name() == "h2d");
  std::array<char, 64> buf{};
  fpdt::status null_dst = be.copy_async(nullptr, buf.data(), 8, *s);
  CHECK(null_dst.code() == fpdt::errc::invalid_argument);
  CHECK(contains(null_dst.message(), "destination pointer is null"));
  fpdt::status overlap = be.copy_async(buf.data() + 4, buf.data(), 8, *s);
  CHECK(overlap.code() == fpdt::errc::invalid_argument);
  CHECK(contains(overlap.message(), "overlap"));
  CHECK(be.copy_async(nullptr, nullptr, 0, *s).ok()); // nothing to copy
  CHECK(be.synchronize(*s).ok());
}

TEST_CASE("host_backend: device arena budget and count-only size queries") {
  fpdt::host_backend small({.device_budget_bytes = 4096});
  auto a = small.device_memory().allocate(4000, "staging slot 0");
  REQUIRE(a.ok());
  auto b = small.device_memory().allocate(1, "staging slot 1");
  REQUIRE_FALSE(b.ok());
  CHECK(contains(b.error().message(), "staging slot 1"));
  fpdt::host_backend counting({.device_budget_bytes = std::size_t{1} << 40,
                               .device_mode = fpdt::arena_mode::count_only});
  auto big = counting.device_memory().allocate(std::size_t{1} << 39);
  REQUIRE(big.ok());
  CHECK(big->data() == nullptr);
  CHECK(counting.device_memory().peak_bytes() == std::size_t{1} << 39);
}

// The FPDT offload pattern (DESIGN.md 2.2): chunks are produced on the compute lane into a ring of
// staging slots, offloaded to pinned memory on the d2h lane, and later fetched back on the h2d
// lane. Slots are reused only after the copy that reads them has finished, and the copy lane has
// an artificial delay (CASES.md A18), so any missing event would show as a wrong checksum here and
// as a data race under ThreadSanitizer.
TEST_CASE("host_backend: offload and fetch racing compute keep every chunk intact") {
  constexpr std::size_t chunks = 8, elems = 4096, slots = 2, iterations = 25;
  fpdt::host_backend be({.device_budget_bytes = std::size_t{1} << 20});
  auto compute = be.create_stream(fpdt::lane::compute, fpdt::stream_priority::high);
  auto d2h = be.create_stream(fpdt::lane::d2h);
  auto h2d = be.create_stream(fpdt::lane::h2d);
  REQUIRE(compute.ok());
  REQUIRE(d2h.ok());
  REQUIRE(h2d.ok());
  std::vector<fpdt::arena_allocation> ring;
  for (std::size_t s = 0; s < slots; ++s) {
    auto a = be.device_memory().allocate(elems * sizeof(float), "staging slot");
    REQUIRE(a.ok());
    ring.push_back(std::move(*a));
  }
  std::vector<fpdt::pinned_block> host;
  for (std::size_t c = 0; c < chunks; ++c) {
    auto b = be.pinned_memory().acquire(elems * sizeof(float));
    REQUIRE(b.ok());
    host.push_back(std::move(*b));
  }
  std::vector<fpdt::host::event> produced(slots), offloaded(slots), fetched(chunks);
  std::vector<std::uint64_t> expected(chunks);
  for (std::size_t it = 0; it < iterations; ++it) {
    // Forward: produce chunk c into slot c % 2, offload it.
    for (std::size_t c = 0; c < chunks; ++c) {
      std::size_t const s = c % slots;
      float* slot = ring[s].as<float>();
      REQUIRE(be.wait(*compute, offloaded[s]).ok()); // slot free once its last offload is done
      REQUIRE(be.launch(*compute, [slot, c, it] {
                  for (std::size_t i = 0; i < elems; ++i)
                    slot[i] = static_cast<float>(c * 1000003 + it * 7919 + i);
                }).ok());
      REQUIRE(be.record(produced[s], *compute).ok());
      REQUIRE(be.wait(*d2h, produced[s]).ok());
      REQUIRE(be.launch(*d2h, [] { std::this_thread::sleep_for(100us); }).ok()); // slow copy lane
      REQUIRE(be.copy_async(host[c].data(), slot, elems * sizeof(float), *d2h).ok());
      REQUIRE(be.record(offloaded[s], *d2h).ok());
      std::vector<float> ref(elems);
      for (std::size_t i = 0; i < elems; ++i) ref[i] = static_cast<float>(c * 1000003 + it * 7919 + i);
      expected[c] = checksum(ref.data(), elems);
    }
    // Backward: fetch each chunk back into a slot and checksum it on the compute lane.
    std::vector<std::uint64_t> got(chunks, 0);
    for (std::size_t c = chunks; c-- > 0;) {
      std::size_t const s = c % slots;
      float* slot = ring[s].as<float>();
      REQUIRE(be.wait(*h2d, offloaded[s]).ok());  // its last offload read the slot
      REQUIRE(be.wait(*h2d, produced[s]).ok());   // and compute's last use of it is done
      REQUIRE(be.copy_async(slot, host[c].data(), elems * sizeof(float), *h2d).ok());
      REQUIRE(be.record(fetched[c], *h2d).ok());
      REQUIRE(be.wait(*compute, fetched[c]).ok());
      REQUIRE(be.launch(*compute, [slot, &got, c] { got[c] = checksum(slot, elems); }).ok());
      REQUIRE(be.record(produced[s], *compute).ok());
      REQUIRE(be.wait(*d2h, produced[s]).ok());
      REQUIRE(be.record(offloaded[s], *d2h).ok()); // keeps the ring's bookkeeping uniform
    }
    REQUIRE(be.synchronize(*compute).ok());
    REQUIRE(be.synchronize(*d2h).ok());
    REQUIRE(be.synchronize(*h2d).ok());
    for (std::size_t c = 0; c < chunks; ++c) CHECK(got[c] == expected[c]);
  }
  CHECK(be.device_memory().peak_bytes() == slots * elems * sizeof(float));
  CHECK(be.pinned_memory().stats().upstream_allocations == chunks);
}
