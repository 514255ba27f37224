//! \file
//! \brief `cuda_backend`: the `backend` concept on one CUDA device.
//!
//! docs/design.md 4.7: streams are non-blocking `cudaStream_t`s (compute and comm at the device's greatest
//! priority), events are `cudaEvent_t`s, copies are `cudaMemcpyAsync`, device memory is a budgeted
//! `device_arena` over the device's stream-ordered memory pool, and pinned host memory is a
//! `pinned_pool` over `cudaHostAlloc`. Mirrors `fpdt::host_backend`, so one pipeline and one test
//! body run on both. Needs the CUDA runtime (link `fpdt::cuda`); compiles with a plain C++
//! compiler. Kernels are the caller's: `launch` hands them a stream and checks the launch.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../memory/device_arena.hpp"
#include "../../memory/pinned_pool.hpp"
#include "../backend.hpp"
#include "cuda_check.hpp"
#include "cuda_memory.hpp"
#include "event.hpp"
#include "stream.hpp"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

FPDT_NAMESPACE_BEGIN

//! Options of a CUDA backend.
struct cuda_backend_options {
  //! Ordinal of the CUDA device to use (as `cudaSetDevice` numbers them).
  int device = 0;
  //! Budget of the device arena, in bytes (default: unlimited; the device's memory is the limit).
  std::size_t device_budget_bytes = std::numeric_limits<std::size_t>::max();
  //! `arena_mode::count_only` to measure the bytes a run would need without allocating them.
  arena_mode device_mode = arena_mode::allocate;
  //! The most bytes the pinned pool may hold, in bytes (default: unlimited).
  std::size_t pinned_limit_bytes = std::numeric_limits<std::size_t>::max();
};

//! The CUDA backend for one device: models `fpdt::backend`.
//!
//! Made by `create` (creation can fail) and held by `std::unique_ptr`: the arena and the pool
//! point into the backend, so it never moves. It owns one stream of its own, on which device
//! memory is allocated and freed. Every member makes `device()` the calling thread's current
//! device before its CUDA calls and leaves it current. The backend must outlive its blocks and
//! the pending work that touches its memory; streams and events are independent handles.
class cuda_backend {
public:
  using backend_tag = fpdt::backend_tag; //!< opts in to the `backend` concept
  using stream_type = cuda::stream;      //!< non-blocking `cudaStream_t`
  using event_type = cuda::event;        //!< `cudaEvent_t`

  //! A backend on `options.device`, with the given arena budget and pool limit. Sets the release
  //! threshold of the device's default memory pool to its maximum, so freed device memory stays
  //! cached for reuse (a process-wide setting of that pool).
  //!
  //! Errors: `errc::invalid_argument` naming the ordinal and the device count, e.g. "cuda_backend:
  //! device 3 requested but 1 CUDA device(s) present"; `errc::backend_error` naming the device
  //! when no device or driver is usable (the CUDA error is in the message) or a setup call fails;
  //! `errc::not_supported` when the device has no stream-ordered memory pools.
  [[nodiscard]] static result<std::unique_ptr<cuda_backend>>
  create(cuda_backend_options const& options = {}) {
    int const d = options.device;
    int count = 0;
    if (cudaError_t const err = cudaGetDeviceCount(&count); err != cudaSuccess) {
      (void)cudaGetLastError();
      return make_error(errc::backend_error, "cuda_backend: device ", d,
                        " requested but 0 CUDA device(s) present (cudaGetDeviceCount failed with ",
                        cudaGetErrorName(err), ": ", cudaGetErrorString(err), ")");
    }
    if (d < 0 || d >= count)
      return make_error(count == 0 ? errc::backend_error : errc::invalid_argument,
                        "cuda_backend: device ", d, " requested but ", count,
                        " CUDA device(s) present");
    setup s;
    if (status const st = prepare(d, s); !st.ok())
      return st.with_context(detail::concat("cuda_backend: setting up device ", d));
    return std::unique_ptr<cuda_backend>(new cuda_backend(options, std::move(s)));
  }

  cuda_backend(cuda_backend const&) = delete;
  cuda_backend& operator=(cuda_backend const&) = delete;

