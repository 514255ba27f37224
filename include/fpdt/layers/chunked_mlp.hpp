//! \file
//! \brief `chunked_mlp`: a transformer MLP (GeLU or SwiGLU) run over token chunks, forward and
//! backward, with the `[chunk, ffn]` intermediate recomputed in the backward instead of stored.
//!
//! docs/design.md 2.5; FPDT paper (Yao et al., arXiv 2408.16978) section 3.3 (the MLP's intermediate
//! of `[S/P, ffn]` tokens dominates activation memory at long context, so it is processed chunk by
//! chunk). Only the caller's input x is kept between forward and backward (by the caller); per
//! chunk of C tokens the pass holds at most three `[C, F]` buffers, drawn from the backend's
//! device arena, so its peak device bytes are independent of N and an over-budget chunk is a
//! clear out-of-memory error before anything is written.
//!
//! Weights are the caller's, in PyTorch `nn.Linear` layout `[out, in]`:
//!
//!     GeLU:   y = gelu_tanh(x W_up^T + b_up) W_down^T + b_down
//!     SwiGLU: y = (silu(x W_gate^T) * (x W_up^T + b_up)) W_down^T + b_down
//!
//! with gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) and silu(g) = g sigmoid(g).
#pragma once

#include "../backend/backend.hpp"
#include "../backend/host/fwd.hpp" // the default B; host_defaults.hpp defines it
#include "../config.hpp"
#include "../core/gemm.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../memory/device_arena.hpp"
#include "detail/matrix_operand.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

FPDT_NAMESPACE_BEGIN

//! The MLP's nonlinearity.
enum class mlp_activation : std::uint8_t {
  gelu_tanh, //!< GPT-2 style: fc1, GeLU (tanh approximation), fc2
  swiglu,    //!< LLaMA style: silu(gate) * up, then down
};

//! The MLP's sizes.
struct mlp_shape {
  index_t hidden = 0;                                //!< Hd, model width
  index_t ffn = 0;                                   //!< F, intermediate width
  mlp_activation activation = mlp_activation::gelu_tanh; //!< nonlinearity
};

//! The caller's weights (never written), PyTorch `nn.Linear` layout `[out, in]`, rows contiguous.
template <class T> struct mlp_weights {
  tensor_view<T const, 2> w_up;   //!< `[F, Hd]` (GeLU: fc1; SwiGLU: up)
  tensor_view<T const, 2> w_gate; //!< `[F, Hd]` SwiGLU only; empty for GeLU
  tensor_view<T const, 2> w_down; //!< `[Hd, F]`
  tensor_view<T const, 1> b_up;   //!< `[F]`, or empty for no bias (GeLU: fc1's; SwiGLU: up's)
  tensor_view<T const, 1> b_down; //!< `[Hd]`, or empty for no bias
};

//! Weight gradients, ACCUMULATED (+=) by `backward` so a trainer can sum over micro-batches (zero
//! them yourself before the first). Each is given exactly when its weight is (same extents), and
//! empty when its weight is absent.
template <class T> struct mlp_gradients {
  tensor_view<T, 2> w_up;   //!< `[F, Hd]`
  tensor_view<T, 2> w_gate; //!< `[F, Hd]`, SwiGLU only
  tensor_view<T, 2> w_down; //!< `[Hd, F]`
  tensor_view<T, 1> b_up;   //!< `[F]` when b_up is given
  tensor_view<T, 1> b_down; //!< `[Hd]` when b_down is given
};

//! Options of a `chunked_mlp`.
struct chunked_mlp_options {
  index_t chunk = 0; //!< tokens per chunk (the last chunk of a pass may be shorter); 0: all N at once
};

//! The chunked MLP (see the file comment).
//!
//! \tparam T    element type of x, y, weights, gradients and the intermediate: float or double
//! \tparam B    backend whose device memory the host can address (`host_backend`): the arena
//!              provides the `[chunk, F]` buffers and the elementwise steps run on the host
//! \tparam Gemm a `gemm_policy<Gemm, T>` (`host_gemm`, `cblas_gemm`, or yours)
//!
//! In count-only arena mode a pass allocates (counts) its buffers and returns without computing:
//! the size query runs the real code path. Not thread-safe: one pass at a time per object (two
//! objects may share a backend; the arena is thread-safe).
template <class T, class B = host_backend, class Gemm = host_gemm>
class chunked_mlp {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "chunked_mlp: T must be float or double");
  static_assert(backend<B>, "chunked_mlp: B must model fpdt::backend");
  static_assert(std::is_same_v<typename B::stream_type, host::stream>,
                "chunked_mlp: the elementwise steps run on the host and read the arena's buffers; "
                "use host_backend (a device backend needs device versions of them)");
  static_assert(gemm_policy<Gemm, T>,
                "chunked_mlp: Gemm must be callable as g(trans_a, trans_b, m, n, k, alpha, a, lda, b, "
                "ldb, beta, c, ldc) -> status for T (see core/gemm.hpp)");

