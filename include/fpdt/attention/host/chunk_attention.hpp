//! \file
//! \brief `host_chunk_kernel`: the host (CPU) chunk attention kernel, forward and backward.
//!
//! Models `chunk_kernel` for fp32, bf16 and fp16 inputs with fp32 accumulation, any head
//! dimension (32, 64, 128, 256 are the common ones), full and causal masks by global position,
//! and GQA in grouped head order. It is the reference every other backend is held to, and fast
//! enough to train small models on the host:
//! - FlashAttention-2's tiling (Dao, 2023, Algorithms 1 and 2): a block of query rows against key
//!   tiles with the online softmax in registers-sized scratch; the score matrix never exists
//!   beyond one tile. All query heads of one GQA group share each key/value tile.
//! - Tile products are small register-blocked GEMMs (micro-tiles of 8 x 32 floats with AVX-512,
//!   6 x 16 with AVX2, 4 x 8 with SSE2, one native register per vector) written with GCC/Clang
//!   vector extensions, reading either operand layout so no tile is transposed in memory; they run
//!   near OpenBLAS's sgemm rate at these sizes, so no BLAS is needed. exp is a polynomial exp2
//!   (1.5 u measured), vectorised explicitly in the softmax and its backward. Compile with
//!   -march=native (or at least AVX2 and FMA) for speed.
//! - Precision: scores stay unscaled until the running max (forward) or lse (backward) is
//!   subtracted, and only the small difference is scaled to log2 units, so a weight carries a few
//!   ulps of error however large the scores or the lse (tests/attention/chunk_kernel_precision.cpp).
//! - Work items (GQA group x query block forward, GQA group x key block backward) are handed out
//!   to `threads` host threads, head-major; each thread keeps the operands of the kv head it is on
//!   packed as contiguous fp32 (forward: k, v `[Sk, D]`; backward: q, dout `[H/H_kv, Sq, D]`), so
//!   tiles are read sequentially whatever the caller's strides, and bf16/fp16 are converted once.
//!   In the backward, dk and dv of a key block belong to one item; items are dealt round-robin to
//!   one slot per thread, and dq accumulates in per-slot buffers (`[Sq, H, D]` fp32 each, for slots
//!   beyond the first) summed in slot order at the end: results are bit-identical from run to run
//!   for a given thread count.
//!
//! Scratch is ordinary heap memory owned by the call (the host kernel stands for device code; the
//! device arena counts the pipeline's buffers, not a kernel's registers). Per thread, in fp32
//! elements: forward 2 Sk D (the packed kv head) plus tiles; backward 2 (H/H_kv) Sq D (packed q and
//! dout) plus Sq H D for the dq buffer of every slot after the first, plus tiles.
#pragma once

#include "../../config.hpp"
#include "../../core/bfloat16.hpp"
#include "../../core/half.hpp"
#include "../../core/parallel_for.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../chunk_kernel.hpp"
#include "fwd.hpp"
#include "../mask.hpp"

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

FPDT_NAMESPACE_BEGIN

