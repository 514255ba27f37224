//! \file
//! \brief `fpdt_attention`: FPDT attention on one rank (P = 1), forward and backward over u chunks,
//! with the inactive chunks offloaded to pinned host memory and the copies hidden behind compute.
//!
//! docs/design.md 2.2 (forward), 2.3 (backward), 4 (architecture), FPDT paper (Yao et al., arXiv
//! 2408.16978) section 3. The layer builds the pass's schedule (schedule/schedule.hpp), checks it,
//! allocates exactly the schedule's device buffers from the backend's arena (rings of staging
//! slots plus the fp32 accumulators, independent of S when offload is on) and its pinned host
//! copies from the backend's pool, and runs it with the executor (pipeline/executor.hpp) on the
//! compute, h2d and d2h lanes. The distributed issue adds the Ulysses all-to-all on the comm lane.
//!
//! Shapes (model dtype `T`: float, bfloat16 or half): q `[S, H, D]`, k and v `[S, H_kv, D]`, out
//! `[S, H, D]`; gradients dq `[S, H, D]`, dk and dv `[S, H_kv, D]` in fp32. Chunks of C tokens,
//! u = S / C. q/k/v come from a `chunk_source` (the trainer's projection, called per chunk) or
//! from tensors; outputs go to a `chunk_sink` or to tensors.
//!
//! Backends: copies use the backend's `copy_async`; the chunk kernel and the elementwise steps
//! (merge, finalize, zero, delta, row copies) go through `attention_step_ops<B>`
//! (layers/attention_step_ops.hpp): host tasks on `host_backend`, kernels on the lane's stream on
//! `cuda_backend` (include `<fpdt/fpdt.cuh>`, which adds that specialization). The caller's
//! sources and sinks come in two forms (see `chunk_source`): a plain form run as a host task on
//! the lane (host backend only), and a stream form called while the step is enqueued, with the
//! lane's stream, which enqueues its own work (any backend).
#pragma once

#include "../attention/chunk_kernel.hpp"
#include "../attention/host/fwd.hpp" // the default Kernel; host_defaults.hpp defines it
#include "../attention/mask.hpp"
#include "../attention/online_softmax.hpp"
#include "../backend/backend.hpp"
#include "../backend/host/fwd.hpp" // the default B, Stream; host_defaults.hpp defines them
#include "../config.hpp"
#include "attention_step_ops.hpp"
#include "../core/bfloat16.hpp"
#include "../core/half.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../memory/chunk_store.hpp"
#include "../memory/device_arena.hpp"
#include "../memory/staging_ring.hpp"
#include "../pipeline/executor.hpp"
#include "../pipeline/trace.hpp"
#include "../schedule/attention_problem.hpp"
#include "../schedule/schedule.hpp"

#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! The attention shape of a layer, in tokens and heads.
struct attention_shape {
  index_t sequence = 0; //!< S, tokens
  index_t heads = 0;    //!< H, query heads
  index_t kv_heads = 0; //!< H_kv, key/value heads (H % H_kv == 0)
  index_t head_dim = 0; //!< D
};

//! Options of an `fpdt_attention` layer.
struct fpdt_attention_options {
  index_t chunk = 0;                    //!< C, tokens per chunk (S % C == 0); 0: C = S
  bool offload = true;                  //!< offload inactive chunks to pinned host memory
  index_t ring_slots = 2;               //!< staging slots per ring (2 = double buffering)
  //! Causal or full, by global position, with an optional sliding window and documents (the
  //! layer copies the document offsets at `create`; host backend only for documents).
  attention_mask mask = causal_mask;
  std::optional<float> scale{};         //!< softmax scale; 1/sqrt(D) when empty
};

namespace detail::layer {
// Whether a callback has the stream form (see chunk_source): the layer calls that form when
// present, and a device backend needs it.
template <class S, class T, class Stream>
concept stream_form_source = requires(S const& s, index_t c, tensor_view<T, 3> const& v, Stream& st) {
  { s.produce(c, c, v, v, v, st) } -> std::same_as<status>;
};
template <class S, class T, class Stream>
concept stream_form_sink = requires(S& s, index_t c, tensor_view<T const, 3> const& o,
                                    tensor_view<float const, 2> const& l, Stream& st) {
  { s.consume(c, c, o, l, st) } -> std::same_as<status>;
};
template <class S, class T, class Stream>
concept stream_form_dout = requires(S const& s, index_t c, tensor_view<T, 3> const& v, Stream& st) {
  { s.produce_dout(c, c, v, st) } -> std::same_as<status>;
};
template <class S, class Stream>
concept stream_form_dq = requires(S& s, index_t c, tensor_view<float const, 3> const& g, Stream& st) {
  { s.consume_dq(c, c, g, st) } -> std::same_as<status>;
};
template <class S, class Stream>
concept stream_form_dkv = requires(S& s, index_t c, tensor_view<float const, 3> const& g, Stream& st) {
  { s.consume_dkv(c, c, g, g, st) } -> std::same_as<status>;
};
template <class S, class Stream>
concept stream_form_gradient_sink = stream_form_dq<S, Stream> && stream_form_dkv<S, Stream>;

} // namespace detail::layer

//! Where a layer's q, k, v chunks come from: a *const* member `produce(c, first_token, q, k, v)`
//! writes chunk `c` (tokens [first_token, first_token + C)) into the device views `q [C, H, D]`,
//! `k`, `v` `[C, H_kv, D]`, returning `status`. Called in chunk order; the layer holds the source
//! by reference for the duration of `forward`.
//!
//! Every caller callback of the layer (sources and sinks) has two forms:
//! - plain, as above: runs as a host task on the lane's worker thread, in stream order (host
//!   backend only: a CUDA stream cannot run it);
//! - stream form, with one more parameter `Stream& stream` (the backend's `stream_type`:
//!   `fpdt::cuda::stream&` on `cuda_backend`, `fpdt::host::stream&` on `host_backend`; e.g.
//!   `produce(c, first_token, q, k, v, stream)`): called on the thread that enqueues the pass,
//!   when the step is enqueued, and must enqueue its work on `stream` (CUDA: launch on
//!   `stream.native_handle()`; host: `be.launch(stream, task)`); the views stay valid for that
//!   work. Any backend. On a device backend the views are device memory (the layer's slots).
//! When a type has both, the layer calls the stream form.
template <class S, class T, class Stream = host::stream>
concept chunk_source =
    requires(S const& s, index_t c, tensor_view<T, 3> const& v) {
      { s.produce(c, c, v, v, v) } -> std::same_as<status>;
    } || detail::layer::stream_form_source<S, T, Stream>;

//! Where a layer's output chunks go: `consume(c, first_token, out, lse)` (non-const is fine)
//! receives chunk `c`'s final output `out [C, H, D]` in the model dtype and `lse [H, C]` fp32
//! (ln); the views are valid only during the call (stream form `consume(c, first_token, out, lse,
//! stream)`: for the work it enqueues on `stream`; see `chunk_source`). Passed to `forward` as an
//! lvalue reference.
template <class S, class T, class Stream = host::stream>
concept chunk_sink =
    requires(S& s, index_t c, tensor_view<T const, 3> const& o, tensor_view<float const, 2> const& l) {
      { s.consume(c, c, o, l) } -> std::same_as<status>;
    } || detail::layer::stream_form_sink<S, T, Stream>;

//! Where the gradient of a layer's output comes from in the backward: a *const* member
//! `produce_dout(c, first_token, dout)` writes chunk `c`'s `dout [C, H, D]` (model dtype), on the
//! h2d lane when the chunk is first needed (stream form `produce_dout(c, first_token, dout,
//! stream)`; see `chunk_source`).
template <class S, class T, class Stream = host::stream>
concept dout_source =
    requires(S const& s, index_t c, tensor_view<T, 3> const& v) {
      { s.produce_dout(c, c, v) } -> std::same_as<status>;
    } || detail::layer::stream_form_dout<S, T, Stream>;

//! A `dout_source` reading slices of a whole dout `[S, H, D]` tensor.
template <class T> struct tensor_dout_source {
  tensor_view<T const, 3> dout; //!< `[S, H, D]`
  //! Copies tokens [first, first + C) of dout into the chunk view.
  [[nodiscard]] status produce_dout(index_t, index_t first, tensor_view<T, 3> const& d) const {
    detail::layer::copy_rows(dout, first, d, 0, d.extent(0));
    return {};
  }
};

//! Where a layer's gradients go: `consume_dq(c, first_token, dq)` with dq `[C, H, D]` fp32 once
//! chunk c's dq is final, and `consume_dkv(c, first_token, dk, dv)` with `[C, H_kv, D]` fp32
//! (stream forms with a last `Stream& stream` parameter; see `chunk_source`). Each member may take
//! either form.
template <class S, class Stream = host::stream>
concept gradient_sink =
    (requires(S& s, index_t c, tensor_view<float const, 3> const& g) {
      { s.consume_dq(c, c, g) } -> std::same_as<status>;
    } || detail::layer::stream_form_dq<S, Stream>) &&
    (requires(S& s, index_t c, tensor_view<float const, 3> const& g) {
      { s.consume_dkv(c, c, g, g) } -> std::same_as<status>;
    } || detail::layer::stream_form_dkv<S, Stream>);

