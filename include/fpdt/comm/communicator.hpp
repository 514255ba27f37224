//! \file
//! \brief The `communicator` concept and the in-process model (`local_world`, P ranks as threads).
//!
//! docs/design.md 3.5 and 4.8: the Ulysses all-to-all and the few collectives FPDT needs, over host
//! memory. Every operation is blocking for the calling thread and carries a *tag*: operations are
//! matched across ranks by tag, not by call order, so different lanes of one rank (the compute
//! lane's output all-to-all, the copy lane's dout all-to-all) may run collectives concurrently.
//! Each tag must be used by every rank exactly once at a time. A rank that fails calls `abort`,
//! and every rank's pending and later operations return `errc::comm_error` naming it; a rank that
//! never arrives makes the others fail with `errc::timeout` after the world's timeout: never a hang.
//!
//! Models: `local_communicator` (this file; the embedded default and the tests' world),
//! `mpi_communicator` (comm/mpi/mpi_communicator.hpp). The NCCL communicator
//! (comm/nccl/nccl_communicator.hpp) is stream-ordered and device-side instead.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"

#include <algorithm>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! Opt-in tag: a communicator declares `using communicator_tag = fpdt::communicator_tag;`.
struct communicator_tag {};

//! A host-memory communicator of `size()` ranks (see the file comment). Required members, all
//! blocking, all returning `status`:
//! - `rank()`, `size()`;
//! - `all_to_all(send, recv, bytes_per_rank, tag)`: block p of `send` (bytes [p b, (p+1) b)) goes
//!   to rank p, which stores it as block `rank()` of its `recv`;
//! - `all_to_all_v(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets, tag)`: the
//!   same with a byte count and offset per peer (spans of `size()` entries); `send_bytes[q]` on
//!   rank p must equal `recv_bytes[p]` on rank q;
//! - `all_reduce_sum(send, recv, count, tag)` for float and double (`recv` may equal `send`):
//!   every rank gets the same sum, added in rank order;
//! - `all_gather(send, recv, bytes, tag)`: block p of `recv` is rank p's `send`;
//! - `barrier(tag)`; `abort(reason)`: makes every rank's pending and later operations fail.
template <class C>
concept communicator =
    std::same_as<typename C::communicator_tag, fpdt::communicator_tag> &&
    requires(C& c, void const* s, void* r, std::size_t n, std::uint64_t tag,
             std::span<std::size_t const> counts, float const* fs, float* fr, double const* ds,
             double* dr) {
      { c.rank() } -> std::convertible_to<int>;
      { c.size() } -> std::convertible_to<int>;
      { c.all_to_all(s, r, n, tag) } -> std::same_as<status>;
      { c.all_to_all_v(s, counts, counts, r, counts, counts, tag) } -> std::same_as<status>;
      { c.all_reduce_sum(fs, fr, n, tag) } -> std::same_as<status>;
      { c.all_reduce_sum(ds, dr, n, tag) } -> std::same_as<status>;
      { c.all_gather(s, r, n, tag) } -> std::same_as<status>;
      { c.barrier(tag) } -> std::same_as<status>;
      c.abort("reason");
    };

class local_communicator;

//! P ranks of one process (threads) sharing memory; hands out one `local_communicator` per rank.
//! Thread-safe. Must outlive its communicators.
class local_world {
public:
  //! A world of `size` ranks whose operations give up after `timeout` waiting for a peer. A size
  //! below 1 makes a world without ranks: `communicator` then returns an error naming it.
  explicit local_world(int size, std::chrono::milliseconds timeout = std::chrono::seconds(30))
      : state_(std::make_shared<state>()) {
    state_->size = size < 0 ? 0 : size;
    state_->timeout = timeout;
  }

  //! Number of ranks.
  [[nodiscard]] int size() const noexcept { return state_->size; }

  //! The communicator of rank `rank` (0 <= rank < size()). Errors: `errc::invalid_argument`.
  [[nodiscard]] result<local_communicator> communicator(int rank) const;

