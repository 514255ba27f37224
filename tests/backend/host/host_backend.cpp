// Tests of include/fpdt/backend/host/host_backend.hpp: the backend concept, copies, the device
// arena and pinned pool through the backend, and the offload/fetch pattern of FPDT with copies
// racing compute (clean under the tsan preset). The bodies are shared with the CUDA backend
// (tests/backend/backend_cases.hpp).
#include <fpdt/backend/host/host_backend.hpp>

#include "../backend_cases.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>

static_assert(fpdt::backend<fpdt::host_backend>);

namespace {
struct look_alike { // has every member but did not opt in with the tag
  using stream_type = fpdt::host::stream;
  using event_type = fpdt::host::event;
};
static_assert(!fpdt::backend<look_alike>);

struct host_fixture {
  using backend = fpdt::host_backend;
  static std::unique_ptr<backend> make(std::size_t budget, fpdt::arena_mode mode,
                                       std::size_t pinned_limit) {
    return std::make_unique<backend>(fpdt::host_backend_options{budget, mode, pinned_limit});
  }
  static fpdt::status fill(backend& be, backend::stream_type& s, float* p, std::size_t n,
                           std::uint32_t seed) {
    return be.launch(s, [p, n, seed] {
      for (std::size_t i = 0; i < n; ++i) p[i] = fpdt_test::pattern(seed, i);
    });
  }
  static fpdt::status delay(backend& be, backend::stream_type& s, std::chrono::microseconds d) {
    return be.launch(s, [d] { std::this_thread::sleep_for(d); });
  }
};
} // namespace

TEST_CASE("host_backend: copy_async errors name the problem") {
  fpdt_test::copy_argument_errors<host_fixture>();
}

TEST_CASE("host_backend: copies round trip between pinned and device memory") {
  fpdt_test::copy_round_trip<host_fixture>();
}

TEST_CASE("host_backend: an event orders work across streams") {
  fpdt_test::event_orders_streams<host_fixture>();
}

TEST_CASE("host_backend: device arena budget and count-only size queries") {
  fpdt_test::arena_budget<host_fixture>();
}

TEST_CASE("host_backend: offload and fetch racing compute keep every chunk intact") {
  fpdt_test::offload_fetch_race<host_fixture>(4096, 25);
}

TEST_CASE("host_backend: pinned blocks are reused over many cycles without growth") {
  fpdt_test::pinned_reuse<host_fixture>(100);
}
