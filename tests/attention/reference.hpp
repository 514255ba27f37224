// Float64 dense attention written for the tests (independent of the library's kernels), plus the
// small helpers the attention tests share: seeded random data, conversions to the model dtypes,
// contiguous views and error metrics.
//
// Layouts follow DESIGN.md 2.4/2.5: q [Sq, H, D], k and v [Sk, H_kv, D], out [Sq, H, D],
// lse [H, Sq] (natural log), all row-major. Query head h uses key/value head h / (H / H_kv)
// (grouped order). Query row i sits at global position q_offset + i, key row j at k_offset + j;
// causal: key visible iff its position <= the query's. A row with no visible key has out = 0 and
// lse = -inf, and contributes nothing to any gradient.
#pragma once

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

//! Mask, offsets and scale of the reference.
struct ref_options {
  bool causal = false;         //!< causal by global position, else full
  index_t q_offset = 0;        //!< global position of query row 0
  index_t k_offset = 0;        //!< global position of key row 0
  std::optional<double> scale; //!< softmax scale; 1/sqrt(D) when empty
  unsigned threads = 2;        //!< host threads for the reference (over key/value heads)
};

//! Forward and (optionally) backward of the reference, all float64.
struct ref_result {
  std::vector<double> out; //!< [Sq, H, D]
  std::vector<double> lse; //!< [H, Sq], -inf for rows with no visible key
  std::vector<double> dq;  //!< [Sq, H, D] (backward only)
  std::vector<double> dk;  //!< [Sk, H_kv, D] (backward only)
  std::vector<double> dv;  //!< [Sk, H_kv, D] (backward only)
};

namespace detail {

// Number of visible keys of query row i: a prefix [0, n) of the key rows for both masks.
inline index_t visible_prefix(attn_shape const& s, ref_options const& o, index_t i) {
  if (!o.causal) return s.sk;
  index_t const n = o.q_offset + i - o.k_offset + 1; // keys with k_offset + j <= q_offset + i
  return std::clamp<index_t>(n, 0, s.sk);
}

// Runs fn(g) for every key/value head g on up to `threads` threads (each g writes disjoint data).
template <class F>
void for_each_group(index_t groups, unsigned threads, F const& fn) {
  unsigned const n =
      static_cast<unsigned>(std::max<index_t>(1, std::min<index_t>(groups, threads)));
  if (n <= 1) {
    for (index_t g = 0; g < groups; ++g)
      fn(g);
    return;
  }
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < n; ++t)
    pool.emplace_back([&fn, t, n, groups] {
      for (index_t g = t; g < groups; g += n)
        fn(g);
    });
  for (auto& th : pool)
    th.join();
}

inline void check_sizes(attn_shape const& s, std::vector<double> const& q,
                        std::vector<double> const& k, std::vector<double> const& v) {
  if (s.h < 1 || s.hkv < 1 || s.h % s.hkv != 0 || s.d < 1 || q.size() != s.q_size() ||
      k.size() != s.kv_size() || v.size() != s.kv_size())
    throw std::invalid_argument("fpdt_test reference: inconsistent shapes");
}

