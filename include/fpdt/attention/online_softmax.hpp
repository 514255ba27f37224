//! \file
//! \brief Partial attention states (fp32 output and LSE per row) and their stable merge.
//!
//! FPDT computes attention one chunk pair at a time; each chunk kernel returns a partial state:
//! the output normalised over the keys it saw, `out [Sq, H, D]` fp32, and the natural-log
//! log-sum-exp of its scores, `lse [H, Sq]` fp32. Two partial states over disjoint key sets merge
//! exactly into the state over their union (docs/design.md 3.2; FlashAttention-2's rescaling, written
//! here in LSE form):
//!
//!     m = max(l1, l2),  l = m + log(exp(l1 - m) + exp(l2 - m)),
//!     o = o1 exp(l1 - l) + o2 exp(l2 - l),
//!
//! evaluated as e = exp(-|l1 - l2|), l = m + log1p(e), weights 1 / (1 + e) for the larger side and
//! e / (1 + e) for the smaller, so the weights depend only on the gap and stay exact to fp32
//! rounding even when |l| is large.
//!
//! A row with no visible key is (0, -inf). Merging with such a row returns the other state bit
//! for bit; merging two of them gives (0, -inf). No raw LSE is ever exponentiated, so any LSE gap
//! is stable (CASES.md A7, A9).
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"

#include <cmath>
#include <limits>

FPDT_NAMESPACE_BEGIN

//! Mutable view of a partial attention state.
struct partial_view {
  tensor_view<float, 3> out; //!< `[Sq, H, D]` fp32, normalised over the keys seen so far
  tensor_view<float, 2> lse; //!< `[H, Sq]` fp32, natural log; -inf for rows with no key yet
};

//! Read-only view of a partial attention state.
struct partial_cview {
  tensor_view<float const, 3> out; //!< `[Sq, H, D]` fp32
  tensor_view<float const, 2> lse; //!< `[H, Sq]` fp32, natural log
  //! A read-only view of `p`.
  partial_cview(partial_view const& p) noexcept : out(p.out), lse(p.lse) {}
  //! A view of the given tensors.
  partial_cview(tensor_view<float const, 3> o, tensor_view<float const, 2> l) noexcept
      : out(o), lse(l) {}
};

//! Checks that `p` is a partial state: `out [Sq, H, D]` and `lse [H, Sq]` agree.
//! Errors: `errc::shape_mismatch` naming both shapes.
template <class P> [[nodiscard]] status check_partial(P const& p, char const* name) {
  if (p.lse.extent(0) != p.out.extent(1) || p.lse.extent(1) != p.out.extent(0))
    return make_error(errc::shape_mismatch, name, ": lse must be [H, Sq] = [", p.out.extent(1),
                      ", ", p.out.extent(0), "] for out [Sq, H, D] = [", p.out.extent(0), ", ",
                      p.out.extent(1), ", ", p.out.extent(2), "], got [", p.lse.extent(0), ", ",
                      p.lse.extent(1), "]");
  return {};
}

//! Merges one row: (o1[0..d), l1) <- merge((o1, l1), (o2, l2)). `o1` and `o2` step by `stride`.
FPDT_HOST_DEVICE inline void merge_row(float* o1, float& l1, float const* o2, float l2, index_t d,
                                       index_t stride1 = 1, index_t stride2 = 1) noexcept {
  constexpr float ninf = FPDT_BIT_CAST(float, 0xff800000u); // -inf, also in device code
  if (l2 == ninf) { // other side empty: keep ours bit for bit (and (0, -inf) stays (0, -inf))
    if (l1 == ninf)
      for (index_t i = 0; i < d; ++i) o1[i * stride1] = 0.0f;
    return;
  }
  if (l1 == ninf) { // our side empty: take theirs bit for bit
    for (index_t i = 0; i < d; ++i) o1[i * stride1] = o2[i * stride2];
    l1 = l2;
    return;
  }
  // Weights from the gap alone (a logistic split), not exp(l_i - l): at |lse| ~ 1e4 the rounding
  // of l would otherwise cost ~1e-3 relative in the weights.
  bool const first_larger = l1 >= l2;
  float const m = first_larger ? l1 : l2;
  float const e = std::exp(first_larger ? l2 - l1 : l1 - l2); // in [0, 1]
  float const w_large = 1.0f / (1.0f + e);
  float const w_small = e * w_large;
  float const l = m + std::log1p(e);
  float const w1 = first_larger ? w_large : w_small;
  float const w2 = first_larger ? w_small : w_large;
  for (index_t i = 0; i < d; ++i) o1[i * stride1] = o1[i * stride1] * w1 + o2[i * stride2] * w2;
  l1 = l;
}

