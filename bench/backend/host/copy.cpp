// Benchmarks of include/fpdt/backend/host/host_backend.hpp: copy_async through a worker-thread
// stream (enqueue, run, synchronize) beside a bare memcpy of the same bytes, and the round trip of
// an event between two streams. Ratios in one run tell the stream overhead per copy size.
#include <fpdt/backend/host/host_backend.hpp>

#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

namespace {

void stream_copy_async(benchmark::State& state) {
  auto const bytes = static_cast<std::size_t>(state.range(0));
  fpdt::host_backend be({.device_budget_bytes = bytes + 4096});
  auto s = be.create_stream(fpdt::lane::d2h);
  auto dev = be.device_memory().allocate(bytes);
  auto pinned = be.pinned_memory().acquire(bytes);
  if (!s.ok() || !dev.ok() || !pinned.ok()) {
    state.SkipWithError("setup failed");
    return;
  }
  std::memset(dev->data(), 1, bytes);
  for (auto _ : state) {
    if (!be.copy_async(pinned->data(), dev->data(), bytes, *s).ok() || !be.synchronize(*s).ok()) {
      state.SkipWithError("copy failed");
      break;
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * state.iterations()));
}

void bare_memcpy(benchmark::State& state) {
  auto const bytes = static_cast<std::size_t>(state.range(0));
  std::vector<char> a(bytes, 1), b(bytes);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * state.iterations()));
}

void event_round_trip(benchmark::State& state) {
  fpdt::host_backend be;
  auto a = be.create_stream(fpdt::lane::compute);
  auto b = be.create_stream(fpdt::lane::h2d);
  auto e = be.create_event();
  if (!a.ok() || !b.ok() || !e.ok()) {
    state.SkipWithError("setup failed");
    return;
  }
  for (auto _ : state) {
    if (!be.record(*e, *a).ok() || !be.wait(*b, *e).ok() || !be.synchronize(*b).ok()) {
      state.SkipWithError("event failed");
      break;
    }
  }
}

} // namespace

BENCHMARK(stream_copy_async)->RangeMultiplier(16)->Range(4096, 64 << 20)->UseRealTime();
BENCHMARK(bare_memcpy)->RangeMultiplier(16)->Range(4096, 64 << 20)->UseRealTime();
BENCHMARK(event_round_trip)->UseRealTime();
