//! \file
//! \brief `cuda_flash_chunk_kernel`: the tensor-core CUDA chunk attention kernel (sm_80+).
//!
//! Models `chunk_kernel` for bf16 and fp16 inputs with fp32 accumulation, head dimensions 64 and
//! 128, full and causal masks by global position, GQA (docs/design.md 3, 3.5). FlashAttention-2
//! (Dao, 2023, Algorithms 1 and 2), written for `mma.sync.m16n8k16`:
//! - Forward: a block of 4 warps owns 64 query rows of one head (16 per warp, Q in registers);
//!   key/value tiles of 64 rows stream through double-buffered shared memory by `cp.async`; the
//!   scores, the online softmax (base 2, running max and sum per row) and the output accumulator
//!   live in registers; P is fed to the P V product straight from registers. The score matrix is
//!   never stored. Causal tiles above the diagonal are skipped, tiles on it masked.
//! - Backward: a block owns 64 keys of one key/value head (16 per warp) and walks the query
//!   tiles of every query head of its GQA group, recomputing P from the saved final LSE;
//!   dV += P^T dO and dK += dS^T Q accumulate in registers for the whole walk, then are added to
//!   the fp32 dk, dv once; dQ += dS K goes through shared memory (dS) and fp32 `atomicAdd`.
//!
//! Requirements on the tensors (else `errc::not_supported` naming the rule): q, k, v, dout with
//! contiguous D (stride 1), row and head strides multiples of 8 elements, 16-byte aligned data;
//! D in {64, 128}; a device of compute capability >= 8.0. out, lse, dq, dk, dv, delta: any strides.
#pragma once

#include "../../backend/cuda/cuda_check.hpp"
#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../chunk_kernel.hpp"
#include "../mask.hpp"
#include "device_checks.hpp"
#include "mma.cuh"
#include "reference_attention.cuh"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

