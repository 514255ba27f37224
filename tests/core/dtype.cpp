// Tests of include/fpdt/core/{bfloat16,half,dtype}.hpp: conversions are bit-exact against a
// float64 reference for all 65536 bit patterns of each type, and round to nearest even at every
// boundary between neighbouring values.
#include <fpdt/core/dtype.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace {

// float64 value of a binary floating-point bit pattern with `eb` exponent bits and `mb` mantissa
// bits, decoded from its fields (independent of the code under test).
double decode(std::uint32_t bits, int eb, int mb) {
  std::uint32_t const sign = bits >> (eb + mb);
  std::uint32_t const exp = (bits >> mb) & ((1u << eb) - 1u);
  std::uint32_t const mant = bits & ((1u << mb) - 1u);
  int const bias = (1 << (eb - 1)) - 1;
  double v;
  if (exp == (1u << eb) - 1u)
    v = mant == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  else if (exp == 0)
    v = std::ldexp(static_cast<double>(mant), 1 - bias - mb);
  else
    v = std::ldexp(static_cast<double>(mant + (1u << mb)), static_cast<int>(exp) - bias - mb);
  return sign ? -v : v;
}

template <class T> struct format;
template <> struct format<fpdt::bfloat16> {
  static constexpr int eb = 8, mb = 7;
  static constexpr char const* name = "bfloat16";
};
template <> struct format<fpdt::half> {
  static constexpr int eb = 5, mb = 10;
  static constexpr char const* name = "half";
};

template <class T> std::uint16_t bits_of(float f) { return T(f).bits; }

bool is_nan_bits(std::uint32_t b, int eb, int mb) {
  std::uint32_t const exp_all = ((1u << eb) - 1u) << mb;
  return (b & exp_all) == exp_all && (b & ((1u << mb) - 1u)) != 0;
}

} // namespace

TEST_CASE_TEMPLATE("dtype: to float is exact for all 65536 bit patterns", T, fpdt::bfloat16, fpdt::half) {
  constexpr int eb = format<T>::eb, mb = format<T>::mb;
  int mismatches = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    float const f = static_cast<float>(T::from_bits(static_cast<std::uint16_t>(b)));
    double const ref = decode(b, eb, mb);
    bool ok;
    if (std::isnan(ref))
      ok = std::isnan(f) && std::signbit(f) == std::signbit(ref);
    else
      ok = static_cast<double>(f) == ref && std::signbit(f) == std::signbit(ref);
    if (!ok && ++mismatches <= 5)
      FAIL_CHECK(format<T>::name, " bits 0x", std::hex, b, ": got ", f, ", expected ", ref);
  }
  CHECK(mismatches == 0);
}

TEST_CASE_TEMPLATE("dtype: float round trip keeps every value and NaN stays NaN", T, fpdt::bfloat16, fpdt::half) {
  constexpr int eb = format<T>::eb, mb = format<T>::mb;
  int mismatches = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    auto const x = T::from_bits(static_cast<std::uint16_t>(b));
    std::uint16_t const back = T(static_cast<float>(x)).bits;
    bool ok;
    if (is_nan_bits(b, eb, mb))
      ok = is_nan_bits(back, eb, mb) && (back >> 15) == (b >> 15) &&
           (back & (1u << (mb - 1))) != 0; // quiet, same sign
    else
      ok = back == b;
    if (!ok && ++mismatches <= 5)
      FAIL_CHECK(format<T>::name, " bits 0x", std::hex, b, " came back as 0x", back);
  }
  CHECK(mismatches == 0);
}

TEST_CASE_TEMPLATE("dtype: from float rounds to nearest even at every boundary", T, fpdt::bfloat16, fpdt::half) {
  // For each pair of neighbouring non-negative values lo < hi (consecutive bit patterns, the last
  // pair being max finite and infinity), the float64 midpoint is exact in float; it must round to
  // the one with the even mantissa, and the floats just below and above it to lo and hi.
  constexpr int eb = format<T>::eb, mb = format<T>::mb;
  std::uint32_t const inf_bits = ((1u << eb) - 1u) << mb;
  int mismatches = 0;
  auto expect = [&](float f, std::uint32_t want, char const* what) {
    for (float s : {1.0f, -1.0f}) {
      std::uint32_t const w = s > 0 ? want : (want | 0x8000u);
      std::uint16_t const got = bits_of<T>(s * f);
      if (got != w && ++mismatches <= 8)
        FAIL_CHECK(format<T>::name, " ", what, " of ", s * f, ": got 0x", std::hex, got,
                   ", expected 0x", w);
    }
  };
  for (std::uint32_t lo = 0; lo < inf_bits; ++lo) {
    std::uint32_t const hi = lo + 1;
    double const a = decode(lo, eb, mb);
    // The value past max finite, were the exponent unbounded: max + one ulp of max.
    double const b = hi == inf_bits ? a + (a - decode(lo - 1, eb, mb)) : decode(hi, eb, mb);
    double const mid = (a + b) / 2;
    auto const midf = static_cast<float>(mid);
    REQUIRE(static_cast<double>(midf) == mid);
    std::uint32_t const even = (lo & 1u) == 0 ? lo : hi;
    expect(midf, even, "tie");
    expect(std::nextafter(midf, 0.0f), lo, "below tie");
    expect(std::nextafter(midf, std::numeric_limits<float>::infinity()), hi, "above tie");
    expect(static_cast<float>(a), lo, "exact");
  }
  CHECK(mismatches == 0);
}

