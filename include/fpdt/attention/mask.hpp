//! \file
//! \brief `attention_mask`: which keys a query may see, as data, by global token position.
//!
//! docs/design.md 3.4: masks are by global position: causal alignment makes the key at position
//! p_k visible to the query at p_q iff p_k <= p_q. A sliding window (the flash-attention
//! convention, `window_size = (left, right)`) further limits the keys to
//! p_q - left <= p_k <= p_q + right; Mistral's `sliding_window = W` is left = W - 1 with causal.
//! Packed documents (the cu_seqlens convention of flash-attention's varlen API) further limit a
//! query to the keys of its own document. A chunk kernel receives the global offsets of its query
//! and key ranges and asks the mask for each query's visible key range. Every mask is one
//! contiguous range of keys per query that contains the query itself, so kernels skip whole
//! tiles outside it and the schedule skips whole chunk pairs (`visible_pairs`).
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

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

//! A window extent that does not limit the keys.
inline constexpr index_t unbounded_window = -1;

//! Half-open range [begin, end) of global key positions.
struct key_range {
  index_t begin; //!< first visible position
  index_t end;   //!< one past the last visible position
};

//! An attention mask; a small value passed to chunk kernels. Positions are global token indices
//! (>= 0). Check one with `check_mask` before use: windows are `unbounded_window` or >= 0.
struct attention_mask {
  mask_kind kind = mask_kind::full; //!< which rule applies
  //! Keys at most this many positions before the query are visible (0: none before it), or
  //! `unbounded_window`.
  index_t window_left = unbounded_window;
  //! Full masks: keys at most this many positions after the query are visible, or
  //! `unbounded_window`. Causal masks: must be `unbounded_window` or 0 (nothing after is visible).
  index_t window_right = unbounded_window;
  //! Packed documents: `documents + 1` nondecreasing global offsets, 0 first and S last (the
  //! cu_seqlens convention; document d holds positions [offsets[d], offsets[d + 1]), and may be
  //! empty); a query sees only keys of its own document. Null with `documents` = 0: one document.
  //! Not owned: it must stay valid, and be readable where the kernel runs, while the mask is
  //! used (the layers and `attention_problem` keep a copy of their own).
  index_t const* document_offsets = nullptr;
  index_t documents = 0; //!< number of documents (0: no document mask)

