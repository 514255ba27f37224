//! \file
//! \brief The planner's memory model: per-rank device and pinned-host bytes of one training step
//! of a decoder transformer under FPDT, Ulysses or Megatron sequence parallelism.
//!
//! docs/design.md 4.3-4.4: the FPDT attention working set is not derived here but read from the
//! attention problem the layer itself is built from (`fpdt_attention_problem`, then
//! `attention_problem::forward_device_bytes`, `backward_device_bytes`, `host_bytes_reserved`), so
//! the model and one rank's arena and pinned peaks agree byte for byte (tests/plan/memory_model.cpp
//! measures 64 problems); the Ulysses exchange buffers likewise (`attention_problem::exchange_bytes`).
//!
//! Everything else is counted tensor by tensor, per rank, in bytes:
//! - parameters, gradients (model dtype) and Adam's fp32 master copy and two moments (mixed
//!   precision: 4 + 4 + 4 bytes per parameter), partitioned over the data-parallel group by ZeRO
//!   stage 1 (optimizer states), 2 (+ gradients) and 3 (+ parameters; Rajbhandari et al., "ZeRO",
//!   SC 2020, section 5); Megatron shards all three by tensor parallelism instead;
//! - activations: with activation checkpointing, one `[S/P, h]` layer input per layer (on the
//!   device, or offloaded to pinned host memory) plus the full working set of the one layer being
//!   recomputed; without it, every layer's stored activations;
//! - per method, the working set of one layer's backward (the peak of the step):
//!   Ulysses (Jacobs et al., arXiv 2309.14509): the layer's activations for the S/P local tokens
//!   (FlashAttention: no `[S, S]` scores) plus gradient buffers; Megatron-SP (Korthikanti et al.,
//!   arXiv 2205.05198, section 4.2.2): the same sharded over the tensor-parallel group, plus the
//!   all-gathered `[S, h]` input of the column-parallel GEMMs and the `[S, h]` partial sums before
//!   the reduce-scatter; FPDT (Yao et al., arXiv 2408.16978, sections 3-4): four `[S/P, h]`
//!   hidden states stay on the device (layer input, post-attention residual, and their gradients),
//!   the attention works through the schedule's staging rings, the MLP and the loss run chunk by
//!   chunk (`[c, ffn]` intermediates, `[c, vocab]` fp32 logits);
//! - the loss: unchunked methods hold `[S/P, V]` logits (model dtype), their fp32 softmax and
//!   the model-dtype gradient; FPDT holds one chunk's fp32 logits and their gradient.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../memory/device_arena.hpp"
#include "../schedule/attention_problem.hpp"
#include "../schedule/schedule.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! The feed-forward block of a decoder layer.
enum class ffn_kind : std::uint8_t {
  gelu,   //!< two GEMMs, h -> ffn -> h (GPT)
  swiglu, //!< three GEMMs, gate and up h -> ffn, down ffn -> h (Llama)
};

//! Name of an ffn kind ("gelu", "swiglu").
[[nodiscard]] constexpr std::string_view to_string(ffn_kind k) noexcept {
  return k == ffn_kind::gelu ? "gelu" : "swiglu";
}

//! How the sequence is split over the P ranks.
enum class parallel_method : std::uint8_t {
  fpdt,        //!< Ulysses all-to-all plus FPDT chunking, offload and chunked MLP and loss
  ulysses,     //!< DeepSpeed-Ulysses: all-to-all, attention over the whole sequence, no chunking
  megatron_sp, //!< Megatron tensor parallelism over P with sequence-parallel activations
};

//! Name of a method ("fpdt", "ulysses", "megatron_sp").
[[nodiscard]] constexpr std::string_view to_string(parallel_method m) noexcept {
  return m == parallel_method::fpdt ? "fpdt" : m == parallel_method::ulysses ? "ulysses" : "megatron_sp";
}

