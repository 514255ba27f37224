//! \file
//! \brief `mpi_communicator`: the `communicator` concept over the caller's `MPI_Comm`.
//!
//! docs/design.md 4.8: fpdt never creates the MPI world; the caller passes its communicator (initialised
//! with `MPI_Init_thread` at `MPI_THREAD_SERIALIZED` or higher: several lanes of one rank
//! exchange, one at a time under this object's lock). Operations are point-to-point
//! `MPI_Isend`/`MPI_Irecv` under the operation's tag, so they are matched by tag like the
//! in-process model, polled with a deadline (`errc::timeout` naming the peers that did not
//! answer), and interrupted by a peer's `abort` (a message on a reserved tag). After a timeout or
//! an abort the communicator refuses further work; the program should end (`MPI_Abort`).
//! Receives of a failed operation are cancelled before it returns, so nothing the caller owns is
//! written afterwards; its sends may still be read by MPI until the program ends.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../communicator.hpp"
#include "mpi_check.hpp"

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! One rank of the caller's `MPI_Comm`: models `communicator` (see the file comment).
class mpi_communicator {
public:
  using communicator_tag = fpdt::communicator_tag; //!< opts in to the `communicator` concept

  //! Wraps `comm` (not owned, not duplicated); operations give up after `timeout`.
  //! Errors: `errc::invalid_argument` when MPI is not initialised or the thread level is below
  //! `MPI_THREAD_SERIALIZED`; MPI errors as `errc::comm_error`.
  [[nodiscard]] static result<mpi_communicator> create(MPI_Comm comm,
                                                       std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    int init = 0;
    FPDT_MPI_CHECK(MPI_Initialized(&init));
    if (!init)
      return make_error(errc::invalid_argument, "mpi_communicator: MPI is not initialised; call "
                                                "MPI_Init_thread first (fpdt never creates the world)");
    int level = 0;
    FPDT_MPI_CHECK(MPI_Query_thread(&level));
    if (level < MPI_THREAD_SERIALIZED)
      return make_error(errc::invalid_argument, "mpi_communicator: MPI thread level ", level,
                        " is below MPI_THREAD_SERIALIZED (", MPI_THREAD_SERIALIZED,
                        "); initialise with MPI_Init_thread(..., MPI_THREAD_SERIALIZED or "
                        "MPI_THREAD_MULTIPLE, ...)");
    auto st = std::make_unique<state>();
    st->comm = comm;
    st->timeout = timeout;
    FPDT_MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    FPDT_MPI_CHECK(MPI_Comm_rank(comm, &st->rank));
    FPDT_MPI_CHECK(MPI_Comm_size(comm, &st->size));
    void* ub = nullptr;
    int found = 0;
    FPDT_MPI_CHECK(MPI_Comm_get_attr(comm, MPI_TAG_UB, &ub, &found));
    st->tag_ub = found && ub ? *static_cast<int*>(ub) : 32767;
    return result<mpi_communicator>(mpi_communicator(std::move(st)));
  }

  //! This rank.
  [[nodiscard]] int rank() const noexcept { return s_->rank; }
  //! Number of ranks.
  [[nodiscard]] int size() const noexcept { return s_->size; }
  //! The largest usable tag (MPI_TAG_UB minus the reserved abort tag).
  [[nodiscard]] std::uint64_t max_tag() const noexcept { return static_cast<std::uint64_t>(s_->tag_ub - 1); }

  //! Equal-count all-to-all (see `communicator`). Errors: `errc::invalid_argument` for null
  //! buffers, tags above `max_tag()` or blocks over 2^31 - 1 bytes; `errc::shape_mismatch` when
  //! a peer sends a different count than this rank expects (more or fewer bytes; the
  //! communicator stays usable); `errc::comm_error` for MPI errors or a peer's abort;
  //! `errc::timeout` naming the peers that did not answer. Messages name the operation called.
  [[nodiscard]] status all_to_all(void const* send, void* recv, std::size_t bytes_per_rank,
                                  std::uint64_t tag) {
    std::vector<std::size_t> counts(static_cast<std::size_t>(size()), bytes_per_rank), offsets(counts.size());
    for (std::size_t p = 0; p < offsets.size(); ++p)
      offsets[p] = p * bytes_per_rank;
    return to_all(send, counts, offsets, recv, counts, offsets, tag, "all_to_all");
  }