  //! The document holding global position `q_pos` (0 <= q_pos < S): [begin, end). O(log documents).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr key_range document_of(index_t q_pos) const noexcept {
    index_t lo = 0, hi = documents; // offsets[lo] <= q_pos < offsets[hi]: the last such lo
    while (hi - lo > 1) {
      index_t const mid = lo + (hi - lo) / 2;
      if (document_offsets[mid] <= q_pos) lo = mid;
      else hi = mid;
    }
    return {document_offsets[lo], document_offsets[lo + 1]};
  }

  //! Global key positions visible to the query at global position `q_pos` (>= 0): [begin, end).
  [[nodiscard]] FPDT_HOST_DEVICE constexpr key_range visible_keys(index_t q_pos) const noexcept {
    constexpr index_t hi = 0x7fffffffffffffff; // numeric_limits is not callable on the device
    constexpr index_t lo = -hi - 1;
    index_t b = window_left >= 0 ? q_pos - window_left : lo;
    index_t e = hi;
    if (kind == mask_kind::causal) e = q_pos + 1;
    else if (window_right >= 0 && window_right < hi - q_pos) e = q_pos + window_right + 1;
    if (documents > 0) {
      key_range const d = document_of(q_pos);
      b = b > d.begin ? b : d.begin;
      e = e < d.end ? e : d.end;
    }
    return {b, e};
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

  //! True when the mask limits keys by distance or document (a window or documents), beyond
  //! the plain full or causal rule: what kernels without window support refuse, and what needs
  //! the chunk size to price or skip chunk pairs.
  [[nodiscard]] FPDT_HOST_DEVICE constexpr bool limits_by_position() const noexcept {
    return window_left != unbounded_window || documents > 0 ||
           (kind == mask_kind::full && window_right != unbounded_window);
  }

  //! The same mask for a sequence of `sequence` tokens with one spelling per meaning: a full
  //! mask with right extent 0 is causal; a causal right extent (0 or unbounded) and any extent
  //! >= S - 1 (which reaches every key) become `unbounded_window`. Two masks without documents
  //! that see the same keys at every position compare equal field by field after this. With
  //! documents it is a sufficient test, not a necessary one (a window wider than every document
  //! is no window), and offsets compare by pointer: compare their values separately.
  [[nodiscard]] constexpr attention_mask canonical(index_t sequence) const noexcept {
    attention_mask m = *this;
    if (m.kind == mask_kind::full && m.window_right == 0) m.kind = mask_kind::causal;
    if (m.kind == mask_kind::causal || m.window_right >= sequence - 1) m.window_right = unbounded_window;
    if (m.window_left >= sequence - 1) m.window_left = unbounded_window;
    return m;
  }

  //! Number of visible (query, key) pairs among the `sq` queries from global position `q_begin`
  //! and the `sk` keys from `k_begin`, in O(1) without documents: the pairs with p_k - p_q in the band
  //! [-window_left, right] (right = 0 when causal). A double, exact below 2^53 pairs; for
  //! pricing and for skipping empty chunk pairs.
  //! With documents, the sum of that count over the documents the query range meets (O(those
  //! documents)); positions must lie in [0, S).
  [[nodiscard]] constexpr double visible_pairs(index_t q_begin, index_t sq, index_t k_begin,
                                               index_t sk) const noexcept {
    if (sq <= 0 || sk <= 0) return 0;
    if (documents == 0) return band_pairs(q_begin, sq, k_begin, sk);
    double n = 0;
    for (index_t at = q_begin; at < q_begin + sq;) { // a document per step: the one holding `at`
      key_range const d = document_of(at);
      if (d.end <= at) break; // past the last document
      auto clip = [&d](index_t b, index_t s) {
        return key_range{b > d.begin ? b : d.begin, b + s < d.end ? b + s : d.end};
      };
      key_range const q = clip(q_begin, sq), k = clip(k_begin, sk);
      n += band_pairs(q.begin, q.end - q.begin, k.begin, k.end - k.begin);
      at = d.end;
    }
    return n;
  }

private:
  // visible_pairs of the band alone (no documents).
  [[nodiscard]] constexpr double band_pairs(index_t q_begin, index_t sq, index_t k_begin,
                                            index_t sk) const noexcept {
    if (sq <= 0 || sk <= 0) return 0;
    // Pairs with p_k - p_q <= t.
    auto at_most = [&](index_t t) -> double {
      // Per query p_q the count is clamp(p_q + t - k_begin + 1, 0, sk); sum over the x = that
      // argument's sq consecutive values, P(b) = sum of clamp(x, 0, n) over x < b.
      index_t const lo_t = k_begin - (q_begin + sq); // every count is 0 at or below this
      index_t const hi_t = k_begin + sk - q_begin;   // every count is sk at or above this
      if (t <= lo_t) return 0;
      if (t >= hi_t) return static_cast<double>(sq) * static_cast<double>(sk);
      double const n = static_cast<double>(sk);
      auto prefix = [n](double b) {
        if (b <= 0) return 0.0;
        if (b <= n + 1) return b * (b - 1) / 2;
        return n * (n + 1) / 2 + (b - n - 1) * n;
      };
      double const x0 = static_cast<double>(q_begin + t - k_begin + 1);
      return prefix(x0 + static_cast<double>(sq)) - prefix(x0);
    };
    // Beyond any key-query distance in range (a window at least this wide is unbounded here).
    index_t const far = q_begin + sq - k_begin > k_begin + sk - q_begin ? q_begin + sq - k_begin : k_begin + sk - q_begin;
    index_t const big = far + 1;
    index_t const right = kind == mask_kind::causal ? 0 : (window_right >= 0 && window_right < big ? window_right : big);
    index_t const left = window_left >= 0 && window_left < big ? window_left : big;
    return at_most(right) - at_most(-left - 1);
  }
};

//! Bidirectional attention.
inline constexpr attention_mask full_mask{mask_kind::full};
//! Causal attention by global position.
inline constexpr attention_mask causal_mask{mask_kind::causal};

//! A causal sliding window of `window` (>= 1) tokens: each query sees itself and the
//! `window - 1` keys before it (Mistral's and Gemma's `sliding_window`). A window below 1 gives
//! a mask `check_mask` refuses (naming it), not an unbounded one.
[[nodiscard]] constexpr attention_mask causal_window_mask(index_t window) noexcept {
  return {mask_kind::causal, window >= 1 ? window - 1 : unbounded_window - 1, unbounded_window};
}

