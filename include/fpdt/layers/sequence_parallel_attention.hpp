//! \file
//! \brief `sequence_parallel_attention`: FPDT attention on P ranks with the Ulysses all-to-all.
//!
//! docs/design.md 2.1-2.4, 3.5, FPDT (Yao et al., arXiv 2408.16978) section 3. Each rank holds S/P tokens
//! in the chunk-interleaved layout (schedule/token_layout.hpp: its local chunk j is piece r of
//! global chunk j) and calls this layer with its communicator. Per chunk, the layer's source
//! adapter asks the caller's source for the local chunk `[C/P, H, D]` and turns it into the whole
//! global chunk for this rank's heads `[C, H/P, D]` with `seq_to_head`; the one-rank
//! `fpdt_attention` then runs over the *global* sequence S with H/P query heads (and H_kv/P, or one
//! replicated, key/value heads), so causal masking by global position and offload work
//! unchanged; the sink adapters turn out, dq, dk, dv back with `head_to_seq` (summing the replicas
//! of replicated key/value heads) before handing the local chunk to the caller. All-to-alls carry
//! tags (pass, tensor, chunk), so the copy lane (dout) and the compute lane (outputs, gradients)
//! may exchange concurrently. Gradients of chunk j go back as soon as they are final (dq_j after
//! outer iteration j in the causal backward, dk_j and dv_j after their inner loop).
//!
//! The comm lane (docs/design.md 2.4): the layer owns one stream of the backend's comm lane, a
//! worker that runs exchange jobs in the order they are queued, which is the schedule's order on
//! every rank, so peers meet in the same order. In the forward, the job for chunk c + 1 (the
//! caller's source, then the q, k, v all-to-alls) is queued when chunk c's q, k, v are handed to
//! the compute lane, so it runs while chunk c is computed; out and lse of chunk c are copied to a
//! job buffer and exchanged (then handed to the caller's sink) while the compute lane goes on to
//! chunk c + 1. In the backward the gradient exchanges and the caller's gradient sink run on the
//! comm lane the same way, and dout is exchanged on the h2d lane at its first fetch. At most
//! `max_in_flight` (2) output or gradient jobs wait at once; the compute lane waits for the
//! oldest beyond that. Consequence for callers: the source, sink and gradient sink are called on
//! the comm lane's thread (one call at a time, in chunk order), concurrently with the kernel.
//!
//! Device backends (`cuda_backend`, whose streams cannot run host tasks) take a
//! `stream_communicator` (`nccl_communicator`): its all-to-alls are enqueued on the comm lane's
//! device stream and matched across ranks by order, not tags. There is no worker thread: while
//! the per-rank layer enqueues its pass, this layer's adapters enqueue each exchange on the comm
//! stream from the caller's thread (the caller's stream-form source or sink on the comm stream, a
//! pack kernel, the all-to-all, an unpack kernel: `attention_step_ops<B>::ulysses_pack` /
//! `ulysses_unpack`, which sum replicated key/value gradients in rank order as the host does), and
//! events order the hand-overs both ways: the comm stream waits for the copy that filled or freed
//! a buffer on a lane, and the lane waits for the exchange that filled its slot. Apart from the
//! first pass's ranks-agree check (one 96-byte all-to-all and a wait, see `create`), nothing
//! blocks the host until the pass ends, so the all-to-all of chunk c + 1 runs beside chunk c's compute,
//! and every rank issues its collectives in the schedule's order (dout's too, which on the host
//! run on the h2d lane). The caller's callbacks need the stream form (`fpdt::cuda::stream&`) and
//! are called on the caller's thread, in chunk order. The backward's dout exchange runs one fetch
//! ahead (into its own buffer), so it does not queue behind gradient exchanges that wait for the
//! compute lane. After the first error of a pass nothing more is enqueued (so a rank never joins a
//! collective out of order) and that error is returned once this rank's enqueued exchanges are
//! done. A communicator with an `abort(reason)` member is aborted by the layer, as on the host.
//! NCCL's cannot be (the caller owns the `ncclComm_t`), and aborting only the failing rank's
//! communicator does not release its peers' pending exchanges: each rank needs a watchdog that
//! aborts its own communicator (`ncclCommAbort`) when a peer failed or an exchange exceeds a
//! timeout (`nccl_communicator::async_error()` reports NCCL's asynchronous errors). Without one,
//! the peers of a failed rank wait forever, as in any NCCL program.
#pragma once

#include "../attention/host/fwd.hpp" // the default Kernel; host_defaults.hpp defines it
#include "../backend/host/fwd.hpp" // the default B; host_defaults.hpp defines it
#include "../comm/communicator.hpp"
#include "../comm/ulysses.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../pipeline/trace.hpp"
#include "fpdt_attention.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <future>
#include <iomanip>
#include <memory>
#include <optional>
#include <sstream>
#include <string_view>
#include <vector>

FPDT_NAMESPACE_BEGIN

namespace detail::sp {
// Tags: salt (6 bits) | pass (1) | tensor (3) | chunk (16): unique per layer (salt), pass, tensor
// and chunk, and at most 26 bits. MPI guarantees only MPI_TAG_UB >= 32767 (OpenMPI's ob1 gives
// 2^31 - 1, UCX 2^23 - 1): create() checks the largest tag against the communicator's max_tag().
inline constexpr std::uint64_t max_salt = 63;
inline constexpr index_t max_chunks = index_t{1} << 16;
[[nodiscard]] constexpr std::uint64_t tag(std::uint64_t salt, int pass, int tensor, index_t chunk) noexcept {
  return (((salt << 1 | static_cast<std::uint64_t>(pass)) << 3 | static_cast<std::uint64_t>(tensor)) << 16) |
         static_cast<std::uint64_t>(chunk);
}
// An exchange buffer of n elements from the device arena, so the layer's peak device bytes
// count it.
template <class U> class buffer {
public:
  [[nodiscard]] status reset(device_arena& arena, std::size_t n, std::string_view what) {
    mem_ = {};
    n_ = 0;
    auto r = arena.allocate(n * sizeof(U), what);
    if (!r) return r.error();
    mem_ = std::move(*r);
    n_ = n;
    return {};
  }
  [[nodiscard]] U* data() const noexcept { return mem_.template as<U>(); }
  [[nodiscard]] std::size_t size() const noexcept { return n_; }
  U& operator[](std::size_t i) const noexcept { return data()[i]; }

private:
  arena_allocation mem_;
  std::size_t n_ = 0;
};
template <class V>
auto view3(V& v, index_t a, index_t b, index_t c) {
  return contiguous_view(v.data(), std::array<index_t, 3>{a, b, c}).value();
}
} // namespace detail::sp

