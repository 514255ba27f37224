//! \file
//! \brief `host::stream`: an ordered queue of work run by one worker thread.
//!
//! The host backend's stand-in for `cudaStream_t` (docs/design.md 4.7): work enqueued on one
//! stream runs in FIFO order on the stream's own thread; work on different streams runs
//! concurrently, ordered only by events. Errors are values: a task that returns a failing status
//! or throws puts the stream in an error state; later tasks are skipped (records still complete
//! and carry the error to waiting streams, so nothing hangs) until `synchronize` reports the error
//! and clears it. An event keeps the error of the record that carried it: waiting on that same
//! record again raises it again (the data it guards is still bad); a new record clears it.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "event.hpp"
#include "fwd.hpp"

#include <cassert>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

FPDT_NAMESPACE_BEGIN

namespace host {

//! Move-only handle to a worker-thread stream; destroying it runs the queued work, then joins.
class stream {
public:
  //! Starts a stream whose worker thread is called `name` in error messages.
  explicit stream(std::string name = "stream") : impl_(std::make_unique<impl>(std::move(name))) {
    impl_->worker = std::thread([p = impl_.get()] { p->run(); });
  }
  //! Takes over `other`'s worker; a moved-from stream may only be destroyed or assigned to.
  stream(stream&& other) noexcept = default;
  //! Finishes this stream's queued work, then takes over `other`.
  stream& operator=(stream&& other) noexcept {
    if (this != &other) {
      shutdown();
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  stream(stream const&) = delete;
  stream& operator=(stream const&) = delete;
  //! Runs all queued work, then joins the worker thread.
  ~stream() { shutdown(); }

  //! The name given at construction.
  [[nodiscard]] std::string const& name() const noexcept { return impl_->name; }

  //! Queues `task` (callable as `void()` or `status()`) to run after all work queued before it.
  //! A task that returns a failing status or throws puts the stream into its error state.
  template <class F> void enqueue(F&& task) {
    assert(impl_ && "fpdt::host::stream used after being moved from");
    using R = std::invoke_result_t<F&>;
    static_assert(std::is_void_v<R> || std::is_same_v<R, status>,
                  "host::stream::enqueue: the task must return void or fpdt::status");
    impl_->push(item{[t = std::forward<F>(task)]() mutable -> status {
                       if constexpr (std::is_void_v<R>) {
                         t();
                         return {};
                       } else {
                         return t();
                       }
                     },
                     false});
  }

  //! Records `e` here: `e` completes once the work queued so far has run.
  void record(event const& e) {
    assert(impl_ && "fpdt::host::stream used after being moved from");
    std::uint64_t const g = e.issue();
    // Records run even in the error state, carrying the error, so no waiter ever hangs.
    impl_->push(item{[e, g, p = impl_.get()]() -> status {
                       e.complete(g, p->current_error());
                       return {};
                     },
                     true});
  }

  //! Makes later work here wait for the latest record of `e` issued before this call; if that
  //! record carried an error, this stream takes the error too.
  void wait(event const& e) {
    assert(impl_ && "fpdt::host::stream used after being moved from");
    std::uint64_t const g = e.claim();
    if (g == 0) return; // never recorded: complete, as in CUDA
    impl_->push(item{[e, g]() -> status { return e.wait_for(g); }, true});
  }

  //! Blocks the calling thread until all work queued before this call has run. Returns the first
  //! error raised since the previous synchronize (and clears it), or ok.
  //! Errors: `errc::invalid_argument` when called from a task of this stream (it would wait for
  //! itself forever).
  [[nodiscard]] status synchronize() {
    assert(impl_ && "fpdt::host::stream used after being moved from");
    return impl_->drain();
  }

  //! True when no queued work remains.
  [[nodiscard]] bool query() const { return impl_->idle(); }

private:
  struct item {
    std::function<status()> fn;
    bool always_run; // records and waits run even in the error state
  };

  struct impl {
    explicit impl(std::string n) : name(std::move(n)) {}

    void push(item it) {
      {
        std::lock_guard lock(mutex);
        queue.push_back(std::move(it));
        ++submitted;
      }
      cv.notify_all();
    }

    void run() {
      {
        std::lock_guard lock(mutex);
        worker_id = std::this_thread::get_id();
      }
      for (;;) {
        item it;
        {
          std::unique_lock lock(mutex);
          cv.wait(lock, [&] { return stopping || !queue.empty(); });
          if (queue.empty()) return; // stopping and drained
          it = std::move(queue.front());
          queue.pop_front();
        }
        bool const skip = !it.always_run && !current_error().ok();
        status s;
        if (!skip) {
          try {
            s = it.fn();
            // An error that already names its stream (another stream's, passed on through an
            // event wait) keeps that name alone.
            if (!s.ok() && !s.message().starts_with("task on stream '"))
              s = s.with_context(::fpdt::detail::concat("task on stream '", name, "'"));
          } catch (std::exception const& ex) {
            s = make_error(errc::backend_error, "task on stream '", name, "' threw: ", ex.what());
          } catch (...) {
            s = make_error(errc::backend_error, "task on stream '", name,
                           "' threw a non-standard exception");
          }
        }
        {
          std::lock_guard lock(mutex);
          if (!s.ok() && error.ok()) error = std::move(s);
          ++done;
        }
        cv.notify_all();
      }
    }

    [[nodiscard]] status current_error() {
      std::lock_guard lock(mutex);
      return error;
    }

    [[nodiscard]] status drain() {
      std::unique_lock lock(mutex);
      if (std::this_thread::get_id() == worker_id)
        return make_error(errc::invalid_argument, "host::stream '", name,
                          "': synchronize called from a task of the same stream would wait for "
                          "itself forever");
      std::uint64_t const target = submitted;
      cv.wait(lock, [&] { return done >= target; });
      return std::exchange(error, status{});
    }

    [[nodiscard]] bool idle() {
      std::lock_guard lock(mutex);
      return done == submitted;
    }

    std::string name;
    std::mutex mutex;
    std::condition_variable cv;
    std::deque<item> queue;
    std::uint64_t submitted = 0;
    std::uint64_t done = 0;
    bool stopping = false;
    status error;
    std::thread::id worker_id; // set by the worker itself (reading `worker` would race)
    std::thread worker;
  };

  void shutdown() noexcept {
    if (!impl_) return;
    {
      std::lock_guard lock(impl_->mutex);
      impl_->stopping = true;
    }
    impl_->cv.notify_all();
    if (impl_->worker.joinable()) impl_->worker.join();
    impl_.reset();
  }

  std::unique_ptr<impl> impl_;
};

} // namespace host

FPDT_NAMESPACE_END
