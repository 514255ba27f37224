//! \file
//! \brief `host::event`: a completion marker that host streams record and wait on.
//!
//! Semantics follow `cudaEvent_t`: `record` on a stream marks the point after the stream's work
//! so far; a `wait` (by a stream or by the host) waits for the latest record made before the wait
//! was issued; an event never recorded is complete. Because a wait only ever refers to a record
//! issued earlier, FIFO streams ordered by events cannot deadlock. A record carries the error its
//! stream had when it reached it, and a wait takes the error of the record it waits for.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <set>

FPDT_NAMESPACE_BEGIN

namespace host {

class stream;

//! Copyable handle to an event; copies refer to the same event.
class event {
public:
  //! A new event, never recorded (so already complete).
  event() : state_(std::make_shared<state>()) {}

  //! True when every record issued so far has completed (`cudaEventQuery` without the error).
  [[nodiscard]] bool query() const {
    std::lock_guard lock(state_->mutex);
    return state_->pending.empty();
  }

  //! Blocks the calling thread until the latest record issued before this call has completed.
  //! Returns the error the recording stream had when it reached that record (not a later or
  //! an earlier record's), or ok.
  [[nodiscard]] status synchronize() const { return wait_for(claim()); }

  //! Seconds between the completions of `start`'s and `end`'s latest records (may be negative).
  //! Errors: `errc::invalid_argument` when either has not completed a record.
  [[nodiscard]] friend result<double> elapsed_seconds(event const& start, event const& end) {
    auto const t0 = start.completion_time();
    auto const t1 = end.completion_time();
    if (!t0.ok() || !t1.ok())
      return make_error(errc::invalid_argument,
                        "elapsed_seconds: both events must have completed a record");
    return std::chrono::duration<double>(*t1 - *t0).count();
  }

private:
  friend class stream;
  using clock = std::chrono::steady_clock;

  struct state {
    std::mutex mutex;
    std::condition_variable cv;
    std::uint64_t issued = 0;          // generation of the latest record issued
    std::set<std::uint64_t> pending;   // generations issued but not completed
    bool completed_once = false;
    clock::time_point completed_at{};  // completion time of the latest completed record
    // Errors carried by completed records, by generation (ok ones are not stored), so a wait
    // reads its own record's error even when other records of the event (later ones, or ones on
    // other streams) completed since. An entry is kept while its generation is the latest issued
    // (a new wait may still refer to it) or a wait that refers to it has not read it yet.
    std::map<std::uint64_t, status> errors;
    // generation -> waits issued for it and not yet done. Every claim() is matched by a
    // wait_for(): synchronize() calls both, and a stream runs every queued wait, even while it
    // is destroyed (~stream drains its queue), so no entry outlives its waits.
    std::map<std::uint64_t, int> waiting;
    void prune() {
      for (auto it = errors.begin(); it != errors.end() && it->first < issued;)
        it = waiting.count(it->first) ? std::next(it) : errors.erase(it);
    }
  };

  // Called by stream::record at issue time; returns the generation to complete later.
  [[nodiscard]] std::uint64_t issue() const {
    std::lock_guard lock(state_->mutex);
    std::uint64_t const g = ++state_->issued;
    state_->pending.insert(g);
    return g;
  }
  // The generation a wait issued now must wait for (0: nothing to wait for), registered so its
  // error is kept until the matching wait_for has read it.
  [[nodiscard]] std::uint64_t claim() const {
    std::lock_guard lock(state_->mutex);
    std::uint64_t const g = state_->issued;
    if (g != 0) ++state_->waiting[g];
    return g;
  }
  void complete(std::uint64_t g, status const& error) const {
    {
      std::lock_guard lock(state_->mutex);
      state_->pending.erase(g);
      if (g == state_->issued || !state_->completed_once) {
        state_->completed_at = clock::now();
        state_->completed_once = true;
      }
      if (!error.ok()) state_->errors[g] = error;
      state_->prune();
    }
    state_->cv.notify_all();
  }
  // Waits for generation g (from claim()) and returns its record's error.
  [[nodiscard]] status wait_for(std::uint64_t g) const {
    if (g == 0) return {};
    std::unique_lock lock(state_->mutex);
    state_->cv.wait(lock, [&] { return state_->pending.count(g) == 0; });
    auto const it = state_->errors.find(g);
    status st = it == state_->errors.end() ? status{} : it->second;
    if (auto w = state_->waiting.find(g); w != state_->waiting.end() && --w->second == 0) state_->waiting.erase(w);
    state_->prune();
    return st;
  }
  [[nodiscard]] result<clock::time_point> completion_time() const {
    std::lock_guard lock(state_->mutex);
    if (!state_->completed_once) return make_error(errc::invalid_argument, "event not completed");
    return state_->completed_at;
  }

  std::shared_ptr<state> state_;
};

} // namespace host

FPDT_NAMESPACE_END