  //! The device ordinal this backend works on.
  [[nodiscard]] int device() const noexcept { return memory_.device; }

  //! A new non-blocking stream for lane `l`, named after it ("compute", "h2d", ...), with
  //! `stream_priority::high` mapped to the device's greatest priority and `normal` to 0 (CUDA's
  //! default).
  //! Errors: `errc::backend_error` naming the lane when the stream cannot be created.
  [[nodiscard]] result<stream_type> create_stream(lane l, stream_priority p) {
    FPDT_TRY(detail::set_device(device()));
    result<stream_type> s = stream_type::create(
        std::string(to_string(l)), p == stream_priority::high ? greatest_priority_ : 0);
    if (!s.ok())
      return s.error().with_context(
          detail::concat("cuda_backend: creating a stream for lane ", to_string(l)));
    return s;
  }

  //! A new stream for lane `l` at the lane's `default_priority` (high for compute and comm).
  //! Errors: as the two-argument overload.
  [[nodiscard]] result<stream_type> create_stream(lane l) {
    return create_stream(l, default_priority(l));
  }

  //! A new event, never recorded; `timing` true allows `elapsed_seconds` on it.
  //! Errors: `errc::backend_error` when the event cannot be created.
  [[nodiscard]] result<event_type> create_event(bool timing = false) {
    FPDT_TRY(detail::set_device(device()));
    return event_type::create(timing);
  }

  //! Records `e` on `s`: `e` completes once the work queued on `s` so far has run.
  //! Errors: `errc::invalid_argument` for an empty handle; `errc::backend_error` naming the
  //! stream when `cudaEventRecord` fails.
  [[nodiscard]] status record(event_type& e, stream_type& s) {
    FPDT_TRY(enter("record", s, &e));
    if (cudaError_t const err = cudaEventRecord(e.native_handle(), s.native_handle());
        err != cudaSuccess)
      return failed(err, "cudaEventRecord", "record", s);
    return {};
  }

  //! Makes later work on `s` wait for the latest record of `e` (a never-recorded event is
  //! complete).
  //! Errors: `errc::invalid_argument` for an empty handle; `errc::backend_error` naming the
  //! stream when `cudaStreamWaitEvent` fails.
  [[nodiscard]] status wait(stream_type& s, event_type const& e) {
    FPDT_TRY(enter("wait", s, &e));
    if (cudaError_t const err = cudaStreamWaitEvent(s.native_handle(), e.native_handle(), 0);
        err != cudaSuccess)
      return failed(err, "cudaStreamWaitEvent", "wait", s);
    return {};
  }