//! Shape of a decoder-only transformer.
struct model_config {
  std::string name;             //!< for messages and output
  index_t layers = 0;           //!< L
  index_t hidden = 0;           //!< h = heads x head_dim
  index_t heads = 0;            //!< H, query heads
  index_t kv_heads = 0;         //!< H_kv, key/value heads (H % H_kv == 0; H_kv = H without GQA)
  index_t ffn = 0;              //!< ffn hidden size (GPT: 4h)
  ffn_kind ffn_type = ffn_kind::gelu; //!< gelu (2 GEMMs) or swiglu (3 GEMMs)
  index_t vocab = 0;            //!< V
  bool tied_embeddings = true;  //!< the output projection shares the embedding matrix
};

//! One training step's parallel layout and memory policy.
struct training_config {
  parallel_method method = parallel_method::fpdt; //!< how the sequence is split
  index_t gpus = 1;            //!< P, sequence-parallel (and ZeRO data-parallel) group size
  index_t sequence = 0;        //!< S, tokens of the global sequence (S % P == 0)
  index_t chunk = 0;           //!< FPDT: C, global tokens per chunk (S % C == 0, C % P == 0); 0: C = S
  bool offload = true;         //!< FPDT: offload inactive attention chunks to pinned host memory
  index_t ring_slots = 2;      //!< FPDT: staging slots per ring (2 = double buffering)
  index_t mlp_chunk = 0;       //!< FPDT: local tokens per MLP chunk; 0: min(C / P, 4096)
  index_t loss_chunk = 0;      //!< FPDT: local tokens per loss chunk; 0: min(C / P, 4096)
  int zero_stage = 3;          //!< 0-3, over the P ranks (Ulysses, FPDT); Megatron shards by TP
  bool checkpointing = true;   //!< activation checkpointing (one layer input kept per layer)
  bool checkpoint_offload = true; //!< checkpoints in pinned host memory instead of on the device
  index_t dtype_bytes = 2;     //!< bytes of the model dtype (bf16: 2)
  //! The attention mask (causal, optionally a sliding window): FPDT's schedules skip the chunk
  //! pairs it leaves empty, and every method's attention FLOPs count only its visible pairs.
  attention_mask mask = causal_mask;
  //! Packed documents, as a length distribution: these lengths (tokens, >= 0, not all 0) repeated
  //! in order until S is filled, the last document cut at S (`training_mask`; when S is shorter
  //! than their sum only a prefix is priced, so give a sample in a mixed order); empty: no
  //! documents. The schedules skip the chunk pairs across documents and the FLOPs count only
  //! visible pairs, so the planner prices a training set's document lengths at any S; memory does
  //! not depend on them. At most `max_planned_documents` documents in S.
  std::vector<index_t> document_lengths{};
};

//! The most documents `training_config::document_lengths` may pack into S (the planner keeps
//! their offsets, 8 bytes each).
inline constexpr index_t max_planned_documents = index_t{1} << 22;

//! The mask the attention of layout `t` runs: `t.mask`, with `t.document_lengths` packed into
//! S when given (their cu_seqlens offsets written to `offsets`, which the mask points at).
[[nodiscard]] inline attention_mask training_mask(training_config const& t, std::vector<index_t>& offsets) {
  offsets.clear();
  index_t total = 0;
  for (index_t l : t.document_lengths) total += l > 0 ? std::min(l, t.sequence) : 0;
  if (t.document_lengths.empty() || total <= 0 || t.sequence < 1) return t.mask;
  offsets.push_back(0);
  for (std::size_t i = 0; offsets.back() < t.sequence; i = (i + 1) % t.document_lengths.size())
    if (t.document_lengths[i] > 0) offsets.push_back(offsets.back() + std::min(t.document_lengths[i], t.sequence - offsets.back()));
  return with_documents(t.mask, offsets);
}

