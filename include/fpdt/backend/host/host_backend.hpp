//! \file
//! \brief `host_backend`: the `backend` concept on the CPU, with worker-thread streams.
//!
//! docs/design.md 4.7: device memory is ordinary memory behind a budgeted arena (an over-budget
//! allocation is a clear out-of-memory error; peak bytes are exact), streams are worker threads
//! with FIFO queues, events are completion markers, copies are `memcpy` run in stream order. It is
//! what CI, the unit tests and the default demo use, and it is clean under ThreadSanitizer.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../memory/device_arena.hpp"
#include "../../memory/pinned_pool.hpp"
#include "../backend.hpp"
#include "event.hpp"
#include "fwd.hpp"
#include "host_memory.hpp"
#include "stream.hpp"

#include <cstddef>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <string>
#include <utility>

FPDT_NAMESPACE_BEGIN

//! Options of a host backend.
struct host_backend_options {
  //! Budget of the "device" arena, in bytes (default 1 GiB).
  std::size_t device_budget_bytes = std::size_t{1} << 30;
  //! `arena_mode::count_only` to measure the bytes a run would need without allocating them.
  arena_mode device_mode = arena_mode::allocate;
  //! The most bytes the pinned pool may hold, in bytes (default: unlimited).
  std::size_t pinned_limit_bytes = std::numeric_limits<std::size_t>::max();
  //! Upstream of the "device" arena; a resource with a null `allocate` (the default) means
  //! ordinary aligned host memory. Lets a caller hand in memory it owns, or a resource that fails
  //! on purpose (fault-injection tests).
  memory_resource device_upstream{};
  //! Upstream of the pinned pool; a null `allocate` means ordinary aligned host memory.
  memory_resource pinned_upstream{};
};

//! The host backend: models `fpdt::backend`.
//!
//! The backend object owns the arena and the pool; it must outlive the streams' pending work that
//! touches its memory. Streams and events are independent handles.
class host_backend {
public:
  using backend_tag = fpdt::backend_tag; //!< opts in to the `backend` concept
  using stream_type = host::stream;      //!< worker-thread stream
  using event_type = host::event;        //!< completion marker
  //! Opts in to `runs_host_tasks_in_order` (pipeline/executor.hpp): `launch(s, f)` runs `f` on
  //! stream `s`'s worker thread, in stream order.
  static constexpr bool runs_host_tasks = true;

  //! A backend with the given arena budget and pool limit.
  explicit host_backend(host_backend_options const& options = {})
      : device_(options.device_upstream.allocate ? options.device_upstream
                                                 : host::host_memory_resource("host device memory"),
                options.device_budget_bytes, options.device_mode),
        pinned_(options.pinned_upstream.allocate ? options.pinned_upstream
                                                 : host::host_memory_resource("host pinned memory"),
                options.pinned_limit_bytes) {}
  host_backend(host_backend const&) = delete;
  host_backend& operator=(host_backend const&) = delete;

  //! A new stream for lane `l`, named after it ("compute", "h2d", ...). The priority is accepted
  //! for the concept and ignored: host threads are scheduled by the OS.
  [[nodiscard]] result<stream_type> create_stream(lane l,
                                                  stream_priority = stream_priority::normal) {
    try {
      return stream_type(std::string(to_string(l)));
    } catch (std::exception const& ex) { // thread creation failed
      return make_error(errc::backend_error, "host_backend: cannot start a worker thread for lane ",
                        to_string(l), ": ", ex.what());
    }
  }

  //! A new event, never recorded.
  [[nodiscard]] result<event_type> create_event() { return event_type{}; }

  //! Records `e` on `s`.
  [[nodiscard]] status record(event_type& e, stream_type& s) {
    s.record(e);
    return {};
  }

  //! Makes later work on `s` wait for the latest record of `e`.
  [[nodiscard]] status wait(stream_type& s, event_type const& e) {
    s.wait(e);
    return {};
  }

  //! Copies `bytes` bytes from `src` to `dst` in `s`'s order (any direction: on the host all
  //! memory is one address space).
  //!
  //! Errors: `errc::invalid_argument` naming the pointers and size when a pointer is null with
  //! `bytes > 0` or the two ranges overlap.
  [[nodiscard]] status copy_async(void* dst, void const* src, std::size_t bytes, stream_type& s) {
    if (bytes == 0) return {};
    FPDT_TRY(detail::check_copy_arguments("host_backend::copy_async", dst, src, bytes));
    s.enqueue([dst, src, bytes] { std::memcpy(dst, src, bytes); });
    return {};
  }

  //! Runs `kernel` (callable as `void()` or `status()`) on `s` in stream order: the host
  //! backend's kernel launch. A failing status or an exception puts `s` into its error state.
  template <class F> [[nodiscard]] status launch(stream_type& s, F&& kernel) {
    s.enqueue(std::forward<F>(kernel));
    return {};
  }

  //! Waits for all work queued on `s`; returns (and clears) the first error it raised.
  [[nodiscard]] status synchronize(stream_type& s) { return s.synchronize(); }

  //! The budgeted "device" arena.
  [[nodiscard]] device_arena& device_memory() noexcept { return device_; }
  //! The pinned host pool.
  [[nodiscard]] pinned_pool& pinned_memory() noexcept { return pinned_; }

private:
  device_arena device_;
  pinned_pool pinned_;
};

static_assert(backend<host_backend>, "host_backend must model fpdt::backend");

FPDT_NAMESPACE_END