//! Absorbs an attention sink into one finalized row: the sink is one more key with logit `sink`
//! and value 0 (GPT-OSS's per-head sink), i.e. a merge with the state (0, sink), so
//! lse = log(exp(lse) + exp(sink)) and out scales by exp(lse_old - lse). A sink of -inf changes
//! nothing; a row with no visible key becomes (0, sink). `o` steps by `stride`.
FPDT_HOST_DEVICE inline void absorb_sink(float* o, float& l, float sink, index_t d, index_t stride = 1) noexcept {
  float const zero = 0.0f;
  merge_row(o, l, &zero, sink, d, stride, 0);
}

//! The gradient of one row's attention sink: dL/dsink = -exp(sink - lse) * delta, with lse the
//! row's LSE including the sink and delta = rowsum(dout * out) (the sink's value is 0, so its
//! score gradient is p_sink (0 - delta)). 0 for a sink of -inf.
FPDT_HOST_DEVICE inline float sink_gradient(float sink, float lse, float delta) noexcept {
  constexpr float ninf = FPDT_BIT_CAST(float, 0xff800000u);
  return sink == ninf ? 0.0f : -std::exp(sink - lse) * delta;
}

//! Merges `other` into `acc` row by row (every (token, head) row of `[Sq, H, D]`).
//!
//! Errors: `errc::shape_mismatch` naming the shapes when the two states differ in shape or a
//! state's lse does not match its out. `acc` is unchanged on error.
[[nodiscard]] inline status merge_partials(partial_view const& acc, partial_cview const& other) {
  FPDT_TRY(check_partial(acc, "merge_partials: accumulator"));
  FPDT_TRY(check_partial(other, "merge_partials: other"));
  for (std::size_t dim = 0; dim < 3; ++dim)
    if (acc.out.extent(dim) != other.out.extent(dim))
      return make_error(errc::shape_mismatch, "merge_partials: accumulator out ",
                        detail::shape_string(acc.out.extents()), " and other out ",
                        detail::shape_string(other.out.extents()), " differ");
  index_t const sq = acc.out.extent(0), h = acc.out.extent(1), d = acc.out.extent(2);
  for (index_t s = 0; s < sq; ++s)
    for (index_t hh = 0; hh < h; ++hh)
      merge_row(&acc.out(s, hh, 0), acc.lse(hh, s), &other.out(s, hh, 0), other.lse(hh, s), d,
                acc.out.stride(2), other.out.stride(2));
  return {};
}

//! Sets `p` to the empty state: out = 0, lse = -inf (the identity of the merge).
inline void reset_partial(partial_view const& p) noexcept {
  for (index_t s = 0; s < p.out.extent(0); ++s)
    for (index_t h = 0; h < p.out.extent(1); ++h)
      for (index_t i = 0; i < p.out.extent(2); ++i) p.out(s, h, i) = 0.0f;
  for (index_t h = 0; h < p.lse.extent(0); ++h)
    for (index_t s = 0; s < p.lse.extent(1); ++s)
      p.lse(h, s) = -std::numeric_limits<float>::infinity();
}

FPDT_NAMESPACE_END
