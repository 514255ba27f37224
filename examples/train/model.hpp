// The model of fpdt-train: a decoder-only byte-level transformer written the way a trainer would
// write it, with fpdt's pieces for the parts that grow with the sequence (docs/design.md 2):
//
//   embedding -> L x [ RMSNorm -> q/k/v projections -> rotary embeddings at global positions ->
//   FPDT attention (sequence_parallel_attention) -> o projection -> residual ->
//   RMSNorm -> SwiGLU MLP (chunked_mlp) -> residual ] -> RMSNorm -> LM head + cross-entropy
//   (chunked_cross_entropy, mean over the valid tokens of all ranks)
//
// Each rank holds S/P tokens in FPDT's chunk-interleaved layout (schedule/token_layout.hpp).
// Everything indexed by token is processed one local chunk (C/P tokens) at a time:
// - the attention layer asks for q/k/v chunk by chunk (the source below computes RMSNorm, the
//   projections and the rotary embedding for just that chunk) and hands back out and gradient
//   chunks (the sinks apply the o projection and the projections' backward);
// - the MLP, the final norm and the loss run per chunk too.
// The per-token tensors that live from the forward to the backward (each layer's input, its
// post-attention residual and its attention output) are "token tensors": in pinned host memory
// when offload is on (activation offloading, FPDT paper section 3.3), in the device arena when it
// is off. Chunks of them are staged into device buffers from the arena before use, as a CUDA
// trainer would copy them to the GPU; every device byte is counted by the arena.
//
// `pieces::plain` swaps fpdt's pieces for plain ones (dense attention over the whole sequence,
// an MLP and a loss holding [N, F] and [N, V] at once) with the same glue code; the tests use it
// as the reference (P = 1 only), in double precision.
#pragma once

#include "../common/random.hpp"

#include <fpdt/attention/host/dense_reference.hpp>
#include <fpdt/core/gemm.hpp>
#include <fpdt/fpdt.hpp>
#include <fpdt/layers/chunked_cross_entropy.hpp>
#include <fpdt/layers/chunked_mlp.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace fpdt_train {

using fpdt::index_t;
using fpdt::result;
using fpdt::status;

//! Model dimensions. Vocabulary: bytes (256).
struct model_config {
  index_t layers = 2, hidden = 256, heads = 8, kv_heads = 2, ffn = 0, vocab = 256;
  bool sinks = false; //!< a learnable attention sink logit per head and layer (GPT-OSS)
  double rope_theta = 10000.0;
  double rms_eps = 1e-6;
  [[nodiscard]] index_t head_dim() const { return hidden / heads; }
  //! SwiGLU width: 8/3 hidden rounded up to a multiple of 64 unless given.
  [[nodiscard]] index_t ffn_size() const { return ffn > 0 ? ffn : (8 * hidden / 3 + 63) / 64 * 64; }
  [[nodiscard]] status check() const {
    if (layers < 1 || hidden < 2 || heads < 1 || kv_heads < 1 || vocab < 2)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: layers ", layers, ", hidden ", hidden,
                              ", heads ", heads, ", kv heads ", kv_heads, " must be positive");
    if (hidden % heads != 0 || head_dim() % 2 != 0)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: hidden ", hidden, " must be a multiple of heads ",
                              heads, " with an even head dim (rotary pairs); head dim is ", hidden / heads);
    if (heads % kv_heads != 0)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: heads ", heads,
                              " must be a multiple of kv heads ", kv_heads);
    return {};
  }
};

//! Offsets of every parameter in one flat array (elements).
struct layer_offsets {
  std::size_t g1, wq, wk, wv, wo, g2, up, gate, down;
  std::size_t sink; //!< H attention sink logits (none: 0 elements here)
};
struct param_layout {
  std::size_t emb = 0, gf = 0, head = 0, total = 0, heads = 0, sinks = 0;
  std::vector<layer_offsets> layer;
  static param_layout make(model_config const& c) {
    param_layout p;
    p.heads = static_cast<std::size_t>(c.heads);
    p.sinks = c.sinks ? p.heads : 0;
    auto take = [&](index_t n) {
      std::size_t const at = p.total;
      p.total += static_cast<std::size_t>(n);
      return at;
    };
    index_t const h = c.hidden, hd = c.heads * c.head_dim(), kd = c.kv_heads * c.head_dim(), f = c.ffn_size();
    p.emb = take(c.vocab * h);
    for (index_t l = 0; l < c.layers; ++l) {
      layer_offsets o{};
      o.g1 = take(h);
      o.wq = take(hd * h);
      o.wk = take(kd * h);
      o.wv = take(kd * h);
      o.wo = take(h * hd);
      o.g2 = take(h);
      o.up = take(f * h);
      o.gate = take(f * h);
      o.down = take(h * f);
      o.sink = take(c.sinks ? c.heads : 0);
      p.layer.push_back(o);
    }
    p.gf = take(h);
    p.head = take(c.vocab * h);
    return p;
  }
  //! Whether element i is exempt from weight decay: an RMSNorm gain (initialised to 1) or an
  //! attention sink logit (initialised to 0).
  [[nodiscard]] bool no_decay(std::size_t i, index_t hidden) const {
    auto in = [&](std::size_t at, std::size_t n) { return i >= at && i < at + n; };
    auto const hs = static_cast<std::size_t>(hidden);
    if (in(gf, hs)) return true;
    return std::any_of(layer.begin(), layer.end(),
                       [&](layer_offsets const& o) { return in(o.g1, hs) || in(o.g2, hs) || in(o.sink, sinks); });
  }
};

//! Deterministic initial parameters: gains 1, embeddings and head uniform with std 0.02 (head
//! 1/sqrt(hidden)), projections uniform with std 1/sqrt(fan_in).
template <class T> void init_params(model_config const& c, param_layout const& p, T* w, std::uint64_t seed) {
  auto uni = [seed](std::size_t i) { // [-1, 1)
    return fpdt_examples::uniform_pm1(seed * 0x9E3779B97F4A7C15ull + i * 0xBF58476D1CE4E5B9ull + 1);
  };
  auto fill = [&](std::size_t at, index_t n, double std_dev) {
    for (std::size_t i = at; i < at + static_cast<std::size_t>(n); ++i)
      w[i] = static_cast<T>(uni(i) * std_dev * std::sqrt(3.0));
  };
  auto ones = [&](std::size_t at) { std::fill(w + at, w + at + c.hidden, T(1)); };
  index_t const h = c.hidden, hd = c.heads * c.head_dim(), kd = c.kv_heads * c.head_dim(), f = c.ffn_size();
  double const sh = 1.0 / std::sqrt(static_cast<double>(h));
  fill(p.emb, c.vocab * h, 0.02 * 25); // O(1) embeddings: RMSNorm follows anyway
  for (auto const& o : p.layer) {
    ones(o.g1);
    fill(o.wq, hd * h, sh);
    fill(o.wk, kd * h, sh);
    fill(o.wv, kd * h, sh);
    fill(o.wo, h * hd, 1.0 / std::sqrt(static_cast<double>(hd)) / std::sqrt(2.0 * static_cast<double>(c.layers)));
    ones(o.g2);
    fill(o.up, f * h, sh);
    fill(o.gate, f * h, sh);
    fill(o.down, h * f, 1.0 / std::sqrt(static_cast<double>(f)) / std::sqrt(2.0 * static_cast<double>(c.layers)));
    std::fill(w + o.sink, w + o.sink + p.sinks, T(0));
  }
  ones(p.gf);
  fill(p.head, c.vocab * h, sh);
}

