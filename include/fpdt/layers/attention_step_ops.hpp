//! \file
//! \brief `attention_step_ops<B>`: the elementwise steps of `fpdt_attention` on backend `B`.
//!
//! Besides copies (the backend's `copy_async`) and the chunk kernel, an FPDT attention pass has a
//! few elementwise steps (docs/design.md 2.2, 2.3): merging a chunk pair's partial state into the
//! query chunk's accumulator, finalizing it (fp32 to the model dtype), zeroing gradient
//! accumulators, delta = rowsum(dout * out), and copying token rows between whole tensors and
//! chunk slots. A backend supplies them by specializing this template:
//! - `host_backend`: here; each step is a host task on the lane's stream;
//! - `cuda_backend`: `layers/cuda/attention_step_ops.cuh` (include `<fpdt/fpdt.cuh>`); each step
//!   is a kernel (or `cudaMemsetAsync`) on the lane's stream;
//! - a user's backend: a specialization with the same static members.
//!
//! Every member enqueues its work on stream `s` and returns at once; views point into memory the
//! backend's kernels can address. Members (T: model dtype; all return `fpdt::status`):
//! - `forward(be, s, kernel, chunk_forward_args<T>)`, `backward(be, s, kernel,
//!   chunk_backward_args<T>)`: run the chunk kernel on `s`;
//! - `merge(be, s, acc, part, first)`: acc = first ? part : merge(acc, part) (`merge_row`);
//! - `finalize(be, s, acc, out [C, H, D] T, lse [H, C])`: out = T(acc.out), lse = acc.lse;
//!   optionally (for attention sinks) `finalize(..., sinks)`, absorbing each head's sink first,
//!   and `sink_gradient(be, s, lse, delta, sinks, grad)`, adding the chunk's sink gradients;
//! - `zero(be, s, ptr, bytes)`;
//! - `delta(be, s, out, dout, delta [H, C])`;
//! - `copy_rows(be, s, src, src_row0, dst, dst_row0, rows)`: token rows of `[S, H, D]` views,
//!   converting the element type; `copy_columns(be, s, src, src_col0, dst, dst_col0, cols)`: token
//!   columns of `[H, S]` views; optionally `copy_rows_unchecked` and `copy_columns_unchecked`, the
//!   same for the layers' own buffers without the checks a backend makes on a caller's pointers
//!   (layers fall back to the checked forms);
//! - `ulysses_pack(be, s, src [rows, heads, D], send, blocks)` and `ulysses_unpack(be, s, recv, dst,
//!   blocks)`: the two halves of a Ulysses all-to-all around the communicator's exchange
//!   (`ulysses_blocks`, comm/ulysses.hpp), used by `sequence_parallel_attention` on device
//!   backends; `send` and `recv` are contiguous `[P][rows][heads][D]` device buffers.
#pragma once

#include "../attention/chunk_kernel.hpp"
#include "../attention/online_softmax.hpp"
#include "../comm/ulysses.hpp"
#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../pipeline/executor.hpp"

#include <cstddef>
#include <cstring>
#include <exception>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

namespace detail::layer {
// dst(dst_row0 + r, h, d) = src(src_row0 + r, h, d) for r < rows and all of dst's heads and
// dims, converting the element type (fp32 accumulators to the model dtype, for instance).
template <class S, class D>
void copy_rows(tensor_view<S, 3> const& src, index_t src_row0, tensor_view<D, 3> const& dst,
               index_t dst_row0, index_t rows) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t h = 0; h < dst.extent(1); ++h)
      for (index_t d = 0; d < dst.extent(2); ++d)
        dst(dst_row0 + r, h, d) = static_cast<std::remove_const_t<D>>(src(src_row0 + r, h, d));
}

// dst(h, dst_col0 + c) = src(h, src_col0 + c) for c < cols and all of dst's rows.
template <class S, class D>
void copy_columns(tensor_view<S, 2> const& src, index_t src_col0, tensor_view<D, 2> const& dst,
                  index_t dst_col0, index_t cols) {
  for (index_t h = 0; h < dst.extent(0); ++h)
    for (index_t c = 0; c < cols; ++c)
      dst(h, dst_col0 + c) = static_cast<std::remove_const_t<D>>(src(h, src_col0 + c));
}

