//! \file
//! \brief `nccl_communicator`: the NCCL model of the communicator fpdt's distributed attention
//! uses (all-to-all with equal and unequal counts, all-reduce sum, all-gather, barrier).
//!
//! The Ulysses all-to-all (FPDT paper, arXiv 2408.16978, section 3; DeepSpeed-Ulysses) reshards
//! each chunk from sequence-sharded `[C/P, H, D]` to head-sharded `[C, H/P, D]` and back
//! (docs/design.md 2.4, 3.5); all-reduce sums replicated key/value gradients and loss counts,
//! all-gather and barrier serve set-up and checks. docs/design.md 4.8: fpdt never creates the
//! NCCL world; the caller passes its own `ncclComm_t` and the stream of the comm lane.
//!
//! Models `stream_communicator` (comm/ulysses.hpp), which `sequence_parallel_attention` needs on
//! `cuda_backend`; the host's `communicator` concept (tagged, blocking) is a different one. Every
//! operation takes untyped device pointers, counts in elements of a run-time `fpdt::dtype`, and
//! the lane to run on (here a `cudaStream_t`); it enqueues asynchronously and returns a `status`
//! that reports argument errors (before anything is enqueued) and enqueue errors. Completion is
//! stream-ordered: record an event on the stream after the call and wait on it from other
//! lanes. Operations are matched across ranks by their order on each rank.
//!
//! Needs NCCL and the CUDA runtime (link `fpdt::nccl`); compiles with a plain C++ compiler.
//!
//! Several ranks in one process (one thread per GPU): `cuda_backend` allocates from the device's
//! stream-ordered memory pool (`cudaMallocAsync`), whose memory peer access does not open to the
//! other GPUs, while NCCL's P2P transport reads and writes the peers' buffers directly between GPUs
//! of one process. Set `NCCL_P2P_DIRECT_DISABLE=1` before creating the communicators (NCCL then
//! copies through its own buffers), or grant the peers access to the pool with
//! `cudaMemPoolSetAccess`. One process per GPU needs neither.
#pragma once

#include "../../backend/cuda/cuda_check.hpp"
#include "../../config.hpp"
#include "../../core/dtype.hpp"
#include "../../core/status.hpp"
#include "nccl_check.hpp"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string_view>
#include <thread>
#include <utility>

#ifndef FPDT_NCCL_HAS_ALLTOALL
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 22800
//! 1 when `nccl_communicator::all_to_all` calls `ncclAlltoAll` (NCCL 2.28 and later), 0 when it
//! posts grouped `ncclSend`/`ncclRecv` pairs. Define it to 0 before the first include to force the
//! grouped path.
#define FPDT_NCCL_HAS_ALLTOALL 1
#else
//! 1 when `nccl_communicator::all_to_all` calls `ncclAlltoAll` (NCCL 2.28 and later), 0 when it
//! posts grouped `ncclSend`/`ncclRecv` pairs. Define it to 0 before the first include to force the
//! grouped path.
#define FPDT_NCCL_HAS_ALLTOALL 0
#endif
#endif

FPDT_NAMESPACE_BEGIN

//! The NCCL element type of `t`: f32 -> `ncclFloat32`, f16 -> `ncclFloat16`, bf16 ->
//! `ncclBfloat16`, f64 -> `ncclFloat64`.
//!
//! Errors: `errc::not_supported` for bf16 when NCCL is older than 2.10 (no `ncclBfloat16`);
//! `errc::invalid_argument` naming the value when `t` is outside the enum.
[[nodiscard]] inline result<ncclDataType_t> to_nccl(dtype t) {
  switch (t) {
  case dtype::f32: return ncclFloat32;
  case dtype::f16: return ncclFloat16;
  case dtype::bf16:
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 21000
    return ncclBfloat16;
#else
    return make_error(errc::not_supported, "dtype bf16 needs NCCL 2.10 or later for ncclBfloat16");
#endif
  case dtype::f64: return ncclFloat64;
  }
  return make_error(errc::invalid_argument, "dtype value ", static_cast<int>(t),
                    " is not one of f32, f16, bf16, f64");
}

