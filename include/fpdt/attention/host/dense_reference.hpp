//! \file
//! \brief `dense_reference_forward` and `dense_reference_backward`: float64 dense softmax
//! attention on the host, the reference that kernels, layers and examples are checked against.
//!
//! Source: the definition of softmax attention, out = softmax(scale Q K^T + mask) V, computed
//! exactly per row in float64 (max, exp, sum, log), and its gradient (docs/design.md 2.3):
//! dP = dO V^T, dS = P (dP - delta) with delta = rowsum(dO * O), dQ = scale dS K,
//! dK = scale dS^T Q, dV = P^T dO. Independent of the chunk kernels (no tiling of keys, no online
//! softmax), and slow: O(Sq Sk H D) float64 operations, in register-blocked loops.
//!
//! Layouts (docs/design.md 3.1, 3.5), views with any strides `tensor_view` accepts:
//! - `q [Sq, H, D]`, `k` and `v [Sk, H_kv, D]`, `dout [Sq, H, D]`, of any element type that
//!   converts to double (double, float, bfloat16, half), read once and converted exactly;
//! - results row-major float64: `out [Sq, H, D]`, `lse [H, Sq]` (natural log), `dq [Sq, H, D]`,
//!   `dk` and `dv [Sk, H_kv, D]`;
//! - GQA: query head h uses key/value head h / (H / H_kv) (grouped order), H % H_kv == 0;
//! - masks by global position: query row i sits at `q_offset + i`, key row j at `k_offset + j`;
//!   causal: the key is visible iff k_offset + j <= q_offset + i. A row with no visible key has
//!   out = 0 and lse = -inf, and contributes nothing to any gradient;
//! - scale: 1/sqrt(D) unless given.
//!
//! Work is split over query heads on `threads` host threads with `parallel_for` (each head owns
//! its rows of out, lse, dq and a dk, dv partial; the partials are summed per key/value head in
//! head order afterwards), so MQA (H_kv = 1) uses every thread and the result does not depend on
//! the thread count. Memory beside the result: two float64 `[H, Sk, D]` partials in the backward.
#pragma once

#include "../../config.hpp"
#include "../../core/parallel_for.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../chunk_kernel.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! Mask, global offsets, scale and threads of the dense reference.
struct dense_reference_options {
  bool causal = false;           //!< causal by global position (see the file comment), else full
  index_t q_offset = 0;          //!< global position of query row 0, in tokens (>= 0)
  index_t k_offset = 0;          //!< global position of key row 0, in tokens (>= 0)
  std::optional<double> scale{}; //!< softmax scale (finite); 1/sqrt(D) when empty
  unsigned threads = 0; //!< host threads (work items are query heads); 0: all hardware threads
};

//! Output and gradients of the dense reference: row-major float64 vectors.
struct dense_reference_result {
  std::vector<double> out; //!< `[Sq, H, D]` attention output; 0 in rows with no visible key
  std::vector<double> lse; //!< `[H, Sq]` ln sum exp(scaled scores); -inf where out is 0 (no key)
  std::vector<double> dq;  //!< `[Sq, H, D]` d loss / d q, loss = sum(out * dout) (backward only)
  std::vector<double> dk;  //!< `[Sk, H_kv, D]` d loss / d k (backward only, else empty)
  std::vector<double> dv;  //!< `[Sk, H_kv, D]` d loss / d v (backward only, else empty)
};

