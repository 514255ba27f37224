//! \file
//! \brief `external_chunk_kernel`: the adapter point for other attention kernels (FlashAttention,
//! cuDNN SDPA, a user's own) on the CUDA backend.
//!
//! fpdt's pipeline needs, per chunk pair, a forward that writes a partial state (fp32 out
//! `[Sq, H, D]` and lse `[H, Sq]` in natural log, out = 0 and lse = -inf for a row with no visible
//! key) and a backward that accumulates fp32 dq, dk, dv from the *final* merged lse and
//! delta = rowsum(dout * out) (docs/design.md 2.3, 3; see chunk_kernel.hpp). Libraries differ on two
//! conventions only, and this adapter converts both:
//! - the LSE base: natural log (cuDNN's stats, PyTorch) or base 2 (kernels that work in exp2);
//! - the value written for an empty row: -inf, +inf (FlashAttention-2 writes +inf), or NaN; such
//!   rows may carry any out, which the adapter overwrites with 0.
//!
//! A user writes a small struct `Impl` with
//! - `static constexpr lse_convention convention` (its base and empty-row value);
//! - `status forward(chunk_forward_args<T> const& a, cudaStream_t s) const`: writes every element
//!   of `a.out.out` (fp32; convert from the library's dtype if needed) and `a.out.lse` in its own
//!   convention, asynchronously on `s`; honours `a.mask`, `a.q_offset`, `a.k_offset` (causal by
//!   global position: key k_offset + j visible to query q_offset + i iff k_offset + j <=
//!   q_offset + i) and GQA in grouped order (query head h reads key/value head h / (H / H_kv));
//! - `status backward(chunk_backward_args<T> const& a, cudaStream_t s) const`: adds (+=) into
//!   fp32 dq, dk, dv, reading `a.lse` in its own convention (the adapter converts a copy).
//! and uses `external_chunk_kernel<Impl>` wherever a `chunk_kernel` is expected.
#pragma once

#include "../../backend/cuda/cuda_check.hpp"
#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../core/tensor_view.hpp"
#include "../chunk_kernel.hpp"
#include "device_checks.hpp"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

FPDT_NAMESPACE_BEGIN

//! Base of a log-sum-exp.
enum class lse_base : std::uint8_t {
  natural, //!< ln sum exp(s): fpdt, PyTorch, cuDNN
  base2,   //!< log2 sum 2^(s log2 e): kernels that work in exp2
};

//! How a kernel writes its LSE: the base and the value of a row with no visible key.
struct lse_convention {
  lse_base base = lse_base::natural; //!< base of the logarithm
  float empty_row = -INFINITY;       //!< value written for an empty row (-inf, +inf or NaN)
};

//! fpdt's own convention: natural log, -inf for empty rows.
inline constexpr lse_convention fpdt_lse_convention{};

namespace detail::cuda_external {

inline constexpr float ln2 = 0.6931471805599453f;
inline constexpr float log2e = 1.4426950408889634f;

#if defined(__CUDACC__)
__device__ __forceinline__ bool is_empty(float x, float marker) {
  return x == -INFINITY || x == marker || (marker != marker && x != x);
}

// lse [H, Sq] from convention `from` to `to`; when `out` is non-empty, rows found empty get out = 0.
// A template so that every translation unit including this header may define it (a plain
// __global__ function in a header is a multiple definition at link time).
template <class = void>
__global__ void convert_kernel(tensor_view<float, 2> lse, lse_convention from, lse_convention to,
                               tensor_view<float, 3> out) {
  index_t const h = lse.extent(0), sq = lse.extent(1);
  for (index_t r = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; r < h * sq;
       r += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t const hh = r / sq, i = r % sq;
    float const x = lse(hh, i);
    if (is_empty(x, from.empty_row)) {
      lse(hh, i) = to.empty_row;
      if (!out.empty())
        for (index_t d = 0; d < out.extent(2); ++d)
          out(i, hh, d) = 0.0f;
      continue;
    }
    float ln = from.base == lse_base::base2 ? x * ln2 : x;
    lse(hh, i) = to.base == lse_base::base2 ? ln * log2e : ln;
  }
}
#endif

} // namespace detail::cuda_external

//! Converts `lse [H, Sq]` (fp32, device memory) in place from convention `from` to `to`,
//! asynchronously on `stream`; when `out [Sq, H, D]` (fp32) is given, rows found empty also get
//! out = 0. A row is empty when its value is -inf or `from.empty_row` (NaN matches NaN).
//! Errors: `errc::shape_mismatch` when out's shape does not match lse; `errc::backend_error` on a
//! failed launch.
[[nodiscard]] inline status convert_lse(tensor_view<float, 2> const& lse, lse_convention from,
                                        lse_convention to, cudaStream_t stream,
                                        tensor_view<float, 3> const& out = {}) {
  if (!out.empty() && (out.extent(0) != lse.extent(1) || out.extent(1) != lse.extent(0)))
    return make_error(errc::shape_mismatch, "convert_lse: out ", detail::shape_string(out.extents()),
                      " must be [Sq, H, D] for lse ", detail::shape_string(lse.extents()),
                      " = [H, Sq]");
  if (lse.empty()) return {};
  index_t const rows = lse.extent(0) * lse.extent(1);
  unsigned const blocks = static_cast<unsigned>(rows / 256 + 1 < 4096 ? rows / 256 + 1 : 4096);
#if defined(__CUDACC__)
  detail::cuda_external::convert_kernel<><<<blocks, 256, 0, stream>>>(lse, from, to, out);
#endif
  return detail::cuda_attention::check_launch("convert_lse launch");
}