namespace detail {
// a * b, or false when it overflows std::size_t.
[[nodiscard]] constexpr bool checked_mul(std::size_t a, std::size_t b, std::size_t& out) noexcept {
  if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) return false;
  out = a * b;
  return true;
}
// a + b, or false when it overflows std::size_t.
[[nodiscard]] constexpr bool checked_add(std::size_t a, std::size_t b, std::size_t& out) noexcept {
  if (b > std::numeric_limits<std::size_t>::max() - a) return false;
  out = a + b;
  return true;
}
// Whether the byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte.
[[nodiscard]] inline bool ranges_overlap(void const* a, std::size_t a_bytes, void const* b,
                                         std::size_t b_bytes) noexcept {
  if (a_bytes == 0 || b_bytes == 0) return false;
  auto const x = reinterpret_cast<std::uintptr_t>(a);
  auto const y = reinterpret_cast<std::uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}
// `p` advanced by `bytes` bytes.
[[nodiscard]] inline void const* byte_offset(void const* p, std::size_t bytes) noexcept {
  return static_cast<std::byte const*>(p) + bytes;
}
[[nodiscard]] inline void* byte_offset(void* p, std::size_t bytes) noexcept {
  return static_cast<std::byte*>(p) + bytes;
}

// Frees the barrier's scratch word on the device it lives on, restoring the current device.
struct nccl_scratch_free {
  int device = 0;
  void operator()(void* p) const noexcept {
    int current = -1;
    bool const known = cudaGetDevice(&current) == cudaSuccess;
    if (known && current != device) (void)cudaSetDevice(device);
    (void)cudaFree(p);
    if (known && current != device) (void)cudaSetDevice(current);
    (void)cudaGetLastError();
  }
};
} // namespace detail

//! A communicator over the caller's NCCL communicator: one rank of P, one CUDA device.
//!
//! Wraps an `ncclComm_t` that the caller created (`ncclCommInitRank`, `ncclCommInitAll`, ...) and
//! keeps owning: fpdt never creates, destroys or aborts it, and it must outlive every use of this
//! object and the work it enqueued. Each operation validates its arguments on the host (errors
//! name the values; nothing is enqueued then), then enqueues NCCL work on the given stream and
//! returns without waiting for it. Device buffers must live on the comm's device (`device()`),
//! the stream must belong to that device (null is the legacy default stream), and buffers must
//! stay valid and untouched by other lanes until the stream reaches the operation.
//!
//! Collective rules are NCCL's: every rank calls the same operations in the same order, with
//! matching counts and dtype; a mismatch across ranks cannot be seen locally and hangs or fails
//! inside NCCL (check `async_error()` and abort the comm from the caller). An NCCL communicator
//! must not be used from two threads at once. A non-blocking comm (`config.blocking = 0`) works:
//! an `ncclInProgress` return is waited out (until the work is enqueued, not done) before an
//! operation returns.
//!
//! Owns one device word (4 bytes, `cudaMalloc`ed by `create` on the comm's device) that
//! `barrier` reduces in place; that is the only memory it allocates. Move-only.
class nccl_communicator {
public:
  //! True when `all_to_all` uses `ncclAlltoAll` (FPDT_NCCL_HAS_ALLTOALL), false when it posts
  //! grouped `ncclSend`/`ncclRecv` pairs.
  static constexpr bool native_all_to_all = FPDT_NCCL_HAS_ALLTOALL != 0;