namespace detail::dense_reference {

inline constexpr double inf = std::numeric_limits<double>::infinity();

// Number of visible keys of query row i: a prefix [0, n) of the key rows for both masks.
inline index_t visible_prefix(dense_reference_options const& o, index_t sk, index_t i) {
  if (!o.causal) return sk;
  index_t const n = o.q_offset + i - o.k_offset + 1; // keys with k_offset + j <= q_offset + i
  return std::clamp<index_t>(n, 0, sk);
}

// C[i, j] += sum_p A(i, p) B(p, j) for i < m, j < n, p < k, with A(i, p) = a[i * a_i + p * a_p],
// B(p, j) = b[p * b_p + j * b_j], C row-major with leading dimension ldc. Plain float64 loops in
// 4 x 4 register blocks (naive loops are several times slower at 4096 x 4096).
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

template <class T>
[[nodiscard]] status check(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                           tensor_view<T const, 3> const& v, tensor_view<T const, 3> const* dout,
                           dense_reference_options const& o, char const* who) {
  FPDT_TRY(detail::check_qkv(q, k, v, o.q_offset, o.k_offset, std::nullopt, who));
  if (o.scale && !std::isfinite(*o.scale))
    return make_error(errc::invalid_argument, who, ": softmax scale ", *o.scale, " is not finite");
  if (dout && dout->extents() != q.extents())
    return make_error(errc::shape_mismatch, who, ": dout ", detail::ext(*dout),
                      " must have the shape of q ", detail::ext(q));
  return {};
}

// The shared body: forward always, backward when dout is given. Per key/value head g and query
// head of its group, blocks of query rows against all keys any row of the block sees: dense
// scores S = Q K^T, the exact softmax of every row in float64 (max, exp, sum, log), O = P V; then
// dP = dO V^T, dS = P (dP - delta) with delta = rowsum(dO * O), dQ = dS K, dK += dS^T Q,
// dV += P^T dO (the scale applied to S and to dS).
template <class T>
[[nodiscard]] result<dense_reference_result>
attention(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
          tensor_view<T const, 3> const& v, tensor_view<T const, 3> const* dout,
          dense_reference_options const& o, char const* who) {
  FPDT_TRY(check(q, k, v, dout, o, who));
  index_t const sq = q.extent(0), sk = k.extent(0), h = q.extent(1), hkv = k.extent(1),
                d = q.extent(2), group = h / hkv;
  double const scale = o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(d));
  constexpr index_t block = 128;
  auto at = [](index_t x) { return static_cast<std::size_t>(x); };
  dense_reference_result r;
  r.out.assign(at(sq * h * d), 0.0);
  r.lse.assign(at(h * sq), -inf);
  if (dout) {
    r.dq.assign(at(sq * h * d), 0.0);
    r.dk.assign(at(sk * hkv * d), 0.0);
    r.dv.assign(at(sk * hkv * d), 0.0);
  }
  // One work item per query head (so MQA, H_kv = 1, still uses every thread). Each writes its
  // own rows of out, lse, dq and its own dK, dV partial [Sk, D]; the partials of a key/value
  // head's group are summed afterwards in query-head order, so the result does not depend on the
  // thread count.
  std::vector<double> dk_part, dv_part;
  if (dout) {
    dk_part.assign(at(h * sk * d), 0.0);
    dv_part.assign(at(h * sk * d), 0.0);
  }
  auto ran = parallel_for(at(h), o.threads, [&](std::size_t item, unsigned) {
    index_t const head = static_cast<index_t>(item), g = head / group;
    std::vector<double> kg(at(sk * d)), vg(at(sk * d));
    double* const dkg = dout ? dk_part.data() + at(head * sk * d) : nullptr;
    double* const dvg = dout ? dv_part.data() + at(head * sk * d) : nullptr;
    for (index_t j = 0; j < sk; ++j)
      for (index_t x = 0; x < d; ++x) {
        kg[at(j * d + x)] = static_cast<double>(k(j, g, x));
        vg[at(j * d + x)] = static_cast<double>(v(j, g, x));
      }
    std::vector<double> qb(at(block * d)), ob(at(block * d)), dob(at(block * d)),
        dqb(at(block * d));
    std::vector<double> pm, dsm; // [rows, n] scores -> probabilities, dP -> dS
    std::vector<index_t> vis(at(block));
    for (index_t i0 = 0; i0 < sq; i0 += block) {
      index_t const mb = std::min(block, sq - i0);
      index_t n = 0; // keys any row of the block sees (a prefix)
      for (index_t i = 0; i < mb; ++i) {
        vis[at(i)] = visible_prefix(o, sk, i0 + i);
        n = std::max(n, vis[at(i)]);
      }
      if (n == 0) continue; // every row empty: out 0, lse -inf, no gradient
      for (index_t i = 0; i < mb; ++i)
        for (index_t x = 0; x < d; ++x)
          qb[at(i * d + x)] = static_cast<double>(q(i0 + i, head, x));
      pm.assign(at(mb * n), 0.0);
      matmul(mb, n, d, qb.data(), d, 1, kg.data(), 1, d, pm.data(), n); // S = Q K^T
      for (index_t i = 0; i < mb; ++i) {
        double* row = &pm[at(i * n)];
        index_t const ni = vis[at(i)];
        if (ni == 0) {
          std::fill(row, row + n, 0.0);
          continue;
        }
        double m = -inf;
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
          dob[at(i * d + x)] = static_cast<double>((*dout)(i0 + i, head, x));
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
      matmul(n, d, mb, dsm.data(), 1, n, qb.data(), d, 1, dkg, d); // dK += dS^T Q
      matmul(n, d, mb, pm.data(), 1, n, dob.data(), d, 1, dvg, d); // dV += P^T dO
      for (index_t i = 0; i < mb; ++i)
        for (index_t x = 0; x < d; ++x)
          r.dq[at(((i0 + i) * h + head) * d + x)] = dqb[at(i * d + x)];
    }
  });
  if (!ran) return ran.error().with_context(who);
  if (dout)
    for (index_t g = 0; g < hkv; ++g)
      for (index_t hh = 0; hh < group; ++hh) {
        double const* pk = dk_part.data() + at((g * group + hh) * sk * d);
        double const* pv = dv_part.data() + at((g * group + hh) * sk * d);
        for (index_t j = 0; j < sk; ++j)
          for (index_t x = 0; x < d; ++x) {
            r.dk[at((j * hkv + g) * d + x)] += pk[at(j * d + x)];
            r.dv[at((j * hkv + g) * d + x)] += pv[at(j * d + x)];
          }
      }
  return r;
}

} // namespace detail::dense_reference

