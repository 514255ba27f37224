//! \file
//! \brief `from_dlpack`: a checked `tensor_view` over a DLPack tensor (PyTorch, JAX, CuPy, NumPy).
//!
//! DLPack (https://dmlc.github.io/dlpack) is the C struct frameworks exchange tensors through
//! without copying: a data pointer, a device, a dtype, a shape and strides in elements (NULL:
//! row-major). `from_dlpack<T, Rank>` checks each of them against what the caller asks for and
//! returns a view of the same memory; nothing is copied, nothing is owned (the producer's
//! `DLManagedTensor` must outlive the view, and its deleter stays the producer's business).
//!
//! Needs `<dlpack/dlpack.h>` (Debian: libdlpack-dev): link `fpdt::dlpack`, which exists where
//! CMake found the `dlpack` package. Element types: `float` (kDLFloat, 32), `double` (kDLFloat,
//! 64), `fpdt::half` (kDLFloat, 16), `fpdt::bfloat16` (kDLBfloat, 16), `std::int32_t` and
//! `std::int64_t` (kDLInt), `std::uint8_t` (kDLUInt, 8); one lane each. `fpdt::half` and
//! `fpdt::bfloat16` have the bit layout of torch.float16 / torch.bfloat16 and of CUDA's `__half`
//! / `__nv_bfloat16` (core/half.hpp, core/bfloat16.hpp), so such a tensor's memory is read as is.
#pragma once

#include "../config.hpp"
#include "bfloat16.hpp"
#include "half.hpp"
#include "status.hpp"
#include "tensor_view.hpp"

#include <dlpack/dlpack.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

//! Where the memory of a view taken from DLPack may live.
enum class dlpack_memory : std::uint8_t {
  host,   //!< host-addressable: kDLCPU, kDLCUDAHost (pinned), kDLCUDAManaged
  device, //!< a CUDA device: kDLCUDA, kDLCUDAManaged
};

namespace detail::dl {

template <class T> struct code_of; // DLPack's (code, bits) of an element type
template <> struct code_of<float> { static constexpr std::uint8_t code = kDLFloat, bits = 32; };
template <> struct code_of<double> { static constexpr std::uint8_t code = kDLFloat, bits = 64; };
template <> struct code_of<half> { static constexpr std::uint8_t code = kDLFloat, bits = 16; };
template <> struct code_of<bfloat16> { static constexpr std::uint8_t code = kDLBfloat, bits = 16; };
template <> struct code_of<std::int32_t> { static constexpr std::uint8_t code = kDLInt, bits = 32; };
template <> struct code_of<std::int64_t> { static constexpr std::uint8_t code = kDLInt, bits = 64; };
template <> struct code_of<std::uint8_t> { static constexpr std::uint8_t code = kDLUInt, bits = 8; };

inline std::string dtype_name(DLDataType t) {
  bool const known = t.code == kDLFloat || t.code == kDLBfloat || t.code == kDLInt || t.code == kDLUInt;
  std::string s = known ? detail::concat(t.code == kDLFloat ? "float" : t.code == kDLBfloat ? "bfloat"
                                         : t.code == kDLInt ? "int" : "uint", static_cast<int>(t.bits))
                        : detail::concat("code ", static_cast<int>(t.code), " of ", static_cast<int>(t.bits), " bits");
  if (t.lanes != 1) s += detail::concat("x", t.lanes);
  return s;
}

inline char const* device_name(DLDeviceType d) {
  switch (d) {
  case kDLCPU: return "kDLCPU";
  case kDLCUDA: return "kDLCUDA";
  case kDLCUDAHost: return "kDLCUDAHost";
  case kDLCUDAManaged: return "kDLCUDAManaged";
  default: return "another device type";
  }
}

} // namespace detail::dl

//! The DLPack dtype of element type `T` (one of those in the file comment).
template <class T> [[nodiscard]] constexpr DLDataType dlpack_dtype() noexcept {
  using U = std::remove_cv_t<T>;
  return DLDataType{detail::dl::code_of<U>::code, detail::dl::code_of<U>::bits, 1};
}

