//! \file
//! \brief `attention_problem`: one attention layer's problem (token layout S, P, C; heads H, H_kv,
//! D; dtype; mask; offload; ring slots), validated once. It is the only place the shape rules
//! live, and it derives as data what every consumer needs: the tensors a rank keeps per chunk,
//! the layout of each device slot, the schedules, and the device and pinned bytes of a pass. The
//! layers allocate and run exactly that; the planner (plan/) sizes and prices exactly that.
//!
//! docs/design.md section 4.3. The rules: S, H, H_kv, D >= 1; C = S when 0 is given, else C >= 1;
//! H % H_kv == 0; S % C == 0 and C % P == 0 (`token_layout::make`); H % P == 0 and H_kv % P == 0
//! or P % H_kv == 0 (`ulysses_layout::make`); ring slots in [2, 64]; u = S / C <= 2^20; the
//! attention's tensors of the whole sequence, S (5 H + 2 H_kv + 1) D x 4 bytes, at most 2^52 bytes
//! (so every byte figure derived here is exact in 64 bits; a real run is far below: 2M tokens of
//! Llama-3 8B need about 2^39).
#pragma once

#include "../attention/mask.hpp"
#include "../config.hpp"
#include "../core/dtype.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../memory/device_arena.hpp"
#include "../memory/pinned_pool.hpp"
#include "schedule.hpp"
#include "token_layout.hpp"
#include "ulysses_layout.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>
#include <string_view>

FPDT_NAMESPACE_BEGIN

//! What an attention problem is made of, as the caller gives it.
struct attention_problem_args {
  index_t sequence = 0;             //!< S, global tokens
  index_t ranks = 1;                //!< P, sequence-parallel ranks
  index_t chunk = 0;                //!< C, global tokens per chunk; 0: C = S
  index_t heads = 0;                //!< H, query heads (all ranks)
  index_t kv_heads = 0;             //!< H_kv, key/value heads (all ranks)
  index_t head_dim = 0;             //!< D
  dtype type = dtype::f32;          //!< the model dtype of q, k, v, out, dout (f32, f16 or bf16)
  attention_mask mask = causal_mask; //!< causal or full, with an optional sliding window, by global position
  bool offload = true;              //!< inactive chunks in pinned host memory
  index_t ring_slots = 2;           //!< staging slots of the rotating rings (2 = double buffering)
};

//! The tensors of one chunk on one rank after the all-to-all (h = the rank's query heads, h_kv
//! its key/value heads, C the chunk).
enum class chunk_tensor : std::uint8_t {
  q,       //!< `[C, h, D]` model dtype
  k,       //!< `[C, h_kv, D]` model dtype
  v,       //!< `[C, h_kv, D]` model dtype
  out,     //!< `[C, h, D]` model dtype
  lse,     //!< `[h, C]` fp32 (natural log)
  dq,      //!< `[C, h, D]` fp32 accumulator
  dout,    //!< `[C, h, D]` model dtype
  delta,   //!< `[h, C]` fp32, rowsum(dout * out)
  acc_out, //!< `[C, h, D]` fp32, a partial output (forward accumulator)
  acc_lse, //!< `[h, C]` fp32, a partial LSE
  dk,      //!< `[C, h_kv, D]` fp32 accumulator
  dv,      //!< `[C, h_kv, D]` fp32 accumulator
};
//! Number of `chunk_tensor` values.
inline constexpr std::size_t chunk_tensor_count = 12;

//! Name of a chunk tensor ("q", "k", ..., "acc_lse", "dk", "dv").
[[nodiscard]] constexpr std::string_view to_string(chunk_tensor t) noexcept {
  constexpr std::string_view names[] = {"q",     "k",     "v",       "out",     "lse", "dq",
                                        "dout",  "delta", "acc_out", "acc_lse", "dk",  "dv"};
  return names[static_cast<std::size_t>(t)];
}