//! A per-token tensor `[rows, cols]` (row-major) living from the forward to the backward: in
//! pinned host memory (offloaded) or in the device arena. Zeroed on creation.
template <class T> class token_tensor {
public:
  token_tensor() = default;
  static result<token_tensor> make(fpdt::host_backend& be, index_t rows, index_t cols, bool on_host,
                                   char const* what) {
    token_tensor t;
    t.rows_ = rows;
    t.cols_ = cols;
    t.on_host_ = on_host;
    std::size_t const bytes = static_cast<std::size_t>(rows * cols) * sizeof(T);
    if (on_host) {
      auto b = be.pinned_memory().acquire(bytes);
      if (!b) return b.error().with_context(std::string("token tensor ") + what);
      t.host_ = std::move(*b);
      t.ptr_ = t.host_.template as<T>();
    } else {
      auto a = be.device_memory().allocate(bytes, what);
      if (!a) return a.error();
      t.dev_ = std::move(*a);
      t.ptr_ = t.dev_.template as<T>();
    }
    if (bytes > 0) std::memset(static_cast<void*>(t.ptr_), 0, bytes);
    return t;
  }
  [[nodiscard]] T* row(index_t r) const noexcept { return ptr_ + r * cols_; }
  [[nodiscard]] index_t cols() const noexcept { return cols_; }
  [[nodiscard]] bool on_host() const noexcept { return on_host_; }

private:
  fpdt::arena_allocation dev_;
  fpdt::pinned_block host_;
  T* ptr_ = nullptr;
  index_t rows_ = 0, cols_ = 0;
  bool on_host_ = false;
};

//! Rows [r0, r0 + n) of a token tensor on the device: the tensor's own memory when it lives in
//! the arena, else a staged copy in an arena buffer (written back by `put`).
template <class T> struct device_rows {
  fpdt::arena_allocation staging;
  T* p = nullptr;
};
template <class T>
result<device_rows<T>> fetch(fpdt::host_backend& be, token_tensor<T> const& t, index_t r0, index_t n, bool copy_in = true) {
  device_rows<T> d;
  if (!t.on_host()) {
    d.p = t.row(r0);
    return d;
  }
  auto a = be.device_memory().allocate(static_cast<std::size_t>(n * t.cols()) * sizeof(T), "staged token rows");
  if (!a) return a.error();
  d.staging = std::move(*a);
  d.p = d.staging.template as<T>();
  if (copy_in) std::memcpy(static_cast<void*>(d.p), t.row(r0), static_cast<std::size_t>(n * t.cols()) * sizeof(T));
  return d;
}
template <class T> void put(device_rows<T> const& d, token_tensor<T> const& t, index_t r0, index_t n) {
  if (t.on_host()) std::memcpy(static_cast<void*>(t.row(r0)), d.p, static_cast<std::size_t>(n * t.cols()) * sizeof(T));
}

//! A scratch device buffer of n elements from the arena.
template <class T> result<device_rows<T>> scratch(fpdt::host_backend& be, index_t n, char const* what) {
  device_rows<T> d;
  auto a = be.device_memory().allocate(static_cast<std::size_t>(n) * sizeof(T), what);
  if (!a) return a.error();
  d.staging = std::move(*a);
  d.p = d.staging.template as<T>();
  return d;
}

// ---- glue math (row-major, per chunk) ----

//! y[r] = x[r] / rms(x[r]) * g for n rows of width h.
template <class T> void rmsnorm(T const* x, T const* g, T* y, index_t n, index_t h, double eps) {
  for (index_t r = 0; r < n; ++r) {
    double ss = 0;
    for (index_t i = 0; i < h; ++i) ss += static_cast<double>(x[r * h + i]) * static_cast<double>(x[r * h + i]);
    double const inv = 1.0 / std::sqrt(ss / static_cast<double>(h) + eps);
    for (index_t i = 0; i < h; ++i) y[r * h + i] = static_cast<T>(static_cast<double>(x[r * h + i]) * inv * static_cast<double>(g[i]));
  }
}
//! dx[r] += d/dx of rmsnorm given dy; dg += sum over rows of dy * x / rms.
template <class T> void rmsnorm_backward(T const* x, T const* g, T const* dy, T* dx, T* dg, index_t n, index_t h, double eps) {
  for (index_t r = 0; r < n; ++r) {
    double ss = 0;
    for (index_t i = 0; i < h; ++i) ss += static_cast<double>(x[r * h + i]) * static_cast<double>(x[r * h + i]);
    double const inv = 1.0 / std::sqrt(ss / static_cast<double>(h) + eps);
    double dot = 0;
    for (index_t i = 0; i < h; ++i) {
      double const xh = static_cast<double>(x[r * h + i]) * inv;
      double const dxh = static_cast<double>(dy[r * h + i]) * static_cast<double>(g[i]);
      dg[i] = static_cast<T>(static_cast<double>(dg[i]) + static_cast<double>(dy[r * h + i]) * xh);
      dot += dxh * xh;
    }
    dot /= static_cast<double>(h);
    for (index_t i = 0; i < h; ++i) {
      double const xh = static_cast<double>(x[r * h + i]) * inv;
      double const dxh = static_cast<double>(dy[r * h + i]) * static_cast<double>(g[i]);
      dx[r * h + i] = static_cast<T>(static_cast<double>(dx[r * h + i]) + inv * (dxh - xh * dot));
    }
  }
}
//! Rotary embedding (rotate-half pairs (i, i + D/2)) of x [n, heads, D] at positions pos[n];
//! `inverse` applies the transpose (the backward).
template <class T>
void rope(T* x, index_t n, index_t heads, index_t d, index_t const* pos, double theta, bool inverse) {
  index_t const half = d / 2;
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < half; ++i) {
      double const ang = static_cast<double>(pos[r]) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      double const c = std::cos(ang), s = inverse ? -std::sin(ang) : std::sin(ang);
      for (index_t hh = 0; hh < heads; ++hh) {
        T* v = x + (r * heads + hh) * d;
        double const a = static_cast<double>(v[i]), b = static_cast<double>(v[i + half]);
        v[i] = static_cast<T>(a * c - b * s);
        v[i + half] = static_cast<T>(b * c + a * s);
      }
    }
}

// ---- plain pieces (the reference: whole local sequence at once; P = 1) ----

