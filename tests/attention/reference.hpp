// Float64 dense attention for the tests (fpdt::dense_reference_* on vectors, independent of the
// library's kernels), plus the small helpers the attention tests share: seeded random data,
// conversions to the model dtypes, contiguous views and error metrics.
//
// Layouts follow docs/design.md 3.1/3.5: q [Sq, H, D], k and v [Sk, H_kv, D], out [Sq, H, D],
// lse [H, Sq] (natural log), all row-major. Query head h uses key/value head h / (H / H_kv)
// (grouped order). Query row i sits at global position q_offset + i, key row j at k_offset + j;
// causal: key visible iff its position <= the query's. A row with no visible key has out = 0 and
// lse = -inf, and contributes nothing to any gradient.
#pragma once

#include <fpdt/attention/host/dense_reference.hpp>
#include <fpdt/core/bfloat16.hpp>
#include <fpdt/core/half.hpp>
#include <fpdt/core/tensor_view.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace fpdt_test {

using fpdt::index_t;

inline constexpr double inf64 = std::numeric_limits<double>::infinity();
inline constexpr float inf32 = std::numeric_limits<float>::infinity();

//! The value of a float, double, bfloat16 or half element as a double (exact).
template <class T>
[[nodiscard]] double as_double(T const& x) {
  if constexpr (std::is_same_v<T, double>)
    return x;
  else
    return static_cast<double>(static_cast<float>(x));
}

// ---------------------------------------------------------------------------------------------
// Shapes and options of the reference
// ---------------------------------------------------------------------------------------------

//! Extents of one attention problem.
struct attn_shape {
  index_t sq = 0;  //!< query rows
  index_t sk = 0;  //!< key/value rows
  index_t h = 1;   //!< query heads
  index_t hkv = 1; //!< key/value heads (H % H_kv == 0)
  index_t d = 1;   //!< head dimension

  [[nodiscard]] std::size_t q_size() const { return static_cast<std::size_t>(sq * h * d); }
  [[nodiscard]] std::size_t kv_size() const { return static_cast<std::size_t>(sk * hkv * d); }
  [[nodiscard]] std::size_t lse_size() const { return static_cast<std::size_t>(h * sq); }
  [[nodiscard]] std::array<index_t, 3> q_ext() const { return {sq, h, d}; }
  [[nodiscard]] std::array<index_t, 3> kv_ext() const { return {sk, hkv, d}; }
  [[nodiscard]] std::array<index_t, 2> lse_ext() const { return {h, sq}; }
};

//! Mask, offsets, scale and threads of the reference (`threads` 0: all hardware threads).
using ref_options = fpdt::dense_reference_options;

//! Forward and (optionally) backward of the reference, all float64.
using ref_result = fpdt::dense_reference_result;

namespace detail {

// The library's dense reference on row-major views of the vectors; throws on inconsistent shapes.
inline ref_result attention(std::vector<double> const& q, std::vector<double> const& k,
                            std::vector<double> const& v, std::vector<double> const* dout,
                            attn_shape const& s, ref_options const& o) {
  if (q.size() != s.q_size() || k.size() != s.kv_size() || v.size() != s.kv_size() ||
      (dout && dout->size() != s.q_size()))
    throw std::invalid_argument("fpdt_test reference: inconsistent shapes");
  auto view = [](std::vector<double> const& x, std::array<index_t, 3> const& ext) {
    return fpdt::contiguous_view(x.data(), ext).value();
  };
  auto r = dout ? fpdt::dense_reference_backward(view(q, s.q_ext()), view(k, s.kv_ext()),
                                                 view(v, s.kv_ext()), view(*dout, s.q_ext()), o)
                : fpdt::dense_reference_forward(view(q, s.q_ext()), view(k, s.kv_ext()),
                                                view(v, s.kv_ext()), o);
  if (!r) throw std::invalid_argument("fpdt_test reference: " + r.error().message());
  return std::move(*r);
}

} // namespace detail

//! Float64 forward: out [Sq, H, D] and lse [H, Sq] (natural log, -inf for rows seeing no key).
inline ref_result reference_forward(std::vector<double> const& q, std::vector<double> const& k,
                                    std::vector<double> const& v, attn_shape const& s,
                                    ref_options const& o = {}) {
  return detail::attention(q, k, v, nullptr, s, o);
}

//! Float64 forward and backward: out, lse, and dq, dk, dv of loss = sum(out * dout).
inline ref_result reference_backward(std::vector<double> const& q, std::vector<double> const& k,
                                     std::vector<double> const& v, std::vector<double> const& dout,
                                     attn_shape const& s, ref_options const& o = {}) {
  return detail::attention(q, k, v, &dout, s, o);
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

//! n values from N(mean, stddev), from a fixed seed.
inline std::vector<double> random_normal(std::size_t n, std::uint32_t seed, double stddev = 1.0,
                                         double mean = 0.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(mean, stddev);
  std::vector<double> r(n);
  for (auto& x : r)
    x = dist(gen);
  return r;
}

//! n values uniform in [lo, hi), from a fixed seed.
inline std::vector<double> random_uniform(std::size_t n, std::uint32_t seed, double lo = -1.0,
                                          double hi = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> r(n);
  for (auto& x : r)
    x = dist(gen);
  return r;
}

//! `x` rounded to T (float, bfloat16, half) through float.
template <class T>
[[nodiscard]] T to(double x) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(x);
  else
    return T(static_cast<float>(x));
}