  //! Makes every pending and later operation of every rank fail with `reason`.
  void abort(std::string const& reason) const { abort_state(*state_, reason); }

private:
  friend class local_communicator;
  struct state;
  static void abort_state(state& st, std::string const& reason) {
    std::lock_guard lock(st.m);
    if (st.aborted.empty()) st.aborted = reason.empty() ? "aborted" : reason;
    st.cv.notify_all();
  }
  // One collective in progress: what each rank deposited, and how many arrived and finished.
  struct entry {
    std::vector<void const*> send;
    std::vector<std::vector<std::size_t>> counts; // per rank: send bytes per peer (v variants)
    std::vector<std::vector<std::size_t>> offsets;
    std::vector<char> present; // per rank: arrived
    int arrived = 0;
    int done = 0;
    int left = 0;
    char op = 0;
    std::size_t bytes = 0;
  };
  struct state {
    int size = 1;
    std::chrono::milliseconds timeout{};
    std::mutex m;
    std::condition_variable cv;
    std::map<std::uint64_t, entry> box;
    std::string aborted;
  };
  std::shared_ptr<state> state_;
};

//! One rank of a `local_world`: models `communicator` (blocking, tagged; see the file comment).
class local_communicator {
public:
  using communicator_tag = fpdt::communicator_tag; //!< opts in to the `communicator` concept

  //! This rank.
  [[nodiscard]] int rank() const noexcept { return rank_; }
  //! Number of ranks.
  [[nodiscard]] int size() const noexcept { return world_->size; }

  //! Equal-count all-to-all of `bytes_per_rank` bytes per peer. Errors: `errc::invalid_argument`
  //! for null buffers with bytes > 0 or a tag in use with another operation or size;
  //! `errc::comm_error` after an abort; `errc::timeout` naming the ranks that never arrived.
  [[nodiscard]] status all_to_all(void const* send, void* recv, std::size_t bytes_per_rank,
                                  std::uint64_t tag) {
    if (bytes_per_rank > 0 && (send == nullptr || recv == nullptr))
      return make_error(errc::invalid_argument, "local_communicator::all_to_all (rank ", rank_,
                        ", tag ", tag, "): null buffer with ", bytes_per_rank, " bytes per rank");
    return exchange('a', tag, send, bytes_per_rank, {}, {}, [&](entry_view const& e) -> status {
      for (int p = 0; p < size(); ++p)
        if (bytes_per_rank > 0)
          std::memcpy(static_cast<std::byte*>(recv) + p * bytes_per_rank,
                      static_cast<std::byte const*>(e.send[p]) + rank_ * bytes_per_rank,
                      bytes_per_rank);
      return {};
    });
  }

  //! All-to-all with a byte count and offset per peer (spans of `size()` entries, in bytes).
  //! Errors: as `all_to_all`, plus `errc::invalid_argument` for spans of the wrong length and
  //! `errc::shape_mismatch` when a peer sends a different count than this rank expects.
  [[nodiscard]] status all_to_all_v(void const* send, std::span<std::size_t const> send_bytes,
                                    std::span<std::size_t const> send_offsets, void* recv,
                                    std::span<std::size_t const> recv_bytes,
                                    std::span<std::size_t const> recv_offsets, std::uint64_t tag) {
    auto const p_count = static_cast<std::size_t>(size());
    if (send_bytes.size() != p_count || send_offsets.size() != p_count ||
        recv_bytes.size() != p_count || recv_offsets.size() != p_count)
      return make_error(errc::invalid_argument, "local_communicator::all_to_all_v (rank ", rank_,
                        "): count and offset spans must have ", p_count, " entries, got ",
                        send_bytes.size(), ", ", send_offsets.size(), ", ", recv_bytes.size(),
                        ", ", recv_offsets.size());
    return exchange('v', tag, send, 0, {send_bytes.begin(), send_bytes.end()},
                    {send_offsets.begin(), send_offsets.end()}, [&](entry_view const& e) -> status {
                      for (int p = 0; p < size(); ++p) {
                        std::size_t const n = e.counts[p][static_cast<std::size_t>(rank_)];
                        if (n != recv_bytes[static_cast<std::size_t>(p)])
                          return make_error(errc::shape_mismatch,
                                            "local_communicator::all_to_all_v (tag ", tag,
                                            "): rank ", p, " sends ", n, " bytes to rank ", rank_,
                                            ", which expects ", recv_bytes[static_cast<std::size_t>(p)]);
                        if (n > 0)
                          std::memcpy(static_cast<std::byte*>(recv) + recv_offsets[static_cast<std::size_t>(p)],
                                      static_cast<std::byte const*>(e.send[p]) +
                                          e.offsets[p][static_cast<std::size_t>(rank_)],
                                      n);
                      }
                      return {};
                    });
  }

