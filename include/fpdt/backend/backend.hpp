//! \file
//! \brief The `backend` concept: streams, events, asynchronous copies and memory of one device.
//!
//! The FPDT pipeline (docs/design.md 4.5) runs its steps on four lanes (compute, host-to-device
//! copies, device-to-host copies, communication), each a stream, and orders them with events only.
//! A backend supplies those streams and events, asynchronous copies between device memory and
//! pinned host memory, and the two allocators (a budgeted device arena and a pinned host pool).
//! Models: `fpdt::host_backend` (worker threads; CI and tests) and the CUDA backend.
#pragma once

#include "../config.hpp"
#include "../core/lane.hpp"
#include "../core/status.hpp"
#include "../memory/device_arena.hpp"
#include "../memory/pinned_pool.hpp"

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>

FPDT_NAMESPACE_BEGIN

namespace detail {
// The argument rules every backend's copy_async shares (bytes > 0): no null pointer, no overlap.
// `who` names the function in the message, e.g. "host_backend::copy_async".
[[nodiscard]] inline status check_copy_arguments(std::string_view who, void const* dst,
                                                 void const* src, std::size_t bytes) {
  if (dst == nullptr || src == nullptr)
    return make_error(errc::invalid_argument, who, " of ", bytes, " bytes: ",
                      dst == nullptr ? "destination" : "source", " pointer is null");
  auto const d = reinterpret_cast<std::uintptr_t>(dst);
  auto const o = reinterpret_cast<std::uintptr_t>(src);
  if (d < o + bytes && o < d + bytes)
    return make_error(errc::invalid_argument, who, " of ", bytes, " bytes: source ", src,
                      " and destination ", dst, " overlap");
  return {};
}
} // namespace detail

//! Opt-in tag: a backend declares `using backend_tag = fpdt::backend_tag;` so that look-alike
//! types are not accepted by accident.
struct backend_tag {};

//! A device backend: what the pipeline needs to order work and move bytes.
//!
//! Required members (all return errors as values, never throw):
//! - `stream_type`, `event_type`: move-constructible handles;
//! - `create_stream(lane)`, `create_event()`: new handles, or an error;
//! - `record(event, stream)`: the event completes when the stream's work so far has run;
//! - `wait(stream, event)`: later work on the stream waits for the event's latest record (a
//!   never-recorded event is already complete, as in CUDA);
//! - `copy_async(dst, src, bytes, stream)`: copy in stream order; pointers may be device or
//!   pinned host memory of this backend;
//! - `synchronize(stream)`: the calling thread waits for the stream; returns the first error of
//!   the work it waited for;
//! - `device_memory()`, `pinned_memory()`: the budgeted device arena and the pinned host pool.
//!
//! Optional: `static constexpr bool runs_host_tasks = true;` for a backend whose
//! `launch(stream, callable)` runs host callables in stream order (`host_backend`); see
//! `runs_host_tasks_in_order` (pipeline/executor.hpp).
template <class B>
concept backend =
    std::same_as<typename B::backend_tag, fpdt::backend_tag> &&
    std::move_constructible<typename B::stream_type> &&
    std::move_constructible<typename B::event_type> &&
    requires(B& b, typename B::stream_type& s, typename B::event_type& e, void* dst,
             void const* src, std::size_t n) {
      { b.create_stream(lane::compute) } -> std::same_as<result<typename B::stream_type>>;
      { b.create_event() } -> std::same_as<result<typename B::event_type>>;
      { b.record(e, s) } -> std::same_as<status>;
      { b.wait(s, e) } -> std::same_as<status>;
      { b.copy_async(dst, src, n, s) } -> std::same_as<status>;
      { b.synchronize(s) } -> std::same_as<status>;
      { b.device_memory() } -> std::same_as<device_arena&>;
      { b.pinned_memory() } -> std::same_as<pinned_pool&>;
    };

FPDT_NAMESPACE_END