// C[i, j] += sum_p A(i, p) B(p, j) for i < m, j < n, p < k, with A(i, p) = a[i * a_i + p * a_p],
// B(p, j) = b[p * b_p + j * b_j], C row-major with leading dimension ldc. Plain float64 loops in
// 4 x 4 register blocks (the A11 reference is 4096 x 4096 x 4 heads; naive loops would take most
// of a minute at -O2).
inline void matmul(index_t m, index_t n, index_t k, double const* a, index_t a_i, index_t a_p,
                   double const* b, index_t b_p, index_t b_j, double* c, index_t ldc) {
  index_t i = 0;
  for (; i + 4 <= m; i += 4) {
    double const* a0 = a + i * a_i;
    double const* a1 = a0 + a_i;
    double const* a2 = a1 + a_i;
    double const* a3 = a2 + a_i;
    index_t j = 0;
    for (; j + 4 <= n; j += 4) {
      double const* b0 = b + j * b_j;
      double const* b1 = b0 + b_j;
      double const* b2 = b1 + b_j;
      double const* b3 = b2 + b_j;
      // clang-format off
      double c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
      double c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
      for (index_t p = 0; p < k; ++p) {
        double const x0 = a0[p * a_p], x1 = a1[p * a_p], x2 = a2[p * a_p], x3 = a3[p * a_p];
        double const y0 = b0[p * b_p], y1 = b1[p * b_p], y2 = b2[p * b_p], y3 = b3[p * b_p];
        c00 += x0 * y0; c01 += x0 * y1; c02 += x0 * y2; c03 += x0 * y3;
        c10 += x1 * y0; c11 += x1 * y1; c12 += x1 * y2; c13 += x1 * y3;
        c20 += x2 * y0; c21 += x2 * y1; c22 += x2 * y2; c23 += x2 * y3;
        c30 += x3 * y0; c31 += x3 * y1; c32 += x3 * y2; c33 += x3 * y3;
      }
      double* r0 = c + i * ldc + j;
      double* r1 = r0 + ldc;
      double* r2 = r1 + ldc;
      double* r3 = r2 + ldc;
      r0[0] += c00; r0[1] += c01; r0[2] += c02; r0[3] += c03;
      r1[0] += c10; r1[1] += c11; r1[2] += c12; r1[3] += c13;
      r2[0] += c20; r2[1] += c21; r2[2] += c22; r2[3] += c23;
      r3[0] += c30; r3[1] += c31; r3[2] += c32; r3[3] += c33;
      // clang-format on
    }
    for (; j < n; ++j)
      for (index_t r = 0; r < 4; ++r) {
        double acc = 0.0;
        for (index_t p = 0; p < k; ++p)
          acc += a[(i + r) * a_i + p * a_p] * b[p * b_p + j * b_j];
        c[(i + r) * ldc + j] += acc;
      }
  }
  for (; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (index_t p = 0; p < k; ++p)
        acc += a[i * a_i + p * a_p] * b[p * b_p + j * b_j];
      c[i * ldc + j] += acc;
    }
}

