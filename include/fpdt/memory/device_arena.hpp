//! \file
//! \brief `device_arena`: device memory under a byte budget, with exact current and peak counters.
//!
//! Every device buffer of the FPDT pipeline (staging slots, accumulators, chunk buffers) comes from
//! an arena, so the peak device bytes of a layer are measured exactly and can be asserted on in
//! tests and compared with the planner's prediction (docs/design.md 4.6 and 5). In count-only
//! mode nothing is allocated: the same code path that runs a layer reports the bytes it would need
//! (CUB's size-query habit).
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "memory_block.hpp"
#include "memory_resource.hpp"

#include <cstddef>
#include <mutex>
#include <string_view>

FPDT_NAMESPACE_BEGIN

//! Whether an arena allocates memory or only counts the bytes asked for.
enum class arena_mode {
  allocate,   //!< allocations return real memory from the upstream resource
  count_only, //!< allocations return blocks with null data; counters and budget work as usual
};

//! Snapshot of an arena's counters, all in bytes except the counts.
struct arena_stats {
  std::size_t budget_bytes = 0;      //!< the most bytes that may be reserved at once
  std::size_t current_bytes = 0;     //!< bytes reserved now (sizes rounded to the granularity)
  std::size_t peak_bytes = 0;        //!< most bytes reserved at once since creation or reset_peak
  std::size_t live_allocations = 0;  //!< blocks not yet released
  std::size_t total_allocations = 0; //!< successful allocations since creation
};

class device_arena;
//! A block of arena memory; returned to the arena when destroyed.
using arena_allocation = memory_block<device_arena>;

//! Budgeted allocator with exact byte counters; thread-safe.
//!
//! Each request is rounded up to `granularity` bytes (256, the alignment `cudaMalloc` gives) and
//! that rounded size is what the counters and the budget see. Blocks are allocated one by one from
//! the upstream resource, so sanitizers see each block's bounds.
class device_arena {
public:
  //! Alignment and rounding unit of every allocation, in bytes.
  static constexpr std::size_t granularity = 256;

  //! An arena drawing from `upstream`, allowing at most `budget_bytes` reserved at once.
  device_arena(memory_resource upstream, std::size_t budget_bytes,
               arena_mode mode = arena_mode::allocate) noexcept
      : upstream_(upstream), mode_(mode) {
    stats_.budget_bytes = budget_bytes;
  }
  device_arena(device_arena const&) = delete;
  device_arena& operator=(device_arena const&) = delete;

  //! The largest request the arena accepts (larger ones could not be rounded without wrapping).
  static constexpr std::size_t max_request = ~std::size_t{0} - granularity + 1;

  //! `bytes` rounded up to the granularity: what an allocation of `bytes` reserves (`bytes` must
  //! be at most `max_request`).
  [[nodiscard]] static constexpr std::size_t rounded_size(std::size_t bytes) noexcept {
    return (bytes + granularity - 1) / granularity * granularity;
  }

  //! Reserves `bytes` bytes (0 gives an empty block); `what` names the buffer in error messages.
  //!
  //! Errors: `errc::out_of_memory` naming the request, the budget and the bytes in use when the
  //! rounded request would take the reserved bytes over the budget, or when the upstream fails.
  [[nodiscard]] result<arena_allocation> allocate(std::size_t bytes,
                                                  std::string_view what = "buffer") {
    if (bytes == 0) return arena_allocation{};
    if (bytes > max_request)
      return make_error(errc::out_of_memory, "device arena (", upstream_.name, "): allocating ",
                        bytes, " bytes for ", what, " exceeds the largest request of ",
                        max_request, " bytes");
    std::size_t const rounded = rounded_size(bytes);
    // The upstream call stays under the lock: allocation is rare next to compute, and this keeps
    // the budget check, the upstream call and the counters one atomic step (exact peaks).
    std::lock_guard lock(mutex_);
    if (rounded > stats_.budget_bytes || stats_.current_bytes > stats_.budget_bytes - rounded)
      return make_error(errc::out_of_memory, "device arena (", upstream_.name, "): allocating ",
                        bytes, " bytes for ", what, " (", rounded,
                        " after rounding) would raise the bytes in use from ",
                        stats_.current_bytes, " to ", stats_.current_bytes + rounded,
                        ", over the budget of ", stats_.budget_bytes, " bytes (",
                        stats_.live_allocations, " live allocations, peak ", stats_.peak_bytes,
                        ")");
    void* p = nullptr;
    if (mode_ == arena_mode::allocate) {
      result<void*> r = upstream_.allocate(upstream_.context, rounded, granularity);
      if (!r.ok())
        return r.error().with_context(
            detail::concat("device arena: allocating ", bytes, " bytes for ", what));
      p = *r;
    }
    stats_.current_bytes += rounded;
    if (stats_.current_bytes > stats_.peak_bytes) stats_.peak_bytes = stats_.current_bytes;
    ++stats_.live_allocations;
    ++stats_.total_allocations;
    return arena_allocation(this, p, bytes, rounded);
  }

  //! Counter snapshot.
  [[nodiscard]] arena_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  //! Bytes reserved now.
  [[nodiscard]] std::size_t current_bytes() const { return stats().current_bytes; }
  //! Most bytes reserved at once since creation or the last reset_peak().
  [[nodiscard]] std::size_t peak_bytes() const { return stats().peak_bytes; }
  //! The budget, in bytes.
  [[nodiscard]] std::size_t budget_bytes() const { return stats().budget_bytes; }
  //! The allocation mode.
  [[nodiscard]] arena_mode mode() const noexcept { return mode_; }
  //! Starts a new peak measurement: the peak becomes the bytes reserved now.
  void reset_peak() {
    std::lock_guard lock(mutex_);
    stats_.peak_bytes = stats_.current_bytes;
  }

  //! Called by arena_allocation on destruction; not for direct use.
  void release_block(void* p, std::size_t capacity) noexcept {
    if (p != nullptr) upstream_.deallocate(upstream_.context, p, capacity, granularity);
    std::lock_guard lock(mutex_);
    stats_.current_bytes -= capacity;
    --stats_.live_allocations;
  }

private:
  memory_resource upstream_;
  arena_mode mode_;
  mutable std::mutex mutex_;
  arena_stats stats_;
};

FPDT_NAMESPACE_END
