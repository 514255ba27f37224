//! \file
//! \brief Ulysses all-to-all for one chunk, with grouped-query attention: sequence-sharded
//! `[C/P, H, D]` to head-sharded `[C, H/P, D]` and back.
//!
//! docs/design.md 2.1, 3.5; DeepSpeed-Ulysses (Jacobs et al., arXiv 2309.14509) and FPDT (Yao et al.,
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
#include "../core/dtype.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../schedule/ulysses_layout.hpp"
#include "communicator.hpp"

#include <cstddef>
#include <concepts>
#include <cstdint>
#include <type_traits>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! A communicator whose all-to-all is ordered on a device stream, for
//! `sequence_parallel_attention` on a device backend: `nccl_communicator` (with `Stream` =
//! `fpdt::cuda::stream`), or a user's type with the same members:
//! - `rank()`, `size()`;
//! - `all_to_all(send, recv, count_per_rank, dtype, stream.native_handle())` returning `status`:
//!   enqueues, on the stream, the exchange of `count_per_rank` elements of `dtype` with every rank
//!   (block r of `send` to rank r, block r of `recv` from rank r); argument errors are returned
//!   before anything is enqueued. Calls are matched across ranks by their order (no tags).
template <class C, class Stream>
concept stream_communicator =
    requires(C& c, void const* send, void* recv, std::size_t n, dtype t, Stream& st) {
      { c.rank() } -> std::convertible_to<int>;
      { c.size() } -> std::convertible_to<int>;
      { c.all_to_all(send, recv, n, t, st.native_handle()) } -> std::same_as<status>;
    };

//! Where the P blocks of one Ulysses all-to-all sit in a `[rows, heads, D]` view (docs/design.md 3.5):
//! block r (the part sent to, or received from, rank r) covers rows [row0(r), row0(r) + rows) and
//! heads [head0(r), head0(r) + heads), all of D; in the send and receive buffers the blocks are
//! contiguous `[P][rows][heads][D]`. `local_side` describes the sequence-sharded `[C/P, H or H_kv,
//! D]` view, `head_side` the head-sharded `[C, H/P or H_kv/P or 1, D]` one: `seq_to_head` packs the
//! local side and unpacks the head side, `head_to_seq` the reverse.
struct ulysses_blocks {
  index_t ranks = 1;    //!< P
  index_t rows = 0;     //!< rows of one block
  index_t heads = 0;    //!< heads of one block
  index_t row_step = 0; //!< row0(r) = r * row_step
  index_t head_num = 0; //!< head0(r) = r * head_num / head_den
  index_t head_den = 1; //!< (see head_num)
  //! Unpacking: blocks that land on the same elements (replicated key/value heads) are summed,
  //! in rank order (the first is assigned, the others added in fp32).
  bool add = false;

  //! First row of block r.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t row0(index_t r) const noexcept { return r * row_step; }
  //! First head of block r.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t head0(index_t r) const noexcept {
    return r * head_num / head_den;
  }
  //! Elements of one block.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t block_size(index_t d) const noexcept { return rows * heads * d; }

  //! The blocks of the local (sequence-sharded) view `[C/P, H or H_kv, D]`: block r holds this
  //! rank's tokens for rank r's heads.
  [[nodiscard]] static ulysses_blocks local_side(ulysses_layout const& l, head_kind k) noexcept {
    bool const rep = k == head_kind::key_value && l.kv_replicated;
    index_t const hr = l.heads_per_rank(k);
    return {l.ranks, l.piece(), hr, 0, rep ? l.kv_heads : hr, rep ? l.ranks : 1, rep};
  }
  //! The blocks of the head-sharded view `[C, H/P or H_kv/P or 1, D]`: block r holds rank r's
  //! tokens of the chunk (rows [r C/P, (r + 1) C/P)) for this rank's heads.
  [[nodiscard]] static ulysses_blocks head_side(ulysses_layout const& l, head_kind k) noexcept {
    return {l.ranks, l.piece(), l.heads_per_rank(k), l.piece(), 0, 1, false};
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
// send[r][s][h][x] = v(m.row0(r) + s, m.head0(r) + h, x) for every block r.
template <class V, class T> void pack(V const& v, T* send, ulysses_blocks const& m) {
  for (index_t r = 0; r < m.ranks; ++r)
    for (index_t s = 0; s < m.rows; ++s)
      for (index_t h = 0; h < m.heads; ++h)
        for (index_t x = 0; x < v.extent(2); ++x)
          *send++ = v(m.row0(r) + s, m.head0(r) + h, x);
}
// The inverse: v(m.row0(r) + s, m.head0(r) + h, x) = recv[r][s][h][x]; with m.add, a block that
// lands where the previous one did is added (in fp32) instead.
template <class V, class T> void unpack(T const* recv, V const& v, ulysses_blocks const& m) {
  for (index_t r = 0; r < m.ranks; ++r) {
    bool const add = m.add && r > 0 && m.head0(r) == m.head0(r - 1) && m.row0(r) == m.row0(r - 1);
    for (index_t s = 0; s < m.rows; ++s)
      for (index_t h = 0; h < m.heads; ++h)
        for (index_t x = 0; x < v.extent(2); ++x, ++recv) {
          auto& dst = v(m.row0(r) + s, m.head0(r) + h, x);
          dst = add ? static_cast<T>(static_cast<float>(dst) + static_cast<float>(*recv)) : *recv;
        }
  }
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
  detail::ulysses::pack(local, send.data(), ulysses_blocks::local_side(l, kind));
  FPDT_TRY(comm.all_to_all(send.data(), recv.data(), block * sizeof(T), tag));
  detail::ulysses::unpack(recv.data(), out, ulysses_blocks::head_side(l, kind));
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
  detail::ulysses::pack(in, send.data(), ulysses_blocks::head_side(l, kind));
  FPDT_TRY(comm.all_to_all(send.data(), recv.data(), block * sizeof(T), tag));
  // Replicas of a key/value head (P > H_kv) are summed in rank order.
  detail::ulysses::unpack(recv.data(), local, ulysses_blocks::local_side(l, kind));
  return {};
}

FPDT_NAMESPACE_END