//! FPDT attention on P ranks (see the file comment).
//!
//! \tparam T      model dtype (float, bfloat16, half)
//! \tparam Comm   a `communicator` (`local_communicator`, `mpi_communicator`) on a backend whose
//!                streams run host tasks; a `stream_communicator` (`nccl_communicator`) on a device
//!                backend
//! \tparam B      backend of the per-rank layer (`host_backend`; `cuda_backend` with
//!                `<fpdt/fpdt.cuh>` included)
//! \tparam Kernel chunk kernel
//!
//! Shapes per rank: local q `[S/P, H, D]`, k and v `[S/P, H_kv, D]`, out `[S/P, H, D]`; gradients
//! fp32 dq `[S/P, H, D]`, dk and dv `[S/P, H_kv, D]`. Chunk sources and sinks see local chunks of
//! C/P tokens and local token indices (`first_token` = c C/P).
template <class T, class Comm, class B = host_backend, class Kernel = host_chunk_kernel>
class sequence_parallel_attention {
  // Host path: the comm lane's jobs are host tasks on the backend's comm stream and exchange with
  // a tagged, blocking `communicator`. Device path: the exchanges are enqueued on the backend's
  // comm stream from the caller's thread, ordered by events (see the file comment).
  static constexpr bool host_path = runs_host_tasks_in_order<B>;
  using stream_t = typename B::stream_type;
  // The host path calls the callbacks' plain forms in its comm-lane jobs; the device path their
  // stream forms (with the comm stream) from the caller's thread.
  static constexpr auto forms = host_path ? detail::layer::callback_forms::plain : detail::layer::callback_forms::stream;
  static_assert(!host_path || communicator<Comm>,
                "sequence_parallel_attention on a backend whose streams run host tasks needs a "
                "`communicator` (local_communicator, mpi_communicator)");
  static_assert(host_path || stream_communicator<Comm, stream_t>,
                "sequence_parallel_attention on a device backend needs a `stream_communicator` "
                "whose all_to_all(send, recv, count, dtype, stream.native_handle()) is stream-ordered "
                "(nccl_communicator on cuda_backend)");

public:
  //! Checks the problem once (`attention_problem::create` with P = the communicator's size: every
  //! shape rule, naming the values) and builds the per-rank layer from its `per_rank()` problem.
  //! `salt` (0..63) distinguishes the tags of layers that share a communicator (use the layer
  //! index; layers run one at a time may share one). The first pass checks, with one gather
  //! (host path: the communicator's all_gather; device path: a stream-ordered all-to-all of 96
  //! bytes per rank through pinned host memory, and one wait for the comm stream), that every rank built the layer with the
  //! same S, H, H_kv, D, C, mask, dtype and softmax scale (`errc::invalid_argument` naming both
  //! ranks' values, on every rank, at once, instead of a hang, a size mismatch mid-pass or
  //! silently wrong outputs). On the device path that check takes one pinned page (4 KiB) from
  //! the backend's pool for the duration of the check, beside `host_bytes_reserved()`.
  //! Errors: those of `attention_problem::create` (shapes, naming the numbers), a salt over 63, or
  //! more chunks than the tags can name.
  [[nodiscard]] static result<sequence_parallel_attention> create(B& be, Comm& comm,
                                                                  attention_shape global,
                                                                  fpdt_attention_options options,
                                                                  std::uint64_t salt = 0,
                                                                  Kernel kernel = {}) {
    auto problem = attention_problem::create({global.sequence, comm.size(), options.chunk, global.heads,
                                              global.kv_heads, global.head_dim, dtype_of<T>, options.mask,
                                              options.offload, options.ring_slots},
                                             "sequence_parallel_attention");
    if (!problem) return problem.error();
    index_t const c = problem->chunk();
    if (salt > detail::sp::max_salt)
      return make_error(errc::invalid_argument, "sequence_parallel_attention: salt ", salt,
                        " must be <= ", detail::sp::max_salt, " (it forms part of the all-to-all tags)");
    if (global.sequence / c > detail::sp::max_chunks)
      return make_error(errc::invalid_argument, "sequence_parallel_attention: u = S / C = ",
                        global.sequence / c, " chunks; at most ", detail::sp::max_chunks,
                        " (the chunk index forms part of the all-to-all tags): use a larger C");
    if constexpr (requires { comm.max_tag(); }) {
      std::uint64_t const top = detail::sp::tag(salt, 1, 7, global.sequence / c - 1);
      if (top > static_cast<std::uint64_t>(comm.max_tag()))
        return make_error(errc::invalid_argument, "sequence_parallel_attention: salt ", salt,
                          " and u = ", global.sequence / c, " chunks need tags up to ", top,
                          ", over the communicator's largest tag ", comm.max_tag(),
                          " (MPI_TAG_UB); use a smaller salt or fewer chunks");
    }
    options.chunk = c;
    attention_problem const local = problem->per_rank();
    attention_shape per_rank{local.sequence(), local.local_heads(), local.local_kv_heads(), local.head_dim()};
    auto inner = fpdt_attention<T, B, Kernel>::create(be, per_rank, options, std::move(kernel));
    if (!inner) return inner.error();
    auto cl = std::make_unique<comm_lane>(be);
    if constexpr (!host_path) {
      for (auto* e : {&cl->ev_src, &cl->ev_pq, &cl->ev_dout_copied, &cl->ev_dout_ready, &cl->ev_in[0],
                      &cl->ev_in[1], &cl->ev_free[0], &cl->ev_free[1]}) {
        auto ev = be.create_event();
        if (!ev) return ev.error();
        e->emplace(std::move(*ev));
      }
    }
    return result<sequence_parallel_attention>(
        sequence_parallel_attention(comm, *problem, global, salt, std::move(*inner), std::move(cl)));
  }

  //! Any error of a pass on this rank (shapes, source, sink, kernel, memory) aborts the
  //! communicator, so the other ranks fail promptly instead of waiting for the timeout.
  //!
  //! Forward: local q, k, v chunks from `source` (a `chunk_source` over local chunks), local out
  //! chunks to `sink` (a `chunk_sink`; its lse view is `[H, C/P]`). Errors: those of the per-rank
  //! layer and of the communicator (a peer's failure or a timeout, within the world's timeout).
  //! On a device backend the source and sink must have the stream form (a last
  //! `B::stream_type&` parameter, the comm stream: enqueue on it); they are called on the
  //! caller's thread while the pass is enqueued.
  template <class Source, class Sink>
  [[nodiscard]] status forward(Source const& source, Sink& sink) {
    if constexpr (!detail::layer::check_forward_callbacks<Source, Sink, T, stream_t, forms>())
      return make_error(errc::internal, "rejected at compile time");
    else
      return run_pass(&sequence_parallel_attention::allocate_forward, [&] {
      source_adapter<Source> src{this, &source};
      sink_adapter<Sink> snk{this, &sink};
      return ctx_ ? inner_.forward(*ctx_, src, snk) : inner_.forward(src, snk);
    });
  }

  //! The forms of `forward` and `backward` with a first `attention_context&` parameter keep what
  //! the backward needs in the caller's context instead of the per-rank layer, as
  //! `fpdt_attention`'s do: several forwards may be in flight, and each backward consumes its
  //! context (a used, empty or foreign context is `errc::invalid_argument` and, like any error of
  //! a pass, aborts the communicator).
  template <class Source, class Sink>
  [[nodiscard]] status forward(attention_context& ctx, Source const& source, Sink& sink) {
    ctx.clear(); // a failure before the per-rank pass leaves it empty too
    return in_context(ctx, [&] { return forward(source, sink); });
  }
  //! Forward from local tensors (see the tensor form below), the state left in `ctx`.
  [[nodiscard]] status forward(attention_context& ctx, tensor_view<T const, 3> const& q,
                               tensor_view<T const, 3> const& k, tensor_view<T const, 3> const& v,
                               tensor_view<T, 3> const& out) {
    ctx.clear();
    return in_context(ctx, [&] { return forward(q, k, v, out); });
  }
  //! Backward of the forward held by `ctx` (consumed, whatever the outcome, unless refused as
  //! empty, used or another layer's), from a dout source into a gradient sink.
  template <class Dout, class Sink>
  [[nodiscard]] status backward(attention_context& ctx, Dout const& dout, Sink& sink) {
    bool const mine = inner_.owns(ctx);
    return consumed(ctx, mine, in_context(ctx, [&] { return backward(dout, sink); }));
  }
  //! Backward of the forward held by `ctx` (consumed), from and into local tensors.
  [[nodiscard]] status backward(attention_context& ctx, tensor_view<T const, 3> const& dout,
                                tensor_view<float, 3> const& dq, tensor_view<float, 3> const& dk,
                                tensor_view<float, 3> const& dv) {
    bool const mine = inner_.owns(ctx);
    return consumed(ctx, mine, in_context(ctx, [&] { return backward(dout, dq, dk, dv); }));
  }