  //! All-to-all with byte counts and offsets per peer. Errors: as `all_to_all`, plus
  //! `errc::invalid_argument` for spans of the wrong length.
  [[nodiscard]] status all_to_all_v(void const* send, std::span<std::size_t const> send_bytes,
                                    std::span<std::size_t const> send_offsets, void* recv,
                                    std::span<std::size_t const> recv_bytes,
                                    std::span<std::size_t const> recv_offsets, std::uint64_t tag) {
    return to_all(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets, tag, "all_to_all_v");
  }

  //! Sum over ranks in rank order (every rank gets the same bits); `recv` may equal `send`.
  //! Errors: as `all_to_all`.
  [[nodiscard]] status all_reduce_sum(float const* send, float* recv, std::size_t count, std::uint64_t tag) {
    return reduce(send, recv, count, tag);
  }
  //! As above, for doubles.
  [[nodiscard]] status all_reduce_sum(double const* send, double* recv, std::size_t count, std::uint64_t tag) {
    return reduce(send, recv, count, tag);
  }

  //! Block q of `recv` (`bytes` bytes) is rank q's `send`. Errors: as `all_to_all`.
  [[nodiscard]] status all_gather(void const* send, void* recv, std::size_t bytes, std::uint64_t tag) {
    return gather(send, recv, bytes, tag, "all_gather");
  }

  //! Returns once every rank called it with `tag`. Errors: as `all_to_all`.
  [[nodiscard]] status barrier(std::uint64_t tag) {
    auto const p = static_cast<std::size_t>(size());
    std::vector<std::byte const*> sends(p, nullptr);
    std::vector<std::byte*> recvs(p, nullptr);
    return exchange(sends, std::vector<std::size_t>(p, 0), recvs, std::vector<std::size_t>(p, 0), tag,
                    "barrier");
  }

  //! Tells every peer to fail its pending and later operations, naming this rank and `reason`.
  void abort(std::string const& reason) {
    std::lock_guard lock(s_->m);
    if (s_->aborted.empty()) s_->aborted = detail::concat("rank ", rank(), " aborted: ", reason);
    std::string const msg = detail::concat("rank ", rank(), " aborted: ", reason);
    for (int q = 0; q < size(); ++q) {
      if (q == rank()) continue;
      auto& buf = s_->graveyard.emplace_back(msg.size());
      std::memcpy(buf.data(), msg.data(), msg.size());
      MPI_Request r{};
      if (MPI_Isend(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, q, s_->tag_ub, s_->comm, &r) ==
          MPI_SUCCESS)
        MPI_Request_free(&r);
    }
  }

private:
  struct state {
    MPI_Comm comm{};
    int rank = 0, size = 1, tag_ub = 32767;
    std::chrono::milliseconds timeout{};
    std::mutex m;
    std::string aborted;
    std::vector<std::vector<std::byte>> graveyard; // abort messages in flight
  };
  explicit mpi_communicator(std::unique_ptr<state> s) : s_(std::move(s)) {}

  // all_to_all and all_to_all_v; `what` names the public operation in errors.
  [[nodiscard]] status to_all(void const* send, std::span<std::size_t const> send_bytes,
                              std::span<std::size_t const> send_offsets, void* recv,
                              std::span<std::size_t const> recv_bytes,
                              std::span<std::size_t const> recv_offsets, std::uint64_t tag, char const* what) {
    auto const p = static_cast<std::size_t>(size());
    if (send_bytes.size() != p || send_offsets.size() != p || recv_bytes.size() != p ||
        recv_offsets.size() != p)
      return make_error(errc::invalid_argument, "mpi_communicator::", what, " (rank ", rank(),
                        "): count and offset spans must have ", p, " entries, got ", send_bytes.size(),
                        ", ", send_offsets.size(), ", ", recv_bytes.size(), ", ", recv_offsets.size());
    std::vector<std::byte const*> sends(p);
    std::vector<std::byte*> recvs(p);
    for (std::size_t q = 0; q < p; ++q) {
      if ((send_bytes[q] > 0 && send == nullptr) || (recv_bytes[q] > 0 && recv == nullptr))
        return make_error(errc::invalid_argument, "mpi_communicator::", what, " (rank ", rank(), ", tag ",
                          tag, "): null ", send_bytes[q] > 0 && send == nullptr ? "send" : "recv",
                          " buffer with bytes to move (rank ",
                          q, ": ", send_bytes[q], " bytes to send, ", recv_bytes[q], " to receive)");
      sends[q] = static_cast<std::byte const*>(send) + send_offsets[q];
      recvs[q] = static_cast<std::byte*>(recv) + recv_offsets[q];
    }
    return exchange(sends, {send_bytes.begin(), send_bytes.end()}, recvs,
                    {recv_bytes.begin(), recv_bytes.end()}, tag, what);
  }

