//! \file
//! \brief Ulysses all-to-all for one chunk, with grouped-query attention: sequence-sharded
//! `[C/P, H, D]` to head-sharded `[C, H/P, D]` and back.
//!
//! DESIGN.md 2.1, 2.5; DeepSpeed-Ulysses (Jacobs et al., arXiv 2309.14509) and FPDT (Yao et al.,
//! arXiv 2408.16978) section 3. Rank r holds piece r of every global chunk (the chunk-interleaved
//! layout of schedule/token_layout.hpp), so after `seq_to_head` of local chunk j every rank holds
//! the global tokens [jC, (j+1)C) in order, for its heads:
//! - query heads: rank r gets heads [r H/P, (r+1) H/P);
//! - key/value heads with H_kv % P == 0: sharded the same way, H_kv/P per rank;
//! - key/value heads with P % H_kv == 0 (H_kv < P): rank r gets the one key/value head its query
//!   heads use, r H_kv / P (grouped order), replicated on P/H_kv ranks; `head_to_seq` of the
//!   gradients of such heads sums the replicas;
//! - anything else is rejected, naming H, H_kv and P.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "communicator.hpp"

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

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

namespace detail::ulysses {
template <class V, class T>
[[nodiscard]] status check(char const* who, V const& v, index_t rows, index_t heads, index_t d,
                           char const* name) {
  if (v.extent(0) != rows || v.extent(1) != heads || v.extent(2) != d)
    return make_error(errc::shape_mismatch, "ulysses ", who, ": ", name, " ",
                      detail::shape_string(v.extents()), " must be [", rows, ", ", heads, ", ", d, "]");
  return {};
}
// Copies the block v(row0 + s, h0 + h, x), s < rows, h < heads, into `out` in that order.
template <class V, class T>
T* gather_block(V const& v, index_t row0, index_t h0, index_t rows, index_t heads, T* out) {
  for (index_t s = 0; s < rows; ++s)
    for (index_t h = 0; h < heads; ++h)
      for (index_t x = 0; x < v.extent(2); ++x)
        *out++ = v(row0 + s, h0 + h, x);
  return out;
}
// The inverse: writes (or, with `add`, adds in fp32) the sequential `in` into the block.
template <class V, class T>
void scatter_block(T const* in, V const& v, index_t row0, index_t h0, index_t rows, index_t heads,
                   bool add) {
  for (index_t s = 0; s < rows; ++s)
    for (index_t h = 0; h < heads; ++h)
      for (index_t x = 0; x < v.extent(2); ++x, ++in)
        v(row0 + s, h0 + h, x) =
            add ? static_cast<T>(static_cast<float>(v(row0 + s, h0 + h, x)) + static_cast<float>(*in)) : *in;
}
} // namespace detail::ulysses

//! Sequence-sharded to head-sharded: `local [C/P, H or H_kv, D]` (this rank's piece of a chunk)
//! to `out [C, H/P or H_kv/P or 1, D]` (the whole chunk, this rank's heads).
//!
//! \param comm communicator of the P ranks (rank() = this rank)
//! \param tag  operation tag (see `communicator`)
//! Errors: `errc::shape_mismatch` naming the views; `errc::invalid_argument` when the
//! communicator's size is not P; the communicator's errors. `out` is untouched on a shape error.
template <class T, communicator Comm>
[[nodiscard]] status seq_to_head(Comm& comm, ulysses_layout const& l, head_kind kind,
                                 tensor_view<T const, 3> const& local, tensor_view<T, 3> const& out,
                                 std::uint64_t tag) {
  index_t const p = l.ranks, pc = l.piece(), hr = l.heads_per_rank(kind), d = l.head_dim;
  if (comm.size() != p)
    return make_error(errc::invalid_argument, "ulysses seq_to_head: the communicator has ",
                      comm.size(), " ranks but the layout P = ", p);
  FPDT_TRY((detail::ulysses::check<decltype(local), T>("seq_to_head", local, pc, l.total_heads(kind), d, "local")));
  FPDT_TRY((detail::ulysses::check<decltype(out), T>("seq_to_head", out, l.chunk, hr, d, "out")));
  std::size_t const block = static_cast<std::size_t>(pc * hr * d);
  std::vector<T> send(block * static_cast<std::size_t>(p)), recv(send.size());
  for (index_t r = 0; r < p; ++r) // block r: this rank's tokens, rank r's heads
    detail::ulysses::gather_block(local, 0, l.first_head(kind, r), pc, hr,
                                  send.data() + static_cast<std::size_t>(r) * block);
  FPDT_TRY(comm.all_to_all(send.data(), recv.data(), block * sizeof(T), tag));
  for (index_t r = 0; r < p; ++r) // block r: rank r's tokens, this rank's heads
    detail::ulysses::scatter_block(recv.data() + static_cast<std::size_t>(r) * block, out, r * pc, 0,
                                   pc, hr, false);
  return {};
}

//! Head-sharded to sequence-sharded: `in [C, H/P or H_kv/P or 1, D]` to
//! `local [C/P, H or H_kv, D]`, the inverse of `seq_to_head`. For replicated key/value heads
//! (gradients dk, dv) the P/H_kv replicas of each head are summed, in rank order.
//! Errors: as `seq_to_head`.
template <class T, communicator Comm>
[[nodiscard]] status head_to_seq(Comm& comm, ulysses_layout const& l, head_kind kind,
                                 tensor_view<T const, 3> const& in, tensor_view<T, 3> const& local,
                                 std::uint64_t tag) {
  index_t const p = l.ranks, pc = l.piece(), hr = l.heads_per_rank(kind), d = l.head_dim;
  if (comm.size() != p)
    return make_error(errc::invalid_argument, "ulysses head_to_seq: the communicator has ",
                      comm.size(), " ranks but the layout P = ", p);
  FPDT_TRY((detail::ulysses::check<decltype(in), T>("head_to_seq", in, l.chunk, hr, d, "in")));
  FPDT_TRY((detail::ulysses::check<decltype(local), T>("head_to_seq", local, pc, l.total_heads(kind), d, "local")));
  std::size_t const block = static_cast<std::size_t>(pc * hr * d);
  std::vector<T> send(block * static_cast<std::size_t>(p)), recv(send.size());
  for (index_t r = 0; r < p; ++r) // block r: rank r's tokens, this rank's heads
    detail::ulysses::gather_block(in, r * pc, 0, pc, hr, send.data() + static_cast<std::size_t>(r) * block);
  FPDT_TRY(comm.all_to_all(send.data(), recv.data(), block * sizeof(T), tag));
  bool const sum = kind == head_kind::key_value && l.kv_replicated;
  if (sum) // replicas of a key/value head are added up, in rank order
    for (index_t s = 0; s < pc; ++s)
      for (index_t h = 0; h < l.kv_heads; ++h)
        for (index_t x = 0; x < d; ++x)
          local(s, h, x) = T(0);
  for (index_t r = 0; r < p; ++r) // block r: this rank's tokens, rank r's heads
    detail::ulysses::scatter_block(recv.data() + static_cast<std::size_t>(r) * block, local, 0,
                                   l.first_head(kind, r), pc, hr, sum);
  return {};
}

FPDT_NAMESPACE_END