public:
  //! Checks the shape and options; allocates nothing. `be` must outlive the object.
  //! Errors: `errc::invalid_argument` naming the value and the rule (hidden, ffn >= 1;
  //! chunk >= 0; a known activation).
  [[nodiscard]] static result<chunked_mlp> create(B& be, mlp_shape shape,
                                                  chunked_mlp_options options = {}, Gemm gemm = {}) {
    if (shape.hidden < 1 || shape.ffn < 1)
      return make_error(errc::invalid_argument, "chunked_mlp: hidden = ", shape.hidden,
                        " and ffn = ", shape.ffn, " must both be >= 1");
    if (options.chunk < 0)
      return make_error(errc::invalid_argument, "chunked_mlp: chunk = ", options.chunk,
                        " must be >= 0 (0: all tokens at once)");
    if (shape.activation != mlp_activation::gelu_tanh && shape.activation != mlp_activation::swiglu)
      return make_error(errc::invalid_argument, "chunked_mlp: unknown activation ",
                        static_cast<int>(shape.activation));
    return chunked_mlp(be, shape, options, std::move(gemm));
  }

  //! y = mlp(x), chunk by chunk.
  //!
  //! \param w  the weights (read only)
  //! \param x  `[N, Hd]` input, N >= 0 (read only)
  //! \param y  `[N, Hd]` output, overwritten; must not overlap x or the weights
  //! Errors: `errc::shape_mismatch` / `errc::invalid_argument` naming the tensor and its extents
  //! (checked before anything is written); the arena's `errc::out_of_memory` (nothing written);
  //! the GEMM policy's errors.
  [[nodiscard]] status forward(mlp_weights<T> const& w, tensor_view<T const, 2> x,
                               tensor_view<T, 2> y) {
    using namespace detail::chunked;
    constexpr char const* who = "chunked_mlp::forward";
    FPDT_TRY(check_weights(who, w));
    FPDT_TRY(check_matrix(who, "x", x, any_extent, hidden()));
    index_t const n = x.extent(0);
    FPDT_TRY(check_matrix(who, "y", y, n, hidden()));
    FPDT_TRY(check_no_alias(who, {range_of("y", y)},
                            {range_of("x", x), range_of("w_up", w.w_up), range_of("w_gate", w.w_gate),
                             range_of("w_down", w.w_down), range_of("b_up", w.b_up),
                             range_of("b_down", w.b_down)}));
    if (n == 0) return {};
    index_t const rows = chunk_rows(n);
    device_arena& arena = be_->device_memory();
    auto need = [&](status const& st) {
      return detail::chunked::with_pass_need(st, "chunked_mlp forward", forward_workspace_bytes(n), n, chunk_);
    };
    auto up = arena.allocate(buffer_bytes(rows), "chunked_mlp forward up [chunk, ffn]");
    if (!up.ok()) return need(up.error());
    arena_allocation gate;
    if (swiglu()) {
      auto g = arena.allocate(buffer_bytes(rows), "chunked_mlp forward gate [chunk, ffn]");
      if (!g.ok()) return need(g.error());
      gate = std::move(*g);
    }
    if (arena.mode() == arena_mode::count_only) return {};
    T* const u = up->template as<T>();
    T* const gt = gate.template as<T>();
    index_t const f = ffn(), hd = hidden();
    for (index_t r0 = 0; r0 < n; r0 += rows) {
      index_t const c = std::min(rows, n - r0);
      FPDT_TRY(project_up(w, x, r0, c, u, gt));
      if (swiglu()) {
        for (index_t i = 0; i < c * f; ++i) u[i] = silu(gt[i]) * u[i];
      } else {
        for (index_t i = 0; i < c * f; ++i) u[i] = gelu(u[i]);
      }
      FPDT_TRY(gemm_(false, true, c, hd, f, T(1), u, f, w.w_down.data(), leading_dim(w.w_down), T(0),
                     row(y, r0), leading_dim(y)));
      if (!w.b_down.empty())
        for (index_t i = 0; i < c; ++i) {
          T* yr = row(y, r0 + i);
          for (index_t j = 0; j < hd; ++j) yr[j] += w.b_down(j);
        }
    }
    return {};
  }

  //! dx and the weight gradients of the MLP at x, given dy; recomputes the `[chunk, F]`
  //! intermediate per chunk (never stores `[N, F]`).
  //!
  //! \param w  the weights (read only)
  //! \param x  `[N, Hd]` the forward's input (read only)
  //! \param dy `[N, Hd]` upstream gradient (read only)
  //! \param dx `[N, Hd]` overwritten; must not overlap x, dy, the weights or the gradients
  //! \param g  weight gradients, accumulated (+=); present exactly for the present weights
  //! Errors: as `forward` (all checks and the allocation come before any write), and
  //! `errc::invalid_argument` when an output overlaps an input or another output.
  [[nodiscard]] status backward(mlp_weights<T> const& w, tensor_view<T const, 2> x,
                                tensor_view<T const, 2> dy, tensor_view<T, 2> dx,
                                mlp_gradients<T> const& g) {
    using namespace detail::chunked;
    constexpr char const* who = "chunked_mlp::backward";
    FPDT_TRY(check_weights(who, w));
    FPDT_TRY(check_gradients(who, w, g));
    FPDT_TRY(check_matrix(who, "x", x, any_extent, hidden()));
    index_t const n = x.extent(0);
    FPDT_TRY(check_matrix(who, "dy", dy, n, hidden()));
    FPDT_TRY(check_matrix(who, "dx", dx, n, hidden()));
    FPDT_TRY(check_no_alias(
        who,
        {range_of("dx", dx), range_of("dw_up", g.w_up), range_of("dw_gate", g.w_gate),
         range_of("dw_down", g.w_down), range_of("db_up", g.b_up), range_of("db_down", g.b_down)},
        {range_of("x", x), range_of("dy", dy), range_of("w_up", w.w_up), range_of("w_gate", w.w_gate),
         range_of("w_down", w.w_down), range_of("b_up", w.b_up), range_of("b_down", w.b_down)}));
    if (n == 0) return {};
    index_t const rows = chunk_rows(n);
    device_arena& arena = be_->device_memory();
    auto need = [&](status const& st) {
      return detail::chunked::with_pass_need(st, "chunked_mlp backward", backward_workspace_bytes(n), n, chunk_);
    };
    auto b1 = arena.allocate(buffer_bytes(rows), "chunked_mlp backward up [chunk, ffn]");
    if (!b1.ok()) return need(b1.error());
    auto b2 = arena.allocate(buffer_bytes(rows), swiglu() ? "chunked_mlp backward gate [chunk, ffn]"
                                                          : "chunked_mlp backward act [chunk, ffn]");
    if (!b2.ok()) return need(b2.error());
    arena_allocation b3;
    if (swiglu()) {
      auto a = arena.allocate(buffer_bytes(rows), "chunked_mlp backward act [chunk, ffn]");
      if (!a.ok()) return need(a.error());
      b3 = std::move(*a);
    }
    if (arena.mode() == arena_mode::count_only) return {};
    T* const up = b1->template as<T>();
    T* const gt = b2->template as<T>();
    // GeLU: act and then d(up) live in b2; SwiGLU: in b3, with d(up) into b1, d(gate) into b2.
    T* const act = swiglu() ? b3.template as<T>() : gt;
    index_t const f = ffn(), hd = hidden();
    for (index_t r0 = 0; r0 < n; r0 += rows) {
      index_t const c = std::min(rows, n - r0);
      T const* dyr = row(dy, r0);
      index_t const lddy = leading_dim(dy);
      FPDT_TRY(project_up(w, x, r0, c, up, swiglu() ? gt : nullptr));
      if (swiglu()) {
        for (index_t i = 0; i < c * f; ++i) act[i] = silu(gt[i]) * up[i];
      } else {
        for (index_t i = 0; i < c * f; ++i) act[i] = gelu(up[i]);
      }
      // dW_down += dy^T act; db_down += column sums of dy
      FPDT_TRY(gemm_(true, false, hd, f, c, T(1), dyr, lddy, act, f, T(1), g.w_down.data(),
                     leading_dim(g.w_down)));
      if (!g.b_down.empty())
        for (index_t i = 0; i < c; ++i) {
          T const* d = dyr + i * lddy;
          for (index_t j = 0; j < hd; ++j) g.b_down(j) += d[j];
        }
      // d(act) = dy W_down, into act's buffer
      FPDT_TRY(gemm_(false, false, c, f, hd, T(1), dyr, lddy, w.w_down.data(), leading_dim(w.w_down),
                     T(0), act, f));
      T* const dup = swiglu() ? up : act;
      if (swiglu()) {
        for (index_t i = 0; i < c * f; ++i) {
          T const gv = gt[i], uv = up[i], da = act[i];
          T const sg = sigmoid(gv);
          up[i] = da * gv * sg;                                // d(up) = da silu(g)
          gt[i] = da * uv * sg * (T(1) + gv * (T(1) - sg));    // d(gate) = da up silu'(g)
        }
      } else {
        for (index_t i = 0; i < c * f; ++i) act[i] *= gelu_grad(up[i]);
      }
      if (!g.b_up.empty())
        for (index_t i = 0; i < c; ++i)
          for (index_t j = 0; j < f; ++j) g.b_up(j) += dup[i * f + j];
      T const* xr = row(x, r0);
      index_t const ldx = leading_dim(x);
      FPDT_TRY(gemm_(true, false, f, hd, c, T(1), dup, f, xr, ldx, T(1), g.w_up.data(),
                     leading_dim(g.w_up)));
      FPDT_TRY(gemm_(false, false, c, hd, f, T(1), dup, f, w.w_up.data(), leading_dim(w.w_up), T(0),
                     row(dx, r0), leading_dim(dx)));
      if (swiglu()) {
        FPDT_TRY(gemm_(true, false, f, hd, c, T(1), gt, f, xr, ldx, T(1), g.w_gate.data(),
                       leading_dim(g.w_gate)));
        FPDT_TRY(gemm_(false, false, c, hd, f, T(1), gt, f, w.w_gate.data(), leading_dim(w.w_gate),
                       T(1), row(dx, r0), leading_dim(dx)));
      }
    }
    return {};
  }

  //! Device bytes a forward over `tokens` tokens holds at its peak, exactly as the arena counts
  //! them: (1 for GeLU, 2 for SwiGLU) x rounded(min(chunk, tokens) F sizeof(T)); SIZE_MAX when
  //! that overflows `size_t` (the arena then refuses the pass).
  [[nodiscard]] std::size_t forward_workspace_bytes(index_t tokens) const noexcept {
    return detail::chunked::mul_saturating(swiglu() ? 2u : 1u, buffer_bytes(tokens > 0 ? chunk_rows(tokens) : 0));
  }
  //! Device bytes a backward over `tokens` tokens holds at its peak, exactly as the arena counts
  //! them: (2 for GeLU, 3 for SwiGLU) x rounded(min(chunk, tokens) F sizeof(T)); SIZE_MAX when
  //! that overflows `size_t`.
  [[nodiscard]] std::size_t backward_workspace_bytes(index_t tokens) const noexcept {
    return detail::chunked::mul_saturating(swiglu() ? 3u : 2u, buffer_bytes(tokens > 0 ? chunk_rows(tokens) : 0));
  }
  //! The larger of the forward's and the backward's peak for `tokens` tokens (the backward's).
  [[nodiscard]] std::size_t workspace_bytes(index_t tokens) const noexcept {
    return std::max(forward_workspace_bytes(tokens), backward_workspace_bytes(tokens));
  }
  //! Device bytes one pass holds at its peak (the backward's; the arena's rounded sizes) for any
  //! N >= chunk: independent of N. With chunk = 0 the workspace grows with N: returns 0, use
  //! `workspace_bytes(tokens)`.
  [[nodiscard]] std::size_t workspace_bytes() const noexcept {
    return chunk_ > 0 ? workspace_bytes(chunk_) : 0;
  }

  //! The shape given to create.
  [[nodiscard]] mlp_shape shape() const noexcept { return shape_; }
  //! Tokens per chunk (0: all at once).
  [[nodiscard]] index_t chunk() const noexcept { return chunk_; }

