//! \file
//! \brief `executor`: runs a schedule's steps on a backend's lanes, ordered by events only.
//!
//! DESIGN.md 3 (the stream-overlap pipeline). One stream per lane (compute at high priority,
//! h2d, d2h, comm); every step is enqueued on its lane's stream after waits on the events of the
//! steps it depends on that ran on other lanes (same-lane order is the stream's FIFO order, and a
//! `release` marker stands for its own dependencies), then an event is recorded after it. The
//! host thread only enqueues: there is no device-wide or stream synchronisation inside the loop,
//! only one wait for all lanes at the end of the pass. The work of each step is the caller's:
//! a functor `status work(schedule_step const&, std::size_t index, stream_type&)` that enqueues
//! the step's copies or kernels on the stream it is given.
#pragma once

#include "../backend/backend.hpp"
#include "../backend/host/stream.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../schedule/schedule.hpp"
#include "trace.hpp"

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! True for backends whose streams run host callables in stream order (the host backend): the
//! executor then times each step on the lane itself. Elsewhere the trace keeps the steps untimed.
template <class B>
inline constexpr bool runs_host_tasks_in_order = std::is_same_v<typename B::stream_type, host::stream>;

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

  //! Enqueues every step of `s` in order and waits for all lanes at the end.
  //!
  //! \param s     the schedule (check it with `check_schedule` first)
  //! \param work  `status(schedule_step const&, std::size_t index, stream_type&)`: enqueues the
  //!              step's work on the given stream (not called for `release` markers)
  //! \param trace when not null, receives one event per non-release step (timed on the host
  //!              backend)
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
    status failed{};
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
      if (failed.ok()) failed = work(st, k, str);
      if constexpr (runs_host_tasks_in_order<B>)
        if (te && failed.ok()) failed = be_->launch(str, [te, t0] { te->end_us = since(t0); });
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
    return first;
  }

private:
  explicit executor(B& be) noexcept : be_(&be) {}
  static double since(std::chrono::steady_clock::time_point t0) noexcept {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }

  B* be_;
  std::array<std::optional<stream_type>, 4> streams_{};
  std::vector<event_type> events_{};
};

FPDT_NAMESPACE_END
