//! \file
//! \brief `cuda_reference_chunk_kernel`: a plain CUDA chunk attention kernel, obviously correct,
//! the yardstick for the fast kernels on the GPU.
//!
//! Models `chunk_kernel` for fp32, bf16 and fp16 inputs, any strides, head dimension D <= 256,
//! full and causal masks by global position, GQA (docs/design.md 3). One warp per (query row, query
//! head); each lane holds D/32 elements of the row. Forward: the online softmax of FlashAttention
//! (Dao et al. 2022, Algorithm 1) one key at a time, in fp32 with `expf`. Backward: one warp per
//! (query row, head) walks the visible keys, p = exp(s - lse) clamped to 1, dp = dout . v,
//! ds = p (dp - delta); dq accumulates in registers, dk and dv with fp32 `atomicAdd`.
//! Slow (no tiling, no tensor cores) by design: use `cuda_flash_chunk_kernel` for speed.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../chunk_kernel.hpp"
#include "../mask.hpp"
#include "device_checks.hpp"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

FPDT_NAMESPACE_BEGIN

namespace detail::cuda_reference {

inline constexpr int warps_per_block = 4;
inline constexpr int max_per_lane = 8; // D <= 32 * 8

#if defined(__CUDACC__)
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The (query row, query head) this warp owns, its key/value head and this thread's lane.
struct row_of_warp {
  index_t d, i, hq, hk;
  int lane;
  bool valid;
  template <class Q, class K> __device__ row_of_warp(Q const& q, K const& k) {
    index_t const h = q.extent(1);
    index_t const item = static_cast<index_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
    valid = item < q.extent(0) * h;
    d = q.extent(2);
    i = item / h;
    hq = item % h;
    hk = hq / (h / k.extent(1));
    lane = static_cast<int>(threadIdx.x % 32);
  }
};

template <class T>
__global__ void __launch_bounds__(warps_per_block * 32)
    forward_kernel(chunk_forward_args<T> a, float scale) {
  row_of_warp const w(a.q, a.k);
  if (!w.valid) return;
  index_t const d = w.d, i = w.i, hq = w.hq, hk = w.hk;
  int const lane = w.lane;
  float q[max_per_lane], acc[max_per_lane];
#pragma unroll
  for (int e = 0; e < max_per_lane; ++e) {
    index_t const c = lane + 32 * e;
    q[e] = c < d ? static_cast<float>(a.q(i, hq, c)) : 0.0f;
    acc[e] = 0.0f;
  }
  key_range const r = a.mask.local_keys(a.q_offset + i, a.k_offset, a.k.extent(0));
  float m = -INFINITY, l = 0.0f;
  for (index_t j = r.begin; j < r.end; ++j) {
    float part = 0.0f;
#pragma unroll
    for (int e = 0; e < max_per_lane; ++e) {
      index_t const c = lane + 32 * e;
      if (c < d) part += q[e] * static_cast<float>(a.k(j, hk, c));
    }
    float const s = warp_sum(part) * scale;
    float const m_new = fmaxf(m, s);
    float const corr = expf(m - m_new); // m = -inf on the first key: 0
    float const p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int e = 0; e < max_per_lane; ++e) {
      index_t const c = lane + 32 * e;
      if (c < d) acc[e] = acc[e] * corr + p * static_cast<float>(a.v(j, hk, c));
    }
    m = m_new;
  }
  bool const empty = !(l > 0.0f);
#pragma unroll
  for (int e = 0; e < max_per_lane; ++e) {
    index_t const c = lane + 32 * e;
    if (c < d) a.out.out(i, hq, c) = empty ? 0.0f : acc[e] / l;
  }
  if (lane == 0) a.out.lse(hq, i) = empty ? -INFINITY : m + logf(l);
}