namespace detail::layer {
// A stream type no callback takes: `chunk_source<S, T, no_stream>` holds for the plain form only.
struct no_stream {};

// Which callback forms a layer calls: either (host-task backends: the stream form when present,
// else the plain one), plain only (sequence_parallel_attention on host-task backends, which calls
// them on its comm lane's worker), stream only (device backends).
enum class callback_forms { either, plain, stream };

// The layers' compile-time checks of their callbacks, one text for all of them. Checked in the
// pass rather than in a requires-clause, so a callback with neither form gets these messages
// instead of a bare "no matching function"; the instantiation context names the layer.
// Each returns whether its checks hold, so a layer can skip instantiating the calls that would
// fail after its assertion (`if constexpr`), leaving the assertion as the only message.
template <class Source, class Sink, class T, class Stream, callback_forms F>
constexpr bool check_forward_callbacks() {
  static_assert(chunk_source<Source, T, Stream>, "forward: the chunk source needs a const member produce(index_t c, index_t first_token, tensor_view<T, 3> const& q, tensor_view<T, 3> const& k, tensor_view<T, 3> const& v) returning fpdt::status, or its stream form with a last parameter B::stream_type& (fpdt::cuda::stream& on cuda_backend); this type has neither (check the parameter types and the const)");
  static_assert(chunk_sink<Sink, T, Stream>, "forward: the chunk sink needs a member consume(index_t c, index_t first_token, tensor_view<T const, 3> const& out, tensor_view<float const, 2> const& lse) returning fpdt::status, or its stream form with a last parameter B::stream_type& (fpdt::cuda::stream& on cuda_backend); this type has neither");
  static_assert(F != callback_forms::stream || stream_form_source<Source, T, Stream>,
                "forward on a device backend: the chunk source needs the stream form "
                "produce(c, first_token, q, k, v, stream) with stream a B::stream_type& "
                "(fpdt::cuda::stream& on cuda_backend); the plain form runs on host_backend only");
  static_assert(F != callback_forms::stream || stream_form_sink<Sink, T, Stream>,
                "forward on a device backend: the chunk sink needs the stream form "
                "consume(c, first_token, out, lse, stream) with stream a B::stream_type& "
                "(fpdt::cuda::stream& on cuda_backend); the plain form runs on host_backend only");
  static_assert(F != callback_forms::plain || (chunk_source<Source, T, no_stream> && chunk_sink<Sink, T, no_stream>),
                "sequence_parallel_attention::forward on a backend whose streams run host tasks: the "
                "source and sink are called on the comm lane in their plain forms "
                "produce(c, first_token, q, k, v) and consume(c, first_token, out, lse)");
  return chunk_source<Source, T, Stream> && chunk_sink<Sink, T, Stream> &&
         (F != callback_forms::stream || (stream_form_source<Source, T, Stream> && stream_form_sink<Sink, T, Stream>)) &&
         (F != callback_forms::plain || (chunk_source<Source, T, no_stream> && chunk_sink<Sink, T, no_stream>));
}
template <class Dout, class Sink, class T, class Stream, callback_forms F>
constexpr bool check_backward_callbacks() {
  static_assert(dout_source<Dout, T, Stream>, "backward: the dout source needs a const member produce_dout(index_t c, index_t first_token, tensor_view<T, 3> const& dout) returning fpdt::status, or its stream form with a last parameter B::stream_type& (fpdt::cuda::stream& on cuda_backend); this type has neither (check the parameter types and the const)");
  static_assert(gradient_sink<Sink, Stream>, "backward: the gradient sink needs members consume_dq(index_t c, index_t first_token, tensor_view<float const, 3> const& dq) and consume_dkv(index_t c, index_t first_token, tensor_view<float const, 3> const& dk, tensor_view<float const, 3> const& dv) returning fpdt::status, each plain or in its stream form with a last parameter B::stream_type& (fpdt::cuda::stream& on cuda_backend)");
  static_assert(F != callback_forms::stream || stream_form_dout<Dout, T, Stream>,
                "backward on a device backend: the dout source needs the stream form "
                "produce_dout(c, first_token, dout, stream) with stream a B::stream_type& "
                "(fpdt::cuda::stream& on cuda_backend); the plain form runs on host_backend only");
  static_assert(F != callback_forms::stream || stream_form_gradient_sink<Sink, Stream>,
                "backward on a device backend: the gradient sink needs the stream forms "
                "consume_dq(c, first_token, dq, stream) and consume_dkv(c, first_token, dk, dv, "
                "stream) with stream a B::stream_type& (fpdt::cuda::stream& on cuda_backend); the "
                "plain forms run on host_backend only");
  static_assert(F != callback_forms::plain || (dout_source<Dout, T, no_stream> && gradient_sink<Sink, no_stream>),
                "sequence_parallel_attention::backward on a backend whose streams run host tasks: "
                "the dout source and gradient sink are called in their plain forms "
                "produce_dout(c, first_token, dout), consume_dq(c, first_token, dq) and "
                "consume_dkv(c, first_token, dk, dv)");
  return dout_source<Dout, T, Stream> && gradient_sink<Sink, Stream> &&
         (F != callback_forms::stream || (stream_form_dout<Dout, T, Stream> && stream_form_gradient_sink<Sink, Stream>)) &&
         (F != callback_forms::plain || (dout_source<Dout, T, no_stream> && gradient_sink<Sink, no_stream>));
}
} // namespace detail::layer

//! A `chunk_source` reading slices of whole q `[S, H, D]`, k and v `[S, H_kv, D]` tensors.
template <class T> struct tensor_source {
  tensor_view<T const, 3> q; //!< `[S, H, D]`
  tensor_view<T const, 3> k; //!< `[S, H_kv, D]`
  tensor_view<T const, 3> v; //!< `[S, H_kv, D]`
  //! Copies tokens [first, first + C) of q, k, v into the chunk views.
  [[nodiscard]] status produce(index_t, index_t first, tensor_view<T, 3> const& qc,
                               tensor_view<T, 3> const& kc, tensor_view<T, 3> const& vc) const {
    detail::layer::copy_rows(q, first, qc, 0, qc.extent(0));
    detail::layer::copy_rows(k, first, kc, 0, kc.extent(0));
    detail::layer::copy_rows(v, first, vc, 0, vc.extent(0));
    return {};
  }
};

//! A `chunk_sink` writing into whole out `[S, H, D]` (model dtype) and, when not empty,
//! lse `[H, S]` fp32 tensors.
template <class T> struct tensor_sink {
  tensor_view<T, 3> out;         //!< `[S, H, D]`
  tensor_view<float, 2> lse{};   //!< `[H, S]`, optional
  //! Copies the chunk into rows [first, first + C).
  [[nodiscard]] status consume(index_t, index_t first, tensor_view<T const, 3> const& o,
                               tensor_view<float const, 2> const& l) {
    detail::layer::copy_rows(o, 0, out, first, o.extent(0));
    if (!lse.empty())
      for (index_t h = 0; h < l.extent(0); ++h)
        for (index_t s = 0; s < l.extent(1); ++s)
          lse(h, first + s) = l(h, s);
    return {};
  }
};

//! A `gradient_sink` writing (overwriting) fp32 dq `[S, H, D]`, dk and dv `[S, H_kv, D]`.
struct tensor_gradient_sink {
  tensor_view<float, 3> dq; //!< `[S, H, D]`
  tensor_view<float, 3> dk; //!< `[S, H_kv, D]`
  tensor_view<float, 3> dv; //!< `[S, H_kv, D]`
  //! Copies dq of one chunk into rows [first, first + C).
  [[nodiscard]] status consume_dq(index_t, index_t first, tensor_view<float const, 3> const& g) {
    detail::layer::copy_rows(g, 0, dq, first, g.extent(0));
    return {};
  }
  //! Copies dk and dv of one chunk into rows [first, first + C).
  [[nodiscard]] status consume_dkv(index_t, index_t first, tensor_view<float const, 3> const& gk,
                                   tensor_view<float const, 3> const& gv) {
    detail::layer::copy_rows(gk, 0, dk, first, gk.extent(0));
    detail::layer::copy_rows(gv, 0, dv, first, gv.extent(0));
    return {};
  }
};

namespace detail::layer {
inline constexpr std::size_t align = device_arena::granularity;
// Runs a caller's source or sink; its error, or an exception it throws, comes back as a status
// naming what failed (`what`, `chunk`), with the error code kept (exceptions:
// errc::backend_error, as an exception in any task: errc::internal is for fpdt's own bugs).
// A status already naming the same callback and chunk (an adapter of a layer built on this one,
// such as sequence_parallel_attention's, guards the same call) is passed on unchanged.
template <class F>
[[nodiscard]] status guarded(F&& f, char const* what, index_t chunk) {
  try {
    status st = f();
    if (st.ok()) return st;
    std::string const ctx = detail::concat(what, chunk, ": ");
    if (st.message().starts_with(ctx)) return st;
    return st.with_context(detail::concat(what, chunk));
  } catch (std::exception const& e) {
    return make_error(errc::backend_error, what, chunk, ": threw ", e.what());
  } catch (...) {
    return make_error(errc::backend_error, what, chunk, ": threw a non-standard exception");
  }
}

// Stream-form sources and sinks over whole tensors, for the layer's tensor overloads: their copies
// are `attention_step_ops<B>` steps on the lane's stream, so they work on every backend.
template <class T, class B> struct step_tensor_source {
  B* be;
  tensor_view<T const, 3> q, k, v;
  [[nodiscard]] status produce(index_t, index_t first, tensor_view<T, 3> const& qc,
                               tensor_view<T, 3> const& kc, tensor_view<T, 3> const& vc,
                               typename B::stream_type& s) const {
    using ops = attention_step_ops<B>;
    FPDT_TRY(ops::copy_rows(*be, s, q, first, qc, 0, qc.extent(0)));
    FPDT_TRY(ops::copy_rows(*be, s, k, first, kc, 0, kc.extent(0)));
    return ops::copy_rows(*be, s, v, first, vc, 0, vc.extent(0));
  }
};
template <class T, class B> struct step_tensor_sink {
  B* be;
  tensor_view<T, 3> out;
  tensor_view<float, 2> lse;
  [[nodiscard]] status consume(index_t, index_t first, tensor_view<T const, 3> const& o,
                               tensor_view<float const, 2> const& l, typename B::stream_type& s) {
    using ops = attention_step_ops<B>;
    FPDT_TRY(ops::copy_rows(*be, s, o, 0, out, first, o.extent(0)));
    if (lse.empty()) return {};
    return ops::copy_columns(*be, s, l, 0, lse, first, l.extent(1));
  }
};
template <class T, class B> struct step_tensor_dout_source {
  B* be;
  tensor_view<T const, 3> dout;
  [[nodiscard]] status produce_dout(index_t, index_t first, tensor_view<T, 3> const& d,
                                    typename B::stream_type& s) const {
    return attention_step_ops<B>::copy_rows(*be, s, dout, first, d, 0, d.extent(0));
  }
};
template <class B> struct step_tensor_gradient_sink {
  B* be;
  tensor_view<float, 3> dq, dk, dv;
  [[nodiscard]] status consume_dq(index_t, index_t first, tensor_view<float const, 3> const& g,
                                  typename B::stream_type& s) {
    return attention_step_ops<B>::copy_rows(*be, s, g, 0, dq, first, g.extent(0));
  }
  [[nodiscard]] status consume_dkv(index_t, index_t first, tensor_view<float const, 3> const& gk,
                                   tensor_view<float const, 3> const& gv, typename B::stream_type& s) {
    using ops = attention_step_ops<B>;
    FPDT_TRY(ops::copy_rows(*be, s, gk, 0, dk, first, gk.extent(0)));
    return ops::copy_rows(*be, s, gv, 0, dv, first, gv.extent(0));
  }
};
} // namespace detail::layer