  //! Element-wise sum over ranks of `count` floats, added in rank order (every rank gets the same
  //! bits); `recv` may equal `send`. Errors: as `all_to_all`.
  [[nodiscard]] status all_reduce_sum(float const* send, float* recv, std::size_t count,
                                      std::uint64_t tag) {
    return reduce(send, recv, count, tag);
  }
  //! As above, for doubles.
  [[nodiscard]] status all_reduce_sum(double const* send, double* recv, std::size_t count,
                                      std::uint64_t tag) {
    return reduce(send, recv, count, tag);
  }

  //! Block p of `recv` (`bytes` bytes) is rank p's `send`. Errors: as `all_to_all`.
  [[nodiscard]] status all_gather(void const* send, void* recv, std::size_t bytes, std::uint64_t tag) {
    if (bytes > 0 && (send == nullptr || recv == nullptr))
      return make_error(errc::invalid_argument, "local_communicator::all_gather (rank ", rank_,
                        "): null buffer with ", bytes, " bytes");
    return exchange('g', tag, send, bytes, {}, {}, [&](entry_view const& e) -> status {
      for (int p = 0; p < size(); ++p)
        if (bytes > 0)
          std::memcpy(static_cast<std::byte*>(recv) + p * bytes, e.send[p], bytes);
      return {};
    });
  }

  //! Returns once every rank called it with `tag`. Errors: as `all_to_all`.
  [[nodiscard]] status barrier(std::uint64_t tag) {
    return exchange('b', tag, nullptr, 0, {}, {}, [](entry_view const&) { return status{}; });
  }

  //! Makes every rank's pending and later operations fail, naming this rank and `reason`.
  void abort(std::string const& reason) const {
    local_world::abort_state(*world_, detail::concat("rank ", rank_, " aborted: ", reason));
  }

private:
  friend class local_world;
  using entry = local_world::entry;
  struct entry_view {
    std::vector<void const*> const& send;
    std::vector<std::vector<std::size_t>> const& counts;
    std::vector<std::vector<std::size_t>> const& offsets;
  };
  local_communicator(std::shared_ptr<local_world::state> w, int rank) : world_(std::move(w)), rank_(rank) {}

  template <class T>
  [[nodiscard]] status reduce(T const* send, T* recv, std::size_t count, std::uint64_t tag) {
    if (count > 0 && (send == nullptr || recv == nullptr))
      return make_error(errc::invalid_argument, "local_communicator::all_reduce_sum (rank ", rank_,
                        "): null buffer with ", count, " elements");
    // Sum into scratch first: recv may alias this rank's send, which peers are still reading.
    std::vector<T> sum(count, T(0));
    return exchange('r', tag, send, count * sizeof(T), {}, {}, [&](entry_view const& e) -> status {
      for (int p = 0; p < size(); ++p) {
        auto const* src = static_cast<T const*>(e.send[p]);
        for (std::size_t i = 0; i < count; ++i)
          sum[i] += src[i];
      }
      return {};
    }, [&] {
      if (count > 0) std::memcpy(recv, sum.data(), count * sizeof(T));
    });
  }

