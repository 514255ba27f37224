//! \file
//! \brief `pinned_pool`: a caching pool of pinned host memory for offloaded chunks.
//!
//! FPDT keeps every inactive chunk's q, k, v, out and lse in pinned host memory (docs/design.md 2.2).
//! Pinning is slow (`cudaHostAlloc` costs milliseconds), so released blocks are cached and
//! reused: a training step that offloads the same chunk sizes as the previous one takes no new
//! memory from the upstream, and the pool does not grow from call to call.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "memory_block.hpp"
#include "memory_resource.hpp"

#include <cstddef>
#include <limits>
#include <map>
#include <mutex>

FPDT_NAMESPACE_BEGIN

//! Snapshot of a pinned pool's counters, in bytes except the counts.
struct pinned_pool_stats {
  std::size_t limit_bytes = 0;          //!< the most bytes the pool may hold from upstream
  std::size_t reserved_bytes = 0;       //!< bytes held from upstream now (in use + cached)
  std::size_t in_use_bytes = 0;         //!< bytes of blocks handed out and not yet released
  std::size_t peak_reserved_bytes = 0;  //!< most bytes held from upstream at once
  std::size_t upstream_allocations = 0; //!< calls to the upstream allocate since creation
  std::size_t cached_blocks = 0;        //!< released blocks kept for reuse
};

class pinned_pool;
//! A block of pinned host memory; returned to the pool's cache when destroyed.
using pinned_block = memory_block<pinned_pool>;

//! Caching allocator of pinned host memory; thread-safe.
//!
//! Requests are rounded up to `granularity` (4096 bytes, a page). A request reuses the smallest
//! cached block whose capacity is at least the rounded size; otherwise a new block comes from the
//! upstream. When that would exceed `limit_bytes`, the cache is returned to the upstream first.
//! The pool must outlive its blocks; its destructor frees the cached blocks.
class pinned_pool {
public:
  //! Alignment and rounding unit of every block, in bytes.
  static constexpr std::size_t granularity = 4096;

  //! A pool drawing from `upstream`, holding at most `limit_bytes` at once.
  explicit pinned_pool(memory_resource upstream,
                       std::size_t limit_bytes = std::numeric_limits<std::size_t>::max()) noexcept
      : upstream_(upstream) {
    stats_.limit_bytes = limit_bytes;
  }
  pinned_pool(pinned_pool const&) = delete;
  pinned_pool& operator=(pinned_pool const&) = delete;
  //! Frees the cached blocks (blocks still in use must have been released before).
  ~pinned_pool() { trim(); }

  //! The largest request the pool accepts (larger ones could not be rounded without wrapping).
  static constexpr std::size_t max_request = ~std::size_t{0} - granularity + 1;

  //! `bytes` rounded up to the granularity (`bytes` must be at most `max_request`).
  [[nodiscard]] static constexpr std::size_t rounded_size(std::size_t bytes) noexcept {
    return (bytes + granularity - 1) / granularity * granularity;
  }

  //! A block of at least `bytes` bytes (0 gives an empty block).
  //!
  //! Errors: `errc::out_of_memory` naming the request, the limit and the bytes held, when even
  //! after freeing the cache the pool would hold more than its limit, or when the upstream fails.
  [[nodiscard]] result<pinned_block> acquire(std::size_t bytes) {
    if (bytes == 0) return pinned_block{};
    if (bytes > max_request)
      return make_error(errc::out_of_memory, "pinned pool (", upstream_.name, "): acquiring ",
                        bytes, " bytes exceeds the largest request of ", max_request, " bytes");
    std::size_t const rounded = rounded_size(bytes);
    std::lock_guard lock(mutex_);
    if (auto it = cache_.lower_bound(rounded); it != cache_.end()) {
      std::size_t const cap = it->first;
      void* p = it->second;
      cache_.erase(it);
      stats_.in_use_bytes += cap;
      stats_.cached_blocks = cache_.size();
      return pinned_block(this, p, bytes, cap);
    }
    if (exceeds_limit(rounded)) trim_locked();
    if (exceeds_limit(rounded))
      return make_error(errc::out_of_memory, "pinned pool (", upstream_.name, "): acquiring ",
                        bytes, " bytes (", rounded, " after rounding) would raise the bytes held "
                        "from ", stats_.reserved_bytes, " to ", stats_.reserved_bytes + rounded,
                        ", over the limit of ", stats_.limit_bytes, " bytes");
    result<void*> r = upstream_.allocate(upstream_.context, rounded, granularity);
    if (!r.ok())
      return r.error().with_context(detail::concat("pinned pool: acquiring ", bytes, " bytes"));
    ++stats_.upstream_allocations;
    stats_.reserved_bytes += rounded;
    stats_.in_use_bytes += rounded;
    if (stats_.reserved_bytes > stats_.peak_reserved_bytes)
      stats_.peak_reserved_bytes = stats_.reserved_bytes;
    return pinned_block(this, *r, bytes, rounded);
  }

  //! Returns every cached (released) block to the upstream; blocks in use are untouched.
  void trim() noexcept {
    std::lock_guard lock(mutex_);
    trim_locked();
  }

  //! Counter snapshot.
  [[nodiscard]] pinned_pool_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

  //! Called by pinned_block on destruction: caches the block; not for direct use.
  void release_block(void* p, std::size_t capacity) noexcept {
    std::lock_guard lock(mutex_);
    stats_.in_use_bytes -= capacity;
    try {
      cache_.emplace(capacity, p);
    } catch (...) { // no memory for the cache node: give the block back instead
      upstream_.deallocate(upstream_.context, p, capacity, granularity);
      stats_.reserved_bytes -= capacity;
    }
    stats_.cached_blocks = cache_.size();
  }

private:
  [[nodiscard]] bool exceeds_limit(std::size_t rounded) const noexcept {
    return rounded > stats_.limit_bytes || stats_.reserved_bytes > stats_.limit_bytes - rounded;
  }
  void trim_locked() noexcept {
    for (auto const& [cap, p] : cache_) {
      upstream_.deallocate(upstream_.context, p, cap, granularity);
      stats_.reserved_bytes -= cap;
    }
    cache_.clear();
    stats_.cached_blocks = 0;
  }

  memory_resource upstream_;
  mutable std::mutex mutex_;
  std::multimap<std::size_t, void*> cache_; // capacity -> block, for best-fit reuse
  pinned_pool_stats stats_;
};

FPDT_NAMESPACE_END