  // all_gather and the gather inside all_reduce_sum; `what` names the public operation in errors.
  [[nodiscard]] status gather(void const* send, void* recv, std::size_t bytes, std::uint64_t tag,
                              char const* what) {
    auto const p = static_cast<std::size_t>(size());
    if (bytes > 0 && (send == nullptr || recv == nullptr))
      return make_error(errc::invalid_argument, "mpi_communicator::", what, " (rank ", rank(),
                        "): null buffer with ", bytes, " bytes");
    std::vector<std::byte const*> sends(p, static_cast<std::byte const*>(send));
    std::vector<std::byte*> recvs(p);
    for (std::size_t q = 0; q < p; ++q)
      recvs[q] = static_cast<std::byte*>(recv) + q * bytes;
    return exchange(sends, std::vector<std::size_t>(p, bytes), recvs, std::vector<std::size_t>(p, bytes),
                    tag, what);
  }

  template <class T>
  [[nodiscard]] status reduce(T const* send, T* recv, std::size_t count, std::uint64_t tag) {
    if (count > 0 && (send == nullptr || recv == nullptr))
      return make_error(errc::invalid_argument, "mpi_communicator::all_reduce_sum (rank ", rank(),
                        "): null buffer with ", count, " elements");
    std::vector<T> all(count * static_cast<std::size_t>(size()));
    FPDT_TRY(gather(send, all.data(), count * sizeof(T), tag, "all_reduce_sum"));
    std::vector<T> sum(count, T(0));
    for (int q = 0; q < size(); ++q)
      for (std::size_t i = 0; i < count; ++i)
        sum[i] += all[static_cast<std::size_t>(q) * count + i];
    if (count > 0) std::memcpy(recv, sum.data(), count * sizeof(T));
    return {};
  }