//! Describes a mask: "causal", "full", "causal, window (1023, 0)", "full, window (64, 64)",
//! "causal, 12 documents".
[[nodiscard]] inline std::string to_string(attention_mask const& m) {
  std::string s(to_string(m.kind));
  auto side = [](index_t w) { return w == unbounded_window ? std::string("inf") : std::to_string(w); };
  if (m.window_left != unbounded_window || m.window_right != unbounded_window)
    s += ", window (" + side(m.window_left) + ", " + side(m.kind == mask_kind::causal ? 0 : m.window_right) + ")";
  if (m.documents > 0) s += ", " + std::to_string(m.documents) + " documents";
  return s;
}

//! Checks a mask's values (not the document offsets it points to: see `check_documents`): `kind`
//! is full or causal; each window extent is `unbounded_window` or >= 0; a causal mask's
//! `window_right` is `unbounded_window` or 0; `documents` >= 0, with offsets when > 0. Errors:
//! `errc::invalid_argument` naming the value and the rule, prefixed with `who`.
[[nodiscard]] inline status check_mask(attention_mask const& m, std::string_view who = "attention_mask") {
  if (m.kind != mask_kind::full && m.kind != mask_kind::causal)
    return make_error(errc::invalid_argument, who, ": mask kind ", static_cast<int>(m.kind),
                      " is neither full (0) nor causal (1)");
  if (m.window_left < unbounded_window || m.window_right < unbounded_window)
    return make_error(errc::invalid_argument, who, ": window (", m.window_left, ", ", m.window_right,
                      "): each extent must be >= 0 or unbounded_window (-1)");
  if (m.kind == mask_kind::causal && m.window_right > 0)
    return make_error(errc::invalid_argument, who, ": a causal mask sees no key after the query, but its "
                      "window_right = ", m.window_right, " (use 0 or unbounded_window, or a full mask)");
  if (m.documents < 0 || (m.documents > 0 && m.document_offsets == nullptr))
    return make_error(errc::invalid_argument, who, ": documents = ", m.documents,
                      m.documents > 0 ? " with no document_offsets" : "", ": must be >= 0, with documents + 1 offsets");
  return {};
}

//! Checks a mask's document offsets, in host memory, against a sequence of `sequence` tokens:
//! `check_mask`, then offsets[0] = 0, each offset >= the one before (a document of length 0 is
//! legal), and the last = S. Errors: `errc::invalid_argument` naming the offending index and
//! values, prefixed with `who`.
[[nodiscard]] inline status check_documents(attention_mask const& m, index_t sequence,
                                            std::string_view who = "attention_mask") {
  FPDT_TRY(check_mask(m, who));
  if (m.documents == 0) return {};
  index_t const* o = m.document_offsets;
  if (o[0] != 0)
    return make_error(errc::invalid_argument, who, ": document_offsets[0] = ", o[0], " must be 0 (cu_seqlens)");
  for (index_t d = 0; d < m.documents; ++d)
    if (o[d + 1] < o[d])
      return make_error(errc::invalid_argument, who, ": document ", d, " has a negative length: offsets[", d,
                        "] = ", o[d], " > offsets[", d + 1, "] = ", o[d + 1]);
  if (o[m.documents] != sequence)
    return make_error(errc::invalid_argument, who, ": the ", m.documents, " documents hold ", o[m.documents],
                      " tokens, not S = ", sequence, " (the last offset must be S)");
  return {};
}

//! The cu_seqlens offsets of documents of the given lengths: `[0, l0, l0 + l1, ...]`
//! (`lengths.size() + 1` values). Errors: `errc::invalid_argument` naming a negative length, or
//! a total beyond 2^62.
[[nodiscard]] inline result<std::vector<index_t>> document_offsets_from_lengths(std::span<index_t const> lengths) {
  std::vector<index_t> o(lengths.size() + 1, 0);
  for (std::size_t d = 0; d < lengths.size(); ++d) {
    if (lengths[d] < 0)
      return make_error(errc::invalid_argument, "document_offsets_from_lengths: document ", d, " has length ",
                        lengths[d], " (lengths must be >= 0)");
    if (lengths[d] > (index_t{1} << 62) - o[d])
      return make_error(errc::invalid_argument, "document_offsets_from_lengths: the lengths sum beyond 2^62");
    o[d + 1] = o[d] + lengths[d];
  }
  return o;
}

//! `base` with the document mask of `offsets` (cu_seqlens, `offsets.size() - 1` documents), which
//! must outlive the mask's uses (the layers copy it).
[[nodiscard]] inline attention_mask with_documents(attention_mask base, std::span<index_t const> offsets) noexcept {
  base.document_offsets = offsets.empty() ? nullptr : offsets.data();
  base.documents = offsets.empty() ? 0 : static_cast<index_t>(offsets.size()) - 1;
  return base;
}

FPDT_NAMESPACE_END
