// Test stand-ins for external attention libraries, for fpdt::external_chunk_kernel (shared by
// the chunk-kernel and layer GPU tests).
#pragma once

#include "device_kernel.cuh"

#include <fpdt/attention/cuda/external_kernel.cuh>
#include <fpdt/attention/cuda/reference_attention.cuh>
#include <fpdt/backend/cuda/cuda_check.hpp>

#include <array>
#include <limits>

namespace fpdt_test {
// A stand-in for an external library: FlashAttention-2's conventions (LSE in base 2 here, +inf
// for empty rows, and garbage in the out of empty rows), built on the reference kernel.
struct log2_plus_inf_kernel {
  static constexpr fpdt::lse_convention convention{fpdt::lse_base::base2, std::numeric_limits<float>::infinity()};
  template <class T>
  fpdt::status forward(fpdt::chunk_forward_args<T> const& a, cudaStream_t s) const {
    FPDT_TRY(fpdt::cuda_reference_chunk_kernel{s}.forward(a));
    bool const row0_empty = a.mask.kind == fpdt::mask_kind::causal && a.q_offset < a.k_offset;
    if (!a.out.out.empty() && row0_empty) // garbage in an empty row's out: the adapter zeroes it
      FPDT_CUDA_CHECK(cudaMemsetAsync(a.out.out.data(), 0xff, 4, s));
    return fpdt::convert_lse(a.out.lse, fpdt::fpdt_lse_convention, convention, s);
  }
  template <class T>
  fpdt::status backward(fpdt::chunk_backward_args<T> const& a, cudaStream_t s) const {
    // Expects its own convention: converts a private copy back before the reference backward.
    device_buffer<float> lse(static_cast<std::size_t>(a.lse.size()));
    FPDT_CUDA_CHECK(cudaMemcpyAsync(lse.ptr, a.lse.data(), lse.n * 4, cudaMemcpyDefault, s));
    auto v = fpdt::contiguous_view(lse.ptr, std::array<index_t, 2>{a.lse.extent(0), a.lse.extent(1)});
    FPDT_TRY(fpdt::convert_lse(*v, convention, fpdt::fpdt_lse_convention, s));
    fpdt::chunk_backward_args<T> b = a;
    b.lse = *v;
    FPDT_TRY(fpdt::cuda_reference_chunk_kernel{s}.backward(b));
    FPDT_CUDA_CHECK(cudaStreamSynchronize(s));
    return {};
  }
};
} // namespace fpdt_test