namespace detail::host_attention {

inline constexpr float log2e = 1.4426950408889634f;
inline constexpr float ninf = -std::numeric_limits<float>::infinity();

// 2^x without a libm call, so loops over it vectorise. Round-to-nearest split x = n + f with
// |f| <= 1/2, 2^f by its Taylor series to degree 7 (truncation < 6e-9), 2^n through the exponent
// bits. x <= -127 (including -inf) gives exactly 0; x is clamped at 127.
FPDT_FORCEINLINE float exp2(float x) noexcept {
  x = x < -127.0f ? -127.0f : x;
  x = x > 127.0f ? 127.0f : x;
  constexpr float shifter = 12582912.0f; // 1.5 * 2^23: x + shifter rounds x to an integer
  float const t = x + shifter;
  float const f = x - (t - shifter);
  std::int32_t const n = FPDT_BIT_CAST(std::int32_t, t) - FPDT_BIT_CAST(std::int32_t, shifter);
  float p = 1.525273380405984e-05f;
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  return p * FPDT_BIT_CAST(float, static_cast<std::int32_t>((n + 127) << 23));
}

// log2 of the softmax weight exp(s scale - lse), for exp2. s scale - lse is formed in double (the
// product of two floats is exact there) and rounded once, and only that small difference is
// scaled to log2 units: s c - lse log2e in fp32 would carry (|s c| + |lse|) ulps into every
// weight, which is what made dq lose digits when all scores share a large offset (issue 22).
// min(., 0): a weight never exceeds 1, even when lse's rounding would push it above.
FPDT_FORCEINLINE float log2_weight(float s, float scale, float lse) noexcept {
#if defined(__FMA__)
  float const x = std::fma(s, scale, -lse); // one instruction: exact product, one rounding
#else
  float const x = static_cast<float>(static_cast<double>(s) * scale - lse);
#endif
  return (x < 0.0f ? x : 0.0f) * log2e;
}

// The micro-tile: mr rows x nv vectors of vw floats, in GCC/Clang vector-extension form, one
// native register per vector. (16-float vectors on AVX2, loaded through memcpy, ran at a tenth
// of the FMA rate: issue 22.)
#if defined(__AVX512F__)
inline constexpr index_t vw = 16; // floats per vector: one zmm
inline constexpr index_t mr = 8;  // 8 x 2 zmm accumulators
inline constexpr index_t nv = 2;
#elif defined(__AVX__)
inline constexpr index_t vw = 8;  // one ymm
inline constexpr index_t mr = 6;  // 6 x 2 ymm accumulators (of 16 ymm)
inline constexpr index_t nv = 2;
#else
inline constexpr index_t vw = 4;  // one xmm (SSE2)
inline constexpr index_t mr = 4;  // 4 x 2 xmm accumulators (of 16 xmm)
inline constexpr index_t nv = 2;
#endif
#if defined(__GNUC__) && !defined(__NVCC__)
// may_alias and aligned(4): loads and stores straight from float arrays (memcpy into a vector went
// through the stack in 16-byte pieces on GCC 12).
typedef float vecf __attribute__((vector_size(vw * sizeof(float)), aligned(4), may_alias));
typedef std::int32_t veci __attribute__((vector_size(vw * sizeof(float))));

FPDT_FORCEINLINE vecf load(float const* p) noexcept { return *reinterpret_cast<vecf const*>(p); }
FPDT_FORCEINLINE void store(float* p, vecf x) noexcept { *reinterpret_cast<vecf*>(p) = x; }
FPDT_FORCEINLINE vecf splat(float x) noexcept { return vecf{} + x; }

// exp2 on vw lanes: the scalar exp2's operations, lane by lane.
FPDT_FORCEINLINE vecf exp2(vecf x) noexcept {
  x = x < splat(-127.0f) ? splat(-127.0f) : x;
  x = x > splat(127.0f) ? splat(127.0f) : x;
  vecf const shifter = splat(12582912.0f);
  vecf const t = x + shifter;
  vecf const f = x - (t - shifter);
  veci const n = FPDT_BIT_CAST(veci, t) - FPDT_BIT_CAST(veci, shifter);
  vecf p = splat(1.525273380405984e-05f);
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  veci const e = (n + 127) << 23;
  return p * FPDT_BIT_CAST(vecf, e);
}
#endif

// row[r] = exp2((row[r] - m[r]) c), l[r] += row[r] for r < n: the forward's weights of one key
// against n query rows.
FPDT_FORCEINLINE void softmax_weights(float* row, float const* m, float* l, index_t n,
                                      float c) noexcept {
  index_t r = 0;
#if defined(__GNUC__) && !defined(__NVCC__)
  for (; r + vw <= n; r += vw) {
    vecf const p = exp2((load(row + r) - load(m + r)) * c);
    store(row + r, p);
    store(l + r, load(l + r) + p);
  }
#endif
  for (; r < n; ++r) {
    float const p = exp2((row[r] - m[r]) * c);
    row[r] = p;
    l[r] += p;
  }
}

// The backward's weights and score gradients of one query row against n keys, in place:
// p[t] = exp(s_t scale - lse) from the score s_t = p[t]; ds[t] = p (dP_t - delta) scale from
// dP_t = ds[t].
FPDT_FORCEINLINE void softmax_grad(float* p, float* ds, index_t n, float scale, float lse,
                                   float delta) noexcept {
  index_t t = 0;
#if defined(__GNUC__) && !defined(__NVCC__) && defined(__FMA__) && (defined(__AVX512F__) || defined(__AVX__))
  for (; t + vw <= n; t += vw) {
#if defined(__AVX512F__)
    vecf x = FPDT_BIT_CAST(vecf, _mm512_fmadd_ps(FPDT_BIT_CAST(__m512, load(p + t)),
                                                 _mm512_set1_ps(scale), _mm512_set1_ps(-lse)));
#else
    vecf x = FPDT_BIT_CAST(vecf, _mm256_fmadd_ps(FPDT_BIT_CAST(__m256, load(p + t)),
                                                 _mm256_set1_ps(scale), _mm256_set1_ps(-lse)));
#endif
    x = (x < splat(0.0f) ? x : splat(0.0f)) * log2e; // as log2_weight
    vecf const pv = exp2(x);
    store(p + t, pv);
    store(ds + t, pv * (load(ds + t) - delta) * scale);
  }
#endif
  for (; t < n; ++t) {
    float const pv = exp2(log2_weight(p[t], scale, lse));
    p[t] = pv;
    ds[t] = pv * (ds[t] - delta) * scale;
  }
}

// A(r, p) of a row-major m x k matrix (TransA false) or of the transpose of a row-major k x m
// matrix (TransA true, element (r, p) at a[p * lda + r]).
template <bool TransA>
FPDT_FORCEINLINE float a_at(float const* a, index_t lda, index_t r, index_t p) noexcept {
  return TransA ? a[p * lda + r] : a[r * lda + p];
}

// C[m x n] += A[m x k] * B[k x n]; B and C row-major (ldb, ldc), A as in a_at. The full
// mr x (vw nv) tiles run in a register-blocked micro-kernel; edges in plain loops that vectorise
// along the row.
template <bool TransA = false>
inline void gemm_acc(index_t m, index_t n, index_t k, float const* a, index_t lda, float const* b,
                     index_t ldb, float* c, index_t ldc) noexcept {
  index_t i = 0;
#if defined(__GNUC__) && !defined(__NVCC__)
  constexpr index_t nr = vw * nv;
  for (; i + mr <= m; i += mr) {
    index_t j = 0;
    for (; j + nr <= n; j += nr) {
      vecf acc[mr][nv];
#pragma GCC unroll 8
      for (index_t r = 0; r < mr; ++r)
#pragma GCC unroll 2
        for (index_t v = 0; v < nv; ++v)
          acc[r][v] = *reinterpret_cast<vecf const*>(c + (i + r) * ldc + j + vw * v);
      for (index_t p = 0; p < k; ++p) {
        vecf bv[nv];
#pragma GCC unroll 2
        for (index_t v = 0; v < nv; ++v)
          bv[v] = *reinterpret_cast<vecf const*>(b + p * ldb + j + vw * v);
#pragma GCC unroll 8
        for (index_t r = 0; r < mr; ++r) {
          float const x = a_at<TransA>(a, lda, i + r, p);
#pragma GCC unroll 2
          for (index_t v = 0; v < nv; ++v) acc[r][v] += bv[v] * x;
        }
      }
#pragma GCC unroll 8
      for (index_t r = 0; r < mr; ++r)
#pragma GCC unroll 2
        for (index_t v = 0; v < nv; ++v)
          *reinterpret_cast<vecf*>(c + (i + r) * ldc + j + vw * v) = acc[r][v];
    }
    for (index_t r = 0; r < mr && j < n; ++r) {
      float* cr = c + (i + r) * ldc;
      for (index_t p = 0; p < k; ++p) {
        float const x = a_at<TransA>(a, lda, i + r, p);
        float const* bp = b + p * ldb;
        for (index_t t = j; t < n; ++t) cr[t] += x * bp[t];
      }
    }
  }
#endif
  for (; i < m; ++i) {
    float* cr = c + i * ldc;
    for (index_t p = 0; p < k; ++p) {
      float const x = a_at<TransA>(a, lda, i, p);
      float const* bp = b + p * ldb;
      for (index_t t = 0; t < n; ++t) cr[t] += x * bp[t];
    }
  }
}

// dst[0..d) = float(v(row, head, 0..d))
template <class T>
FPDT_FORCEINLINE void load_row(float* dst, tensor_view<T const, 3> const& v, index_t row,
                               index_t head, index_t d) noexcept {
  if (v.stride(2) == 1) {
    T const* src = &v(row, head, 0);
    for (index_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (index_t i = 0; i < d; ++i) dst[i] = static_cast<float>(v(row, head, i));
  }
}

// v(row, head, 0..d) += src[0..d)
FPDT_FORCEINLINE void add_row(tensor_view<float, 3> const& v, index_t row, index_t head,
                              float const* src, index_t d) noexcept {
  if (v.stride(2) == 1) {
    float* dst = &v(row, head, 0);
    for (index_t i = 0; i < d; ++i) dst[i] += src[i];
  } else {
    for (index_t i = 0; i < d; ++i) v(row, head, i) += src[i];
  }
}

// dst[i * ld + t] = float(v(j0 + t, head, i)) for t < nb, 0 for nb <= t < ld: a transposed tile.
template <class T>
inline void load_transposed(float* dst, index_t ld, tensor_view<T const, 3> const& v, index_t j0,
                            index_t nb, index_t head, index_t d) noexcept {
  for (index_t t = 0; t < nb; ++t)
    for (index_t i = 0; i < d; ++i) dst[i * ld + t] = static_cast<float>(v(j0 + t, head, i));
  for (index_t i = 0; i < d; ++i)
    for (index_t t = nb; t < ld; ++t) dst[i * ld + t] = 0.0f;
}

inline constexpr index_t block_q = 128; // query rows per head per forward item / backward q tile
inline constexpr index_t block_k = 64; // keys per tile

} // namespace detail::host_attention

//! Element types the host kernel accepts: float, fpdt::bfloat16, fpdt::half.
template <class T>
concept host_attention_element =
    std::same_as<T, float> || std::same_as<T, bfloat16> || std::same_as<T, half>;

//! The host chunk attention kernel (models `chunk_kernel<host_chunk_kernel, T>` for T = float,
//! fpdt::bfloat16, fpdt::half).
//!
//! Forward: writes the partial state `out [Sq, H, D]` fp32 and `lse [H, Sq]` fp32 (ln) of `q`
//! against `k`, `v`. Backward: accumulates fp32 dq, dk, dv using the final `lse` and `delta`.
//! Errors: the shape errors of `check_args`; `errc::backend_error` if a worker thread fails.
struct host_chunk_kernel {
  unsigned threads = 0; //!< host threads to use; 0 = all hardware threads