  // The operation a one-letter code stands for, in error messages.
  [[nodiscard]] static char const* op_name(char op) noexcept {
    switch (op) {
    case 'a': return "all_to_all";
    case 'v': return "all_to_all_v";
    case 'g': return "all_gather";
    case 'b': return "barrier";
    case 'r': return "all_reduce_sum";
    default: return "operation";
    }
  }
  // Deposits `send` under `tag`, waits for every rank, runs `copy` (reading peers' buffers), waits
  // until every rank has copied (so no one reuses a buffer a peer still reads), then `after`.
  template <class Copy, class After = void (*)()>
  [[nodiscard]] status exchange(char op, std::uint64_t tag, void const* send, std::size_t bytes,
                                std::vector<std::size_t> counts, std::vector<std::size_t> offsets,
                                Copy&& copy, After&& after = [] {}) {
    local_world::state& w = *world_;
    auto const deadline = std::chrono::steady_clock::now() + w.timeout;
    std::unique_lock lock(w.m);
    auto aborted = [&] {
      return make_error(errc::comm_error, "local_communicator (rank ", rank_, ", tag ", tag,
                        "): world aborted: ", w.aborted);
    };
    auto timed_out = [&](char const* what, std::vector<char> const* present) {
      std::string missing;
      for (std::size_t p = 0; present && p < present->size(); ++p)
        if (!(*present)[p]) missing += detail::concat(missing.empty() ? "" : ", ", p);
      status st = make_error(errc::timeout, "local_communicator (rank ", rank_, ", tag ", tag,
                             "): timed out after ", w.timeout.count(), " ms waiting for ", what,
                             missing.empty() ? "" : " (missing ranks: ", missing,
                             missing.empty() ? "" : ")");
      // The world cannot recover from a lost peer: make every other rank fail fast too.
      if (w.aborted.empty()) w.aborted = st.message();
      w.cv.notify_all();
      return st;
    };
    // A previous use of this tag may still be draining (peers copying): wait until it is gone.
    for (auto it = w.box.find(tag); it != w.box.end() && it->second.done == w.size;
         it = w.box.find(tag)) {
      if (!w.aborted.empty()) return aborted();
      if (w.cv.wait_until(lock, deadline) == std::cv_status::timeout)
        return timed_out("the previous use of the tag to finish", nullptr);
    }
    if (!w.aborted.empty()) return aborted();
    entry& e = w.box[tag];
    if (e.arrived == 0) {
      e.send.assign(static_cast<std::size_t>(w.size), nullptr);
      e.counts.assign(static_cast<std::size_t>(w.size), {});
      e.offsets.assign(static_cast<std::size_t>(w.size), {});
      e.present.assign(static_cast<std::size_t>(w.size), 0);
      e.op = op;
      e.bytes = bytes;
    } else if (e.present[static_cast<std::size_t>(rank_)]) {
      std::string const msg = detail::concat(
          "local_communicator (rank ", rank_, ", tag ", tag, "): this rank already has an operation "
          "pending under that tag (two concurrent operations share a tag: e.g. two layers with the "
          "same salt)");
      w.aborted = msg;
      w.cv.notify_all();
      return make_error(errc::invalid_argument, msg);
    } else if (e.op != op || (op != 'v' && e.bytes != bytes)) {
      // all_to_all_v and barrier carry no size of their own (recorded as 0).
      auto sized = [](char o, std::size_t b) {
        return o == 'v' || o == 'b' ? std::string(op_name(o))
                                    : detail::concat(op_name(o), " of ", b, " bytes per rank");
      };
      std::string const msg = detail::concat(
          "local_communicator (rank ", rank_, ", tag ", tag, "): ", sized(op, bytes), " does not match the ",
          sized(e.op, e.bytes), " another rank has pending under that tag (each tag: the same "
          "operation and size on every rank; ranks that disagree on S, C, H or D send different sizes)");
      w.aborted = msg;
      w.cv.notify_all();
      return make_error(errc::invalid_argument, msg);
    }
    e.send[static_cast<std::size_t>(rank_)] = send;
    e.counts[static_cast<std::size_t>(rank_)] = std::move(counts);
    e.offsets[static_cast<std::size_t>(rank_)] = std::move(offsets);
    e.present[static_cast<std::size_t>(rank_)] = 1;
    ++e.arrived;
    w.cv.notify_all();
    while (e.arrived < w.size) {
      if (!w.aborted.empty()) return aborted();
      if (w.cv.wait_until(lock, deadline) == std::cv_status::timeout && e.arrived < w.size)
        return timed_out("every rank to arrive", &e.present);
    }
    entry_view const view{e.send, e.counts, e.offsets};
    lock.unlock();
    status const copied = copy(view);
    lock.lock();
    ++e.done;
    w.cv.notify_all();
    status finished{};
    // Every rank has arrived, so each one is copying (which never blocks) or done: wait for all of
    // them even after an abort, since a peer may still be reading this rank's send buffer, which
    // the caller frees or reuses as soon as this returns.
    while (e.done < w.size) {
      if (w.cv.wait_until(lock, deadline) == std::cv_status::timeout && e.done < w.size) {
        finished = timed_out("every rank to finish copying", nullptr);
        break;
      }
    }
    if (finished.ok() && !w.aborted.empty()) finished = aborted();
    // The last rank to leave removes the entry, so the tag can be used again.
    if (++e.left == w.size) {
      w.box.erase(tag);
      w.cv.notify_all();
    }
    lock.unlock();
    FPDT_TRY(copied);
    FPDT_TRY(finished);
    after();
    return {};
  }

  std::shared_ptr<local_world::state> world_;
  int rank_;
};

inline result<local_communicator> local_world::communicator(int rank) const {
  if (state_->size < 1)
    return make_error(errc::invalid_argument, "local_world: a world needs at least 1 rank, this one "
                                              "was made with ", state_->size);
  if (rank < 0 || rank >= state_->size)
    return make_error(errc::invalid_argument, "local_world: rank ", rank, " is outside [0, ",
                      state_->size, ")");
  return local_communicator(state_, rank);
}

static_assert(communicator<local_communicator>);

FPDT_NAMESPACE_END
