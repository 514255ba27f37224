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
//! Today the all-to-alls run inside the source and sink steps (compute and h2d lanes) rather than
//! as separate steps on the comm lane; the numbers are exact either way, the overlap of the
//! exchange with compute is the next step (issue 5 note).
#pragma once

#include "../comm/communicator.hpp"
#include "../comm/ulysses.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "fpdt_attention.hpp"

#include <array>
#include <cstdint>
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
template <class T>
tensor_view<T, 3> view3(std::vector<T>& v, index_t a, index_t b, index_t c) {
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
    return result<sequence_parallel_attention>(
        sequence_parallel_attention(comm, *l, global, salt, std::move(*inner)));
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
    return abort_on_error(inner_.forward(src, snk));
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
    return abort_on_error(inner_.backward(src, snk));
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
  //! The head sharding.
  [[nodiscard]] ulysses_layout const& layout() const noexcept { return layout_; }

private:
  sequence_parallel_attention(Comm& comm, ulysses_layout l, attention_shape global,
                              std::uint64_t salt, fpdt_attention<T, B, Kernel>&& inner)
      : comm_(&comm), layout_(l), shape_(global), salt_(salt), inner_(std::move(inner)) {}

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

  template <class Source> struct source_adapter {
    sequence_parallel_attention* self;
    Source const* user;
    [[nodiscard]] status produce(index_t c, index_t, tensor_view<T, 3> const& q,
                                 tensor_view<T, 3> const& k, tensor_view<T, 3> const& v) const {
      auto const& l = self->layout_;
      index_t const pc = self->piece(), d = l.head_dim;
      std::vector<T> lq(static_cast<std::size_t>(pc * l.heads * d)),
          lk(static_cast<std::size_t>(pc * l.kv_heads * d)), lv(lk.size());
      auto qv = detail::sp::view3(lq, pc, l.heads, d);
      auto kv = detail::sp::view3(lk, pc, l.kv_heads, d);
      auto vv = detail::sp::view3(lv, pc, l.kv_heads, d);
      FPDT_TRY(user->produce(c, c * pc, qv, kv, vv));
      Comm& comm = *self->comm_;
      std::uint64_t const s = self->salt_;
      FPDT_TRY(seq_to_head<T>(comm, l, head_kind::query, tensor_view<T const, 3>(qv), q, detail::sp::tag(s, 0, 0, c)));
      FPDT_TRY(seq_to_head<T>(comm, l, head_kind::key_value, tensor_view<T const, 3>(kv), k, detail::sp::tag(s, 0, 1, c)));
      return seq_to_head<T>(comm, l, head_kind::key_value, tensor_view<T const, 3>(vv), v, detail::sp::tag(s, 0, 2, c));
    }
  };

  template <class Sink> struct sink_adapter {
    sequence_parallel_attention* self;
    Sink* user;
    [[nodiscard]] status consume(index_t c, index_t, tensor_view<T const, 3> const& out,
                                 tensor_view<float const, 2> const& lse) {
      auto const& l = self->layout_;
      index_t const pc = self->piece(), d = l.head_dim, hr = l.heads_per_rank(head_kind::query);
      std::vector<T> lo(static_cast<std::size_t>(pc * l.heads * d));
      std::vector<float> ll(static_cast<std::size_t>(pc * l.heads));
      auto ov = detail::sp::view3(lo, pc, l.heads, d);
      Comm& comm = *self->comm_;
      std::uint64_t const s = self->salt_;
      FPDT_TRY(head_to_seq<T>(comm, l, head_kind::query, out, ov, detail::sp::tag(s, 0, 3, c)));
      // lse [H/P, C] seen as [C, H/P, 1]; the local lse [H, C/P] as [C/P, H, 1].
      auto lse3 = make_tensor_view<float const>(lse.data(), std::array<index_t, 3>{l.chunk, hr, 1},
                                                std::array<index_t, 3>{lse.stride(1), lse.stride(0), 1});
      if (!lse3) return lse3.error();
      auto local3 = make_tensor_view(ll.data(), std::array<index_t, 3>{pc, l.heads, 1},
                                     std::array<index_t, 3>{1, pc, 1});
      if (!local3) return local3.error();
      ulysses_layout one = l;
      one.head_dim = 1;
      FPDT_TRY(head_to_seq<float>(comm, one, head_kind::query, *lse3, *local3, detail::sp::tag(s, 0, 4, c)));
      auto lse_local = contiguous_view<float const>(ll.data(), std::array<index_t, 2>{l.heads, pc}).value();
      return user->consume(c, c * pc, tensor_view<T const, 3>(ov), lse_local);
    }
  };

  template <class Dout> struct dout_adapter {
    sequence_parallel_attention* self;
    Dout const* user;
    [[nodiscard]] status produce_dout(index_t c, index_t, tensor_view<T, 3> const& dout) const {
      auto const& l = self->layout_;
      index_t const pc = self->piece(), d = l.head_dim;
      std::vector<T> ld(static_cast<std::size_t>(pc * l.heads * d));
      auto dv = detail::sp::view3(ld, pc, l.heads, d);
      FPDT_TRY(user->produce_dout(c, c * pc, dv));
      return seq_to_head<T>(*self->comm_, l, head_kind::query, tensor_view<T const, 3>(dv), dout,
                            detail::sp::tag(self->salt_, 1, 0, c));
    }
  };

  template <class Sink> struct grad_adapter {
    sequence_parallel_attention* self;
    Sink* user;
    [[nodiscard]] status consume_dq(index_t c, index_t, tensor_view<float const, 3> const& g) {
      auto const& l = self->layout_;
      index_t const pc = self->piece();
      std::vector<float> lg(static_cast<std::size_t>(pc * l.heads * l.head_dim));
      auto v = detail::sp::view3(lg, pc, l.heads, l.head_dim);
      FPDT_TRY(head_to_seq<float>(*self->comm_, l, head_kind::query, g, v, detail::sp::tag(self->salt_, 1, 1, c)));
      return user->consume_dq(c, c * pc, tensor_view<float const, 3>(v));
    }
    [[nodiscard]] status consume_dkv(index_t c, index_t, tensor_view<float const, 3> const& gk,
                                     tensor_view<float const, 3> const& gv) {
      auto const& l = self->layout_;
      index_t const pc = self->piece();
      std::vector<float> lk(static_cast<std::size_t>(pc * l.kv_heads * l.head_dim)), lv(lk.size());
      auto kv = detail::sp::view3(lk, pc, l.kv_heads, l.head_dim);
      auto vv = detail::sp::view3(lv, pc, l.kv_heads, l.head_dim);
      FPDT_TRY(head_to_seq<float>(*self->comm_, l, head_kind::key_value, gk, kv, detail::sp::tag(self->salt_, 1, 2, c)));
      FPDT_TRY(head_to_seq<float>(*self->comm_, l, head_kind::key_value, gv, vv, detail::sp::tag(self->salt_, 1, 3, c)));
      return user->consume_dkv(c, c * pc, tensor_view<float const, 3>(kv), tensor_view<float const, 3>(vv));
    }
  };

  Comm* comm_;
  ulysses_layout layout_;
  attention_shape shape_;
  std::uint64_t salt_;
  fpdt_attention<T, B, Kernel> inner_;
};

FPDT_NAMESPACE_END
