//! \file
//! \brief `chunked_cross_entropy`: LM head + cross-entropy loss + its gradient in one pass per
//! token chunk, so the `[N, V]` logits never exist; ranks of a sequence-parallel group agree on the
//! global count of valid tokens before any gradient is formed.
//!
//! docs/design.md 2.5; FPDT paper (Yao et al., arXiv 2408.16978) section 3.3 (the `[S/P, V]` logits
//! of a long sequence outgrow the device, so the head and the loss run chunk by chunk). Per chunk
//! of C tokens: logits `[C, V]` = x_c W^T (in T: fp32 for float, fp64 for double, from the
//! backend's device arena), the loss of each valid token, and right away dlogits, from which
//! dx_c = dlogits W (overwritten) and dW += dlogits^T x_c (accumulated).
//!
//! Behaves like PyTorch's `cross_entropy(logits, labels, ignore_index, reduction,
//! label_smoothing)`: with eps = label_smoothing, a token's loss is
//! (1 - eps) (lse - z_y) + eps (lse - mean_j z_j), and dloss/dz_j = p_j - (1 - eps) [j == y] - eps/V;
//! tokens whose label is ignore_index contribute 0 loss and exactly 0 gradient and are left out of
//! the mean's denominator. The mean divides by the count of valid tokens over all ranks.
#pragma once

#include "../backend/backend.hpp"
#include "../backend/host/fwd.hpp" // the default B; host_defaults.hpp defines it
#include "../comm/communicator.hpp"
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
#include <iomanip>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! How per-token losses are combined (PyTorch's `reduction`).
enum class loss_reduction : std::uint8_t {
  mean, //!< sum of the valid tokens' losses over all ranks / their global count (0 when none)
  sum,  //!< sum of the valid tokens' losses over all ranks
  none, //!< per-token losses; each token's gradient is scaled by its own upstream gradient
};

//! Options of a `chunked_cross_entropy`.
struct cross_entropy_options {
  index_t chunk = 0;                         //!< tokens per chunk (last may be shorter); 0: all at once
  std::int64_t ignore_index = -100;          //!< label of tokens without loss (PyTorch's default)
  double label_smoothing = 0.0;              //!< eps in [0, 1]
  loss_reduction reduction = loss_reduction::mean; //!< how the losses combine
};

//! What `forward_backward` returns.
template <class T> struct cross_entropy_result {
  //! mean: global sum / global valid count (0 when there are none, never NaN); sum: global sum;
  //! none: sum over this rank's tokens of grad_output[i] * loss_i (grad_output = ones when empty).
  double loss = 0.0;
  index_t valid_tokens = 0; //!< valid (non-ignored) tokens over all ranks
};

//! The chunked LM head + cross-entropy (see the file comment).
//!
//! \tparam T    dtype of hidden states, head weight, logits and gradients: float or double
//! \tparam B    backend whose device memory the host can address (`host_backend`)
//! \tparam Gemm a `gemm_policy<Gemm, T>`
//!
//! Workspace: one `[min(chunk, N), V]` logits buffer from the arena per call (count-only arena:
//! the call counts it, takes part in the collectives and computes nothing). Not thread-safe: one
//! call at a time per object.
template <class T, class B = host_backend, class Gemm = host_gemm>
class chunked_cross_entropy {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "chunked_cross_entropy: T must be float or double");
  static_assert(backend<B>, "chunked_cross_entropy: B must model fpdt::backend");
  static_assert(std::is_same_v<typename B::stream_type, host::stream>,
                "chunked_cross_entropy: the softmax runs on the host over the arena's logits; use "
                "host_backend (a device backend needs a device version of it)");
  static_assert(gemm_policy<Gemm, T>,
                "chunked_cross_entropy: Gemm must model gemm_policy<Gemm, T> (see core/gemm.hpp)");