TEST_CASE("dtype: special values") {
  float const inf = std::numeric_limits<float>::infinity();
  float const nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(fpdt::bfloat16(inf).bits == 0x7f80);
  CHECK(fpdt::bfloat16(-inf).bits == 0xff80);
  CHECK(fpdt::half(inf).bits == 0x7c00);
  CHECK(fpdt::half(-inf).bits == 0xfc00);
  CHECK(std::isnan(static_cast<float>(fpdt::bfloat16(nan))));
  CHECK(std::isnan(static_cast<float>(fpdt::half(nan))));
  CHECK(std::isnan(static_cast<float>(fpdt::half(-nan))));
  CHECK(std::signbit(static_cast<float>(fpdt::half(-nan))));
  // A signalling float NaN whose payload lives only in the low bits must not become infinity.
  std::uint32_t const snan_bits = 0x7f800001u;
  float snan;
  std::memcpy(&snan, &snan_bits, sizeof snan);
  CHECK(std::isnan(static_cast<float>(fpdt::bfloat16(snan))));
  CHECK(std::isnan(static_cast<float>(fpdt::half(snan))));
  CHECK(fpdt::half(-0.0f).bits == 0x8000);
  CHECK(fpdt::bfloat16(-0.0f).bits == 0x8000);
  CHECK(fpdt::half(1e-10f).bits == 0x0000);     // far below the smallest subnormal
  CHECK(fpdt::half(65519.0f).bits == 0x7bff);   // below the tie: max finite 65504
  CHECK(fpdt::half(65520.0f).bits == 0x7c00);   // the tie rounds to even: infinity
  CHECK(fpdt::half(1e6f).bits == 0x7c00);
  CHECK(fpdt::bfloat16(std::numeric_limits<float>::max()).bits == 0x7f80);
  CHECK(fpdt::bfloat16(std::numeric_limits<float>::denorm_min()).bits == 0x0000);
  // Conversions are constexpr.
  static_assert(static_cast<float>(fpdt::bfloat16(1.5f)) == 1.5f);
  static_assert(fpdt::half(2.0f).bits == 0x4000);
}

TEST_CASE("dtype: enum traits and dispatch") {
  CHECK(fpdt::size_bytes(fpdt::dtype::f32) == 4);
  CHECK(fpdt::size_bytes(fpdt::dtype::bf16) == 2);
  CHECK(fpdt::size_bytes(fpdt::dtype::f16) == 2);
  CHECK(fpdt::size_bytes(fpdt::dtype::f64) == 8);
  static_assert(fpdt::dtype_of<float> == fpdt::dtype::f32);
  static_assert(fpdt::dtype_of<fpdt::bfloat16 const> == fpdt::dtype::bf16);
  static_assert(fpdt::dtype_of<fpdt::half> == fpdt::dtype::f16);
  for (auto t : {fpdt::dtype::f32, fpdt::dtype::f16, fpdt::dtype::bf16, fpdt::dtype::f64}) {
    std::size_t seen = 0;
    fpdt::status s = fpdt::dispatch_dtype(t, [&](auto tag) {
      using E = typename decltype(tag)::type;
      seen = sizeof(E);
      CHECK(fpdt::dtype_of<E> == t);
      return fpdt::status{};
    });
    CHECK(s.ok());
    CHECK(seen == fpdt::size_bytes(t));
  }
  fpdt::status bad = fpdt::dispatch_dtype(static_cast<fpdt::dtype>(42), [](auto) { return fpdt::status{}; });
  CHECK(bad.code() == fpdt::errc::invalid_argument);
  CHECK(bad.message().find("42") != std::string::npos);
}