namespace detail::cuda_flash {

inline constexpr float log2e = 1.4426950408889634f;
inline constexpr float ln2 = 0.6931471805599453f;

//! Tile sizes of the forward: BM query rows (16 per warp) by BN keys per step.
template <int D> struct fwd_config {
  static constexpr int warps = 4, threads = warps * 32, bm = 16 * warps, bn = 64;
  using q_tile = cuda_mma::swizzled_tile<bm, D>;
  using kv_tile = cuda_mma::swizzled_tile<bn, D>;
  //! Q, then two buffers each of K and V.
  static constexpr int smem_bytes = q_tile::bytes + 4 * kv_tile::bytes;
};

//! Tile sizes of the backward: BN keys per block (16 per warp) by BM queries per step; BM is 32
//! at D = 128 to keep dK, dV, S and dP in registers without spills.
template <int D> struct bwd_config {
  static constexpr int warps = 4, threads = warps * 32, bn = 16 * warps, bm = D >= 128 ? 32 : 64;
  using kv_tile = cuda_mma::swizzled_tile<bn, D>;
  using q_tile = cuda_mma::swizzled_tile<bm, D>;
  static constexpr int ds_stride = bm + 8; // dS^T [bn, bm] rows padded by 16 bytes
  static constexpr int ds_bytes = bn * ds_stride * 2;
  //! K, V, two buffers each of Q and dO, dS^T, two buffers of lse and delta (bm floats each).
  static constexpr int smem_bytes =
      2 * kv_tile::bytes + 4 * q_tile::bytes + ds_bytes + 4 * bm * 4;
};

//! Raw parameters shared by both kernels (element strides; pointers into device memory).
template <class T> struct params {
  T const* q;
  T const* k;
  T const* v;
  long long q_s0, q_s1, k_s0, k_s1, v_s0, v_s1;
  int sq, sk, h, group;
  long long q_offset, k_offset;
  bool causal;
  float scale_log2; // softmax scale * log2(e)
  float scale;
};

#if defined(__CUDACC__)

using namespace cuda_mma;

template <class T, int D>
__global__ void __launch_bounds__(fwd_config<D>::threads)
    forward_kernel(params<T> p, partial_view out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using cfg = fwd_config<D>;
  constexpr int bm = cfg::bm, bn = cfg::bn, kd = D / 16, nt = bn / 8, dt = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  std::uint32_t const s_q = smem_addr(smem);
  std::uint32_t const s_k0 = s_q + cfg::q_tile::bytes;
  auto k_buf = [&](int b) { return s_k0 + b * 2 * cfg::kv_tile::bytes; };
  auto v_buf = [&](int b) { return k_buf(b) + cfg::kv_tile::bytes; };

  int const tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  int const g = lane / 4, c = lane % 4;
  int const m0 = static_cast<int>(blockIdx.x) * bm;
  int const hq = static_cast<int>(blockIdx.y), hk = hq / p.group;
  int const rows = min(bm, p.sq - m0);

  // Keys any row of this block may see: [0, n_end).
  int n_end = p.sk;
  if (p.causal) {
    long long const last = p.q_offset + m0 + rows - 1 - p.k_offset + 1;
    n_end = static_cast<int>(last < 0 ? 0 : (last < p.sk ? last : p.sk));
  }
  int const tiles = (n_end + bn - 1) / bn;

  T const* qb = p.q + m0 * p.q_s0 + hq * p.q_s1;
  T const* kb = p.k + hk * p.k_s1;
  T const* vb = p.v + hk * p.v_s1;
  load_tile_async<bm, D, cfg::threads>(s_q, qb, p.q_s0, rows, tid);
  if (tiles > 0) {
    load_tile_async<bn, D, cfg::threads>(k_buf(0), kb, p.k_s0, min(bn, p.sk), tid);
    load_tile_async<bn, D, cfg::threads>(v_buf(0), vb, p.v_s0, min(bn, p.sk), tid);
  }
  cp_async_commit();

  std::uint32_t qf[kd][4];
  float o[dt][4];
#pragma unroll
  for (int i = 0; i < dt; ++i)
    o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  int const wrow = warp * 16; // first row of this warp in the block
  long long const qpos0 = p.q_offset + m0 + wrow + g; // global position of row g (row g+8: +8)

  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<0>();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < kd; ++kk)
        ldmatrix_x4(qf[kk], s_q + cfg::q_tile::offset(wrow + lane % 16, kk * 2 + lane / 16));
    }
    if (t + 1 < tiles) {
      int const n1 = (t + 1) * bn;
      load_tile_async<bn, D, cfg::threads>(k_buf((t + 1) & 1), kb + n1 * p.k_s0, p.k_s0,
                                           min(bn, p.sk - n1), tid);
      load_tile_async<bn, D, cfg::threads>(v_buf((t + 1) & 1), vb + n1 * p.v_s0, p.v_s0,
                                           min(bn, p.sk - n1), tid);
    }
    cp_async_commit();
    std::uint32_t const sk_t = k_buf(t & 1), sv_t = v_buf(t & 1);
    int const n0 = t * bn;

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[nt][4];
#pragma unroll
    for (int j = 0; j < nt; ++j)
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kd; ++kk) {
#pragma unroll
      for (int jj = 0; jj < nt / 2; ++jj) {
        std::uint32_t b[4];
        ldmatrix_x4(b, sk_t + cfg::kv_tile::offset(jj * 16 + lane % 8 + (lane / 16) * 8,
                                                   kk * 2 + (lane / 8) % 2));
        mma<T>(s[2 * jj], qf[kk], b[0], b[1]);
        mma<T>(s[2 * jj + 1], qf[kk], b[2], b[3]);
      }
    }

    // Scale to base 2, mask, and update the running max and sum.
    bool const need_mask =
        n0 + bn > p.sk || (p.causal && p.k_offset + n0 + bn - 1 > p.q_offset + m0 + wrow);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < nt; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * p.scale_log2;
        if (need_mask) {
          int const key = n0 + j * 8 + 2 * c + (e & 1);
          long long const qpos = qpos0 + (e >= 2 ? 8 : 0);
          if (key >= p.sk || (p.causal && p.k_offset + key > qpos)) x = -INFINITY;
        }
        s[j][e] = x;
        mx[e / 2] = fmaxf(mx[e / 2], x);
      }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      float const m_new = fmaxf(m_run[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new; // a row with nothing visible yet
      alpha[r] = fast_exp2(m_run[r] - m_use[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < dt; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    std::uint32_t pf[bn / 16][4];
#pragma unroll
    for (int j = 0; j < nt; ++j) {
      float const p0 = fast_exp2(s[j][0] - m_use[0]), p1 = fast_exp2(s[j][1] - m_use[0]);
      float const p2 = fast_exp2(s[j][2] - m_use[1]), p3 = fast_exp2(s[j][3] - m_use[1]);
      l_run[0] += p0 + p1;
      l_run[1] += p2 + p3;
      pf[j / 2][(j % 2) * 2 + 0] = pack2<T>(p0, p1);
      pf[j / 2][(j % 2) * 2 + 1] = pack2<T>(p2, p3);
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < bn / 16; ++kk) {
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        std::uint32_t b[4];
        ldmatrix_x4_trans(b, sv_t + cfg::kv_tile::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                                         dd * 2 + lane / 16));
        mma<T>(o[2 * dd], pf[kk], b[0], b[1]);
        mma<T>(o[2 * dd + 1], pf[kk], b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();

  // Normalise and write the partial state: out fp32 [Sq, H, D], lse [H, Sq] in ln.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    int const row = wrow + g + 8 * r;
    bool const empty = !(l > 0.0f);
    float const inv = empty ? 0.0f : 1.0f / l;
    if (row < rows) {
      index_t const i = m0 + row;
#pragma unroll
      for (int d8 = 0; d8 < dt; ++d8) {
        out.out(i, hq, d8 * 8 + 2 * c) = o[d8][2 * r] * inv;
        out.out(i, hq, d8 * 8 + 2 * c + 1) = o[d8][2 * r + 1] * inv;
      }
      if (c == 0) out.lse(hq, i) = empty ? -INFINITY : (m_run[r] + __log2f(l)) * ln2;
    }
  }
#else
  (void)p, (void)out;
  __trap();
#endif
}

template <class T, int D>
__global__ void __launch_bounds__(bwd_config<D>::threads)
    backward_kernel(params<T> p, T const* dout, long long do_s0, long long do_s1,
                    tensor_view<float const, 2> lse, tensor_view<float const, 2> delta,
                    tensor_view<float, 3> dq, tensor_view<float, 3> dk, tensor_view<float, 3> dv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using cfg = bwd_config<D>;
  constexpr int bm = cfg::bm, bn = cfg::bn, kd = D / 16, qt = bm / 8, dt = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  std::uint32_t const s_k = smem_addr(smem);
  std::uint32_t const s_v = s_k + cfg::kv_tile::bytes;
  std::uint32_t const s_q0 = s_v + cfg::kv_tile::bytes;
  auto q_buf = [&](int b) { return s_q0 + b * 2 * cfg::q_tile::bytes; };
  auto do_buf = [&](int b) { return q_buf(b) + cfg::q_tile::bytes; };
  unsigned char* const ds_ptr = smem + 2 * cfg::kv_tile::bytes + 4 * cfg::q_tile::bytes;
  std::uint32_t const s_ds = smem_addr(ds_ptr);
  float* const s_lse = reinterpret_cast<float*>(ds_ptr + cfg::ds_bytes); // [2][bm]
  float* const s_delta = s_lse + 2 * bm;                                  // [2][bm]

  int const tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  int const g = lane / 4, c = lane % 4;
  int const n0 = static_cast<int>(blockIdx.x) * bn;
  int const hk = static_cast<int>(blockIdx.y);
  int const keys = min(bn, p.sk - n0);

  // Query rows that may see a key of this block: [m_begin, sq).
  int m_begin = 0;
  if (p.causal) {
    long long const first = p.k_offset + n0 - p.q_offset;
    m_begin = static_cast<int>(first <= 0 ? 0 : (first < p.sq ? first : p.sq));
  }
  int const tile0 = m_begin / bm;
  int const tiles_per_head = (p.sq + bm - 1) / bm - tile0;
  int const steps = tiles_per_head * p.group;

  auto load_step = [&](int step, int buf) {
    int const hq = hk * p.group + step / tiles_per_head;
    int const m0 = (tile0 + step % tiles_per_head) * bm;
    int const rows = min(bm, p.sq - m0);
    load_tile_async<bm, D, cfg::threads>(q_buf(buf), p.q + m0 * p.q_s0 + hq * p.q_s1, p.q_s0, rows,
                                         tid);
    load_tile_async<bm, D, cfg::threads>(do_buf(buf), dout + m0 * do_s0 + hq * do_s1, do_s0, rows,
                                         tid);
    for (int r = tid; r < bm; r += cfg::threads) {
      bool const ok = r < rows;
      // Padding rows get lse = +inf: their probabilities are exactly 0.
      s_lse[buf * bm + r] = ok ? lse(hq, m0 + r) * log2e : INFINITY;
      s_delta[buf * bm + r] = ok ? delta(hq, m0 + r) : 0.0f;
    }
  };

  load_tile_async<bn, D, cfg::threads>(s_k, p.k + n0 * p.k_s0 + hk * p.k_s1, p.k_s0, keys, tid);
  load_tile_async<bn, D, cfg::threads>(s_v, p.v + n0 * p.v_s0 + hk * p.v_s1, p.v_s0, keys, tid);
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  float dkacc[dt][4], dvacc[dt][4];
#pragma unroll
  for (int i = 0; i < dt; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      dkacc[i][e] = dvacc[i][e] = 0.0f;
  int const wkey = warp * 16; // first key of this warp in the block
  long long const kpos0 = p.k_offset + n0 + wkey + g; // global position of key row g (+8: row g+8)

  // dQ work split: warp w computes m-tile (w % mtiles) and a 1/dsplit share of the d-tiles.
  constexpr int mtiles = bm / 16, dsplit = cfg::warps / mtiles, dts = dt / dsplit;
  int const dq_m = (warp % mtiles) * 16, dq_d0 = (warp / mtiles) * dts;

  for (int step = 0; step < steps; ++step) {
    int const buf = step & 1;
    cp_async_wait<0>();
    __syncthreads(); // tiles of this step are in; every warp is done with the previous step
    if (step + 1 < steps) load_step(step + 1, buf ^ 1);
    cp_async_commit();
    int const hq = hk * p.group + step / tiles_per_head;
    int const m0 = (tile0 + step % tiles_per_head) * bm;
    std::uint32_t const sq_t = q_buf(buf), sdo_t = do_buf(buf);
    float const* lse_t = s_lse + buf * bm;
    float const* delta_t = s_delta + buf * bm;

    // S^T = K_w Q^T and dP^T = V_w dO^T: [16 keys, bm queries] per warp.
    float s[qt][4], dp[qt][4];
#pragma unroll
    for (int j = 0; j < qt; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kd; ++kk) {
      std::uint32_t ka[4], va[4];
      ldmatrix_x4(ka, s_k + cfg::kv_tile::offset(wkey + lane % 16, kk * 2 + lane / 16));
      ldmatrix_x4(va, s_v + cfg::kv_tile::offset(wkey + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int jj = 0; jj < qt / 2; ++jj) {
        std::uint32_t b[4];
        int const row = jj * 16 + lane % 8 + (lane / 16) * 8, chunk = kk * 2 + (lane / 8) % 2;
        ldmatrix_x4(b, sq_t + cfg::q_tile::offset(row, chunk));
        mma<T>(s[2 * jj], ka, b[0], b[1]);
        mma<T>(s[2 * jj + 1], ka, b[2], b[3]);
        ldmatrix_x4(b, sdo_t + cfg::q_tile::offset(row, chunk));
        mma<T>(dp[2 * jj], va, b[0], b[1]);
        mma<T>(dp[2 * jj + 1], va, b[2], b[3]);
      }
    }

    // P^T = exp2(S^T scale log2e - lse2), masked; dS^T = P^T (dP^T - delta).
    bool const need_mask = m0 + bm > p.sq || n0 + bn > p.sk ||
                           (p.causal && p.k_offset + n0 + wkey + 15 > p.q_offset + m0);
    std::uint32_t pa[bm / 16][4], dsa[bm / 16][4];
#pragma unroll
    for (int j = 0; j < qt; ++j) {
      float pv[4], dsv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int const qloc = j * 8 + 2 * c + (e & 1);
        float const l2 = lse_t[qloc];
        float pr = fminf(fast_exp2(s[j][e] * p.scale_log2 - l2), 1.0f);
        if (!(l2 > -INFINITY)) pr = 0.0f; // a row with no visible key at all
        if (need_mask) {
          long long const kpos = kpos0 + (e >= 2 ? 8 : 0);
          int const key = n0 + wkey + g + (e >= 2 ? 8 : 0);
          if (key >= p.sk || (p.causal && kpos > p.q_offset + m0 + qloc)) pr = 0.0f;
        }
        pv[e] = pr;
        dsv[e] = pr * (dp[j][e] - delta_t[qloc]);
      }
      pa[j / 2][(j % 2) * 2 + 0] = pack2<T>(pv[0], pv[1]);
      pa[j / 2][(j % 2) * 2 + 1] = pack2<T>(pv[2], pv[3]);
      std::uint32_t const d01 = pack2<T>(dsv[0], dsv[1]), d23 = pack2<T>(dsv[2], dsv[3]);
      dsa[j / 2][(j % 2) * 2 + 0] = d01;
      dsa[j / 2][(j % 2) * 2 + 1] = d23;
      // dS^T [key][query] to shared memory for the dQ product.
      auto* ds16 = reinterpret_cast<std::uint32_t*>(ds_ptr);
      ds16[((wkey + g) * cfg::ds_stride + j * 8 + 2 * c) / 2] = d01;
      ds16[((wkey + g + 8) * cfg::ds_stride + j * 8 + 2 * c) / 2] = d23;
    }

    // dV += P^T dO and dK += dS^T Q: [16 keys, D] per warp.
#pragma unroll
    for (int kk = 0; kk < bm / 16; ++kk) {
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        std::uint32_t b[4];
        int const row = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, chunk = dd * 2 + lane / 16;
        ldmatrix_x4_trans(b, sdo_t + cfg::q_tile::offset(row, chunk));
        mma<T>(dvacc[2 * dd], pa[kk], b[0], b[1]);
        mma<T>(dvacc[2 * dd + 1], pa[kk], b[2], b[3]);
        ldmatrix_x4_trans(b, sq_t + cfg::q_tile::offset(row, chunk));
        mma<T>(dkacc[2 * dd], dsa[kk], b[0], b[1]);
        mma<T>(dkacc[2 * dd + 1], dsa[kk], b[2], b[3]);
      }
    }
    __syncthreads(); // dS^T complete

    // dQ[m-tile, d share] += scale * dS K, added to the fp32 dq with atomics.
    {
      std::uint32_t af[bn / 16][4];
#pragma unroll
      for (int kk = 0; kk < bn / 16; ++kk) {
        int const key = kk * 16 + lane % 8 + (lane / 16) * 8;
        int const col = dq_m + ((lane / 8) % 2) * 8;
        ldmatrix_x4_trans(af[kk], s_ds + static_cast<std::uint32_t>((key * cfg::ds_stride + col) * 2));
      }
#pragma unroll
      for (int dd = 0; dd < dts / 2; ++dd) {
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        int const dtile = dq_d0 + 2 * dd;
#pragma unroll
        for (int kk = 0; kk < bn / 16; ++kk) {
          std::uint32_t b[4];
          ldmatrix_x4_trans(b, s_k + cfg::kv_tile::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                                          dtile + lane / 16));
          mma<T>(acc[0], af[kk], b[0], b[1]);
          mma<T>(acc[1], af[kk], b[2], b[3]);
        }
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int const qrow = m0 + dq_m + g + (e >= 2 ? 8 : 0);
            int const col = (dtile + h2) * 8 + 2 * c + (e & 1);
            if (qrow < p.sq) atomicAdd(&dq(qrow, hq, col), acc[h2][e] * p.scale);
          }
      }
    }
  }
  cp_async_wait<0>();

  // This block alone owns keys [n0, n0 + bn) of head hk: plain read-add-write.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int const key = n0 + wkey + g + 8 * r;
    if (key >= p.sk) continue;
#pragma unroll
    for (int d8 = 0; d8 < dt; ++d8)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        int const col = d8 * 8 + 2 * c + e;
        dk(key, hk, col) += dkacc[d8][2 * r + e] * p.scale;
        dv(key, hk, col) += dvacc[d8][2 * r + e];
      }
  }