public:
  //! Checks the sizes and options; allocates nothing. `be` must outlive the object.
  //! Errors: `errc::invalid_argument` naming the value and the rule (hidden, vocab >= 1;
  //! chunk >= 0; label_smoothing in [0, 1]; a known reduction).
  [[nodiscard]] static result<chunked_cross_entropy> create(B& be, index_t hidden, index_t vocab,
                                                            cross_entropy_options options = {},
                                                            Gemm gemm = {}) {
    if (hidden < 1 || vocab < 1)
      return make_error(errc::invalid_argument, "chunked_cross_entropy: hidden = ", hidden,
                        " and vocab = ", vocab, " must both be >= 1");
    if (options.chunk < 0)
      return make_error(errc::invalid_argument, "chunked_cross_entropy: chunk = ", options.chunk,
                        " must be >= 0 (0: all tokens at once)");
    if (!(options.label_smoothing >= 0.0 && options.label_smoothing <= 1.0))
      return make_error(errc::invalid_argument, "chunked_cross_entropy: label_smoothing = ",
                        options.label_smoothing, " must be in [0, 1]");
    if (options.reduction != loss_reduction::mean && options.reduction != loss_reduction::sum &&
        options.reduction != loss_reduction::none)
      return make_error(errc::invalid_argument, "chunked_cross_entropy: unknown reduction ",
                        static_cast<int>(options.reduction));
    return chunked_cross_entropy(be, hidden, vocab, options, std::move(gemm));
  }

  //! Loss and gradients of this rank's tokens, with the valid-token count and the loss summed
  //! over the ranks of `comm` (two collectives on `tag`, one after the other: an `all_gather` of
  //! 64 bytes per rank with the valid-token count, whether the rank's checks passed and its V, Hd,
  //! ignore_index, label_smoothing, reduction and (mean, sum) `scale`, before any gradient is
  //! formed; an `all_reduce_sum` of 2 doubles, the loss, at the end). Every rank must call it
  //! with the same layer options, V, Hd, `scale` (mean, sum) and tag; every rank returns the same
  //! loss and count.
  //!
  //! \param x              `[N, Hd]` hidden states (read only), N >= 0 (may differ per rank)
  //! \param w              `[V, Hd]` head weight (read only)
  //! \param labels         `[N]` int32: in [0, V), or ignore_index
  //! \param dx             `[N, Hd]` overwritten with dloss/dx (ignored tokens: exactly 0)
  //! \param dw             `[V, Hd]` accumulated (+=) with dloss/dw
  //! \param per_token_loss `[N]` or empty: when given, overwritten with each token's loss (0 for
  //!                       ignored tokens), whatever the reduction
  //! \param grad_output    reduction none only: `[N]` upstream gradient per token (empty: ones)
  //! \param scale          upstream gradient of the reduced loss (mean, sum); for none it
  //!                       multiplies grad_output. Finite.
  //! Errors (every rank returns an error when any rank fails its checks, and nothing is written
  //! on any rank): `errc::shape_mismatch` / `errc::invalid_argument` naming the tensor or the
  //! token index and label value; the arena's `errc::out_of_memory`; `errc::comm_error` on the
  //! ranks whose own checks passed while another's failed; `errc::invalid_argument` on every
  //! rank, naming rank 0's and the first differing rank's values, when the ranks disagree on V,
  //! Hd, ignore_index, label_smoothing, reduction or (mean, sum) `scale` (which would otherwise
  //! give each rank a different, silently wrong loss); the communicator's errors.
  template <communicator Comm>
  [[nodiscard]] result<cross_entropy_result<T>>
  forward_backward(Comm& comm, std::uint64_t tag, tensor_view<T const, 2> x,
                   tensor_view<T const, 2> w, std::span<std::int32_t const> labels,
                   tensor_view<T, 2> dx, tensor_view<T, 2> dw, tensor_view<T, 1> per_token_loss = {},
                   tensor_view<T const, 1> grad_output = {}, double scale = 1.0) {
    auto gather = [&](rank_record const& mine, std::vector<rank_record>& all) {
      all.assign(static_cast<std::size_t>(comm.size()), rank_record{});
      return comm.all_gather(&mine, all.data(), sizeof(rank_record), tag);
    };
    return run(gather, [&](double* v) { return comm.all_reduce_sum(v, v, 2, tag); }, x, w, labels, dx, dw,
               per_token_loss, grad_output, scale);
  }

  //! The one-rank (P = 1) version of the above: same arguments without the communicator.
  [[nodiscard]] result<cross_entropy_result<T>>
  forward_backward(tensor_view<T const, 2> x, tensor_view<T const, 2> w,
                   std::span<std::int32_t const> labels, tensor_view<T, 2> dx, tensor_view<T, 2> dw,
                   tensor_view<T, 1> per_token_loss = {}, tensor_view<T const, 1> grad_output = {},
                   double scale = 1.0) {
    auto gather = [](rank_record const& mine, std::vector<rank_record>& all) {
      all.assign(1, mine);
      return status{};
    };
    return run(gather, [](double*) { return status{}; }, x, w, labels, dx, dw, per_token_loss,
               grad_output, scale);
  }

  //! Device bytes a call over `tokens` tokens holds at its peak, exactly as the arena counts them:
  //! rounded(min(chunk, tokens) V sizeof(T)); SIZE_MAX when that overflows `size_t` (the arena
  //! then refuses the call).
  [[nodiscard]] std::size_t workspace_bytes(index_t tokens) const noexcept {
    return detail::chunked::buffer_bytes(tokens > 0 ? chunk_rows(tokens) : 0, vocab_, sizeof(T));
  }
  //! Device bytes a call holds at its peak for any N >= chunk (independent of N). With chunk = 0
  //! the workspace grows with N: returns 0, use `workspace_bytes(tokens)`.
  [[nodiscard]] std::size_t workspace_bytes() const noexcept {
    return chunk_ > 0 ? workspace_bytes(chunk_) : 0;
  }

  //! Hd.
  [[nodiscard]] index_t hidden() const noexcept { return hidden_; }
  //! V.
  [[nodiscard]] index_t vocab() const noexcept { return vocab_; }
  //! The options given to create.
  [[nodiscard]] cross_entropy_options const& options() const noexcept { return options_; }

