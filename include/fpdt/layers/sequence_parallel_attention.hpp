//! \file
//! \brief `sequence_parallel_attention`: FPDT attention on P ranks with the Ulysses all-to-all.
//!
//! DESIGN.md 2.1-2.5, FPDT (Yao et al., arXiv 2408.16978) section 3. Each rank holds S/P tokens
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
//! The comm lane (DESIGN.md 2.2-2.3): the layer owns one stream of the backend's comm lane, a
//! worker that runs exchange jobs in the order they are queued, which is the schedule's order on
//! every rank, so peers meet in the same order. In the forward, the job for chunk c + 1 (the
//! caller's source, then the q, k, v all-to-alls) is queued when chunk c's q, k, v are handed to
//! the compute lane, so it runs while chunk c is computed; out and lse of chunk c are copied to a
//! job buffer and exchanged (then handed to the caller's sink) while the compute lane goes on to
//! chunk c + 1. In the backward the gradient exchanges and the caller's gradient sink run on the
//! comm lane the same way, and dout is exchanged on the h2d lane when it is fetched. At most
//! `max_in_flight` (2) output or gradient jobs wait at once; the compute lane waits for the
//! oldest beyond that. Consequence for callers: the source, sink and gradient sink are called on
//! the comm lane's thread (one call at a time, in chunk order), concurrently with the kernel.
#pragma once

#include "../comm/communicator.hpp"
#include "../comm/ulysses.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../pipeline/trace.hpp"
#include "fpdt_attention.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <optional>
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
//! \tparam Comm   a `communicator` (`local_communicator`, `mpi_communicator`)
//! \tparam B      backend of the per-rank layer (`host_backend`)
//! \tparam Kernel chunk kernel
//!
//! Shapes per rank: local q `[S/P, H, D]`, k and v `[S/P, H_kv, D]`, out `[S/P, H, D]`; gradients
//! fp32 dq `[S/P, H, D]`, dk and dv `[S/P, H_kv, D]`. Chunk sources and sinks see local chunks of
//! C/P tokens and local token indices (`first_token` = c C/P).
template <class T, communicator Comm, class B = host_backend, class Kernel = host_chunk_kernel>
class sequence_parallel_attention {
public:
  //! Checks the shapes (`ulysses_layout::make`, S % C == 0) and builds the per-rank layer.
  //! `salt` (0..63) distinguishes the tags of layers that share a communicator (use the layer
  //! index; layers run one at a time may share one).
  //! Errors: those of `ulysses_layout::make` and `fpdt_attention::create`, naming the numbers.
  [[nodiscard]] static result<sequence_parallel_attention> create(B& be, Comm& comm,
                                                                  attention_shape global,
                                                                  fpdt_attention_options options,
                                                                  std::uint64_t salt = 0,
                                                                  Kernel kernel = {}) {
    index_t const c = options.chunk == 0 ? global.sequence : options.chunk;
    auto l = ulysses_layout::make(comm.size(), global.heads, global.kv_heads, global.head_dim, c);
    if (!l) return l.error();
    if (global.sequence < 1 || global.sequence % c != 0)
      return make_error(errc::invalid_argument, "sequence_parallel_attention: S = ",
                        global.sequence, " is not a multiple of the chunk C = ", c);
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
    attention_shape per_rank{global.sequence, l->heads_per_rank(head_kind::query),
                             l->heads_per_rank(head_kind::key_value), global.head_dim};
    auto inner = fpdt_attention<T, B, Kernel>::create(be, per_rank, options, std::move(kernel));
    if (!inner) return inner.error();
    auto lane_stream = be.create_stream(lane::comm, default_priority(lane::comm));
    if (!lane_stream) return lane_stream.error();
    auto cl = std::make_unique<comm_lane>(be, std::move(*lane_stream));
    return result<sequence_parallel_attention>(
        sequence_parallel_attention(comm, *l, global, salt, std::move(*inner), std::move(cl)));
  }