//! The device buffers of a pass, each one allocation per slot (see `attention_problem::slot`).
enum class slot_kind : std::uint8_t {
  forward_q,    //!< forward `ring::q`: q
  forward_kv,   //!< forward `ring::kv` (and backward `ring::kv`): k, v
  forward_out,  //!< forward `ring::out`: out, lse
  forward_acc,  //!< forward, 2 slots: the accumulator and the partial (acc_out, acc_lse)
  backward_q,   //!< backward `ring::q` with offload: q, out, dout, lse, delta, dq
  backward_grad, //!< backward without offload, one per chunk: dout, dq, delta
  backward_dkv, //!< backward, 1 slot: dk, dv
};
//! Number of `slot_kind` values.
inline constexpr std::size_t slot_kind_count = 7;

//! Where each tensor of a slot lies: offsets in bytes from the slot's start, each tensor starting
//! at the arena's granularity (256 bytes).
struct slot_layout {
  static constexpr std::size_t absent = ~std::size_t{0}; //!< offset of a tensor not in the slot
  std::size_t bytes = 0; //!< the slot's size: the sum of its tensors' rounded sizes
  std::array<std::size_t, chunk_tensor_count> offset = [] {
    std::array<std::size_t, chunk_tensor_count> a{};
    a.fill(absent);
    return a;
  }(); //!< by `chunk_tensor`, or `absent`
  //! Whether tensor `t` is in the slot.
  [[nodiscard]] constexpr bool has(chunk_tensor t) const noexcept {
    return offset[static_cast<std::size_t>(t)] != absent;
  }
  //! Offset of tensor `t` (which must be in the slot).
  [[nodiscard]] constexpr std::size_t at(chunk_tensor t) const noexcept {
    return offset[static_cast<std::size_t>(t)];
  }
};

//! One attention layer's problem, validated (see the file comment). A small value; copy freely.
class attention_problem {
public:
  //! The tensors a rank keeps in pinned host memory per chunk with offload on, in this order
  //! (the `chunk_store`'s tensor indices): q, k, v, out, lse (forward), dq, dout (backward).
  static constexpr std::array<chunk_tensor, 7> host_tensors{chunk_tensor::q,   chunk_tensor::k,
                                                           chunk_tensor::v,   chunk_tensor::out,
                                                           chunk_tensor::lse, chunk_tensor::dq,
                                                           chunk_tensor::dout};
  //! The largest number of chunks u = S / C (the schedules' steps grow as u^2).
  static constexpr index_t max_chunks = index_t{1} << 20;
  //! The most bytes the attention's tensors of the whole sequence may take (see the file comment).
  static constexpr std::uint64_t max_total_bytes = std::uint64_t{1} << 52;