  //! A communicator over `comm`: queries its rank (`ncclCommUserRank`), size (`ncclCommCount`)
  //! and device (`ncclCommCuDevice`), makes that device the calling thread's current device (and
  //! leaves it current, as `cuda_backend` does) and allocates the barrier's 4-byte device word.
  //! A non-blocking comm must have finished initialising (`ncclCommGetAsyncError` no longer
  //! reports `ncclInProgress`) before this call.
  //!
  //! Errors: `errc::invalid_argument` when `comm` is null; `errc::comm_error` naming the NCCL call
  //! that failed; `errc::backend_error` or `errc::out_of_memory` naming the CUDA call when setting
  //! the device or allocating the word fails.
  [[nodiscard]] static result<nccl_communicator> create(ncclComm_t comm) {
    if (comm == nullptr)
      return make_error(errc::invalid_argument,
                        "nccl_communicator::create: the ncclComm_t is null");
    nccl_communicator c;
    c.comm_ = comm;
    if (status const s = c.init(); !s.ok()) return s.with_context("nccl_communicator::create");
    return result<nccl_communicator>(std::move(c)); // explicit: nvcc does not move implicitly here
  }

  //! Takes over `other`'s comm handle and scratch word; `other` is left empty (`valid()` false).
  nccl_communicator(nccl_communicator&& other) noexcept
      : comm_(std::exchange(other.comm_, nullptr)), rank_(std::exchange(other.rank_, 0)),
        size_(std::exchange(other.size_, 0)), device_(std::exchange(other.device_, -1)),
        scratch_(std::move(other.scratch_)) {}
  //! Frees this object's scratch word (never the comm), then takes over `other`'s state.
  nccl_communicator& operator=(nccl_communicator&& other) noexcept {
    if (this != &other) {
      comm_ = std::exchange(other.comm_, nullptr);
      rank_ = std::exchange(other.rank_, 0);
      size_ = std::exchange(other.size_, 0);
      device_ = std::exchange(other.device_, -1);
      scratch_ = std::move(other.scratch_);
    }
    return *this;
  }
  nccl_communicator(nccl_communicator const&) = delete;
  nccl_communicator& operator=(nccl_communicator const&) = delete;
  //! Frees the scratch word (`cudaFree`, which waits for the device); the comm stays the caller's.
  ~nccl_communicator() = default;

  //! True unless this object was moved from.
  [[nodiscard]] bool valid() const noexcept { return comm_ != nullptr; }
  //! This process's rank in the comm, in [0, size()).
  [[nodiscard]] int rank() const noexcept { return rank_; }
  //! Number of ranks P in the comm.
  [[nodiscard]] int size() const noexcept { return size_; }
  //! Ordinal of the CUDA device the comm works on (`ncclCommCuDevice`).
  [[nodiscard]] int device() const noexcept { return device_; }
  //! The caller's `ncclComm_t` (not owned).
  [[nodiscard]] ncclComm_t native_handle() const noexcept { return comm_; }

  //! All-to-all with equal counts: the block of `count_per_rank` elements at element offset
  //! `p * count_per_rank` of `send` goes to rank p, and the block rank p sent to this rank lands
  //! at element offset `p * count_per_rank` of `recv`. Both buffers hold `size() *
  //! count_per_rank` elements of `type` on `device()` and must not overlap. The Ulysses
  //! seq-to-head and head-to-seq resharding is this exchange on packed chunks (FPDT section 3).
  //!
  //! Uses `ncclAlltoAll` when `native_all_to_all`, else one `ncclSend`/`ncclRecv` pair per peer in
  //! one `ncclGroupStart`/`ncclGroupEnd`. `count_per_rank == 0` enqueues nothing (every rank must
  //! pass 0 then).
  //!
  //! Errors: `errc::invalid_argument` naming the values for a null buffer, overlapping buffers, a
  //! dtype outside the enum, or a byte size that overflows `std::size_t`; `errc::not_supported`
  //! for a dtype NCCL lacks (see `to_nccl`); `errc::comm_error` naming the NCCL call that failed.
  [[nodiscard]] status all_to_all(void const* send, void* recv, std::size_t count_per_rank,
                                  dtype type, cudaStream_t stream) {
    constexpr std::string_view who = "nccl_communicator::all_to_all";
    FPDT_TRY(check_valid(who));
    result<ncclDataType_t> const nt = to_nccl(type);
    if (!nt.ok()) return nt.error().with_context(who);
    if (count_per_rank == 0) return {};
    std::size_t total = 0;
    std::size_t bytes = 0;
    if (!detail::checked_mul(count_per_rank, static_cast<std::size_t>(size_), total) ||
        !detail::checked_mul(total, size_bytes(type), bytes))
      return make_error(errc::invalid_argument, who, ": ", count_per_rank, " ", to_string(type),
                        " elements per rank times ", size_, " ranks overflows std::size_t");
    if (send == nullptr || recv == nullptr)
      return make_error(errc::invalid_argument, who, " of ", count_per_rank, " ", to_string(type),
                        " elements per rank: ", send == nullptr ? "send" : "recv",
                        " pointer is null");
    if (detail::ranges_overlap(send, bytes, recv, bytes))
      return make_error(errc::invalid_argument, who, " of ", count_per_rank, " ", to_string(type),
                        " elements per rank: send ", send, " and recv ", recv, " overlap (", bytes,
                        " bytes each)");
#if FPDT_NCCL_HAS_ALLTOALL
    return enqueue(ncclAlltoAll(send, recv, count_per_rank, *nt, comm_, stream), "ncclAlltoAll")
        .with_context(who);
#else
    return grouped_exchange(
               send, recv, *nt, size_bytes(type), stream, [&](int) { return count_per_rank; },
               [&](int p) { return static_cast<std::size_t>(p) * count_per_rank; },
               [&](int) { return count_per_rank; },
               [&](int p) { return static_cast<std::size_t>(p) * count_per_rank; })
        .with_context(who);
#endif
  }

