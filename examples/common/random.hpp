// Deterministic pseudo-random inputs the examples share: a value in [-1, 1) from a 64-bit key
// (the splitmix64 finalizer), so every rank or thread computes any element it needs from its
// indices alone, with no generator state to share.
#pragma once

#include <cstdint>

namespace fpdt_examples {

//! A value in [-1, 1), uniform over 2^53 steps, that depends on every bit of `key`.
inline double uniform_pm1(std::uint64_t key) {
  std::uint64_t x = key;
  x ^= x >> 31;
  x *= 0xD6E9C2B64F2E1E93ull;
  x ^= x >> 29;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 32;
  return static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

} // namespace fpdt_examples
