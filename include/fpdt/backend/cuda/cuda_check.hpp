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

FPDT_NAMESPACE_END

//! Evaluates the CUDA runtime call `call`; on failure returns an `fpdt::status` naming the call,
//! the error and the source line from the enclosing function (which must return `fpdt::status`
//! or `fpdt::result<T>`).
#define FPDT_CUDA_CHECK(call)                                                                      \
  do {                                                                                             \
    if (cudaError_t const fpdt_cuda_err_ = (call); fpdt_cuda_err_ != cudaSuccess)                 \
      return ::fpdt::cuda_status(fpdt_cuda_err_, #call, __FILE__, __LINE__);                       \
  } while (0)
