//! \file
//! \brief Checks shared by the chunked layers (chunked_mlp, chunked_cross_entropy): a 2-D view as
//! a GEMM operand (row-major, unit column stride), 1-D parameter views, and no overlap between
//! what a pass writes and what it reads. Not part of the public API.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../../memory/device_arena.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

FPDT_NAMESPACE_BEGIN

namespace detail::chunked {

//! `b` bytes as the arena reserves them.
[[nodiscard]] constexpr std::size_t rounded(std::size_t b) noexcept { return device_arena::rounded_size(b); }

//! Sizes too large for `size_t` saturate here, so that a workspace query never wraps to a small
//! number (a planner would read it as "fits") and the arena refuses the request by name.
inline constexpr std::size_t saturated = ~std::size_t{0};

//! a * b, or `saturated` when that overflows (or either is saturated).
[[nodiscard]] constexpr std::size_t mul_saturating(std::size_t a, std::size_t b) noexcept {
  if (a == saturated || b == saturated) return saturated;
  return a != 0 && b > saturated / a ? saturated : a * b;
}

//! An arena error of a chunked layer's pass, with what the whole pass needs appended (the
//! arena's message names one buffer only).
[[nodiscard]] inline status with_pass_need(status const& st, std::string_view pass, std::size_t need,
                                           index_t tokens, index_t chunk) {
  if (st.code() != errc::out_of_memory) return st;
  return make_error(st.code(), st.message(), "; this ", pass, " of ", tokens, " tokens needs ",
                    need == saturated ? "more bytes than size_t holds" : detail::concat(need, " bytes"),
                    " at its peak (chunk ", chunk, chunk == 0 ? ": all tokens at once" : "",
                    "; a smaller chunk needs less)");
}

//! rounded(rows x cols x elem bytes) for a `[rows, cols]` buffer, or `saturated` when it exceeds
//! the arena's largest request.
[[nodiscard]] constexpr std::size_t buffer_bytes(index_t rows, index_t cols, std::size_t elem) noexcept {
  std::size_t const b = mul_saturating(mul_saturating(static_cast<std::size_t>(rows), static_cast<std::size_t>(cols)), elem);
  return b > device_arena::max_request ? saturated : rounded(b);
}

//! Leading dimension (elements between rows) of a row-major 2-D view, for a GEMM.
template <class T> [[nodiscard]] index_t leading_dim(tensor_view<T, 2> const& v) noexcept {
  return v.extent(0) > 1 ? v.stride(0) : std::max<index_t>(1, v.extent(1));
}

//! Pointer to row `r` of a 2-D view.
template <class T> [[nodiscard]] T* row(tensor_view<T, 2> const& v, index_t r) noexcept {
  return v.data() + r * v.stride(0);
}

//! Checks that `v` is `[rows, cols]` (rows == any_extent: any) with unit column stride and rows
//! that do not overlap, as a GEMM needs. `who` and `name` go into the message.
template <class T>
[[nodiscard]] status check_matrix(char const* who, char const* name, tensor_view<T, 2> const& v,
                                  index_t rows, index_t cols) {
  if ((rows != any_extent && v.extent(0) != rows) || v.extent(1) != cols)
    return make_error(errc::shape_mismatch, who, ": ", name, " has extents [", v.extent(0), ", ",
                      v.extent(1), "], expected [", rows == any_extent ? std::string("N") : std::to_string(rows),
                      ", ", cols, "]");
  if (v.empty()) return {};
  if (v.data() == nullptr)
    return make_error(errc::invalid_argument, who, ": ", name, " [", v.extent(0), ", ",
                      v.extent(1), "] has a null data pointer");
  if (v.extent(1) > 1 && v.stride(1) != 1)
    return make_error(errc::shape_mismatch, who, ": ", name, " has column stride ", v.stride(1),
                      "; the rows must be contiguous (stride 1)");
  if (v.extent(0) > 1 && v.stride(0) < v.extent(1))
    return make_error(errc::shape_mismatch, who, ": ", name, " has row stride ", v.stride(0),
                      ", below its ", v.extent(1), " columns (rows would overlap)");
  return {};
}

//! Checks an optional 1-D view: empty, or `[n]` with a non-null pointer.
template <class T>
[[nodiscard]] status check_vector(char const* who, char const* name, tensor_view<T, 1> const& v,
                                  index_t n) {
  if (v.extent(0) == 0) return {};
  if (v.extent(0) != n)
    return make_error(errc::shape_mismatch, who, ": ", name, " has extent [", v.extent(0),
                      "], expected [", n, "] or empty");
  if (v.data() == nullptr)
    return make_error(errc::invalid_argument, who, ": ", name, " [", n, "] has a null data pointer");
  return {};
}

// One aliasing check for every layer (core/tensor_view.hpp).
using detail::check_no_alias;
using detail::named_span;
using detail::range_of;

} // namespace detail::chunked

FPDT_NAMESPACE_END