private:
  chunked_mlp(B& be, mlp_shape shape, chunked_mlp_options options, Gemm gemm)
      : be_(&be), shape_(shape), chunk_(options.chunk), gemm_(std::move(gemm)) {}

  [[nodiscard]] index_t hidden() const noexcept { return shape_.hidden; }
  [[nodiscard]] index_t ffn() const noexcept { return shape_.ffn; }
  [[nodiscard]] bool swiglu() const noexcept { return shape_.activation == mlp_activation::swiglu; }
  [[nodiscard]] index_t chunk_rows(index_t n) const noexcept {
    return chunk_ == 0 ? n : std::min(chunk_, n);
  }
  [[nodiscard]] std::size_t buffer_bytes(index_t rows) const noexcept {
    return detail::chunked::buffer_bytes(rows, ffn(), sizeof(T));
  }

  [[nodiscard]] status check_weights(char const* who, mlp_weights<T> const& w) const {
    using namespace detail::chunked;
    FPDT_TRY(check_matrix(who, "w_up", w.w_up, ffn(), hidden()));
    FPDT_TRY(check_matrix(who, "w_down", w.w_down, hidden(), ffn()));
    if (swiglu()) {
      FPDT_TRY(check_matrix(who, "w_gate", w.w_gate, ffn(), hidden()));
    } else if (!w.w_gate.empty()) {
      return make_error(errc::invalid_argument, who, ": w_gate [", w.w_gate.extent(0), ", ",
                        w.w_gate.extent(1), "] is given but the activation is gelu_tanh (SwiGLU only)");
    }
    FPDT_TRY(check_vector(who, "b_up", w.b_up, ffn()));
    FPDT_TRY(check_vector(who, "b_down", w.b_down, hidden()));
    return {};
  }

  [[nodiscard]] status check_gradients(char const* who, mlp_weights<T> const& w,
                                       mlp_gradients<T> const& g) const {
    using namespace detail::chunked;
    FPDT_TRY(check_matrix(who, "dw_up", g.w_up, ffn(), hidden()));
    FPDT_TRY(check_matrix(who, "dw_down", g.w_down, hidden(), ffn()));
    if (swiglu()) {
      FPDT_TRY(check_matrix(who, "dw_gate", g.w_gate, ffn(), hidden()));
    } else if (!g.w_gate.empty()) {
      return make_error(errc::invalid_argument, who, ": dw_gate is given but the activation is gelu_tanh");
    }
    if (w.b_up.empty() != g.b_up.empty())
      return make_error(errc::invalid_argument, who, ": db_up is ", g.b_up.empty() ? "empty" : "given",
                        " but b_up is ", w.b_up.empty() ? "empty" : "given",
                        " (a bias gradient is given exactly when its bias is)");
    if (w.b_down.empty() != g.b_down.empty())
      return make_error(errc::invalid_argument, who, ": db_down is ", g.b_down.empty() ? "empty" : "given",
                        " but b_down is ", w.b_down.empty() ? "empty" : "given",
                        " (a bias gradient is given exactly when its bias is)");
    FPDT_TRY(check_vector(who, "db_up", g.b_up, ffn()));
    FPDT_TRY(check_vector(who, "db_down", g.b_down, hidden()));
    return {};
  }

  // up[c, F] = x[r0:r0+c] W_up^T + b_up; gate (when not null) = x W_gate^T.
  [[nodiscard]] status project_up(mlp_weights<T> const& w, tensor_view<T const, 2> const& x,
                                  index_t r0, index_t c, T* up, T* gate) const {
    using namespace detail::chunked;
    index_t const f = ffn(), hd = hidden();
    T const* xr = row(x, r0);
    index_t const ldx = leading_dim(x);
    FPDT_TRY(gemm_(false, true, c, f, hd, T(1), xr, ldx, w.w_up.data(), leading_dim(w.w_up), T(0), up, f));
    if (!w.b_up.empty())
      for (index_t i = 0; i < c; ++i)
        for (index_t j = 0; j < f; ++j) up[i * f + j] += w.b_up(j);
    if (gate != nullptr)
      FPDT_TRY(gemm_(false, true, c, f, hd, T(1), xr, ldx, w.w_gate.data(), leading_dim(w.w_gate), T(0),
                     gate, f));
    return {};
  }

  [[nodiscard]] static T sigmoid(T v) noexcept {
    if (v >= T(0)) return T(1) / (T(1) + std::exp(-v));
    T const e = std::exp(v);
    return e / (T(1) + e);
  }
  [[nodiscard]] static T silu(T v) noexcept { return v * sigmoid(v); }
  static constexpr T gelu_k = static_cast<T>(0.7978845608028654); // sqrt(2 / pi)
  static constexpr T gelu_c = static_cast<T>(0.044715);
  [[nodiscard]] static T gelu(T v) noexcept {
    return T(0.5) * v * (T(1) + std::tanh(gelu_k * (v + gelu_c * v * v * v)));
  }
  [[nodiscard]] static T gelu_grad(T v) noexcept {
    T const t = std::tanh(gelu_k * (v + gelu_c * v * v * v));
    return T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * gelu_k * (T(1) + T(3) * gelu_c * v * v);
  }

  B* be_;
  mlp_shape shape_;
  index_t chunk_;
  Gemm gemm_;
};

FPDT_NAMESPACE_END