  //! Validates `a` (rules in the file comment). `who` prefixes every message (the layer's name).
  //! Errors: `errc::invalid_argument` (or `errc::shape_mismatch` for H % H_kv) naming the values
  //! and the rule, e.g. "fpdt_attention: S = 48 is not a multiple of the chunk C = 20 ...".
  [[nodiscard]] static result<attention_problem> create(attention_problem_args a,
                                                        std::string_view who = "attention_problem") {
    if (a.sequence < 1 || a.heads < 1 || a.kv_heads < 1 || a.head_dim < 1 || a.ranks < 1)
      return make_error(errc::invalid_argument, who, ": S = ", a.sequence, ", H = ", a.heads,
                        ", H_kv = ", a.kv_heads, ", D = ", a.head_dim, ", P = ", a.ranks,
                        " must all be >= 1");
    if (a.heads % a.kv_heads != 0)
      return make_error(errc::shape_mismatch, who, ": H = ", a.heads,
                        " must be a multiple of H_kv = ", a.kv_heads);
    if (a.chunk < 0)
      return make_error(errc::invalid_argument, who, ": chunk C = ", a.chunk,
                        " must be >= 1 (or 0: C = S)");
    if (a.chunk == 0) a.chunk = a.sequence;
    if (a.type != dtype::f32 && a.type != dtype::f16 && a.type != dtype::bf16)
      return make_error(errc::invalid_argument, who, ": dtype ", to_string(a.type),
                        " is not a model dtype of attention (f32, f16 or bf16)");
    if (a.ring_slots < 2 || a.ring_slots > 64)
      return make_error(errc::invalid_argument, who, ": ring_slots = ", a.ring_slots,
                        " must be in [2, 64] (2 is double buffering)");
    FPDT_TRY(check_documents(a.mask, a.sequence, who)); // windows, kinds, documents summing to S
    auto tl = token_layout::make(a.sequence, a.ranks, a.chunk);
    if (!tl) return tl.error().with_context(who);
    auto ul = ulysses_layout::make(a.ranks, a.heads, a.kv_heads, a.head_dim, a.chunk);
    if (!ul) return ul.error().with_context(who);
    if (tl->chunks() > max_chunks)
      return make_error(errc::invalid_argument, who, ": u = S / C = ", tl->chunks(),
                        " chunks; at most 2^20 (", max_chunks, "): use a larger chunk C");
    // Every tensor of the pass (q, out, dout, dq, the accumulator; k, v; lse) over the whole
    // sequence, fp32 at most: a bound on every byte figure below, checked without overflowing.
    std::uint64_t total = 4;
    for (std::uint64_t f : {static_cast<std::uint64_t>(a.sequence), static_cast<std::uint64_t>(a.head_dim),
                            5 * static_cast<std::uint64_t>(a.heads) + 2 * static_cast<std::uint64_t>(a.kv_heads) + 1})
      if (f > max_total_bytes || total > max_total_bytes / f) {
        total = max_total_bytes + 1;
        break;
      } else {
        total *= f;
      }
    if (total > max_total_bytes)
      return make_error(errc::invalid_argument, who, ": S = ", a.sequence, ", H = ", a.heads, ", H_kv = ",
                        a.kv_heads, ", D = ", a.head_dim, ": the attention's tensors, S (5 H + 2 H_kv + 1) D x 4 "
                        "bytes, exceed 2^52 bytes (4 PiB), beyond what 64-bit byte counts of a pass hold exactly");
    attention_problem made(a, *tl, *ul);
    if (a.mask.documents > 0) { // a copy of the caller's offsets, which need not outlive this
      made.documents_ = std::make_shared<std::vector<index_t> const>(
          a.mask.document_offsets, a.mask.document_offsets + a.mask.documents + 1);
      made.a_.mask.document_offsets = made.documents_->data();
    }
    return made;
  }

  //! The arguments, with C resolved (never 0).
  [[nodiscard]] attention_problem_args const& args() const noexcept { return a_; }
  //! The token layout (S, P, C).
  [[nodiscard]] token_layout const& tokens() const noexcept { return tokens_; }
  //! The head sharding of the Ulysses all-to-all.
  [[nodiscard]] ulysses_layout const& heads_layout() const noexcept { return heads_; }
  //! S, global tokens.
  [[nodiscard]] index_t sequence() const noexcept { return a_.sequence; }
  //! P, ranks.
  [[nodiscard]] index_t ranks() const noexcept { return a_.ranks; }
  //! C, global tokens per chunk.
  [[nodiscard]] index_t chunk() const noexcept { return a_.chunk; }
  //! u = S / C, chunks.
  [[nodiscard]] index_t chunks() const noexcept { return tokens_.chunks(); }
  //! D.
  [[nodiscard]] index_t head_dim() const noexcept { return a_.head_dim; }
  //! The model dtype.
  [[nodiscard]] dtype type() const noexcept { return a_.type; }
  //! Bytes of one element of the model dtype.
  [[nodiscard]] std::size_t element_bytes() const noexcept { return size_bytes(a_.type); }
  //! The mask; its document offsets (if any) are this problem's own copy, valid while the
  //! problem (or a copy of it, or a schedule built from it) lives.
  [[nodiscard]] attention_mask mask() const noexcept { return a_.mask; }
  //! Whether inactive chunks are offloaded.
  [[nodiscard]] bool offload() const noexcept { return a_.offload; }
  //! Query heads of one rank after the all-to-all, H / P.
  [[nodiscard]] index_t local_heads() const noexcept { return heads_.heads_per_rank(head_kind::query); }
  //! Key/value heads of one rank after the all-to-all: H_kv / P, or 1 (replicated) when P % H_kv == 0.
  [[nodiscard]] index_t local_kv_heads() const noexcept {
    return heads_.heads_per_rank(head_kind::key_value);
  }

