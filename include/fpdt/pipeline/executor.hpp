//! \file
//! \brief `executor`: runs a schedule's steps on a backend's lanes, ordered by events only.
//!
//! docs/design.md 4.5 (the stream-overlap pipeline). One stream per lane (compute and comm at high
//! priority, h2d, d2h); every step is enqueued on its lane's stream after waits on the events of the
//! steps it depends on that ran on other lanes (same-lane order is the stream's FIFO order, and a
//! `release` marker stands for its own dependencies), then an event is recorded after it. The
//! host thread only enqueues: there is no device-wide or stream synchronisation inside the loop,
//! only one wait for all lanes at the end of the pass. The work of each step is the caller's:
//! a functor `status work(schedule_step const&, std::size_t index, stream_type&)` that enqueues
//! the step's copies or kernels on the stream it is given.
#pragma once

#include "../backend/backend.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../schedule/schedule.hpp"
#include "trace.hpp"

#include <array>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! True for backends whose streams run host callables in stream order: those that opt in with a
//! member `static constexpr bool runs_host_tasks = true;` (`host_backend` does) and so have
//! `launch(stream, callable)`. The executor then times each step on the lane itself; the layers
//! run plain-form callbacks and their elementwise steps as host tasks. False when the member is
//! absent or false (device backends: the trace keeps the steps untimed, or times them with events).
template <class B>
inline constexpr bool runs_host_tasks_in_order = requires { requires B::runs_host_tasks; };

//! True for device backends that time work with events: their streams do not run host tasks, and
//! `create_event(true)` gives an event that `elapsed_seconds(start, end)` can measure between (CUDA).
//! The executor then brackets each traced step with two such events on its lane and reads the
//! times after the pass (device time, not enqueue time).
template <class B>
inline constexpr bool times_steps_with_events =
    !runs_host_tasks_in_order<B> &&
    requires(B& b, typename B::event_type const& e) {
      { b.create_event(true) } -> std::same_as<result<typename B::event_type>>;
      { elapsed_seconds(e, e) } -> std::same_as<result<double>>;
    };

