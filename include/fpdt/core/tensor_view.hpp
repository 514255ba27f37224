//! \file
//! \brief `tensor_view<T, Rank>`: a non-owning strided view of rank 1 to 4, checked at creation.
//!
//! Extents and strides are in elements (not bytes). fpdt's attention tensors are written
//! `[S, H, D]` (tokens, heads, head dimension), row-major by default, so the last index is the
//! fastest-moving one. A view is built through `make_tensor_view` (checked: returns an error that
//! names the offending extent, stride or capacity) or `contiguous_view` (row-major strides); once
//! built it is a plain pointer plus two small arrays, trivially copyable into kernels.
#pragma once

#include "../config.hpp"
#include "status.hpp"

#include <algorithm>
#include <array>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

FPDT_NAMESPACE_BEGIN

//! Signed index type of extents, strides and element offsets.
using index_t = std::int64_t;

//! Wildcard extent for `check_extents`: any extent is accepted in that dimension.
inline constexpr index_t any_extent = -1;

namespace detail {
// "[8, 4, 2]"; with `wildcards`, any_extent prints as "*" (for expected extents).
template <std::size_t Rank>
std::string shape_string(std::array<index_t, Rank> const& a, bool wildcards = false) {
  std::string s = "[";
  for (std::size_t i = 0; i < Rank; ++i) {
    if (i) s += ", ";
    s += wildcards && a[i] == any_extent ? std::string("*") : std::to_string(a[i]);
  }
  return s + "]";
}
} // namespace detail

//! Non-owning view of `T` elements with `Rank` (1..4) extents and strides in elements.
//!
//! \tparam T element type (const-qualified for read-only views); `tensor_view<T, R>` converts
//!           implicitly to `tensor_view<const T, R>`.
//! \tparam Rank number of dimensions, 1 to 4.
template <class T, std::size_t Rank> class tensor_view {
  static_assert(Rank >= 1 && Rank <= 4, "fpdt::tensor_view supports ranks 1 to 4");

public:
  using element_type = T;                           //!< element type, possibly const
  using extents_type = std::array<index_t, Rank>;   //!< extents, in elements per dimension
  using strides_type = std::array<index_t, Rank>;   //!< strides, in elements per dimension
  static constexpr std::size_t rank = Rank;         //!< number of dimensions

  //! An empty view: null data, all extents 0.
  constexpr tensor_view() noexcept = default;

  //! Unchecked construction; prefer `make_tensor_view`, which validates the arguments.
  constexpr tensor_view(T* data, extents_type const& extents, strides_type const& strides) noexcept
      : data_(data) {
    for (std::size_t d = 0; d < Rank; ++d) {
      extents_[d] = extents[d];
      strides_[d] = strides[d];
    }
  }

  //! Read-only view of the same elements.
  // A template constrained to U == T (a plain member would, for a const T, be a conversion to its
  // own type, which nvcc warns about): converts to the same element type only, never another.
  template <class U = T>
    requires(std::is_same_v<U, T> && !std::is_const_v<U>)
  constexpr operator tensor_view<U const, Rank>() const noexcept {
    return {data_, extents(), strides()};
  }

  //! Pointer to element (0, ..., 0).
  FPDT_HOST_DEVICE constexpr T* data() const noexcept { return data_; }
  //! Extent of dimension `d`, in elements.
  FPDT_HOST_DEVICE constexpr index_t extent(std::size_t d) const noexcept { return extents_[d]; }
  //! Stride of dimension `d`, in elements.
  FPDT_HOST_DEVICE constexpr index_t stride(std::size_t d) const noexcept { return strides_[d]; }
  //! All extents.
  constexpr extents_type extents() const noexcept {
    extents_type e{};
    for (std::size_t d = 0; d < Rank; ++d) e[d] = extents_[d];
    return e;
  }
  //! All strides.
  constexpr strides_type strides() const noexcept {
    strides_type st{};
    for (std::size_t d = 0; d < Rank; ++d) st[d] = strides_[d];
    return st;
  }
  //! Number of elements (product of extents).
  FPDT_HOST_DEVICE constexpr index_t size() const noexcept {
    index_t n = 1;
    for (std::size_t d = 0; d < Rank; ++d) n *= extents_[d];
    return n;
  }
  //! True when the view has no element.
  FPDT_HOST_DEVICE constexpr bool empty() const noexcept { return size() == 0; }
  //! Bytes the elements occupy if packed (size() * sizeof(T)).
  constexpr std::size_t size_bytes() const noexcept {
    return static_cast<std::size_t>(size()) * sizeof(T);
  }
  //! True when strides are the row-major strides of the extents (dimensions of extent 1 ignored).
  constexpr bool is_contiguous() const noexcept {
    index_t expect = 1;
    for (std::size_t i = Rank; i-- > 0;) {
      if (extents_[i] != 1 && strides_[i] != expect) return false;
      expect *= extents_[i];
    }
    return true;
  }

  //! Element at the given indices (one per dimension); bounds asserted in debug builds.
  template <class... I>
    requires(sizeof...(I) == Rank && (std::is_integral_v<I> && ...))
  FPDT_HOST_DEVICE constexpr T& operator()(I... idx) const noexcept {
    index_t const i[Rank] = {static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t d = 0; d < Rank; ++d) {
      assert(i[d] >= 0 && i[d] < extents_[d] && "fpdt::tensor_view index out of bounds");
      off += i[d] * strides_[d];
    }
    return data_[off];
  }

  //! Sub-view of indices [begin, end) along dimension `dim`, same rank.
  //!
  //! Errors: `errc::invalid_argument` naming dim, begin, end and the extent when
  //! `dim >= Rank` or not `0 <= begin <= end <= extent(dim)`.
  [[nodiscard]] result<tensor_view> slice(std::size_t dim, index_t begin, index_t end) const {
    if (dim >= Rank)
      return make_error(errc::invalid_argument, "tensor_view::slice: dim ", dim,
                        " is out of range for rank ", Rank);
    if (begin < 0 || begin > end || end > extents_[dim])
      return make_error(errc::invalid_argument, "tensor_view::slice: range [", begin, ", ", end,
                        ") of dim ", dim, " must satisfy 0 <= begin <= end <= extent ",
                        extents_[dim]);
    extents_type e = extents();
    e[dim] = end - begin;
    T* p = (end > begin) ? data_ + begin * strides_[dim] : data_;
    return tensor_view(p, e, strides());
  }

private:
  // Plain arrays, not std::array: its operator[] is not callable from CUDA device code.
  T* data_ = nullptr;
  index_t extents_[Rank] = {};
  index_t strides_[Rank] = {};
};