//! Per-rank bytes of one training step, split by what holds them.
struct memory_breakdown {
  std::uint64_t parameters = 0;   //!< model-dtype parameters this rank holds
  std::uint64_t gradients = 0;    //!< model-dtype gradients this rank holds
  std::uint64_t optimizer = 0;    //!< fp32 master parameters and Adam moments
  std::uint64_t zero_buffers = 0; //!< ZeRO-3: two layers' gathered parameters (current + prefetch)
  std::uint64_t checkpoints = 0;  //!< device: the layer inputs kept by checkpointing (or all activations without it)
  std::uint64_t layer_working = 0;     //!< device: one layer's backward besides attention and MLP chunks
  std::uint64_t attention_working = 0; //!< device: FPDT attention rings and accumulators plus all-to-all buffers
  std::uint64_t mlp_working = 0;       //!< device: FPDT chunked MLP intermediates and their gradients
  std::uint64_t loss_working = 0;      //!< device: logits, softmax and gradient (or one chunk of them)
  std::uint64_t reserved = 0;          //!< device: CUDA context, libraries, fragmentation (caller's figure)
  std::uint64_t host_checkpoints = 0;  //!< pinned host: offloaded checkpoints
  std::uint64_t host_attention = 0;    //!< pinned host: one FPDT attention layer's chunk copies

  //! Device bytes at the step's peak: states, checkpoints, and the larger of a layer's backward
  //! and the loss.
  [[nodiscard]] constexpr std::uint64_t device_total() const noexcept {
    return parameters + gradients + optimizer + zero_buffers + checkpoints + reserved +
           std::max(layer_working + attention_working + mlp_working, loss_working);
  }
  //! Pinned host bytes.
  [[nodiscard]] constexpr std::uint64_t host_total() const noexcept { return host_checkpoints + host_attention; }
  //! Device bytes of activations and working sets only (no states, no reserve).
  [[nodiscard]] constexpr std::uint64_t activation_total() const noexcept {
    return checkpoints + std::max(layer_working + attention_working + mlp_working, loss_working);
  }
};

//! The FPDT attention layer's buffers on one rank, from its schedules, for a chunk kernel
//! without a workspace (fpdt's own kernels; a `kernel_with_workspace` adds its
//! `workspace_bytes` to both passes).
struct attention_working_set {
  std::uint64_t forward = 0;  //!< device bytes of a forward (= `fpdt_attention::predicted_forward_bytes`)
  std::uint64_t backward = 0; //!< device bytes of a backward (= `predicted_backward_bytes`)
  std::uint64_t host = 0;     //!< pinned host bytes the pool reserves for the chunk copies (= `host_bytes_reserved`)
};

namespace detail::plan {

inline constexpr std::uint64_t u64(index_t v) noexcept { return static_cast<std::uint64_t>(v); }

} // namespace detail::plan

//! Parameters of a model (embeddings, attention, ffn, norms; an untied output projection counts).
[[nodiscard]] constexpr std::uint64_t parameter_count(model_config const& m) noexcept {
  using detail::plan::u64;
  std::uint64_t const h = u64(m.hidden), d = m.heads > 0 ? u64(m.hidden / m.heads) : 0;
  std::uint64_t const attn = h * (h + 2 * u64(m.kv_heads) * d) + h * h;
  std::uint64_t const mlp = (m.ffn_type == ffn_kind::swiglu ? 3 : 2) * h * u64(m.ffn);
  std::uint64_t const layer = attn + mlp + 2 * h;
  std::uint64_t const emb = u64(m.vocab) * h * (m.tied_embeddings ? 1 : 2);
  return u64(m.layers) * layer + emb + h;
}

//! Parameters of one decoder layer.
[[nodiscard]] constexpr std::uint64_t layer_parameter_count(model_config const& m) noexcept {
  model_config one = m;
  one.layers = 1;
  one.vocab = 0;
  return parameter_count(one) - detail::plan::u64(m.hidden);
}