  //! Any error of a pass on this rank (shapes, source, sink, kernel, memory) aborts the
  //! communicator, so the other ranks fail promptly instead of waiting for the timeout.
  //!
  //! Forward: local q, k, v chunks from `source` (a `chunk_source` over local chunks), local out
  //! chunks to `sink` (a `chunk_sink`; its lse view is `[H, C/P]`). Errors: those of the per-rank
  //! layer and of the communicator (a peer's failure or a timeout, within the world's timeout).
  template <class Source, class Sink>
    requires chunk_source<Source, T> && chunk_sink<Sink, T>
  [[nodiscard]] status forward(Source const& source, Sink& sink) {
    source_adapter<Source> src{this, &source};
    sink_adapter<Sink> snk{this, &sink};
    lane_->begin_pass();
    return finish(inner_.forward(src, snk));
  }

  //! Forward from local tensors q `[S/P, H, D]`, k, v `[S/P, H_kv, D]` into out `[S/P, H, D]`.
  [[nodiscard]] status forward(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                               tensor_view<T const, 3> const& v, tensor_view<T, 3> const& out) {
    // A shape error on one rank must not leave the others waiting for its exchanges.
    FPDT_TRY(abort_on_error(check_local("q", q.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(check_local("k", k.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(check_local("v", v.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(check_local("out", out.extents(), shape_.heads)));
    tensor_source<T> src{q, k, v};
    tensor_sink<T> snk{out, {}};
    return forward(src, snk);
  }

  //! Backward: local dout chunks from `dout` (a `dout_source` over local chunks), local fp32
  //! gradients to `sink` (a `gradient_sink`). Errors: as `forward`.
  template <class Dout, class Sink>
    requires dout_source<Dout, T> && gradient_sink<Sink>
  [[nodiscard]] status backward(Dout const& dout, Sink& sink) {
    dout_adapter<Dout> src{this, &dout};
    grad_adapter<Sink> snk{this, &sink};
    lane_->begin_pass();
    return finish(inner_.backward(src, snk));
  }

  //! Backward from a local dout `[S/P, H, D]` into local fp32 dq `[S/P, H, D]`, dk, dv
  //! `[S/P, H_kv, D]` (overwritten).
  [[nodiscard]] status backward(tensor_view<T const, 3> const& dout, tensor_view<float, 3> const& dq,
                                tensor_view<float, 3> const& dk, tensor_view<float, 3> const& dv) {
    FPDT_TRY(abort_on_error(check_local("dout", dout.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(check_local("dq", dq.extents(), shape_.heads)));
    FPDT_TRY(abort_on_error(check_local("dk", dk.extents(), shape_.kv_heads)));
    FPDT_TRY(abort_on_error(check_local("dv", dv.extents(), shape_.kv_heads)));
    tensor_dout_source<T> src{dout};
    tensor_gradient_sink snk{dq, dk, dv};
    return backward(src, snk);
  }

  //! The per-rank one-rank layer (its schedules, trace, predicted bytes).
  [[nodiscard]] fpdt_attention<T, B, Kernel> const& local_layer() const noexcept { return inner_; }
  //! The last pass: the per-rank layer's steps plus this layer's comm-lane steps (`produce`:
  //! a chunk's source and q/k/v all-to-alls; `sink`: an output or gradient exchange and the
  //! caller's sink), on the same clock to within the few microseconds between the two starts.
  //! Valid after a pass has returned.
  [[nodiscard]] pipeline_trace trace() const {
    pipeline_trace t = inner_.trace();
    t.events.insert(t.events.end(), lane_->events.begin(), lane_->events.end());
    return t;
  }
  //! The head sharding.
  [[nodiscard]] ulysses_layout const& layout() const noexcept { return layout_; }
  //! Output or gradient exchange jobs that may wait on the comm lane at once.
  static constexpr std::size_t max_in_flight = 2;

private:
  // The comm lane: a stream of the backend and the jobs queued on it. Only the compute lane's
  // worker queues and waits for jobs while a pass runs; the caller's thread drains them after.
  struct comm_lane {
    comm_lane(B& backend, typename B::stream_type&& st) : be(&backend), stream(std::move(st)) {}
    B* be;
    typename B::stream_type stream;
    struct job {
      index_t chunk = -1;
      std::future<status> done;
      detail::sp::buffer<T> a, b, c;       // model-dtype buffers (global chunk)
      detail::sp::buffer<float> f, g;      // fp32 buffers (lse, gradients)
    };
    std::optional<job> prefetch;    // the forward's source job for the next chunk
    std::deque<job> outputs;        // output / gradient jobs not yet waited for
    std::chrono::steady_clock::time_point t0;  // start of the pass
    std::vector<trace_event> events;           // written by the lane's worker only
    // Queues `fn()` on the lane as a traced step (`kind`, chunk `i` or `j`); the job's status
    // arrives through its future.
    template <class F>
    [[nodiscard]] status launch(job& j, step_kind kind, index_t i, index_t jj, std::uint64_t bytes, F&& fn) {
      // The event is recorded inside the task, before its future is ready: whoever waits for
      // the job may then read or clear `events`.
      auto task = std::make_shared<std::packaged_task<status()>>(
          [this, f = std::forward<F>(fn), kind, i, jj, bytes]() mutable -> status {
            trace_event e{kind, lane::comm, static_cast<std::int32_t>(i), static_cast<std::int32_t>(jj), bytes, since(), -1};
            status st = f();
            e.end_us = since();
            events.push_back(e);
            return st;
          });
      j.done = task->get_future();
      status st = be->launch(stream, [task] { (*task)(); });
      if (!st.ok()) j.done = {}; // never runs: nobody may wait for it
      return st;
    }
    [[nodiscard]] double since() const noexcept {
      return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    }
    void begin_pass() {
      t0 = std::chrono::steady_clock::now();
      events.clear();
    }
    // Waits for every queued job; the first error wins.
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
      return first;
    }
    // Keeps at most max_in_flight output jobs queued: waits for the oldest beyond that.
    [[nodiscard]] status bound() {
      while (outputs.size() >= max_in_flight) {
        status st = outputs.front().done.valid() ? outputs.front().done.get() : status{};
        outputs.pop_front();
        if (!st.ok()) return st;
      }
      return {};
    }
  };

  sequence_parallel_attention(Comm& comm, ulysses_layout l, attention_shape global,
                              std::uint64_t salt, fpdt_attention<T, B, Kernel>&& inner,
                              std::unique_ptr<comm_lane> cl)
      : comm_(&comm), layout_(l), shape_(global), salt_(salt), inner_(std::move(inner)),
        lane_(std::move(cl)) {}

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
    if (!st.ok() && st.code() != errc::comm_error && st.code() != errc::timeout)
      comm_->abort(st.message());
    return st;
  }

  [[nodiscard]] index_t piece() const noexcept { return layout_.piece(); }

  // Queues chunk c's source job: the caller's q, k, v of local chunk c, then the all-to-alls
  // into global-chunk buffers [C, H/P, D] (a, b, c of the job).
  template <class Source> [[nodiscard]] status start_prefetch(Source const* user, index_t c) {
    auto const& l = layout_;
    index_t const pc = piece(), d = l.head_dim, hq = l.heads_per_rank(head_kind::query),
                  hk = l.heads_per_rank(head_kind::key_value);
    lane_->prefetch.emplace();
    auto& j = *lane_->prefetch;
    j.chunk = c;
    device_arena& arena = lane_->be->device_memory();
    FPDT_TRY(j.a.reset(arena, static_cast<std::size_t>(l.chunk * hq * d), "exchanged q chunk"));
    FPDT_TRY(j.b.reset(arena, static_cast<std::size_t>(l.chunk * hk * d), "exchanged k chunk"));
    FPDT_TRY(j.c.reset(arena, j.b.size(), "exchanged v chunk"));
    auto* jp = &j;
    std::uint64_t const bytes = (j.a.size() + 2 * j.b.size()) * sizeof(T);
    return lane_->launch(j, step_kind::produce, c, c, bytes, [this, user, c, pc, d, hq, hk, jp]() -> status {
      auto const& lay = layout_;
      device_arena& mem = lane_->be->device_memory();
      detail::sp::buffer<T> lq, lk, lv;
      FPDT_TRY(lq.reset(mem, static_cast<std::size_t>(pc * lay.heads * d), "local q chunk"));
      FPDT_TRY(lk.reset(mem, static_cast<std::size_t>(pc * lay.kv_heads * d), "local k chunk"));
      FPDT_TRY(lv.reset(mem, lk.size(), "local v chunk"));
      auto qv = detail::sp::view3(lq, pc, lay.heads, d);
      auto kv = detail::sp::view3(lk, pc, lay.kv_heads, d);
      auto vv = detail::sp::view3(lv, pc, lay.kv_heads, d);
      FPDT_TRY(detail::layer::guarded([&] { return user->produce(c, c * pc, qv, kv, vv); }, "chunk source, chunk ", c));
      std::uint64_t const s = salt_;
      FPDT_TRY(seq_to_head<T>(*comm_, lay, head_kind::query, tensor_view<T const, 3>(qv),
                              detail::sp::view3(jp->a, lay.chunk, hq, d), detail::sp::tag(s, 0, 0, c)));
      FPDT_TRY(seq_to_head<T>(*comm_, lay, head_kind::key_value, tensor_view<T const, 3>(kv),
                              detail::sp::view3(jp->b, lay.chunk, hk, d), detail::sp::tag(s, 0, 1, c)));
      return seq_to_head<T>(*comm_, lay, head_kind::key_value, tensor_view<T const, 3>(vv),
                            detail::sp::view3(jp->c, lay.chunk, hk, d), detail::sp::tag(s, 0, 2, c));
    });
  }

  template <class Source> struct source_adapter {
    sequence_parallel_attention* self;
    Source const* user;
    // Chunk c: its job was queued while chunk c - 1 computed (or is queued now); wait for it,
    // hand its q, k, v to the layer, and queue chunk c + 1's.
    [[nodiscard]] status produce(index_t c, index_t, tensor_view<T, 3> const& q,
                                 tensor_view<T, 3> const& k, tensor_view<T, 3> const& v) const {
      auto& lane = *self->lane_;
      auto const& l = self->layout_;
      if (!lane.prefetch || lane.prefetch->chunk != c) {
        FPDT_TRY(lane.drain());
        FPDT_TRY(self->start_prefetch(user, c));
      }
      status st = lane.prefetch->done.get();
      if (st.ok()) {
        index_t const d = l.head_dim, hq = l.heads_per_rank(head_kind::query), hk = l.heads_per_rank(head_kind::key_value);
        auto& j = *lane.prefetch;
        detail::layer::copy_rows(tensor_view<T const, 3>(detail::sp::view3(j.a, l.chunk, hq, d)), 0, q, 0, l.chunk);
        detail::layer::copy_rows(tensor_view<T const, 3>(detail::sp::view3(j.b, l.chunk, hk, d)), 0, k, 0, l.chunk);
        detail::layer::copy_rows(tensor_view<T const, 3>(detail::sp::view3(j.c, l.chunk, hk, d)), 0, v, 0, l.chunk);
      }
      lane.prefetch.reset();
      FPDT_TRY(st);
      if (c + 1 < self->shape_.sequence / l.chunk) FPDT_TRY(self->start_prefetch(user, c + 1));
      return {};
    }
  };

  // Chunk c's out [C, H/P, D] and lse [H/P, C] are copied into a job (a, f) whose all-to-alls
  // and the caller's sink run on the comm lane.
  template <class Sink> struct sink_adapter {
    sequence_parallel_attention* self;
    Sink* user;
    [[nodiscard]] status consume(index_t c, index_t, tensor_view<T const, 3> const& out,
                                 tensor_view<float const, 2> const& lse) {
      auto& lane = *self->lane_;
      FPDT_TRY(lane.bound());
      auto const& l = self->layout_;
      index_t const d = l.head_dim, hr = l.heads_per_rank(head_kind::query);
      auto& j = lane.outputs.emplace_back();
      j.chunk = c;
      device_arena& arena = lane.be->device_memory();
      FPDT_TRY(j.a.reset(arena, static_cast<std::size_t>(l.chunk * hr * d), "out chunk to exchange"));
      FPDT_TRY(j.f.reset(arena, static_cast<std::size_t>(hr * l.chunk), "lse chunk to exchange"));
      detail::layer::copy_rows(out, 0, detail::sp::view3(j.a, l.chunk, hr, d), 0, l.chunk);
      for (index_t h = 0; h < hr; ++h)
        for (index_t t = 0; t < l.chunk; ++t)
          j.f[static_cast<std::size_t>(h * l.chunk + t)] = lse(h, t);
      auto* jp = &j;
      sequence_parallel_attention* me = self;
      Sink* u = user;
      return lane.launch(j, step_kind::sink, c, -1, j.a.size() * sizeof(T) + j.f.size() * 4, [me, u, jp, c, d, hr]() -> status {
        auto const& lay = me->layout_;
        index_t const pc = me->piece();
        device_arena& mem = me->lane_->be->device_memory();
        detail::sp::buffer<T> lo;
        detail::sp::buffer<float> ll;
        FPDT_TRY(lo.reset(mem, static_cast<std::size_t>(pc * lay.heads * d), "local out chunk"));
        FPDT_TRY(ll.reset(mem, static_cast<std::size_t>(pc * lay.heads), "local lse chunk"));
        auto ov = detail::sp::view3(lo, pc, lay.heads, d);
        Comm& comm = *me->comm_;
        std::uint64_t const s = me->salt_;
        FPDT_TRY(head_to_seq<T>(comm, lay, head_kind::query,
                                tensor_view<T const, 3>(detail::sp::view3(jp->a, lay.chunk, hr, d)), ov,
                                detail::sp::tag(s, 0, 3, c)));
        // lse [H/P, C] seen as [C, H/P, 1]; the local lse [H, C/P] as [C/P, H, 1].
        auto lse3 = make_tensor_view<float const>(jp->f.data(), std::array<index_t, 3>{lay.chunk, hr, 1},
                                                  std::array<index_t, 3>{1, lay.chunk, 1});
        if (!lse3) return lse3.error();
        auto local3 = make_tensor_view(ll.data(), std::array<index_t, 3>{pc, lay.heads, 1},
                                       std::array<index_t, 3>{1, pc, 1});
        if (!local3) return local3.error();
        ulysses_layout one = lay;
        one.head_dim = 1;
        FPDT_TRY(head_to_seq<float>(comm, one, head_kind::query, *lse3, *local3, detail::sp::tag(s, 0, 4, c)));
        auto lse_local = contiguous_view<float const>(ll.data(), std::array<index_t, 2>{lay.heads, pc}).value();
        return detail::layer::guarded([&] { return u->consume(c, c * pc, tensor_view<T const, 3>(ov), lse_local); },
                                      "chunk sink, chunk ", c);
      });
    }
  };

  template <class Dout> struct dout_adapter {
    sequence_parallel_attention* self;
    Dout const* user;
    [[nodiscard]] status produce_dout(index_t c, index_t, tensor_view<T, 3> const& dout) const {
      auto const& l = self->layout_;
      index_t const pc = self->piece(), d = l.head_dim;
      detail::sp::buffer<T> ld;
      FPDT_TRY(ld.reset(self->lane_->be->device_memory(), static_cast<std::size_t>(pc * l.heads * d), "local dout chunk"));
      auto dv = detail::sp::view3(ld, pc, l.heads, d);
      FPDT_TRY(user->produce_dout(c, c * pc, dv));
      return seq_to_head<T>(*self->comm_, l, head_kind::query, tensor_view<T const, 3>(dv), dout,
                            detail::sp::tag(self->salt_, 1, 0, c));
    }
  };

  // Gradients of chunk c (fp32, [C, H/P, D] or [C, H_kv/P, D]) are copied into a job whose
  // all-to-alls and the caller's gradient sink run on the comm lane.
  template <class Sink> struct grad_adapter {
    sequence_parallel_attention* self;
    Sink* user;
    [[nodiscard]] status consume_dq(index_t c, index_t, tensor_view<float const, 3> const& g) {
      auto& lane = *self->lane_;
      FPDT_TRY(lane.bound());
      auto const& l = self->layout_;
      index_t const d = l.head_dim, hr = l.heads_per_rank(head_kind::query);
      auto& j = lane.outputs.emplace_back();
      j.chunk = c;
      FPDT_TRY(j.f.reset(lane.be->device_memory(), static_cast<std::size_t>(l.chunk * hr * d), "dq chunk to exchange"));
      detail::layer::copy_rows(g, 0, detail::sp::view3(j.f, l.chunk, hr, d), 0, l.chunk);
      auto* jp = &j;
      sequence_parallel_attention* me = self;
      Sink* u = user;
      return lane.launch(j, step_kind::sink, c, -1, j.f.size() * 4, [me, u, jp, c, d, hr]() -> status {
        auto const& lay = me->layout_;
        index_t const pc = me->piece();
        detail::sp::buffer<float> lg;
        FPDT_TRY(lg.reset(me->lane_->be->device_memory(), static_cast<std::size_t>(pc * lay.heads * d), "local dq chunk"));
        auto v = detail::sp::view3(lg, pc, lay.heads, d);
        FPDT_TRY(head_to_seq<float>(*me->comm_, lay, head_kind::query,
                                    tensor_view<float const, 3>(detail::sp::view3(jp->f, lay.chunk, hr, d)), v,
                                    detail::sp::tag(me->salt_, 1, 1, c)));
        return detail::layer::guarded([&] { return u->consume_dq(c, c * pc, tensor_view<float const, 3>(v)); },
                                      "gradient sink, dq chunk ", c);
      });
    }
    [[nodiscard]] status consume_dkv(index_t c, index_t, tensor_view<float const, 3> const& gk,
                                     tensor_view<float const, 3> const& gv) {
      auto& lane = *self->lane_;
      FPDT_TRY(lane.bound());
      auto const& l = self->layout_;
      index_t const d = l.head_dim, hr = l.heads_per_rank(head_kind::key_value);
      auto& j = lane.outputs.emplace_back();
      j.chunk = c;
      device_arena& arena = lane.be->device_memory();
      FPDT_TRY(j.f.reset(arena, static_cast<std::size_t>(l.chunk * hr * d), "dk chunk to exchange"));
      FPDT_TRY(j.g.reset(arena, j.f.size(), "dv chunk to exchange"));
      detail::layer::copy_rows(gk, 0, detail::sp::view3(j.f, l.chunk, hr, d), 0, l.chunk);
      detail::layer::copy_rows(gv, 0, detail::sp::view3(j.g, l.chunk, hr, d), 0, l.chunk);
      auto* jp = &j;
      sequence_parallel_attention* me = self;
      Sink* u = user;
      return lane.launch(j, step_kind::sink, -1, c, 2 * j.f.size() * 4, [me, u, jp, c, d, hr]() -> status {
        auto const& lay = me->layout_;
        index_t const pc = me->piece();
        device_arena& mem = me->lane_->be->device_memory();
        detail::sp::buffer<float> lk, lv;
        FPDT_TRY(lk.reset(mem, static_cast<std::size_t>(pc * lay.kv_heads * d), "local dk chunk"));
        FPDT_TRY(lv.reset(mem, lk.size(), "local dv chunk"));
        auto kv = detail::sp::view3(lk, pc, lay.kv_heads, d);
        auto vv = detail::sp::view3(lv, pc, lay.kv_heads, d);
        FPDT_TRY(head_to_seq<float>(*me->comm_, lay, head_kind::key_value,
                                    tensor_view<float const, 3>(detail::sp::view3(jp->f, lay.chunk, hr, d)), kv,
                                    detail::sp::tag(me->salt_, 1, 2, c)));
        FPDT_TRY(head_to_seq<float>(*me->comm_, lay, head_kind::key_value,
                                    tensor_view<float const, 3>(detail::sp::view3(jp->g, lay.chunk, hr, d)), vv,
                                    detail::sp::tag(me->salt_, 1, 3, c)));
        return detail::layer::guarded(
            [&] { return u->consume_dkv(c, c * pc, tensor_view<float const, 3>(kv), tensor_view<float const, 3>(vv)); },
            "gradient sink, dk/dv chunk ", c);
      });
    }
  };

  Comm* comm_;
  ulysses_layout layout_;
  attention_shape shape_;
  std::uint64_t salt_;
  fpdt_attention<T, B, Kernel> inner_;
  std::unique_ptr<comm_lane> lane_;
};

FPDT_NAMESPACE_END