#else
  (void)p, (void)dout, (void)do_s0, (void)do_s1, (void)lse, (void)delta, (void)dq, (void)dk,
      (void)dv;
  __trap();
#endif
}

#endif // __CUDACC__

//! Checks the layout rules of the tensor-core kernels for one 16-bit input tensor.
template <class T>
[[nodiscard]] status check_mma_layout(tensor_view<T const, 3> const& t, char const* name,
                                      char const* who) {
  if (t.empty()) return {};
  auto const addr = reinterpret_cast<std::uintptr_t>(t.data());
  if (t.stride(2) != 1 || t.stride(0) % 8 != 0 || t.stride(1) % 8 != 0 || addr % 16 != 0)
    return make_error(errc::not_supported, who, ": ", name, " must have contiguous D (stride 1, got ",
                      t.stride(2), "), row and head strides that are multiples of 8 elements (got ",
                      t.stride(0), " and ", t.stride(1), ") and 16-byte aligned data (got ",
                      t.data(), "); use cuda_reference_chunk_kernel for other layouts");
  return {};
}

template <class T, class Args>
[[nodiscard]] status check_common(Args const& a, char const* who) {
  index_t const d = a.q.extent(2);
  if (d != 64 && d != 128)
    return make_error(errc::not_supported, who, ": head dimension D = ", d,
                      " is not one of 64, 128 (use cuda_reference_chunk_kernel)");
  constexpr index_t max_int = 0x7fffffff;
  if (a.q.extent(0) > max_int || a.k.extent(0) > max_int || a.q.extent(1) > 65535)
    return make_error(errc::not_supported, who, ": Sq = ", a.q.extent(0), ", Sk = ", a.k.extent(0),
                      ", H = ", a.q.extent(1), " must be below 2^31, 2^31 and 65536");
  if (a.mask.limits_by_position())
    return make_error(errc::not_supported, who, ": the mask (", to_string(a.mask),
                      ") has a sliding window or documents, which this kernel does not apply yet (use "
                      "cuda_reference_chunk_kernel or the host kernel)");
  FPDT_TRY(check_mma_layout(a.q, "q", who));
  FPDT_TRY(check_mma_layout(a.k, "k", who));
  FPDT_TRY(check_mma_layout(a.v, "v", who));
  FPDT_TRY(cuda_reference::check_pointers(a, who));
  auto cc = cuda_attention::current_compute_capability();
  if (!cc) return cc.error();
  if (*cc < 80)
    return make_error(errc::not_supported, who, ": needs compute capability >= 8.0 (tensor-core "
                      "mma.sync for bf16/fp16), the current device has ", *cc / 10, ".", *cc % 10);
  return {};
}