//! Checks a model: positive sizes, h % H == 0, H % H_kv == 0. Errors: `errc::invalid_argument`
//! naming the value.
[[nodiscard]] inline status check_model(model_config const& m) {
  if (m.layers < 1 || m.hidden < 1 || m.heads < 1 || m.kv_heads < 1 || m.ffn < 1 || m.vocab < 1)
    return make_error(errc::invalid_argument, "model ", m.name, ": layers ", m.layers, ", hidden ",
                      m.hidden, ", heads ", m.heads, ", kv_heads ", m.kv_heads, ", ffn ", m.ffn,
                      ", vocab ", m.vocab, " must all be positive");
  if (m.hidden % m.heads != 0)
    return make_error(errc::invalid_argument, "model ", m.name, ": hidden ", m.hidden,
                      " is not divisible by heads ", m.heads);
  if (m.heads % m.kv_heads != 0)
    return make_error(errc::invalid_argument, "model ", m.name, ": heads ", m.heads,
                      " is not divisible by kv_heads ", m.kv_heads);
  return {};
}

namespace detail::plan {
// The model dtype of `dtype_bytes` for attention: 4 -> f32, 2 -> bf16 (f16 has the same sizes).
[[nodiscard]] inline result<dtype> attention_dtype(index_t dtype_bytes) {
  if (dtype_bytes == 4) return dtype::f32;
  if (dtype_bytes == 2) return dtype::bf16;
  return make_error(errc::invalid_argument, "dtype_bytes ", dtype_bytes,
                    ": FPDT attention runs in f32, f16 or bf16 (4 or 2 bytes)");
}
} // namespace detail::plan

//! The attention problem one FPDT layer of model `m` solves under training layout `t` (P = gpus,
//! S, C = chunk or S, H, H_kv, D = hidden / heads, mask, offload, ring slots): the same value
//! `sequence_parallel_attention` validates and sizes itself by. Errors: `attention_problem::create`'s,
//! naming the values; `dtype_bytes` other than 2 or 4. `with_documents` false leaves out
//! `document_lengths` (for sizes, which no mask changes: cheaper with many documents).
[[nodiscard]] inline result<attention_problem> fpdt_attention_problem(model_config const& m,
                                                                      training_config const& t,
                                                                      bool with_documents = true) {
  auto type = detail::plan::attention_dtype(t.dtype_bytes);
  if (!type) return type.error();
  std::vector<index_t> offsets; // the problem keeps a copy
  return attention_problem::create({t.sequence, t.gpus, t.chunk, m.heads, m.kv_heads,
                                    m.heads > 0 ? m.hidden / m.heads : 0, *type,
                                    with_documents ? training_mask(t, offsets) : t.mask, t.offload,
                                    t.ring_slots},
                                   "fpdt");
}

