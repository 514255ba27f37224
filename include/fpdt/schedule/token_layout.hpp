//! \file
//! \brief `token_layout`: FPDT's chunk-interleaved token layout, its permutation and its inverse.
//!
//! docs/design.md 2.1: the global sequence of S tokens is cut into pieces of C/P tokens (C the global
//! chunk, P the sequence-parallel world size). Rank r holds pieces r, r+P, r+2P, ... in that
//! order, so its local sequence has S/P tokens and u = S/C local chunks of C/P tokens each. Local
//! chunk j of rank r is global piece j*P + r, i.e. the global tokens
//!
//!     [j*C + r*C/P, j*C + (r+1)*C/P).
//!
//! When every rank sends its local chunk j through the Ulysses all-to-all, the pieces arrive in
//! rank order, so every rank receives exactly the global tokens [j*C, (j+1)*C) in order (for its
//! H/P heads), and causal masking between chunks is by chunk index alone.
//!
//! Example, S = 16, P = 2, C = 8 (pieces of 4 tokens): rank 0 holds global tokens 0..3 and
//! 8..11, rank 1 holds 4..7 and 12..15.
//!
//! The trainer applies the permutation to everything indexed by token before the first layer:
//! hidden states or embeddings (`[S, hidden]`), labels, loss masks and position ids (`[S, 1]`),
//! with `scatter`; `gather` is the inverse. Positions for rotary embeddings are global positions
//! (`position_ids`). Shapes that do not divide (S % C, C % P) are rejected by `make` with an
//! error that names the numbers; there is no padded mode: pad the sequence to a multiple of C.
#pragma once

#include "../attention/mask.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"

#include <algorithm>
#include <array>
#include <span>
#include <type_traits>
#include <utility>

FPDT_NAMESPACE_BEGIN

//! The chunk-interleaved token layout of S tokens over P ranks with global chunk C (docs/design.md 2.1).
//!
//! A small value (three integers), trivially copyable into kernels. Build it with `make`, which
//! checks S % C == 0 and C % P == 0; every other member relies on those invariants. All counts
//! are in tokens.
class token_layout {
public:
  //! The trivial layout S = P = C = 1 (one token, one rank, one chunk); use `make` for real ones.
  constexpr token_layout() noexcept = default;

  //! Builds the layout of `S` tokens over `P` ranks with global chunk `C`.
  //!
  //! \param S global sequence length in tokens, > 0.
  //! \param P sequence-parallel world size (number of ranks), > 0.
  //! \param C global chunk in tokens, > 0; S must be a multiple of C and C a multiple of P, so
  //!          each rank holds C/P tokens of every chunk and S/P tokens in all.
  //! Errors: `errc::invalid_argument` naming the numbers and the rule they break, e.g.
  //! "S = 48 is not a multiple of the chunk C = 20", "C = 15 is not a multiple of P = 2",
  //! "S = 7 is not a multiple of P = 2", "S = 2 is smaller than P = 3", or a value <= 0.
  [[nodiscard]] static result<token_layout> make(index_t S, index_t P, index_t C) {
    if (S <= 0)
      return make_error(errc::invalid_argument, "token_layout: sequence length S = ", S,
                        " must be positive");
    if (P <= 0)
      return make_error(errc::invalid_argument, "token_layout: world size P = ", P,
                        " must be positive");
    if (C <= 0)
      return make_error(errc::invalid_argument, "token_layout: chunk C = ", C,
                        " must be positive");
    if (S < P)
      return make_error(errc::invalid_argument, "token_layout: S = ", S,
                        " is smaller than P = ", P,
                        ": some rank would hold no token (each rank holds S/P tokens)");
    if (S % P != 0)
      return make_error(errc::invalid_argument, "token_layout: S = ", S,
                        " is not a multiple of P = ", P, " (each rank holds S/P tokens; S % P = ",
                        S % P, ")");
    if (S % C != 0)
      return make_error(errc::invalid_argument, "token_layout: S = ", S,
                        " is not a multiple of the chunk C = ", C,
                        " (the sequence is cut into S/C whole chunks; S % C = ", S % C,
                        "; pad the sequence to a multiple of C)");
    if (C % P != 0)
      return make_error(errc::invalid_argument, "token_layout: C = ", C,
                        " is not a multiple of P = ", P,
                        " (each rank holds C/P tokens of every chunk; C % P = ", C % P, ")");
    token_layout l;
    l.S_ = S;
    l.P_ = P;
    l.C_ = C;
    return l;
  }

