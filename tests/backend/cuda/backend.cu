// GPU tests of include/fpdt/backend/cuda/{cuda_backend,stream,event,cuda_memory,cuda_check}.hpp:
// the bodies shared with the host backend (tests/backend/backend_cases.hpp) with small kernels as
// the compute work, plus what only CUDA has (device ordinals, priorities, launch errors, the
// stream-ordered pool, FPDT_CUDA_CHECK clearing errors).
#include <fpdt/backend/cuda/cuda_backend.hpp>

#include "../backend_cases.hpp"

#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>

static_assert(fpdt::backend<fpdt::cuda_backend>);

namespace {

__global__ void fill_kernel(float* p, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x)
    p[i] = fpdt_test::pattern(seed, i);
}

__device__ std::uint64_t global_ns() {
  std::uint64_t t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Keeps its stream busy for `ns` nanoseconds of wall time.
__global__ void spin_kernel(std::uint64_t ns) {
  std::uint64_t const start = global_ns();
  while (global_ns() - start < ns) {
  }
}

struct cuda_fixture {
  using backend = fpdt::cuda_backend;
  static std::unique_ptr<backend> make(std::size_t budget, fpdt::arena_mode mode,
                                       std::size_t pinned_limit) {
    auto be = backend::create({.device = 0,
                               .device_budget_bytes = budget,
                               .device_mode = mode,
                               .pinned_limit_bytes = pinned_limit});
    REQUIRE_MESSAGE(be.ok(), be.error().to_string());
    return std::move(*be);
  }
  static fpdt::status fill(backend& be, backend::stream_type& s, float* p, std::size_t n,
                           std::uint32_t seed) {
    return be.launch(s, [=](cudaStream_t st) {
      auto const blocks = static_cast<unsigned>(n / 256 + 1 < 1024 ? n / 256 + 1 : 1024);
      fill_kernel<<<blocks, 256, 0, st>>>(p, n, seed);
    });
  }
  static fpdt::status delay(backend& be, backend::stream_type& s, std::chrono::microseconds d) {
    auto const ns = static_cast<std::uint64_t>(d.count()) * 1000;
    return be.launch(s, [ns](cudaStream_t st) { spin_kernel<<<1, 1, 0, st>>>(ns); });
  }
};

int device_count() {
  int n = 0;
  REQUIRE(cudaGetDeviceCount(&n) == cudaSuccess);
  return n;
}

fpdt::status absurd_cuda_malloc() {
  void* p = nullptr;
  FPDT_CUDA_CHECK(cudaMalloc(&p, std::size_t{1} << 60));
  return {};
}

} // namespace

TEST_CASE("cuda_backend: copy_async errors name the problem") {
  fpdt_test::copy_argument_errors<cuda_fixture>();
}

TEST_CASE("cuda_backend: copies round trip between pinned and device memory") {
  fpdt_test::copy_round_trip<cuda_fixture>();
}

TEST_CASE("cuda_backend: an event orders work across streams") {
  fpdt_test::event_orders_streams<cuda_fixture>();
}

TEST_CASE("cuda_backend: device arena budget and count-only size queries") {
  fpdt_test::arena_budget<cuda_fixture>();
}

TEST_CASE("cuda_backend: offload and fetch racing compute keep every chunk intact") {
  fpdt_test::offload_fetch_race<cuda_fixture>(std::size_t{1} << 20, 50); // 4 MiB chunks
}

TEST_CASE("cuda_backend: pinned blocks are reused over many cycles without growth") {
  fpdt_test::pinned_reuse<cuda_fixture>(200);
}

