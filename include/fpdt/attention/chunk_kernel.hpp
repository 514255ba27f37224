//! \file
//! \brief The `chunk_kernel` concept: attention of one query chunk against one key/value chunk.
//!
//! Layouts (docs/design.md 3.1, 3.5), all row-major views with any strides `tensor_view` accepts:
//! - `q [Sq, H, D]`, `k [Sk, H_kv, D]`, `v [Sk, H_kv, D]` in the model dtype `T` (fp32, bf16, fp16);
//! - partial output `out [Sq, H, D]` fp32 and `lse [H, Sq]` fp32, natural log;
//! - GQA: query head h uses key/value head h / (H / H_kv) (grouped order), H % H_kv == 0;
//! - masks by global position: query row i sits at `q_offset + i`, key row j at `k_offset + j`;
//! - scale: 1/sqrt(D) unless given.
//!
//! Forward writes the partial state of the chunk pair (a row with no visible key gets out = 0 and
//! lse = -inf); the caller merges partials with `merge_partials`. Backward uses the *final*
//! merged out's `lse` and `delta = rowsum(dout * out)` (fp32, `[H, Sq]`) of each query row, which
//! makes the per-chunk-pair gradients exact (FlashAttention-2 backward, docs/design.md 2.3), and
//! accumulates (+=) into fp32 `dq [Sq, H, D]`, `dk`, `dv [Sk, H_kv, D]`.
//!
//! A kernel is a type with const member functions `forward(chunk_forward_args<T> const&)` and
//! `backward(chunk_backward_args<T> const&)`, each returning `fpdt::status` (a kernel that has no
//! backward returns `errc::not_supported`). Forward must write every element of `out` and `lse`;
//! backward must add into dq, dk, dv (the caller zeroes them once) and write nothing else. Fully
//! masked chunk pairs may be skipped by the caller; calling them is harmless. Adapters for other
//! kernels (FlashAttention, cuDNN SDPA) convert their LSE base (log2 or ln) and empty-row value to
//! these conventions.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "mask.hpp"
#include "online_softmax.hpp"

#include <cmath>
#include <concepts>
#include <cstddef>
#include <optional>
#include <span>

FPDT_NAMESPACE_BEGIN

//! Arguments of a chunk forward: attention of `q` against `k`, `v` into a partial state.
template <class T> struct chunk_forward_args {
  tensor_view<T const, 3> q; //!< `[Sq, H, D]` queries, model dtype
  tensor_view<T const, 3> k; //!< `[Sk, H_kv, D]` keys, model dtype
  tensor_view<T const, 3> v; //!< `[Sk, H_kv, D]` values, model dtype
  partial_view out;          //!< written: `out [Sq, H, D]` fp32 and `lse [H, Sq]` fp32 (ln)
  attention_mask mask{};     //!< which keys each query sees, by global position
  index_t q_offset = 0;      //!< global position of query row 0, in tokens
  index_t k_offset = 0;      //!< global position of key row 0, in tokens
  std::optional<float> scale{}; //!< softmax scale; 1/sqrt(D) when empty
};

//! Arguments of a chunk backward: gradients of one chunk pair, accumulated (+=) in fp32.
template <class T> struct chunk_backward_args {
  tensor_view<T const, 3> q;        //!< `[Sq, H, D]` queries
  tensor_view<T const, 3> k;        //!< `[Sk, H_kv, D]` keys
  tensor_view<T const, 3> v;        //!< `[Sk, H_kv, D]` values
  tensor_view<T const, 3> out;      //!< `[Sq, H, D]` final merged output, model dtype, for adapters
                                    //!< that need it; may be left empty (host_chunk_kernel uses delta)
  tensor_view<T const, 3> dout;     //!< `[Sq, H, D]` gradient of the output
  tensor_view<float const, 2> lse;  //!< `[H, Sq]` final merged LSE (ln), -inf for empty rows
  tensor_view<float const, 2> delta; //!< `[H, Sq]` rowsum(dout * out) of the final output
  tensor_view<float, 3> dq;         //!< `[Sq, H, D]` fp32, accumulated
  tensor_view<float, 3> dk;         //!< `[Sk, H_kv, D]` fp32, accumulated
  tensor_view<float, 3> dv;         //!< `[Sk, H_kv, D]` fp32, accumulated
  attention_mask mask{};            //!< which keys each query sees, by global position
  index_t q_offset = 0;             //!< global position of query row 0, in tokens
  index_t k_offset = 0;             //!< global position of key row 0, in tokens
  std::optional<float> scale{};     //!< softmax scale; 1/sqrt(D) when empty
};