namespace detail::layer {
// Sets a pass-scoped pointer back to null when the pass returns or throws.
template <class P> struct reset_on_exit {
  P*& p;
  reset_on_exit(P*& ptr) noexcept : p(ptr) {}
  reset_on_exit(reset_on_exit const&) = delete;
  reset_on_exit& operator=(reset_on_exit const&) = delete;
  ~reset_on_exit() { p = nullptr; }
};
// What a forward with attention sinks leaves its backward: the logits of the layer's heads, as
// they were, and where the gradient goes (the binding at the forward).
struct sink_state {
  std::vector<float> logits{}; // [H] of the layer's heads; empty: no sinks
  tensor_view<float, 1> grad{};
  index_t first_head = 0;
  bool accumulate = false;
};
// The forward's device rings (q, kv, out), kept in the context without offload.
struct forward_rings {
  staging_ring q, kv, out;
};
} // namespace detail::layer

template <class T, class B, class Kernel>
  requires chunk_kernel<Kernel, T>
class fpdt_attention;

//! How a layer's attention sinks are bound (`fpdt_attention::bind_sinks`).
struct sink_options {
  index_t first_head = 0;  //!< the layer's query heads are entries [first_head, first_head + H) of the logits
  bool accumulate = false; //!< each backward adds to grad (zero it before the first) instead of overwriting it
};

//! What a forward leaves for its backward (docs/design.md 4.3a): with offload, the pinned host
//! copies of every chunk's q, k, v, out and lse (and room for the backward's dq and dout); without,
//! the forward's device rings holding them. Move-only; empty when default-constructed.
//!
//! `fpdt_attention::forward(ctx, ...)` fills it (replacing, and first freeing, what it held) and
//! `backward(ctx, ...)` consumes it, so several forwards may be in flight at once (micro-batches,
//! pipeline-parallel schedules), each with its own context and its own memory. A context whose
//! backward already ran, one that holds no successful forward, and one made by another layer are
//! refused by `backward` with `errc::invalid_argument` (a layer destroyed and another made in its
//! place is another layer). Destroying a context frees its memory into the backend's arena and
//! pinned pool: destroy (or `clear`) every context before its backend.
class attention_context {
public:
  attention_context() noexcept = default;                           //!< empty: holds no forward
  //! Takes over the state; `other` becomes empty.
  attention_context(attention_context&& other) noexcept
      : state_(std::exchange(other.state_, state::empty)), owner_(std::move(other.owner_)),
        store_(std::move(other.store_)), rings_(std::move(other.rings_)), sink_(std::exchange(other.sink_, {})) {
    other.store_.reset();
  }
  //! Frees what it held and takes over `other`'s state; `other` becomes empty.
  attention_context& operator=(attention_context&& other) noexcept {
    if (this != &other) {
      rings_ = std::move(other.rings_);
      sink_ = std::exchange(other.sink_, {});
      store_ = std::move(other.store_);
      other.store_.reset();
      owner_ = std::move(other.owner_);
      other.owner_.reset();
      state_ = std::exchange(other.state_, state::empty);
    }
    return *this;
  }
  attention_context(attention_context const&) = delete;
  attention_context& operator=(attention_context const&) = delete;

  //! Frees what it holds; it becomes empty (as default-constructed).
  void clear() noexcept { *this = attention_context{}; }
  //! Whether it holds a successful forward whose backward has not run yet.
  [[nodiscard]] bool ready() const noexcept { return state_ == state::ready; }
  //! Pinned host bytes it holds (offload on; 0 off or empty).
  [[nodiscard]] std::size_t host_bytes() const noexcept { return store_ ? store_->host_bytes() : 0; }
  //! Device bytes it holds between the passes (the forward's rings without offload; 0 with).
  [[nodiscard]] std::size_t device_bytes() const noexcept {
    auto b = [](staging_ring const& r) { return static_cast<std::size_t>(r.size()) * r.slot_bytes(); };
    return b(rings_.q) + b(rings_.kv) + b(rings_.out);
  }

private:
  template <class T, class B, class Kernel>
    requires chunk_kernel<Kernel, T>
  friend class fpdt_attention;
  enum class state : std::uint8_t { empty, ready, used };
  state state_ = state::empty;
  // The identity of the layer whose forward filled it: a weak reference to that layer's token, so a
  // layer made later at the same address (or with a token at the same address) never matches.
  std::weak_ptr<std::byte const> owner_{};
  std::optional<chunk_store> store_{};
  detail::layer::forward_rings rings_{};
  detail::layer::sink_state sink_{}; // the forward's attention sinks (bind_sinks)
};

//! FPDT attention on one rank (see the file comment).
//!
//! \tparam T      model dtype: float, bfloat16 or half
//! \tparam B      backend with an `attention_step_ops<B>` specialization: `host_backend`, or
//!                `cuda_backend` with `<fpdt/fpdt.cuh>` included
//! \tparam Kernel chunk kernel modelling `chunk_kernel<Kernel, T>` (default: the host kernel); on
//!                `cuda_backend` a CUDA kernel with a `cudaStream_t stream` member, which the layer
//!                sets to the compute lane's stream (`cuda_flash_chunk_kernel`,
//!                `cuda_reference_chunk_kernel`, `external_chunk_kernel<Impl>`)
//!
//! Between `forward` and `backward` the pinned host copies of q, k, v, out and lse (offload on; the
//! backward adds dq and dout, reserved by the forward) or the device rings holding them (offload
//! off) live in an `attention_context`: the caller's (the context forms) or the layer's own saved
//! one. Not thread-safe: one pass at a time per layer object, and per set of shared lanes. Every pass allocates its buffers before its first step, so an
//! out-of-memory error leaves the caller's tensors untouched. On a device backend the tensor
//! overloads take views of memory the device can address (device, pinned or managed; pageable
//! host memory is `errc::invalid_argument` on CUDA). The lanes are the layer's own non-blocking
//! streams, or the caller's (`run_on`): work that writes the inputs (on any stream) must be
//! complete before a pass starts; each pass returns after its lanes have finished.
template <class T, class B = host_backend, class Kernel = host_chunk_kernel>
  requires chunk_kernel<Kernel, T>
class fpdt_attention {
  static_assert(kernel_with_workspace<Kernel> || !requires(Kernel const& k, chunk_pair_shape const& sh) { k.workspace_bytes(sh); },
                "fpdt_attention: the chunk kernel has workspace_bytes(chunk_pair_shape) but does not model "
                "kernel_with_workspace (workspace_bytes must be const and noexcept, returning a size, and "
                "the kernel needs a settable `std::span<std::byte> workspace` member)");
  using ops = attention_step_ops<B>;
  using stream_t = typename B::stream_type;
  // Whether the backend's step ops have the attention sink forms (bind_sinks).
  static constexpr bool has_sink_ops =
      requires(B& be, stream_t& s, partial_view const& acc, tensor_view<T, 3> const& o, tensor_view<float, 2> const& l,
               tensor_view<float const, 2> const& c, float const* p, double* g) {
        ops::finalize(be, s, acc, o, l, p);
        ops::sink_gradient(be, s, c, c, p, g);
      };
  static constexpr auto forms =
      runs_host_tasks_in_order<B> ? detail::layer::callback_forms::either : detail::layer::callback_forms::stream;

public:
  //! `create` proves schedules of at most this many steps with `check_schedule` (u <= ~100).
  static constexpr std::size_t max_checked_steps = 40000;

  //! Tensors the layer keeps on the host per chunk, indexing its `chunk_store`.
  enum host_tensor : std::size_t { host_q, host_k, host_v, host_out, host_lse, host_dq, host_dout, host_tensors };
  static_assert(attention_problem::host_tensors.size() == host_tensors &&
                    attention_problem::host_tensors[host_q] == chunk_tensor::q &&
                    attention_problem::host_tensors[host_k] == chunk_tensor::k &&
                    attention_problem::host_tensors[host_v] == chunk_tensor::v &&
                    attention_problem::host_tensors[host_out] == chunk_tensor::out &&
                    attention_problem::host_tensors[host_lse] == chunk_tensor::lse &&
                    attention_problem::host_tensors[host_dq] == chunk_tensor::dq &&
                    attention_problem::host_tensors[host_dout] == chunk_tensor::dout,
                "host_tensor indexes the chunk store, which is built from attention_problem::host_tensors");