  //! All-to-all with unequal counts (MPI_Alltoallv's layout, in elements of `type`): the
  //! `send_counts[p]` elements at element offset `send_displs[p]` of `send` go to rank p, and the
  //! `recv_counts[p]` elements rank p sends to this rank land at element offset `recv_displs[p]`
  //! of `recv`. Each span has `size()` entries. `recv_counts[p]` must equal what rank p passes as
  //! its `send_counts[rank()]` (checked locally only for p == rank()). The send extent (lowest
  //! displacement to highest end, over non-empty blocks) and the receive extent must not overlap.
  //!
  //! Posts one `ncclSend`/`ncclRecv` pair per peer with a non-zero count, in one
  //! `ncclGroupStart`/`ncclGroupEnd`; a zero count posts nothing for that peer (its partner, which
  //! sees the same count, posts nothing either). Used by Ulysses with GQA when head counts do not
  //! split evenly into equal blocks (docs/design.md 3.5).
  //!
  //! Errors: `errc::invalid_argument` naming the values when a span does not have `size()`
  //! entries, `send_counts[rank()] != recv_counts[rank()]`, a buffer with a non-zero count is
  //! null, a displacement plus count (or its byte size) overflows `std::size_t`, the extents
  //! overlap, or the dtype is outside the enum; `errc::not_supported` for a dtype NCCL lacks;
  //! `errc::comm_error` naming the NCCL call that failed.
  [[nodiscard]] status all_to_all_v(void const* send, std::span<std::size_t const> send_counts,
                                    std::span<std::size_t const> send_displs, void* recv,
                                    std::span<std::size_t const> recv_counts,
                                    std::span<std::size_t const> recv_displs, dtype type,
                                    cudaStream_t stream) {
    constexpr std::string_view who = "nccl_communicator::all_to_all_v";
    FPDT_TRY(check_valid(who));
    result<ncclDataType_t> const nt = to_nccl(type);
    if (!nt.ok()) return nt.error().with_context(who);
    auto const p_count = static_cast<std::size_t>(size_);
    struct named_span {
      char const* name;
      std::span<std::size_t const> values;
    };
    for (named_span const& s :
         {named_span{"send_counts", send_counts}, named_span{"send_displs", send_displs},
          named_span{"recv_counts", recv_counts}, named_span{"recv_displs", recv_displs}})
      if (s.values.size() != p_count)
        return make_error(errc::invalid_argument, who, ": ", s.name, " has ", s.values.size(),
                          " entries but the communicator has ", size_, " ranks");
    auto const self = static_cast<std::size_t>(rank_);
    if (send_counts[self] != recv_counts[self])
      return make_error(errc::invalid_argument, who, ": send_counts[", rank_,
                        "] = ", send_counts[self], " differs from recv_counts[", rank_,
                        "] = ", recv_counts[self], " (rank ", rank_, " sends to itself)");
    std::size_t const elem = size_bytes(type);
    std::size_t send_lo = 0, send_hi = 0, recv_lo = 0, recv_hi = 0;
    FPDT_TRY(extent(who, "send", send, send_counts, send_displs, type, send_lo, send_hi));
    FPDT_TRY(extent(who, "recv", recv, recv_counts, recv_displs, type, recv_lo, recv_hi));
    if (send_hi == 0 && recv_hi == 0) return {};
    if (detail::ranges_overlap(detail::byte_offset(send, send_lo * elem),
                               (send_hi - send_lo) * elem,
                               detail::byte_offset(static_cast<void const*>(recv), recv_lo * elem),
                               (recv_hi - recv_lo) * elem))
      return make_error(errc::invalid_argument, who, ": send elements [", send_lo, ", ", send_hi,
                        ") of ", send, " and recv elements [", recv_lo, ", ", recv_hi, ") of ",
                        recv, " overlap (", to_string(type), ")");
    return grouped_exchange(
               send, recv, *nt, elem, stream,
               [&](int p) { return send_counts[static_cast<std::size_t>(p)]; },
               [&](int p) { return send_displs[static_cast<std::size_t>(p)]; },
               [&](int p) { return recv_counts[static_cast<std::size_t>(p)]; },
               [&](int p) { return recv_displs[static_cast<std::size_t>(p)]; })
        .with_context(who);
  }