private:
  chunked_cross_entropy(B& be, index_t hidden, index_t vocab, cross_entropy_options options, Gemm gemm)
      : be_(&be), hidden_(hidden), vocab_(vocab), chunk_(options.chunk), options_(options),
        gemm_(std::move(gemm)) {}

  [[nodiscard]] index_t chunk_rows(index_t n) const noexcept {
    return chunk_ == 0 ? n : std::min(chunk_, n);
  }

  [[nodiscard]] bool ignored(std::int32_t label) const noexcept {
    return static_cast<std::int64_t>(label) == options_.ignore_index;
  }

  // Checks everything a call reads and writes; nothing is written.
  [[nodiscard]] status check(tensor_view<T const, 2> const& x, tensor_view<T const, 2> const& w,
                             std::span<std::int32_t const> labels, tensor_view<T, 2> const& dx,
                             tensor_view<T, 2> const& dw, tensor_view<T, 1> const& per_token_loss,
                             tensor_view<T const, 1> const& grad_output, double scale) const {
    using namespace detail::chunked;
    constexpr char const* who = "chunked_cross_entropy";
    FPDT_TRY(check_matrix(who, "x", x, any_extent, hidden_));
    index_t const n = x.extent(0);
    FPDT_TRY(check_matrix(who, "w", w, vocab_, hidden_));
    if (static_cast<index_t>(labels.size()) != n)
      return make_error(errc::shape_mismatch, who, ": labels has ", labels.size(),
                        " entries, x has N = ", n, " tokens");
    if (n > 0 && labels.data() == nullptr)
      return make_error(errc::invalid_argument, who, ": labels [", n, "] has a null data pointer");
    FPDT_TRY(check_matrix(who, "dx", dx, n, hidden_));
    FPDT_TRY(check_matrix(who, "dw", dw, vocab_, hidden_));
    FPDT_TRY(check_vector(who, "per_token_loss", per_token_loss, n));
    if (!grad_output.empty() && options_.reduction != loss_reduction::none)
      return make_error(errc::invalid_argument, who,
                        ": grad_output is for reduction none; with mean or sum pass the scalar "
                        "upstream gradient as `scale`");
    FPDT_TRY(check_vector(who, "grad_output", grad_output, n));
    if (!std::isfinite(scale))
      return make_error(errc::invalid_argument, who, ": scale = ", scale, " must be finite");
    named_span lab{"labels", {}};
    if (n > 0) lab.span = {labels.data(), labels.data() + labels.size()};
    FPDT_TRY(check_no_alias(who,
                            {range_of("dx", dx), range_of("dw", dw), range_of("per_token_loss", per_token_loss)},
                            {range_of("x", x), range_of("w", w), lab, range_of("grad_output", grad_output)}));
    for (index_t i = 0; i < n; ++i) {
      std::int32_t const y = labels[static_cast<std::size_t>(i)];
      if (!ignored(y) && (y < 0 || y >= vocab_))
        return make_error(errc::invalid_argument, who, ": label ", y, " of token ", i,
                          " is outside [0, V = ", vocab_, ") and is not ignore_index ",
                          options_.ignore_index);
    }
    return {};
  }

  // What each rank tells the others before any gradient is formed (gathered as bytes).
  struct rank_record {
    std::int64_t valid = 0;        // this rank's valid tokens
    std::int64_t failed = 0;       // 1 when its checks or its allocation failed
    std::int64_t vocab = 0, hidden = 0, ignore_index = 0;
    double label_smoothing = 0.0;
    double scale = 0.0;            // mean, sum: the upstream gradient (none: 0, per rank)
    std::int64_t reduction = 0;
    [[nodiscard]] bool same_layer(rank_record const& o) const noexcept {
      return vocab == o.vocab && hidden == o.hidden && ignore_index == o.ignore_index &&
             label_smoothing == o.label_smoothing && scale == o.scale && reduction == o.reduction;
    }
    [[nodiscard]] std::string describe(std::size_t r) const {
      static constexpr char const* names[] = {"mean", "sum", "none"};
      std::ostringstream os; // enough digits to tell two doubles apart
      os << std::setprecision(17) << "rank " << r << " has V = " << vocab << ", Hd = " << hidden
         << ", ignore_index " << ignore_index << ", label_smoothing " << label_smoothing << ", reduction "
         << names[reduction < 0 || reduction > 2 ? 0 : reduction];
      if (reduction != static_cast<std::int64_t>(loss_reduction::none)) os << ", scale " << scale;
      return os.str();
    }
  };
  static_assert(sizeof(rank_record) == 64 && std::is_trivially_copyable_v<rank_record>);

  template <class Gather, class Reduce>
  [[nodiscard]] result<cross_entropy_result<T>>
  run(Gather&& gather, Reduce&& reduce, tensor_view<T const, 2> x, tensor_view<T const, 2> w,
      std::span<std::int32_t const> labels, tensor_view<T, 2> dx, tensor_view<T, 2> dw,
      tensor_view<T, 1> per_token_loss, tensor_view<T const, 1> grad_output, double scale) {
    using namespace detail::chunked;
    // Checks and the allocation first; then every rank learns whether all ranks can go on, so a
    // failing rank never leaves its peers waiting in a collective.
    status local = check(x, w, labels, dx, dw, per_token_loss, grad_output, scale);
    index_t const n = x.extent(0);
    index_t valid = 0;
    arena_allocation logits;
    device_arena& arena = be_->device_memory();
    if (local.ok()) {
      for (index_t i = 0; i < n; ++i) valid += ignored(labels[static_cast<std::size_t>(i)]) ? 0 : 1;
      if (n > 0) {
        auto a = arena.allocate(workspace_bytes(n), "chunked_cross_entropy logits [chunk, vocab]");
        if (a.ok()) logits = std::move(*a);
        else local = detail::chunked::with_pass_need(a.error(), "chunked_cross_entropy call", workspace_bytes(n), n,
                                                     chunk_);
      }
    }
    rank_record mine;
    mine.valid = valid;
    mine.failed = local.ok() ? 0 : 1;
    mine.vocab = vocab_;
    mine.hidden = hidden_;
    mine.ignore_index = options_.ignore_index;
    mine.label_smoothing = options_.label_smoothing;
    mine.reduction = static_cast<std::int64_t>(options_.reduction);
    mine.scale = options_.reduction == loss_reduction::none ? 0.0 : scale;
    std::vector<rank_record> all;
    FPDT_TRY(gather(mine, all));
    if (!local.ok()) return local;
    std::int64_t failed = 0, global_count = 0;
    for (rank_record const& r : all) {
      failed += r.failed;
      global_count += r.valid;
    }
    if (failed > 0)
      return make_error(errc::comm_error, "chunked_cross_entropy: ", failed,
                        " other rank(s) failed their checks (see their status); nothing was written");
    for (std::size_t r = 1; r < all.size(); ++r)
      if (!all[r].same_layer(all[0]))
        return make_error(errc::invalid_argument, "chunked_cross_entropy: the ranks disagree: ", all[0].describe(0),
                          "; ", all[r].describe(r),
                          " (every rank must use the same V, Hd, ignore_index, label_smoothing, reduction and, "
                          "for mean and sum, scale); nothing was written");
    double const global_valid = static_cast<double>(global_count);
    cross_entropy_result<T> out;
    out.valid_tokens = static_cast<index_t>(global_valid);

    double local_loss = 0.0;
    if (n > 0 && arena.mode() == arena_mode::allocate)
      local = chunks(x, w, labels, dx, dw, per_token_loss, grad_output, scale, global_valid,
                     logits.template as<T>(), local_loss);
    double sums[2] = {local_loss, local.ok() ? 0.0 : 1.0};
    FPDT_TRY(reduce(sums));
    if (!local.ok()) return local;
    if (sums[1] > 0.0)
      return make_error(errc::comm_error, "chunked_cross_entropy: ", sums[1],
                        " other rank(s) failed during the pass (see their status)");
    switch (options_.reduction) {
    case loss_reduction::mean: out.loss = global_valid > 0.0 ? sums[0] / global_valid : 0.0; break;
    case loss_reduction::sum: out.loss = sums[0]; break;
    case loss_reduction::none: out.loss = local_loss; break;
    }
    return out;
  }

  // The pass over the chunks; `loss` gets this rank's sum of losses (none: weighted by
  // grad_output).
  [[nodiscard]] status chunks(tensor_view<T const, 2> const& x, tensor_view<T const, 2> const& w,
                              std::span<std::int32_t const> labels, tensor_view<T, 2> const& dx,
                              tensor_view<T, 2> const& dw, tensor_view<T, 1> const& per_token_loss,
                              tensor_view<T const, 1> const& grad_output, double scale,
                              double global_valid, T* z, double& loss) const {
    using namespace detail::chunked;
    index_t const n = x.extent(0), rows = chunk_rows(n), v = vocab_, hd = hidden_;
    double const eps = options_.label_smoothing;
    index_t const ldx = leading_dim(x), lddx = leading_dim(dx);
    auto zero_dx_row = [&](index_t i) {
      T* r = row(dx, i);
      for (index_t j = 0; j < hd; ++j) r[j] = T(0);
    };
    for (index_t r0 = 0; r0 < n; r0 += rows) {
      index_t const c = std::min(rows, n - r0);
      bool any = false;
      for (index_t i = r0; i < r0 + c; ++i) any = any || !ignored(labels[static_cast<std::size_t>(i)]);
      if (!any) { // a chunk without a valid token: 0 loss and exactly 0 gradient, no product
        for (index_t i = r0; i < r0 + c; ++i) {
          zero_dx_row(i);
          if (!per_token_loss.empty()) per_token_loss(i) = T(0);
        }
        continue;
      }
      FPDT_TRY(gemm_(false, true, c, v, hd, T(1), row(x, r0), ldx, w.data(), leading_dim(w), T(0), z, v));
      for (index_t i = 0; i < c; ++i) {
        T* zr = z + i * v;
        index_t const t = r0 + i;
        std::int32_t const y = labels[static_cast<std::size_t>(t)];
        if (ignored(y)) {
          for (index_t j = 0; j < v; ++j) zr[j] = T(0);
          if (!per_token_loss.empty()) per_token_loss(t) = T(0);
          continue;
        }
        double mx = static_cast<double>(zr[0]);
        double zsum = 0.0;
        for (index_t j = 0; j < v; ++j) {
          mx = std::max(mx, static_cast<double>(zr[j]));
          zsum += static_cast<double>(zr[j]);
        }
        double se = 0.0;
        for (index_t j = 0; j < v; ++j) se += std::exp(static_cast<double>(zr[j]) - mx);
        double const lse = mx + std::log(se);
        double const li = (1.0 - eps) * (lse - static_cast<double>(zr[y])) +
                          eps * (lse - zsum / static_cast<double>(v));
        if (!per_token_loss.empty()) per_token_loss(t) = static_cast<T>(li);
        double weight = scale; // dloss_reduced / dloss_t
        switch (options_.reduction) {
        case loss_reduction::mean: weight = scale / global_valid; loss += li; break;
        case loss_reduction::sum: loss += li; break;
        case loss_reduction::none: {
          double const go = grad_output.empty() ? 1.0 : static_cast<double>(grad_output(t));
          weight = scale * go;
          loss += go * li;
          break;
        }
        }
        double const off = eps / static_cast<double>(v);
        for (index_t j = 0; j < v; ++j) {
          double d = std::exp(static_cast<double>(zr[j]) - lse) - off;
          if (j == y) d -= 1.0 - eps;
          zr[j] = static_cast<T>(d * weight);
        }
      }
      FPDT_TRY(gemm_(false, false, c, hd, v, T(1), z, v, w.data(), leading_dim(w), T(0), row(dx, r0), lddx));
      for (index_t i = r0; i < r0 + c; ++i)
        if (ignored(labels[static_cast<std::size_t>(i)])) zero_dx_row(i); // exactly 0, not -0 * w
      FPDT_TRY(gemm_(true, false, v, hd, c, T(1), z, v, row(x, r0), ldx, T(1), dw.data(), leading_dim(dw)));
    }
    return {};
  }

  B* be_;
  index_t hidden_;
  index_t vocab_;
  index_t chunk_;
  cross_entropy_options options_;
  Gemm gemm_;
};

FPDT_NAMESPACE_END
