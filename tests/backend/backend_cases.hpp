// Test bodies shared by every backend (tests/backend/host/host_backend.cpp, tests/backend/cuda/
// backend.cu): one body, instantiated once per backend.
//
// A fixture `Fx` supplies:
//   using backend = ...;                                    the backend type
//   static std::unique_ptr<backend> make(std::size_t device_budget_bytes, fpdt::arena_mode,
//                                        std::size_t pinned_limit_bytes);
//   static fpdt::status fill(backend&, backend::stream_type&, float* p, std::size_t n,
//                            std::uint32_t seed);            p[i] = pattern(seed, i), in order
//   static fpdt::status delay(backend&, backend::stream_type&, std::chrono::microseconds);
// Device memory is only touched through the backend (fill, copies); pinned memory is read on the
// host after a synchronize.
#pragma once

#include <fpdt/backend/backend.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fpdt_test {

using namespace std::chrono_literals;

// The value `fill` writes at index i: an integer below 2^24, so exact in float on host and device.
FPDT_HOST_DEVICE inline float pattern(std::uint32_t seed, std::size_t i) {
  return static_cast<float>((seed * 2654435761u + static_cast<std::uint32_t>(i)) & 0xffffffu);
}

// Index of the first p[i] != pattern(seed, i), or n when all match.
inline std::size_t first_mismatch(float const* p, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i] != pattern(seed, i)) return i;
  return n;
}

inline bool contains(std::string const& s, std::string const& part) {
  return s.find(part) != std::string::npos;
}

constexpr std::size_t unlimited = std::numeric_limits<std::size_t>::max();

template <class Fx>
std::unique_ptr<typename Fx::backend> make_backend(std::size_t budget = std::size_t{1} << 28) {
  return Fx::make(budget, fpdt::arena_mode::allocate, unlimited);
}

template <class B>
typename B::stream_type make_stream(B& be, fpdt::lane l) {
  auto s = be.create_stream(l);
  REQUIRE_MESSAGE(s.ok(), s.error().to_string());
  return std::move(*s);
}

template <class B>
std::vector<typename B::event_type> make_events(B& be, std::size_t n) {
  std::vector<typename B::event_type> events;
  for (std::size_t i = 0; i < n; ++i) {
    auto e = be.create_event();
    REQUIRE_MESSAGE(e.ok(), e.error().to_string());
    events.push_back(std::move(*e));
  }
  return events;
}

template <class B>
fpdt::arena_allocation device_block(B& be, std::size_t bytes) {
  auto a = be.device_memory().allocate(bytes, "test buffer");
  REQUIRE_MESSAGE(a.ok(), a.error().to_string());
  return std::move(*a);
}

template <class B>
fpdt::pinned_block pinned_block(B& be, std::size_t bytes) {
  auto b = be.pinned_memory().acquire(bytes);
  REQUIRE_MESSAGE(b.ok(), b.error().to_string());
  return std::move(*b);
}

#define FPDT_TEST_OK(expr)                                                                         \
  do {                                                                                             \
    fpdt::status const fpdt_test_st_ = (expr);                                                     \
    REQUIRE_MESSAGE(fpdt_test_st_.ok(), fpdt_test_st_.to_string());                                \
  } while (0)

// copy_async refuses null pointers and overlapping ranges with messages naming them; a zero-byte
// copy is a no-op even with null pointers. Streams are named after their lane.
template <class Fx>
void copy_argument_errors() {
  auto be = make_backend<Fx>();
  auto s = make_stream(*be, fpdt::lane::h2d);
  CHECK(s.name() == "h2d");
  auto dev = device_block(*be, 64);
  auto* d = dev.template as<char>();
  fpdt::status const null_dst = be->copy_async(nullptr, d, 8, s);
  CHECK(null_dst.code() == fpdt::errc::invalid_argument);
  CHECK(contains(null_dst.message(), "copy_async of 8 bytes: destination pointer is null"));
  fpdt::status const null_src = be->copy_async(d, nullptr, 8, s);
  CHECK(contains(null_src.message(), "source pointer is null"));
  fpdt::status const overlap = be->copy_async(d + 4, d, 8, s);
  CHECK(overlap.code() == fpdt::errc::invalid_argument);
  CHECK(contains(overlap.message(), "overlap"));
  CHECK(be->copy_async(d + 8, d, 8, s).ok()); // adjacent, not overlapping
  CHECK(be->copy_async(nullptr, nullptr, 0, s).ok()); // nothing to copy
  CHECK(be->synchronize(s).ok());
}