template <class T, class Args> [[nodiscard]] params<T> make_params(Args const& a) {
  params<T> p{};
  p.q = a.q.data();
  p.k = a.k.data();
  p.v = a.v.data();
  p.q_s0 = a.q.stride(0);
  p.q_s1 = a.q.stride(1);
  p.k_s0 = a.k.stride(0);
  p.k_s1 = a.k.stride(1);
  p.v_s0 = a.v.stride(0);
  p.v_s1 = a.v.stride(1);
  p.sq = static_cast<int>(a.q.extent(0));
  p.sk = static_cast<int>(a.k.extent(0));
  p.h = static_cast<int>(a.q.extent(1));
  p.group = static_cast<int>(a.q.extent(1) / a.k.extent(1));
  p.q_offset = a.q_offset;
  p.k_offset = a.k_offset;
  p.causal = a.mask.kind == mask_kind::causal;
  p.scale = resolve_scale(a.scale, a.q.extent(2));
  p.scale_log2 = p.scale * log2e;
  return p;
}

} // namespace detail::cuda_flash

//! The tensor-core chunk kernel (see the file comment); launches on `stream`, asynchronously.
//!
//! For `T` = `bfloat16` or `half`. Errors: those of `check_args`; `errc::not_supported` for head
//! dimensions other than 64 and 128, layouts it cannot load with 16-byte copies, or a device below
//! sm_80; `errc::invalid_argument` for pageable host pointers; `errc::backend_error` naming the
//! CUDA call when a launch fails.
struct cuda_flash_chunk_kernel {
  cudaStream_t stream = nullptr; //!< stream the kernels are launched on (0: the legacy stream)

