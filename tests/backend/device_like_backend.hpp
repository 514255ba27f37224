// A backend that fpdt treats as a device backend: it does not declare `runs_host_tasks`, so the
// executor cannot time steps with host tasks (it times them with events, as on CUDA) and
// fpdt_attention cannot run plain-form callbacks on it (only stream-form ones, as on CUDA); its
// attention_step_ops specialization is the user's customization point. Underneath, host_backend
// runs everything, so the device-backend code paths are tested without a GPU.
//
// `jittery_device_like_backend` also delays every launch and copy on its stream by a pseudo-random
// 0-199 us, or 1.5 ms one time in eight, so work on different streams interleaves in many orders:
// a missing event wait then shows as a wrong result, not only now and then.
//
// Either backend can also stall one lane: every launch and copy on streams created for
// `slow_lane` waits `slow_delay` first, so that lane falls behind the others by a known margin
// (a test of one particular hand-over).
#pragma once

#include <fpdt/backend/backend.hpp>
#include <fpdt/backend/host/host_backend.hpp>
#include <fpdt/layers/attention_step_ops.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <thread>
#include <utility>

namespace fpdt_test {

template <bool Jitter> struct basic_device_like_backend {
  using backend_tag = fpdt::backend_tag;
  struct stream_type {
    fpdt::host::stream inner; // the host stream doing the work
    fpdt::lane on{};          // the lane it was created for
    // What a stream-ordered communicator is handed (as a cudaStream_t for NCCL).
    fpdt::host::stream* native_handle() noexcept { return &inner; }
  };
  using event_type = fpdt::host::event;

  fpdt::host_backend host;
  std::atomic<std::uint64_t> draws{0};
  std::optional<fpdt::lane> slow_lane;     // streams created for this lane are stalled
  std::chrono::microseconds slow_delay{0}; // before each of their launches and copies

  explicit basic_device_like_backend(fpdt::host_backend_options const& o = {}) : host(o) {}

  fpdt::result<stream_type> create_stream(fpdt::lane l) {
    auto s = host.create_stream(l);
    if (!s) return s.error();
    return stream_type{std::move(*s), l};
  }
  // Host events always carry their completion time, so `timing` changes nothing.
  fpdt::result<event_type> create_event(bool timing = false) {
    (void)timing;
    return host.create_event();
  }
  fpdt::status record(event_type& e, stream_type& s) { return host.record(e, s.inner); }
  fpdt::status wait(stream_type& s, event_type const& e) { return host.wait(s.inner, e); }
  fpdt::status copy_async(void* d, void const* src, std::size_t n, stream_type& s) {
    FPDT_TRY(jitter(s));
    return host.copy_async(d, src, n, s.inner);
  }
  // The backend's "kernel launch": queues `f` on the stream.
  template <class F> fpdt::status launch(stream_type& s, F&& f) {
    FPDT_TRY(jitter(s));
    return host.launch(s.inner, std::forward<F>(f));
  }
  fpdt::status synchronize(stream_type& s) { return host.synchronize(s.inner); }
  fpdt::device_arena& device_memory() { return host.device_memory(); }
  fpdt::pinned_pool& pinned_memory() { return host.pinned_memory(); }

private:
  fpdt::status jitter(stream_type& s) {
    if (slow_lane == s.on && slow_delay.count() > 0)
      FPDT_TRY(host.launch(s.inner, [us = slow_delay] { std::this_thread::sleep_for(us); }));
    if constexpr (!Jitter) {
      return {};
    } else {
      std::uint64_t x = (draws.fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull;
      x ^= x >> 31;
      x *= 0xBF58476D1CE4E5B9ull;
      x ^= x >> 29;
      // Mostly short, one in eight long: a stream then falls well behind the others.
      auto const us = std::chrono::microseconds(static_cast<long>((x >> 8) % 8 == 0 ? 1500 : x % 200));
      return host.launch(s.inner, [us] { std::this_thread::sleep_for(us); });
    }
  }
};
using device_like_backend = basic_device_like_backend<false>;
using jittery_device_like_backend = basic_device_like_backend<true>;
static_assert(fpdt::backend<device_like_backend>);
static_assert(!fpdt::runs_host_tasks_in_order<device_like_backend>);
static_assert(fpdt::times_steps_with_events<device_like_backend>);
static_assert(fpdt::backend<jittery_device_like_backend>);

} // namespace fpdt_test

// The customization point a backend's author writes: here the host steps, queued with launch.
template <bool Jitter>
struct fpdt::attention_step_ops<fpdt_test::basic_device_like_backend<Jitter>>
    : fpdt::host_attention_step_ops<fpdt_test::basic_device_like_backend<Jitter>> {};