// Bytes survive pinned -> device -> device -> pinned across two streams ordered by an event, for
// sizes that are not multiples of any granularity. A wait on a never-recorded event does not block.
template <class Fx>
void copy_round_trip() {
  auto be = make_backend<Fx>();
  auto in = make_stream(*be, fpdt::lane::h2d);
  auto out = make_stream(*be, fpdt::lane::d2h);
  auto ev = make_events(*be, 2);
  FPDT_TEST_OK(be->wait(in, ev[1])); // never recorded: complete
  for (std::size_t const bytes : {std::size_t{1}, std::size_t{255}, std::size_t{4103},
                                  (std::size_t{1} << 20) + 3}) {
    auto src = pinned_block(*be, bytes);
    auto dst = pinned_block(*be, bytes);
    auto a = device_block(*be, bytes);
    auto b = device_block(*be, bytes);
    auto* s = src.template as<unsigned char>();
    for (std::size_t i = 0; i < bytes; ++i) s[i] = static_cast<unsigned char>(i * 131 + 7);
    std::memset(dst.data(), 0, bytes);
    FPDT_TEST_OK(be->copy_async(a.data(), src.data(), bytes, in));
    FPDT_TEST_OK(be->copy_async(b.data(), a.data(), bytes, in));
    FPDT_TEST_OK(be->record(ev[0], in));
    FPDT_TEST_OK(be->wait(out, ev[0]));
    FPDT_TEST_OK(be->copy_async(dst.data(), b.data(), bytes, out));
    FPDT_TEST_OK(be->synchronize(out));
    CHECK_MESSAGE(std::memcmp(dst.data(), src.data(), bytes) == 0, bytes, " bytes");
    FPDT_TEST_OK(be->synchronize(in));
  }
}

// Work on one stream waits for an event recorded on another: the producer is slowed down, so a
// consumer that did not wait would copy out the previous round's values.
template <class Fx>
void event_orders_streams() {
  constexpr std::size_t n = std::size_t{1} << 16;
  auto be = make_backend<Fx>();
  auto producer = make_stream(*be, fpdt::lane::compute);
  auto consumer = make_stream(*be, fpdt::lane::d2h);
  auto ready = make_events(*be, 1);
  auto dev = device_block(*be, n * sizeof(float));
  auto host = pinned_block(*be, n * sizeof(float));
  for (std::uint32_t round = 1; round <= 20; ++round) {
    FPDT_TEST_OK(Fx::delay(*be, producer, std::chrono::microseconds(round % 5 * 200)));
    FPDT_TEST_OK(Fx::fill(*be, producer, dev.template as<float>(), n, round));
    FPDT_TEST_OK(be->record(ready[0], producer));
    FPDT_TEST_OK(be->wait(consumer, ready[0]));
    FPDT_TEST_OK(be->copy_async(host.data(), dev.data(), n * sizeof(float), consumer));
    FPDT_TEST_OK(be->synchronize(consumer));
    CHECK(first_mismatch(host.template as<float>(), n, round) == n);
    FPDT_TEST_OK(be->synchronize(producer));
  }
}

// The device arena enforces its budget with a message naming the buffer, counts the peak exactly,
// and in count-only mode measures sizes without allocating.
template <class Fx>
void arena_budget() {
  auto small = Fx::make(4096, fpdt::arena_mode::allocate, unlimited);
  auto a = small->device_memory().allocate(4000, "staging slot 0");
  REQUIRE(a.ok());
  CHECK(a->data() != nullptr);
  auto b = small->device_memory().allocate(1, "staging slot 1");
  REQUIRE_FALSE(b.ok());
  CHECK(b.error().code() == fpdt::errc::out_of_memory);
  CHECK(contains(b.error().message(), "allocating 1 bytes for staging slot 1"));
  CHECK(contains(b.error().message(), "over the budget of 4096 bytes"));
  a->reset();
  auto c = small->device_memory().allocate(4096, "staging slot 2");
  REQUIRE(c.ok());
  CHECK(small->device_memory().peak_bytes() == 4096);
  auto counting = Fx::make(std::size_t{1} << 40, fpdt::arena_mode::count_only, unlimited);
  auto big = counting->device_memory().allocate(std::size_t{1} << 39);
  REQUIRE(big.ok());
  CHECK(big->data() == nullptr);
  CHECK(counting->device_memory().peak_bytes() == std::size_t{1} << 39);
}