  //! All-reduce sum (`ncclAllReduce` with `ncclSum`): `recv[i]` becomes the sum over ranks of
  //! their `send[i]`, for `count` elements of `type`. In place when `send == recv`; otherwise the
  //! two buffers must not overlap. Used for the replicated key/value heads' gradients
  //! (docs/design.md 3.5) and the global count of valid tokens (2.5). The summation order is
  //! NCCL's (not deterministic across algorithms for f16/bf16/f32 with P > 2). `count == 0`
  //! enqueues nothing.
  //!
  //! Errors: `errc::invalid_argument` naming the values for a null buffer, partly overlapping
  //! buffers, a dtype outside the enum or a byte size that overflows; `errc::not_supported` for
  //! a dtype NCCL lacks; `errc::comm_error` naming the NCCL call that failed.
  [[nodiscard]] status all_reduce_sum(void const* send, void* recv, std::size_t count, dtype type,
                                      cudaStream_t stream) {
    constexpr std::string_view who = "nccl_communicator::all_reduce_sum";
    FPDT_TRY(check_valid(who));
    result<ncclDataType_t> const nt = to_nccl(type);
    if (!nt.ok()) return nt.error().with_context(who);
    if (count == 0) return {};
    std::size_t bytes = 0;
    if (!detail::checked_mul(count, size_bytes(type), bytes))
      return make_error(errc::invalid_argument, who, ": ", count, " ", to_string(type),
                        " elements overflow std::size_t bytes");
    if (send == nullptr || recv == nullptr)
      return make_error(errc::invalid_argument, who, " of ", count, " ", to_string(type),
                        " elements: ", send == nullptr ? "send" : "recv", " pointer is null");
    if (send != recv && detail::ranges_overlap(send, bytes, recv, bytes))
      return make_error(errc::invalid_argument, who, " of ", count, " ", to_string(type),
                        " elements: send ", send, " and recv ", recv,
                        " overlap without being equal (in place needs send == recv)");
    return enqueue(ncclAllReduce(send, recv, count, *nt, ncclSum, comm_, stream), "ncclAllReduce")
        .with_context(who);
  }