  //! Forward of one chunk pair (FlashAttention-2 Algorithm 1, LSE in natural log).
  template <class T>
    requires host_attention_element<T>
  [[nodiscard]] status forward(chunk_forward_args<T> const& a) const {
    namespace ha = detail::host_attention;
    FPDT_TRY(check_args(a));
    index_t const sq = a.q.extent(0), h = a.q.extent(1), d = a.q.extent(2);
    index_t const sk = a.k.extent(0), hkv = a.k.extent(1), group = h / hkv;
    if (sq == 0) return {};
    // Scores stay unscaled until the running max is subtracted: (s - m) * c is exact to a few
    // ulps of the (small) difference, where s * c - m * c would carry |s| c ulps into exp2.
    float const scale = resolve_scale(a.scale, d);
    float const c = scale * ha::log2e;
    index_t const q_blocks = (sq + ha::block_q - 1) / ha::block_q;
    index_t const rows = group * ha::block_q;
    std::size_t const items = static_cast<std::size_t>(hkv * q_blocks);
    unsigned const workers = parallel_workers(items, threads);
    struct scratch {
      std::vector<float> qt, k, v, st, o, m, l, alpha;
      std::vector<index_t> lo, hi;
      index_t packed_head = -1; // kv head whose k and v are in `k`, `v` ([Sk, D] fp32 each)
    };
    std::vector<scratch> ws(workers);
    for (auto& w : ws) {
      w.qt.resize(static_cast<std::size_t>(d * rows));
      w.k.resize(static_cast<std::size_t>(sk * d));
      w.v.resize(static_cast<std::size_t>(sk * d));
      w.st.resize(static_cast<std::size_t>(ha::block_k * rows));
      w.o.resize(static_cast<std::size_t>(rows * d));
      for (auto* x : {&w.m, &w.l, &w.alpha}) x->resize(static_cast<std::size_t>(rows));
      w.lo.resize(static_cast<std::size_t>(rows));
      w.hi.resize(static_cast<std::size_t>(rows));
    }
    // Scores are computed transposed, S^T = K Q^T ([keys x rows]), so the key rows are read as
    // they are stored and the softmax runs along the rows' columns, vectorised over queries; then
    // O += P V takes P^T as a transposed operand. No tile is ever transposed in memory. Each
    // worker keeps the kv head it is on packed as contiguous fp32 (items are ordered head-major,
    // so it repacks only when it moves to the next head).
    auto run = parallel_for(items, workers, [&](std::size_t item, unsigned worker) {
      scratch& w = ws[worker];
      index_t const g = static_cast<index_t>(item) / q_blocks;
      index_t const i0 = static_cast<index_t>(item) % q_blocks * ha::block_q;
      index_t const bq = std::min(ha::block_q, sq - i0);
      index_t const nrows = group * bq; // column r = hh * bq + i
      index_t kb = sk, ke = 0;          // keys any row of this block may see
      index_t lo_max = 0, hi_min = sk;  // keys every row of this block sees: [lo_max, hi_min)
      for (index_t i = 0; i < bq; ++i) {
        key_range const kr = a.mask.local_keys(a.q_offset + i0 + i, a.k_offset, sk);
        if (kr.begin < kr.end) {
          kb = std::min(kb, kr.begin);
          ke = std::max(ke, kr.end);
        }
        lo_max = std::max(lo_max, kr.begin);
        hi_min = std::min(hi_min, kr.end);
        for (index_t hh = 0; hh < group; ++hh) {
          w.lo[static_cast<std::size_t>(hh * bq + i)] = kr.begin;
          w.hi[static_cast<std::size_t>(hh * bq + i)] = kr.end;
        }
      }
      if (w.packed_head != g && kb < ke) {
        for (index_t t = 0; t < sk; ++t) {
          ha::load_row(&w.k[static_cast<std::size_t>(t * d)], a.k, t, g, d);
          ha::load_row(&w.v[static_cast<std::size_t>(t * d)], a.v, t, g, d);
        }
        w.packed_head = g;
      }
      for (index_t hh = 0; hh < group; ++hh)
        for (index_t i = 0; i < bq; ++i)
          for (index_t x = 0; x < d; ++x)
            w.qt[static_cast<std::size_t>(x * rows + hh * bq + i)] =
                static_cast<float>(a.q(i0 + i, g * group + hh, x));
      std::fill(w.o.begin(), w.o.begin() + nrows * d, 0.0f);
      std::fill(w.m.begin(), w.m.begin() + nrows, ha::ninf);
      std::fill(w.l.begin(), w.l.begin() + nrows, 0.0f);
      float* const m = w.m.data();
      float* const l = w.l.data();
      float* const alpha = w.alpha.data();
      index_t const* const lo = w.lo.data();
      index_t const* const hi = w.hi.data();
      for (index_t j0 = kb; j0 < ke; j0 += ha::block_k) {
        index_t const nb = std::min(ha::block_k, ke - j0);
        bool const all_visible = lo_max <= j0 && j0 + nb <= hi_min;
        float const* const kt = &w.k[static_cast<std::size_t>(j0 * d)];
        float const* const vt = &w.v[static_cast<std::size_t>(j0 * d)];
        float* const st = w.st.data();
        std::fill(st, st + nb * rows, 0.0f);
        ha::gemm_acc(nb, nrows, d, kt, d, w.qt.data(), rows, st, rows);
        for (index_t r = 0; r < nrows; ++r) alpha[r] = ha::ninf; // tile max per column
        for (index_t t = 0; t < nb; ++t) {
          float const* row = st + t * rows;
          if (all_visible) {
            for (index_t r = 0; r < nrows; ++r) alpha[r] = std::max(alpha[r], row[r]);
          } else {
            for (index_t r = 0; r < nrows; ++r) {
              bool const vis = j0 + t >= lo[r] && j0 + t < hi[r];
              alpha[r] = std::max(alpha[r], vis ? row[r] : ha::ninf);
            }
          }
        }
        for (index_t r = 0; r < nrows; ++r) { // alpha: tile max -> rescale factor; m: new max
          float const m_new = std::max(m[r], alpha[r]);
          alpha[r] = m_new == ha::ninf ? 1.0f : ha::exp2((m[r] - m_new) * c);
          m[r] = m_new;
        }
        for (index_t r = 0; r < nrows; ++r) l[r] *= alpha[r];
        for (index_t t = 0; t < nb; ++t) {
          float* row = st + t * rows;
          if (all_visible) {
            ha::softmax_weights(row, m, l, nrows, c);
          } else {
            for (index_t r = 0; r < nrows; ++r) {
              bool const vis = j0 + t >= lo[r] && j0 + t < hi[r];
              float const p = vis ? ha::exp2((row[r] - m[r]) * c) : 0.0f;
              row[r] = p;
              l[r] += p;
            }
          }
        }
        for (index_t r = 0; r < nrows; ++r)
          if (alpha[r] != 1.0f) {
            float* o = &w.o[static_cast<std::size_t>(r * d)];
            for (index_t x = 0; x < d; ++x) o[x] *= alpha[r];
          }
        ha::gemm_acc<true>(nrows, d, nb, st, rows, vt, d, w.o.data(), d);
      }
      for (index_t hh = 0; hh < group; ++hh)
        for (index_t i = 0; i < bq; ++i) {
          index_t const r = hh * bq + i, head = g * group + hh;
          float const* o = &w.o[static_cast<std::size_t>(r * d)];
          if (l[r] > 0.0f) {
            float const inv = 1.0f / l[r];
            if (a.out.out.stride(2) == 1) {
              float* dst = &a.out.out(i0 + i, head, 0);
              for (index_t x = 0; x < d; ++x) dst[x] = o[x] * inv;
            } else {
              for (index_t x = 0; x < d; ++x) a.out.out(i0 + i, head, x) = o[x] * inv;
            }
            // In double, rounded once: lse = m scale + ln l.
            a.out.lse(head, i0 + i) = static_cast<float>(static_cast<double>(m[r]) * scale +
                                                         std::log(static_cast<double>(l[r])));
          } else { // no visible key: out 0, lse -inf (docs/design.md 3.2)
            for (index_t x = 0; x < d; ++x) a.out.out(i0 + i, head, x) = 0.0f;
            a.out.lse(head, i0 + i) = ha::ninf;
          }
        }
    });
    return run.error();
  }