  //! Partial forward of one chunk pair into `a.out` (fp32 out `[Sq, H, D]`, lse `[H, Sq]`, ln).
  template <class T>
    requires detail::cuda_mma::is_mma_type<T>
  [[nodiscard]] status forward(chunk_forward_args<T> const& a) const {
    constexpr char const* who = "cuda_flash_chunk_kernel forward";
    FPDT_TRY(check_args(a));
    FPDT_TRY((detail::cuda_flash::check_common<T>(a, who)));
    if (a.q.extent(0) == 0) return {};
    auto const p = detail::cuda_flash::make_params<T>(a);
    return a.q.extent(2) == 64 ? launch_forward<T, 64>(p, a.out) : launch_forward<T, 128>(p, a.out);
  }

  //! Backward of one chunk pair: adds into fp32 `dq`, `dk`, `dv` (docs/design.md 2.3); needs the final
  //! merged `lse` and `delta`.
  template <class T>
    requires detail::cuda_mma::is_mma_type<T>
  [[nodiscard]] status backward(chunk_backward_args<T> const& a) const {
    constexpr char const* who = "cuda_flash_chunk_kernel backward";
    FPDT_TRY(check_args(a));
    FPDT_TRY((detail::cuda_flash::check_common<T>(a, who)));
    FPDT_TRY(detail::cuda_flash::check_mma_layout(a.dout, "dout", who));
    if (a.q.extent(0) == 0 || a.k.extent(0) == 0) return {};
    auto const p = detail::cuda_flash::make_params<T>(a);
    return a.q.extent(2) == 64 ? launch_backward<T, 64>(p, a) : launch_backward<T, 128>(p, a);
  }

private:
  template <class T, int D>
  [[nodiscard]] status launch_forward(detail::cuda_flash::params<T> const& p,
                                      partial_view const& out) const {
    using cfg = detail::cuda_flash::fwd_config<D>;
    auto* kernel = detail::cuda_flash::forward_kernel<T, D>;
    FPDT_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cfg::smem_bytes));
    dim3 const grid(static_cast<unsigned>((p.sq + cfg::bm - 1) / cfg::bm),
                    static_cast<unsigned>(p.h));
    kernel<<<grid, cfg::threads, cfg::smem_bytes, stream>>>(p, out);
    return detail::cuda_attention::check_launch("cuda_flash_chunk_kernel forward launch");
  }

  template <class T, int D>
  [[nodiscard]] status launch_backward(detail::cuda_flash::params<T> const& p,
                                       chunk_backward_args<T> const& a) const {
    using cfg = detail::cuda_flash::bwd_config<D>;
    auto* kernel = detail::cuda_flash::backward_kernel<T, D>;
    FPDT_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cfg::smem_bytes));
    dim3 const grid(static_cast<unsigned>((p.sk + cfg::bn - 1) / cfg::bn),
                    static_cast<unsigned>(a.k.extent(1)));
    kernel<<<grid, cfg::threads, cfg::smem_bytes, stream>>>(
        p, a.dout.data(), a.dout.stride(0), a.dout.stride(1), a.lse, a.delta, a.dq, a.dk, a.dv);
    return detail::cuda_attention::check_launch("cuda_flash_chunk_kernel backward launch");
  }
};

FPDT_NAMESPACE_END