//! Dense causal GQA attention with attention sinks over n tokens, float64 (docs/design.md 3.4a):
//! row i of head h has probabilities p_j = exp(s_j - lse) over keys j <= i, lse = log(exp(sink_h)
//! + sum_j exp(s_j)); out = sum_j p_j v_j. The backward: dS = p (dout v_j - delta), delta =
//! rowsum(dout * out), and dsink_h = -sum_i p_sink delta (overwritten).
template <class T>
void dense_sink_attention(index_t n, index_t h, index_t hk, index_t d, T const* q, T const* k, T const* v, T* out,
                          T const* dout, T* dq, T* dk, T* dv, T const* sinks, T* dsink) {
  double const scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto qa = [&](index_t i, index_t hh) { return static_cast<std::size_t>((i * h + hh) * d); };
  auto ka = [&](index_t j, index_t g) { return static_cast<std::size_t>((j * hk + g) * d); };
  if (dout != nullptr) {
    std::fill(dq, dq + n * h * d, T(0));
    std::fill(dk, dk + n * hk * d, T(0));
    std::fill(dv, dv + n * hk * d, T(0));
  }
  std::vector<double> p(static_cast<std::size_t>(n)), o(static_cast<std::size_t>(d));
  for (index_t hh = 0; hh < h; ++hh) {
    index_t const g = hh / (h / hk);
    double const sink = static_cast<double>(sinks[hh]);
    double ds = 0;
    for (index_t i = 0; i < n; ++i) {
      double m = sink;
      for (index_t j = 0; j <= i; ++j) {
        double x = 0;
        for (index_t e = 0; e < d; ++e) x += static_cast<double>(q[qa(i, hh) + static_cast<std::size_t>(e)]) * static_cast<double>(k[ka(j, g) + static_cast<std::size_t>(e)]);
        p[static_cast<std::size_t>(j)] = x * scale;
        m = std::max(m, x * scale);
      }
      double l = std::exp(sink - m);
      for (index_t j = 0; j <= i; ++j) l += std::exp(p[static_cast<std::size_t>(j)] - m);
      double const lse = m + std::log(l);
      std::fill(o.begin(), o.end(), 0.0);
      for (index_t j = 0; j <= i; ++j) {
        double& pj = p[static_cast<std::size_t>(j)];
        pj = std::exp(pj - lse);
        for (index_t e = 0; e < d; ++e) o[static_cast<std::size_t>(e)] += pj * static_cast<double>(v[ka(j, g) + static_cast<std::size_t>(e)]);
      }
      if (dout == nullptr) {
        for (index_t e = 0; e < d; ++e) out[qa(i, hh) + static_cast<std::size_t>(e)] = static_cast<T>(o[static_cast<std::size_t>(e)]);
        continue;
      }
      T const* go = dout + qa(i, hh);
      double delta = 0;
      for (index_t e = 0; e < d; ++e) delta += static_cast<double>(go[e]) * o[static_cast<std::size_t>(e)];
      ds -= std::exp(sink - lse) * delta;
      for (index_t j = 0; j <= i; ++j) {
        double const pj = p[static_cast<std::size_t>(j)];
        double dp = 0;
        for (index_t e = 0; e < d; ++e) dp += static_cast<double>(go[e]) * static_cast<double>(v[ka(j, g) + static_cast<std::size_t>(e)]);
        double const dsc = pj * (dp - delta) * scale;
        for (index_t e = 0; e < d; ++e) {
          auto const x = static_cast<std::size_t>(e);
          dq[qa(i, hh) + x] = static_cast<T>(static_cast<double>(dq[qa(i, hh) + x]) + dsc * static_cast<double>(k[ka(j, g) + x]));
          dk[ka(j, g) + x] = static_cast<T>(static_cast<double>(dk[ka(j, g) + x]) + dsc * static_cast<double>(q[qa(i, hh) + x]));
          dv[ka(j, g) + x] = static_cast<T>(static_cast<double>(dv[ka(j, g) + x]) + pj * static_cast<double>(go[e]));
        }
      }
    }
    if (dout != nullptr) dsink[hh] = static_cast<T>(ds);
  }
}

//! Dense causal GQA attention over n tokens (fpdt::dense_reference_*, float64): q [n, H, D],
//! k, v [n, Hkv, D] -> out [n, H, D]; with dout given, the gradients instead (dq, dk, dv
//! overwritten). With `sinks` [H], `dense_sink_attention` (and `dsink` [H] overwritten).
template <class T>
status dense_attention(index_t n, index_t h, index_t hk, index_t d, T const* q, T const* k, T const* v, T* out,
                       T const* dout, T* dq, T* dk, T* dv, T const* sinks = nullptr, T* dsink = nullptr) {
  if (sinks != nullptr) {
    dense_sink_attention(n, h, hk, d, q, k, v, out, dout, dq, dk, dv, sinks, dsink);
    return {};
  }
  auto view = [&](T const* x, index_t heads) { return fpdt::contiguous_view(x, std::array<index_t, 3>{n, heads, d}).value(); };
  fpdt::dense_reference_options const opt{.causal = true};
  auto r = dout == nullptr ? fpdt::dense_reference_forward(view(q, h), view(k, hk), view(v, hk), opt)
                           : fpdt::dense_reference_backward(view(q, h), view(k, hk), view(v, hk), view(dout, h), opt);
  if (!r) return r.error();
  auto put = [](std::vector<double> const& x, T* to) { std::transform(x.begin(), x.end(), to, [](double e) { return static_cast<T>(e); }); };
  if (dout == nullptr) put(r->out, out);
  else {
    put(r->dq, dq);
    put(r->dk, dk);
    put(r->dv, dv);
  }
  return {};
}

//! Which pieces the model uses for attention, MLP and loss.
enum class pieces { fpdt, plain };

//! Run options of one rank.
struct run_options {
  index_t seq = 16384;   //!< global sequence S, tokens
  index_t chunk = 4096;  //!< global chunk C, tokens (local chunks are C/P)
  bool offload = true;   //!< token tensors and attention chunks in pinned host memory
  pieces kind = pieces::fpdt;
  unsigned kernel_threads = 1; //!< threads of the host attention kernel
  index_t window = 0;          //!< causal sliding window of W tokens (0: none)
  //! The attention mask of the run, without documents (those come with each step's window).
  [[nodiscard]] fpdt::attention_mask mask() const noexcept {
    return window > 0 ? fpdt::causal_window_mask(window) : fpdt::causal_mask;
  }
};

struct step_stats {
  double loss = 0;
  index_t valid_tokens = 0;
};