  //! The problem one rank runs after the all-to-all: the same S, C, D, dtype, mask, offload and
  //! ring, P = 1, with `local_heads()` and `local_kv_heads()` heads.
  [[nodiscard]] attention_problem per_rank() const {
    attention_problem_args b = a_;
    b.ranks = 1;
    b.heads = local_heads();
    b.kv_heads = local_kv_heads();
    return create(b).value(); // the rules hold: they held for P ranks
  }

  //! Shape of chunk tensor `t` on one rank: `[C, h, D]` or `[h, C]` (then the third extent is 1).
  [[nodiscard]] std::array<index_t, 3> shape(chunk_tensor t) const noexcept {
    index_t const c = chunk(), d = head_dim(), h = local_heads(), hkv = local_kv_heads();
    switch (t) {
    case chunk_tensor::k:
    case chunk_tensor::v:
    case chunk_tensor::dk:
    case chunk_tensor::dv: return {c, hkv, d};
    case chunk_tensor::lse:
    case chunk_tensor::delta:
    case chunk_tensor::acc_lse: return {h, c, 1};
    default: return {c, h, d};
    }
  }
  //! Element type of chunk tensor `t`: the model dtype for q, k, v, out, dout; fp32 otherwise.
  [[nodiscard]] dtype type_of(chunk_tensor t) const noexcept {
    switch (t) {
    case chunk_tensor::q:
    case chunk_tensor::k:
    case chunk_tensor::v:
    case chunk_tensor::out:
    case chunk_tensor::dout: return a_.type;
    default: return dtype::f32;
    }
  }
  //! Bytes of chunk tensor `t` on one rank (unrounded).
  [[nodiscard]] std::size_t bytes(chunk_tensor t) const noexcept {
    auto const s = shape(t);
    return static_cast<std::size_t>(s[0]) * static_cast<std::size_t>(s[1]) *
           static_cast<std::size_t>(s[2]) * size_bytes(type_of(t));
  }

  //! The layout of a device slot of kind `k` (its tensors in the order of `slot_kind`'s docs).
  [[nodiscard]] slot_layout slot(slot_kind k) const noexcept {
    using T = chunk_tensor;
    switch (k) {
    case slot_kind::forward_q: return layout({T::q});
    case slot_kind::forward_kv: return layout({T::k, T::v});
    case slot_kind::forward_out: return layout({T::out, T::lse});
    case slot_kind::forward_acc: return layout({T::acc_out, T::acc_lse});
    case slot_kind::backward_q: return layout({T::q, T::out, T::dout, T::lse, T::delta, T::dq});
    case slot_kind::backward_grad: return layout({T::dout, T::dq, T::delta});
    case slot_kind::backward_dkv: return layout({T::dk, T::dv});
    }
    return {};
  }

