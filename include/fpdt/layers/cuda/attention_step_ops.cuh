//! \file
//! \brief `attention_step_ops<cuda_backend>`: `fpdt_attention`'s elementwise steps as CUDA
//! kernels on the lane's stream, so the FPDT layer runs on a GPU.
//!
//! docs/design.md 2.2, 2.3, 3. Each step is one small kernel (or `cudaMemsetAsync`) queued on the stream
//! the executor hands the step; nothing synchronizes. They are memory-bound and O(C H D) per
//! chunk, against the chunk kernel's O(C^2 H D):
//! - merge: one warp per (token, head) row; lane l merges elements l, l + 32, ... with
//!   `merge_row` (the host's merge formula; empty rows come out bit for bit as on the host, finite
//!   rows to fp32 rounding, as the device's expf/log1pf differ from the host library's by an ulp),
//!   and lane 0 writes the new lse. `first` merges into the empty state (out 0, lse -inf), which
//!   takes the partial bit for bit;
//! - finalize and row copies: one warp per (token, head) row, lanes along D, converting fp32 to the
//!   model dtype with round-to-nearest-even (`bfloat16`/`half` constructors); column copies: one
//!   thread per element. The copies check that both pointers are memory the device can address
//!   (`errc::invalid_argument` naming pageable host memory, instead of a fault);
//! - delta = rowsum(dout * out): one warp per row, fp32 sums, a shuffle reduction;
//! - zero: `cudaMemsetAsync`;
//! - Ulysses pack and unpack (`sequence_parallel_attention` around the NCCL all-to-all): one
//!   warp per packed row (rank, token, head), lanes along D; an unpack that sums replicated
//!   key/value heads has one warp per destination row, each lane adding its elements' blocks in
//!   rank order, as the host does (no atomics, so the sum is deterministic and equal to the
//!   host's).
//!
//! The chunk kernel must have a `cudaStream_t stream` member (the CUDA kernels of
//! `attention/cuda/` and `external_chunk_kernel` do): the step copies the kernel, sets the copy's
//! stream to the compute lane's and calls it. Include through `<fpdt/fpdt.cuh>` (nvcc).
#pragma once

#if !defined(__CUDACC__)
#error "fpdt/layers/cuda/attention_step_ops.cuh launches kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include "../../attention/chunk_kernel.hpp"
#include "../../attention/cuda/device_checks.hpp"
#include "../../attention/online_softmax.hpp"
#include "../../backend/cuda/cuda_backend.hpp"
#include "../../backend/cuda/cuda_check.hpp"
#include "../../config.hpp"
#include "../../core/bfloat16.hpp"
#include "../../core/half.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../attention_step_ops.hpp"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