//! One rank of the model: parameters, gradients and AdamW state in the device arena (fp32 or
//! fp64), the attention layers, and the forward and backward of one step.
template <class T, class Comm, class Gemm = fpdt::host_gemm> class model_rank {
  struct no_attention {};
  static constexpr bool has_fpdt = std::is_same_v<T, float>;
  using attention_t = std::conditional_t<has_fpdt, fpdt::sequence_parallel_attention<float, Comm>, no_attention>;
  using mlp_t = fpdt::chunked_mlp<T, fpdt::host_backend, Gemm>;
  using loss_t = fpdt::chunked_cross_entropy<T, fpdt::host_backend, Gemm>;

public:
  using progress_fn = std::function<void(char const* phase, index_t layer)>;

  static result<std::unique_ptr<model_rank>> create(fpdt::host_backend& be, Comm& comm, model_config cfg,
                                                    run_options ro, Gemm gemm = {}, std::uint64_t seed = 1) {
    FPDT_TRY(cfg.check());
    index_t const p = static_cast<index_t>(comm.size());
    auto tl = fpdt::token_layout::make(ro.seq, p, ro.chunk);
    if (!tl) return tl.error();
    if (ro.kind == pieces::plain && p != 1)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: the plain pieces run on one rank, not ", p);
    if (ro.kind == pieces::fpdt && !has_fpdt)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: fpdt pieces need T = float (the attention kernel)");
    std::unique_ptr<model_rank> m(new model_rank(be, comm, cfg, ro, *tl, gemm));
    m->layout_ = param_layout::make(cfg);
    std::size_t const n = m->layout_.total;
    for (auto* buf : {&m->w_, &m->g_, &m->m1_, &m->m2_}) {
      auto a = be.device_memory().allocate(n * sizeof(T), "parameters, gradients and AdamW moments");
      if (!a) return a.error();
      *buf = std::move(*a);
      std::memset(buf->data(), 0, n * sizeof(T));
    }
    init_params(cfg, m->layout_, m->w(), seed);
    index_t const pc = tl->piece();
    index_t const rows = ro.kind == pieces::fpdt ? pc : tl->local_tokens();
    auto mlp = mlp_t::create(be, {cfg.hidden, cfg.ffn_size(), fpdt::mlp_activation::swiglu}, {.chunk = rows}, gemm);
    if (!mlp) return mlp.error();
    m->mlp_.emplace(std::move(*mlp));
    auto loss = loss_t::create(be, cfg.hidden, cfg.vocab, {.chunk = rows, .reduction = fpdt::loss_reduction::sum}, gemm);
    if (!loss) return loss.error();
    m->loss_.emplace(std::move(*loss));
    FPDT_TRY(m->make_attention(ro.mask()));
    return m;
  }

  //! Builds the attention layers with `mask` (a step with other documents sets its mask on them:
  //! `set_mask`). Errors: those of the layer's `create`.
  status make_attention([[maybe_unused]] fpdt::attention_mask const& mask) {
    if constexpr (has_fpdt) {
      if (ro_.kind != pieces::fpdt) return {};
      attn_.clear();
      for (index_t l = 0; l < cfg_.layers; ++l) {
        auto a = fpdt::sequence_parallel_attention<float, Comm>::create(
            *be_, *comm_, {ro_.seq, cfg_.heads, cfg_.kv_heads, cfg_.head_dim()},
            {.chunk = ro_.chunk, .offload = ro_.offload, .ring_slots = 2, .mask = mask},
            static_cast<std::uint64_t>(l % 63 + 1), fpdt::host_chunk_kernel{ro_.kernel_threads});
        if (!a) return a.error();
        if (cfg_.sinks) { // the layer reads the logits each forward and writes their gradient each backward
          auto const e = std::array<index_t, 1>{cfg_.heads};
          FPDT_TRY(a->bind_sinks(fpdt::contiguous_view<float const>(w() + lo(l).sink, e).value(),
                                 fpdt::contiguous_view(grad() + lo(l).sink, e).value()));
        }
        attn_.push_back(std::move(*a));
      }
    }
    return {};
  }

  [[nodiscard]] T* w() const noexcept { return w_.template as<T>(); }
  [[nodiscard]] T* grad() const noexcept { return g_.template as<T>(); }
  [[nodiscard]] param_layout const& layout() const noexcept { return layout_; }
  [[nodiscard]] fpdt::token_layout const& tokens() const noexcept { return tl_; }
  [[nodiscard]] attention_t const& attention(index_t l) const { return attn_[static_cast<std::size_t>(l)]; }
  void on_progress(progress_fn f) { progress_ = std::move(f); }

  //! Forward and backward over one window of S + 1 bytes (inputs window[0..S), labels
  //! window[1..S]); the gradients (summed over ranks) overwrite `grad()`. Returns the global
  //! mean loss. With `documents` (cu_seqlens offsets of the packed documents in the window, 0
  //! first and S last; empty: one sequence) attention sees only each token's own document,
  //! rotary positions restart at every document and each document's last token has no label.
  //! Errors: shapes, the documents' rules, memory (the arena budget), communication.
  result<step_stats> forward_backward(std::span<std::uint8_t const> window, std::span<index_t const> documents = {}) {
    if (static_cast<index_t>(window.size()) != tl_.sequence() + 1)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: window of ", window.size(),
                              " bytes, need S + 1 = ", tl_.sequence() + 1);
    index_t const n = tl_.local_tokens(), h = cfg_.hidden, r = comm_->rank();
    ids_.resize(static_cast<std::size_t>(n));
    labels_.resize(ids_.size());
    pos_.resize(ids_.size());
    for (index_t t = 0; t < n; ++t) {
      index_t const gp = tl_.global_position(r, t);
      pos_[static_cast<std::size_t>(t)] = gp;
      ids_[static_cast<std::size_t>(t)] = window[static_cast<std::size_t>(gp)];
      labels_[static_cast<std::size_t>(t)] = window[static_cast<std::size_t>(gp + 1)];
    }
    valid_ = tl_.sequence();
    if (!documents.empty() && ro_.kind != pieces::fpdt)
      return fpdt::make_error(fpdt::errc::not_supported, "model: documents need the fpdt pieces");
    for (std::size_t d = 0; d + 1 < documents.size(); ++d) valid_ -= documents[d + 1] > documents[d] ? 1 : 0;
    if (valid_ < 1)
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: every document of the window has one token, so no "
                              "token has a label (", documents.size() - 1, " documents in S = ", tl_.sequence(), ")");
    if (!documents.empty() || documented_) {
      // Position ids and labels of packed documents come from the token layout, in its order.
      if (!documents.empty()) {
        FPDT_TRY(tl_.document_position_ids(r, documents, fpdt::tensor_view<index_t, 1>(pos_.data(), {n}, {1})));
        FPDT_TRY(tl_.mask_document_ends(r, documents, fpdt::tensor_view<std::int32_t, 1>(labels_.data(), {n}, {1}),
                                        std::int32_t{-100}));
      }
      // The layers' masks follow the batch (set_mask: schedules rebuilt, lanes and sinks kept).
      if constexpr (has_fpdt) {
        fpdt::attention_mask const m = documents.empty() ? ro_.mask() : fpdt::with_documents(ro_.mask(), documents);
        FPDT_TRY(fpdt::check_documents(m, tl_.sequence(), "model")); // before any layer changes
        for (auto& a : attn_) FPDT_TRY(a.set_mask(m));
      }
      documented_ = !documents.empty();
    }
    std::memset(g_.data(), 0, layout_.total * sizeof(T));
    bool const host = ro_.offload;
    index_t const lc = cfg_.layers, hq = cfg_.heads * cfg_.head_dim();
    std::vector<token_tensor<T>> x, xm, at;
    for (index_t l = 0; l <= lc; ++l) {
      auto t = token_tensor<T>::make(*be_, n, h, host, "layer input (checkpoint)");
      if (!t) return t.error();
      x.push_back(std::move(*t));
    }
    for (index_t l = 0; l < lc; ++l) {
      auto a = token_tensor<T>::make(*be_, n, h, host, "post-attention residual");
      if (!a) return a.error();
      xm.push_back(std::move(*a));
      auto b = token_tensor<T>::make(*be_, n, hq, host, "attention output");
      if (!b) return b.error();
      at.push_back(std::move(*b));
    }
    // Embedding, chunk by chunk.
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto d = fetch(*be_, x[0], r0, rows_, false);
      if (!d) return d.error();
      for (index_t t = 0; t < rows_; ++t)
        std::memcpy(static_cast<void*>(d->p + t * h), w() + layout_.emb + static_cast<std::size_t>(ids_[static_cast<std::size_t>(r0 + t)]) * static_cast<std::size_t>(h), static_cast<std::size_t>(h) * sizeof(T));
      put(*d, x[0], r0, rows_);
    }
    for (index_t l = 0; l < lc; ++l) {
      progress("forward", l);
      FPDT_TRY(attention_forward(l, x[static_cast<std::size_t>(l)], xm[static_cast<std::size_t>(l)], at[static_cast<std::size_t>(l)]));
      FPDT_TRY(mlp_forward(l, xm[static_cast<std::size_t>(l)], x[static_cast<std::size_t>(l + 1)]));
    }
    // Final norm and loss (its gradient comes in the same pass).
    progress("loss", lc);
    auto xf = token_tensor<T>::make(*be_, n, h, host, "final norm output");
    if (!xf) return xf.error();
    auto dx = token_tensor<T>::make(*be_, n, h, host, "hidden-state gradient");
    if (!dx) return dx.error();
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto xr = fetch(*be_, x[static_cast<std::size_t>(lc)], r0, rows_);
      auto yr = fetch(*be_, *xf, r0, rows_, false);
      if (!xr) return xr.error();
      if (!yr) return yr.error();
      rmsnorm(xr->p, w() + layout_.gf, yr->p, rows_, h, cfg_.rms_eps);
      put(*yr, *xf, r0, rows_);
    }
    step_stats out;
    {
      auto dxf = token_tensor<T>::make(*be_, n, h, host, "final norm gradient");
      if (!dxf) return dxf.error();
      auto st = loss(*xf, *dxf);
      if (!st) return st.error();
      out = *st;
      for (index_t r0 = 0; r0 < n; r0 += rows_) {
        auto xr = fetch(*be_, x[static_cast<std::size_t>(lc)], r0, rows_);
        auto gr = fetch(*be_, *dxf, r0, rows_);
        auto dr = fetch(*be_, *dx, r0, rows_);
        if (!xr) return xr.error();
        if (!gr) return gr.error();
        if (!dr) return dr.error();
        rmsnorm_backward(xr->p, w() + layout_.gf, gr->p, dr->p, grad() + layout_.gf, rows_, h, cfg_.rms_eps);
        put(*dr, *dx, r0, rows_);
      }
    }
    auto da = token_tensor<T>::make(*be_, n, h, host, "attention input gradient");
    if (!da) return da.error();
    for (index_t l = lc - 1; l >= 0; --l) {
      progress("backward", l);
      FPDT_TRY(mlp_backward(l, xm[static_cast<std::size_t>(l)], *dx));
      FPDT_TRY(attention_backward(l, x[static_cast<std::size_t>(l)], at[static_cast<std::size_t>(l)], *dx, *da));
    }
    // Embedding gradient.
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto dr = fetch(*be_, *dx, r0, rows_);
      if (!dr) return dr.error();
      for (index_t t = 0; t < rows_; ++t) {
        T* ge = grad() + layout_.emb + static_cast<std::size_t>(ids_[static_cast<std::size_t>(r0 + t)]) * static_cast<std::size_t>(h);
        for (index_t i = 0; i < h; ++i) ge[i] += dr->p[t * h + i];
      }
    }
    // Sequence parallelism: every rank saw different tokens of the same parameters.
    if (comm_->size() > 1) FPDT_TRY(comm_->all_reduce_sum(grad(), grad(), layout_.total, grad_tag));
    return out;
  }

  //! AdamW (decoupled weight decay, not on gains) with global-norm clipping at `clip`; `step`
  //! counts from 1. Returns the gradient norm before clipping.
  double adamw(double lr, int step, double clip = 1.0, double beta1 = 0.9, double beta2 = 0.95,
               double eps = 1e-8, double weight_decay = 0.1) {
    T* p = w();
    T* g = grad();
    T* m = m1_.template as<T>();
    T* v = m2_.template as<T>();
    double norm = 0;
    for (std::size_t i = 0; i < layout_.total; ++i) norm += static_cast<double>(g[i]) * static_cast<double>(g[i]);
    norm = std::sqrt(norm);
    double const sc = norm > clip ? clip / norm : 1.0;
    double const b1c = 1 - std::pow(beta1, step), b2c = 1 - std::pow(beta2, step);
    for (std::size_t i = 0; i < layout_.total; ++i) {
      double const gi = static_cast<double>(g[i]) * sc;
      double const mi = beta1 * static_cast<double>(m[i]) + (1 - beta1) * gi;
      double const vi = beta2 * static_cast<double>(v[i]) + (1 - beta2) * gi * gi;
      m[i] = static_cast<T>(mi);
      v[i] = static_cast<T>(vi);
      double pi = static_cast<double>(p[i]);
      if (!layout_.no_decay(i, cfg_.hidden)) pi -= lr * weight_decay * pi;
      pi -= lr * (mi / b1c) / (std::sqrt(vi / b2c) + eps);
      p[i] = static_cast<T>(pi);
    }
    return norm;
  }