//! Row-major strides of `extents` (last dimension contiguous), in elements.
template <std::size_t Rank>
[[nodiscard]] constexpr std::array<index_t, Rank>
row_major_strides(std::array<index_t, Rank> const& extents) noexcept {
  std::array<index_t, Rank> s{};
  index_t acc = 1;
  for (std::size_t i = Rank; i-- > 0;) {
    s[i] = acc;
    acc *= extents[i] > 0 ? extents[i] : 1;
  }
  return s;
}

//! Builds a checked view of `data` with `extents` and `strides` (elements).
//!
//! \param data     first element; may be null only when some extent is 0.
//! \param extents  extents per dimension, each >= 0.
//! \param strides  strides per dimension, each >= 1 where the extent is > 1; the dimensions may
//!                 be in any order of stride but must not overlap: taken by increasing stride,
//!                 each stride must exceed the furthest offset reached by the dimensions before
//!                 it (a view never aliases itself).
//! \param capacity elements available from `data`, or -1 when unknown; when given, the furthest
//!                 element the view reaches must lie below it.
//! Errors: `errc::shape_mismatch` naming the dimension, extent, stride or capacity at fault.
template <class T, std::size_t Rank>
[[nodiscard]] result<tensor_view<T, Rank>>
make_tensor_view(T* data, std::array<index_t, Rank> const& extents,
                 std::array<index_t, Rank> const& strides, index_t capacity = -1) {
  using detail::shape_string;
  bool any_zero = false;
  for (std::size_t d = 0; d < Rank; ++d) {
    if (extents[d] < 0)
      return make_error(errc::shape_mismatch, "tensor view with extents ", shape_string(extents),
                        ": extent ", extents[d], " of dim ", d, " is negative");
    any_zero = any_zero || extents[d] == 0;
  }
  if (any_zero) return tensor_view<T, Rank>(data, extents, strides);
  if (data == nullptr)
    return make_error(errc::shape_mismatch, "tensor view with extents ", shape_string(extents),
                      " has a null data pointer");
  // Sort the dimensions that matter (extent > 1) by stride, then require each to start past the
  // end of the previous one: sufficient for no two index tuples to share an element.
  std::array<std::size_t, Rank> order{};
  std::size_t n = 0;
  for (std::size_t d = 0; d < Rank; ++d) {
    if (extents[d] == 1) continue;
    if (strides[d] < 1)
      return make_error(errc::shape_mismatch, "tensor view with extents ", shape_string(extents),
                        " and strides ", shape_string(strides), ": stride ", strides[d],
                        " of dim ", d, " (extent ", extents[d],
                        ") must be >= 1 (zero or negative strides would alias or run backwards)");
    order[n++] = d;
  }
  // Insertion sort of at most 4 entries (std::sort trips GCC 12's -Warray-bounds here).
  if constexpr (Rank > 1) // (GCC 12 -O3 warns about order[m - 1] for Rank 1, where n <= 1)
    for (std::size_t k = 1; k < n; ++k)
      for (std::size_t m = k; m > 0 && strides[order[m]] < strides[order[m - 1]]; --m)
        std::swap(order[m], order[m - 1]);
  constexpr index_t max_index = std::numeric_limits<index_t>::max();
  index_t reach = 0; // offset of the furthest element
  for (std::size_t k = 0; k < n; ++k) {
    std::size_t const d = order[k];
    if (k > 0) {
      std::size_t const p = order[k - 1];
      if (strides[d] <= reach)
        return make_error(errc::shape_mismatch, "tensor view with extents ",
                          shape_string(extents), " and strides ", shape_string(strides),
                          ": dim ", d, " (stride ", strides[d], ") overlaps dim ", p,
                          " (extent ", extents[p], ", stride ", strides[p],
                          "); each stride must exceed the furthest offset ", reach,
                          " of the dimensions with smaller strides");
    }
    if (strides[d] > (max_index - reach) / (extents[d] - 1))
      return make_error(errc::shape_mismatch, "tensor view with extents ", shape_string(extents),
                        " and strides ", shape_string(strides), " overflows a 64-bit offset");
    reach += (extents[d] - 1) * strides[d];
  }
  if (capacity >= 0 && reach >= capacity)
    return make_error(errc::shape_mismatch, "tensor view with extents ", shape_string(extents),
                      " and strides ", shape_string(strides), " reaches element ", reach,
                      " but the buffer holds only ", capacity, " elements");
  return tensor_view<T, Rank>(data, extents, strides);
}