  // Posts a receive from and a send to every peer under `tag`, copies the self block, and polls
  // until all complete, a peer aborts, or the deadline passes. `what` names the public operation
  // in errors. Every request is completed or freed before it returns.
  [[nodiscard]] status exchange(std::vector<std::byte const*> const& sends,
                                std::vector<std::size_t> const& send_bytes,
                                std::vector<std::byte*> const& recvs,
                                std::vector<std::size_t> const& recv_bytes, std::uint64_t tag,
                                char const* what) {
    state& s = *s_;
    int const me = s.rank, p = s.size;
    if (tag > max_tag())
      return make_error(errc::invalid_argument, "mpi_communicator::", what, " (rank ", me, "): tag ",
                        tag, " exceeds the largest usable tag ", max_tag(), " (MPI_TAG_UB - 1)");
    for (int q = 0; q < p; ++q)
      if (send_bytes[static_cast<std::size_t>(q)] > 0x7fffffff || recv_bytes[static_cast<std::size_t>(q)] > 0x7fffffff)
        return make_error(errc::invalid_argument, "mpi_communicator::", what, " (rank ", me,
                          "): a block of more than 2^31 - 1 bytes");
    auto const start = std::chrono::steady_clock::now();
    auto const deadline = start + s.timeout;
    int const mtag = static_cast<int>(tag);
    std::vector<MPI_Request> reqs;
    std::vector<int> peer_of; // request index -> peer q for receives, -1 - q for sends to q
    // An MPI error from `call` (`rc`), naming the operation; drains the requests posted so far.
    auto mpi_failure = [&](int rc, char const* call) {
      drain(reqs, peer_of);
      return make_error(errc::comm_error, "mpi_communicator::", what, " (rank ", me, ", tag ", tag,
                        "): ", mpi_status(rc, call, __FILE__, __LINE__).message());
    };
    {
      std::lock_guard lock(s.m);
      if (!s.aborted.empty())
        return make_error(errc::comm_error, "mpi_communicator::", what, " (rank ", me, ", tag ", tag,
                          "): ", s.aborted);
      for (int q = 0; q < p; ++q) {
        auto const qi = static_cast<std::size_t>(q);
        if (q == me) {
          if (send_bytes[qi] != recv_bytes[qi]) {
            drain(reqs, peer_of);
            return make_error(errc::shape_mismatch, "mpi_communicator::", what, " (rank ", me,
                              "): sends ", send_bytes[qi], " bytes to itself but expects ", recv_bytes[qi]);
          }
          if (recv_bytes[qi] > 0) std::memmove(recvs[qi], sends[qi], recv_bytes[qi]);
          continue;
        }
        MPI_Request r{};
        if (int const rc = MPI_Irecv(recvs[qi], static_cast<int>(recv_bytes[qi]), MPI_BYTE, q, mtag, s.comm, &r);
            rc != MPI_SUCCESS)
          return mpi_failure(rc, "MPI_Irecv");
        reqs.push_back(r);
        peer_of.push_back(q);
        // MPI_Isend takes a non-const buffer in MPI-2 headers; it is only read.
        if (int const rc = MPI_Isend(const_cast<std::byte*>(sends[qi]), static_cast<int>(send_bytes[qi]),
                                     MPI_BYTE, q, mtag, s.comm, &r);
            rc != MPI_SUCCESS)
          return mpi_failure(rc, "MPI_Isend");
        reqs.push_back(r);
        peer_of.push_back(-1 - q);
      }
    }
    std::vector<MPI_Status> sts(reqs.size());
    for (;;) {
      std::unique_lock lock(s.m);
      int flag = 1;
      int const rc = reqs.empty() ? MPI_SUCCESS
                                  : MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &flag, sts.data());
      if (rc != MPI_SUCCESS) {
        int cls = 0;
        if (MPI_Error_class(rc, &cls) != MPI_SUCCESS || cls != MPI_ERR_IN_STATUS)
          return mpi_failure(rc, "MPI_Testall");
        // Some requests failed: a truncated receive (the peer sent more bytes than this rank
        // expects) is a shape mismatch; others are MPI errors. The statuses say which.
        status const st = failed_requests(sts, peer_of, recv_bytes, tag, what);
        drain(reqs, peer_of);
        return st;
      }
      if (flag) {
        for (std::size_t k = 0; k < reqs.size(); ++k) {
          if (peer_of[k] < 0) continue;
          int got = 0;
          MPI_Get_count(&sts[k], MPI_BYTE, &got);
          auto const want = recv_bytes[static_cast<std::size_t>(peer_of[k])];
          if (static_cast<std::size_t>(got) != want)
            return make_error(errc::shape_mismatch, "mpi_communicator::", what, " (rank ", me,
                              ", tag ", tag, "): rank ", peer_of[k], " sent ", got,
                              " bytes, expected ", want);
        }
        return {};
      }
      int found = 0;
      MPI_Status ast{};
      if (int const prc = MPI_Iprobe(MPI_ANY_SOURCE, s.tag_ub, s.comm, &found, &ast); prc != MPI_SUCCESS)
        return mpi_failure(prc, "MPI_Iprobe");
      if (found) {
        int n = 0;
        MPI_Get_count(&ast, MPI_BYTE, &n);
        std::string reason(static_cast<std::size_t>(n), '\0');
        MPI_Recv(reason.data(), n, MPI_BYTE, ast.MPI_SOURCE, s.tag_ub, s.comm, MPI_STATUS_IGNORE);
        if (s.aborted.empty()) s.aborted = reason;
      }
      bool const late = std::chrono::steady_clock::now() > deadline;
      if (!s.aborted.empty() || late) {
        std::string const missing = drain(reqs, peer_of);
        if (!s.aborted.empty())
          return make_error(errc::comm_error, "mpi_communicator::", what, " (rank ", me, ", tag ",
                            tag, "): ", s.aborted);
        s.aborted = detail::concat("rank ", me, " timed out in ", what, " (tag ", tag, ")");
        return make_error(errc::timeout, "mpi_communicator::", what, " (rank ", me, ", tag ", tag,
                          "): timed out after ", s.timeout.count(), " ms waiting for ranks ", missing);
      }
      lock.unlock();
      // Spin (yielding) for the first 2 ms, then poll every 20 us: fast for small messages,
      // gentle on oversubscribed cores for long waits.
      if (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(2))
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  // The error for an MPI_Testall that returned MPI_ERR_IN_STATUS, from the statuses of the
  // requests (`peer_of` as in `exchange`): `errc::shape_mismatch` for the first truncated receive
  // (MPI_ERR_TRUNCATE: the peer sent more than `recv_bytes` of it) or receive of a different
  // count, else `errc::comm_error` for the first failed request.
  [[nodiscard]] status failed_requests(std::vector<MPI_Status> const& sts, std::vector<int> const& peer_of,
                                       std::vector<std::size_t> const& recv_bytes, std::uint64_t tag,
                                       char const* what) const {
    int const me = rank();
    for (std::size_t k = 0; k < sts.size(); ++k) {
      if (peer_of[k] < 0) continue;
      int cls = MPI_ERR_OTHER;
      if (sts[k].MPI_ERROR == MPI_SUCCESS)
        cls = MPI_SUCCESS;
      else
        MPI_Error_class(sts[k].MPI_ERROR, &cls);
      auto const want = recv_bytes[static_cast<std::size_t>(peer_of[k])];
      if (cls == MPI_ERR_TRUNCATE) {
        // Some MPIs (Open MPI) report the size sent in the count of a truncated receive.
        int got = 0;
        bool const known = MPI_Get_count(&sts[k], MPI_BYTE, &got) == MPI_SUCCESS && got != MPI_UNDEFINED &&
                           static_cast<std::size_t>(got) > want;
        return make_error(errc::shape_mismatch, "mpi_communicator::", what, " (rank ", me, ", tag ", tag,
                          "): rank ", peer_of[k], " sent more than the expected ", want, " bytes (",
                          known ? detail::concat(got, " bytes, ") : std::string(), "receive truncated)");
      }
      if (cls == MPI_SUCCESS) {
        int got = 0;
        MPI_Get_count(&sts[k], MPI_BYTE, &got);
        if (static_cast<std::size_t>(got) != want)
          return make_error(errc::shape_mismatch, "mpi_communicator::", what, " (rank ", me, ", tag ",
                            tag, "): rank ", peer_of[k], " sent ", got, " bytes, expected ", want);
      }
    }
    for (std::size_t k = 0; k < sts.size(); ++k)
      if (sts[k].MPI_ERROR != MPI_SUCCESS && sts[k].MPI_ERROR != MPI_ERR_PENDING) {
        char text[MPI_MAX_ERROR_STRING] = {};
        int len = 0;
        if (MPI_Error_string(sts[k].MPI_ERROR, text, &len) != MPI_SUCCESS) len = 0;
        return make_error(errc::comm_error, "mpi_communicator::", what, " (rank ", me, ", tag ", tag,
                          "): ", peer_of[k] >= 0 ? "receive from rank " : "send to rank ",
                          peer_of[k] >= 0 ? peer_of[k] : -1 - peer_of[k], " failed with MPI error ",
                          sts[k].MPI_ERROR, " (", len > 0 ? text : "no description", ")");
      }
    return make_error(errc::comm_error, "mpi_communicator::", what, " (rank ", me, ", tag ", tag,
                      "): MPI_Testall failed with MPI_ERR_IN_STATUS but no status names an error");
  }

  // Ends the requests of a failed exchange (`peer_of` as in `exchange`): receives not yet
  // complete are cancelled (nothing lands in the caller's buffer later) and waited for; every
  // request left, including sends still in flight and ones that completed with an error, is
  // freed. Returns the peers whose receives had not completed, comma-separated.
  static std::string drain(std::vector<MPI_Request>& reqs, std::vector<int> const& peer_of) {
    std::string missing;
    for (std::size_t k = 0; k < reqs.size(); ++k) {
      if (peer_of[k] < 0 || reqs[k] == MPI_REQUEST_NULL) continue;
      int done = 0;
      // Completed ones become MPI_REQUEST_NULL; one that completed with an error may stay (Open
      // MPI keeps it) and is freed below.
      if (MPI_Test(&reqs[k], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) done = 1;
      if (done) continue;
      missing += detail::concat(missing.empty() ? "" : ", ", peer_of[k]);
      MPI_Cancel(&reqs[k]); // receives into the caller's buffer must not land later
      MPI_Wait(&reqs[k], MPI_STATUS_IGNORE);
    }
    for (auto& r : reqs)
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    return missing;
  }

  std::unique_ptr<state> s_;
};

static_assert(communicator<mpi_communicator>);

FPDT_NAMESPACE_END