//! Adapts a user's kernel `Impl` (see the file comment) to the `chunk_kernel` concept.
//!
//! Forward: `Impl::forward`, then the LSE converted to fpdt's convention and empty rows' out set
//! to 0. Backward: the final lse copied into scratch device memory (`[H, Sq]` fp32) in `Impl`'s
//! convention when it differs from fpdt's, then `Impl::backward`. The scratch is `workspace`
//! (`kernel_with_workspace`: `fpdt_attention` gives it from its arena, inside its budget) when
//! that is large enough, else a `cudaMallocAsync` / `cudaFreeAsync` pair on `stream` (a caller
//! that runs the kernel alone). Errors: those of `check_args`, of `Impl`, and
//! `errc::backend_error` or `errc::out_of_memory` naming the CUDA call.
template <class Impl> struct external_chunk_kernel {
  Impl impl{};                   //!< the user's kernel
  cudaStream_t stream = nullptr; //!< stream the work is queued on
  std::span<std::byte> workspace{}; //!< device scratch for the backward's lse copy (may be empty)

  //! Bytes of scratch calls on chunk pairs of `shape` need: for the backward `H * Sq * 4` (fp32
  //! lse) when `Impl`'s LSE convention differs from fpdt's, else (and for the forward) 0.
  [[nodiscard]] std::size_t workspace_bytes(chunk_pair_shape const& shape) const noexcept {
    constexpr lse_convention c = Impl::convention;
    if (!shape.backward || (c.base == lse_base::natural && c.empty_row == -INFINITY)) return 0;
    return static_cast<std::size_t>(shape.heads * shape.q_rows) * sizeof(float);
  }

  //! Partial forward of one chunk pair, in fpdt's conventions.
  template <class T> [[nodiscard]] status forward(chunk_forward_args<T> const& a) const {
    FPDT_TRY(check_args(a));
    FPDT_TRY(impl.forward(a, stream));
    return convert_lse(a.out.lse, Impl::convention, fpdt_lse_convention, stream, a.out.out);
  }

  //! Backward of one chunk pair, `Impl` reading the LSE in its own convention.
  template <class T> [[nodiscard]] status backward(chunk_backward_args<T> const& a) const {
    FPDT_TRY(check_args(a));
    constexpr lse_convention c = Impl::convention;
    if (c.base == lse_base::natural && c.empty_row == -INFINITY) return impl.backward(a, stream);
    index_t const h = a.lse.extent(0), sq = a.lse.extent(1);
    if (h * sq == 0) return impl.backward(a, stream);
    if (a.lse.stride(1) != 1)
      return make_error(errc::not_supported, "external_chunk_kernel backward: lse [H, Sq] must have "
                                             "contiguous rows (stride 1 along Sq), got stride ",
                        a.lse.stride(1));
    void* scratch = nullptr;
    std::size_t const bytes = static_cast<std::size_t>(h * sq) * sizeof(float);
    bool const own = workspace.size() < bytes; // no (large enough) workspace: allocate
    if (own)
      FPDT_CUDA_CHECK(cudaMallocAsync(&scratch, bytes, stream));
    else
      scratch = workspace.data();
    auto const lse = contiguous_view(static_cast<float*>(scratch), std::array<index_t, 2>{h, sq});
    status st = lse.ok() ? status{} : lse.error();
    if (st.ok())
      st = cuda_status(cudaMemcpy2DAsync(scratch, static_cast<std::size_t>(sq) * sizeof(float),
                                         a.lse.data(),
                                         static_cast<std::size_t>(h == 1 ? sq : a.lse.stride(0)) * sizeof(float),
                                         static_cast<std::size_t>(sq) * sizeof(float),
                                         static_cast<std::size_t>(h), cudaMemcpyDefault, stream),
                       "cudaMemcpy2DAsync(lse scratch)", __FILE__, __LINE__);
    if (st.ok()) st = convert_lse(*lse, fpdt_lse_convention, c, stream);
    if (st.ok()) {
      chunk_backward_args<T> b = a;
      b.lse = *lse;
      st = impl.backward(b, stream);
    }
    if (!own) return st;
    cudaError_t const freed = cudaFreeAsync(scratch, stream);
    if (st.ok() && freed != cudaSuccess)
      return cuda_status(freed, "cudaFreeAsync(lse scratch)", __FILE__, __LINE__);
    return st;
  }
};

FPDT_NAMESPACE_END