  //! Forward from local tensors q `[S/P, H, D]`, k, v `[S/P, H_kv, D]` into out `[S/P, H, D]`,
  //! which must not share memory with q, k or v (`errc::invalid_argument`, naming the pair).
  [[nodiscard]] status forward(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                               tensor_view<T const, 3> const& v, tensor_view<T, 3> const& out) {
    // A shape error on one rank must not leave the others waiting for its exchanges.
    FPDT_TRY(abort_on_error(check_local("q", q.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(check_local("k", k.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(check_local("v", v.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(check_local("out", out.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(detail::check_no_alias(
        "sequence_parallel_attention forward", {detail::range_of("out", out)},
        {detail::range_of("q", q), detail::range_of("k", k), detail::range_of("v", v)})));
    if constexpr (host_path) {
      tensor_source<T> src{q, k, v};
      tensor_sink<T> snk{out, {}};
      return forward(src, snk);
    } else {
      detail::layer::step_tensor_source<T, B> src{lane_->be, q, k, v};
      detail::layer::step_tensor_sink<T, B> snk{lane_->be, out, {}};
      return forward(src, snk);
    }
  }

  //! Backward: local dout chunks from `dout` (a `dout_source` over local chunks), local fp32
  //! gradients to `sink` (a `gradient_sink`). Errors: as `forward`.
  //! On a device backend both need the stream form, as in `forward`.
  template <class Dout, class Sink>
  [[nodiscard]] status backward(Dout const& dout, Sink& sink) {
    if constexpr (!detail::layer::check_backward_callbacks<Dout, Sink, T, stream_t, forms>())
      return make_error(errc::internal, "rejected at compile time");
    else
      return run_pass(&sequence_parallel_attention::allocate_backward, [&] {
      dout_adapter<Dout> src{this, &dout};
      grad_adapter<Sink> snk{this, &sink};
      return ctx_ ? inner_.backward(*ctx_, src, snk) : inner_.backward(src, snk);
    });
  }

  //! Backward from a local dout `[S/P, H, D]` into local fp32 dq `[S/P, H, D]`, dk, dv
  //! `[S/P, H_kv, D]` (overwritten; none may share memory with dout or another:
  //! `errc::invalid_argument`, naming the pair).
  [[nodiscard]] status backward(tensor_view<T const, 3> const& dout, tensor_view<float, 3> const& dq,
                                tensor_view<float, 3> const& dk, tensor_view<float, 3> const& dv) {
    FPDT_TRY(abort_on_error(check_local("dout", dout.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(check_local("dq", dq.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(check_local("dk", dk.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(check_local("dv", dv.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(detail::check_no_alias(
        "sequence_parallel_attention backward",
        {detail::range_of("dq", dq), detail::range_of("dk", dk), detail::range_of("dv", dv)},
        {detail::range_of("dout", dout)})));
    if constexpr (host_path) {
      tensor_dout_source<T> src{dout};
      tensor_gradient_sink snk{dq, dk, dv};
      return backward(src, snk);
    } else {
      detail::layer::step_tensor_dout_source<T, B> src{lane_->be, dout};
      detail::layer::step_tensor_gradient_sink<B> snk{lane_->be, dq, dk, dv};
      return backward(src, snk);
    }
  }

  //! Runs this layer's passes on `lanes`, the caller's streams (see `fpdt_attention::run_on`): the
  //! per-rank layer's steps on its compute, h2d and d2h lanes and this layer's exchanges on its comm
  //! lane, so layers sharing one `executor<B>` add no streams (host: worker threads) of their own.
  //! Call it between passes, best before the first; the caller keeps `lanes` alive (and in place)
  //! while the layer uses it.
  void run_on(executor<B>& lanes) noexcept {
    inner_.run_on(lanes);
    lane_->shared = &lanes.stream(lane::comm);
    lane_->own.reset(); // a stream made for earlier passes is released
  }

  //! Replaces the layer's mask on this rank (see `fpdt_attention::set_mask`): a new batch's packed
  //! documents, say. Every rank must set the same mask before the next pass, which checks that
  //! they agree again (one gather, as the first pass does). Run the backwards of earlier forwards
  //! first: a context filled before is refused, and like any error of a pass that aborts the
  //! communicator. Errors: as `fpdt_attention::set_mask`, with the P-rank problem's rules; on
  //! error the layer is unchanged.
  [[nodiscard]] status set_mask(attention_mask const& mask) {
    attention_problem_args a = problem_.args();
    a.mask = mask;
    auto problem = attention_problem::create(a, "sequence_parallel_attention set_mask");
    if (!problem) return problem.error();
    FPDT_TRY(inner_.set_mask(mask));
    problem_ = std::move(*problem);
    note_dout_order();
    agreed_ = false;
    return {};
  }

  //! Attention sinks (see `fpdt_attention::bind_sinks`): `logits [H]` fp32 for all H query
  //! heads, the same values on every rank (a replicated parameter). Each head's sink follows the
  //! head through the Ulysses scatter: rank r applies those of its heads [r H/P, (r + 1) H/P), and
  //! the lse the sink receives includes them. `grad [H]` fp32, when not empty, gets this rank's
  //! share from every backward: the full gradient of its own heads (every token of the sequence is
  //! on this rank for them), 0 for the others (with `accumulate`: added to its heads' entries, the
  //! others left). The sum over the ranks of the grads is the gradient, as for any weight the ranks
  //! share (all-reduce it with the other gradients). Errors: those of `fpdt_attention::bind_sinks`,
  //! with H the global head count.
  [[nodiscard]] status bind_sinks(tensor_view<float const, 1> const& logits, tensor_view<float, 1> const& grad = {},
                                  bool accumulate = false) {
    index_t const h = shape_.heads;
    if (!logits.empty() && (logits.extent(0) != h || (!grad.empty() && grad.extent(0) != h)))
      return make_error(errc::shape_mismatch, "sequence_parallel_attention bind_sinks: logits [", logits.extent(0),
                        "] and grad [", grad.extent(0), "] must be [H] = [", h,
                        "] (grad may be empty), one sink per query head of the whole layer");
    index_t const local = layout_.heads_per_rank(head_kind::query);
    return inner_.bind_sinks(logits, grad, {comm_->rank() * local, accumulate});
  }

  //! The per-rank one-rank layer (its schedules, trace, predicted bytes).
  [[nodiscard]] fpdt_attention<T, B, Kernel> const& local_layer() const noexcept { return inner_; }
  //! The last pass: the per-rank layer's steps plus this layer's comm-lane steps (`produce`:
  //! a chunk's source and q/k/v all-to-alls; `sink`: an output or gradient exchange and the
  //! caller's sink; on a device backend also `fetch`: a dout exchange), on the per-rank layer's
  //! clock: on the host path through `pipeline_trace::origin`; on a device backend the comm
  //! stream waits for the per-rank pass's start event (`trace_start_event()`) before its first
  //! step and is timed from it (untimed (-1) where the backend has no timing events). Valid after
  //! a pass has returned.
  [[nodiscard]] pipeline_trace trace() const {
    pipeline_trace t = inner_.trace();
    // Host path: the lane's steps are timed from the start of this layer's pass, the per-rank
    // layer's from the start of its own (later: its buffers, and on the first pass its lanes, are
    // made in between); move them onto the per-rank layer's clock.
    bool const rebase = host_path && t.origin != std::chrono::steady_clock::time_point{};
    double const shift = rebase ? std::chrono::duration<double, std::micro>(lane_->t0 - t.origin).count() : 0.0;
    for (trace_event e : lane_->events) {
      if (e.begin_us >= 0) {
        e.begin_us += shift;
        e.end_us += shift;
      }
      t.events.push_back(e);
    }
    return t;
  }
  //! The head sharding.
  [[nodiscard]] ulysses_layout const& layout() const noexcept { return layout_; }
  //! Output or gradient exchanges that may be in flight on the comm lane at once (exchange slots).
  static constexpr std::size_t max_in_flight = attention_problem::exchanges_in_flight;

private:
  // The comm lane: a stream of the backend and what is queued on it. Host path: only the lanes'
  // workers queue and wait for jobs while a pass runs; the caller's thread drains them after.
  struct comm_lane {
    explicit comm_lane(B& backend) : be(&backend) {}
    B* be;
    // Host path: runs the jobs. Device path: the stream the exchanges are enqueued on. The
    // caller's comm lane (run_on), or one of the layer's own made at the first pass, at the comm
    // lane's high priority (`default_priority`: the exchanges are on the critical path).
    std::optional<typename B::stream_type> own;
    typename B::stream_type* shared = nullptr;
    [[nodiscard]] typename B::stream_type& st() noexcept { return shared ? *shared : *own; }
    [[nodiscard]] status ensure_stream() {
      if (shared || own) return {};
      auto s = be->create_stream(lane::comm);
      if (!s) return s.error();
      own.emplace(std::move(*s));
      return {};
    }
    // Device path only (see the file comment), all used on the caller's thread at enqueue time.
    // Events ordering the hand-overs: ev_src after the copies out of pq, pk, pv (on the lane that
    // copies); ev_pq after the exchanges into them (comm stream); ev_dout_ready after the exchange
    // of a dout chunk into pdout (comm stream); ev_dout_copied after the copy out of pdout (h2d
    // lane); ev_in[i] after the copy into output slot i; ev_free[i] after slot i's exchange and
    // the caller's sink.
    using event_type = typename B::event_type;
    std::optional<event_type> ev_src, ev_pq, ev_dout_copied, ev_dout_ready;
    std::array<std::optional<event_type>, 2> ev_in, ev_free;
    bool src_recorded = false;             // ev_src recorded in this pass
    std::array<bool, 2> slot_used{};       // ev_free[i] recorded in this pass
    index_t prefetched = -1;               // the chunk whose q, k, v exchange is enqueued
    // The backward's dout exchanges run one fetch ahead, into pdout: the next fetch's index (in
    // dout_order_), the chunk enqueued into pdout.
    std::size_t dout_next = 0;
    index_t dout_prefetched = -1;
    bool dout_copied_recorded = false;
    detail::sp::buffer<T> pdout;
    status failure;                        // the pass's first error: later exchanges are skipped
    detail::sp::buffer<std::byte> send, recv; // the all-to-all's packed blocks
    // Timing (backends that time with events): two events per exchange step, read when the pass
    // is drained, from the per-rank pass's start event (`origin`, waited for before the first).
    event_type const* origin = nullptr;
    std::vector<event_type> t_events;
    std::size_t t_used = 0;
    std::vector<std::pair<trace_event, std::size_t>> timed; // step, index of its begin event
    //! One exchange queued on the lane.
    struct job {
      index_t chunk = -1;        //!< the chunk it exchanges
      int slot = 0;              //!< which exchange slot (output and gradient jobs)
      std::future<status> done;  //!< its status, ready when it has run
    };
    std::optional<job> prefetch;    // the forward's source job for the next chunk
    std::deque<job> outputs;        // output / gradient jobs not yet waited for
    int next_slot = 0;
    // The pass's exchange buffers, allocated when it starts and freed when it ends (so a pass's
    // device peak is fixed: see forward_exchange_bytes / backward_exchange_bytes).
    detail::sp::buffer<T> pq, pk, pv;           // forward: the next chunk's global q, k, v
    std::array<detail::sp::buffer<T>, 2> out;   // forward: out chunks [C, H/P, D] being exchanged
    std::array<detail::sp::buffer<float>, 2> f; // forward: lse [H/P, C]; backward: dq or dk|dv
    detail::sp::buffer<T> tmp;                  // the running job's local chunk (model dtype)
    detail::sp::buffer<float> tmp_f;            // the running job's local chunk (fp32)
    detail::sp::buffer<T> dout_tmp;             // backward, h2d lane: the local dout chunk
    std::chrono::steady_clock::time_point t0;   // start of the pass
    std::vector<trace_event> events;            // written by the lane's worker only
    // Queues `fn()` on the lane as a traced step (`kind`, chunk `i` or `j`); the job's status
    // arrives through its future.
    template <class F>
    [[nodiscard]] status launch(job& j, step_kind kind, index_t i, index_t jj, std::uint64_t bytes, F&& fn) {
      // The event is recorded inside the task, before its future is ready: whoever waits for
      // the job may then read or clear `events`.
      auto task = std::make_shared<std::packaged_task<status()>>(
          [this, fn_ = std::forward<F>(fn), kind, i, jj, bytes]() mutable -> status {
            trace_event e{kind, lane::comm, static_cast<std::int32_t>(i), static_cast<std::int32_t>(jj), bytes, since(), -1};
            status st = fn_();
            e.end_us = since();
            events.push_back(e);
            return st;
          });
      j.done = task->get_future();
      status st = be->launch(this->st(), [task] { (*task)(); });
      if (!st.ok()) j.done = {}; // never runs: nobody may wait for it
      return st;
    }
    [[nodiscard]] double since() const noexcept {
      return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    }
    [[nodiscard]] status begin_pass() {
      t0 = std::chrono::steady_clock::now();
      events.clear();
      next_slot = 0;
      src_recorded = false;
      slot_used = {};
      prefetched = -1;
      dout_next = 0;
      dout_prefetched = -1;
      dout_copied_recorded = false;
      failure = {};
      t_used = 0;
      origin = nullptr;
      timed.clear();
      return {};
    }
    // Waits for every queued job (the first error wins), then frees the pass's buffers.
    [[nodiscard]] status drain() {
      status first;
      auto take = [&](job& j) {
        if (!j.done.valid()) return;
        status st = j.done.get();
        if (first.ok() && !st.ok()) first = st;
      };
      if (prefetch) take(*prefetch);
      prefetch.reset();
      for (auto& j : outputs) take(j);
      outputs.clear();
      if constexpr (!host_path) { // the pass's exchanges, before their buffers go
        status const st = be->synchronize(this->st());
        if (first.ok() && !st.ok()) first = st;
        if constexpr (times_steps_with_events<B>)
          if (st.ok())
            for (auto& [e, b] : timed) {
              if (!origin) { // no per-rank pass started: the steps stay untimed
                events.push_back(e);
                continue;
              }
              auto t0e = elapsed_seconds(*origin, t_events[b]);
              auto t1e = elapsed_seconds(*origin, t_events[b + 1]);
              if (t0e && t1e) {
                e.begin_us = *t0e * 1e6;
                e.end_us = *t1e * 1e6;
              }
              events.push_back(e);
            }
      }
      send = {};
      recv = {};
      pq = {};
      pk = {};
      pv = {};
      out = {};
      f = {};
      tmp = {};
      tmp_f = {};
      dout_tmp = {};
      pdout = {};
      return first;
    }
    // Keeps fewer than max_in_flight output jobs queued (waiting for the oldest), then returns
    // a new job on the free slot.
    [[nodiscard]] result<job*> next_output(index_t chunk) {
      while (outputs.size() >= max_in_flight - 1) {
        status st = outputs.front().done.valid() ? outputs.front().done.get() : status{};
        outputs.pop_front();
        if (!st.ok()) return st;
      }
      job& j = outputs.emplace_back();
      j.chunk = chunk;
      j.slot = next_slot;
      next_slot = (next_slot + 1) % static_cast<int>(max_in_flight);
      return &j;
    }
  };

  // Sizes of the pass buffers, in elements.
  [[nodiscard]] std::size_t q_chunk() const noexcept {
    return static_cast<std::size_t>(layout_.chunk * layout_.heads_per_rank(head_kind::query) * layout_.head_dim);
  }
  [[nodiscard]] std::size_t kv_chunk() const noexcept {
    return static_cast<std::size_t>(layout_.chunk * layout_.heads_per_rank(head_kind::key_value) * layout_.head_dim);
  }
  [[nodiscard]] std::size_t local(index_t heads) const noexcept {
    return static_cast<std::size_t>(piece() * heads * layout_.head_dim);
  }
  [[nodiscard]] std::size_t fwd_tmp() const noexcept {
    return std::max(local(layout_.heads + 2 * layout_.kv_heads), local(layout_.heads));
  }
  [[nodiscard]] std::size_t lse_chunk() const noexcept {
    return static_cast<std::size_t>(layout_.chunk * layout_.heads_per_rank(head_kind::query));
  }
  [[nodiscard]] std::size_t grad_slot() const noexcept { return std::max(q_chunk(), 2 * kv_chunk()); }
  [[nodiscard]] std::size_t bwd_tmp() const noexcept {
    return std::max(local(layout_.heads), 2 * local(layout_.kv_heads));
  }
  // Device path: bytes of each of the send and receive scratch buffers of a pass (the largest
  // exchange: q or out and lse in the forward, dout and fp32 dq in the backward).
  [[nodiscard]] std::size_t fwd_scratch() const noexcept {
    return host_path ? 0 : std::max(q_chunk() * sizeof(T), lse_chunk() * 4);
  }
  [[nodiscard]] std::size_t bwd_scratch() const noexcept {
    return host_path ? 0 : q_chunk() * std::max(sizeof(T), std::size_t{4});
  }
  [[nodiscard]] status allocate_scratch(std::size_t bytes) {
    if (bytes == 0) return {};
    auto& ln = *lane_;
    FPDT_TRY(ln.send.reset(ln.be->device_memory(), bytes, "all-to-all send blocks"));
    return ln.recv.reset(ln.be->device_memory(), bytes, "all-to-all receive blocks");
  }

  [[nodiscard]] status allocate_forward() {
    auto& ln = *lane_;
    device_arena& mem = ln.be->device_memory();
    FPDT_TRY(ln.pq.reset(mem, q_chunk(), "exchanged q chunk"));
    FPDT_TRY(ln.pk.reset(mem, kv_chunk(), "exchanged k chunk"));
    FPDT_TRY(ln.pv.reset(mem, kv_chunk(), "exchanged v chunk"));
    for (std::size_t i = 0; i < max_in_flight; ++i) {
      FPDT_TRY(ln.out[i].reset(mem, q_chunk(), "out chunk to exchange"));
      FPDT_TRY(ln.f[i].reset(mem, lse_chunk(), "lse chunk to exchange"));
    }
    FPDT_TRY(ln.tmp.reset(mem, fwd_tmp(), "local q/k/v or out chunk"));
    FPDT_TRY(ln.tmp_f.reset(mem, static_cast<std::size_t>(piece() * layout_.heads), "local lse chunk"));
    return allocate_scratch(fwd_scratch());
  }
  [[nodiscard]] status allocate_backward() {
    auto& ln = *lane_;
    device_arena& mem = ln.be->device_memory();
    for (std::size_t i = 0; i < max_in_flight; ++i)
      FPDT_TRY(ln.f[i].reset(mem, grad_slot(), "gradient chunk to exchange"));
    FPDT_TRY(ln.tmp_f.reset(mem, bwd_tmp(), "local gradient chunk"));
    FPDT_TRY(ln.dout_tmp.reset(mem, local(layout_.heads), "local dout chunk"));
    if constexpr (!host_path) {
      FPDT_TRY(ln.pdout.reset(mem, q_chunk(), "exchanged dout chunk"));
    }
    return allocate_scratch(bwd_scratch());
  }

public:
  //! Device bytes the forward's exchange buffers take beside the per-rank layer's
  //! (`local_layer().predicted_forward_bytes()`): the next chunk's global q, k, v, two out and
  //! lse chunks in flight, and one local chunk for the running exchange; on a device backend
  //! also the packed send and receive blocks of one all-to-all. Allocated for the pass.
  [[nodiscard]] std::size_t forward_exchange_bytes() const noexcept {
    return problem_.exchange_bytes(pass::forward, !host_path);
  }
  //! Device bytes the backward's exchange buffers take beside the per-rank layer's: two
  //! gradient chunks in flight, one local gradient chunk and one local dout chunk (and on a
  //! device backend the send and receive blocks and the next fetch's exchanged dout chunk).
  [[nodiscard]] std::size_t backward_exchange_bytes() const noexcept {
    return problem_.exchange_bytes(pass::backward, !host_path);
  }
  //! The layer's attention problem (P ranks): shapes, per-rank tensors, bytes.
  [[nodiscard]] attention_problem const& problem() const noexcept { return problem_; }

private:
  sequence_parallel_attention(Comm& comm, attention_problem const& problem, attention_shape global,
                              std::uint64_t salt, fpdt_attention<T, B, Kernel>&& inner,
                              std::unique_ptr<comm_lane> cl)
      : comm_(&comm), problem_(problem), layout_(problem.heads_layout()), shape_(global), salt_(salt),
        inner_(std::move(inner)), lane_(std::move(cl)) {
    note_dout_order();
  }
  // Device path: the chunks of the backward's dout fetches, in schedule order.
  void note_dout_order() {
    dout_order_.clear();
    if constexpr (!host_path)
      for (schedule_step const& st : inner_.backward_plan().steps)
        if (st.kind == step_kind::fetch && st.what == payload::q_side) dout_order_.push_back(st.i);
  }

  // One pass: its buffers (`allocate`), the per-rank pass `run` with this layer's adapters, then
  // `finish`.
  // Runs `f` (a public pass) with the per-rank layer reading and writing `ctx` (ctx_ is reset
  // when f returns or throws).
  template <class F> [[nodiscard]] status in_context(attention_context& ctx, F&& f) {
    ctx_ = &ctx;
    detail::layer::reset_on_exit scope{ctx_};
    return f();
  }
  // A backward that failed before the per-rank layer consumed its context frees it all the same.
  [[nodiscard]] static status consumed(attention_context& ctx, bool mine, status st) {
    if (mine && ctx.ready()) ctx.clear();
    return st;
  }

  template <class Run> [[nodiscard]] status run_pass(status (sequence_parallel_attention::*allocate)(), Run&& run) {
    if (status st = lane_->ensure_stream(); !st.ok()) return abort_on_error(st);
    if (!agreed_) {
      // Not aborted on a mismatch: every rank gathered the same numbers and fails alike (an
      // abort could reach a peer still inside the gather and replace its error).
      FPDT_TRY(check_ranks_agree());
      agreed_ = true;
    }
    if (status st = lane_->begin_pass(); !st.ok()) return st;
    if (status st = (this->*allocate)(); !st.ok()) return finish(st);
    return finish(run());
  }

  // Before the first pass: every rank must have built this layer with the same S, H, H_kv, D, C,
  // mask, dtype and softmax scale. A rank that disagrees on the sizes would exchange other sizes
  // or another number of chunks, found only mid-pass: on the host path as a size mismatch or a
  // peer's timeout after the world's wait, on the device path as an NCCL hang (NCCL has no
  // timeout of its own) or corrupt blocks; one that disagrees on the scale or the mask gives
  // every rank silently wrong outputs (each head's softmax runs on one rank with its options).
  // One gather of those values names the difference at once, on every rank.
  [[nodiscard]] status check_ranks_agree() {
    constexpr std::size_t n = 12;
    // The same mask spelled two ways agrees (a causal right extent of 0 is unbounded, a window
    // of S or more is no window).
    attention_mask const mask = inner_.problem().mask().canonical(shape_.sequence);
    std::uint64_t hash = 1469598103934665603ull; // FNV-1a of the document offsets, 52 bits kept
    for (index_t d = 0; d <= (mask.documents > 0 ? mask.documents : -1); ++d)
      for (int b = 0; b < 8; ++b)
        hash = (hash ^ ((static_cast<std::uint64_t>(mask.document_offsets[d]) >> (8 * b)) & 0xff)) * 1099511628211ull;
    // As doubles: exact for these values (integers far below 2^53, and a float). The scale is
    // the effective one (`resolve_scale`): an explicit scale agrees with the default when it is
    // the same float, 1.0f / std::sqrt(float(D)).
    std::array<double, n> const mine{static_cast<double>(shape_.sequence), static_cast<double>(shape_.heads),
                                     static_cast<double>(shape_.kv_heads), static_cast<double>(shape_.head_dim),
                                     static_cast<double>(inner_.chunk()),
                                     static_cast<double>(static_cast<int>(mask.kind)),
                                     static_cast<double>(mask.window_left),
                                     static_cast<double>(mask.window_right),
                                     static_cast<double>(mask.documents),
                                     static_cast<double>(mask.documents > 0 ? hash & ((1ull << 52) - 1) : 0),
                                     static_cast<double>(static_cast<int>(dtype_of<T>)),
                                     static_cast<double>(inner_.softmax_scale())};
    std::vector<double> all(n * static_cast<std::size_t>(comm_->size()));
    FPDT_TRY(gather_all(mine, all));
    auto describe = [&](std::size_t r) {
      std::array<std::int64_t, n - 1> x{};
      for (std::size_t i = 0; i + 1 < n; ++i) x[i] = static_cast<std::int64_t>(all[r * n + i]);
      std::ostringstream scale; // enough digits to tell two floats apart
      scale << std::setprecision(9) << all[r * n + n - 1];
      return detail::concat("rank ", r, " has S = ", x[0], ", H = ", x[1], ", H_kv = ", x[2], ", D = ", x[3],
                            ", C = ", x[4], ", mask ",
                            to_string(attention_mask{static_cast<mask_kind>(x[5]), x[6], x[7], nullptr, x[8]}),
                            x[8] > 0 ? detail::concat(" (offsets hash ", x[9], ")") : std::string(), ", dtype ",
                            to_string(static_cast<dtype>(x[10])), ", scale ", scale.str());
    };
    for (std::size_t r = 1; r < static_cast<std::size_t>(comm_->size()); ++r)
      if (!std::equal(all.begin(), all.begin() + n, all.begin() + static_cast<std::ptrdiff_t>(r * n)))
        return make_error(errc::invalid_argument, "sequence_parallel_attention: the ranks disagree on the layer: ",
                          describe(0), "; ", describe(r),
                          " (every rank must create it with the same global shape, chunk, mask, dtype and scale)");
    return {};
  }

  // Every rank's `mine` into `all` ([P][n], rank order). Host path: the communicator's
  // all_gather, tagged with tensor 7 of the forward, chunk 0, which no exchange uses. Device
  // path (no all_gather in the stream_communicator concept): `mine` replicated P times in pinned
  // host memory (as the backend concept requires of a copy's host side), copied to a small device
  // buffer, one stream-ordered all-to-all on the comm stream, copied back, then a wait for that
  // stream. The values travel as f32 words (an all-to-all is a plain copy, and f32 is a dtype
  // the layer's exchanges already need). It is the first collective every rank enqueues on this
  // layer, so the ranks' calls match by order as NCCL requires; its sizes do not depend on the
  // values compared, so it completes even when the ranks disagree. A failure of this rank's own
  // (memory, a copy, the enqueue, the wait) aborts the communicator where it can be, so peers
  // waiting in the all-to-all are released; the communicator's own asynchronous error (a
  // comm_error, as every communicator failure) is returned without an abort, as in a pass.
  template <std::size_t n>
  [[nodiscard]] status gather_all(std::array<double, n> const& mine, std::vector<double>& all) {
    if constexpr (host_path) {
      return comm_->all_gather(mine.data(), all.data(), sizeof(mine), tag(0, 7, 0));
    } else {
      auto& ln = *lane_;
      std::size_t const count = all.size(), bytes = count * sizeof(double);
      constexpr char const* what = "sequence_parallel_attention: the ranks-agree check";
      auto host = ln.be->pinned_memory().acquire(2 * bytes);
      if (!host) return abort_on_error(host.error().with_context(what));
      double* const h_send = host->template as<double>();
      double* const h_recv = h_send + count;
      for (std::size_t i = 0; i < count; ++i) h_send[i] = mine[i % n];
      detail::sp::buffer<double> send, recv;
      if (status st = send.reset(ln.be->device_memory(), count, "rank agreement check"); !st.ok())
        return abort_on_error(st.with_context(what));
      if (status st = recv.reset(ln.be->device_memory(), count, "rank agreement check"); !st.ok())
        return abort_on_error(st.with_context(what));
      status st = ln.be->copy_async(send.data(), h_send, bytes, ln.st());
      if (st.ok())
        st = comm_->all_to_all(static_cast<void const*>(send.data()), static_cast<void*>(recv.data()),
                               2 * n, dtype::f32, ln.st().native_handle());
      if (st.ok()) st = ln.be->copy_async(h_recv, recv.data(), bytes, ln.st());
      // The wait keeps the pinned block and the two buffers alive until the stream has run.
      status const waited = ln.be->synchronize(ln.st());
      if (st.ok()) st = waited;
      if constexpr (requires { { comm_->async_error() } -> std::same_as<status>; })
        if (st.ok()) st = comm_->async_error(); // an aborted NCCL comm completes without an error
      if (!st.ok()) return abort_on_error(st.with_context(what));
      std::copy(h_recv, h_recv + count, all.begin());
      return {};
    }
  }

  // After a pass: an error aborts the communicator first (so queued exchanges waiting for peers
  // fail promptly), then every queued job is waited for; the first error is returned.
  [[nodiscard]] status finish(status st) {
    if (!st.ok()) (void)abort_on_error(st);
    status drained = lane_->drain();
    if (st.ok() && !drained.ok()) st = abort_on_error(drained);
    return st;
  }

  [[nodiscard]] status check_local(char const* name, std::array<index_t, 3> const& e, index_t heads) const {
    index_t const rows = shape_.sequence / layout_.ranks;
    if (e[0] != rows || e[1] != heads || e[2] != shape_.head_dim)
      return make_error(errc::shape_mismatch, "sequence_parallel_attention (rank ", comm_->rank(),
                        "): local ", name, " ", detail::shape_string(e), " must be [S/P, ",
                        heads, ", D] = [", rows, ", ", heads, ", ", shape_.head_dim, "]");
    return {};
  }

  // A failed pass on this rank must not leave its peers waiting for exchanges it will never join.
  [[nodiscard]] status abort_on_error(status st) {
    if constexpr (requires { comm_->abort(st.message()); })
      if (!st.ok() && st.code() != errc::comm_error && st.code() != errc::timeout)
        comm_->abort(st.message());
    return st;
  }

  [[nodiscard]] index_t piece() const noexcept { return layout_.piece(); }

  [[nodiscard]] std::uint64_t tag(int pass, int tensor, index_t c) const noexcept {
    return detail::sp::tag(salt_, pass, tensor, c);
  }

  // ----- The exchanges, one body for both paths. Host path: they run in a comm-lane job on its
  // worker thread (dout's on the h2d lane's). Device path: they are enqueued on the comm stream
  // from the caller's thread while the per-rank layer enqueues its pass. -----

  // One Ulysses all-to-all of `src` into `dst` (to the head-sharded side when `to_heads`). Host
  // path: the tagged, blocking seq_to_head / head_to_seq. Device path: pack into the send
  // buffer, the communicator's stream-ordered all-to-all (matched by order: `tag` unused), and
  // unpack, summing replicated key/value heads in rank order as head_to_seq does.
  template <class U>
  [[nodiscard]] status exchange(ulysses_layout const& l, head_kind kind, bool to_heads,
                                tensor_view<U const, 3> const& src, tensor_view<U, 3> const& dst,
                                [[maybe_unused]] std::uint64_t tag) {
    if constexpr (host_path) {
      return to_heads ? seq_to_head<U>(*comm_, l, kind, src, dst, tag)
                      : head_to_seq<U>(*comm_, l, kind, src, dst, tag);
    } else {
      using ops = attention_step_ops<B>;
      auto& ln = *lane_;
      ulysses_blocks const seq = ulysses_blocks::local_side(l, kind), heads = ulysses_blocks::head_side(l, kind);
      ulysses_blocks const& from = to_heads ? seq : heads;
      ulysses_blocks const& to = to_heads ? heads : seq;
      std::size_t const block = static_cast<std::size_t>(from.block_size(l.head_dim));
      if (block * static_cast<std::size_t>(l.ranks) * sizeof(U) > ln.send.size())
        return make_error(errc::internal, "sequence_parallel_attention: an exchange of ",
                          block * static_cast<std::size_t>(l.ranks) * sizeof(U),
                          " bytes exceeds the pass's send buffer of ", ln.send.size(), " bytes");
      U* send = reinterpret_cast<U*>(ln.send.data());
      U* recv = reinterpret_cast<U*>(ln.recv.data());
      FPDT_TRY(ops::ulysses_pack(*ln.be, ln.st(), src, send, from));
      FPDT_TRY(comm_->all_to_all(static_cast<void const*>(send), static_cast<void*>(recv), block,
                                 dtype_of<U>, ln.st().native_handle()));
      return ops::ulysses_unpack(*ln.be, ln.st(), static_cast<U const*>(recv), dst, to);
    }
  }

  // Calls a caller's callback `f(streams...)`: the plain form on the host path, the stream form
  // with the comm stream on the device path; errors and exceptions named (`what`, chunk c).
  template <class F> [[nodiscard]] status call_user(F&& f, char const* what, index_t c) {
    if constexpr (host_path)
      return detail::layer::guarded([&] { return f(); }, what, c);
    else
      return detail::layer::guarded([&] { return f(lane_->st()); }, what, c);
  }

  // Chunk c's q, k, v: the caller's local chunk (in tmp) exchanged into pq, pk, pv.
  template <class Source> [[nodiscard]] status exchange_qkv(Source const* user, index_t c) {
    auto const& l = layout_;
    auto& ln = *lane_;
    index_t const pc = piece(), d = l.head_dim, hq = l.heads_per_rank(head_kind::query),
                  hk = l.heads_per_rank(head_kind::key_value);
    T* base = ln.tmp.data();
    auto qv = contiguous_view(base, std::array<index_t, 3>{pc, l.heads, d}).value();
    auto kv = contiguous_view(base + local(l.heads), std::array<index_t, 3>{pc, l.kv_heads, d}).value();
    auto vv = contiguous_view(base + local(l.heads + l.kv_heads), std::array<index_t, 3>{pc, l.kv_heads, d}).value();
    FPDT_TRY(call_user([&](auto&... s) { return user->produce(c, c * pc, qv, kv, vv, s...); }, "chunk source, chunk ", c));
    FPDT_TRY(exchange<T>(l, head_kind::query, true, qv, detail::sp::view3(ln.pq, l.chunk, hq, d), tag(0, 0, c)));
    FPDT_TRY(exchange<T>(l, head_kind::key_value, true, kv, detail::sp::view3(ln.pk, l.chunk, hk, d), tag(0, 1, c)));
    return exchange<T>(l, head_kind::key_value, true, vv, detail::sp::view3(ln.pv, l.chunk, hk, d), tag(0, 2, c));
  }

  // Out [C, H/P, D] and lse [H/P, C] of chunk c in exchange slot i, exchanged back to the local
  // chunk (in tmp, tmp_f) and handed to the caller's sink.
  template <class Sink> [[nodiscard]] status exchange_out(Sink* user, index_t c, std::size_t i) {
    auto const& l = layout_;
    auto& ln = *lane_;
    index_t const pc = piece(), d = l.head_dim, hr = l.heads_per_rank(head_kind::query);
    auto ov = contiguous_view(ln.tmp.data(), std::array<index_t, 3>{pc, l.heads, d}).value();
    FPDT_TRY(exchange<T>(l, head_kind::query, false, tensor_view<T const, 3>(detail::sp::view3(ln.out[i], l.chunk, hr, d)),
                         ov, tag(0, 3, c)));
    // lse [H/P, C] seen as [C, H/P, 1]; the local lse [H, C/P] as [C/P, H, 1].
    auto lse3 = make_tensor_view<float const>(ln.f[i].data(), std::array<index_t, 3>{l.chunk, hr, 1},
                                              std::array<index_t, 3>{1, l.chunk, 1});
    if (!lse3) return lse3.error();
    auto local3 = make_tensor_view(ln.tmp_f.data(), std::array<index_t, 3>{pc, l.heads, 1}, std::array<index_t, 3>{1, pc, 1});
    if (!local3) return local3.error();
    ulysses_layout one = l;
    one.head_dim = 1;
    FPDT_TRY(exchange<float>(one, head_kind::query, false, *lse3, *local3, tag(0, 4, c)));
    auto lse_local = contiguous_view<float const>(ln.tmp_f.data(), std::array<index_t, 2>{l.heads, pc}).value();
    return call_user([&](auto&... s) { return user->consume(c, c * pc, tensor_view<T const, 3>(ov), lse_local, s...); },
                     "chunk sink, chunk ", c);
  }

  // dout of chunk c: the caller's local chunk (in dout_tmp) exchanged into `dst` [C, H/P, D].
  template <class Dout> [[nodiscard]] status exchange_dout(Dout const* user, index_t c, tensor_view<T, 3> const& dst) {
    auto const& l = layout_;
    index_t const pc = piece();
    auto dv = contiguous_view(lane_->dout_tmp.data(), std::array<index_t, 3>{pc, l.heads, l.head_dim}).value();
    FPDT_TRY(call_user([&](auto&... s) { return user->produce_dout(c, c * pc, dv, s...); }, "dout source, chunk ", c));
    return exchange<T>(l, head_kind::query, true, tensor_view<T const, 3>(dv), dst, tag(1, 0, c));
  }

  // dq [C, H/P, D] of chunk c in slot i, exchanged back to the local chunk (in tmp_f) and handed
  // to the caller's gradient sink.
  template <class Sink> [[nodiscard]] status exchange_dq(Sink* user, index_t c, std::size_t i) {
    auto const& l = layout_;
    index_t const pc = piece(), d = l.head_dim, hr = l.heads_per_rank(head_kind::query);
    auto v = contiguous_view(lane_->tmp_f.data(), std::array<index_t, 3>{pc, l.heads, d}).value();
    FPDT_TRY(exchange<float>(l, head_kind::query, false,
                             tensor_view<float const, 3>(detail::sp::view3(lane_->f[i], l.chunk, hr, d)), v, tag(1, 1, c)));
    return call_user([&](auto&... s) { return user->consume_dq(c, c * pc, tensor_view<float const, 3>(v), s...); },
                     "gradient sink, dq chunk ", c);
  }

  // Slot i's halves for dk and dv [C, H_kv/P, D] (or one replicated head) of a chunk.
  [[nodiscard]] std::array<tensor_view<float, 3>, 2> dkv_slot(std::size_t i) const {
    auto const& l = layout_;
    index_t const hr = l.heads_per_rank(head_kind::key_value);
    float* base = lane_->f[i].data();
    return {contiguous_view(base, std::array<index_t, 3>{l.chunk, hr, l.head_dim}).value(),
            contiguous_view(base + kv_chunk(), std::array<index_t, 3>{l.chunk, hr, l.head_dim}).value()};
  }

  // dk and dv of chunk c in slot i, exchanged back to the local chunks (summing replicas) and
  // handed to the caller's gradient sink.
  template <class Sink> [[nodiscard]] status exchange_dkv(Sink* user, index_t c, std::size_t i) {
    auto const& l = layout_;
    index_t const pc = piece(), d = l.head_dim;
    auto const [gk, gv] = dkv_slot(i);
    float* base = lane_->tmp_f.data();
    auto kv = contiguous_view(base, std::array<index_t, 3>{pc, l.kv_heads, d}).value();
    auto vv = contiguous_view(base + local(l.kv_heads), std::array<index_t, 3>{pc, l.kv_heads, d}).value();
    FPDT_TRY(exchange<float>(l, head_kind::key_value, false, tensor_view<float const, 3>(gk), kv, tag(1, 2, c)));
    FPDT_TRY(exchange<float>(l, head_kind::key_value, false, tensor_view<float const, 3>(gv), vv, tag(1, 3, c)));
    return call_user([&](auto&... s) {
      return user->consume_dkv(c, c * pc, tensor_view<float const, 3>(kv), tensor_view<float const, 3>(vv), s...);
    }, "gradient sink, dk/dv chunk ", c);
  }

  // ----- Hand-overs between the per-rank layer's lanes and the comm lane. -----

  // Copies between the layer's own buffers on a lane: host path, at once on the calling lane's
  // thread (s is null); device path, enqueued on *s, without the public copies' pointer checks.
  template <class S, class D>
  [[nodiscard]] status copy_rows(stream_t* s, tensor_view<S, 3> const& src, tensor_view<D, 3> const& dst) {
    if constexpr (host_path) {
      detail::layer::copy_rows(src, 0, dst, 0, dst.extent(0));
      return {};
    } else {
      return detail::layer::own_copy_rows(*lane_->be, *s, src, dst);
    }
  }
  template <class S, class D>
  [[nodiscard]] status copy_columns(stream_t* s, tensor_view<S, 2> const& src, tensor_view<D, 2> const& dst) {
    if constexpr (host_path) {
      detail::layer::copy_columns(src, 0, dst, 0, dst.extent(1));
      return {};
    } else {
      return detail::layer::own_copy_columns(*lane_->be, *s, src, dst);
    }
  }

  // Device path: starts a comm-stream step, after the comm stream waits for `after` (when given;
  // the step's time starts after that wait), as the comm lane's traced step `kind`. The pass's
  // first error is kept: once one call failed, later ones enqueue nothing (a collective skipped
  // on this rank must not be matched with its next one) and return that error.
  template <class F>
  [[nodiscard]] status device_step(step_kind kind, index_t i, index_t j, std::uint64_t bytes,
                                   typename comm_lane::event_type const* after, F&& fn) {
    auto& ln = *lane_;
    if (!ln.failure.ok()) return ln.failure;
    status st = [&]() -> status {
      if (after) FPDT_TRY(ln.be->wait(ln.st(), *after));
      std::size_t b = 0;
      if constexpr (times_steps_with_events<B>) {
        // The first timed step of a pass puts the comm stream behind the per-rank pass's start
        // event, the trace's origin, so every comm-lane time is on its clock and >= 0. Comm-lane
        // steps are only enqueued from the per-rank pass's steps, so that event is this pass's.
        if (ln.t_used == 0) {
          ln.origin = inner_.trace_start_event();
          if (ln.origin) FPDT_TRY(ln.be->wait(ln.st(), *ln.origin));
        }
        while (ln.t_events.size() < ln.t_used + 2) {
          auto e = ln.be->create_event(true);
          if (!e) return e.error();
          ln.t_events.push_back(std::move(*e));
        }
        b = ln.t_used;
        ln.t_used += 2;
        FPDT_TRY(ln.be->record(ln.t_events[b], ln.st()));
      }
      FPDT_TRY(fn());
      if constexpr (times_steps_with_events<B>) {
        FPDT_TRY(ln.be->record(ln.t_events[b + 1], ln.st()));
        ln.timed.emplace_back(trace_event{kind, lane::comm, static_cast<std::int32_t>(i),
                                          static_cast<std::int32_t>(j), bytes, -1, -1},
                              b);
      } else {
        ln.events.push_back(trace_event{kind, lane::comm, static_cast<std::int32_t>(i),
                                        static_cast<std::int32_t>(j), bytes, -1, -1});
      }
      return {};
    }();
    if (!st.ok()) ln.failure = st;
    return st;
  }
  // Keeps the pass's first error from a hand-over step outside device_step (copies, records).
  [[nodiscard]] status noted(status st) {
    if (!st.ok() && lane_->failure.ok()) lane_->failure = st;
    return st;
  }
  // Starts chunk c's q, k, v exchange on the comm lane. Host path: a job. Device path: enqueued
  // after the copies out of pq, pk, pv of the previous chunk (ev_src), then ev_pq.
  template <class Source> [[nodiscard]] status start_qkv(Source const* user, index_t c) {
    std::uint64_t const bytes = (q_chunk() + 2 * kv_chunk()) * sizeof(T);
    auto& ln = *lane_;
    if constexpr (host_path) {
      auto& j = ln.prefetch.emplace();
      j.chunk = c;
      return ln.launch(j, step_kind::produce, c, c, bytes, [this, user, c] { return exchange_qkv(user, c); });
    } else {
      return device_step(step_kind::produce, c, c, bytes, ln.src_recorded ? &*ln.ev_src : nullptr, [&]() -> status {
        FPDT_TRY(exchange_qkv(user, c));
        FPDT_TRY(ln.be->record(*ln.ev_pq, ln.st()));
        ln.prefetched = c;
        return {};
      });
    }
  }

  // Chunk c's q, k, v for the per-rank layer (on lane stream s): its exchange, started with chunk
  // c - 1 (or now, for the first chunk or out of order), is waited for (host: its job; device: s
  // waits for ev_pq), copied into the layer's slots (then ev_src), and chunk c + 1's is started.
  template <class Source>
  [[nodiscard]] status take_qkv(Source const* user, index_t c, tensor_view<T, 3> const& q,
                                tensor_view<T, 3> const& k, tensor_view<T, 3> const& v, stream_t* s) {
    auto& ln = *lane_;
    if constexpr (host_path) {
      if (!ln.prefetch || ln.prefetch->chunk != c) { // out of order: wait for the lane, then fetch c
        if (ln.prefetch && ln.prefetch->done.valid()) (void)ln.prefetch->done.get();
        ln.prefetch.reset();
        FPDT_TRY(start_qkv(user, c));
      }
      status st = ln.prefetch->done.valid() ? ln.prefetch->done.get()
                                            : make_error(errc::internal, "comm lane: chunk ", c, " was not queued");
      ln.prefetch.reset();
      FPDT_TRY(st);
    } else {
      if (!ln.failure.ok()) return ln.failure;
      if (ln.prefetched != c) FPDT_TRY(start_qkv(user, c));
      ln.prefetched = -1;
      FPDT_TRY(noted(ln.be->wait(*s, *ln.ev_pq)));
    }
    auto const& l = layout_;
    index_t const d = l.head_dim, hq = l.heads_per_rank(head_kind::query), hk = l.heads_per_rank(head_kind::key_value);
    FPDT_TRY(noted(copy_rows(s, tensor_view<T const, 3>(detail::sp::view3(ln.pq, l.chunk, hq, d)), q)));
    FPDT_TRY(noted(copy_rows(s, tensor_view<T const, 3>(detail::sp::view3(ln.pk, l.chunk, hk, d)), k)));
    FPDT_TRY(noted(copy_rows(s, tensor_view<T const, 3>(detail::sp::view3(ln.pv, l.chunk, hk, d)), v)));
    if constexpr (!host_path) {
      FPDT_TRY(noted(ln.be->record(*ln.ev_src, *s)));
      ln.src_recorded = true;
    }
    if (c + 1 < shape_.sequence / l.chunk) return start_qkv(user, c + 1);
    return {};
  }

  // An output or gradient hand-over for chunk c: `fill(i)` copies it into a free exchange slot i
  // on the lane (stream s), then `body(i)` runs as the comm lane's step (`kind`, chunks i, j).
  // Host path: the oldest of max_in_flight queued jobs is waited for to free a slot, and the body
  // runs as a job. Device path: the lane waits for the slot's last exchange (ev_free), ev_in is
  // recorded after the fill, the body is enqueued on the comm stream after it, then ev_free.
  // `body` is copied into the host path's job.
  template <class Fill, class Body>
  [[nodiscard]] status hand_over(index_t c, step_kind kind, index_t i, index_t j, std::uint64_t bytes, stream_t* s,
                                 Fill&& fill, Body body) {
    auto& ln = *lane_;
    if constexpr (host_path) {
      auto jr = ln.next_output(c);
      if (!jr) return jr.error();
      auto& job = **jr;
      auto const slot = static_cast<std::size_t>(job.slot);
      FPDT_TRY(fill(slot));
      return ln.launch(job, kind, i, j, bytes, [body = std::move(body), slot]() mutable { return body(slot); });
    } else {
      auto si = take_slot(*s);
      if (!si) return si.error();
      std::size_t const slot = *si;
      FPDT_TRY(noted(fill(slot)));
      FPDT_TRY(noted(ln.be->record(*ln.ev_in[slot], *s)));
      ln.slot_used[slot] = true;
      return device_step(kind, i, j, bytes, &*ln.ev_in[slot], [&]() -> status {
        FPDT_TRY(body(slot));
        return ln.be->record(*ln.ev_free[slot], ln.st());
      });
    }
  }
  // Device path: the pass's first error if there was one, else the next output slot, once the
  // exchange that last read it is done (s waits for ev_free).
  [[nodiscard]] result<std::size_t> take_slot(stream_t& s) {
    auto& ln = *lane_;
    if (!ln.failure.ok()) return ln.failure;
    auto const i = static_cast<std::size_t>(ln.next_slot);
    ln.next_slot = (ln.next_slot + 1) % static_cast<int>(max_in_flight);
    if (ln.slot_used[i]) FPDT_TRY(noted(ln.be->wait(s, *ln.ev_free[i])));
    return i;
  }

  // Device path: enqueues the exchange of dout chunk c into pdout on the comm stream, after the
  // previous chunk's copy out of pdout (ev_dout_copied), then ev_dout_ready.
  template <class Dout> [[nodiscard]] status start_dout(Dout const* user, index_t c) {
    auto& ln = *lane_;
    return device_step(step_kind::fetch, c, -1, q_chunk() * sizeof(T),
                       ln.dout_copied_recorded ? &*ln.ev_dout_copied : nullptr, [&]() -> status {
      index_t const hq = layout_.heads_per_rank(head_kind::query);
      FPDT_TRY(exchange_dout(user, c, detail::sp::view3(ln.pdout, layout_.chunk, hq, layout_.head_dim)));
      FPDT_TRY(ln.be->record(*ln.ev_dout_ready, ln.st()));
      ln.dout_prefetched = c;
      return {};
    });
  }

  // dout of chunk c for the per-rank layer's fetch into `dout` on lane stream s. Host path: the
  // exchange runs here, on the h2d lane, straight into the slot. Device path: its exchange was
  // enqueued at the previous fetch (or is now), so it ran on the comm stream ahead of the gradient
  // exchanges that wait for the compute lane; s waits for it (ev_dout_ready), copies pdout into
  // the slot (then ev_dout_copied), and the next fetch's exchange is enqueued.
  template <class Dout>
  [[nodiscard]] status take_dout(Dout const* user, index_t c, tensor_view<T, 3> const& dout, stream_t* s) {
    if constexpr (host_path) {
      return exchange_dout(user, c, dout);
    } else {
      auto& ln = *lane_;
      if (!ln.failure.ok()) return ln.failure;
      if (ln.dout_prefetched != c) FPDT_TRY(start_dout(user, c)); // first fetch, or out of order
      ln.dout_prefetched = -1;
      std::size_t const k = ln.dout_next++;
      index_t const hq = layout_.heads_per_rank(head_kind::query);
      FPDT_TRY(noted(ln.be->wait(*s, *ln.ev_dout_ready)));
      FPDT_TRY(noted(copy_rows(s, tensor_view<T const, 3>(detail::sp::view3(ln.pdout, layout_.chunk, hq, layout_.head_dim)), dout)));
      FPDT_TRY(noted(ln.be->record(*ln.ev_dout_copied, *s)));
      ln.dout_copied_recorded = true;
      if (k < dout_order_.size() && dout_order_[k] == c && k + 1 < dout_order_.size())
        return start_dout(user, dout_order_[k + 1]);
      return {};
    }
  }

  // The per-rank layer's callbacks: the plain forms on the host path (called on its lanes'
  // workers), the stream forms on the device path (called on the caller's thread at enqueue).
  template <class Source> struct source_adapter {
    sequence_parallel_attention* self;
    Source const* user;
    [[nodiscard]] status produce(index_t c, index_t, tensor_view<T, 3> const& q, tensor_view<T, 3> const& k,
                                 tensor_view<T, 3> const& v) const requires host_path {
      return self->take_qkv(user, c, q, k, v, nullptr);
    }
    [[nodiscard]] status produce(index_t c, index_t, tensor_view<T, 3> const& q, tensor_view<T, 3> const& k,
                                 tensor_view<T, 3> const& v, stream_t& s) const requires(!host_path) {
      return self->take_qkv(user, c, q, k, v, &s);
    }
  };

  template <class Sink> struct sink_adapter {
    sequence_parallel_attention* self;
    Sink* user;
    [[nodiscard]] status consume(index_t c, index_t, tensor_view<T const, 3> const& out,
                                 tensor_view<float const, 2> const& lse) requires host_path {
      return take(c, out, lse, nullptr);
    }
    [[nodiscard]] status consume(index_t c, index_t, tensor_view<T const, 3> const& out,
                                 tensor_view<float const, 2> const& lse, stream_t& s) requires(!host_path) {
      return take(c, out, lse, &s);
    }
    [[nodiscard]] status take(index_t c, tensor_view<T const, 3> const& out, tensor_view<float const, 2> const& lse,
                              stream_t* s) {
      sequence_parallel_attention* me = self;
      auto const& l = me->layout_;
      index_t const hr = l.heads_per_rank(head_kind::query);
      std::uint64_t const bytes = me->q_chunk() * sizeof(T) + me->lse_chunk() * 4;
      auto fill = [&](std::size_t i) -> status {
        auto& ln = *me->lane_;
        FPDT_TRY(me->copy_rows(s, out, detail::sp::view3(ln.out[i], l.chunk, hr, l.head_dim)));
        return me->copy_columns(s, lse, contiguous_view(ln.f[i].data(), std::array<index_t, 2>{hr, l.chunk}).value());
      };
      return me->hand_over(c, step_kind::sink, c, -1, bytes, s, fill,
                           [me, u = user, c](std::size_t i) { return me->exchange_out(u, c, i); });
    }
  };

  template <class Dout> struct dout_adapter {
    sequence_parallel_attention* self;
    Dout const* user;
    [[nodiscard]] status produce_dout(index_t c, index_t, tensor_view<T, 3> const& dout) const requires host_path {
      return self->take_dout(user, c, dout, nullptr);
    }
    [[nodiscard]] status produce_dout(index_t c, index_t, tensor_view<T, 3> const& dout, stream_t& s) const
      requires(!host_path) {
      return self->take_dout(user, c, dout, &s);
    }
  };

  template <class Sink> struct grad_adapter {
    sequence_parallel_attention* self;
    Sink* user;
    [[nodiscard]] status consume_dq(index_t c, index_t, tensor_view<float const, 3> const& g) requires host_path {
      return take_dq(c, g, nullptr);
    }
    [[nodiscard]] status consume_dq(index_t c, index_t, tensor_view<float const, 3> const& g, stream_t& s)
      requires(!host_path) {
      return take_dq(c, g, &s);
    }
    [[nodiscard]] status consume_dkv(index_t c, index_t, tensor_view<float const, 3> const& gk,
                                     tensor_view<float const, 3> const& gv) requires host_path {
      return take_dkv(c, gk, gv, nullptr);
    }
    [[nodiscard]] status consume_dkv(index_t c, index_t, tensor_view<float const, 3> const& gk,
                                     tensor_view<float const, 3> const& gv, stream_t& s) requires(!host_path) {
      return take_dkv(c, gk, gv, &s);
    }
    [[nodiscard]] status take_dq(index_t c, tensor_view<float const, 3> const& g, stream_t* s) {
      sequence_parallel_attention* me = self;
      auto const& l = me->layout_;
      index_t const hr = l.heads_per_rank(head_kind::query);
      auto fill = [&](std::size_t i) { return me->copy_rows(s, g, detail::sp::view3(me->lane_->f[i], l.chunk, hr, l.head_dim)); };
      return me->hand_over(c, step_kind::sink, c, -1, me->q_chunk() * 4, s, fill,
                           [me, u = user, c](std::size_t i) { return me->exchange_dq(u, c, i); });
    }
    [[nodiscard]] status take_dkv(index_t c, tensor_view<float const, 3> const& gk,
                                  tensor_view<float const, 3> const& gv, stream_t* s) {
      sequence_parallel_attention* me = self;
      auto fill = [&](std::size_t i) -> status {
        auto const [k, v] = me->dkv_slot(i);
        FPDT_TRY(me->copy_rows(s, gk, k));
        return me->copy_rows(s, gv, v);
      };
      return me->hand_over(c, step_kind::sink, -1, c, 2 * me->kv_chunk() * 4, s, fill,
                           [me, u = user, c](std::size_t i) { return me->exchange_dkv(u, c, i); });
    }
  };

  Comm* comm_;
  attention_problem problem_;
  ulysses_layout layout_;
  attention_shape shape_;
  std::uint64_t salt_;
  fpdt_attention<T, B, Kernel> inner_;
  attention_context* ctx_ = nullptr; // the caller's context during a pass with one (else the per-rank layer's)
  std::unique_ptr<comm_lane> lane_;
  std::vector<index_t> dout_order_; // device path: see take_dout
  bool agreed_ = false;              // check_ranks_agree has passed
};

FPDT_NAMESPACE_END