TEST_CASE("cuda_backend: create with a bad device ordinal names the ordinal and the count") {
  int const n = device_count();
  for (int const bad : {n, -1}) {
    auto be = fpdt::cuda_backend::create({.device = bad});
    REQUIRE_FALSE(be.ok());
    CHECK(be.error().code() == fpdt::errc::invalid_argument);
    CHECK(be.error().message() == "cuda_backend: device " + std::to_string(bad) +
                                      " requested but " + std::to_string(n) +
                                      " CUDA device(s) present");
  }
  auto good = fpdt::cuda_backend::create();
  REQUIRE(good.ok());
  CHECK((*good)->device() == 0);
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuda_backend: streams have their lane's priority and events time work") {
  auto be = cuda_fixture::make(1 << 20, fpdt::arena_mode::allocate, fpdt_test::unlimited);
  int least = 0, greatest = 0;
  REQUIRE(cudaDeviceGetStreamPriorityRange(&least, &greatest) == cudaSuccess);
  auto compute = fpdt_test::make_stream(*be, fpdt::lane::compute);
  auto h2d = fpdt_test::make_stream(*be, fpdt::lane::h2d);
  int prio = 1;
  unsigned flags = 0;
  REQUIRE(cudaStreamGetPriority(compute.native_handle(), &prio) == cudaSuccess);
  CHECK(prio == greatest);
  REQUIRE(cudaStreamGetPriority(h2d.native_handle(), &prio) == cudaSuccess);
  CHECK(prio == 0);
  REQUIRE(cudaStreamGetFlags(h2d.native_handle(), &flags) == cudaSuccess);
  CHECK(flags == cudaStreamNonBlocking);
  CHECK(compute.name() == "compute");

  // Move-only handles: the moved-from one owns nothing and the backend refuses it.
  cudaStream_t const h = h2d.native_handle();
  fpdt::cuda::stream moved = std::move(h2d);
  CHECK(moved.native_handle() == h);
  CHECK(h2d.native_handle() == nullptr);
  CHECK(moved.name() == "h2d");
  fpdt::status const empty = be->synchronize(h2d);
  CHECK(empty.code() == fpdt::errc::invalid_argument);
  CHECK(fpdt_test::contains(empty.message(), "cuda_backend::synchronize: the stream is empty"));

  auto untimed = be->create_event();
  REQUIRE(untimed.ok());
  CHECK_FALSE(untimed->timing());
  auto start = be->create_event(true);
  auto stop = be->create_event(true);
  REQUIRE(start.ok());
  REQUIRE(stop.ok());
  FPDT_TEST_OK(be->record(*start, moved));
  FPDT_TEST_OK(cuda_fixture::delay(*be, moved, std::chrono::microseconds(2000)));
  FPDT_TEST_OK(be->record(*stop, moved));
  FPDT_TEST_OK(be->record(*untimed, moved));
  FPDT_TEST_OK(stop->synchronize());
  auto dt = elapsed_seconds(*start, *stop);
  REQUIRE_MESSAGE(dt.ok(), dt.error().to_string());
  CHECK(*dt >= 0.0019);
  CHECK(*dt < 1.0);
  CHECK_FALSE(elapsed_seconds(*start, *untimed).ok()); // no timing on that one
  CHECK(cudaGetLastError() == cudaSuccess);            // and the error was cleared
  fpdt::cuda::event e = std::move(*untimed);
  CHECK(untimed->native_handle() == nullptr);
  fpdt::status const empty_event = be->wait(moved, *untimed);
  CHECK(fpdt_test::contains(empty_event.message(), "cuda_backend::wait: the event is empty"));
  FPDT_TEST_OK(be->wait(moved, e));
  FPDT_TEST_OK(be->synchronize(moved));
}