//! Checks a training layout against a model: S, P positive, S % P == 0; the head rules of
//! `ulysses_layout::make` (H % P == 0; H_kv % P == 0 or P % H_kv == 0); FPDT: the rules of its
//! `fpdt_attention_problem` (S % C == 0, C % P == 0, at most 2^20 chunks, ring slots, dtype 2 or
//! 4 bytes); ZeRO stage 0-3; dtype 1, 2 or 4 bytes. Errors: `errc::invalid_argument` naming the
//! values.
[[nodiscard]] inline status check_training(model_config const& m, training_config const& t) {
  FPDT_TRY(check_model(m));
  if (t.gpus < 1 || t.sequence < 1)
    return make_error(errc::invalid_argument, "gpus ", t.gpus, " and sequence ", t.sequence,
                      " must be positive");
  if (t.sequence % t.gpus != 0)
    return make_error(errc::invalid_argument, "sequence length ", t.sequence,
                      " is not divisible by world size ", t.gpus);
  // The head rules of the all-to-all, from the one place that has them (C = P: any chunk rule
  // is the token layout's, checked below for FPDT).
  if (auto heads = ulysses_layout::make(t.gpus, m.heads, m.kv_heads, m.hidden / m.heads, t.gpus); !heads)
    return heads.error().with_context(detail::concat("model ", m.name));
  FPDT_TRY(check_mask(t.mask, "training_config"));
  if (!t.document_lengths.empty()) {
    index_t total = 0;
    for (std::size_t i = 0; i < t.document_lengths.size(); ++i) {
      if (t.document_lengths[i] < 0)
        return make_error(errc::invalid_argument, "training_config: document length ", i, " is ", t.document_lengths[i],
                          " (lengths must be >= 0)");
      total += std::min(t.document_lengths[i], t.sequence);
    }
    if (total == 0)
      return make_error(errc::invalid_argument, "training_config: the document lengths are all 0");
    // Documents in S: whole passes over the lengths, then the prefix of one more.
    index_t docs = 0, positive = 0;
    for (index_t l : t.document_lengths) positive += l > 0 ? 1 : 0;
    if (total < t.sequence) docs = t.sequence / total * positive;
    if (docs > max_planned_documents)
      return make_error(errc::invalid_argument, "training_config: document lengths summing to ", total, " pack about ",
                        docs, " documents into S = ", t.sequence, "; at most ", max_planned_documents,
                        " (price a sample of longer documents)");
    if (t.mask.documents > 0)
      return make_error(errc::invalid_argument, "training_config: the mask has ", t.mask.documents,
                        " documents and document_lengths are given too (give one of them)");
  }
  if (t.zero_stage < 0 || t.zero_stage > 3)
    return make_error(errc::invalid_argument, "ZeRO stage ", t.zero_stage, " must be 0, 1, 2 or 3");
  if (t.dtype_bytes != 1 && t.dtype_bytes != 2 && t.dtype_bytes != 4)
    return make_error(errc::invalid_argument, "dtype_bytes ", t.dtype_bytes, " must be 1, 2 or 4");
  if (t.method == parallel_method::fpdt) {
    auto problem = fpdt_attention_problem(m, t, false); // S % C, C % P, u <= 2^20, ring slots, dtype
    if (!problem) return problem.error();
    if (t.mlp_chunk < 0 || t.loss_chunk < 0)
      return make_error(errc::invalid_argument, "mlp_chunk ", t.mlp_chunk, " and loss_chunk ",
                        t.loss_chunk, " must not be negative");
  }
  return {};
}

//! Device and pinned host bytes of one rank of an FPDT attention layer solving `problem`: what
//! the per-rank layer allocates (`attention_problem::forward_device_bytes`,
//! `backward_device_bytes` without a kernel workspace, `host_bytes_reserved`: what the pinned pool
//! really holds, 4 KiB pages included), so the prediction is the layer's own figure. Every mask has the same buffers.
[[nodiscard]] inline attention_working_set fpdt_attention_memory(attention_problem const& problem) {
  attention_problem const r = problem.ranks() == 1 ? problem : problem.per_rank();
  attention_working_set w;
  w.forward = r.forward_device_bytes();
  w.backward = r.backward_device_bytes();
  w.host = r.host_bytes_reserved();
  return w;
}

//! `fpdt_attention_memory` of a one-rank problem: q `[S, H, D]`, k, v `[S, H_kv, D]` (per rank:
//! the heads after the all-to-all), chunks of `chunk` tokens (0: C = S), elements of `dtype_bytes`
//! (2 or 4).
//! Errors: `attention_problem::create`'s, naming the values (S % C != 0, ring_slots out of
//! [2, 64], ...).
[[nodiscard]] inline result<attention_working_set>
fpdt_attention_memory(index_t sequence, index_t heads, index_t kv_heads, index_t head_dim,
                      index_t chunk, bool offload, index_t ring_slots, index_t dtype_bytes) {
  auto type = detail::plan::attention_dtype(dtype_bytes);
  if (!type) return type.error();
  auto problem = attention_problem::create({sequence, 1, chunk, heads, kv_heads, head_dim, *type,
                                            causal_mask, offload, ring_slots},
                                           "fpdt_attention_memory");
  if (!problem) return problem.error();
  return fpdt_attention_memory(*problem);
}