  //! Checks the shape and options and builds (and checks) both schedules; allocates nothing.
  //! Errors: `errc::invalid_argument` / `errc::shape_mismatch` naming the numbers and the rule
  //! (`attention_problem::create` with P = 1: S, H, H_kv, D >= 1; H % H_kv == 0; S % C == 0;
  //! ring_slots in [2, 64]; u = S / C <= 2^20; the softmax scale finite).
  [[nodiscard]] static result<fpdt_attention> create(B& be, attention_shape shape,
                                                     fpdt_attention_options const& options = {},
                                                     Kernel kernel = {}) {
    auto problem = attention_problem::create({shape.sequence, 1, options.chunk, shape.heads,
                                              shape.kv_heads, shape.head_dim, dtype_of<T>, options.mask,
                                              options.offload, options.ring_slots},
                                             "fpdt_attention");
    if (!problem) return problem.error();
    if (status st = check_scale(options.scale); !st.ok()) return st;
    if constexpr (!runs_host_tasks_in_order<B>)
      if (options.mask.documents > 0)
        return make_error(errc::not_supported, "fpdt_attention: document masks (", to_string(options.mask),
                          ") run on the host backend only for now: the kernels read the offsets where "
                          "they run, and this layer does not copy them to the device yet");
    fpdt_attention layer(be, *problem, options, std::move(kernel));
    FPDT_TRY(layer.build_schedules());
    return result<fpdt_attention>(std::move(layer));
  }

  fpdt_attention(fpdt_attention&&) noexcept = default; //!< moves the layer and its saved state
  //! Replaces this layer (and frees its buffers) with `other`.
  fpdt_attention& operator=(fpdt_attention&&) noexcept = default;

  //! Forward over all chunks: q, k, v from `source`, each chunk's output to `sink`.
  //! Errors: the arena's or pool's `errc::out_of_memory` (before any step runs); errors of the
  //! source, kernel or sink with their code, the step named ("chunk source, chunk 2: ...",
  //! "chunk kernel forward at q_offset 32, k_offset 16: ..."); an exception any of them throws
  //! as `errc::backend_error`, named the same way.
  //! This form keeps what the backward needs inside the layer (one saved forward: the next
  //! forward without a context replaces it, and `backward` without a context differentiates the
  //! latest such forward); the
  //! context form below hands it to the caller instead.
  template <class Source, class Sink>
  [[nodiscard]] status forward(Source const& source, Sink& sink) {
    return forward(saved_, source, sink);
  }

  //! Forward as above, leaving what the backward needs in `ctx` (whatever it held is freed
  //! first; on error it is left empty). Errors: as above.
  template <class Source, class Sink>
  [[nodiscard]] status forward(attention_context& ctx, Source const& source, Sink& sink) {
    if constexpr (!detail::layer::check_forward_callbacks<Source, Sink, T, stream_t, forms>())
      return make_error(errc::internal, "rejected at compile time");
    else
      return run_forward(ctx, source, sink);
  }

private:
  template <class Source, class Sink>
  [[nodiscard]] status run_forward(attention_context& ctx, Source const& source, Sink& sink) {
    ctx = attention_context{}; // frees the previous forward's state before this one allocates
    FPDT_TRY(make_executor()); // before any buffer, so a failure here leaves nothing allocated
    FPDT_TRY(take_sinks(ctx));
    ctx.store_.emplace(be_->pinned_memory(), prob_.chunks(), host_tensor_bytes(prob_), host_tensor_names());
    cx_ = &ctx;
    detail::layer::reset_on_exit pass_scope{cx_};
    if (status st = prepare_forward(); !st.ok()) {
      ctx = attention_context{};
      fwd_fixed_ = {};
      release_workspace();
      std::string const pinned =
          opt_.offload ? detail::concat(" and ", host_bytes_reserved(),
                                        " pinned host bytes as the pool reserves them (host_bytes_reserved(); ",
                                        "host_bytes_needed() = ", host_bytes_needed(),
                                        " before rounding to 4096-byte pages)")
                       : std::string();
      return st.with_context(detail::concat("fpdt_attention forward needs ", predicted_forward_bytes(),
                                            " device bytes (predicted_forward_bytes())", pinned, "; ", remedy()));
    }
    auto work = [&](schedule_step const& st, std::size_t, typename B::stream_type& s) {
      return forward_step(st, s, source, sink);
    };
    status st = lanes().run(fwd_, work, &trace_);
    ctx.store_->settle(chunk_place::in_flight, chunk_place::host);
    // The accumulators are done; with offload the rings are too (the host copies are the state).
    fwd_fixed_ = {};
    release_workspace();
    if (opt_.offload) ctx.rings_ = {};
    if (!st.ok()) {
      ctx = attention_context{};
      return st;
    }
    ctx.state_ = attention_context::state::ready;
    ctx.owner_ = id_;
    return {};
  }

public:
  //! Forward from whole tensors: q `[S, H, D]`, k and v `[S, H_kv, D]` into out `[S, H, D]` and,
  //! when given, lse `[H, S]`. out and lse must not share memory with q, k, v or each other
  //! (`views_overlap`; not even out = q in place). Errors: `errc::shape_mismatch` naming the
  //! shapes; `errc::invalid_argument` naming two views that overlap; as above. The state for the
  //! backward stays in the layer (see `forward(source, sink)`).
  [[nodiscard]] status forward(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                               tensor_view<T const, 3> const& v, tensor_view<T, 3> const& out,
                               tensor_view<float, 2> const& lse = {}) {
    return forward(saved_, q, k, v, out, lse);
  }

  //! Forward from whole tensors as above, the state for the backward left in `ctx`.
  [[nodiscard]] status forward(attention_context& ctx, tensor_view<T const, 3> const& q,
                               tensor_view<T const, 3> const& k, tensor_view<T const, 3> const& v,
                               tensor_view<T, 3> const& out, tensor_view<float, 2> const& lse = {}) {
    FPDT_TRY(check_shape("q", q.extents(), prob_.local_heads()));
    FPDT_TRY(check_shape("k", k.extents(), prob_.local_kv_heads()));
    FPDT_TRY(check_shape("v", v.extents(), prob_.local_kv_heads()));
    FPDT_TRY(check_shape("out", out.extents(), prob_.local_heads()));
    if (!lse.empty() && (lse.extent(0) != prob_.local_heads() || lse.extent(1) != prob_.sequence()))
      return make_error(errc::shape_mismatch, "fpdt_attention forward: lse ",
                        detail::shape_string(lse.extents()), " must be [H, S] = [", prob_.local_heads(),
                        ", ", prob_.sequence(), "]");
    FPDT_TRY(detail::check_no_alias("fpdt_attention forward", {detail::range_of("out", out), detail::range_of("lse", lse)},
                                    {detail::range_of("q", q), detail::range_of("k", k), detail::range_of("v", v)}));
    detail::layer::step_tensor_source<T, B> src{be_, q, k, v};
    detail::layer::step_tensor_sink<T, B> snk{be_, out, lse};
    return forward(ctx, src, snk);
  }

  //! Backward of the forward saved in the layer (`forward` without a context): dout chunks from
  //! `dout`, gradients to `sink`; it may run again on the same saved forward. Errors:
  //! `errc::invalid_argument` when no successful forward precedes it; `errc::out_of_memory`
  //! before any step runs (naming the bytes the pass needs); errors of the dout source, kernel or
  //! sink, naming the step.
  template <class Dout, class Sink>
  [[nodiscard]] status backward(Dout const& dout, Sink& sink) {
    return backward_of(saved_, false, dout, sink);
  }

  //! Backward of the forward held by `ctx`, which it consumes once the pass has started (its
  //! memory is freed at the end, whatever the outcome). Argument errors and an out-of-memory
  //! error before the first step leave `ctx` untouched, so the backward can be retried (with a
  //! larger budget, say). Errors: as above, and `errc::invalid_argument` for a context that holds
  //! no successful forward (`fpdt::attention_context{}`: pass the one the forward filled), whose
  //! backward already ran, or that another (or a destroyed) layer's forward filled.
  template <class Dout, class Sink>
  [[nodiscard]] status backward(attention_context& ctx, Dout const& dout, Sink& sink) {
    return backward_of(ctx, true, dout, sink);
  }

  //! Backward from a whole dout `[S, H, D]` tensor, gradients to `sink`. Errors: as above, and
  //! `errc::shape_mismatch` naming dout's shape.
  template <class Sink>
    requires gradient_sink<Sink, stream_t>
  [[nodiscard]] status backward(tensor_view<T const, 3> const& dout, Sink& sink) {
    return backward_tensor(saved_, false, dout, sink);
  }
  //! As above, for the forward held by `ctx` (consumed).
  template <class Sink>
    requires gradient_sink<Sink, stream_t>
  [[nodiscard]] status backward(attention_context& ctx, tensor_view<T const, 3> const& dout, Sink& sink) {
    return backward_tensor(ctx, true, dout, sink);
  }

  //! Backward into fp32 tensors dq `[S, H, D]`, dk and dv `[S, H_kv, D]` (overwritten), which
  //! must not share memory with dout or each other. Errors: as above, and
  //! `errc::invalid_argument` naming two views that overlap.
  [[nodiscard]] status backward(tensor_view<T const, 3> const& dout, tensor_view<float, 3> const& dq,
                                tensor_view<float, 3> const& dk, tensor_view<float, 3> const& dv) {
    return backward_tensors(saved_, false, dout, dq, dk, dv);
  }
  //! As above, for the forward held by `ctx` (consumed).
  [[nodiscard]] status backward(attention_context& ctx, tensor_view<T const, 3> const& dout,
                                tensor_view<float, 3> const& dq, tensor_view<float, 3> const& dk,
                                tensor_view<float, 3> const& dv) {
    return backward_tensors(ctx, true, dout, dq, dk, dv);
  }

private:
  [[nodiscard]] executor<B>& lanes() noexcept { return lanes_ ? *lanes_ : *ex_; }

public:
  //! Whether `ctx` holds a forward of this layer whose backward has not run (what `backward(ctx,
  //! ...)` accepts).
  [[nodiscard]] bool owns(attention_context const& ctx) const noexcept {
    return ctx.ready() && ctx.owner_.lock() == id_;
  }

private:

  [[nodiscard]] status check_context(attention_context const& ctx) const {
    using st = attention_context::state;
    if (ctx.state_ == st::used)
      return make_error(errc::invalid_argument, "fpdt_attention backward: this context's backward already ran "
                                                "(a context is used once; run forward again)");
    if (ctx.state_ != st::ready)
      return make_error(errc::invalid_argument,
                        "fpdt_attention backward: no successful forward to differentiate (the context "
                        "holds none: pass the one its forward filled)");
    if (!owns(ctx))
      return make_error(errc::invalid_argument,
                        "fpdt_attention backward: the context was filled by another layer's forward "
                        "(or by a layer since destroyed)");
    return {};
  }
  template <class Dout, class Sink>
  [[nodiscard]] status backward_of(attention_context& ctx, bool consume, Dout const& dout, Sink& sink) {
    if constexpr (!detail::layer::check_backward_callbacks<Dout, Sink, T, stream_t, forms>())
      return make_error(errc::internal, "rejected at compile time");
    else {
      FPDT_TRY(check_context(ctx));
      bool started = false;
      status const st = run_backward(ctx, dout, sink, started);
      if (consume && started) {
        ctx = attention_context{};
        ctx.state_ = attention_context::state::used;
      }
      return st;
    }
  }
  template <class Sink>
  [[nodiscard]] status backward_tensor(attention_context& ctx, bool consume, tensor_view<T const, 3> const& dout,
                                       Sink& sink) {
    FPDT_TRY(check_context(ctx));
    FPDT_TRY(check_shape("dout", dout.extents(), prob_.local_heads()));
    detail::layer::step_tensor_dout_source<T, B> src{be_, dout};
    return backward_of(ctx, consume, src, sink);
  }
  [[nodiscard]] status backward_tensors(attention_context& ctx, bool consume, tensor_view<T const, 3> const& dout,
                                        tensor_view<float, 3> const& dq, tensor_view<float, 3> const& dk,
                                        tensor_view<float, 3> const& dv) {
    FPDT_TRY(check_shape("dq", dq.extents(), prob_.local_heads()));
    FPDT_TRY(check_shape("dk", dk.extents(), prob_.local_kv_heads()));
    FPDT_TRY(check_shape("dv", dv.extents(), prob_.local_kv_heads()));
    FPDT_TRY(detail::check_no_alias("fpdt_attention backward",
                                    {detail::range_of("dq", dq), detail::range_of("dk", dk), detail::range_of("dv", dv)},
                                    {detail::range_of("dout", dout)}));
    detail::layer::step_tensor_gradient_sink<B> snk{be_, dq, dk, dv};
    return backward_tensor(ctx, consume, dout, snk);
  }
  template <class Dout, class Sink>
  [[nodiscard]] status run_backward(attention_context& ctx, Dout const& dout, Sink& sink, bool& started) {
    FPDT_TRY(make_executor());
    cx_ = &ctx;
    detail::layer::reset_on_exit pass_scope{cx_};
    if (status st = prepare_backward(); !st.ok()) {
      bwd_rings_ = {};
      bwd_fixed_ = {};
      release_workspace();
      return st.with_context(detail::concat(
          "fpdt_attention backward needs ", predicted_backward_bytes(), " device bytes (",
          "predicted_backward_bytes()); ", remedy()));
    }
    auto work = [&](schedule_step const& st, std::size_t, typename B::stream_type& s) {
      return backward_step(st, s, dout, sink);
    };
    started = true;
    sink_acc_.assign(ctx.sink_.logits.size(), 0.0);
    sink_taken_.assign(static_cast<std::size_t>(chunks()), 0);
    status st = lanes().run(bwd_, work, &trace_);
    ctx.store_->settle(chunk_place::in_flight, chunk_place::host);
    bwd_rings_ = {};
    bwd_fixed_ = {};
    release_workspace();
    if (st.ok()) write_sink_grad(ctx.sink_);
    return st;
  }

public:
  //! Runs this layer's passes on `lanes`, the caller's set of streams (one per lane; `executor<B>`
  //! on the same backend), instead of streams of its own: any number of layers may share one set,
  //! so a model's streams (host: worker threads) do not grow with its layer count. The caller keeps
  //! `lanes` alive (and in place) while the layer uses it. Call it between passes, best before the
  //! first (which otherwise makes streams of the layer's own: `run_on` releases them); a pass still
  //! waits for the lanes before it returns. Layers sharing lanes must not run passes concurrently (from several threads): the
  //! executor is not thread-safe.
  void run_on(executor<B>& lanes) noexcept {
    lanes_ = &lanes;
    ex_.reset(); // streams the layer made for earlier passes are released
  }

  //! Replaces the layer's mask, for a batch packed with other documents (or another window),
  //! keeping its lanes, kernel, options and sink binding: the mask is checked as `create` checks it
  //! (the offsets copied, and checked against S) and both schedules are rebuilt; no buffer is
  //! allocated. Every context filled before (and the saved forward) belongs to the old mask, so
  //! `backward` refuses it as another layer's: run the backwards of earlier forwards first (with
  //! micro-batches of different documents in flight at once, use a layer per micro-batch). Errors:
  //! those of `create` for the mask (`errc::invalid_argument` naming the values; documents on a
  //! device backend: `errc::not_supported`); `errc::invalid_argument` during a pass (from a
  //! source or sink); on error the layer is unchanged.
  [[nodiscard]] status set_mask(attention_mask const& mask) {
    if (cx_ != nullptr)
      return make_error(errc::invalid_argument, "fpdt_attention set_mask: called during a pass (from a source or sink)");
    attention_problem_args a = prob_.args();
    a.mask = mask;
    auto problem = attention_problem::create(a, "fpdt_attention set_mask");
    if (!problem) return problem.error();
    if constexpr (!runs_host_tasks_in_order<B>)
      if (mask.documents > 0)
        return make_error(errc::not_supported, "fpdt_attention set_mask: document masks (", to_string(mask),
                          ") run on the host backend only for now");
    attention_problem old = std::exchange(prob_, std::move(*problem));
    if (status st = build_schedules(); !st.ok()) { // replaces fwd_, bwd_ only on success
      prob_ = std::move(old);
      return st;
    }
    opt_.mask = prob_.mask();
    saved_ = attention_context{};
    trace_ = {}; // it indexed the old schedules
    id_ = std::make_shared<std::byte const>(); // contexts of the old mask are another layer's now
    return {};
  }

  //! Attention sinks (GPT-OSS's learnable per-head sink; docs/design.md 3.4a): one logit per query
  //! head that enters each row's softmax denominator once, as a key of value 0, however many chunk
  //! pairs the row's keys span: lse = log(exp(sink_h) + sum over visible keys of exp(score)), and
  //! out = sum of p v with the sink's share p_sink = exp(sink_h - lse) left out. A row that sees no
  //! key gives out 0 and lse = sink_h. The lse the layer returns includes the sink.
  //!
  //! `logits` fp32, in host memory: entries [first_head, first_head + H) are this layer's query
  //! heads' (first_head = 0 and H entries for a layer of its own). Every later forward copies them
  //! into its context (so its backward uses the same values) and records `grad` and the options;
  //! that backward, when it succeeds, writes dL/dsink_h = -sum over rows of p_sink delta (delta =
  //! rowsum(dout * out), summed in fp64 in chunk order) into entries [first_head, first_head + H)
  //! of the grad recorded at its forward, and 0 into the other entries, or with `accumulate` adds
  //! to those entries and leaves the others (micro-batches, several contexts in flight: zero grad
  //! before the first). A failed backward leaves grad unchanged; a forward without sinks bound
  //! writes no grad. The caller keeps both alive while bound and until the backwards of the
  //! forwards that recorded them; an empty `logits` unbinds. A logit may be -inf (no sink for that
  //! head), never NaN or +inf: the forward refuses those with `errc::invalid_argument` naming the
  //! head. Errors: `errc::shape_mismatch` naming extents that differ or do not hold the heads;
  //! `errc::invalid_argument` when grad overlaps logits; `errc::not_supported` on a backend whose
  //! step ops have no sink forms (cuda_backend, for now).
  [[nodiscard]] status bind_sinks(tensor_view<float const, 1> const& logits, tensor_view<float, 1> const& grad = {},
                                  sink_options const& options = {}) {
    if (logits.empty()) {
      sink_ = {};
      return {};
    }
    if constexpr (!has_sink_ops)
      return make_error(errc::not_supported, "fpdt_attention bind_sinks: this backend's attention_step_ops have no "
                                             "finalize(..., sinks) and sink_gradient (host-task backends have them)");
    index_t const h = prob_.local_heads(), n = logits.extent(0);
    if (options.first_head < 0 || options.first_head + h > n || (!grad.empty() && grad.extent(0) != n))
      return make_error(errc::shape_mismatch, "fpdt_attention bind_sinks: logits [", n, "] and grad [", grad.extent(0),
                        "] must be the same length (grad may be empty) and hold this layer's H = ", h,
                        " heads from first_head = ", options.first_head, ", one sink per query head");
    FPDT_TRY(detail::check_no_alias("fpdt_attention bind_sinks", {detail::range_of("grad", grad)},
                                    {detail::range_of("logits", logits)}));
    sink_ = {logits, grad, options.first_head, options.accumulate};
    return {};
  }

