//! \file
//! \brief `FPDT_CUDA_CHECK`: turns a failing CUDA runtime call into an `fpdt::status`.
//!
//! Needs the CUDA runtime headers (link `fpdt::cuda`); compiles with a plain C++ compiler, so a
//! trainer's `.cpp` files can use it. CUB's habit: one macro checks every CUDA call, clears the
//! (non-sticky) error state and returns a status naming the call.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"

#include <cuda_runtime_api.h>

FPDT_NAMESPACE_BEGIN

//! The status for CUDA error `err` raised by `call` (the call's source text) at `file`:`line`:
//! ok for `cudaSuccess`, else `errc::out_of_memory` for `cudaErrorMemoryAllocation` and
//! `errc::backend_error` otherwise, with the error's name and description in the message.
[[nodiscard]] inline status cuda_status(cudaError_t err, char const* call, char const* file,
                                        int line) {
  if (err == cudaSuccess) return {};
  // Clear the error so the next call does not report it again (sticky errors, which poison the
  // context, stay: the runtime keeps returning them and the message says so).
  (void)cudaGetLastError();
  return make_error(err == cudaErrorMemoryAllocation ? errc::out_of_memory : errc::backend_error,
                    call, " failed with ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
                    ") at ", file, ":", line);
}

namespace detail {
// Makes `device` the calling thread's current device (CUDA's per-thread convention). Not restored
// afterwards: restoring an unset thread to device 0 would create a context on a device the
// program may never use.
[[nodiscard]] inline status set_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) (void)cudaGetLastError();
  if (current == device) return {};
  if (cudaError_t const err = cudaSetDevice(device); err != cudaSuccess)
    return cuda_status(err, "cudaSetDevice", __FILE__, __LINE__)
        .with_context(concat("making CUDA device ", device, " current"));
  return {};
}
} // namespace detail

FPDT_NAMESPACE_END

//! Evaluates the CUDA runtime call `call`; on failure returns an `fpdt::status` naming the call,
//! the error and the source line from the enclosing function (which must return `fpdt::status`
//! or `fpdt::result<T>`).
#define FPDT_CUDA_CHECK(call)                                                                      \
  do {                                                                                             \
    if (cudaError_t const fpdt_cuda_err_ = (call); fpdt_cuda_err_ != cudaSuccess)                 \
      return ::fpdt::cuda_status(fpdt_cuda_err_, #call, __FILE__, __LINE__);                       \
  } while (0)
