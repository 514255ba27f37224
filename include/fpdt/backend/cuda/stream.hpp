//! \file
//! \brief `cuda::stream`: move-only owner of a non-blocking `cudaStream_t` with a priority.
//!
//! The CUDA backend's stream (docs/design.md 4.7): work on one stream runs in order; streams are
//! created non-blocking, so they never synchronise implicitly with the legacy default stream and
//! are ordered only by events. Needs the CUDA runtime (link `fpdt::cuda`); compiles with a plain
//! C++ compiler.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "cuda_check.hpp"

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

FPDT_NAMESPACE_BEGIN

namespace cuda {

//! Move-only handle owning one `cudaStream_t`; a moved-from (or default) stream owns nothing.
class stream {
public:
  //! An empty handle (owns no stream; `native_handle()` is null).
  stream() noexcept = default;

  //! A new non-blocking stream on the calling thread's current device.
  //! \param name how messages name the stream, e.g. "compute".
  //! \param priority CUDA stream priority (lower numbers run first; see
  //!        `cudaDeviceGetStreamPriorityRange`); values outside the range are clamped by CUDA.
  //!
  //! Errors: `errc::backend_error` (or `errc::out_of_memory`) naming the stream when
  //! `cudaStreamCreateWithPriority` fails.
  [[nodiscard]] static result<stream> create(std::string name, int priority = 0) {
    cudaStream_t h = nullptr;
    if (cudaError_t const err = cudaStreamCreateWithPriority(&h, cudaStreamNonBlocking, priority);
        err != cudaSuccess)
      return cuda_status(err, "cudaStreamCreateWithPriority", __FILE__, __LINE__)
          .with_context(
              detail::concat("creating CUDA stream '", name, "' with priority ", priority));
    return stream(h, std::move(name));
  }

  //! Takes over `other`'s stream; `other` becomes empty.
  stream(stream&& other) noexcept
      : handle_(std::exchange(other.handle_, nullptr)), name_(std::move(other.name_)) {}
  //! Destroys this handle's stream, then takes over `other`'s.
  stream& operator=(stream&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, nullptr);
      name_ = std::move(other.name_);
    }
    return *this;
  }
  stream(stream const&) = delete;
  stream& operator=(stream const&) = delete;
  //! Destroys the stream; work already queued on it still runs (`cudaStreamDestroy`).
  ~stream() { reset(); }

  //! The owned `cudaStream_t` (null when empty).
  [[nodiscard]] cudaStream_t native_handle() const noexcept { return handle_; }
  //! The name given at creation.
  [[nodiscard]] std::string const& name() const noexcept { return name_; }

private:
  stream(cudaStream_t h, std::string name) noexcept : handle_(h), name_(std::move(name)) {}

  void reset() noexcept {
    // A failure here (a context already torn down at exit) has no one to report to.
    if (handle_ != nullptr && cudaStreamDestroy(handle_) != cudaSuccess) (void)cudaGetLastError();
    handle_ = nullptr;
  }

  cudaStream_t handle_ = nullptr;
  std::string name_;
};

} // namespace cuda

FPDT_NAMESPACE_END