//! Builds a checked row-major view of `data` with `extents`; `capacity` as in make_tensor_view.
//!
//! Errors: those of make_tensor_view, and `errc::shape_mismatch` when the element count
//! overflows a 64-bit index.
template <class T, std::size_t Rank>
[[nodiscard]] result<tensor_view<T, Rank>>
contiguous_view(T* data, std::array<index_t, Rank> const& extents, index_t capacity = -1) {
  index_t count = 1; // check before row_major_strides multiplies the extents
  for (std::size_t d = 0; d < Rank; ++d) {
    if (extents[d] < 0) break; // make_tensor_view names the negative extent
    if (extents[d] > 0 && count > std::numeric_limits<index_t>::max() / extents[d])
      return make_error(errc::shape_mismatch, "tensor view with extents ",
                        detail::shape_string(extents), " has more elements than a 64-bit index holds");
    count *= extents[d] > 0 ? extents[d] : 1;
  }
  return make_tensor_view(data, extents, row_major_strides(extents), capacity);
}

//! The bytes a view's elements lie in: from its lowest element's first byte to one past its
//! highest element's last byte (both null for an empty view).
struct memory_span {
  void const* first = nullptr; //!< lowest byte
  void const* last = nullptr;  //!< one past the highest byte
  //! True when both are non-empty and intersect.
  [[nodiscard]] bool intersects(memory_span const& o) const noexcept {
    std::less<void const*> lt;
    return first != last && o.first != o.last && lt(first, o.last) && lt(o.first, last);
  }
};