  //! All-gather (`ncclAllGather`): rank p's `count` elements of `send` land at element offset
  //! `p * count` of `recv`, which holds `size() * count` elements of `type`. In place when `send
  //! == recv + rank() * count` elements; otherwise the buffers must not overlap. `count == 0`
  //! enqueues nothing.
  //!
  //! Errors: `errc::invalid_argument` naming the values for a null buffer, overlapping buffers
  //! (other than the in-place layout), a dtype outside the enum or a byte size that overflows;
  //! `errc::not_supported` for a dtype NCCL lacks; `errc::comm_error` naming the NCCL call that
  //! failed.
  [[nodiscard]] status all_gather(void const* send, void* recv, std::size_t count, dtype type,
                                  cudaStream_t stream) {
    constexpr std::string_view who = "nccl_communicator::all_gather";
    FPDT_TRY(check_valid(who));
    result<ncclDataType_t> const nt = to_nccl(type);
    if (!nt.ok()) return nt.error().with_context(who);
    if (count == 0) return {};
    std::size_t bytes = 0;
    std::size_t recv_bytes = 0;
    if (!detail::checked_mul(count, size_bytes(type), bytes) ||
        !detail::checked_mul(bytes, static_cast<std::size_t>(size_), recv_bytes))
      return make_error(errc::invalid_argument, who, ": ", count, " ", to_string(type),
                        " elements times ", size_, " ranks overflows std::size_t bytes");
    if (send == nullptr || recv == nullptr)
      return make_error(errc::invalid_argument, who, " of ", count, " ", to_string(type),
                        " elements: ", send == nullptr ? "send" : "recv", " pointer is null");
    void const* const in_place = detail::byte_offset(static_cast<void const*>(recv),
                                                     static_cast<std::size_t>(rank_) * bytes);
    if (send != in_place && detail::ranges_overlap(send, bytes, recv, recv_bytes))
      return make_error(errc::invalid_argument, who, " of ", count, " ", to_string(type),
                        " elements: send ", send, " overlaps recv ", recv, " (", recv_bytes,
                        " bytes) without being its rank-", rank_, " block ", in_place);
    return enqueue(ncclAllGather(send, recv, count, *nt, comm_, stream), "ncclAllGather")
        .with_context(who);
  }

  //! Stream-ordered barrier: a one-element `ncclAllReduce` (int32 sum, in place) on this object's
  //! device word. Work enqueued on `stream` after it starts only once every rank's stream has
  //! reached its barrier; the host does not wait (synchronise the stream, or an event recorded
  //! after it, for that). The word always holds 0, so barriers on several streams may share it.
  //!
  //! Errors: `errc::invalid_argument` on a moved-from object; `errc::comm_error` naming the NCCL
  //! call that failed.
  [[nodiscard]] status barrier(cudaStream_t stream) {
    constexpr std::string_view who = "nccl_communicator::barrier";
    FPDT_TRY(check_valid(who));
    return enqueue(
               ncclAllReduce(scratch_.get(), scratch_.get(), 1, ncclInt32, ncclSum, comm_, stream),
               "ncclAllReduce")
        .with_context(who);
  }

  //! The comm's asynchronous error state (`ncclCommGetAsyncError`): ok while none, else
  //! `errc::comm_error` naming NCCL's error. Polled by a caller that wants to abort a comm whose
  //! peer failed (the abort is the caller's: fpdt does not own the comm).
  //!
  //! Errors: `errc::invalid_argument` on a moved-from object; `errc::comm_error` as above.
  [[nodiscard]] status async_error() const {
    constexpr std::string_view who = "nccl_communicator::async_error";
    FPDT_TRY(check_valid(who));
    ncclResult_t state = ncclSuccess;
    FPDT_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 21400
    if (state == ncclInProgress) return {};
#endif
    return nccl_status(state, "ncclCommGetAsyncError (asynchronous error of the comm)", __FILE__,
                       __LINE__);
  }

private:
  nccl_communicator() = default;

  status init() {
    FPDT_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    FPDT_NCCL_CHECK(ncclCommCount(comm_, &size_));
    FPDT_NCCL_CHECK(ncclCommCuDevice(comm_, &device_));
    FPDT_TRY(detail::set_device(device_));
    void* word = nullptr;
    FPDT_CUDA_CHECK(cudaMalloc(&word, sizeof(std::int32_t)));
    scratch_ = scratch_ptr(word, detail::nccl_scratch_free{device_});
    FPDT_CUDA_CHECK(cudaMemset(word, 0, sizeof(std::int32_t)));
    return {};
  }