  //! What the schedule builders take for pass `which`: chunks, ranks, mask, offload, ring and the
  //! bytes each step moves (one rank's: `local_heads()` heads), from `bytes` and `slot`. On P > 1
  //! ranks the schedules have the exchange steps; `per_rank()` gives the one-rank schedule the
  //! per-rank layer runs today.
  [[nodiscard]] schedule_params schedule_params_of(pass which) const noexcept {
    using T = chunk_tensor;
    schedule_params p;
    p.chunks = chunks();
    p.ranks = a_.ranks;
    p.mask = a_.mask;
    p.documents = documents_;
    p.chunk_tokens = a_.chunk;
    p.offload = a_.offload;
    p.ring_slots = a_.ring_slots;
    p.q_bytes = bytes(T::q);
    p.kv_bytes = bytes(T::k) + bytes(T::v);
    p.out_bytes = bytes(T::out) + bytes(T::lse);
    p.q_side_bytes = bytes(T::q) + bytes(T::out) + bytes(T::lse) + bytes(T::dout);
    p.dout_bytes = bytes(T::dout);
    p.dq_bytes = bytes(T::dq);
    p.dkv_bytes = bytes(T::dk) + bytes(T::dv);
    if (which == pass::forward)
      p.bytes = {slot(slot_kind::forward_q).bytes, slot(slot_kind::forward_kv).bytes,
                 slot(slot_kind::forward_out).bytes};
    else
      p.bytes = {slot(slot_kind::backward_q).bytes, slot(slot_kind::forward_kv).bytes, 0};
    return p;
  }
  //! The forward schedule of one rank (`fpdt::forward_schedule` of `schedule_params_of`).
  [[nodiscard]] result<schedule> forward_schedule() const {
    return fpdt::forward_schedule(schedule_params_of(pass::forward));
  }
  //! The backward schedule of one rank.
  [[nodiscard]] result<schedule> backward_schedule() const {
    return fpdt::backward_schedule(schedule_params_of(pass::backward));
  }

  //! Device bytes one rank's forward holds at its peak, at the arena's granularity: the rings
  //! (`ring_sizes` x slot bytes), the accumulator and the partial, and the chunk kernel's
  //! workspace of `workspace` bytes (0: none).
  [[nodiscard]] std::size_t forward_device_bytes(std::size_t workspace = 0) const noexcept {
    return ring_bytes(pass::forward) + 2 * slot(slot_kind::forward_acc).bytes + rounded(workspace);
  }
  //! Device bytes one rank's backward holds at its peak: with offload its rings; without, the
  //! forward's rings (still resident) and one `backward_grad` slot per chunk; plus dk and dv (two
  //! pairs on P > 1 ranks, which alternate while one is exchanged: `backward_schedule`) and the
  //! kernel's workspace.
  [[nodiscard]] std::size_t backward_device_bytes(std::size_t workspace = 0) const noexcept {
    std::size_t const fixed = dkv_accumulator_pairs(a_.ranks) * slot(slot_kind::backward_dkv).bytes + rounded(workspace);
    if (a_.offload) return ring_bytes(pass::backward) + fixed;
    return ring_bytes(pass::forward) +
           static_cast<std::size_t>(chunks()) * slot(slot_kind::backward_grad).bytes + fixed;
  }
  //! Output or gradient exchanges of `sequence_parallel_attention` that may be in flight at once
  //! (each with its own buffers).
  static constexpr std::size_t exchanges_in_flight = 2;