template <class T>
__global__ void __launch_bounds__(warps_per_block * 32)
    backward_kernel(chunk_backward_args<T> a, float scale) {
  row_of_warp const w(a.q, a.k);
  if (!w.valid) return;
  index_t const d = w.d, i = w.i, hq = w.hq, hk = w.hk;
  int const lane = w.lane;
  float const lse = a.lse(hq, i), delta = a.delta(hq, i);
  if (!(lse > -INFINITY)) return; // no visible key anywhere: every gradient term is 0
  float q[max_per_lane], dout[max_per_lane], dq[max_per_lane];
#pragma unroll
  for (int e = 0; e < max_per_lane; ++e) {
    index_t const c = lane + 32 * e;
    q[e] = c < d ? static_cast<float>(a.q(i, hq, c)) : 0.0f;
    dout[e] = c < d ? static_cast<float>(a.dout(i, hq, c)) : 0.0f;
    dq[e] = 0.0f;
  }
  key_range const r = a.mask.local_keys(a.q_offset + i, a.k_offset, a.k.extent(0));
  for (index_t j = r.begin; j < r.end; ++j) {
    float sp = 0.0f, dpp = 0.0f;
#pragma unroll
    for (int e = 0; e < max_per_lane; ++e) {
      index_t const c = lane + 32 * e;
      if (c < d) {
        sp += q[e] * static_cast<float>(a.k(j, hk, c));
        dpp += dout[e] * static_cast<float>(a.v(j, hk, c));
      }
    }
    float const s = warp_sum(sp) * scale, dp = warp_sum(dpp);
    float const p = fminf(expf(s - lse), 1.0f); // exact softmax is <= 1; rounding may not be
    float const ds = p * (dp - delta);
#pragma unroll
    for (int e = 0; e < max_per_lane; ++e) {
      index_t const c = lane + 32 * e;
      if (c < d) {
        dq[e] += ds * scale * static_cast<float>(a.k(j, hk, c));
        atomicAdd(&a.dk(j, hk, c), ds * scale * q[e]);
        atomicAdd(&a.dv(j, hk, c), p * dout[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < max_per_lane; ++e) {
    index_t const c = lane + 32 * e;
    if (c < d) a.dq(i, hq, c) += dq[e]; // this warp alone owns row (i, hq)
  }
}
#endif // __CUDACC__

template <class Args> [[nodiscard]] status check_pointers(Args const& a, char const* who) {
  // Empty tensors are never dereferenced: their pointers may be anything.
  auto check = [who](auto const& t, char const* name) {
    return detail::cuda_attention::check_device_pointer(t.empty() ? nullptr : t.data(), name, who);
  };
  FPDT_TRY(check(a.q, "q"));
  FPDT_TRY(check(a.k, "k"));
  FPDT_TRY(check(a.v, "v"));
  if (a.mask.documents > 0) // the kernel reads the offsets on the device
    FPDT_TRY(detail::cuda_attention::check_device_pointer(a.mask.document_offsets, "mask document_offsets", who));
  if constexpr (requires { a.out.lse; }) {
    FPDT_TRY(check(a.out.out, "out"));
    FPDT_TRY(check(a.out.lse, "lse"));
  } else {
    FPDT_TRY(check(a.dout, "dout"));
    FPDT_TRY(check(a.lse, "lse"));
    FPDT_TRY(check(a.delta, "delta"));
    FPDT_TRY(check(a.dq, "dq"));
    FPDT_TRY(check(a.dk, "dk"));
    FPDT_TRY(check(a.dv, "dv"));
  }
  return {};
}

} // namespace detail::cuda_reference

//! The plain CUDA chunk kernel (see the file comment); launches on `stream`, asynchronously.
//!
//! All tensors must be memory the current device can address (device, managed or pinned).
//! Errors: those of `check_args`; `errc::invalid_argument` for pageable host pointers;
//! `errc::not_supported` for D > 256; `errc::backend_error` naming the CUDA call on a failed launch.
struct cuda_reference_chunk_kernel {
  cudaStream_t stream = nullptr; //!< stream the kernels are launched on (0: the legacy stream)

  //! Partial forward of one chunk pair into `a.out` (fp32 out `[Sq, H, D]`, lse `[H, Sq]`, ln).
  template <class T> [[nodiscard]] status forward(chunk_forward_args<T> const& a) const {
    FPDT_TRY(check_args(a));
    FPDT_TRY(check_head_dim(a.q.extent(2), "cuda_reference_chunk_kernel forward"));
    FPDT_TRY(detail::cuda_reference::check_pointers(a, "cuda_reference_chunk_kernel forward"));
    return launch(a, detail::cuda_reference::forward_kernel<T>, "forward_kernel launch");
  }

  //! Backward of one chunk pair: adds into fp32 `dq`, `dk`, `dv` (docs/design.md 2.3).
  template <class T> [[nodiscard]] status backward(chunk_backward_args<T> const& a) const {
    FPDT_TRY(check_args(a));
    FPDT_TRY(check_head_dim(a.q.extent(2), "cuda_reference_chunk_kernel backward"));
    FPDT_TRY(detail::cuda_reference::check_pointers(a, "cuda_reference_chunk_kernel backward"));
    return launch(a, detail::cuda_reference::backward_kernel<T>, "backward_kernel launch");
  }

private:
  [[nodiscard]] static status check_head_dim(index_t d, char const* who) {
    if (d > 32 * detail::cuda_reference::max_per_lane)
      return make_error(errc::not_supported, who, ": head dimension D = ", d,
                        " exceeds the reference kernel's limit of ",
                        32 * detail::cuda_reference::max_per_lane);
    return {};
  }

  template <class Args, class Kernel>
  [[nodiscard]] status launch(Args const& a, Kernel* kernel, char const* what) const {
    index_t const items = a.q.extent(0) * a.q.extent(1);
    if (items == 0) return {};
    index_t const blocks = (items + detail::cuda_reference::warps_per_block - 1) /
                           detail::cuda_reference::warps_per_block;
    if (blocks > 0x7fffffff)
      return make_error(errc::not_supported, "cuda_reference_chunk_kernel: Sq * H = ", items,
                        " rows need more than 2^31 - 1 blocks");
    float const scale = resolve_scale(a.scale, a.q.extent(2));
    kernel<<<static_cast<unsigned>(blocks), detail::cuda_reference::warps_per_block * 32, 0,
             stream>>>(a, scale);
    return detail::cuda_attention::check_launch(what);
  }
};

FPDT_NAMESPACE_END