  [[nodiscard]] status check_valid(std::string_view who) const {
    if (comm_ == nullptr)
      return make_error(errc::invalid_argument, who, ": the communicator was moved from");
    return {};
  }

  // Waits out a non-blocking comm's ncclInProgress (the enqueue, not the communication), then
  // turns the result into a status naming `call`.
  [[nodiscard]] status enqueue(ncclResult_t r, char const* call) const {
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 21400
    while (r == ncclInProgress) {
      std::this_thread::yield();
      if (ncclResult_t const q = ncclCommGetAsyncError(comm_, &r); q != ncclSuccess) r = q;
    }
#endif
    return nccl_status(r, call, __FILE__, __LINE__);
  }

  // For `name` ("send" or "recv"): checks the per-rank counts and displacements, and sets [lo,
  // hi) to the element range the non-empty blocks cover (0, 0 when all are empty).
  [[nodiscard]] static status extent(std::string_view who, char const* name, void const* buffer,
                                     std::span<std::size_t const> counts,
                                     std::span<std::size_t const> displs, dtype type,
                                     std::size_t& lo, std::size_t& hi) {
    lo = std::numeric_limits<std::size_t>::max();
    hi = 0;
    for (std::size_t p = 0; p < counts.size(); ++p) {
      if (counts[p] == 0) continue;
      std::size_t end = 0;
      std::size_t bytes = 0;
      if (!detail::checked_add(displs[p], counts[p], end) ||
          !detail::checked_mul(end, size_bytes(type), bytes))
        return make_error(errc::invalid_argument, who, ": ", name, "_displs[", p, "] = ", displs[p],
                          " plus ", name, "_counts[", p, "] = ", counts[p], " ", to_string(type),
                          " elements overflows std::size_t bytes");
      if (buffer == nullptr)
        return make_error(errc::invalid_argument, who, ": ", name, " pointer is null but ", name,
                          "_counts[", p, "] = ", counts[p]);
      if (displs[p] < lo) lo = displs[p];
      if (end > hi) hi = end;
    }
    if (hi == 0) lo = 0;
    return {};
  }

  // One ncclSend/ncclRecv pair per peer with a non-zero count, in one group (NCCL progresses
  // them together, so the order is free); step k sends to rank+k and receives from rank-k, the
  // usual ring pairing.
  template <class SendCount, class SendDispl, class RecvCount, class RecvDispl>
  [[nodiscard]] status grouped_exchange(void const* send, void* recv, ncclDataType_t nt,
                                        std::size_t elem, cudaStream_t stream, SendCount send_count,
                                        SendDispl send_displ, RecvCount recv_count,
                                        RecvDispl recv_displ) const {
    FPDT_NCCL_CHECK(ncclGroupStart());
    status posted = [&]() -> status {
      for (int k = 0; k < size_; ++k) {
        int const to = (rank_ + k) % size_;
        int const from = (rank_ - k + size_) % size_;
        if (std::size_t const n = send_count(to); n != 0)
          FPDT_NCCL_CHECK(
              ncclSend(detail::byte_offset(send, send_displ(to) * elem), n, nt, to, comm_, stream));
        if (std::size_t const n = recv_count(from); n != 0)
          FPDT_NCCL_CHECK(ncclRecv(detail::byte_offset(recv, recv_displ(from) * elem), n, nt, from,
                                   comm_, stream));
      }
      return {};
    }();
    // The group is closed even when posting failed, so later NCCL calls are not swallowed by it.
    status const ended = enqueue(ncclGroupEnd(), "ncclGroupEnd()");
    FPDT_TRY(posted);
    return ended;
  }

  using scratch_ptr = std::unique_ptr<void, detail::nccl_scratch_free>;

  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 0;
  int device_ = -1;
  scratch_ptr scratch_;
};

FPDT_NAMESPACE_END