  //! Device bytes of `sequence_parallel_attention`'s exchange buffers for pass `which`, beside the
  //! per-rank layer's, at the arena's granularity (for P = 1 too: that layer keeps them even then;
  //! `fpdt_attention` alone has none). Forward: the next chunk's
  //! exchanged q, k, v; `exchanges_in_flight` out and lse chunks; one local q/k/v (or out) chunk
  //! and one local lse chunk. Backward: `exchanges_in_flight` fp32 gradient chunks (dq, or dk and
  //! dv); one local fp32 gradient chunk and one local dout chunk. On a device path
  //! (`device_path`: streams that do not run host tasks) also the packed send and receive blocks
  //! of the largest all-to-all and, in the backward, the next fetch's exchanged dout chunk. The
  //! layer allocates these per pass; its `forward_exchange_bytes()` / `backward_exchange_bytes()`
  //! and the planner read this.
  [[nodiscard]] std::size_t exchange_bytes(pass which, bool device_path) const noexcept {
    using T = chunk_tensor;
    std::size_t const tb = element_bytes(), in_flight = exchanges_in_flight;
    // One local (sequence-sharded) piece of `heads` heads, C/P tokens, in elements.
    auto local = [&](index_t heads) {
      return static_cast<std::size_t>(tokens_.piece()) * static_cast<std::size_t>(heads) *
             static_cast<std::size_t>(head_dim());
    };
    std::size_t const q_elems = bytes(T::dq) / 4, kv_elems = bytes(T::dk) / 4, lse_elems = bytes(T::lse) / 4;
    auto r = [](std::size_t elems, std::size_t b) { return rounded(elems * b); };
    if (which == pass::forward) {
      std::size_t const tmp = std::max(local(a_.heads + 2 * a_.kv_heads), local(a_.heads));
      std::size_t const scratch = device_path ? std::max(q_elems * tb, lse_elems * 4) : 0;
      return r(q_elems, tb) + 2 * r(kv_elems, tb) + in_flight * (r(q_elems, tb) + r(lse_elems, 4)) +
             r(tmp, tb) + r(local(a_.heads) / static_cast<std::size_t>(head_dim()), 4) + 2 * rounded(scratch);
    }
    std::size_t const grad = std::max(q_elems, 2 * kv_elems);
    std::size_t const tmp = std::max(local(a_.heads), 2 * local(a_.kv_heads));
    std::size_t const scratch = device_path ? q_elems * std::max(tb, std::size_t{4}) : 0;
    return in_flight * r(grad, 4) + r(tmp, 4) + r(local(a_.heads), tb) + 2 * rounded(scratch) +
           (device_path ? r(q_elems, tb) : 0);
  }

  //! Pinned host bytes of every chunk's `host_tensors` (offload on; 0 off), before the pool's
  //! rounding.
  [[nodiscard]] std::size_t host_bytes_needed() const noexcept {
    return host_bytes([](std::size_t b) { return b; });
  }
  //! The same, each chunk's copy of each tensor rounded up to `pinned_pool::granularity` (4096
  //! bytes): what the pool really reserves.
  [[nodiscard]] std::size_t host_bytes_reserved() const noexcept {
    return host_bytes([](std::size_t b) { return pinned_pool::rounded_size(b); });
  }

  //! Device bytes of the rings of pass `which`: `ring_sizes` x the slot bytes of each ring. Without
  //! offload the forward's rings stay resident until the backward (and a layer's next forward).
  [[nodiscard]] std::size_t ring_bytes(pass which) const noexcept {
    schedule_params const p = schedule_params_of(which);
    auto const n = ring_sizes(which, p);
    std::size_t const per[ring_count] = {p.bytes.q, p.bytes.kv, p.bytes.out};
    std::size_t total = 0;
    for (std::size_t r = 0; r < ring_count; ++r) total += static_cast<std::size_t>(n[r]) * per[r];
    return total;
  }

private:
  attention_problem(attention_problem_args const& a, token_layout const& t, ulysses_layout const& u)
      : a_(a), tokens_(t), heads_(u) {}

  [[nodiscard]] static std::size_t rounded(std::size_t b) noexcept {
    return b == 0 ? 0 : device_arena::rounded_size(b);
  }
  [[nodiscard]] slot_layout layout(std::initializer_list<chunk_tensor> ts) const noexcept {
    slot_layout l;
    for (chunk_tensor t : ts) {
      l.offset[static_cast<std::size_t>(t)] = l.bytes;
      l.bytes += rounded(bytes(t));
    }
    return l;
  }
  template <class Round> [[nodiscard]] std::size_t host_bytes(Round round) const noexcept {
    if (!a_.offload) return 0;
    std::size_t per_chunk = 0;
    for (chunk_tensor t : host_tensors) per_chunk += round(bytes(t));
    return static_cast<std::size_t>(chunks()) * per_chunk;
  }

  attention_problem_args a_;
  token_layout tokens_;
  ulysses_layout heads_;
  // The mask's document offsets, copied at create; a_.mask points into it. Shared by copies.
  std::shared_ptr<std::vector<index_t> const> documents_{};
};

FPDT_NAMESPACE_END