  //! The forward schedule.
  [[nodiscard]] schedule const& forward_plan() const noexcept { return fwd_; }
  //! The backward schedule.
  [[nodiscard]] schedule const& backward_plan() const noexcept { return bwd_; }
  //! Device bytes the forward's buffers take (the schedule's rings plus the accumulators, and
  //! the chunk kernel's workspace when it asks for one: `kernel_with_workspace`), at the arena's
  //! granularity: the arena's peak during a forward.
  [[nodiscard]] std::size_t predicted_forward_bytes() const noexcept {
    return prob_.forward_device_bytes(workspace_bytes(false));
  }
  //! Device bytes the backward's buffers take (plus, without offload, the forward's rings that
  //! stay resident, and the kernel's workspace as for the forward): the arena's peak during a
  //! backward with one forward in flight. Without offload every other context in flight holds
  //! its own forward's rings besides (`attention_context::device_bytes`).
  [[nodiscard]] std::size_t predicted_backward_bytes() const noexcept {
    return prob_.backward_device_bytes(workspace_bytes(true));
  }
  //! Pinned host bytes a forward with offload needs for the chunks it keeps (q, k, v, out, lse,
  //! and the backward's dq and dout), before the pool's rounding; 0 without offload.
  [[nodiscard]] std::size_t host_bytes_needed() const noexcept {
    return prob_.host_bytes_needed();
  }
  //! Pinned host bytes the pool reserves for those copies: `host_bytes_needed()` with each
  //! chunk's copy of each tensor rounded up to `pinned_pool::granularity` (4096 bytes). This is
  //! what a `pinned_limit_bytes` must leave room for; it exceeds `host_bytes_needed()` noticeably
  //! only when a chunk's copies are small next to 4 KiB. 0 without offload.
  [[nodiscard]] std::size_t host_bytes_reserved() const noexcept {
    return prob_.host_bytes_reserved();
  }
  //! The trace of the last pass (forward or backward: each pass replaces it).
  [[nodiscard]] pipeline_trace const& trace() const noexcept { return trace_; }
  //! On backends that time steps with events (`times_steps_with_events`, such as CUDA): the
  //! event the trace's times are measured from, recorded on the compute lane when a pass starts
  //! (its first step waits for it); null before the first pass and on other backends. A caller
  //! that runs work of its own on another stream during a pass can wait for it and time that
  //! work from it, on the trace's clock (`sequence_parallel_attention`'s comm lane does).
  [[nodiscard]] typename B::event_type const* trace_start_event() const noexcept {
    return lanes_ ? lanes_->timing_start() : ex_ ? ex_->timing_start() : nullptr;
  }
  //! Pinned host bytes of the forward the layer keeps itself (the forms without a context; a
  //! caller's context reports its own, `attention_context::host_bytes`).
  [[nodiscard]] std::size_t host_bytes() const noexcept { return saved_.host_bytes(); }
  //! Tokens per chunk, C.
  [[nodiscard]] index_t chunk() const noexcept { return prob_.chunk(); }
  //! The options the layer was created with (`chunk` as given: 0 means C = S, see `chunk()`).
  [[nodiscard]] fpdt_attention_options const& options() const noexcept { return opt_; }
  //! The softmax scale the kernel applies (`resolve_scale`): `options().scale`, or
  //! 1.0f / std::sqrt(float(D)) when that is empty.
  [[nodiscard]] float softmax_scale() const noexcept { return resolve_scale(opt_.scale, prob_.head_dim()); }
  //! Number of chunks, u.
  [[nodiscard]] index_t chunks() const noexcept { return prob_.chunks(); }
  //! The attention problem of this rank (P = 1): shapes, per-chunk tensors, slot layouts, bytes.
  [[nodiscard]] attention_problem const& problem() const noexcept { return prob_; }

private:
  fpdt_attention(B& be, attention_problem const& problem, fpdt_attention_options const& o, Kernel k)
      : be_(&be), prob_(problem), opt_(o), kernel_(std::move(k)),
        id_(std::make_shared<std::byte const>()) {
    opt_.mask = prob_.mask(); // document offsets: the problem's copy, not the caller's
  }

  // The chunk store's tensors: the problem's `host_tensors`, in its order (= enum host_tensor).
  [[nodiscard]] static std::vector<std::size_t> host_tensor_bytes(attention_problem const& p) {
    std::vector<std::size_t> b;
    for (chunk_tensor t : attention_problem::host_tensors) b.push_back(p.bytes(t));
    return b;
  }
  [[nodiscard]] static std::vector<std::string> host_tensor_names() {
    std::vector<std::string> n;
    for (chunk_tensor t : attention_problem::host_tensors) n.emplace_back(to_string(t));
    return n;
  }
  // Bytes of chunk tensor t, and its offset in a slot of kind k.
  [[nodiscard]] std::size_t bytes(chunk_tensor t) const noexcept { return prob_.bytes(t); }
  [[nodiscard]] std::size_t at(slot_kind k, chunk_tensor t) const noexcept { return prob_.slot(k).at(t); }
  // What to change after an out-of-memory error (offload is only advised when it is off).
  [[nodiscard]] char const* remedy() const noexcept {
    return opt_.offload ? "raise the budget that was exceeded; a smaller chunk C lowers the device bytes, but "
                          "not the pinned ones, which hold all S tokens"
                        : "raise the budget, use a smaller chunk C, or turn offload on";
  }
  // Bytes of the chunk kernel's workspace for the forward or the backward (kernel_with_workspace;
  // 0 without one), and what they take in the arena.
  [[nodiscard]] std::size_t workspace_bytes(bool backward) const noexcept {
    if constexpr (kernel_with_workspace<Kernel>)
      return kernel_.workspace_bytes(
          chunk_pair_shape{prob_.chunk(), prob_.chunk(), prob_.local_heads(), prob_.local_kv_heads(),
                           prob_.head_dim(), backward});
    else
      return 0;
  }
  // Takes the pass's kernel workspace from the arena and hands it to the kernel (nothing without
  // one). Called after the pass's other buffers; prepare_* released the previous pass's first.
  [[nodiscard]] status acquire_workspace(device_arena& arena, bool backward) {
    if constexpr (kernel_with_workspace<Kernel>) {
      std::size_t const b = workspace_bytes(backward);
      if (b == 0) return {};
      auto w = staging_ring::create(arena, 1, b, "fpdt_attention chunk kernel workspace");
      if (!w) return w.error();
      workspace_ = std::move(*w);
      kernel_.workspace = std::span<std::byte>(workspace_.slot(0), b);
    }
    return {};
  }
  void release_workspace() noexcept {
    if constexpr (kernel_with_workspace<Kernel>) kernel_.workspace = {};
    workspace_ = {};
  }

  // The lanes' streams: the caller's (run_on), or the layer's own, made on the first pass and
  // kept for the next ones.
  [[nodiscard]] status make_executor() {
    if (lanes_ || ex_) return {};
    auto ex = executor<B>::create(*be_);
    if (!ex) return ex.error();
    ex_.emplace(std::move(*ex));
    return {};
  }

  // Out of line of create(): GCC 12 reports a false maybe-uninitialized on std::optional's payload
  // when the check is inlined into a caller that builds the options in place (GCC PR 80635).
#if defined(__GNUC__) && !defined(__clang__)
  [[gnu::noinline]]
#endif
  [[nodiscard]] static status check_scale(std::optional<float> const& scale) {
    if (scale.has_value() && !std::isfinite(scale.value()))
      return make_error(errc::invalid_argument, "fpdt_attention: softmax scale ", scale.value(),
                        " is not finite");
    return {};
  }
  [[nodiscard]] status check_shape(char const* name, std::array<index_t, 3> const& e, index_t heads) const {
    if (e[0] != prob_.sequence() || e[1] != heads || e[2] != prob_.head_dim())
      return make_error(errc::shape_mismatch, "fpdt_attention: ", name, " ",
                        detail::shape_string(e), " must be [", prob_.sequence(), ", ", heads, ", ",
                        prob_.head_dim(), "]");
    return {};
  }

  [[nodiscard]] status build_schedules() {
    auto f = prob_.forward_schedule();
    if (!f) return f.error();
    auto b = prob_.backward_schedule();
    if (!b) return b.error();
    // check_schedule's happens-before closure is quadratic in the step count (and the steps grow
    // as u^2): check what is cheap to check here; the same builders are checked for u up to 16 in
    // the tests, and larger schedules are built by the same loops.
    if (f->steps.size() <= max_checked_steps)
      FPDT_TRY(check_schedule(*f).with_context("fpdt_attention forward schedule"));
    if (b->steps.size() <= max_checked_steps)
      FPDT_TRY(check_schedule(*b).with_context("fpdt_attention backward schedule"));
    fwd_ = std::move(*f);
    bwd_ = std::move(*b);
    return {};
  }

  // ---- forward ------------------------------------------------------------------------------
  using fwd_rings = detail::layer::forward_rings;

  [[nodiscard]] status prepare_forward() {
    device_arena& arena = be_->device_memory();
    release_workspace();
    fwd_fixed_ = {};
    bwd_rings_ = {};
    bwd_fixed_ = {};
    auto const& rs = fwd_.ring_size;
    auto q = staging_ring::create(arena, rs[0], fwd_.params.bytes.q, "fpdt_attention forward q ring");
    if (!q) return q.error();
    auto kv = staging_ring::create(arena, rs[1], fwd_.params.bytes.kv, "fpdt_attention forward kv ring");
    if (!kv) return kv.error();
    auto out = staging_ring::create(arena, rs[2], fwd_.params.bytes.out, "fpdt_attention forward out ring");
    if (!out) return out.error();
    auto acc = staging_ring::create(arena, 2, prob_.slot(slot_kind::forward_acc).bytes,
                                    "fpdt_attention accumulator and partial");
    if (!acc) return acc.error();
    FPDT_TRY(acquire_workspace(arena, false));
    if (opt_.offload) {
      FPDT_TRY(cx_->store_->acquire_all());
    }
    cx_->rings_ = {std::move(*q), std::move(*kv), std::move(*out)};
    fwd_fixed_ = std::move(*acc);
    return {};
  }

  // Views into a q-ring slot / kv-ring slot / out slot / accumulator of the forward.
  [[nodiscard]] tensor_view<T, 3> q_view(std::byte* base) const {
    return contiguous_view(reinterpret_cast<T*>(base),
                           std::array<index_t, 3>{chunk(), prob_.local_heads(), prob_.head_dim()}).value();
  }
  [[nodiscard]] tensor_view<T, 3> kv_view(std::byte* base, int which) const {
    std::size_t const off = at(slot_kind::forward_kv, which == 0 ? chunk_tensor::k : chunk_tensor::v);
    return contiguous_view(reinterpret_cast<T*>(base + off),
                           std::array<index_t, 3>{chunk(), prob_.local_kv_heads(), prob_.head_dim()}).value();
  }
  [[nodiscard]] tensor_view<float, 2> lse_view(std::byte* base) const {
    return contiguous_view(reinterpret_cast<float*>(base), std::array<index_t, 2>{prob_.local_heads(), chunk()}).value();
  }
  [[nodiscard]] partial_view acc_view(index_t which) const {
    std::byte* base = fwd_fixed_.slot(which);
    return {contiguous_view(reinterpret_cast<float*>(base),
                            std::array<index_t, 3>{chunk(), prob_.local_heads(), prob_.head_dim()}).value(),
            lse_view(base + at(slot_kind::forward_acc, chunk_tensor::acc_lse))};
  }