namespace detail::plan {

// Heads per rank after the all-to-all (kv heads replicated when P > H_kv).
inline constexpr index_t local_kv_heads(model_config const& m, index_t p) noexcept {
  return m.kv_heads >= p ? m.kv_heads / p : 1;
}

// Bytes per token that one layer stores for its backward without chunking (FlashAttention: no
// [S, S] scores), in units of the model dtype: norm input and output, q, k, v, attention output
// (plus fp32 lse), norm input and output of the MLP, and the MLP intermediates (gelu: fc1 output
// and its activation; swiglu: gate, up and their product). Dropout is not modelled (off in the
// models of the presets).
inline constexpr std::uint64_t layer_activation_bytes_per_token(model_config const& m, index_t kv_per_rank_times_p,
                                                                std::uint64_t db) noexcept {
  std::uint64_t const h = u64(m.hidden), d = u64(m.hidden / m.heads);
  std::uint64_t const attn = db * (2 * h + h + 2 * u64(kv_per_rank_times_p) * d + h) + 4 * u64(m.heads);
  std::uint64_t const mlp = db * (2 * h + (m.ffn_type == ffn_kind::swiglu ? 3 : 2) * u64(m.ffn));
  return attn + mlp;
}

// Gradient buffers alive while a layer's backward runs, per token: the incoming and outgoing
// hidden gradients and the gradients of the two largest intermediates ([S, ffn] each).
inline constexpr std::uint64_t layer_gradient_bytes_per_token(model_config const& m, std::uint64_t db) noexcept {
  return db * (2 * u64(m.hidden) + 2 * u64(m.ffn));
}

} // namespace detail::plan