TEST_CASE("cuda_backend: a failed kernel launch is reported and cleared") {
  auto be = cuda_fixture::make(1 << 20, fpdt::arena_mode::allocate, fpdt_test::unlimited);
  auto s = fpdt_test::make_stream(*be, fpdt::lane::compute);
  fpdt::status const bad = be->launch(s, [](cudaStream_t st) {
    spin_kernel<<<1, 4096, 0, st>>>(0); // more threads per block than any device allows
  });
  INFO(bad.message());
  CHECK(bad.code() == fpdt::errc::backend_error);
  CHECK(fpdt_test::contains(bad.message(),
                            "cuda_backend::launch on stream 'compute': kernel launch failed with "
                            "cudaError"));
  CHECK(cudaGetLastError() == cudaSuccess);
  fpdt::status const refused = be->launch(s, [](cudaStream_t) {
    return fpdt::make_error(fpdt::errc::not_supported, "head dim 96");
  });
  CHECK(refused.code() == fpdt::errc::not_supported);
  CHECK(refused.message() == "cuda_backend::launch on stream 'compute': head dim 96");
  // The stream still works.
  auto buf = fpdt_test::device_block(*be, 1024 * sizeof(float));
  auto host = fpdt_test::pinned_block(*be, 1024 * sizeof(float));
  FPDT_TEST_OK(cuda_fixture::fill(*be, s, buf.as<float>(), 1024, 9));
  FPDT_TEST_OK(be->copy_async(host.data(), buf.data(), 1024 * sizeof(float), s));
  FPDT_TEST_OK(be->synchronize(s));
  CHECK(fpdt_test::first_mismatch(host.as<float>(), 1024, 9) == 1024);
}

TEST_CASE("FPDT_CUDA_CHECK: an absurd allocation is out_of_memory and clears the error") {
  fpdt::status const st = absurd_cuda_malloc();
  CHECK(st.code() == fpdt::errc::out_of_memory);
  CHECK(fpdt_test::contains(st.message(), "cudaMalloc(&p, std::size_t{1} << 60) failed with "
                                          "cudaErrorMemoryAllocation"));
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaDeviceSynchronize() == cudaSuccess); // not sticky: the context still works

  // The same through the stream-ordered pool under an unlimited arena: the bytes are named.
  auto be = cuda_fixture::make(fpdt_test::unlimited, fpdt::arena_mode::allocate,
                               fpdt_test::unlimited);
  auto huge = be->device_memory().allocate(std::size_t{1} << 50, "kv cache");
  REQUIRE_FALSE(huge.ok());
  CHECK(huge.error().code() == fpdt::errc::out_of_memory);
  CHECK(fpdt_test::contains(huge.error().message(), "allocating 1125899906842624 bytes for kv cache"));
  CHECK(fpdt_test::contains(huge.error().message(), "bytes on device 0"));
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(be->device_memory().current_bytes() == 0);
}

TEST_CASE("cuda_backend: freed device memory stays cached in the default pool") {
  auto be = cuda_fixture::make(fpdt_test::unlimited, fpdt::arena_mode::allocate,
                               fpdt_test::unlimited);
  cudaMemPool_t pool = nullptr;
  REQUIRE(cudaDeviceGetDefaultMemPool(&pool, be->device()) == cudaSuccess);
  std::uint64_t threshold = 0;
  REQUIRE(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold) ==
          cudaSuccess);
  CHECK(threshold == std::numeric_limits<std::uint64_t>::max());
  constexpr std::size_t bytes = std::size_t{256} << 20; // more than the earlier cases reserve
  auto s = fpdt_test::make_stream(*be, fpdt::lane::compute);
  {
    auto a = fpdt_test::device_block(*be, bytes);
    CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % fpdt::device_arena::granularity == 0);
    // Usable at once from another stream (allocate waited for the allocation).
    FPDT_TEST_OK(cuda_fixture::fill(*be, s, a.as<float>(), bytes / sizeof(float), 3));
    FPDT_TEST_OK(be->synchronize(s));
  }
  FPDT_TEST_OK(be->synchronize(s));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess); // the free has run
  std::uint64_t reserved = 0;
  REQUIRE(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &reserved) ==
          cudaSuccess);
  CHECK(reserved >= bytes); // kept by the pool, not returned to the driver
  auto again = fpdt_test::device_block(*be, bytes);
  CHECK(again.data() != nullptr);
}
