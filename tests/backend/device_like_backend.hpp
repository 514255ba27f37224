// A backend that fpdt treats as a device backend: its stream type is not host::stream, so the
// executor cannot time steps with host tasks (it times them with events, as on CUDA) and
// fpdt_attention cannot run plain-form callbacks on it (only stream-form ones, as on CUDA); its
// attention_step_ops specialization is the user's customization point. Underneath, host_backend
// runs everything, so the device-backend code paths are tested without a GPU.
#pragma once

#include <fpdt/backend/backend.hpp>
#include <fpdt/backend/host/host_backend.hpp>
#include <fpdt/layers/attention_step_ops.hpp>

#include <utility>

namespace fpdt_test {

struct device_like_backend {
  using backend_tag = fpdt::backend_tag;
  struct stream_type {
    fpdt::host::stream inner; // the host stream doing the work
    // What a stream-ordered communicator is handed (as a cudaStream_t for NCCL).
    fpdt::host::stream* native_handle() noexcept { return &inner; }
  };
  using event_type = fpdt::host::event;

  fpdt::host_backend host;

  explicit device_like_backend(fpdt::host_backend_options const& o = {}) : host(o) {}

  fpdt::result<stream_type> create_stream(fpdt::lane l) {
    auto s = host.create_stream(l);
    if (!s) return s.error();
    return stream_type{std::move(*s)};
  }
  // Host events always carry their completion time, so `timing` changes nothing.
  fpdt::result<event_type> create_event(bool timing = false) {
    (void)timing;
    return host.create_event();
  }
  fpdt::status record(event_type& e, stream_type& s) { return host.record(e, s.inner); }
  fpdt::status wait(stream_type& s, event_type const& e) { return host.wait(s.inner, e); }
  fpdt::status copy_async(void* d, void const* src, std::size_t n, stream_type& s) {
    return host.copy_async(d, src, n, s.inner);
  }
  // The backend's "kernel launch": queues `f` on the stream.
  template <class F> fpdt::status launch(stream_type& s, F&& f) {
    return host.launch(s.inner, std::forward<F>(f));
  }
  fpdt::status synchronize(stream_type& s) { return host.synchronize(s.inner); }
  fpdt::device_arena& device_memory() { return host.device_memory(); }
  fpdt::pinned_pool& pinned_memory() { return host.pinned_memory(); }
};
static_assert(fpdt::backend<device_like_backend>);
static_assert(!fpdt::runs_host_tasks_in_order<device_like_backend>);
static_assert(fpdt::times_steps_with_events<device_like_backend>);

} // namespace fpdt_test

// The customization point a backend's author writes: here the host steps, queued with launch.
template <>
struct fpdt::attention_step_ops<fpdt_test::device_like_backend>
    : fpdt::host_attention_step_ops<fpdt_test::device_like_backend> {};