//! The softmax scale in effect: `scale` if given, else 1/sqrt(`d`).
[[nodiscard]] inline float resolve_scale(std::optional<float> scale, index_t d) noexcept {
  return scale ? *scale : 1.0f / std::sqrt(static_cast<float>(d));
}

namespace detail {
template <class V> std::string ext(V const& v) { return shape_string(v.extents()); }

template <class T>
[[nodiscard]] status check_qkv(tensor_view<T const, 3> const& q, tensor_view<T const, 3> const& k,
                               tensor_view<T const, 3> const& v, index_t q_offset, index_t k_offset,
                               std::optional<float> scale, char const* who) {
  index_t const h = q.extent(1), d = q.extent(2), hkv = k.extent(1);
  if (k.extent(0) != v.extent(0) || k.extent(1) != v.extent(1) || k.extent(2) != v.extent(2))
    return make_error(errc::shape_mismatch, who, ": k ", ext(k), " and v ", ext(v),
                      " must both be [Sk, H_kv, D]");
  if (k.extent(2) != d)
    return make_error(errc::shape_mismatch, who, ": head dimension of q ", ext(q), " is ", d,
                      " but of k ", ext(k), " is ", k.extent(2));
  if (d < 1) return make_error(errc::shape_mismatch, who, ": head dimension D = ", d, " must be >= 1");
  if (h < 1 || hkv < 1 || h % hkv != 0)
    return make_error(errc::shape_mismatch, who, ": query heads H = ", h,
                      " must be a positive multiple of key/value heads H_kv = ", hkv,
                      " (grouped-query attention)");
  if (q_offset < 0 || k_offset < 0)
    return make_error(errc::invalid_argument, who, ": global offsets must be >= 0, got q_offset ",
                      q_offset, " and k_offset ", k_offset);
  // Positions must stay far from the int64 limit: masks compute offset + extent + 1.
  constexpr index_t max_position = index_t{1} << 62;
  if (q_offset > max_position - q.extent(0) || k_offset > max_position - k.extent(0))
    return make_error(errc::invalid_argument, who, ": global positions must stay below 2^62, got ",
                      "q_offset ", q_offset, " + Sq ", q.extent(0), " and k_offset ", k_offset,
                      " + Sk ", k.extent(0));
  if (scale && !std::isfinite(*scale))
    return make_error(errc::invalid_argument, who, ": softmax scale ", *scale, " is not finite");
  return {};
}
} // namespace detail

//! Checks the shapes of forward arguments. Errors: `errc::shape_mismatch` or
//! `errc::invalid_argument` naming the tensors, their shapes and the rule.
template <class T> [[nodiscard]] status check_args(chunk_forward_args<T> const& a) {
  constexpr char const* who = "chunk forward";
  FPDT_TRY(detail::check_qkv(a.q, a.k, a.v, a.q_offset, a.k_offset, a.scale, who));
  FPDT_TRY(check_mask(a.mask, who));
  FPDT_TRY(check_partial(a.out, who));
  if (a.out.out.extent(0) != a.q.extent(0) || a.out.out.extent(1) != a.q.extent(1) ||
      a.out.out.extent(2) != a.q.extent(2))
    return make_error(errc::shape_mismatch, who, ": out ", detail::ext(a.out.out),
                      " must have the shape of q ", detail::ext(a.q));
  return {};
}

