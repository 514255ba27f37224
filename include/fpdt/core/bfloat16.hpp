//! \file
//! \brief `fpdt::bfloat16`: the 16-bit brain floating-point storage type, usable on the host.
//!
//! Layout: 1 sign bit, 8 exponent bits (bias 127), 7 mantissa bits: the upper half of an IEEE-754
//! binary32. Conversion to float is exact; conversion from float rounds to nearest, ties to even
//! (the rounding of CUDA's `__float2bfloat16_rn` and of PyTorch), overflows to infinity, keeps
//! infinities and signed zeros, and maps every NaN to a quiet NaN of the same sign.
#pragma once

#include "../config.hpp"

#include <cstdint>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

//! bfloat16 value (2 bytes): arithmetic promotes to float; storage only, not a math library.
struct bfloat16 {
  std::uint16_t bits = 0; //!< raw bit pattern (sign, 8-bit exponent, 7-bit mantissa)

  //! Positive zero.
  constexpr bfloat16() noexcept = default;
  //! Rounds `f` to the nearest bfloat16, ties to even; NaN stays NaN (quiet), overflow gives +-inf.
  FPDT_HOST_DEVICE constexpr explicit bfloat16(float f) noexcept : bits(from_float_bits(f)) {}

  //! The value with bit pattern `b`, unchanged (signalling NaNs included).
  FPDT_HOST_DEVICE static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 r;
    r.bits = b;
    return r;
  }

  //! The exact float value of this bfloat16.
  FPDT_HOST_DEVICE constexpr operator float() const noexcept {
    return FPDT_BIT_CAST(float, static_cast<std::uint32_t>(bits) << 16);
  }

  //! Round-to-nearest-even conversion of a float's bits to a bfloat16 bit pattern.
  FPDT_HOST_DEVICE static constexpr std::uint16_t from_float_bits(float f) noexcept {
    std::uint32_t const u = FPDT_BIT_CAST(std::uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) // NaN: keep sign and top payload bits, force quiet
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
    // Adding 0x7fff plus the lowest kept bit rounds to nearest with ties to even; a carry out of
    // the mantissa correctly bumps the exponent (and overflows to the infinity pattern).
    std::uint32_t const rounded = u + 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>(rounded >> 16);
  }
};

// The bit layout of torch.bfloat16 and CUDA's `__nv_bfloat16` (one 16-bit pattern, nothing else), so a
// buffer of either is read and written as `bfloat16` without conversion (DLPack, core/dlpack.hpp).
static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2, "bfloat16 must be 2 bytes, 2-aligned");
static_assert(std::is_trivially_copyable_v<bfloat16> && std::is_standard_layout_v<bfloat16>,
              "bfloat16 must be a plain 16-bit pattern");

FPDT_NAMESPACE_END