  //! Global sequence length S, in tokens.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t sequence() const noexcept { return S_; }
  //! Sequence-parallel world size P (number of ranks).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t ranks() const noexcept { return P_; }
  //! Global chunk C, in tokens (what every rank holds of one chunk after the all-to-all).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t chunk() const noexcept { return C_; }
  //! Number of chunks u = S/C (global chunks, and local chunks of every rank).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t chunks() const noexcept { return S_ / C_; }
  //! Tokens held by each rank, S/P.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t local_tokens() const noexcept { return S_ / P_; }
  //! Tokens of one piece (one rank's share of one chunk), C/P.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t piece() const noexcept { return C_ / P_; }

  //! Global position of local token `local_index` of rank `rank`.
  //!
  //! Local token l lies in local chunk j = l / (C/P), at offset k = l % (C/P) in it, and its
  //! global position is j*C + rank*C/P + k.
  //! Requires 0 <= rank < P and 0 <= local_index < S/P (not checked; see
  //! `checked_global_position`). The result lies in [0, S).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr index_t global_position(index_t rank,
                                                                   index_t local_index) const noexcept {
    index_t const pc = C_ / P_;
    return (local_index / pc) * C_ + rank * pc + local_index % pc;
  }

  //! Inverse of `global_position`: the (rank, local index) that holds global token `global`.
  //!
  //! Requires 0 <= global < S (not checked; see `checked_local_of`). The rank is
  //! (global % C) / (C/P) and the local index (global / C) * C/P + global % (C/P).
  [[nodiscard]] constexpr std::pair<index_t, index_t> local_of(index_t global) const noexcept {
    index_t const pc = C_ / P_;
    index_t const j = global / C_;
    index_t const in_chunk = global % C_;
    return {in_chunk / pc, j * pc + in_chunk % pc};
  }

  //! `global_position` with its arguments checked.
  //!
  //! \param rank        the rank, 0 <= rank < P.
  //! \param local_index the rank's local token, 0 <= local_index < S/P.
  //! Errors: `errc::invalid_argument` naming the value and its range.
  [[nodiscard]] result<index_t> checked_global_position(index_t rank, index_t local_index) const {
    FPDT_TRY(check_rank(rank, "token_layout::global_position"));
    if (local_index < 0 || local_index >= local_tokens())
      return make_error(errc::invalid_argument, "token_layout::global_position: local index ",
                        local_index, " of rank ", rank, " is out of range [0, S/P = ",
                        local_tokens(), ")");
    return global_position(rank, local_index);
  }

  //! `local_of` with its argument checked.
  //!
  //! \param global a global token position, 0 <= global < S.
  //! Errors: `errc::invalid_argument` naming the position and S.
  [[nodiscard]] result<std::pair<index_t, index_t>> checked_local_of(index_t global) const {
    if (global < 0 || global >= S_)
      return make_error(errc::invalid_argument, "token_layout::local_of: global position ",
                        global, " is out of range [0, S = ", S_, ")");
    return local_of(global);
  }

  //! Copies the rows of `rank`'s tokens from the global order into the rank's local order.
  //!
  //! \tparam T  element type (any copy-assignable type: float, bfloat16, index_t, ...).
  //! \param global `[S, W]`, one row per token in global order; W is any row width (the hidden
  //!               size for hidden states, 1 for labels, position ids or loss masks).
  //! \param rank   the rank whose tokens to extract, 0 <= rank < P.
  //! \param local  `[S/P, W]`, receives the rank's tokens in its local (interleaved) order:
  //!               `local(l, w) = global(global_position(rank, l), w)`. Must not overlap `global`.
  //! Errors: `errc::invalid_argument` when the rank is out of range or the views overlap;
  //! `errc::shape_mismatch` naming both shapes, S, P and the rank when the extents are not
  //! `[S, W]` and `[S/P, W]`. Nothing is written on error.
  template <class T>
  [[nodiscard]] status scatter(tensor_view<std::type_identity_t<T> const, 2> global, index_t rank,
                               tensor_view<T, 2> local) const {
    FPDT_TRY(check_rank(rank, "token_layout::scatter"));
    FPDT_TRY(check_pair(global.extents(), local.extents(), rank, "token_layout::scatter"));
    if (views_overlap(global, local))
      return make_error(errc::invalid_argument, "token_layout::scatter: rank ", rank,
                        ": the global and local views overlap");
    copy_pieces(global, rank, local, /*to_local=*/true);
    return {};
  }

  //! Copies `rank`'s local tokens back to their rows in the global order (inverse of `scatter`).
  //!
  //! Writes only the S/P rows of `global` that belong to `rank`; calling it once per rank fills
  //! all of `global`.
  //! \tparam T  element type (any copy-assignable type).
  //! \param local  `[S/P, W]`, the rank's tokens in its local (interleaved) order.
  //! \param rank   the rank the tokens belong to, 0 <= rank < P.
  //! \param global `[S, W]` in global order: `global(global_position(rank, l), w) = local(l, w)`.
  //!               Must not overlap `local`.
  //! Errors: as `scatter`. Nothing is written on error.
  template <class T>
  [[nodiscard]] status gather(tensor_view<std::type_identity_t<T> const, 2> local, index_t rank,
                              tensor_view<T, 2> global) const {
    FPDT_TRY(check_rank(rank, "token_layout::gather"));
    FPDT_TRY(check_pair(global.extents(), local.extents(), rank, "token_layout::gather"));
    if (views_overlap(local, global))
      return make_error(errc::invalid_argument, "token_layout::gather: rank ", rank,
                        ": the global and local views overlap");
    copy_pieces(local, rank, global, /*to_local=*/false);
    return {};
  }

  //! Global positions of `rank`'s local tokens, for rotary embeddings:
  //! `out(l) = global_position(rank, l)`.
  //!
  //! \param rank the rank, 0 <= rank < P.
  //! \param out  `[S/P]`, receives the positions.
  //! Errors: `errc::invalid_argument` when the rank is out of range; `errc::shape_mismatch`
  //! naming the extent, S/P and the rank. Nothing is written on error.
  [[nodiscard]] status position_ids(index_t rank, tensor_view<index_t, 1> out) const {
    FPDT_TRY(check_rank(rank, "token_layout::position_ids"));
    if (out.extent(0) != local_tokens())
      return make_error(errc::shape_mismatch, "token_layout::position_ids: rank ", rank,
                        ": out must be [S/P] = [", local_tokens(), "] (S = ", S_, ", P = ", P_,
                        "), got [", out.extent(0), "]");
    for (index_t l = 0; l < local_tokens(); ++l) out(l) = global_position(rank, l);
    return {};
  }

  //! Positions of `rank`'s local tokens within their documents, for rotary embeddings of packed
  //! documents: `out(l) = p - offsets[d]` for global position p = `global_position(rank, l)` in
  //! document d (positions restart at 0 at every document).
  //!
  //! \param offsets the documents' cu_seqlens offsets: 0 first, nondecreasing, S last (a
  //!                document of length 0 is legal).
  //! \param out     `[S/P]`, receives the positions.
  //! Errors: those of `check_documents` (naming the offending offsets) and of `position_ids`.
  //! Nothing is written on error.
  [[nodiscard]] status document_position_ids(index_t rank, std::span<index_t const> offsets,
                                             tensor_view<index_t, 1> out) const {
    attention_mask const m = with_documents(causal_mask, offsets);
    FPDT_TRY(check_documents_given(m, "token_layout::document_position_ids"));
    FPDT_TRY(position_ids(rank, out));
    for (index_t l = 0; l < local_tokens(); ++l) out(l) -= m.document_of(out(l)).begin;
    return {};
  }

  //! Sets the next-token label of every document's last token to `ignore_index` among `rank`'s
  //! local labels (that token's next token belongs to the next document). Labels are those of
  //! the local tokens in this layout (`scatter` of the global ones); the others are unchanged.
  //!
  //! \param offsets      cu_seqlens offsets, as in `document_position_ids`.
  //! \param labels       `[S/P]` (any integer type), changed in place.
  //! Errors: as `document_position_ids`. Nothing is written on error.
  template <class Label>
  [[nodiscard]] status mask_document_ends(index_t rank, std::span<index_t const> offsets,
                                          tensor_view<Label, 1> labels, Label ignore_index) const {
    attention_mask const m = with_documents(causal_mask, offsets);
    FPDT_TRY(check_documents_given(m, "token_layout::mask_document_ends"));
    FPDT_TRY(check_rank(rank, "token_layout::mask_document_ends"));
    if (labels.extent(0) != local_tokens())
      return make_error(errc::shape_mismatch, "token_layout::mask_document_ends: rank ", rank,
                        ": labels must be [S/P] = [", local_tokens(), "], got [", labels.extent(0), "]");
    for (index_t l = 0; l < local_tokens(); ++l) {
      index_t const p = global_position(rank, l);
      if (m.document_of(p).end == p + 1) labels(l) = ignore_index;
    }
    return {};
  }

  //! True when both layouts have the same S, P and C.
  friend constexpr bool operator==(token_layout const&, token_layout const&) noexcept = default;

