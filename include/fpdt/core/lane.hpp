//! \file
//! \brief `lane`: the four roles a stream plays in the FPDT pipeline, and their priorities.
//!
//! A lane is one stream of work in the stream-overlap pipeline (docs/design.md sections 1 and 4.5):
//! steps on the same lane run in issue order (a FIFO stream), steps on different lanes are
//! ordered by events only, so copies and communication overlap compute. There are four:
//! - `compute`: the chunk kernel, merges, casts (high priority);
//! - `h2d`: fetches, host-to-device copies of offloaded chunks;
//! - `d2h`: offloads, device-to-host copies into pinned memory;
//! - `comm`: all-to-all and other collectives.
//!
//! Schedules, traces and the planner name lanes without needing a backend; a backend
//! (`backend/backend.hpp`) creates one stream per lane.
#pragma once

#include "../config.hpp"

#include <cstdint>
#include <string_view>

FPDT_NAMESPACE_BEGIN

//! The role a stream plays in the pipeline (docs/design.md section 1, "lane").
enum class lane : std::uint8_t {
  compute, //!< attention, merges, casts
  h2d,     //!< fetches: host-to-device copies of offloaded chunks
  d2h,     //!< offloads: device-to-host copies into pinned memory
  comm,    //!< all-to-all and other collectives
};

//! Name of a lane: "compute", "h2d", "d2h", "comm".
[[nodiscard]] constexpr std::string_view to_string(lane l) noexcept {
  switch (l) {
  case lane::compute: return "compute";
  case lane::h2d: return "h2d";
  case lane::d2h: return "d2h";
  case lane::comm: return "comm";
  }
  return "unknown";
}

//! Scheduling priority of a stream; FPDT gives compute and the exchanges high priority, copies normal.
enum class stream_priority : std::uint8_t {
  normal, //!< default priority
  high,   //!< preferred by the device scheduler where the backend supports priorities
};

//! The priority FPDT uses for a lane: high for compute and comm, normal for copies. The exchanges
//! are on the critical path (chunk c + 1's compute waits for its q, k, v): at normal priority the
//! chunk kernel's queued blocks would hold NCCL's and the pack kernels' blocks back until its tail.
[[nodiscard]] constexpr stream_priority default_priority(lane l) noexcept {
  return l == lane::compute || l == lane::comm ? stream_priority::high : stream_priority::normal;
}

FPDT_NAMESPACE_END
