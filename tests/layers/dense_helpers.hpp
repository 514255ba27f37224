// Helpers the chunked-layer tests share: float64 vectors viewed as matrices and vectors, and
// seeded random fills.
#pragma once

#include <fpdt/core/tensor_view.hpp>

#include <cstdint>
#include <random>
#include <vector>

namespace fpdt_test::dense {

using fpdt::index_t;
using vec = std::vector<double>;

// No doctest assertions here: rank threads call these too.
inline fpdt::tensor_view<double, 2> mat(vec& v, index_t r, index_t c) {
  return {v.data(), {r, c}, fpdt::row_major_strides<2>({r, c})};
}
inline fpdt::tensor_view<double const, 2> cmat(vec const& v, index_t r, index_t c) {
  return {v.data(), {r, c}, fpdt::row_major_strides<2>({r, c})};
}
inline fpdt::tensor_view<double, 1> vecv(vec& v) { return {v.data(), {static_cast<index_t>(v.size())}, {1}}; }
inline fpdt::tensor_view<double const, 1> cvecv(vec const& v) {
  return {v.data(), {static_cast<index_t>(v.size())}, {1}};
}

//! n values uniform in [lo, hi) from a seeded generator.
inline vec random_vec(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  vec v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

} // namespace fpdt_test::dense
