//! \file
//! \brief Host-side checks the CUDA chunk kernels run before a launch: pointers the device can
//! read, and the compute capability of the current device.
//!
//! A kernel handed an ordinary host pointer would fault and poison the CUDA context for the whole
//! process; these checks turn that into a status naming the tensor.
#pragma once

#include "../../backend/cuda/cuda_check.hpp"
#include "../../config.hpp"
#include "../../core/status.hpp"

#include <cuda_runtime_api.h>

FPDT_NAMESPACE_BEGIN

namespace detail::cuda_attention {

//! Ok when `p` is null (an empty tensor) or memory the current device can address (device,
//! managed, or pinned host memory); `errc::invalid_argument` naming `who` and `name` for pageable
//! host memory.
[[nodiscard]] inline status check_device_pointer(void const* p, char const* name, char const* who) {
  if (p == nullptr) return {};
  cudaPointerAttributes attr{};
  FPDT_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  if (attr.type == cudaMemoryTypeUnregistered)
    return make_error(errc::invalid_argument, who, ": ", name, " (", p,
                      ") is pageable host memory; CUDA kernels need device, managed or pinned "
                      "memory");
  return {};
}

//! The compute capability of the current device as 10 * major + minor (e.g. 90 for sm_90).
[[nodiscard]] inline result<int> current_compute_capability() {
  int dev = 0, major = 0, minor = 0;
  FPDT_CUDA_CHECK(cudaGetDevice(&dev));
  FPDT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  FPDT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return 10 * major + minor;
}

//! Status of the launch just made: the error `cudaGetLastError` reports, naming `who`.
[[nodiscard]] inline status check_launch(char const* who) {
  if (cudaError_t const err = cudaGetLastError(); err != cudaSuccess)
    return cuda_status(err, who, __FILE__, __LINE__);
  return {};
}

} // namespace detail::cuda_attention

FPDT_NAMESPACE_END