//! Every element rounded to T.
template <class T>
[[nodiscard]] std::vector<T> convert(std::vector<double> const& x) {
  std::vector<T> r;
  r.reserve(x.size());
  for (double e : x)
    r.push_back(to<T>(e));
  return r;
}

//! Every element converted (exactly) to double.
template <class T>
[[nodiscard]] std::vector<double> to_double(std::vector<T> const& x) {
  std::vector<double> r;
  r.reserve(x.size());
  for (T const& e : x)
    r.push_back(as_double(e));
  return r;
}

//! The values the kernel really sees: each element rounded to T, back in double.
template <class T>
[[nodiscard]] std::vector<double> rounded(std::vector<double> const& x) {
  return to_double(convert<T>(x));
}

//! Row-major view of all `n` elements at `data` with the given extents (throws if they do not
//! cover exactly the buffer); `who` names the caller in the message.
template <class T, std::size_t R>
[[nodiscard]] fpdt::tensor_view<T, R> whole_view(T* data, std::size_t n,
                                                 std::array<index_t, R> const& ext, char const* who) {
  auto v = fpdt::contiguous_view(data, ext, static_cast<index_t>(n));
  if (!v.ok()) throw std::invalid_argument(v.error().message());
  if (static_cast<std::size_t>(v->size()) != n)
    throw std::invalid_argument(std::string(who) + ": extents do not cover the buffer");
  return *v;
}

//! Row-major view of the whole vector with the given extents (throws if they do not fit).
template <class T, std::size_t R>
[[nodiscard]] fpdt::tensor_view<T, R> view(std::vector<T>& buf, std::array<index_t, R> const& ext) {
  return whole_view(buf.data(), buf.size(), ext, "fpdt_test::view");
}

//! Read-only row-major view of the whole vector.
template <class T, std::size_t R>
[[nodiscard]] fpdt::tensor_view<T const, R> cview(std::vector<T> const& buf,
                                                  std::array<index_t, R> const& ext) {
  return whole_view(buf.data(), buf.size(), ext, "fpdt_test::cview");
}

//! True when every element is finite (float, bf16, half or double).
template <class V>
[[nodiscard]] bool all_finite(V const& x) {
  for (auto const& e : x)
    if (!std::isfinite(as_double(e))) return false;
  return true;
}

//! True when no element is NaN.
template <class V>
[[nodiscard]] bool no_nan(V const& x) {
  for (auto const& e : x)
    if (std::isnan(as_double(e))) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Error metrics
// ---------------------------------------------------------------------------------------------

//! Errors of a computed tensor against a float64 reference.
struct error_stats {
  double max_abs = 0.0; //!< max |got - ref| over finite reference elements (inf on any mismatch)
  double max_ref = 0.0; //!< max |ref| over finite reference elements
  double rel_l2 = 0.0;  //!< ||got - ref||_2 / ||ref||_2 (0 when both are 0)
  std::size_t mismatched_nonfinite = 0; //!< elements where ref is +-inf and got is not the same
  std::size_t nonfinite_got = 0;        //!< elements where ref is finite and got is not
  //! max_abs / max_ref: the error relative to the tensor's scale.
  [[nodiscard]] double scaled() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
  [[nodiscard]] std::string str() const {
    return "max_abs=" + std::to_string(max_abs) + " (" + std::to_string(scaled()) +
           " of max|ref|=" + std::to_string(max_ref) + ") rel_l2=" + std::to_string(rel_l2) +
           " nonfinite_got=" + std::to_string(nonfinite_got) +
           " nonfinite_mismatch=" + std::to_string(mismatched_nonfinite);
  }
};

//! Compares `got` (anything indexable converting to float or double) with `ref` element by
//! element. A non-finite reference element must be matched exactly (e.g. lse -inf).
template <class V>
[[nodiscard]] error_stats compare(V const& got, std::vector<double> const& ref) {
  if (got.size() != ref.size()) throw std::invalid_argument("fpdt_test::compare: sizes differ");
  error_stats e;
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    double const g = as_double(got[i]);
    double const r = ref[i];
    if (!std::isfinite(r)) {
      if (g != r) {
        ++e.mismatched_nonfinite;
        e.max_abs = inf64;
      }
      continue;
    }
    if (!std::isfinite(g)) {
      ++e.nonfinite_got;
      e.max_abs = inf64;
      continue;
    }
    e.max_abs = std::max(e.max_abs, std::abs(g - r));
    e.max_ref = std::max(e.max_ref, std::abs(r));
    num += (g - r) * (g - r);
    den += r * r;
  }
  e.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (e.nonfinite_got || e.mismatched_nonfinite) e.rel_l2 = inf64;
  return e;
}

//! Max |x| over the finite elements.
inline double max_abs(std::vector<double> const& x) {
  double m = 0.0;
  for (double e : x)
    if (std::isfinite(e)) m = std::max(m, std::abs(e));
  return m;
}

} // namespace fpdt_test
