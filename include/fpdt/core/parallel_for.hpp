//! \file
//! \brief `parallel_for`: runs independent work items on a few host threads.
//!
//! Host kernels (attention, MLP) split their work into items and hand them out dynamically, so an
//! uneven item (a causal diagonal tile) does not stall the others. Threads are started per call:
//! host kernels work on whole chunks (milliseconds), next to which a thread start is small, and no
//! pool outlives the call (no hidden global state).
#pragma once

#include "../config.hpp"
#include "status.hpp"

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! The number of threads a host kernel uses when asked for `requested` (0: all hardware threads).
[[nodiscard]] inline unsigned resolve_threads(unsigned requested) noexcept {
  if (requested > 0) return requested;
  unsigned const hw = std::thread::hardware_concurrency();
  return hw > 0 ? hw : 1;
}

//! The number of workers `parallel_for(items, threads, ...)` uses: min(resolve_threads(threads),
//! items), at least 1. Size per-worker scratch with it.
[[nodiscard]] inline unsigned parallel_workers(std::size_t items, unsigned threads) noexcept {
  return static_cast<unsigned>(
      std::max<std::size_t>(1, std::min<std::size_t>(resolve_threads(threads), items)));
}

//! Calls `fn(item, worker)` for every item in [0, items), on at most `threads` threads (`worker`
//! in [0, threads) names the calling thread, for per-thread scratch). Items run in no fixed order.
//!
//! Returns the number of workers used (<= threads). An exception thrown by `fn` stops the
//! remaining items and is returned as `errc::backend_error` with its message.
template <class F>
[[nodiscard]] result<unsigned> parallel_for(std::size_t items, unsigned threads, F&& fn) {
  unsigned const workers = parallel_workers(items, threads);
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  status error;
  auto body = [&](unsigned worker) {
    try {
      for (std::size_t i; !failed.load(std::memory_order_relaxed) &&
                          (i = next.fetch_add(1, std::memory_order_relaxed)) < items;)
        fn(i, worker);
    } catch (std::exception const& ex) {
      failed = true;
      std::lock_guard lock(error_mutex);
      if (error.ok()) error = make_error(errc::backend_error, "parallel_for: item threw: ", ex.what());
    } catch (...) {
      failed = true;
      std::lock_guard lock(error_mutex);
      if (error.ok()) error = make_error(errc::backend_error, "parallel_for: item threw");
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(workers - 1);
    for (unsigned w = 1; w < workers; ++w) pool.emplace_back(body, w);
  } catch (std::exception const&) { // could not start more threads: run with what we have
  }
  body(0);
  for (auto& t : pool) t.join();
  if (!error.ok()) return error;
  return static_cast<unsigned>(pool.size() + 1);
}

FPDT_NAMESPACE_END
