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

FPDT_NAMESPACE_BEGIN

namespace detail::chunked {

//! `b` bytes as the arena reserves them.
[[nodiscard]] constexpr std::size_t rounded(std::size_t b) noexcept { return device_arena::rounded_size(b); }

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

//! The bytes a view spans, [lo, hi); lo == hi for an empty view.
struct byte_range {
  char const* name = "";
  std::uintptr_t lo = 0;
  std::uintptr_t hi = 0;
};

//! The bytes `v` reaches (from its first to past its last element).
template <class T, std::size_t R>
[[nodiscard]] byte_range range_of(char const* name, tensor_view<T, R> const& v) noexcept {
  if (v.empty() || v.data() == nullptr) return {name, 0, 0};
  index_t last = 0;
  for (std::size_t d = 0; d < R; ++d) last += (v.extent(d) - 1) * v.stride(d);
  auto const lo = reinterpret_cast<std::uintptr_t>(v.data());
  return {name, lo, lo + static_cast<std::uintptr_t>(last + 1) * sizeof(T)};
}

[[nodiscard]] inline bool overlap(byte_range const& a, byte_range const& b) noexcept {
  return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi;
}

//! Errors with `errc::invalid_argument` when an output overlaps an input or another output (a
//! pass never writes into a tensor the caller still reads, DESIGN.md 2.6).
[[nodiscard]] inline status check_no_alias(char const* who, std::initializer_list<byte_range> outputs,
                                           std::initializer_list<byte_range> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (byte_range const& i : inputs)
      if (overlap(*o, i))
        return make_error(errc::invalid_argument, who, ": output ", o->name,
                          " overlaps input ", i.name, " (the inputs are never written; pass separate buffers)");
    for (auto p = o + 1; p != outputs.end(); ++p)
      if (overlap(*o, *p))
        return make_error(errc::invalid_argument, who, ": outputs ", o->name, " and ", p->name,
                          " overlap");
  }
  return {};
}

} // namespace detail::chunked

FPDT_NAMESPACE_END