  //! Copies `bytes` bytes from `src` to `dst` in `s`'s order (`cudaMemcpyAsync` with
  //! `cudaMemcpyDefault`: any direction between device memory and pinned host memory).
  //!
  //! Errors: `errc::invalid_argument` naming the pointers and size when a pointer is null with
  //! `bytes > 0` or the two ranges overlap, or for an empty stream; `errc::backend_error` naming
  //! the stream when `cudaMemcpyAsync` fails.
  [[nodiscard]] status copy_async(void* dst, void const* src, std::size_t bytes, stream_type& s) {
    if (bytes == 0) return {};
    FPDT_TRY(detail::check_copy_arguments("cuda_backend::copy_async", dst, src, bytes));
    FPDT_TRY(enter("copy_async", s));
    if (cudaError_t const err =
            cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s.native_handle());
        err != cudaSuccess)
      return failed(err, "cudaMemcpyAsync", "copy_async", s);
    return {};
  }

  //! Calls `kernel(s.native_handle())` (callable as `void(cudaStream_t)` or
  //! `status(cudaStream_t)`), the caller's kernel launch on `s`, then checks `cudaGetLastError`.
  //! Errors: the status `kernel` returned; `errc::backend_error` naming the stream and the CUDA
  //! error when the launch failed (the error is cleared); `errc::invalid_argument` for an empty
  //! stream.
  template <class F>
  [[nodiscard]] status launch(stream_type& s, F&& kernel) {
    using R = std::invoke_result_t<F&, cudaStream_t>;
    static_assert(std::is_void_v<R> || std::is_same_v<R, status>,
                  "cuda_backend::launch: the kernel must return void or fpdt::status");
    FPDT_TRY(enter("launch", s));
    if constexpr (std::is_void_v<R>) {
      kernel(s.native_handle());
    } else {
      if (status const st = kernel(s.native_handle()); !st.ok())
        return st.with_context(detail::concat("cuda_backend::launch on stream '", s.name(), "'"));
    }
    if (cudaError_t const err = cudaGetLastError(); err != cudaSuccess)
      return failed(err, "kernel launch", "launch", s);
    return {};
  }

  //! Waits for all work queued on `s`.
  //! Errors: the first error of that work (or of the device), as `errc::backend_error` (or
  //! `errc::out_of_memory`) naming `cudaStreamSynchronize` and the stream; errors that poison the
  //! context (a kernel's illegal address) stay and every later call reports them.
  [[nodiscard]] status synchronize(stream_type& s) {
    FPDT_TRY(enter("synchronize", s));
    if (cudaError_t const err = cudaStreamSynchronize(s.native_handle()); err != cudaSuccess)
      return failed(err, "cudaStreamSynchronize", "synchronize", s);
    return {};
  }

  //! The budgeted device arena (over `cuda::device_memory_resource`).
  [[nodiscard]] device_arena& device_memory() noexcept { return device_; }
  //! The pinned host pool (over `cuda::pinned_memory_resource`).
  [[nodiscard]] pinned_pool& pinned_memory() noexcept { return pinned_; }

private:
  struct setup {
    int device = 0;
    int greatest_priority = 0;
    cudaMemPool_t pool = nullptr;
    cuda::stream allocation_stream;
  };

  [[nodiscard]] static status prepare(int device, setup& s) {
    FPDT_TRY(detail::set_device(device));
    int pools = 0;
    FPDT_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
    if (pools == 0)
      return make_error(errc::not_supported,
                        "the device has no stream-ordered memory pools (cudaMallocAsync)");
    int least = 0;
    FPDT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &s.greatest_priority));
    FPDT_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&s.pool, device));
    std::uint64_t threshold = std::numeric_limits<std::uint64_t>::max();
    FPDT_CUDA_CHECK(cudaMemPoolSetAttribute(s.pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    result<cuda::stream> alloc = cuda::stream::create("allocations");
    FPDT_TRY(alloc);
    s.allocation_stream = std::move(*alloc);
    s.device = device;
    return {};
  }

  cuda_backend(cuda_backend_options const& options, setup s)
      : greatest_priority_(s.greatest_priority), allocation_stream_(std::move(s.allocation_stream)),
        memory_{s.device, allocation_stream_.native_handle(), s.pool},
        device_(cuda::device_memory_resource(&memory_), options.device_budget_bytes,
                options.device_mode),
        pinned_(cuda::pinned_memory_resource(&memory_), options.pinned_limit_bytes) {}

  // Refuses empty handles (a null stream would silently mean the legacy default stream), then
  // makes the device current for the CUDA call that follows.
  [[nodiscard]] status enter(char const* what, stream_type const& s,
                             event_type const* e = nullptr) const {
    if (s.native_handle() == nullptr || (e != nullptr && e->native_handle() == nullptr))
      return make_error(errc::invalid_argument, "cuda_backend::", what, ": the ",
                        s.native_handle() == nullptr ? "stream" : "event",
                        " is empty (moved from or default-constructed)");
    return detail::set_device(device());
  }

  [[nodiscard]] static status failed(cudaError_t err, char const* call, char const* what,
                                     stream_type const& s) {
    return cuda_status(err, call, __FILE__, __LINE__)
        .with_context(detail::concat("cuda_backend::", what, " on stream '", s.name(), "'"));
  }

  int greatest_priority_;
  cuda::stream allocation_stream_;
  cuda::memory_context memory_;
  device_arena device_;
  pinned_pool pinned_;
};

static_assert(backend<cuda_backend>, "cuda_backend must model fpdt::backend");

FPDT_NAMESPACE_END
