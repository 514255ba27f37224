//! \file
//! \brief `dtype`: run-time element types, their traits, and dispatch to compile-time types.
//!
//! FlashInfer's habit: a run-time value (the dtype the trainer holds) selects a compile-time type
//! once, at the API boundary, through `dispatch_dtype`.
#pragma once

#include "../config.hpp"
#include "bfloat16.hpp"
#include "half.hpp"
#include "status.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

//! Element types fpdt tensors may hold.
enum class dtype : std::uint8_t {
  f32,  //!< IEEE binary32, `float`
  f16,  //!< IEEE binary16, `fpdt::half`
  bf16, //!< bfloat16, `fpdt::bfloat16`
  f64,  //!< IEEE binary64, `double` (references and tests)
};

//! Short name of a dtype: "f32", "f16", "bf16", "f64".
[[nodiscard]] constexpr std::string_view to_string(dtype t) noexcept {
  switch (t) {
  case dtype::f32: return "f32";
  case dtype::f16: return "f16";
  case dtype::bf16: return "bf16";
  case dtype::f64: return "f64";
  }
  return "unknown";
}

//! Size of one element of `t`, in bytes (0 for a value outside the enum).
[[nodiscard]] constexpr std::size_t size_bytes(dtype t) noexcept {
  switch (t) {
  case dtype::f32: return 4;
  case dtype::f16: return 2;
  case dtype::bf16: return 2;
  case dtype::f64: return 8;
  }
  return 0;
}

namespace detail {
template <class T> struct dtype_of_impl {
  static_assert(!std::is_same_v<T, T>, "fpdt: this element type has no dtype; use float, double, "
                                       "fpdt::half or fpdt::bfloat16");
};
template <> struct dtype_of_impl<float> { static constexpr dtype value = dtype::f32; };
template <> struct dtype_of_impl<double> { static constexpr dtype value = dtype::f64; };
template <> struct dtype_of_impl<half> { static constexpr dtype value = dtype::f16; };
template <> struct dtype_of_impl<bfloat16> { static constexpr dtype value = dtype::bf16; };
} // namespace detail

//! The dtype of element type `T` (float, double, half, bfloat16); other types fail to compile.
template <class T> inline constexpr dtype dtype_of = detail::dtype_of_impl<std::remove_cv_t<T>>::value;

//! Empty tag carrying an element type through `dispatch_dtype`.
template <class T> struct type_tag {
  using type = T; //!< the element type
};

//! Calls `f(type_tag<T>{})` with the element type `T` that `t` names and returns its status.
//!
//! `f` must return `status` for every type. Errors: `errc::invalid_argument` naming the value when
//! `t` is outside the enum.
template <class F> [[nodiscard]] status dispatch_dtype(dtype t, F&& f) {
  switch (t) {
  case dtype::f32: return f(type_tag<float>{});
  case dtype::f16: return f(type_tag<half>{});
  case dtype::bf16: return f(type_tag<bfloat16>{});
  case dtype::f64: return f(type_tag<double>{});
  }
  return make_error(errc::invalid_argument, "dispatch_dtype: dtype value ",
                    static_cast<int>(t), " is not one of f32, f16, bf16, f64");
}

FPDT_NAMESPACE_END