namespace detail::cuda_steps {

inline constexpr int threads = 256;        // per block
inline constexpr index_t max_blocks = 4096; // grid-stride loops cover the rest

// Blocks for `items` work items of `per_block` items each, at least 1 and at most max_blocks.
[[nodiscard]] inline unsigned blocks_for(index_t items, index_t per_block) noexcept {
  index_t const b = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

__device__ __forceinline__ index_t global_thread() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ index_t grid_threads() {
  return static_cast<index_t>(gridDim.x) * blockDim.x;
}

// acc <- first ? part : merge(acc, part), one warp per (token, head) row. A template, as every
// kernel in a header: a plain __global__ function would be defined in each translation unit.
template <class = void>
__global__ void merge_kernel(partial_view acc, partial_cview part, bool first) {
  index_t const sq = acc.out.extent(0), h = acc.out.extent(1), d = acc.out.extent(2);
  index_t const lane = threadIdx.x & 31;
  for (index_t r = global_thread() / 32; r < sq * h; r += grid_threads() / 32) {
    index_t const s = r / h, hh = r % h;
    float l1 = first ? -INFINITY : acc.lse(hh, s);
    float const l2 = part.lse(hh, s);
    if (lane < d) {
      index_t const n = (d - lane + 31) / 32;
      merge_row(&acc.out(s, hh, lane), l1, &part.out(s, hh, lane), l2, n, 32 * acc.out.stride(2),
                32 * part.out.stride(2));
    }
    __syncwarp(); // every lane has read acc.lse(hh, s) before lane 0 writes it
    if (lane == 0) acc.lse(hh, s) = l1;
  }
}

// dst(dst_row0 + r, h, i) = D(src(src_row0 + r, h, i)), one warp per (token, head) row, lanes
// along D (coalesced for contiguous D; one index division per row, not per element).
template <class S, class D>
__global__ void copy_rows_kernel(tensor_view<S, 3> src, index_t src_row0, tensor_view<D, 3> dst,
                                 index_t dst_row0, index_t rows) {
  index_t const h = dst.extent(1), d = dst.extent(2);
  index_t const lane = threadIdx.x & 31;
  for (index_t w = global_thread() / 32; w < rows * h; w += grid_threads() / 32) {
    index_t const r = w / h, hh = w % h;
    for (index_t i = lane; i < d; i += 32)
      dst(dst_row0 + r, hh, i) = static_cast<std::remove_const_t<D>>(src(src_row0 + r, hh, i));
  }
}

// dst(h, dst_col0 + c) = src(h, src_col0 + c), one thread per element.
template <class S, class D>
__global__ void copy_columns_kernel(tensor_view<S, 2> src, index_t src_col0,
                                    tensor_view<D, 2> dst, index_t dst_col0, index_t cols) {
  index_t const h = dst.extent(0);
  for (index_t e = global_thread(); e < h * cols; e += grid_threads()) {
    index_t const c = e % cols, hh = e / cols;
    dst(hh, dst_col0 + c) = static_cast<std::remove_const_t<D>>(src(hh, src_col0 + c));
  }
}

// delta(h, s) = sum_i out(s, h, i) * dout(s, h, i) in fp32, one warp per (token, head) row.
template <class T>
__global__ void delta_kernel(tensor_view<T const, 3> out, tensor_view<T const, 3> dout,
                             tensor_view<float, 2> delta) {
  index_t const sq = out.extent(0), h = out.extent(1), d = out.extent(2);
  index_t const lane = threadIdx.x & 31;
  for (index_t r = global_thread() / 32; r < sq * h; r += grid_threads() / 32) {
    index_t const s = r / h, hh = r % h;
    float acc = 0.0f;
    for (index_t i = lane; i < d; i += 32)
      acc += static_cast<float>(out(s, hh, i)) * static_cast<float>(dout(s, hh, i));
    for (int off = 16; off > 0; off /= 2)
      acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta(hh, s) = acc;
  }
}
// The Ulysses pack and unpack kernels run one warp per packed row (r, s, h), lanes along D, as
// copy_rows_kernel: three index divisions per row of D elements rather than five 64-bit
// divisions per element, and coalesced on both sides for contiguous D.

// (r, s, h) of packed row w = (r * m.rows + s) * m.heads + h.
struct packed_row {
  index_t r, s, h;
};
__device__ __forceinline__ packed_row packed_row_of(index_t w, ulysses_blocks const& m) {
  index_t const t = w / m.heads;
  return {t / m.rows, t % m.rows, w % m.heads};
}

// send[r][s][h][x] = src(m.row0(r) + s, m.head0(r) + h, x).
template <class U>
__global__ void ulysses_pack_kernel(tensor_view<U const, 3> src, U* send, ulysses_blocks m) {
  index_t const d = src.extent(2), rows = m.ranks * m.rows * m.heads;
  index_t const lane = threadIdx.x & 31;
  for (index_t w = global_thread() / 32; w < rows; w += grid_threads() / 32) {
    packed_row const p = packed_row_of(w, m);
    U* const out = send + w * d;
    for (index_t x = lane; x < d; x += 32) out[x] = src(m.row0(p.r) + p.s, m.head0(p.r) + p.h, x);
  }
}

// dst(m.row0(r) + s, m.head0(r) + h, x) = recv[r][s][h][x].
template <class U>
__global__ void ulysses_unpack_kernel(U const* recv, tensor_view<U, 3> dst, ulysses_blocks m) {
  index_t const d = dst.extent(2), rows = m.ranks * m.rows * m.heads;
  index_t const lane = threadIdx.x & 31;
  for (index_t w = global_thread() / 32; w < rows; w += grid_threads() / 32) {
    packed_row const p = packed_row_of(w, m);
    U const* const in = recv + w * d;
    for (index_t x = lane; x < d; x += 32) dst(m.row0(p.r) + p.s, m.head0(p.r) + p.h, x) = in[x];
  }
}

// The summing unpack (m.add: replicated key/value heads, blocks of one head and rows from 0): one
// warp per row (s, h) of dst [rows, heads of dst, D], lanes along D, adding the blocks that cover
// head h in rank order (the first assigned, then fp32 additions, as detail::ulysses::unpack on
// the host).
template <class U>
__global__ void ulysses_unpack_sum_kernel(U const* recv, tensor_view<U, 3> dst, ulysses_blocks m) {
  index_t const d = dst.extent(2), hd = dst.extent(1), rows = m.rows * hd;
  index_t const lane = threadIdx.x & 31;
  for (index_t w = global_thread() / 32; w < rows; w += grid_threads() / 32) {
    index_t const s = w / hd, h = w % hd;
    for (index_t x = lane; x < d; x += 32) {
      U acc{};
      bool any = false;
      for (index_t r = 0; r < m.ranks; ++r) {
        index_t const h0 = m.head0(r);
        if (h < h0 || h >= h0 + m.heads) continue;
        U const v = recv[((r * m.rows + s) * m.heads + (h - h0)) * d + x];
        acc = any ? static_cast<U>(static_cast<float>(acc) + static_cast<float>(v)) : v;
        any = true;
      }
      if (any) dst(s, h, x) = acc;
    }
  }
}
} // namespace detail::cuda_steps

//! `fpdt_attention`'s steps on `cuda_backend` (see the file comment). Every member queues its
//! work on `s` and returns; errors: `errc::backend_error` naming the CUDA call or launch (from
//! `cuda_backend::launch`), and the chunk kernel's own errors.
template <> struct attention_step_ops<cuda_backend> {
  using stream_type = cuda_backend::stream_type; //!< the lane's stream

  //! Runs a copy of `kernel`, its `stream` set to `s`, on `a`.
  template <class Kernel, class T>
  [[nodiscard]] static status forward(cuda_backend& be, stream_type& s, Kernel const& kernel,
                                      chunk_forward_args<T> const& a) {
    Kernel k = on_stream(kernel, s);
    return be.launch(s, [&](cudaStream_t) -> status {
      return detail::layer::kernel_step([&] { return k.forward(a); }, "forward", a.q_offset, a.k_offset);
    });
  }
  //! Runs a copy of `kernel`, its `stream` set to `s`, on `a`.
  template <class Kernel, class T>
  [[nodiscard]] static status backward(cuda_backend& be, stream_type& s, Kernel const& kernel,
                                       chunk_backward_args<T> const& a) {
    Kernel k = on_stream(kernel, s);
    return be.launch(s, [&](cudaStream_t) -> status {
      return detail::layer::kernel_step([&] { return k.backward(a); }, "backward", a.q_offset, a.k_offset);
    });
  }
  //! acc = part when `first`, else acc = merge(acc, part) (`merge_row`, row by row).
  [[nodiscard]] static status merge(cuda_backend& be, stream_type& s, partial_view const& acc,
                                    partial_view const& part, bool first) {
    index_t const rows = acc.out.extent(0) * acc.out.extent(1);
    if (rows == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) {
      detail::cuda_steps::merge_kernel<><<<detail::cuda_steps::blocks_for(rows, detail::cuda_steps::threads / 32),
                                         detail::cuda_steps::threads, 0, cs>>>(acc, partial_cview(part), first);
    });
  }
  //! out = T(acc.out) (round to nearest even), lse = acc.lse.
  template <class T>
  [[nodiscard]] static status finalize(cuda_backend& be, stream_type& s, partial_view const& acc,
                                       tensor_view<T, 3> const& out,
                                       tensor_view<float, 2> const& lse) {
    // The layer's own slots: no pointer checks on this per-chunk path.
    FPDT_TRY(copy_rows_unchecked(be, s, acc.out, 0, out, 0, out.extent(0)));
    return copy_columns_unchecked(be, s, acc.lse, 0, lse, 0, lse.extent(1));
  }
  //! Sets `bytes` bytes at device address `p` to zero (`cudaMemsetAsync`).
  [[nodiscard]] static status zero(cuda_backend& be, stream_type& s, void* p, std::size_t bytes) {
    if (bytes == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) -> status {
      FPDT_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cs));
      return {};
    });
  }
  //! delta [H, C] = rowsum(dout * out), fp32.
  template <class T>
  [[nodiscard]] static status delta(cuda_backend& be, stream_type& s, tensor_view<T const, 3> const& out,
                                    tensor_view<T const, 3> const& dout,
                                    tensor_view<float, 2> const& delta) {
    index_t const rows = out.extent(0) * out.extent(1);
    if (rows == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) {
      detail::cuda_steps::delta_kernel<T><<<detail::cuda_steps::blocks_for(rows, detail::cuda_steps::threads / 32),
                                            detail::cuda_steps::threads, 0, cs>>>(out, dout, delta);
    });
  }
  //! Token rows [src_row0, src_row0 + rows) of `src [S, H, D]` into rows from `dst_row0` of
  //! `dst`, converting the element type; both in memory the device can address (else
  //! `errc::invalid_argument` naming pageable host memory).
  template <class S, class D>
  [[nodiscard]] static status copy_rows(cuda_backend& be, stream_type& s, tensor_view<S, 3> const& src,
                                        index_t src_row0, tensor_view<D, 3> const& dst,
                                        index_t dst_row0, index_t rows) {
    if (rows * dst.extent(1) * dst.extent(2) == 0) return {};
    FPDT_TRY(check_pointers(src.data(), dst.data(), "attention_step_ops<cuda_backend>::copy_rows"));
    return copy_rows_unchecked(be, s, src, src_row0, dst, dst_row0, rows);
  }
  //! Token columns [src_col0, src_col0 + cols) of `src [H, S]` into columns from `dst_col0`;
  //! errors as `copy_rows`.
  template <class S, class D>
  [[nodiscard]] static status copy_columns(cuda_backend& be, stream_type& s,
                                           tensor_view<S, 2> const& src, index_t src_col0,
                                           tensor_view<D, 2> const& dst, index_t dst_col0,
                                           index_t cols) {
    if (cols * dst.extent(0) == 0) return {};
    FPDT_TRY(check_pointers(src.data(), dst.data(), "attention_step_ops<cuda_backend>::copy_columns"));
    return copy_columns_unchecked(be, s, src, src_col0, dst, dst_col0, cols);
  }

  //! send[r][s][h][x] = src(m.row0(r) + s, m.head0(r) + h, x) for every block r of `m`; `src`
  //! and `send` in device memory (the layer's own buffers: not checked).
  template <class U>
  [[nodiscard]] static status ulysses_pack(cuda_backend& be, stream_type& s,
                                           tensor_view<U const, 3> const& src, U* send,
                                           ulysses_blocks const& m) {
    index_t const rows = m.ranks * m.rows * m.heads; // one warp each
    if (rows * src.extent(2) == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) {
      detail::cuda_steps::ulysses_pack_kernel<U><<<detail::cuda_steps::blocks_for(rows, detail::cuda_steps::threads / 32),
                                                   detail::cuda_steps::threads, 0, cs>>>(src, send, m);
    });
  }
  //! dst(m.row0(r) + s, m.head0(r) + h, x) = recv[r][s][h][x]; blocks landing on the same
  //! elements summed in rank order when `m.add` (deterministic, equal to the host's).
  template <class U>
  [[nodiscard]] static status ulysses_unpack(cuda_backend& be, stream_type& s, U const* recv,
                                             tensor_view<U, 3> const& dst, ulysses_blocks const& m) {
    // One warp per row: of dst when summing, else of the packed blocks.
    index_t const rows = m.add ? m.rows * dst.extent(1) : m.ranks * m.rows * m.heads;
    if (rows * dst.extent(2) == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) {
      unsigned const blocks = detail::cuda_steps::blocks_for(rows, detail::cuda_steps::threads / 32);
      if (m.add)
        detail::cuda_steps::ulysses_unpack_sum_kernel<U><<<blocks, detail::cuda_steps::threads, 0, cs>>>(recv, dst, m);
      else
        detail::cuda_steps::ulysses_unpack_kernel<U><<<blocks, detail::cuda_steps::threads, 0, cs>>>(recv, dst, m);
    });
  }

  //! `copy_rows` without its pointer checks, for views into the layers' own device buffers
  //! (used per chunk on the layers' hot paths).
  template <class S, class D>
  [[nodiscard]] static status copy_rows_unchecked(cuda_backend& be, stream_type& s,
                                                  tensor_view<S, 3> const& src, index_t src_row0,
                                                  tensor_view<D, 3> const& dst, index_t dst_row0,
                                                  index_t rows) {
    index_t const warps = rows * dst.extent(1);
    if (warps * dst.extent(2) == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) {
      detail::cuda_steps::copy_rows_kernel<S, D><<<detail::cuda_steps::blocks_for(warps, detail::cuda_steps::threads / 32),
                                                   detail::cuda_steps::threads, 0, cs>>>(src, src_row0, dst, dst_row0, rows);
    });
  }
  //! `copy_columns` without its pointer checks (see `copy_rows_unchecked`).
  template <class S, class D>
  [[nodiscard]] static status copy_columns_unchecked(cuda_backend& be, stream_type& s,
                                                     tensor_view<S, 2> const& src, index_t src_col0,
                                                     tensor_view<D, 2> const& dst, index_t dst_col0,
                                                     index_t cols) {
    index_t const n = cols * dst.extent(0);
    if (n == 0) return {};
    return be.launch(s, [&](cudaStream_t cs) {
      detail::cuda_steps::copy_columns_kernel<S, D><<<detail::cuda_steps::blocks_for(n, detail::cuda_steps::threads),
                                                      detail::cuda_steps::threads, 0, cs>>>(src, src_col0, dst, dst_col0, cols);
    });
  }

private:
  [[nodiscard]] static status check_pointers(void const* src, void const* dst, char const* who) {
    FPDT_TRY(detail::cuda_attention::check_device_pointer(src, "source", who));
    return detail::cuda_attention::check_device_pointer(dst, "destination", who);
  }
  template <class Kernel> [[nodiscard]] static Kernel on_stream(Kernel const& kernel, stream_type& s) {
    static_assert(requires(Kernel& k) { k.stream = cudaStream_t{}; },
                  "fpdt_attention on cuda_backend: the chunk kernel needs a public "
                  "`cudaStream_t stream` member, which the layer sets to the compute lane's stream");
    Kernel k = kernel;
    k.stream = s.native_handle();
    return k;
  }
};

FPDT_NAMESPACE_END
