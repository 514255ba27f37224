//! \file
//! \brief `pipeline_trace`: what each step of a schedule did, when, on which lane, with how many
//! bytes; written as Chrome trace JSON (open it in Perfetto or chrome://tracing).
//!
//! docs/design.md 4.5: the trace comes from the same steps the executor runs. Times are microseconds of
//! the host's steady clock since the start of the pass; on the host backend they are taken on the
//! lane's own worker thread just before and after the step's work, so they show what overlapped
//! with what.
#pragma once

#include "../config.hpp"
#include "../core/lane.hpp"
#include "../core/status.hpp"
#include "../schedule/schedule.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <ios>
#include <ostream>
#include <string>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! One executed step.
struct trace_event {
  step_kind kind = step_kind::release; //!< what the step did
  lane on = lane::compute;             //!< where it ran
  std::int32_t i = -1;                 //!< query chunk, or -1
  std::int32_t j = -1;                 //!< key/value chunk, or -1
  std::uint64_t bytes = 0;             //!< bytes moved or written
  double begin_us = -1;                //!< start, microseconds since the pass began (-1: not timed)
  double end_us = -1;                  //!< end, microseconds since the pass began (-1: not timed)
};

//! The events of one pass, in schedule order, and summaries of them.
struct pipeline_trace {
  std::string name = "fpdt";         //!< process name shown by the viewer
  std::vector<trace_event> events;   //!< one per non-release step, in issue order
  //! The host clock's time at the events' 0 when they were timed on the host (host tasks); on
  //! backends that time with events, the time the pass started enqueueing (their times count
  //! from an event: `executor::timing_start`, `fpdt_attention::trace_start_event`). Lets steps
  //! timed elsewhere (a layer's own comm lane) be put on the same clock.
  std::chrono::steady_clock::time_point origin{};

  //! Busy time of lane `l` (sum of its steps' durations), microseconds.
  [[nodiscard]] double busy_us(lane l) const {
    double t = 0;
    for (trace_event const& e : events)
      if (e.on == l && e.begin_us >= 0) t += e.end_us - e.begin_us;
    return t;
  }
  //! Wall time of the pass: last end minus first begin, microseconds (0 when nothing was timed).
  [[nodiscard]] double span_us() const {
    double b = -1, e = -1;
    for (trace_event const& x : events)
      if (x.begin_us >= 0) {
        b = b < 0 ? x.begin_us : std::min(b, x.begin_us);
        e = std::max(e, x.end_us);
      }
    return b < 0 ? 0 : e - b;
  }
  //! Time during which a copy lane (h2d or d2h) and the compute lane were both busy,
  //! microseconds: how much of the copying was hidden behind compute.
  [[nodiscard]] double overlap_us() const {
    std::vector<std::pair<double, double>> comp, copy;
    for (trace_event const& x : events) {
      if (x.begin_us < 0) continue;
      (x.on == lane::compute ? comp : copy).emplace_back(x.begin_us, x.end_us);
    }
    double t = 0;
    for (auto const& [cb, ce] : copy)
      for (auto const& [pb, pe] : comp)
        t += std::max(0.0, std::min(ce, pe) - std::max(cb, pb));
    return t;
  }

  //! Writes the events as Chrome trace JSON ("X" complete events; one thread row per lane, named
  //! after the lane; args hold i, j and bytes). Untimed events are skipped.
  void write_chrome_json(std::ostream& os) const {
    std::ios_base::fmtflags const flags = os.flags();
    std::streamsize const prec = os.precision();
    os << std::fixed << std::setprecision(3); // microseconds with ns resolution, at any magnitude
    std::string escaped;
    for (char ch : name) {
      if (ch == '"' || ch == '\\') escaped += '\\';
      if (static_cast<unsigned char>(ch) >= 0x20) escaped += ch;
    }
    os << "{\"traceEvents\":[\n";
    bool first = true;
    for (int l = 0; l < 4; ++l) {
      os << (first ? "" : ",\n") << R"({"name":"thread_name","ph":"M","pid":1,"tid":)" << l
         << R"(,"args":{"name":")" << to_string(static_cast<lane>(l)) << "\"}}";
      first = false;
    }
    os << ",\n" << R"({"name":"process_name","ph":"M","pid":1,"args":{"name":")" << escaped << "\"}}";
    for (trace_event const& e : events) {
      if (e.begin_us < 0) continue;
      os << ",\n{\"name\":\"" << to_string(e.kind);
      if (e.i >= 0) os << " i" << e.i;
      if (e.j >= 0) os << " j" << e.j;
      os << "\",\"cat\":\"" << to_string(e.on) << "\",\"ph\":\"X\",\"pid\":1,\"tid\":"
         << static_cast<int>(e.on) << ",\"ts\":" << e.begin_us
         << ",\"dur\":" << std::max(0.0, e.end_us - e.begin_us) << ",\"args\":{\"i\":" << e.i
         << ",\"j\":" << e.j << ",\"bytes\":" << e.bytes << "}}";
    }
    os << "\n],\"displayTimeUnit\":\"ms\"}\n";
    os.flags(flags);
    os.precision(prec);
  }

  //! Writes the Chrome trace JSON to the file at `path`. Errors: `errc::invalid_argument` naming
  //! the path when it cannot be written.
  [[nodiscard]] status write_chrome_json(std::string const& path) const {
    std::ofstream f(path);
    if (!f) return make_error(errc::invalid_argument, "pipeline_trace: cannot open ", path, " for writing");
    write_chrome_json(f);
    f.flush();
    if (!f) return make_error(errc::invalid_argument, "pipeline_trace: writing ", path, " failed");
    return {};
  }
};

FPDT_NAMESPACE_END