// The FPDT offload pattern (docs/design.md 2.2, CASES.md A18): chunks are produced on the compute lane
// into a ring of staging slots, offloaded to pinned memory on the d2h lane, and later fetched back
// on the h2d lane and read on the compute lane. Slots are reused only after the copy that reads
// them has finished, and the copy lane has an artificial delay, so any missing event would show as
// wrong data here (and as a data race under ThreadSanitizer on the host backend).
template <class Fx>
void offload_fetch_race(std::size_t elems, std::size_t iterations) {
  constexpr std::size_t chunks = 8, slots = 2;
  std::size_t const bytes = elems * sizeof(float);
  auto be = make_backend<Fx>(slots * bytes);
  auto compute = make_stream(*be, fpdt::lane::compute);
  auto d2h = make_stream(*be, fpdt::lane::d2h);
  auto h2d = make_stream(*be, fpdt::lane::h2d);
  std::vector<fpdt::arena_allocation> ring;
  for (std::size_t s = 0; s < slots; ++s) ring.push_back(device_block(*be, bytes));
  std::vector<fpdt::pinned_block> offloaded_chunk, result;
  for (std::size_t c = 0; c < chunks; ++c) {
    offloaded_chunk.push_back(pinned_block(*be, bytes));
    result.push_back(pinned_block(*be, bytes));
  }
  auto produced = make_events(*be, slots);
  auto offloaded = make_events(*be, slots);
  auto fetched = make_events(*be, chunks);
  for (std::size_t it = 0; it < iterations; ++it) {
    auto const seed = [it](std::size_t c) { return static_cast<std::uint32_t>(it * chunks + c); };
    // Forward: produce chunk c into slot c % 2, offload it.
    for (std::size_t c = 0; c < chunks; ++c) {
      std::size_t const s = c % slots;
      FPDT_TEST_OK(be->wait(compute, offloaded[s])); // slot free once its last offload is done
      FPDT_TEST_OK(Fx::fill(*be, compute, ring[s].template as<float>(), elems, seed(c)));
      FPDT_TEST_OK(be->record(produced[s], compute));
      FPDT_TEST_OK(be->wait(d2h, produced[s]));
      FPDT_TEST_OK(Fx::delay(*be, d2h, 100us)); // slow copy lane
      FPDT_TEST_OK(be->copy_async(offloaded_chunk[c].data(), ring[s].data(), bytes, d2h));
      FPDT_TEST_OK(be->record(offloaded[s], d2h));
    }
    // Backward: fetch each chunk back into a slot and read it out on the compute lane.
    for (std::size_t c = chunks; c-- > 0;) {
      std::size_t const s = c % slots;
      FPDT_TEST_OK(be->wait(h2d, offloaded[s])); // its last offload read the slot
      FPDT_TEST_OK(be->wait(h2d, produced[s]));  // and compute's last use of it is done
      FPDT_TEST_OK(be->copy_async(ring[s].data(), offloaded_chunk[c].data(), bytes, h2d));
      FPDT_TEST_OK(be->record(fetched[c], h2d));
      FPDT_TEST_OK(be->wait(compute, fetched[c]));
      FPDT_TEST_OK(be->copy_async(result[c].data(), ring[s].data(), bytes, compute));
      FPDT_TEST_OK(be->record(produced[s], compute));
      FPDT_TEST_OK(be->wait(d2h, produced[s]));
      FPDT_TEST_OK(be->record(offloaded[s], d2h)); // keeps the ring's bookkeeping uniform
    }
    FPDT_TEST_OK(be->synchronize(compute));
    FPDT_TEST_OK(be->synchronize(d2h));
    FPDT_TEST_OK(be->synchronize(h2d));
    for (std::size_t c = 0; c < chunks; ++c)
      CHECK_MESSAGE(first_mismatch(result[c].template as<float>(), elems, seed(c)) == elems,
                    "iteration ", it, " chunk ", c);
  }
  CHECK(be->device_memory().peak_bytes() == slots * fpdt::device_arena::rounded_size(bytes));
  CHECK(be->pinned_memory().stats().upstream_allocations == 2 * chunks);
}

// CASES.md A19 in miniature: many offload cycles through the backend's pinned pool; released
// blocks are reused, so the pinned bytes held do not grow and return to the same value each cycle.
template <class Fx>
void pinned_reuse(std::size_t cycles) {
  constexpr std::size_t chunks = 4, elems = (std::size_t{1} << 16) + 3;
  std::size_t const bytes = elems * sizeof(float);
  auto be = make_backend<Fx>();
  auto compute = make_stream(*be, fpdt::lane::compute);
  auto d2h = make_stream(*be, fpdt::lane::d2h);
  auto dev = device_block(*be, chunks * bytes);
  for (std::size_t c = 0; c < chunks; ++c)
    FPDT_TEST_OK(Fx::fill(*be, compute, dev.template as<float>() + c * elems, elems,
                          static_cast<std::uint32_t>(c)));
  FPDT_TEST_OK(be->synchronize(compute));
  fpdt::pinned_pool& pool = be->pinned_memory();
  std::size_t const rounded = fpdt::pinned_pool::rounded_size(bytes);
  for (std::size_t cycle = 0; cycle < cycles; ++cycle) {
    std::vector<fpdt::pinned_block> blocks;
    for (std::size_t c = 0; c < chunks; ++c) {
      blocks.push_back(pinned_block(*be, bytes));
      FPDT_TEST_OK(be->copy_async(blocks[c].data(), dev.template as<float>() + c * elems, bytes, d2h));
    }
    FPDT_TEST_OK(be->synchronize(d2h)); // the copies finish before the blocks go back
    for (std::size_t c = 0; c < chunks; ++c)
      REQUIRE(first_mismatch(blocks[c].template as<float>(), elems,
                             static_cast<std::uint32_t>(c)) == elems);
    CHECK(pool.stats().in_use_bytes == chunks * rounded);
  }
  auto const st = pool.stats();
  CHECK(st.upstream_allocations == chunks);
  CHECK(st.in_use_bytes == 0);
  CHECK(st.reserved_bytes == chunks * rounded);
  CHECK(st.peak_reserved_bytes == chunks * rounded);
  CHECK(st.cached_blocks == chunks);
}

} // namespace fpdt_test
