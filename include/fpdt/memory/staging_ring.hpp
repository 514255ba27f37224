//! \file
//! \brief `staging_ring`: a fixed ring of equal device slots that chunks rotate through.
//!
//! docs/design.md 1 ("ring, slot") and 4.6: chunks take turns in a fixed set of device slots (two
//! slots is double buffering). The slots are allocated once, from the budgeted device arena, when
//! the ring is made, so the device bytes of a pass are the ring's bytes whatever the sequence
//! length; which chunk sits in which slot, and when a slot may be reused, is the schedule's
//! business (schedule/schedule.hpp).
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "device_arena.hpp"

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! A ring of `size()` device slots of `slot_bytes()` bytes each (one arena allocation per slot).
class staging_ring {
public:
  //! An empty ring (no slots).
  staging_ring() = default;
  staging_ring(staging_ring&&) noexcept = default;            //!< takes over the slots
  staging_ring& operator=(staging_ring&&) noexcept = default; //!< frees own slots, takes over
  staging_ring(staging_ring const&) = delete;
  staging_ring& operator=(staging_ring const&) = delete;

  //! Allocates `slots` slots of `slot_bytes` bytes from `arena`; `name` appears in errors.
  //! Errors: `errc::invalid_argument` for a negative slot count; the arena's
  //! `errc::out_of_memory` naming the slot (the slots allocated so far are returned).
  [[nodiscard]] static result<staging_ring> create(device_arena& arena, index_t slots,
                                                   std::size_t slot_bytes, std::string_view name) {
    if (slots < 0)
      return make_error(errc::invalid_argument, "staging_ring ", name, ": ", slots,
                        " slots requested; must be >= 0");
    staging_ring r;
    r.bytes_ = slot_bytes;
    r.slots_.reserve(static_cast<std::size_t>(slots));
    for (index_t s = 0; s < slots; ++s) {
      auto a = arena.allocate(slot_bytes, detail::concat(name, " slot ", s, " of ", slots));
      if (!a) return a.error();
      r.slots_.push_back(std::move(*a));
    }
    return result<staging_ring>(std::move(r));
  }

  //! Number of slots.
  [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(slots_.size()); }
  //! Bytes of each slot (as asked for).
  [[nodiscard]] std::size_t slot_bytes() const noexcept { return bytes_; }
  //! Start of slot `s` (0 <= s < size()); null in a count-only arena.
  [[nodiscard]] std::byte* slot(index_t s) const noexcept {
    return slots_[static_cast<std::size_t>(s)].as<std::byte>();
  }

private:
  std::vector<arena_allocation> slots_;
  std::size_t bytes_ = 0;
};

FPDT_NAMESPACE_END