private:
  static constexpr std::uint64_t grad_tag = std::uint64_t{1} << 30;
  static constexpr std::uint64_t loss_tag = (std::uint64_t{1} << 30) + 1;

  model_rank(fpdt::host_backend& be, Comm& comm, model_config cfg, run_options ro, fpdt::token_layout tl, Gemm gemm)
      : be_(&be), comm_(&comm), cfg_(cfg), ro_(ro), tl_(tl), gemm_(gemm),
        rows_(ro.kind == pieces::fpdt ? tl.piece() : tl.local_tokens()) {}

  void progress(char const* phase, index_t l) {
    if (progress_) progress_(phase, l);
  }

  [[nodiscard]] layer_offsets const& lo(index_t l) const { return layout_.layer[static_cast<std::size_t>(l)]; }
  [[nodiscard]] T const* sinks_of(index_t l) const { return cfg_.sinks ? w() + lo(l).sink : nullptr; }

  // y[n, out] = x[n, in] W[out, in]^T (+ beta y)
  status linear(T const* x, std::size_t wo, index_t n, index_t in, index_t out, T* y, T beta = T(0)) const {
    return gemm_(false, true, n, out, in, T(1), x, in, w() + wo, in, beta, y, out);
  }
  // dx[n, in] += dy[n, out] W[out, in];  dW[out, in] += dy^T x
  status linear_backward(T const* x, T const* dy, std::size_t wo, index_t n, index_t in, index_t out, T* dx) const {
    if (dx != nullptr) FPDT_TRY(gemm_(false, false, n, in, out, T(1), dy, out, w() + wo, in, T(1), dx, in));
    return gemm_(true, false, out, in, n, T(1), dy, out, x, in, T(1), grad() + wo, in);
  }

  // The q/k/v of local chunk rows [r0, r0 + rows) from the layer input: RMSNorm, projections,
  // rotary embedding at global positions.
  status qkv(index_t l, token_tensor<T> const& x, index_t r0, index_t rows, T* q, T* k, T* v) const {
    index_t const h = cfg_.hidden, d = cfg_.head_dim(), hq = cfg_.heads * d, hk = cfg_.kv_heads * d;
    auto xr = fetch(*be_, x, r0, rows);
    if (!xr) return xr.error();
    auto a = scratch<T>(*be_, rows * h, "normed chunk");
    if (!a) return a.error();
    rmsnorm(xr->p, w() + lo(l).g1, a->p, rows, h, cfg_.rms_eps);
    FPDT_TRY(linear(a->p, lo(l).wq, rows, h, hq, q));
    FPDT_TRY(linear(a->p, lo(l).wk, rows, h, hk, k));
    FPDT_TRY(linear(a->p, lo(l).wv, rows, h, hk, v));
    rope(q, rows, cfg_.heads, d, pos_.data() + r0, cfg_.rope_theta, false);
    rope(k, rows, cfg_.kv_heads, d, pos_.data() + r0, cfg_.rope_theta, false);
    return {};
  }

  // out rows -> attention output tensor, and xm = x + out Wo^T.
  status attn_out(index_t l, token_tensor<T> const& x, token_tensor<T>& xm, token_tensor<T>& at, index_t r0,
                  index_t rows, T const* out) const {
    index_t const h = cfg_.hidden, hq = cfg_.heads * cfg_.head_dim();
    auto ar = fetch(*be_, at, r0, rows, false);
    auto xr = fetch(*be_, x, r0, rows);
    auto mr = fetch(*be_, xm, r0, rows, false);
    if (!ar) return ar.error();
    if (!xr) return xr.error();
    if (!mr) return mr.error();
    std::memcpy(static_cast<void*>(ar->p), out, static_cast<std::size_t>(rows * hq) * sizeof(T));
    put(*ar, at, r0, rows);
    std::memcpy(static_cast<void*>(mr->p), xr->p, static_cast<std::size_t>(rows * h) * sizeof(T));
    FPDT_TRY(linear(out, lo(l).wo, rows, hq, h, mr->p, T(1)));
    put(*mr, xm, r0, rows);
    return {};
  }

  // Gradient of a projection's output chunk g [rows, heads, D] (un-roped when `roped`): dW += g^T a,
  // da += g W, with a recomputed from the layer input.
  template <class G>
  status qkv_backward(index_t l, token_tensor<T> const& x, token_tensor<T>& da, index_t r0, index_t rows, G const* g,
                      index_t heads, std::size_t wo, bool roped) const {
    index_t const h = cfg_.hidden, d = cfg_.head_dim(), width = heads * d;
    auto gt = scratch<T>(*be_, rows * width, "projection gradient chunk");
    if (!gt) return gt.error();
    for (index_t i = 0; i < rows * width; ++i) gt->p[i] = static_cast<T>(g[i]);
    if (roped) rope(gt->p, rows, heads, d, pos_.data() + r0, cfg_.rope_theta, true);
    auto xr = fetch(*be_, x, r0, rows);
    if (!xr) return xr.error();
    auto a = scratch<T>(*be_, rows * h, "normed chunk");
    if (!a) return a.error();
    rmsnorm(xr->p, w() + lo(l).g1, a->p, rows, h, cfg_.rms_eps);
    auto dr = fetch(*be_, da, r0, rows);
    if (!dr) return dr.error();
    FPDT_TRY(linear_backward(a->p, gt->p, wo, rows, h, width, dr->p));
    put(*dr, da, r0, rows);
    return {};
  }

  struct source {
    model_rank const* m;
    index_t l;
    token_tensor<T> const* x;
    [[nodiscard]] status produce(index_t, index_t first, fpdt::tensor_view<T, 3> const& q,
                                 fpdt::tensor_view<T, 3> const& k, fpdt::tensor_view<T, 3> const& v) const {
      FPDT_TRY(check_dense(q));
      FPDT_TRY(check_dense(k));
      FPDT_TRY(check_dense(v));
      return m->qkv(l, *x, first, q.extent(0), q.data(), k.data(), v.data());
    }
  };
  struct sink {
    model_rank const* m;
    index_t l;
    token_tensor<T> const* x;
    token_tensor<T>* xm;
    token_tensor<T>* at;
    [[nodiscard]] status consume(index_t, index_t first, fpdt::tensor_view<T const, 3> const& out,
                                 fpdt::tensor_view<float const, 2> const&) {
      FPDT_TRY(check_dense(out));
      return m->attn_out(l, *x, *xm, *at, first, out.extent(0), out.data());
    }
  };
  struct dout_source {
    model_rank const* m;
    index_t l;
    token_tensor<T> const* dx;
    [[nodiscard]] status produce_dout(index_t, index_t first, fpdt::tensor_view<T, 3> const& dout) const {
      FPDT_TRY(check_dense(dout));
      index_t const rows = dout.extent(0), h = m->cfg_.hidden, hq = m->cfg_.heads * m->cfg_.head_dim();
      auto dr = fetch(*m->be_, *dx, first, rows);
      if (!dr) return dr.error();
      // d(out) = d(xm) Wo  ([rows, Hd] x [Hd, H D])
      return m->gemm_(false, false, rows, hq, h, T(1), dr->p, h, m->w() + m->lo(l).wo, hq, T(0), dout.data(), hq);
    }
  };
  struct grad_sink {
    model_rank const* m;
    index_t l;
    token_tensor<T> const* x;
    token_tensor<T>* da;
    template <class G> [[nodiscard]] status consume_dq(index_t, index_t first, fpdt::tensor_view<G const, 3> const& dq) {
      FPDT_TRY(check_dense(dq));
      return m->qkv_backward(l, *x, *da, first, dq.extent(0), dq.data(), m->cfg_.heads, m->lo(l).wq, true);
    }
    template <class G>
    [[nodiscard]] status consume_dkv(index_t, index_t first, fpdt::tensor_view<G const, 3> const& dk,
                                     fpdt::tensor_view<G const, 3> const& dv) {
      FPDT_TRY(check_dense(dk));
      FPDT_TRY(check_dense(dv));
      FPDT_TRY(m->qkv_backward(l, *x, *da, first, dk.extent(0), dk.data(), m->cfg_.kv_heads, m->lo(l).wk, true));
      return m->qkv_backward(l, *x, *da, first, dv.extent(0), dv.data(), m->cfg_.kv_heads, m->lo(l).wv, false);
    }
  };
  template <class V> static status check_dense(V const& v) {
    if (v.stride(2) != 1 || v.stride(1) != v.extent(2) || v.stride(0) != v.extent(1) * v.extent(2))
      return fpdt::make_error(fpdt::errc::invalid_argument, "model: attention chunks must be contiguous [C/P, H, D]");
    return {};
  }

  status attention_forward(index_t l, token_tensor<T> const& x, token_tensor<T>& xm, token_tensor<T>& at) {
    source src{this, l, &x};
    sink snk{this, l, &x, &xm, &at};
    if constexpr (has_fpdt) {
      if (ro_.kind == pieces::fpdt) return attn_[static_cast<std::size_t>(l)].forward(src, snk);
    }
    // Plain: the whole sequence at once (P = 1, so local order is global order).
    index_t const n = tl_.local_tokens(), d = cfg_.head_dim(), h = cfg_.heads, hk = cfg_.kv_heads;
    std::vector<T> q(static_cast<std::size_t>(n * h * d)), k(static_cast<std::size_t>(n * hk * d)), v(k.size()), o(q.size());
    auto view = [&](std::vector<T>& b, index_t heads) { return fpdt::contiguous_view(b.data(), std::array<index_t, 3>{n, heads, d}).value(); };
    FPDT_TRY(src.produce(0, 0, view(q, h), view(k, hk), view(v, hk)));
    FPDT_TRY(dense_attention(n, h, hk, d, q.data(), k.data(), v.data(), o.data(), static_cast<T const*>(nullptr),
                             static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr), sinks_of(l)));
    std::vector<float> lse(static_cast<std::size_t>(h * n));
    auto lv = fpdt::contiguous_view<float const>(lse.data(), std::array<index_t, 2>{h, n}).value();
    // Kept for this layer's backward (the plain reference holds the whole sequence).
    plain_saved_.resize(static_cast<std::size_t>(cfg_.layers));
    auto& saved = plain_saved_[static_cast<std::size_t>(l)];
    saved = {std::move(q), std::move(k), std::move(v), std::move(o)};
    auto ov = fpdt::contiguous_view<T const>(saved[3].data(), std::array<index_t, 3>{n, h, d}).value();
    return snk.consume(0, 0, ov, lv);
  }

  status attention_backward(index_t l, token_tensor<T> const& x, token_tensor<T> const& at, token_tensor<T>& dx,
                            token_tensor<T>& da) {
    index_t const n = tl_.local_tokens(), h = cfg_.hidden, hq = cfg_.heads * cfg_.head_dim();
    // dWo += d(xm)^T out, chunk by chunk.
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto dr = fetch(*be_, dx, r0, rows_);
      auto ar = fetch(*be_, at, r0, rows_);
      if (!dr) return dr.error();
      if (!ar) return ar.error();
      FPDT_TRY(linear_backward(ar->p, dr->p, lo(l).wo, rows_, hq, h, static_cast<T*>(nullptr)));
    }
    for (index_t r0 = 0; r0 < n; r0 += rows_) { // da = 0
      auto d = fetch(*be_, da, r0, rows_, false);
      if (!d) return d.error();
      std::fill(d->p, d->p + rows_ * h, T(0));
      put(*d, da, r0, rows_);
    }
    dout_source dsrc{this, l, &dx};
    grad_sink gsnk{this, l, &x, &da};
    bool done = false;
    if constexpr (has_fpdt) {
      if (ro_.kind == pieces::fpdt) {
        FPDT_TRY(attn_[static_cast<std::size_t>(l)].backward(dsrc, gsnk));
        done = true;
      }
    }
    if (!done) {
      index_t const d = cfg_.head_dim(), hh = cfg_.heads, hk = cfg_.kv_heads;
      auto& s = plain_saved_[static_cast<std::size_t>(l)];
      std::vector<T> dout(s[0].size()), dq(s[0].size()), dk(s[1].size()), dv(s[1].size());
      FPDT_TRY(dsrc.produce_dout(0, 0, fpdt::contiguous_view(dout.data(), std::array<index_t, 3>{n, hh, d}).value()));
      FPDT_TRY(dense_attention(n, hh, hk, d, s[0].data(), s[1].data(), s[2].data(), static_cast<T*>(nullptr), dout.data(),
                               dq.data(), dk.data(), dv.data(), sinks_of(l), cfg_.sinks ? grad() + lo(l).sink : nullptr));
      FPDT_TRY(gsnk.consume_dq(0, 0, fpdt::contiguous_view<T const>(dq.data(), std::array<index_t, 3>{n, hh, d}).value()));
      FPDT_TRY(gsnk.consume_dkv(0, 0, fpdt::contiguous_view<T const>(dk.data(), std::array<index_t, 3>{n, hk, d}).value(),
                                fpdt::contiguous_view<T const>(dv.data(), std::array<index_t, 3>{n, hk, d}).value()));
    }
    // dx += RMSNorm backward of da.
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto xr = fetch(*be_, x, r0, rows_);
      auto ar = fetch(*be_, da, r0, rows_);
      auto dr = fetch(*be_, dx, r0, rows_);
      if (!xr) return xr.error();
      if (!ar) return ar.error();
      if (!dr) return dr.error();
      rmsnorm_backward(xr->p, w() + lo(l).g1, ar->p, dr->p, grad() + lo(l).g1, rows_, h, cfg_.rms_eps);
      put(*dr, dx, r0, rows_);
    }
    return {};
  }

  [[nodiscard]] fpdt::mlp_weights<T> mlp_w(index_t l) const {
    index_t const h = cfg_.hidden, f = cfg_.ffn_size();
    auto v2 = [&](std::size_t at, index_t a, index_t b) {
      return fpdt::contiguous_view<T const>(w() + at, std::array<index_t, 2>{a, b}).value();
    };
    fpdt::mlp_weights<T> mw{};
    mw.w_up = v2(lo(l).up, f, h);
    mw.w_gate = v2(lo(l).gate, f, h);
    mw.w_down = v2(lo(l).down, h, f);
    return mw;
  }
  [[nodiscard]] fpdt::mlp_gradients<T> mlp_g(index_t l) const {
    index_t const h = cfg_.hidden, f = cfg_.ffn_size();
    auto v2 = [&](std::size_t at, index_t a, index_t b) {
      return fpdt::contiguous_view<T>(grad() + at, std::array<index_t, 2>{a, b}).value();
    };
    fpdt::mlp_gradients<T> g{};
    g.w_up = v2(lo(l).up, f, h);
    g.w_gate = v2(lo(l).gate, f, h);
    g.w_down = v2(lo(l).down, h, f);
    return g;
  }
  static fpdt::tensor_view<T, 2> view2(T* p, index_t a, index_t b) {
    return fpdt::contiguous_view<T>(p, std::array<index_t, 2>{a, b}).value();
  }

  // x_next = xm + MLP(RMSNorm(xm)), per chunk.
  status mlp_forward(index_t l, token_tensor<T> const& xm, token_tensor<T>& xn) {
    index_t const n = tl_.local_tokens(), h = cfg_.hidden;
    auto wts = mlp_w(l);
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto mr = fetch(*be_, xm, r0, rows_);
      auto b = scratch<T>(*be_, rows_ * h, "MLP input chunk");
      auto nr = fetch(*be_, xn, r0, rows_, false);
      if (!mr) return mr.error();
      if (!b) return b.error();
      if (!nr) return nr.error();
      rmsnorm(mr->p, w() + lo(l).g2, b->p, rows_, h, cfg_.rms_eps);
      if (ro_.kind == pieces::fpdt) {
        FPDT_TRY(mlp_->forward(wts, view2(b->p, rows_, h), view2(nr->p, rows_, h)));
      } else {
        FPDT_TRY(plain_mlp(l, b->p, nullptr, nr->p, nullptr));
      }
      for (index_t i = 0; i < rows_ * h; ++i) nr->p[i] += mr->p[i];
      put(*nr, xn, r0, rows_);
    }
    return {};
  }

  // dx (= d x_next on entry) becomes d xm: dx += RMSNorm backward of the MLP's input gradient.
  status mlp_backward(index_t l, token_tensor<T> const& xm, token_tensor<T>& dx) {
    index_t const n = tl_.local_tokens(), h = cfg_.hidden;
    auto wts = mlp_w(l);
    auto gs = mlp_g(l);
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto mr = fetch(*be_, xm, r0, rows_);
      auto b = scratch<T>(*be_, rows_ * h, "MLP input chunk");
      auto db = scratch<T>(*be_, rows_ * h, "MLP input gradient chunk");
      auto dr = fetch(*be_, dx, r0, rows_);
      if (!mr) return mr.error();
      if (!b) return b.error();
      if (!db) return db.error();
      if (!dr) return dr.error();
      rmsnorm(mr->p, w() + lo(l).g2, b->p, rows_, h, cfg_.rms_eps);
      if (ro_.kind == pieces::fpdt) {
        FPDT_TRY(mlp_->backward(wts, view2(b->p, rows_, h), view2(dr->p, rows_, h), view2(db->p, rows_, h), gs));
      } else {
        FPDT_TRY(plain_mlp(l, b->p, dr->p, nullptr, db->p));
      }
      rmsnorm_backward(mr->p, w() + lo(l).g2, db->p, dr->p, grad() + lo(l).g2, rows_, h, cfg_.rms_eps);
      put(*dr, dx, r0, rows_);
    }
    return {};
  }

  // Plain SwiGLU MLP on `rows_` rows holding [rows, F] intermediates: forward into y, or with dy
  // given, the backward into db (overwritten) and the weight gradients.
  status plain_mlp(index_t l, T const* b, T const* dy, T* y, T* db) {
    index_t const h = cfg_.hidden, f = cfg_.ffn_size(), n = rows_;
    std::vector<T> u(static_cast<std::size_t>(n * f)), g(u.size()), a(u.size());
    FPDT_TRY(linear(b, lo(l).up, n, h, f, u.data()));
    FPDT_TRY(linear(b, lo(l).gate, n, h, f, g.data()));
    auto silu = [](double z) { return z / (1 + std::exp(-z)); };
    for (std::size_t i = 0; i < u.size(); ++i) a[i] = static_cast<T>(silu(static_cast<double>(g[i])) * static_cast<double>(u[i]));
    if (dy == nullptr) return linear(a.data(), lo(l).down, n, f, h, y);
    std::vector<T> da(u.size()), du(u.size()), dg(u.size());
    FPDT_TRY(gemm_(false, false, n, f, h, T(1), dy, h, w() + lo(l).down, f, T(0), da.data(), f));
    FPDT_TRY(gemm_(true, false, h, f, n, T(1), dy, h, a.data(), f, T(1), grad() + lo(l).down, f));
    for (std::size_t i = 0; i < u.size(); ++i) {
      double const z = static_cast<double>(g[i]), s = 1 / (1 + std::exp(-z));
      du[i] = static_cast<T>(static_cast<double>(da[i]) * z * s);
      dg[i] = static_cast<T>(static_cast<double>(da[i]) * static_cast<double>(u[i]) * s * (1 + z * (1 - s)));
    }
    std::fill(db, db + n * h, T(0));
    FPDT_TRY(linear_backward(b, du.data(), lo(l).up, n, h, f, db));
    return linear_backward(b, dg.data(), lo(l).gate, n, h, f, db);
  }

  // LM head + cross-entropy with its gradient: mean over the valid tokens of all ranks. Every
  // byte label is valid but the last of each packed document, so the global count is S less the
  // documents (valid_); the loss layer runs per staged chunk with reduction sum scaled by
  // 1/valid_, and the loss sums are all-reduced afterwards.
  result<step_stats> loss(token_tensor<T> const& xf, token_tensor<T>& dxf) {
    index_t const n = tl_.local_tokens(), h = cfg_.hidden, vs = cfg_.vocab, s = tl_.sequence();
    double total = 0;
    for (index_t r0 = 0; r0 < n; r0 += rows_) {
      auto xr = fetch(*be_, xf, r0, rows_);
      auto dr = fetch(*be_, dxf, r0, rows_, false);
      if (!xr) return xr.error();
      if (!dr) return dr.error();
      std::span<std::int32_t const> lab(labels_.data() + r0, static_cast<std::size_t>(rows_));
      if (ro_.kind == pieces::fpdt) {
        auto head = fpdt::contiguous_view<T const>(w() + layout_.head, std::array<index_t, 2>{vs, h}).value();
        auto r = loss_->forward_backward(fpdt::contiguous_view<T const>(xr->p, std::array<index_t, 2>{rows_, h}).value(),
                                         head, lab, view2(dr->p, rows_, h), view2(grad() + layout_.head, vs, h), {}, {},
                                         1.0 / static_cast<double>(valid_));
        if (!r) return r.error();
        total += r->loss;
      } else {
        // Plain: logits [N, V] at once, written out here.
        std::vector<T> logits(static_cast<std::size_t>(rows_ * vs)), dl(logits.size());
        FPDT_TRY(linear(xr->p, layout_.head, rows_, h, vs, logits.data()));
        for (index_t t = 0; t < rows_; ++t) {
          T const* z = logits.data() + t * vs;
          double mx = -INFINITY, sum = 0;
          for (index_t c = 0; c < vs; ++c) mx = std::max(mx, static_cast<double>(z[c]));
          for (index_t c = 0; c < vs; ++c) sum += std::exp(static_cast<double>(z[c]) - mx);
          std::int32_t const y = lab[static_cast<std::size_t>(t)];
          total += mx + std::log(sum) - static_cast<double>(z[y]);
          for (index_t c = 0; c < vs; ++c)
            dl[static_cast<std::size_t>(t * vs + c)] =
                static_cast<T>((std::exp(static_cast<double>(z[c]) - mx) / sum - (c == y ? 1.0 : 0.0)) / static_cast<double>(s));
        }
        std::fill(dr->p, dr->p + rows_ * h, T(0));
        FPDT_TRY(linear_backward(xr->p, dl.data(), layout_.head, rows_, h, vs, dr->p));
      }
      put(*dr, dxf, r0, rows_);
    }
    total /= static_cast<double>(valid_); // the loss layer reports the unscaled sum
    if (comm_->size() > 1) FPDT_TRY(comm_->all_reduce_sum(&total, &total, 1, loss_tag));
    return step_stats{total, valid_};
  }

  fpdt::host_backend* be_;
  Comm* comm_;
  model_config cfg_;
  run_options ro_;
  fpdt::token_layout tl_;
  Gemm gemm_;
  index_t rows_;
  param_layout layout_;
  fpdt::arena_allocation w_, g_, m1_, m2_;
  std::optional<mlp_t> mlp_;
  std::optional<loss_t> loss_;
  std::vector<attention_t> attn_;
  bool documented_ = false; // the layers carry the last step's documents
  index_t valid_ = 0;       // tokens with a label this step, over all ranks
  std::vector<std::int32_t> labels_;
  std::vector<std::uint8_t> ids_;
  std::vector<index_t> pos_;
  progress_fn progress_;
  std::vector<std::array<std::vector<T>, 4>> plain_saved_;
};