//! Runs schedules on the four lanes of backend `B`; keeps its streams and events across passes.
template <backend B> class executor {
public:
  using stream_type = typename B::stream_type; //!< the backend's stream
  using event_type = typename B::event_type;   //!< the backend's event

  //! An executor on `be`, with one new stream per lane. Errors: those of `create_stream`.
  [[nodiscard]] static result<executor> create(B& be) {
    executor ex(be);
    for (int l = 0; l < 4; ++l) {
      auto s = be.create_stream(static_cast<lane>(l));
      if (!s) return s.error();
      ex.streams_[static_cast<std::size_t>(l)].emplace(std::move(*s));
    }
    return result<executor>(std::move(ex));
  }

  //! The stream of lane `l`.
  [[nodiscard]] stream_type& stream(lane l) noexcept {
    return *streams_[static_cast<std::size_t>(l)];
  }

  //! The event the last traced pass's step times are measured from (recorded on the compute
  //! lane before its first step, and waited for by the other lanes), on backends that time with
  //! events (`times_steps_with_events`); null elsewhere and before such a pass. Work on other
  //! streams may wait for it and be timed from it, to share the trace's clock.
  [[nodiscard]] event_type const* timing_start() const noexcept {
    return timing_start_ ? &*timing_start_ : nullptr;
  }

  //! Enqueues every step of `s` in order and waits for all lanes at the end.
  //!
  //! \param s     the schedule (check it with `check_schedule` first)
  //! \param work  `status(schedule_step const&, std::size_t index, stream_type&)`: enqueues the
  //!              step's work on the given stream (not called for `release` markers)
  //! \param trace when not null, receives one event per non-release step, timed on the host
  //!              backend (host tasks on the lane) and on backends that time with events
  //!              (`times_steps_with_events`: two timing events per step, read after the pass);
  //!              elsewhere, and for steps of a failed pass, untimed (-1)
  //! Errors: the first error `work` returns (with the step named; later steps are not enqueued,
  //! the lanes are drained first), or the first error a lane raised while running.
  template <class Work>
  [[nodiscard]] status run(schedule const& s, Work&& work, pipeline_trace* trace = nullptr) {
    std::size_t const n = s.steps.size();
    while (events_.size() < n) {
      auto e = be_->create_event();
      if (!e) return e.error();
      events_.push_back(std::move(*e));
    }
    // frontier[k][l]: the latest step on lane l that step k (or marker k) stands for.
    std::vector<std::array<std::int64_t, 4>> frontier(n, {-1, -1, -1, -1});
    if (trace) {
      trace->events.clear();
      trace->events.reserve(n);
    }
    auto const t0 = std::chrono::steady_clock::now();
    if (trace) trace->origin = t0;
    status failed{};
    // Event timing: the step index of each trace event, and a start event every lane waits for
    // (so no step starts before it and every elapsed time is >= 0).
    std::vector<std::size_t> traced{};
    if constexpr (times_steps_with_events<B>)
      if (trace) {
        FPDT_TRY(make_timing_events(n));
        FPDT_TRY(be_->record(*timing_start_, stream(lane::compute)));
        for (int l = 1; l < 4; ++l) FPDT_TRY(be_->wait(stream(static_cast<lane>(l)), *timing_start_));
        traced.reserve(n);
      }
    for (std::size_t k = 0; k < n && failed.ok(); ++k) {
      schedule_step const& st = s.steps[k];
      std::array<std::int64_t, 4> waits{-1, -1, -1, -1};
      for (std::uint32_t d : s.deps_of(k))
        for (int l = 0; l < 4; ++l)
          waits[static_cast<std::size_t>(l)] =
              std::max(waits[static_cast<std::size_t>(l)], frontier[d][static_cast<std::size_t>(l)]);
      if (st.kind == step_kind::release) {
        frontier[k] = waits;
        continue;
      }
      frontier[k][static_cast<std::size_t>(st.on)] = static_cast<std::int64_t>(k);
      stream_type& str = stream(st.on);
      for (int l = 0; l < 4; ++l) {
        std::int64_t const w = waits[static_cast<std::size_t>(l)];
        if (w >= 0 && l != static_cast<int>(st.on)) {
          failed = be_->wait(str, events_[static_cast<std::size_t>(w)]);
          if (!failed.ok()) break;
        }
      }
      if (!failed.ok()) break;
      trace_event* te = nullptr;
      if (trace) {
        trace->events.push_back({st.kind, st.on, st.i, st.j, st.bytes, -1, -1});
        te = &trace->events.back();
      }
      if constexpr (runs_host_tasks_in_order<B>)
        if (te) failed = be_->launch(str, [te, t0] { te->begin_us = since(t0); });
      if constexpr (times_steps_with_events<B>)
        if (te) {
          traced.push_back(k);
          failed = be_->record(timing_begin_[k], str);
        }
      if (failed.ok()) failed = work(st, k, str);
      if constexpr (runs_host_tasks_in_order<B>)
        if (te && failed.ok()) failed = be_->launch(str, [te, t0] { te->end_us = since(t0); });
      if constexpr (times_steps_with_events<B>)
        if (te && failed.ok()) failed = be_->record(timing_end_[k], str);
      if (failed.ok()) failed = be_->record(events_[k], str);
      if (!failed.ok())
        failed = failed.with_context(detail::concat("executor: step ", k, " (", to_string(st.kind),
                                                    " i=", st.i, " j=", st.j, ")"));
    }
    status first = failed;
    for (auto& str : streams_) {
      status const sync = be_->synchronize(*str);
      if (first.ok() && !sync.ok()) first = sync;
    }
    if constexpr (times_steps_with_events<B>)
      if (trace && first.ok())
        for (std::size_t t = 0; t < traced.size(); ++t) {
          result<double> const b = elapsed_seconds(*timing_start_, timing_begin_[traced[t]]);
          result<double> const e = elapsed_seconds(*timing_start_, timing_end_[traced[t]]);
          if (b.ok() && e.ok()) {
            trace->events[t].begin_us = *b * 1e6;
            trace->events[t].end_us = *e * 1e6;
          }
        }
    return first;
  }

private:
  explicit executor(B& be) noexcept : be_(&be) {}

  // The start event and n begin/end timing events, made once and kept for later passes. Only
  // called (so only instantiated) for backends that time with events.
  [[nodiscard]] status make_timing_events(std::size_t n) {
    if (!timing_start_) {
      auto e = be_->create_event(true);
      if (!e) return e.error();
      timing_start_.emplace(std::move(*e));
    }
    while (timing_begin_.size() < n) {
      auto b = be_->create_event(true);
      if (!b) return b.error();
      auto e = be_->create_event(true);
      if (!e) return e.error();
      timing_begin_.push_back(std::move(*b));
      timing_end_.push_back(std::move(*e));
    }
    return {};
  }
  static double since(std::chrono::steady_clock::time_point t0) noexcept {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }

  B* be_;
  std::array<std::optional<stream_type>, 4> streams_{};
  std::vector<event_type> events_{};
  std::optional<event_type> timing_start_{};                 // event-timed backends only
  std::vector<event_type> timing_begin_{}, timing_end_{};    // per step, event-timed backends only
};

FPDT_NAMESPACE_END