// Runs a chunk kernel's forward or backward (`pass`) on the pair at `q_offset`, `k_offset`
// (tokens); its error, or an exception it throws (errc::backend_error, as in any task), comes
// back naming the kernel, the pass and the pair, as a source's or sink's names its chunk.
template <class F>
[[nodiscard]] status kernel_step(F&& f, char const* pass, index_t q_offset, index_t k_offset) {
  auto ctx = [&] { return detail::concat("chunk kernel ", pass, " at q_offset ", q_offset, ", k_offset ", k_offset); };
  try {
    status st = f();
    return st.ok() ? st : st.with_context(ctx());
  } catch (std::exception const& e) {
    return make_error(errc::backend_error, ctx(), ": threw ", e.what());
  } catch (...) {
    return make_error(errc::backend_error, ctx(), ": threw a non-standard exception");
  }
}
} // namespace detail::layer

//! The steps as host tasks on the lane's worker thread: for every backend whose streams run host
//! tasks in order (`runs_host_tasks_in_order<B>`: `host_backend` and backends that declare
//! `runs_host_tasks` as it does).
template <class B> struct host_attention_step_ops {
  using stream_type = typename B::stream_type; //!< the lane's stream

  //! Runs `kernel.forward(a)` on `s` (`kernel` must outlive the task); its error or exception
  //! comes back naming the pass and the pair's offsets.
  template <class Kernel, class T>
  [[nodiscard]] static status forward(B& be, stream_type& s, Kernel const& kernel,
                                      chunk_forward_args<T> const& a) {
    return be.launch(s, [k = &kernel, a]() -> status {
      return detail::layer::kernel_step([&] { return k->forward(a); }, "forward", a.q_offset, a.k_offset);
    });
  }
  //! Runs `kernel.backward(a)` on `s` (`kernel` must outlive the task); errors as `forward`.
  template <class Kernel, class T>
  [[nodiscard]] static status backward(B& be, stream_type& s, Kernel const& kernel,
                                       chunk_backward_args<T> const& a) {
    return be.launch(s, [k = &kernel, a]() -> status {
      return detail::layer::kernel_step([&] { return k->backward(a); }, "backward", a.q_offset, a.k_offset);
    });
  }
  //! acc = part when `first`, else acc = merge(acc, part).
  [[nodiscard]] static status merge(B& be, stream_type& s, partial_view const& acc,
                                    partial_view const& part, bool first) {
    return be.launch(s, [acc, part, first]() -> status {
      if (first) reset_partial(acc);
      return merge_partials(acc, partial_cview(part));
    });
  }
  //! out = T(acc.out), lse = acc.lse.
  template <class T>
  [[nodiscard]] static status finalize(B& be, stream_type& s, partial_view const& acc,
                                       tensor_view<T, 3> const& out,
                                       tensor_view<float, 2> const& lse) {
    return be.launch(s, [acc, out, lse] {
      detail::layer::copy_rows(acc.out, 0, out, 0, out.extent(0));
      detail::layer::copy_columns(acc.lse, 0, lse, 0, lse.extent(1));
    });
  }
  //! out = T(acc.out), lse = acc.lse, each row first absorbing its head's attention sink
  //! (`absorb_sink`; `sinks` [H] fp32, this rank's heads). `acc` is changed.
  template <class T>
  [[nodiscard]] static status finalize(B& be, stream_type& s, partial_view const& acc,
                                       tensor_view<T, 3> const& out, tensor_view<float, 2> const& lse,
                                       float const* sinks) {
    return be.launch(s, [acc, out, lse, sinks] {
      for (index_t c = 0; c < acc.out.extent(0); ++c)
        for (index_t h = 0; h < acc.out.extent(1); ++h)
          absorb_sink(&acc.out(c, h, 0), acc.lse(h, c), sinks[h], acc.out.extent(2), acc.out.stride(2));
      detail::layer::copy_rows(acc.out, 0, out, 0, out.extent(0));
      detail::layer::copy_columns(acc.lse, 0, lse, 0, lse.extent(1));
    });
  }
  //! grad[h] += sum over the chunk's rows of `sink_gradient(sinks[h], lse(h, c), delta(h, c))`,
  //! in row order (`lse`, `delta` [H, C] fp32; `sinks` [H] fp32, `grad` [H] fp64).
  [[nodiscard]] static status sink_gradient(B& be, stream_type& s, tensor_view<float const, 2> const& lse,
                                            tensor_view<float const, 2> const& delta, float const* sinks,
                                            double* grad) {
    return be.launch(s, [lse, delta, sinks, grad] {
      for (index_t h = 0; h < lse.extent(0); ++h) {
        double g = 0;
        for (index_t c = 0; c < lse.extent(1); ++c) g += fpdt::sink_gradient(sinks[h], lse(h, c), delta(h, c));
        grad[h] += g;
      }
    });
  }
  //! Sets `bytes` bytes at `p` to zero.
  [[nodiscard]] static status zero(B& be, stream_type& s, void* p, std::size_t bytes) {
    return be.launch(s, [p, bytes] { std::memset(p, 0, bytes); });
  }
  //! delta [H, C] = rowsum(dout * out) in fp32 (`compute_delta`).
  template <class T>
  [[nodiscard]] static status delta(B& be, stream_type& s, tensor_view<T const, 3> const& out,
                                    tensor_view<T const, 3> const& dout,
                                    tensor_view<float, 2> const& delta) {
    return be.launch(s, [out, dout, delta]() -> status { return compute_delta(out, dout, delta); });
  }
  //! Token rows [src_row0, src_row0 + rows) of `src` into rows from `dst_row0` of `dst`.
  template <class S, class D>
  [[nodiscard]] static status copy_rows(B& be, stream_type& s, tensor_view<S, 3> const& src,
                                        index_t src_row0, tensor_view<D, 3> const& dst,
                                        index_t dst_row0, index_t rows) {
    return be.launch(s, [=] { detail::layer::copy_rows(src, src_row0, dst, dst_row0, rows); });
  }
  //! Token columns [src_col0, src_col0 + cols) of `src [H, S]` into columns from `dst_col0`.
  template <class S, class D>
  [[nodiscard]] static status copy_columns(B& be, stream_type& s,
                                           tensor_view<S, 2> const& src, index_t src_col0,
                                           tensor_view<D, 2> const& dst, index_t dst_col0,
                                           index_t cols) {
    return be.launch(s, [=] { detail::layer::copy_columns(src, src_col0, dst, dst_col0, cols); });
  }
  //! send[r][s][h][x] = src(m.row0(r) + s, m.head0(r) + h, x) for every block r of `m`.
  template <class U>
  [[nodiscard]] static status ulysses_pack(B& be, stream_type& s, tensor_view<U const, 3> const& src,
                                           U* send, ulysses_blocks const& m) {
    return be.launch(s, [=] { detail::ulysses::pack(src, send, m); });
  }
  //! dst(m.row0(r) + s, m.head0(r) + h, x) = recv[r][s][h][x]; blocks landing on the same
  //! elements summed in rank order when `m.add`.
  template <class U>
  [[nodiscard]] static status ulysses_unpack(B& be, stream_type& s, U const* recv,
                                             tensor_view<U, 3> const& dst, ulysses_blocks const& m) {
    return be.launch(s, [=] { detail::ulysses::unpack(recv, dst, m); });
  }
};

