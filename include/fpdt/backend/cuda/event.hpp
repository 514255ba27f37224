//! \file
//! \brief `cuda::event`: move-only owner of a `cudaEvent_t`.
//!
//! The CUDA backend's event (docs/design.md 4.7). Events are created with
//! `cudaEventDisableTiming` (the cheapest kind, all the pipeline needs to order streams) unless
//! timing is asked for. As with every CUDA event, a wait refers to the latest record issued
//! before it, and a never-recorded event is complete. Needs the CUDA runtime (link `fpdt::cuda`);
//! compiles with a plain C++ compiler.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "cuda_check.hpp"

#include <cuda_runtime_api.h>

#include <utility>

FPDT_NAMESPACE_BEGIN

namespace cuda {

//! Move-only handle owning one `cudaEvent_t`; a moved-from (or default) event owns nothing.
class event {
public:
  //! An empty handle (owns no event; `native_handle()` is null).
  event() noexcept = default;

  //! A new event on the calling thread's current device, never recorded.
  //! \param timing true to allow `elapsed_seconds` on it (costlier records); false gives
  //!        `cudaEventDisableTiming`.
  //!
  //! Errors: `errc::backend_error` (or `errc::out_of_memory`) when `cudaEventCreateWithFlags`
  //! fails.
  [[nodiscard]] static result<event> create(bool timing = false) {
    cudaEvent_t h = nullptr;
    FPDT_CUDA_CHECK(
        cudaEventCreateWithFlags(&h, timing ? cudaEventDefault : cudaEventDisableTiming));
    return event(h, timing);
  }

  //! Takes over `other`'s event; `other` becomes empty.
  event(event&& other) noexcept
      : handle_(std::exchange(other.handle_, nullptr)), timing_(other.timing_) {}
  //! Destroys this handle's event, then takes over `other`'s.
  event& operator=(event&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, nullptr);
      timing_ = other.timing_;
    }
    return *this;
  }
  event(event const&) = delete;
  event& operator=(event const&) = delete;
  //! Destroys the event (a pending record still completes; `cudaEventDestroy`).
  ~event() { reset(); }

  //! The owned `cudaEvent_t` (null when empty).
  [[nodiscard]] cudaEvent_t native_handle() const noexcept { return handle_; }
  //! True when the event was created with timing enabled.
  [[nodiscard]] bool timing() const noexcept { return timing_; }

  //! Blocks the calling thread until the latest record of this event has completed.
  //! Errors: `errc::backend_error` carrying the error of the work it waited for (for example a
  //! failed kernel), from `cudaEventSynchronize`.
  [[nodiscard]] status synchronize() const {
    FPDT_CUDA_CHECK(cudaEventSynchronize(handle_));
    return {};
  }

  //! Seconds between the latest completed records of `start` and `end` (both created with timing;
  //! resolution about half a microsecond).
  //! Errors: `errc::backend_error` from `cudaEventElapsedTime` when either event has no timing,
  //! was never recorded, or has not completed.
  [[nodiscard]] friend result<double> elapsed_seconds(event const& start, event const& end) {
    float ms = 0;
    FPDT_CUDA_CHECK(cudaEventElapsedTime(&ms, start.handle_, end.handle_));
    return static_cast<double>(ms) * 1e-3;
  }

private:
  event(cudaEvent_t h, bool timing) noexcept : handle_(h), timing_(timing) {}

  void reset() noexcept {
    if (handle_ != nullptr && cudaEventDestroy(handle_) != cudaSuccess) (void)cudaGetLastError();
    handle_ = nullptr;
  }

  cudaEvent_t handle_ = nullptr;
  bool timing_ = false;
};

} // namespace cuda

FPDT_NAMESPACE_END