//! A `tensor_view<T, Rank>` of DLPack tensor `t`, checked (source: the DLPack header's contract).
//!
//! \tparam T    element type (const for a read-only view); see the file comment
//! \tparam Rank the rank the caller expects: `t.ndim` must equal it
//! \param where where the caller will read the memory (host code or a CUDA kernel)
//! Shapes and strides are DLPack's, in elements; a NULL `strides` is row-major. The view starts at
//! `data + byte_offset`. Errors, each naming the values: `errc::invalid_argument` for a rank,
//! dtype (code, bits or lanes), device type or byte offset (not a multiple of sizeof(T)) other
//! than asked; `errc::shape_mismatch` from `make_tensor_view` for negative extents, strides below
//! 1 on a dimension of extent above 1 (broadcast or reversed tensors: make them contiguous
//! first), self-overlapping strides, or a null data pointer with elements.
template <class T, std::size_t Rank>
[[nodiscard]] result<tensor_view<T, Rank>> from_dlpack(DLTensor const& t, dlpack_memory where = dlpack_memory::host) {
  constexpr DLDataType want = dlpack_dtype<T>();
  if (t.ndim != static_cast<int>(Rank))
    return make_error(errc::invalid_argument, "from_dlpack: the tensor has ", t.ndim, " dimensions, expected ", Rank);
  if (t.dtype.code != want.code || t.dtype.bits != want.bits || t.dtype.lanes != want.lanes)
    return make_error(errc::invalid_argument, "from_dlpack: the tensor's dtype is ", detail::dl::dtype_name(t.dtype),
                      " (code ", static_cast<int>(t.dtype.code), ", bits ", static_cast<int>(t.dtype.bits),
                      ", lanes ", t.dtype.lanes, "), expected ", detail::dl::dtype_name(want));
  DLDeviceType const dev = t.device.device_type;
  bool const host_ok = dev == kDLCPU || dev == kDLCUDAHost || dev == kDLCUDAManaged;
  bool const device_ok = dev == kDLCUDA || dev == kDLCUDAManaged;
  if (where == dlpack_memory::host ? !host_ok : !device_ok)
    return make_error(errc::invalid_argument, "from_dlpack: the tensor lives on ", detail::dl::device_name(dev),
                      " (device_type ", static_cast<int>(dev), ", id ", t.device.device_id, "), but a ",
                      where == dlpack_memory::host ? "host" : "CUDA device",
                      " view was asked for (host: kDLCPU, kDLCUDAHost, kDLCUDAManaged; device: kDLCUDA, "
                      "kDLCUDAManaged)");
  if (t.byte_offset % sizeof(T) != 0)
    return make_error(errc::invalid_argument, "from_dlpack: byte_offset ", t.byte_offset,
                      " is not a multiple of the element size ", sizeof(T));
  std::array<index_t, Rank> extents{}, strides{};
  for (std::size_t d = 0; d < Rank; ++d) extents[d] = static_cast<index_t>(t.shape[d]);
  if (t.strides == nullptr) {
    strides = row_major_strides(extents);
  } else {
    for (std::size_t d = 0; d < Rank; ++d) strides[d] = static_cast<index_t>(t.strides[d]);
  }
  // A null data pointer is legal for an empty tensor; the offset then means nothing.
  auto* base = static_cast<std::byte*>(t.data);
  T* data = base == nullptr ? nullptr : reinterpret_cast<T*>(base + t.byte_offset);
  auto v = make_tensor_view<T, Rank>(data, extents, strides);
  if (!v) return v.error().with_context("from_dlpack");
  return v;
}

//! `from_dlpack` of a managed tensor's `dl_tensor` (the legacy capsule PyTorch's
//! `torch.utils.dlpack.to_dlpack` returns).
template <class T, std::size_t Rank>
[[nodiscard]] result<tensor_view<T, Rank>> from_dlpack(DLManagedTensor const& t, dlpack_memory where = dlpack_memory::host) {
  return from_dlpack<T, Rank>(t.dl_tensor, where);
}

FPDT_NAMESPACE_END