  // A caller's plain-form callback as a host task on lane `s` (the host backend only).
  template <class F> [[nodiscard]] status host_task(typename B::stream_type& s, F&& f) {
    static_assert(runs_host_tasks_in_order<B>,
                  "fpdt_attention: a source or sink in the plain form runs as a host task, which "
                  "only host_backend's streams can run; give it the stream form (a last "
                  "parameter B::stream_type&, see chunk_source) for this backend");
    return be_->launch(s, std::forward<F>(f));
  }
  [[nodiscard]] status copy(void* dst, void const* src, std::size_t bytes, typename B::stream_type& s) {
    return be_->copy_async(dst, src, bytes, s);
  }

  template <class Source, class Sink>
  [[nodiscard]] status forward_step(schedule_step const& st, typename B::stream_type& s,
                                    Source const& source, Sink& sink) {
    std::size_t const qb = bytes(chunk_tensor::q), kvb = bytes(chunk_tensor::k), lb = bytes(chunk_tensor::lse);
    std::size_t const v_at = at(slot_kind::forward_kv, chunk_tensor::v), lse_at = at(slot_kind::forward_out, chunk_tensor::lse),
                      out_at = at(slot_kind::forward_out, chunk_tensor::out);
    auto slot = [&](ring r) { return st.slot_of(r); };
    switch (st.kind) {
    case step_kind::produce: {
      auto qv = q_view(cx_->rings_.q.slot(slot(ring::q)));
      std::byte* kvs = cx_->rings_.kv.slot(slot(ring::kv));
      auto kv = kv_view(kvs, 0), vv = kv_view(kvs, 1);
      index_t const c = st.i;
      if constexpr (detail::layer::stream_form_source<Source, T, stream_t>)
        return detail::layer::guarded([&] { return source.produce(c, c * chunk(), qv, kv, vv, s); }, "chunk source, chunk ", c);
      else
        return host_task(s, [&source, qv, kv, vv, c, this]() -> status {
          return detail::layer::guarded([&] { return source.produce(c, c * chunk(), qv, kv, vv); }, "chunk source, chunk ", c);
        });
    }
    case step_kind::offload: {
      if (st.what == payload::q) {
        auto h = cx_->store_->host_copy(host_q, st.i);
        if (!h) return h.error();
        cx_->store_->set_place(host_q, st.i, chunk_place::in_flight);
        return copy(*h, cx_->rings_.q.slot(slot(ring::q)), qb, s);
      }
      if (st.what == payload::kv) {
        std::byte* kvs = cx_->rings_.kv.slot(slot(ring::kv));
        auto hk = cx_->store_->host_copy(host_k, st.j);
        auto hv = cx_->store_->host_copy(host_v, st.j);
        if (!hk) return hk.error();
        if (!hv) return hv.error();
        cx_->store_->set_place(host_k, st.j, chunk_place::in_flight);
        cx_->store_->set_place(host_v, st.j, chunk_place::in_flight);
        FPDT_TRY(copy(*hk, kvs, kvb, s));
        return copy(*hv, kvs + v_at, kvb, s);
      }
      std::byte* os = cx_->rings_.out.slot(slot(ring::out));
      auto ho = cx_->store_->host_copy(host_out, st.i);
      auto hl = cx_->store_->host_copy(host_lse, st.i);
      if (!ho) return ho.error();
      if (!hl) return hl.error();
      cx_->store_->set_place(host_out, st.i, chunk_place::in_flight);
      FPDT_TRY(copy(*ho, os + out_at, bytes(chunk_tensor::out), s));
      return copy(*hl, os + lse_at, lb, s);
    }
    case step_kind::fetch: {
      if (st.what == payload::q) {
        auto h = cx_->store_->host_copy(host_q, st.i);
        if (!h) return h.error();
        return copy(cx_->rings_.q.slot(slot(ring::q)), *h, qb, s);
      }
      std::byte* kvs = cx_->rings_.kv.slot(slot(ring::kv));
      auto hk = cx_->store_->host_copy(host_k, st.j);
      auto hv = cx_->store_->host_copy(host_v, st.j);
      if (!hk) return hk.error();
      if (!hv) return hv.error();
      FPDT_TRY(copy(kvs, *hk, kvb, s));
      return copy(kvs + v_at, *hv, kvb, s);
    }
    case step_kind::compute: {
      chunk_forward_args<T> a{};
      a.q = q_view(cx_->rings_.q.slot(slot(ring::q)));
      std::byte* kvs = cx_->rings_.kv.slot(slot(ring::kv));
      a.k = kv_view(kvs, 0);
      a.v = kv_view(kvs, 1);
      a.out = acc_view(1);
      a.mask = prob_.mask();
      a.q_offset = st.i * chunk();
      a.k_offset = st.j * chunk();
      a.scale = opt_.scale;
      return ops::forward(*be_, s, kernel_, a);
    }
    case step_kind::merge: {
      // The first pair of query chunk i starts from the merge identity (out 0, lse -inf).
      bool const first = st.j == forward_first_key_chunk(fwd_.params, st.i);
      return ops::merge(*be_, s, acc_view(0), acc_view(1), first);
    }
    case step_kind::finalize: {
      partial_view acc = acc_view(0);
      std::byte* os = cx_->rings_.out.slot(slot(ring::out));
      auto ov = q_view(os + out_at);
      auto lv = lse_view(os + lse_at);
      if constexpr (has_sink_ops)
        if (!cx_->sink_.logits.empty()) return ops::finalize(*be_, s, acc, ov, lv, cx_->sink_.logits.data());
      return ops::finalize(*be_, s, acc, ov, lv); // fp32 -> model dtype
    }
    case step_kind::sink: {
      std::byte* os = cx_->rings_.out.slot(slot(ring::out));
      tensor_view<T const, 3> ov = q_view(os + out_at);
      tensor_view<float const, 2> lv = lse_view(os + lse_at);
      index_t const c = st.i;
      if constexpr (detail::layer::stream_form_sink<Sink, T, stream_t>)
        return detail::layer::guarded([&] { return sink.consume(c, c * chunk(), ov, lv, s); }, "chunk sink, chunk ", c);
      else
        return host_task(s, [&sink, ov, lv, c, this]() -> status {
          return detail::layer::guarded([&] { return sink.consume(c, c * chunk(), ov, lv); }, "chunk sink, chunk ", c);
        });
    }
    default:
      return make_error(errc::internal, "fpdt_attention forward: unexpected step ", to_string(st.kind));
    }
  }

  // ---- backward -----------------------------------------------------------------------------
  // Backward q-ring slot layout (offload on): q, out, dout (T), lse, delta (fp32), dq (fp32).
  // Without offload the forward's q/out rings are reused and the grad ring holds dout, dq, delta.
  struct bwd_parts {
    tensor_view<T, 3> q, out, dout;
    tensor_view<float, 2> lse, delta;
    tensor_view<float, 3> dq;
  };

  [[nodiscard]] status prepare_backward() {
    device_arena& arena = be_->device_memory();
    release_workspace();
    auto const& rs = bwd_.ring_size;
    staging_ring q, kv;
    if (opt_.offload) {
      auto qr = staging_ring::create(arena, rs[0], bwd_.params.bytes.q, "fpdt_attention backward q ring");
      if (!qr) return qr.error();
      auto kr = staging_ring::create(arena, rs[1], bwd_.params.bytes.kv, "fpdt_attention backward kv ring");
      if (!kr) return kr.error();
      q = std::move(*qr);
      kv = std::move(*kr);
    } else {
      auto gr = staging_ring::create(arena, chunks(), prob_.slot(slot_kind::backward_grad).bytes,
                                     "fpdt_attention backward grad ring");
      if (!gr) return gr.error();
      q = std::move(*gr);
    }
    auto acc = staging_ring::create(arena, 1, prob_.slot(slot_kind::backward_dkv).bytes,
                                    "fpdt_attention dk and dv accumulators");
    if (!acc) return acc.error();
    FPDT_TRY(acquire_workspace(arena, true));
    bwd_rings_ = {std::move(q), std::move(kv), staging_ring{}};
    bwd_fixed_ = std::move(*acc);
    return {};
  }

  [[nodiscard]] bwd_parts parts(index_t slot) const {
    using T3 = chunk_tensor;
    bwd_parts p;
    auto view3f = [&](std::byte* b) {
      return contiguous_view(reinterpret_cast<float*>(b),
                             std::array<index_t, 3>{chunk(), prob_.local_heads(), prob_.head_dim()}).value();
    };
    if (opt_.offload) {
      std::byte* b = bwd_rings_.q.slot(slot);
      auto in = [&](T3 t) { return b + at(slot_kind::backward_q, t); };
      p.q = q_view(in(T3::q));
      p.out = q_view(in(T3::out));
      p.dout = q_view(in(T3::dout));
      p.lse = lse_view(in(T3::lse));
      p.delta = lse_view(in(T3::delta));
      p.dq = view3f(in(T3::dq));
    } else {
      p.q = q_view(cx_->rings_.q.slot(slot));
      std::byte* o = cx_->rings_.out.slot(slot);
      p.out = q_view(o + at(slot_kind::forward_out, T3::out));
      p.lse = lse_view(o + at(slot_kind::forward_out, T3::lse));
      std::byte* g = bwd_rings_.q.slot(slot);
      p.dout = q_view(g + at(slot_kind::backward_grad, T3::dout));
      p.dq = view3f(g + at(slot_kind::backward_grad, T3::dq));
      p.delta = lse_view(g + at(slot_kind::backward_grad, T3::delta));
    }
    return p;
  }
  [[nodiscard]] std::byte* kv_slot_bwd(index_t slot) const {
    return opt_.offload ? bwd_rings_.kv.slot(slot) : cx_->rings_.kv.slot(slot);
  }
  [[nodiscard]] tensor_view<float, 3> dkv_view(int which) const {
    std::size_t const off = at(slot_kind::backward_dkv, which == 0 ? chunk_tensor::dk : chunk_tensor::dv);
    return contiguous_view(reinterpret_cast<float*>(bwd_fixed_.slot(0) + off),
                           std::array<index_t, 3>{chunk(), prob_.local_kv_heads(), prob_.head_dim()}).value();
  }