namespace detail {
template <class B> struct missing_step_ops {
  static_assert(sizeof(B) == 0,
                "fpdt::attention_step_ops<B> has no specialization for this backend: include "
                "<fpdt/fpdt.cuh> for cuda_backend, or specialize it for your own backend");
};
} // namespace detail

//! The elementwise steps of `fpdt_attention` on backend `B` (see the file comment): host tasks
//! for backends whose streams run them; a specialization elsewhere (`cuda_backend`: include
//! `<fpdt/fpdt.cuh>`). Instantiating it for a backend with neither names the header to include.
template <class B>
struct attention_step_ops
    : std::conditional_t<runs_host_tasks_in_order<B>, host_attention_step_ops<B>,
                         detail::missing_step_ops<B>> {};

namespace detail::layer {
// Whole-view copies between buffers a layer allocated itself, enqueued on s: the step ops'
// unchecked forms where the backend has them (cuda_backend skips its per-call pointer checks),
// else the checked ones.
template <class B, class S, class D>
[[nodiscard]] status own_copy_rows(B& be, typename B::stream_type& s, tensor_view<S, 3> const& src,
                                   tensor_view<D, 3> const& dst) {
  using ops = attention_step_ops<B>;
  if constexpr (requires { ops::copy_rows_unchecked(be, s, src, index_t{}, dst, index_t{}, index_t{}); })
    return ops::copy_rows_unchecked(be, s, src, 0, dst, 0, dst.extent(0));
  else
    return ops::copy_rows(be, s, src, 0, dst, 0, dst.extent(0));
}
template <class B, class S, class D>
[[nodiscard]] status own_copy_columns(B& be, typename B::stream_type& s, tensor_view<S, 2> const& src,
                                      tensor_view<D, 2> const& dst) {
  using ops = attention_step_ops<B>;
  if constexpr (requires { ops::copy_columns_unchecked(be, s, src, index_t{}, dst, index_t{}, index_t{}); })
    return ops::copy_columns_unchecked(be, s, src, 0, dst, 0, dst.extent(1));
  else
    return ops::copy_columns(be, s, src, 0, dst, 0, dst.extent(1));
}
} // namespace detail::layer

FPDT_NAMESPACE_END