//! Float64 dense attention forward: `out [Sq, H, D]` and `lse [H, Sq]` (natural log; -inf and
//! out = 0 for rows with no visible key), of softmax(scale Q K^T + mask) V by its definition.
//!
//! \tparam T element type of the inputs, converted exactly to double (double, float, bf16, fp16).
//! \param q `[Sq, H, D]` queries.
//! \param k `[Sk, H_kv, D]` keys; query head h uses key/value head h / (H / H_kv).
//! \param v `[Sk, H_kv, D]` values.
//! \param opts mask (causal by global position or full), global offsets in tokens, scale, threads.
//! \return `dense_reference_result` with out and lse; dq, dk, dv empty.
//! Errors: `errc::shape_mismatch` when k and v differ, the head dimensions differ, D < 1, or H is
//! not a positive multiple of H_kv; `errc::invalid_argument` for negative offsets, positions at or
//! beyond 2^62 or a non-finite scale; each message names the shapes and the rule.
//! `errc::backend_error` when a worker fails (out of memory).
template <class T>
  requires std::is_convertible_v<T const&, double>
[[nodiscard]] result<dense_reference_result>
dense_reference_forward(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                        tensor_view<T const, 3> const& v,
                        dense_reference_options const& opts = {}) {
  return detail::dense_reference::attention<T>(q, k, v, nullptr, opts, "dense_reference_forward");
}

//! Float64 dense attention forward and backward: out and lse as `dense_reference_forward`, and
//! the gradients dq `[Sq, H, D]`, dk and dv `[Sk, H_kv, D]` of loss = sum(out * dout), by the
//! softmax backward of docs/design.md 2.3 (dS = P (dP - delta), delta = rowsum(dout * out)).
//!
//! \tparam T element type of the inputs, converted exactly to double (double, float, bf16, fp16).
//! \param q `[Sq, H, D]` queries.
//! \param k `[Sk, H_kv, D]` keys; query head h uses key/value head h / (H / H_kv).
//! \param v `[Sk, H_kv, D]` values.
//! \param dout `[Sq, H, D]` gradient of the output.
//! \param opts mask (causal by global position or full), global offsets in tokens, scale, threads.
//! \return `dense_reference_result` with out, lse, dq, dk and dv.
//! Errors: those of `dense_reference_forward`, and `errc::shape_mismatch` when dout does not have
//! the shape of q.
template <class T>
  requires std::is_convertible_v<T const&, double>
[[nodiscard]] result<dense_reference_result>
dense_reference_backward(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                         tensor_view<T const, 3> const& v, tensor_view<T const, 3> const& dout,
                         dense_reference_options const& opts = {}) {
  return detail::dense_reference::attention<T>(q, k, v, &dout, opts, "dense_reference_backward");
}

FPDT_NAMESPACE_END
