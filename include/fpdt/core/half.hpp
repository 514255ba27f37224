//! \file
//! \brief `fpdt::half`: the IEEE-754 binary16 storage type, usable on the host.
//!
//! Layout: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits, with subnormals. Conversion to
//! float is exact; conversion from float rounds to nearest, ties to even (the rounding of CUDA's
//! `__float2half_rn`), gives +-inf at or above 65520 in magnitude, rounds tiny values through the
//! subnormal range to signed zero, and maps every NaN to a quiet NaN of the same sign.
#pragma once

#include "../config.hpp"

#include <cstdint>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

//! IEEE binary16 value (2 bytes): arithmetic promotes to float; storage only, not a math library.
struct half {
  std::uint16_t bits = 0; //!< raw bit pattern (sign, 5-bit exponent, 10-bit mantissa)

  //! Positive zero.
  constexpr half() noexcept = default;
  //! Rounds `f` to the nearest half, ties to even; NaN stays NaN (quiet), overflow gives +-inf.
  FPDT_HOST_DEVICE constexpr explicit half(float f) noexcept : bits(from_float_bits(f)) {}

  //! The value with bit pattern `b`, unchanged (signalling NaNs included).
  FPDT_HOST_DEVICE static constexpr half from_bits(std::uint16_t b) noexcept {
    half r;
    r.bits = b;
    return r;
  }

  //! The exact float value of this half.
  FPDT_HOST_DEVICE constexpr operator float() const noexcept {
    std::uint32_t const sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    std::uint32_t exp = (bits >> 10) & 0x1fu;
    std::uint32_t mant = bits & 0x3ffu;
    if (exp == 0x1fu) // infinity or NaN, payload kept
      return FPDT_BIT_CAST(float, sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
      if (mant == 0) return FPDT_BIT_CAST(float, sign);
      // Subnormal half: normalise; every one is a normal float.
      std::uint32_t e = 113; // float biased exponent of 2^-14
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
      }
      return FPDT_BIT_CAST(float, sign | (e << 23) | ((mant & 0x3ffu) << 13));
    }
    return FPDT_BIT_CAST(float, sign | ((exp + 112u) << 23) | (mant << 13));
  }

  //! Round-to-nearest-even conversion of a float to a half bit pattern.
  FPDT_HOST_DEVICE static constexpr std::uint16_t from_float_bits(float f) noexcept {
    std::uint32_t const u = FPDT_BIT_CAST(std::uint32_t, f);
    std::uint32_t const sign = (u >> 16) & 0x8000u;
    std::uint32_t const a = u & 0x7fffffffu;
    if (a > 0x7f800000u) // NaN: quiet, sign and top payload bits kept
      return static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) // >= 65520 (the tie above 65504, whose mantissa is odd) or inf
      return static_cast<std::uint16_t>(sign | 0x7c00u);
    if (a >= 0x38800000u) { // normal half range, |f| >= 2^-14
      std::uint32_t h = ((((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13));
      std::uint32_t const rem = a & 0x1fffu;
      if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h; // carry may bump the exponent
      return static_cast<std::uint16_t>(sign | h);
    }
    if (a <= 0x33000000u) // |f| <= 2^-25: half-way to the smallest subnormal or less -> zero
      return static_cast<std::uint16_t>(sign);
    // Subnormal half: value = m * 2^-24 with m = mantissa >> shift, rounded to nearest even.
    std::uint32_t const mant = (a & 0x7fffffu) | 0x800000u;
    std::uint32_t const shift = 126u - (a >> 23); // in [14, 24]
    std::uint32_t m = mant >> shift;
    std::uint32_t const rem = mant & ((1u << shift) - 1u);
    std::uint32_t const tie = 1u << (shift - 1u);
    if (rem > tie || (rem == tie && (m & 1u))) ++m; // m == 1024 is the smallest normal: correct
    return static_cast<std::uint16_t>(sign | m);
  }
};

// The bit layout of torch.float16 and CUDA's `__half` (one 16-bit pattern, nothing else), so a
// buffer of either is read and written as `half` without conversion (DLPack, core/dlpack.hpp).
static_assert(sizeof(half) == 2 && alignof(half) == 2, "half must be 2 bytes, 2-aligned");
static_assert(std::is_trivially_copyable_v<half> && std::is_standard_layout_v<half>,
              "half must be a plain 16-bit pattern");

FPDT_NAMESPACE_END
