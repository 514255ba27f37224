// Shared by the fuzz targets: sizes drawn to reach both the shape rules and 64-bit overflow, and
// a failure that names the target and what broke.
#pragma once

#include <fpdt/core/tensor_view.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdio>
#include <cstdlib>

namespace fpdt_fuzz {

// Mostly small values in [lo, hi] (where the rules bite), sometimes a power of two up to 2^62 or
// anything at all (where products overflow).
inline fpdt::index_t pick(FuzzedDataProvider& in, fpdt::index_t lo, fpdt::index_t hi) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
  case 0: return in.ConsumeIntegralInRange<fpdt::index_t>(lo, hi);
  case 1: return fpdt::index_t{1} << in.ConsumeIntegralInRange<int>(0, 62);
  case 2: return in.ConsumeIntegralInRange<fpdt::index_t>(0, fpdt::index_t{1} << 24);
  default: return in.ConsumeIntegral<fpdt::index_t>();
  }
}

// Prints "TARGET: WHAT (DETAIL)" and aborts, which libFuzzer reports as a crash with the input.
[[noreturn]] inline void fail(char const* target, char const* what, char const* detail = "") {
  std::fprintf(stderr, "%s: %s%s%s%s\n", target, what, *detail ? " (" : "", detail, *detail ? ")" : "");
  std::abort();
}

} // namespace fpdt_fuzz