//! The `memory_span` of `v` (any strides, negative ones too); empty for an empty or null view.
template <class T, std::size_t Rank> [[nodiscard]] memory_span span_of(tensor_view<T, Rank> const& v) noexcept {
  if (v.empty() || v.data() == nullptr) return {}; // a null view reaches no memory
  index_t lo = 0, hi = 0; // element offsets of the lowest and highest element
  for (std::size_t d = 0; d < Rank; ++d) {
    index_t const reach = (v.extent(d) - 1) * v.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  auto const* base = reinterpret_cast<unsigned char const*>(v.data());
  auto const e = static_cast<index_t>(sizeof(T));
  return {base + lo * e, base + (hi + 1) * e};
}

namespace detail {
// A view whose dim-0 slices are contiguous blocks: `rows` blocks of `block` bytes, `stride` bytes
// apart, the first at `first` (a column slice of a row-major [S, W] buffer, or any contiguous
// view). Empty when the view is not of that form.
struct row_blocks {
  std::uintptr_t first = 0;
  index_t rows = 0, block = 0, stride = 0;
};
template <class T, std::size_t Rank> [[nodiscard]] std::optional<row_blocks> row_blocks_of(tensor_view<T, Rank> const& v) noexcept {
  if (v.empty() || v.data() == nullptr || v.stride(0) <= 0) return std::nullopt;
  index_t expect = 1; // row-major contiguity of dims 1.. (a dim of extent 1 may have any stride)
  for (std::size_t d = Rank; d-- > 1;) {
    if (v.extent(d) != 1 && v.stride(d) != expect) return std::nullopt;
    expect *= v.extent(d);
  }
  if (expect > v.stride(0) && v.extent(0) > 1) return std::nullopt; // rows overlap each other
  auto const e = static_cast<index_t>(sizeof(T));
  return row_blocks{reinterpret_cast<std::uintptr_t>(v.data()), v.extent(0), expect * e, v.stride(0) * e};
}
// Whether two row-block views with one stride R share a byte: rows s of a, [sR, sR + La), and t of
// b, [d + tR, d + tR + Lb) with d = b.first - a.first, meet iff some k = s - t in
// [-(Nb - 1), Na - 1] has d - La < kR < d + Lb.
[[nodiscard]] inline bool row_blocks_meet(row_blocks const& a, row_blocks const& b) noexcept {
  auto const d = static_cast<std::int64_t>(b.first - a.first); // two's complement difference
  std::int64_t const r = a.stride, lo = d - a.block;
  // The smallest k with kR > lo (floor division rounding toward -inf).
  std::int64_t const q = lo / r - ((lo % r != 0 && lo < 0) ? 1 : 0);
  std::int64_t const k = std::max<std::int64_t>(q + 1, -(b.rows - 1));
  return k <= a.rows - 1 && k * r < d + b.block;
}

// A tensor argument's name, memory span and row blocks (when it has that form), for
// check_no_alias and views_overlap.
struct named_span {
  char const* name = "";
  memory_span span{};
  std::optional<row_blocks> rows{};
};
template <class T, std::size_t Rank>
[[nodiscard]] named_span range_of(char const* name, tensor_view<T, Rank> const& v) noexcept {
  return {name, span_of(v), row_blocks_of(v)};
}
// Whether two arguments may share a byte: exact for row blocks of one stride, else their spans.
[[nodiscard]] inline bool may_share(named_span const& a, named_span const& b) noexcept {
  if (!a.span.intersects(b.span)) return false;
  if (a.rows && b.rows && a.rows->stride == b.rows->stride) return row_blocks_meet(*a.rows, *b.rows);
  return true;
}
// Errors with `errc::invalid_argument`, naming the pair, when an output may share memory with an
// input or another output (may_share): the layers write outputs chunk by chunk while later
// chunks of their inputs are still to be read (an overlap would change inputs not yet read:
// silently wrong results), and two overlapping outputs would overwrite each other (docs/design.md 2.5).
[[nodiscard]] inline status check_no_alias(char const* who, std::initializer_list<named_span> outputs,
                                           std::initializer_list<named_span> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (named_span const& i : inputs)
      if (may_share(*o, i))
        return make_error(errc::invalid_argument, who, ": output ", o->name, " overlaps input ", i.name,
                          " (outputs must not share memory with inputs, not even in place: pass separate buffers)");
    for (auto p = o + 1; p != outputs.end(); ++p)
      if (may_share(*o, *p))
        return make_error(errc::invalid_argument, who, ": outputs ", o->name, " and ", p->name,
                          " overlap (each output needs memory of its own)");
  }
  return {};
}
} // namespace detail

//! True when `a` and `b` may share a byte. Exact when both are row blocks with the same outer
//! stride (their dim-0 slices contiguous: column slices of one row-major buffer, such as q, k, v
//! or dq, dk, dv of a fused `[S, H + 2 H_kv, D]` tensor, or contiguous views); otherwise it
//! compares their memory spans, a conservative test (other interleaved views that share no
//! element count as overlapping). Empty and null views overlap nothing. Used to reject outputs
//! that share memory with inputs (or with other outputs) before a pass writes anything.
template <class A, std::size_t RA, class B, std::size_t RB>
[[nodiscard]] bool views_overlap(tensor_view<A, RA> const& a, tensor_view<B, RB> const& b) noexcept {
  return detail::may_share(detail::range_of("", a), detail::range_of("", b));
}

//! Checks that `view` has the `expected` extents (`any_extent` matches anything).
//!
//! \param name the tensor's name in the message, e.g. "q".
//! Errors: `errc::shape_mismatch`, e.g. "q: expected extents [8, 4, 2], got [8, 4, 3]".
template <class T, std::size_t Rank>
[[nodiscard]] status check_extents(tensor_view<T, Rank> const& view,
                                   std::array<index_t, Rank> const& expected, char const* name) {
  for (std::size_t d = 0; d < Rank; ++d)
    if (expected[d] != any_extent && expected[d] != view.extent(d))
      return make_error(errc::shape_mismatch, name, ": expected extents ",
                        detail::shape_string(expected, true), ", got ",
                        detail::shape_string(view.extents()));
  return {};
}

FPDT_NAMESPACE_END