//! Checks the shapes of backward arguments. Errors as for the forward.
template <class T> [[nodiscard]] status check_args(chunk_backward_args<T> const& a) {
  constexpr char const* who = "chunk backward";
  FPDT_TRY(detail::check_qkv(a.q, a.k, a.v, a.q_offset, a.k_offset, a.scale, who));
  FPDT_TRY(check_mask(a.mask, who));
  index_t const sq = a.q.extent(0), h = a.q.extent(1);
  for (auto const* t : {&a.dout, &a.out})
    if (t->extents() != a.q.extents() && !(t == &a.out && t->empty()))
      return make_error(errc::shape_mismatch, who, ": ", t == &a.dout ? "dout " : "out ",
                        detail::ext(*t), " must have the shape of q ", detail::ext(a.q));
  if (a.dq.extents() != a.q.extents())
    return make_error(errc::shape_mismatch, who, ": dq ", detail::ext(a.dq),
                      " must have the shape of q ", detail::ext(a.q));
  if (a.dk.extents() != a.k.extents() || a.dv.extents() != a.k.extents())
    return make_error(errc::shape_mismatch, who, ": dk ", detail::ext(a.dk), " and dv ",
                      detail::ext(a.dv), " must have the shape of k ", detail::ext(a.k));
  for (auto const* t : {&a.lse, &a.delta})
    if (t->extent(0) != h || t->extent(1) != sq)
      return make_error(errc::shape_mismatch, who, ": ", t == &a.lse ? "lse " : "delta ",
                        detail::ext(*t), " must be [H, Sq] = [", h, ", ", sq, "]");
  return {};
}

//! delta[h, s] = sum_d dout[s, h, d] * out[s, h, d], accumulated in fp32: the per-row term of the
//! softmax backward, computed once per query chunk (docs/design.md 2.3).
//!
//! \param out   `[Sq, H, D]` final merged output (any element type, const or not)
//! \param dout  `[Sq, H, D]` its gradient
//! \param delta `[H, Sq]` fp32, written
//! Errors: `errc::shape_mismatch` naming the shapes.
template <class T, class U>
[[nodiscard]] status compute_delta(tensor_view<T, 3> const& out, tensor_view<U, 3> const& dout,
                                   tensor_view<float, 2> const& delta) {
  if (out.extents() != dout.extents() || delta.extent(0) != out.extent(1) ||
      delta.extent(1) != out.extent(0))
    return make_error(errc::shape_mismatch, "compute_delta: out ", detail::ext(out), ", dout ",
                      detail::ext(dout), " must be equal [Sq, H, D] and delta ", detail::ext(delta),
                      " must be [H, Sq]");
  for (index_t s = 0; s < out.extent(0); ++s)
    for (index_t h = 0; h < out.extent(1); ++h) {
      float acc = 0.0f;
      for (index_t i = 0; i < out.extent(2); ++i)
        acc += static_cast<float>(out(s, h, i)) * static_cast<float>(dout(s, h, i));
      delta(h, s) = acc;
    }
  return {};
}

//! A chunk attention kernel for element type `T`: forward and backward of one chunk pair.
template <class K, class T>
concept chunk_kernel = requires(K const& k, chunk_forward_args<T> const& f,
                                chunk_backward_args<T> const& b) {
  { k.forward(f) } -> std::same_as<status>;
  { k.backward(b) } -> std::same_as<status>;
};

//! Shape of the chunk pairs a kernel will be called on, for its workspace query.
struct chunk_pair_shape {
  index_t q_rows = 0;   //!< Sq, query rows (tokens) of a chunk
  index_t k_rows = 0;   //!< Sk, key/value rows (tokens) of a chunk
  index_t heads = 0;    //!< H, query heads
  index_t kv_heads = 0; //!< H_kv, key/value heads
  index_t head_dim = 0; //!< D
  bool backward = false; //!< the workspace is for `backward` calls (false: for `forward` calls)
};

//! A chunk kernel that needs scratch memory (on a device backend: device memory) of its own, as
//! CUTLASS kernels and cuDNN graphs ask for a workspace: `workspace_bytes(shape)` (noexcept)
//! says how many bytes the forward or (`shape.backward`) backward calls on chunk pairs of
//! `shape` need (0: none), and the `workspace` member is where the caller puts them.
//! `fpdt_attention` takes them from its backend's arena for each pass, sized for that pass (so
//! they count in its budget and in `predicted_forward_bytes` / `predicted_backward_bytes`) and
//! aligned to `device_arena::granularity` (256 bytes), sets `workspace` on its copy of the kernel
//! before the pass and clears it after. The layer calls the
//! kernel on one stream (its compute lane) at a time, so the calls may reuse the workspace in
//! stream order. A kernel called without one (empty `workspace`) must still work, or return an
//! error saying it needs one.
template <class K>
concept kernel_with_workspace = requires(K& k, K const& ck, chunk_pair_shape const& shape) {
  { ck.workspace_bytes(shape) } noexcept -> std::convertible_to<std::size_t>;
  k.workspace = std::span<std::byte>{};
};

FPDT_NAMESPACE_END