// The shared body: forward always, backward when dout is given. Per key/value head g and query
// head of its group, blocks of query rows against all keys any row of the block sees: dense
// scores S = Q K^T, the exact softmax of every row in float64 (max, exp, sum, log), O = P V; then
// dP = dO V^T, dS = P (dP - delta) with delta = rowsum(dO * O), dQ = dS K, dK += dS^T Q,
// dV += P^T dO (the scale applied to S and to dS).
inline ref_result attention(std::vector<double> const& q, std::vector<double> const& k,
                            std::vector<double> const& v, std::vector<double> const* dout,
                            attn_shape const& s, ref_options const& o) {
  check_sizes(s, q, k, v);
  if (dout && dout->size() != s.q_size())
    throw std::invalid_argument("fpdt_test reference: dout size");
  double const scale = o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(s.d));
  index_t const sq = s.sq, sk = s.sk, h = s.h, hkv = s.hkv, d = s.d, group = h / hkv;
  constexpr index_t block = 128;
  ref_result r;
  r.out.assign(s.q_size(), 0.0);
  r.lse.assign(s.lse_size(), -inf64);
  if (dout) {
    r.dq.assign(s.q_size(), 0.0);
    r.dk.assign(s.kv_size(), 0.0);
    r.dv.assign(s.kv_size(), 0.0);
  }
  auto at = [](index_t x) { return static_cast<std::size_t>(x); };
  for_each_group(hkv, o.threads, [&](index_t g) {
    std::vector<double> kg(at(sk * d)), vg(at(sk * d)), dkg(at(sk * d), 0.0), dvg(at(sk * d), 0.0);
    for (index_t j = 0; j < sk; ++j)
      for (index_t x = 0; x < d; ++x) {
        kg[at(j * d + x)] = k[at((j * hkv + g) * d + x)];
        vg[at(j * d + x)] = v[at((j * hkv + g) * d + x)];
      }
    std::vector<double> qb(at(block * d)), ob(at(block * d)), dob(at(block * d)),
        dqb(at(block * d));
    std::vector<double> pm, dsm; // [rows, n] scores -> probabilities, dP -> dS
    std::vector<index_t> vis(at(block));
    for (index_t hh = 0; hh < group; ++hh) {
      index_t const head = g * group + hh;
      for (index_t i0 = 0; i0 < sq; i0 += block) {
        index_t const mb = std::min(block, sq - i0);
        index_t n = 0; // keys any row of the block sees (a prefix)
        for (index_t i = 0; i < mb; ++i) {
          vis[at(i)] = visible_prefix(s, o, i0 + i);
          n = std::max(n, vis[at(i)]);
        }
        if (n == 0) continue; // every row empty: out 0, lse -inf, no gradient
        for (index_t i = 0; i < mb; ++i)
          for (index_t x = 0; x < d; ++x)
            qb[at(i * d + x)] = q[at(((i0 + i) * h + head) * d + x)];
        pm.assign(at(mb * n), 0.0);
        matmul(mb, n, d, qb.data(), d, 1, kg.data(), 1, d, pm.data(), n); // S = Q K^T
        for (index_t i = 0; i < mb; ++i) {
          double* row = &pm[at(i * n)];
          index_t const ni = vis[at(i)];
          if (ni == 0) {
            std::fill(row, row + n, 0.0);
            continue;
          }
          double m = -inf64;
          for (index_t j = 0; j < ni; ++j)
            m = std::max(m, row[j] * scale);
          double l = 0.0;
          for (index_t j = 0; j < ni; ++j) {
            row[j] = std::exp(row[j] * scale - m);
            l += row[j];
          }
          for (index_t j = 0; j < ni; ++j)
            row[j] /= l;
          std::fill(row + ni, row + n, 0.0);
          r.lse[at(head * sq + i0 + i)] = m + std::log(l);
        }
        std::fill(ob.begin(), ob.end(), 0.0);
        matmul(mb, d, n, pm.data(), n, 1, vg.data(), d, 1, ob.data(), d); // O = P V
        for (index_t i = 0; i < mb; ++i)
          for (index_t x = 0; x < d; ++x)
            r.out[at(((i0 + i) * h + head) * d + x)] = ob[at(i * d + x)];
        if (!dout) continue;
        for (index_t i = 0; i < mb; ++i)
          for (index_t x = 0; x < d; ++x)
            dob[at(i * d + x)] = (*dout)[at(((i0 + i) * h + head) * d + x)];
        dsm.assign(at(mb * n), 0.0);
        matmul(mb, n, d, dob.data(), d, 1, vg.data(), 1, d, dsm.data(), n); // dP = dO V^T
        for (index_t i = 0; i < mb; ++i) {
          double delta = 0.0;
          for (index_t x = 0; x < d; ++x)
            delta += dob[at(i * d + x)] * ob[at(i * d + x)];
          double const* p = &pm[at(i * n)];
          double* ds = &dsm[at(i * n)];
          for (index_t j = 0; j < n; ++j)
            ds[j] = p[j] * (ds[j] - delta) * scale; // 0 where masked
        }
        std::fill(dqb.begin(), dqb.end(), 0.0);
        matmul(mb, d, n, dsm.data(), n, 1, kg.data(), d, 1, dqb.data(), d); // dQ = dS K
        matmul(n, d, mb, dsm.data(), 1, n, qb.data(), d, 1, dkg.data(), d); // dK += dS^T Q
        matmul(n, d, mb, pm.data(), 1, n, dob.data(), d, 1, dvg.data(), d); // dV += P^T dO
        for (index_t i = 0; i < mb; ++i)
          for (index_t x = 0; x < d; ++x)
            r.dq[at(((i0 + i) * h + head) * d + x)] = dqb[at(i * d + x)];
      }
    }
    if (dout)
      for (index_t j = 0; j < sk; ++j)
        for (index_t x = 0; x < d; ++x) {
          r.dk[at((j * hkv + g) * d + x)] = dkg[at(j * d + x)];
          r.dv[at((j * hkv + g) * d + x)] = dvg[at(j * d + x)];
        }
  });
  return r;
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