  template <class Dout, class Sink>
  [[nodiscard]] status backward_step(schedule_step const& st, typename B::stream_type& s,
                                     Dout const& dout, Sink& sink) {
    std::size_t const qb = bytes(chunk_tensor::q), kvb = bytes(chunk_tensor::k), lb = bytes(chunk_tensor::lse);
    std::size_t const v_at = at(slot_kind::forward_kv, chunk_tensor::v);
    switch (st.kind) {
    case step_kind::fetch: {
      if (st.what == payload::kv) {
        std::byte* kvs = bwd_rings_.kv.slot(st.slot_of(ring::kv));
        auto hk = cx_->store_->host_copy(host_k, st.j);
        auto hv = cx_->store_->host_copy(host_v, st.j);
        if (!hk) return hk.error();
        if (!hv) return hv.error();
        FPDT_TRY(copy(kvs, *hk, kvb, s));
        return copy(kvs + v_at, *hv, kvb, s);
      }
      bwd_parts const p = parts(st.slot_of(ring::q));
      if (opt_.offload) {
        auto hq = cx_->store_->host_copy(host_q, st.i);
        auto ho = cx_->store_->host_copy(host_out, st.i);
        auto hl = cx_->store_->host_copy(host_lse, st.i);
        if (!hq) return hq.error();
        if (!ho) return ho.error();
        if (!hl) return hl.error();
        FPDT_TRY(copy(p.q.data(), *hq, qb, s));
        FPDT_TRY(copy(p.out.data(), *ho, bytes(chunk_tensor::out), s));
        FPDT_TRY(copy(p.lse.data(), *hl, lb, s));
        if (st.what == payload::q_side_dq) { // dq_i and dout_i were written back at i's first use
          auto hd = cx_->store_->host_copy(host_dq, st.i);
          auto hdo = cx_->store_->host_copy(host_dout, st.i);
          if (!hd) return hd.error();
          if (!hdo) return hdo.error();
          FPDT_TRY(copy(p.dq.data(), *hd, bytes(chunk_tensor::dq), s));
          return copy(p.dout.data(), *hdo, qb, s);
        }
      }
      // dout_i from the caller's source (its first use).
      index_t const c = st.i;
      tensor_view<T, 3> const dst = p.dout;
      if constexpr (detail::layer::stream_form_dout<Dout, T, stream_t>)
        return detail::layer::guarded([&] { return dout.produce_dout(c, c * chunk(), dst, s); }, "dout source, chunk ", c);
      else
        return host_task(s, [&dout, dst, c, this]() -> status {
          return detail::layer::guarded([&] { return dout.produce_dout(c, c * chunk(), dst); }, "dout source, chunk ", c);
        });
    }
    case step_kind::zero: {
      if (st.what == payload::dkv) return ops::zero(*be_, s, bwd_fixed_.slot(0), bwd_fixed_.slot_bytes());
      tensor_view<float, 3> dq = parts(st.slot_of(ring::q)).dq;
      return ops::zero(*be_, s, dq.data(), bytes(chunk_tensor::dq));
    }
    case step_kind::delta: {
      bwd_parts const p = parts(st.slot_of(ring::q));
      FPDT_TRY(ops::delta(*be_, s, tensor_view<T const, 3>(p.out), tensor_view<T const, 3>(p.dout), p.delta));
      // Once per query chunk (with offload delta is recomputed at every fetch of the chunk), on
      // the compute lane in schedule order: the same bits every run.
      if constexpr (has_sink_ops)
        if (!cx_->sink_.logits.empty() && !std::exchange(sink_taken_[static_cast<std::size_t>(st.i)], char{1}))
          return ops::sink_gradient(*be_, s, tensor_view<float const, 2>(p.lse), tensor_view<float const, 2>(p.delta),
                                    cx_->sink_.logits.data(), sink_acc_.data());
      return {};
    }
    case step_kind::compute: {
      bwd_parts const p = parts(st.slot_of(ring::q));
      std::byte* kvs = kv_slot_bwd(st.slot_of(ring::kv));
      chunk_backward_args<T> a{};
      a.q = p.q;
      a.k = kv_view(kvs, 0);
      a.v = kv_view(kvs, 1);
      a.out = p.out;
      a.dout = p.dout;
      a.lse = p.lse;
      a.delta = p.delta;
      a.dq = p.dq;
      a.dk = dkv_view(0);
      a.dv = dkv_view(1);
      a.mask = prob_.mask();
      a.q_offset = st.i * chunk();
      a.k_offset = st.j * chunk();
      a.scale = opt_.scale;
      return ops::backward(*be_, s, kernel_, a);
    }
    case step_kind::write_back: {
      bwd_parts const p = parts(st.slot_of(ring::q));
      auto hd = cx_->store_->host_copy(host_dq, st.i);
      if (!hd) return hd.error();
      FPDT_TRY(copy(*hd, p.dq.data(), bytes(chunk_tensor::dq), s));
      if (st.what != payload::dq_dout) return {};
      auto hdo = cx_->store_->host_copy(host_dout, st.i);
      if (!hdo) return hdo.error();
      return copy(*hdo, p.dout.data(), bytes(chunk_tensor::dout), s);
    }
    case step_kind::sink: {
      if (st.what == payload::dq) {
        tensor_view<float const, 3> g = parts(st.slot_of(ring::q)).dq;
        index_t const c = st.i;
        if constexpr (detail::layer::stream_form_dq<Sink, stream_t>)
          return detail::layer::guarded([&] { return sink.consume_dq(c, c * chunk(), g, s); }, "gradient sink, dq chunk ", c);
        else
          return host_task(s, [&sink, g, c, this]() -> status {
            return detail::layer::guarded([&] { return sink.consume_dq(c, c * chunk(), g); }, "gradient sink, dq chunk ", c);
          });
      }
      tensor_view<float const, 3> gk = dkv_view(0), gv = dkv_view(1);
      index_t const c = st.j;
      if constexpr (detail::layer::stream_form_dkv<Sink, stream_t>)
        return detail::layer::guarded([&] { return sink.consume_dkv(c, c * chunk(), gk, gv, s); }, "gradient sink, dk/dv chunk ", c);
      else
        return host_task(s, [&sink, gk, gv, c, this]() -> status {
          return detail::layer::guarded([&] { return sink.consume_dkv(c, c * chunk(), gk, gv); }, "gradient sink, dk/dv chunk ", c);
        });
    }
    default:
      return make_error(errc::internal, "fpdt_attention backward: unexpected step ", to_string(st.kind));
    }
  }

  // Copies the bound sink logits into the forward's context (none bound: none).
  [[nodiscard]] status take_sinks(attention_context& ctx) const {
    if (sink_.logits.empty()) return {};
    index_t const h = prob_.local_heads();
    std::vector<float> v(static_cast<std::size_t>(h));
    for (index_t i = 0; i < h; ++i) {
      float const x = sink_.logits(sink_.first_head + i);
      if (std::isnan(x) || x == std::numeric_limits<float>::infinity())
        return make_error(errc::invalid_argument, "fpdt_attention forward: attention sink logit of head ",
                          sink_.first_head + i, " is ", x, " (sinks must be finite or -inf)");
      v[static_cast<std::size_t>(i)] = x;
    }
    ctx.sink_ = {std::move(v), sink_.grad, sink_.first_head, sink_.accumulate};
    return {};
  }
  // After a successful backward: the layer's heads' sink gradients into the grad bound at the
  // forward, the other entries 0 (overwriting) or unchanged (accumulating).
  void write_sink_grad(detail::layer::sink_state const& b) const {
    if (b.grad.empty() || b.logits.empty()) return;
    for (index_t h = 0; h < b.grad.extent(0); ++h) {
      index_t const l = h - b.first_head;
      float const g = l >= 0 && l < static_cast<index_t>(sink_acc_.size()) ? static_cast<float>(sink_acc_[static_cast<std::size_t>(l)]) : 0.0f;
      if (b.accumulate) b.grad(h) += g;
      else b.grad(h) = g;
    }
  }

  B* be_;
  attention_problem prob_;
  fpdt_attention_options opt_;
  Kernel kernel_;
  schedule fwd_{}, bwd_{};
  staging_ring fwd_fixed_{};
  fwd_rings bwd_rings_{};
  staging_ring bwd_fixed_{};
  staging_ring workspace_{}; // the chunk kernel's workspace during a pass (kernel_with_workspace)
  pipeline_trace trace_{};
  std::optional<executor<B>> ex_{}; // the layer's own lanes, unless run_on gave the caller's
  executor<B>* lanes_ = nullptr;    // the caller's lanes (run_on)
  attention_context saved_{};      // the forward kept by the forms without a context
  attention_context* cx_ = nullptr; // the context of the pass running now
  std::shared_ptr<std::byte const> id_; // the layer's identity, which its contexts carry (kept by moves)
  struct sink_binding { // bind_sinks
    tensor_view<float const, 1> logits{};
    tensor_view<float, 1> grad{};
    index_t first_head = 0;
    bool accumulate = false;
  } sink_{};
  std::vector<double> sink_acc_{};            // the backward's sink gradients [H], fp64
  std::vector<char> sink_taken_{};            // per query chunk: its sink gradients are in sink_acc_
};

FPDT_NAMESPACE_END
