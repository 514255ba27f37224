//! \file
//! \brief `ulysses_layout`: the head sharding of the Ulysses all-to-all over P ranks (which query
//! and key/value heads each rank holds after the sequence-to-head exchange), and its rules.
//!
//! docs/design.md section 3.5; DeepSpeed-Ulysses (Jacobs et al., arXiv 2309.14509). Pure shape
//! arithmetic, below the communicators (comm/ulysses.hpp moves the data) so that the attention
//! problem (schedule/attention_problem.hpp) validates heads with the same rules.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"

#include <cstdint>

FPDT_NAMESPACE_BEGIN

//! Which heads an all-to-all moves.
enum class head_kind : std::uint8_t {
  query,     //!< the H query heads (also out, dout, dq)
  key_value, //!< the H_kv key/value heads (also dk, dv)
};

//! The head sharding of P ranks for H query and H_kv key/value heads, chunks of C tokens.
struct ulysses_layout {
  index_t ranks = 1;     //!< P
  index_t heads = 1;     //!< H
  index_t kv_heads = 1;  //!< H_kv
  index_t head_dim = 1;  //!< D
  index_t chunk = 1;     //!< C, global tokens per chunk
  bool kv_replicated = false; //!< P % H_kv == 0 with H_kv < P: one replicated kv head per rank

  //! Checks the numbers. Errors: `errc::invalid_argument` naming them and the rule: all >= 1,
  //! H % P == 0, C % P == 0, H % H_kv == 0, and H_kv % P == 0 or P % H_kv == 0.
  [[nodiscard]] static result<ulysses_layout> make(index_t p, index_t h, index_t hkv, index_t d,
                                                   index_t c) {
    if (p < 1 || h < 1 || hkv < 1 || d < 1 || c < 1)
      return make_error(errc::invalid_argument, "ulysses: P = ", p, ", H = ", h, ", H_kv = ", hkv,
                        ", D = ", d, ", C = ", c, " must all be >= 1");
    if (h % p != 0)
      return make_error(errc::invalid_argument, "ulysses: H = ", h, " query heads are not a multiple of P = ",
                        p, " ranks");
    if (c % p != 0)
      return make_error(errc::invalid_argument, "ulysses: the chunk C = ", c,
                        " is not a multiple of P = ", p);
    if (h % hkv != 0)
      return make_error(errc::invalid_argument, "ulysses: H = ", h,
                        " is not a multiple of H_kv = ", hkv);
    if (hkv % p != 0 && p % hkv != 0)
      return make_error(errc::invalid_argument, "ulysses: H = ", h, ", H_kv = ", hkv, ", P = ", p,
                        ": H_kv must be a multiple of P (key/value heads sharded) or divide P "
                        "(replicated), and ", hkv, " does neither");
    return ulysses_layout{p, h, hkv, d, c, hkv % p != 0};
  }

  //! Tokens of one chunk on one rank before the all-to-all, C/P.
  [[nodiscard]] index_t piece() const noexcept { return chunk / ranks; }
  //! Heads of `k` on each rank after the all-to-all: H/P, and H_kv/P or 1.
  [[nodiscard]] index_t heads_per_rank(head_kind k) const noexcept {
    return k == head_kind::query ? heads / ranks : (kv_replicated ? 1 : kv_heads / ranks);
  }
  //! Heads of `k` before the all-to-all: H or H_kv.
  [[nodiscard]] index_t total_heads(head_kind k) const noexcept {
    return k == head_kind::query ? heads : kv_heads;
  }
  //! First head of `k` that rank `r` holds after the all-to-all.
  [[nodiscard]] index_t first_head(head_kind k, index_t r) const noexcept {
    if (k == head_kind::key_value && kv_replicated) return r * kv_heads / ranks;
    return r * heads_per_rank(k);
  }
};

FPDT_NAMESPACE_END