private:
  [[nodiscard]] status check_documents_given(attention_mask const& m, char const* what) const {
    if (m.documents < 1)
      return make_error(errc::invalid_argument, what, ": offsets must hold at least 2 values (0 and S = ", S_, ")");
    return check_documents(m, S_, what);
  }
  [[nodiscard]] status check_rank(index_t rank, char const* what) const {
    if (rank < 0 || rank >= P_)
      return make_error(errc::invalid_argument, what, ": rank ", rank,
                        " is out of range [0, P = ", P_, ")");
    return {};
  }

  [[nodiscard]] status check_pair(std::array<index_t, 2> const& global,
                                  std::array<index_t, 2> const& local, index_t rank,
                                  char const* what) const {
    if (global[0] != S_ || local[0] != local_tokens() || global[1] != local[1])
      return make_error(errc::shape_mismatch, what, ": rank ", rank, ": global must be [S, W] = [",
                        S_, ", W] and local [S/P, W] = [", local_tokens(),
                        ", W] with the same W (S = ", S_, ", P = ", P_, "), got global ",
                        detail::shape_string(global), " and local ", detail::shape_string(local));
    return {};
  }

  // Copies piece by piece: local rows [j*C/P, (j+1)*C/P) <-> global rows
  // [j*C + rank*C/P, j*C + (rank+1)*C/P), in the direction `to_local` says.
  template <class Src, class Dst>
  void copy_pieces(tensor_view<Src, 2> const& src, index_t rank, tensor_view<Dst, 2> const& dst,
                   bool to_local) const {
    index_t const pc = piece();
    index_t const w = src.extent(1);
    if (w == 0) return; // nothing to copy (and the data pointers may be null)
    for (index_t j = 0; j < chunks(); ++j) {
      index_t const g0 = j * C_ + rank * pc;
      index_t const l0 = j * pc;
      index_t const s0 = to_local ? g0 : l0;
      index_t const d0 = to_local ? l0 : g0;
      for (index_t k = 0; k < pc; ++k) {
        Src* s = src.data() + (s0 + k) * src.stride(0);
        Dst* d = dst.data() + (d0 + k) * dst.stride(0);
        if (src.stride(1) == 1 && dst.stride(1) == 1) {
          std::copy_n(s, w, d);
        } else {
          for (index_t c = 0; c < w; ++c) d[c * dst.stride(1)] = s[c * src.stride(1)];
        }
      }
    }
  }

  index_t S_ = 1;
  index_t P_ = 1;
  index_t C_ = 1;
};

FPDT_NAMESPACE_END
