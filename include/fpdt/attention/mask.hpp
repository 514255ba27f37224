//! \file
//! \brief `attention_mask`: which keys a query may see, as data, by global token position.
//!
//! docs/design.md 3.4: causal alignment is by global position: the key at position p_k is visible to
//! the query at p_q iff p_k <= p_q. A chunk kernel receives the global offsets of its query and
//! key ranges and asks the mask for each query's visible key range. Every mask is a contiguous
//! range of keys per query, so kernels skip whole tiles outside it; sliding-window and document
//! masks fit the same hook (a window start, or the start of the query's document) by extending
//! `visible_keys` and nothing else.
#pragma once

#include "../config.hpp"
#include "../core/tensor_view.hpp"

#include <cstdint>
#include <string_view>

FPDT_NAMESPACE_BEGIN

//! The kinds of attention mask.
enum class mask_kind : std::uint8_t {
  full,   //!< every key is visible to every query (bidirectional attention)
  causal, //!< key p_k is visible to query p_q iff p_k <= p_q (global positions)
};

//! Name of a mask kind: "full" or "causal".
[[nodiscard]] constexpr std::string_view to_string(mask_kind k) noexcept {
  return k == mask_kind::causal ? "causal" : "full";
}

//! Half-open range [begin, end) of global key positions.
struct key_range {
  index_t begin; //!< first visible position
  index_t end;   //!< one past the last visible position
};

//! An attention mask; a small value passed to chunk kernels.
struct attention_mask {
  mask_kind kind = mask_kind::full; //!< which rule applies

  //! Global key positions visible to the query at global position `q_pos`: [begin, end).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr key_range visible_keys(index_t q_pos) const noexcept {
    constexpr index_t hi = 0x7fffffffffffffff; // numeric_limits is not callable on the device
    constexpr index_t lo = -hi - 1;
    return kind == mask_kind::causal ? key_range{lo, q_pos + 1} : key_range{lo, hi};
  }

  //! True when the key at global position `k_pos` is visible to the query at `q_pos`.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr bool visible(index_t q_pos, index_t k_pos) const noexcept {
    key_range const r = visible_keys(q_pos);
    return k_pos >= r.begin && k_pos < r.end;
  }

  //! Visible keys of query `q_pos` among the `sk` keys that start at global position `k_offset`,
  //! as local indices [begin, end) into that key chunk (empty when begin >= end).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr key_range local_keys(index_t q_pos, index_t k_offset,
                                                              index_t sk) const noexcept {
    key_range const r = visible_keys(q_pos);
    index_t b = r.begin <= k_offset ? 0 : r.begin - k_offset;
    index_t e = r.end >= k_offset + sk ? sk : r.end - k_offset;
    if (b > sk) b = sk;
    if (e < 0) e = 0;
    if (e < b) e = b;
    return {b, e};
  }
};

//! Bidirectional attention.
inline constexpr attention_mask full_mask{mask_kind::full};
//! Causal attention by global position.
inline constexpr attention_mask causal_mask{mask_kind::causal};

FPDT_NAMESPACE_END