//! Per-rank device bytes a step of `model_rank<float, ...>` with fpdt pieces reaches at its
//! peak (from the second step on, when every attention layer still holds its previous state),
//! built from the same sizes the code allocates: parameters, gradients and AdamW moments; token
//! tensors when they live on the device (offload off); each attention layer's schedule-derived
//! buffers (`fpdt_attention::predicted_forward_bytes` / `predicted_backward_bytes`, and its
//! resident rings without offload) and exchange buffers; the chunked MLP's and loss's
//! workspaces; and the model's chunk scratch and staging buffers, phase by phase. The largest
//! phase is the answer. Where two lanes run the caller's code at once (the backward's dout
//! source on h2d and gradient sink on comm), both scratch sets are counted, so this is an upper
//! bound by at most one staged chunk. Errors: invalid shapes, as `model_rank::create`.
inline result<std::size_t> planned_device_bytes(model_config const& cfg, run_options const& ro, index_t ranks) {
  FPDT_TRY(cfg.check());
  auto tl = fpdt::token_layout::make(ro.seq, ranks, ro.chunk);
  if (!tl) return tl.error();
  fpdt::local_world world(static_cast<int>(ranks));
  auto comm = world.communicator(0);
  if (!comm) return comm.error();
  fpdt::host_backend be({.device_budget_bytes = ~std::size_t{0} / 2, .device_mode = fpdt::arena_mode::count_only});
  auto attn = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(
      be, *comm, {ro.seq, cfg.heads, cfg.kv_heads, cfg.head_dim()},
      {.chunk = ro.chunk, .offload = ro.offload, .ring_slots = 2, .mask = fpdt::causal_mask});
  if (!attn) return attn.error();
  index_t const r = tl->piece(), n = tl->local_tokens(), h = cfg.hidden, hq = cfg.heads * cfg.head_dim(),
                hk = cfg.kv_heads * cfg.head_dim(), lc = cfg.layers;
  auto mlp = fpdt::chunked_mlp<float>::create(be, {h, cfg.ffn_size(), fpdt::mlp_activation::swiglu}, {.chunk = r});
  if (!mlp) return mlp.error();
  auto ce = fpdt::chunked_cross_entropy<float>::create(be, h, cfg.vocab, {.chunk = r});
  if (!ce) return ce.error();
  auto R = [](index_t elems) { return fpdt::device_arena::rounded_size(static_cast<std::size_t>(elems) * 4); };
  auto const& inner = attn->local_layer();
  std::size_t const total = param_layout::make(cfg).total;
  bool const dev = !ro.offload;
  std::size_t const st = ro.offload ? 1 : 0; // staged copies exist only for host-resident tensors
  std::size_t const base = 4 * R(static_cast<index_t>(total)) +
                           (dev ? static_cast<std::size_t>(2 * lc + 1) * R(n * h) + static_cast<std::size_t>(lc) * R(n * hq) : 0);
  // Without offload every layer keeps its forward rings until its next forward.
  std::size_t const resident = dev ? inner.problem().ring_bytes(fpdt::pass::forward) : 0;
  std::size_t const others = static_cast<std::size_t>(lc - 1) * resident, all = static_cast<std::size_t>(lc) * resident;
  std::size_t const row_h = R(r * h), row_q = R(r * hq);
  // Forward, attention of one layer: the comm lane runs one caller call at a time.
  std::size_t const src = st * row_h + row_h, snk = st * (row_q + 2 * row_h);
  std::size_t const fwd_attn = base + others + inner.predicted_forward_bytes() + attn->forward_exchange_bytes() + std::max(src, snk);
  std::size_t const fwd_mlp = base + all + 2 * st * row_h + row_h + mlp->forward_workspace_bytes(r);
  // Loss: xf and dx exist from here on (and dxf inside it) when on the device.
  std::size_t const tok = dev ? R(n * h) : 0;
  std::size_t const loss = base + all + 3 * tok + std::max(2 * st * row_h + ce->workspace_bytes(r), 3 * st * row_h);
  // Backward: xf, dx, da.
  std::size_t const bbase = base + all + 3 * tok;
  std::size_t const bwd_mlp = bbase + 2 * st * row_h + 2 * row_h + mlp->backward_workspace_bytes(r);
  std::size_t const grad = R(r * std::max(hq, hk)) + st * row_h + row_h + st * row_h;
  std::size_t const bwd_attn = base + 3 * tok + others + inner.predicted_backward_bytes() + attn->backward_exchange_bytes() +
                               st * row_h + grad;
  std::size_t const bwd_other = bbase + std::max(st * (row_h + row_q), 3 * st * row_h);
  return std::max({fwd_attn, fwd_mlp, loss, bwd_mlp, bwd_attn, bwd_other});
}

} // namespace fpdt_train