//! Per-rank device and pinned-host bytes of one training step (see the file comment for what is
//! counted). `reserved_bytes` (CUDA context, library workspaces, allocator slack) is added to the
//! device total as given. Errors: those of `check_training`, and of `fpdt_attention_memory`.
[[nodiscard]] inline result<memory_breakdown> estimate_memory(model_config const& m, training_config const& t,
                                                              std::uint64_t reserved_bytes = 0) {
  using detail::plan::u64;
  FPDT_TRY(check_training(m, t));
  memory_breakdown r;
  r.reserved = reserved_bytes;
  std::uint64_t const p = u64(t.gpus), db = u64(t.dtype_bytes), h = u64(m.hidden);
  std::uint64_t const n = parameter_count(m);
  std::uint64_t const s_local = u64(t.sequence) / p; // tokens per rank in sequence layout
  bool const megatron = t.method == parallel_method::megatron_sp;
  // Model states.
  if (megatron) { // tensor parallel: every state sharded over the P ranks
    r.parameters = n * db / p;
    r.gradients = n * db / p;
    r.optimizer = n * 12 / p;
  } else {
    r.parameters = n * db / (t.zero_stage >= 3 ? p : 1);
    r.gradients = n * db / (t.zero_stage >= 2 ? p : 1);
    r.optimizer = n * 12 / (t.zero_stage >= 1 ? p : 1);
    if (t.zero_stage >= 3 && p > 1) r.zero_buffers = 2 * layer_parameter_count(m) * db;
  }
  // Heads per rank and the layer's activations per local token.
  index_t const kv_local = detail::plan::local_kv_heads(m, t.gpus);
  std::uint64_t const act_tok = detail::plan::layer_activation_bytes_per_token(m, kv_local * t.gpus, db);
  std::uint64_t const grad_tok = detail::plan::layer_gradient_bytes_per_token(m, db);
  std::uint64_t const hidden_local = s_local * h * db; // one [S/P, h] tensor
  std::uint64_t const layer_act = s_local * act_tok;   // Megatron: [S, x/P] = [S/P, x] bytes alike
  std::uint64_t const layer_grad = s_local * grad_tok;
  bool const fpdt_method = t.method == parallel_method::fpdt;
  // Checkpoints, or every layer's activations.
  std::uint64_t per_layer_kept = 0;
  if (t.checkpointing)
    per_layer_kept = hidden_local;
  else if (fpdt_method) // attention chunks live on the host; residual stream and MLP inputs stay
    per_layer_kept = 2 * hidden_local + s_local * db * (m.ffn_type == ffn_kind::swiglu ? 3 : 2) * u64(m.ffn);
  else
    per_layer_kept = layer_act;
  std::uint64_t const kept = u64(m.layers) * per_layer_kept;
  if (t.checkpointing && t.checkpoint_offload)
    r.host_checkpoints = kept;
  else
    r.checkpoints = kept;
  // One layer's backward.
  if (fpdt_method) {
    auto problem = fpdt_attention_problem(m, t, false); // every mask has the same buffers
    if (!problem) return problem.error();
    attention_working_set const a = fpdt_attention_memory(*problem);
    std::uint64_t const c_local = u64(problem->chunk()) / p;
    // The per-rank layer's buffers and sequence_parallel_attention's exchange buffers (a GPU
    // runs the device path: packed send and receive blocks too), pass by pass.
    r.attention_working = std::max(a.forward + problem->exchange_bytes(pass::forward, true),
                                   a.backward + problem->exchange_bytes(pass::backward, true));
    // With checkpointing one layer's chunks are on the host at a time (the recomputed one);
    // without it every layer keeps its chunks there until its backward.
    r.host_attention = a.host * (t.checkpointing ? 1 : u64(m.layers));
    // Four [S/P, h] hidden states: input, post-attention residual and their gradients.
    r.layer_working = 4 * hidden_local;
    // MLP and loss chunks are the layers' own options (chunked_mlp, chunked_cross_entropy); by
    // default 4096 local tokens: GEMMs with 4096 rows already run at full tensor-core rate, so
    // larger chunks buy no speed, only memory.
    std::uint64_t const mc = t.mlp_chunk > 0 ? u64(t.mlp_chunk) : std::min<std::uint64_t>(c_local, 4096);
    // chunked_mlp holds at most three [chunk, ffn] buffers (gelu: two).
    r.mlp_working = mc * u64(m.ffn) * (m.ffn_type == ffn_kind::swiglu ? 3 : 2) * db;
    std::uint64_t const lc = t.loss_chunk > 0 ? u64(t.loss_chunk) : std::min<std::uint64_t>(c_local, 4096);
    // fp32 logits and their gradient for one chunk, plus the final hidden state and its gradient.
    r.loss_working = 2 * lc * u64(m.vocab) * 4 + 2 * hidden_local;
  } else {
    r.layer_working = layer_act + layer_grad;
    if (megatron && p > 1) // all-gathered [S, h] GEMM input and the [S, h] partial sums
      r.layer_working += 2 * u64(t.sequence) * h * db;
    // [S/P, V] logits (Megatron: [S, V/P], as many bytes), fp32 softmax, model-dtype gradient.
    r.loss_working = s_local * u64(m.vocab) * (2 * db + 4) + 2 * hidden_local;
  }
  return r;
}

//! Per-rank device bytes of activations and working sets (no model states, no reserve) for a
//! step of `seq` tokens on `ranks` ranks: what a trainer prints as "without chunking and offload
//! this would need X bytes per rank" (call it with chunk 0 and offload false). Activation
//! checkpointing with checkpoints on the device. Errors: as `estimate_memory`.
[[nodiscard]] inline result<std::uint64_t>
activation_device_bytes(model_config const& m, index_t seq, index_t ranks, index_t chunk, bool offload,
                        index_t dtype_bytes, parallel_method method) {
  training_config t;
  t.method = method;
  t.gpus = ranks;
  t.sequence = seq;
  t.chunk = chunk;
  t.offload = offload;
  t.dtype_bytes = dtype_bytes;
  t.checkpoint_offload = false;
  auto r = estimate_memory(m, t);
  if (!r) return r.error();
  return r->activation_total();
}

FPDT_NAMESPACE_END