  //! Backward of one chunk pair (FlashAttention-2 Algorithm 2): accumulates fp32 dq, dk, dv.
  template <class T>
    requires host_attention_element<T>
  [[nodiscard]] status backward(chunk_backward_args<T> const& a) const {
    namespace ha = detail::host_attention;
    FPDT_TRY(check_args(a));
    index_t const sq = a.q.extent(0), h = a.q.extent(1), d = a.q.extent(2);
    index_t const sk = a.k.extent(0), hkv = a.k.extent(1), group = h / hkv;
    if (sq == 0 || sk == 0) return {};
    float const scale = resolve_scale(a.scale, d);
    index_t const k_blocks = (sk + ha::block_k - 1) / ha::block_k;
    std::size_t const items = static_cast<std::size_t>(hkv * k_blocks);
    unsigned const workers = parallel_workers(items, threads);
    std::size_t const dq_size = static_cast<std::size_t>(sq * h * d);
    struct scratch {
      std::vector<float> k, kt, vt, q, dout, s, dp, dk, dv, dq_tile, dq;
      index_t packed_head = -1; // kv head whose query heads' q and dout are in `q`, `dout`
    };
    std::vector<scratch> ws(workers);
    constexpr index_t bq = ha::block_q, bk = ha::block_k;
    for (unsigned i = 0; i < workers; ++i) {
      scratch& w = ws[i];
      w.k.resize(static_cast<std::size_t>(bk * d));
      w.kt.resize(static_cast<std::size_t>(d * bk));
      w.vt.resize(static_cast<std::size_t>(d * bk));
      w.q.resize(static_cast<std::size_t>(group * sq * d)); // [group, Sq, D] fp32, packed per head
      w.dout.resize(static_cast<std::size_t>(group * sq * d));
      w.s.resize(static_cast<std::size_t>(bq * bk));
      w.dp.resize(static_cast<std::size_t>(bq * bk));
      w.dk.resize(static_cast<std::size_t>(bk * d));
      w.dv.resize(static_cast<std::size_t>(bk * d));
      w.dq_tile.resize(static_cast<std::size_t>(bq * d));
      if (i > 0) w.dq.assign(dq_size, 0.0f); // slot 0 adds into the caller's dq directly
    }
    bool const dq_direct = a.dq.stride(2) == 1;
    // Items are dealt to `workers` slots round-robin (slot s: items s, s + workers, ...), each
    // slot with its own dq buffer, whichever thread runs it: dq is summed in the same order on
    // every run with the same thread count (a shared queue made it depend on the schedule).
    auto process = [&](std::size_t item, unsigned worker) {
      scratch& w = ws[worker];
      index_t const g = static_cast<index_t>(item) / k_blocks;
      index_t const j0 = static_cast<index_t>(item) % k_blocks * bk;
      index_t const nb = std::min(bk, sk - j0);
      for (index_t t = 0; t < nb; ++t) ha::load_row(&w.k[static_cast<std::size_t>(t * d)], a.k, j0 + t, g, d);
      ha::load_transposed(w.kt.data(), bk, a.k, j0, nb, g, d);
      ha::load_transposed(w.vt.data(), bk, a.v, j0, nb, g, d);
      std::fill(w.dk.begin(), w.dk.end(), 0.0f);
      std::fill(w.dv.begin(), w.dv.end(), 0.0f);
      if (w.packed_head != g) { // items are ordered head-major: repack only on a new kv head
        for (index_t hh = 0; hh < group; ++hh)
          for (index_t i = 0; i < sq; ++i) {
            std::size_t const at = static_cast<std::size_t>((hh * sq + i) * d);
            ha::load_row(&w.q[at], a.q, i, g * group + hh, d);
            ha::load_row(&w.dout[at], a.dout, i, g * group + hh, d);
          }
        w.packed_head = g;
      }
      for (index_t i0 = 0; i0 < sq; i0 += bq) {
        index_t const mq = std::min(bq, sq - i0);
        // Skip query tiles that see none of these keys.
        bool any = false;
        for (index_t i = 0; i < mq && !any; ++i) {
          key_range const kr = a.mask.local_keys(a.q_offset + i0 + i, a.k_offset, sk);
          any = std::max(kr.begin, j0) < std::min(kr.end, j0 + nb);
        }
        if (!any) continue;
        for (index_t hh = 0; hh < group; ++hh) {
          index_t const head = g * group + hh;
          float const* const qt = &w.q[static_cast<std::size_t>((hh * sq + i0) * d)];
          float const* const dot = &w.dout[static_cast<std::size_t>((hh * sq + i0) * d)];
          std::fill(w.s.begin(), w.s.end(), 0.0f);
          std::fill(w.dp.begin(), w.dp.end(), 0.0f);
          ha::gemm_acc(mq, nb, d, qt, d, w.kt.data(), bk, w.s.data(), bk);
          ha::gemm_acc(mq, nb, d, dot, d, w.vt.data(), bk, w.dp.data(), bk);
          for (index_t i = 0; i < mq; ++i) {
            key_range const kr = a.mask.local_keys(a.q_offset + i0 + i, a.k_offset, sk);
            index_t const lo = std::max<index_t>(kr.begin - j0, 0), hi = std::min<index_t>(kr.end - j0, nb);
            float const lse = a.lse(head, i0 + i);
            float const delta = a.delta(head, i0 + i);
            float* p = &w.s[static_cast<std::size_t>(i * bk)];
            float* ds = &w.dp[static_cast<std::size_t>(i * bk)];
            bool const empty = lse == ha::ninf || lo >= hi;
            if (!empty && lo == 0 && hi == nb) { // the whole tile is visible to this row
              ha::softmax_grad(p, ds, nb, scale, lse, delta); // dS pre-scaled for dq, dk
            } else {
              for (index_t t = 0; t < nb; ++t) {
                float const pv =
                    (!empty && t >= lo && t < hi)
                        ? ha::exp2(ha::log2_weight(p[t], scale, lse))
                        : 0.0f;
                p[t] = pv;
                ds[t] = pv * (ds[t] - delta) * scale;
              }
            }
          }
          // dV += P^T dO ; dK += dS^T Q (P and dS read as transposed operands) ; dQ += dS K
          ha::gemm_acc<true>(nb, d, mq, w.s.data(), bk, dot, d, w.dv.data(), d);
          ha::gemm_acc<true>(nb, d, mq, w.dp.data(), bk, qt, d, w.dk.data(), d);
          // dQ accumulates in place (no tile to zero and add): rows i0.. of head `head`.
          if (worker != 0) {
            ha::gemm_acc(mq, d, nb, w.dp.data(), bk, w.k.data(), d,
                         &w.dq[static_cast<std::size_t>((i0 * h + head) * d)], h * d);
          } else if (dq_direct) {
            ha::gemm_acc(mq, d, nb, w.dp.data(), bk, w.k.data(), d, &a.dq(i0, head, 0),
                         a.dq.stride(0));
          } else {
            std::fill(w.dq_tile.begin(), w.dq_tile.end(), 0.0f);
            ha::gemm_acc(mq, d, nb, w.dp.data(), bk, w.k.data(), d, w.dq_tile.data(), d);
            for (index_t i = 0; i < mq; ++i)
              ha::add_row(a.dq, i0 + i, head, &w.dq_tile[static_cast<std::size_t>(i * d)], d);
          }
        }
      }
      for (index_t t = 0; t < nb; ++t) {
        ha::add_row(a.dk, j0 + t, g, &w.dk[static_cast<std::size_t>(t * d)], d);
        ha::add_row(a.dv, j0 + t, g, &w.dv[static_cast<std::size_t>(t * d)], d);
      }
    };
    auto run = parallel_for(workers, workers, [&](std::size_t slot, unsigned) {
      for (std::size_t item = slot; item < items; item += workers)
        process(item, static_cast<unsigned>(slot));
    });
    if (!run.ok()) return run.error();
    for (unsigned i = 1; i < workers; ++i)
      for (index_t s = 0; s < sq; ++s)
        for (index_t hh = 0; hh < h; ++hh)
          ha::add_row(a.dq, s, hh, &ws[i].dq[static_cast<std::size_t>((s * h + hh) * d)], d);
    return {};
  }
};

static_assert(chunk_kernel<host_chunk_kernel, float>);
static_assert(!chunk_kernel<host_chunk_kernel, double>, "the host kernel takes fp32, bf16, fp16");

FPDT_NAMESPACE_END
