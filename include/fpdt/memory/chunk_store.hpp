//! \file
//! \brief `chunk_store`: where each chunk of each tensor lives, and its pinned host copy.
//!
//! docs/design.md 2.2, 2.3 and 4.6: FPDT keeps every chunk's q, k, v, out, lse (and, in the backward, the
//! fp32 dq accumulator and dout) in pinned host memory between uses. The store hands out one pinned block
//! per (tensor, chunk) from the backend's `pinned_pool` (so blocks are reused across calls and the
//! pool does not grow from call to call) and records each chunk's place: on the device, on the
//! host, on both, or in flight between them.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "pinned_pool.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! Where a chunk is.
enum class chunk_place : std::uint8_t {
  nowhere,   //!< not produced yet, or released
  device,    //!< only in a device buffer
  host,      //!< only in its pinned host copy
  both,      //!< on the device and in its pinned host copy
  in_flight, //!< a copy between the two has been enqueued and not yet waited for
};

//! Pinned host copies and places of `kinds` tensors x `chunks` chunks.
class chunk_store {
public:
  //! A store of `chunks` chunks for each of `bytes_per_kind.size()` tensors; tensor `t`'s chunks
  //! are `bytes_per_kind[t]` bytes each. Nothing is allocated until `acquire_all` or `host_copy`.
  //! `names` (optional, one per tensor) name the tensors in error messages.
  chunk_store(pinned_pool& pool, index_t chunks, std::vector<std::size_t> bytes_per_kind,
              std::vector<std::string> names = {})
      : pool_(&pool), chunks_(chunks), bytes_(std::move(bytes_per_kind)), names_(std::move(names)),
        blocks_(bytes_.size() * static_cast<std::size_t>(chunks)),
        places_(blocks_.size(), chunk_place::nowhere) {}

  chunk_store(chunk_store&&) noexcept = default;            //!< takes over the blocks
  chunk_store& operator=(chunk_store&&) noexcept = default; //!< returns own blocks, takes over
  chunk_store(chunk_store const&) = delete;
  chunk_store& operator=(chunk_store const&) = delete;

  //! Number of chunks per tensor.
  [[nodiscard]] index_t chunks() const noexcept { return chunks_; }
  //! Bytes of one chunk of tensor `kind`.
  [[nodiscard]] std::size_t chunk_bytes(std::size_t kind) const noexcept { return bytes_[kind]; }

  //! Acquires every pinned copy now (so a pass fails before it starts, not half-way).
  //! Errors: the pool's `errc::out_of_memory`, naming the tensor and chunk.
  [[nodiscard]] status acquire_all() {
    for (std::size_t k = 0; k < bytes_.size(); ++k)
      for (index_t c = 0; c < chunks_; ++c) {
        auto h = host_copy(k, c);
        if (!h) return h.error();
      }
    return {};
  }

  //! The pinned copy of chunk `c` of tensor `kind` (acquired from the pool on first use).
  //! Errors: the pool's `errc::out_of_memory` with the tensor and chunk named.
  [[nodiscard]] result<std::byte*> host_copy(std::size_t kind, index_t c) {
    pinned_block& b = blocks_[at(kind, c)];
    if (b.data() == nullptr && bytes_[kind] > 0) {
      auto r = pool_->acquire(bytes_[kind]);
      if (!r)
        return r.error().with_context(detail::concat(
            "chunk_store: pinned copy of ", kind < names_.size() ? names_[kind] : detail::concat("tensor ", kind),
            " chunk ", c, " (", bytes_[kind], " bytes)"));
      b = std::move(*r);
    }
    return b.as<std::byte>();
  }

  //! Place of chunk `c` of tensor `kind`.
  [[nodiscard]] chunk_place place(std::size_t kind, index_t c) const noexcept {
    return places_[at(kind, c)];
  }
  //! Records the place of chunk `c` of tensor `kind`.
  void set_place(std::size_t kind, index_t c, chunk_place p) noexcept { places_[at(kind, c)] = p; }
  //! Records `p` for every chunk of every tensor whose place is `from`.
  void settle(chunk_place from, chunk_place p) noexcept {
    for (auto& x : places_)
      if (x == from) x = p;
  }

  //! Pinned bytes held by the store (sum of its blocks' capacities).
  [[nodiscard]] std::size_t host_bytes() const noexcept {
    std::size_t t = 0;
    for (auto const& b : blocks_)
      t += b.capacity_bytes();
    return t;
  }

  //! Returns every pinned block to the pool and forgets all places.
  void clear() noexcept {
    for (auto& b : blocks_)
      b = pinned_block{};
    for (auto& p : places_)
      p = chunk_place::nowhere;
  }

private:
  [[nodiscard]] std::size_t at(std::size_t kind, index_t c) const noexcept {
    return kind * static_cast<std::size_t>(chunks_) + static_cast<std::size_t>(c);
  }

  pinned_pool* pool_;
  index_t chunks_;
  std::vector<std::size_t> bytes_;
  std::vector<std::string> names_;
  std::vector<pinned_block> blocks_;
  std::vector<chunk_place> places_;
};

FPDT_NAMESPACE_END
