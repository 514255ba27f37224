//! \file
//! \brief The planner's time model: model FLOPs of a training step, and its time from a
//! simulation of the schedule's steps on the compute, h2d, d2h and comm lanes at hardware rates,
//! giving step time, exposed copy time and MFU.
//!
//! docs/design.md 4.4 (the schedule's three consumers): FPDT attention is priced by running the very
//! `forward_schedule` / `backward_schedule` the layer executes through a list-scheduling
//! simulation (a step starts when its dependencies are done and its lane is free; lanes are FIFO
//! like the executor's streams). Compute steps cost FLOPs / throughput, merges and finalizes cost
//! HBM bytes / bandwidth, fetches and offloads cost the bytes that cross PCIe / PCIe bandwidth
//! (one way, or half the both-ways figure while the other direction is busy; dout from the
//! caller, and anything with offload off, does not cross), and the exchange steps (P > 1) cost the
//! all-to-all time of the bytes they move on the comm lane. The rest of a layer (projections, MLP)
//! runs on the compute lane after the attention; checkpoint copies and ZeRO-3 gathers run on their
//! lanes beside it, and a layer lasts as long as its busiest lane.
//!
//! Model FLOPs follow the paper's count (FPDT, arXiv 2408.16978, section 5; Megatron's MFU,
//! Korthikanti et al. arXiv 2205.05198 appendix): per token and layer 2 FLOPs per GEMM parameter,
//! attention 4 S h FLOPs per token halved for the causal mask, the output projection 2 h V, and
//! 3x the forward for forward plus backward. Recomputation is real work but not model FLOPs.
#pragma once

#include "../config.hpp"
#include "../core/lane.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"
#include "../schedule/schedule.hpp"
#include "memory_model.hpp"

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! One GPU model and the node it sits in. Rates are achievable (measured) figures, not peaks,
//! except `peak_tflops` (the MFU denominator). GB are 1e9 bytes.
struct hardware_config {
  std::string name;                     //!< for messages and output
  std::uint64_t device_bytes = 0;       //!< HBM per GPU, bytes
  std::uint64_t host_bytes_per_gpu = 0; //!< host memory of the node / GPUs per node, bytes
  std::uint64_t reserved_bytes = 0;     //!< device bytes not available to tensors (context, NCCL, workspaces)
  double peak_tflops = 0;          //!< dense BF16 tensor-core peak, TFLOP/s (MFU denominator)
  double matmul_tflops = 0;        //!< large BF16 GEMMs, TFLOP/s
  double attention_fwd_tflops = 0; //!< attention forward, model TFLOP/s (4 S^2 h per layer, causal halved)
  double attention_bwd_tflops = 0; //!< attention backward, model TFLOP/s (2x the forward's FLOPs)
  double hbm_gbps = 0;             //!< HBM bandwidth, GB/s (elementwise steps)
  double pcie_h2d_gbps = 0;        //!< pinned host to device, one direction alone, GB/s
  double pcie_d2h_gbps = 0;        //!< device to pinned host, one direction alone, GB/s
  double pcie_both_gbps = 0;       //!< both directions at once, the sum, GB/s
  double intra_node_a2a_gbps = 0;  //!< all-to-all bus bandwidth inside a node (NVLink), GB/s
  double inter_node_a2a_gbps = 0;  //!< all-to-all bus bandwidth across nodes (network), per GPU, GB/s
  index_t gpus_per_node = 8;       //!< groups larger than this cross the network
};

//! Checks that every rate and size is positive. Errors: `errc::invalid_argument` naming the field.
[[nodiscard]] inline status check_hardware(hardware_config const& hw) {
  struct field {
    char const* name;
    double v;
  } const fs[] = {{"memory", static_cast<double>(hw.device_bytes)},
                  {"host_memory", static_cast<double>(hw.host_bytes_per_gpu)},
                  {"peak_tflops", hw.peak_tflops},
                  {"matmul_tflops", hw.matmul_tflops},
                  {"attention_fwd_tflops", hw.attention_fwd_tflops},
                  {"attention_bwd_tflops", hw.attention_bwd_tflops},
                  {"hbm_gbps", hw.hbm_gbps},
                  {"pcie_h2d_gbps", hw.pcie_h2d_gbps},
                  {"pcie_d2h_gbps", hw.pcie_d2h_gbps},
                  {"pcie_both_gbps", hw.pcie_both_gbps},
                  {"intra_node_a2a_gbps", hw.intra_node_a2a_gbps},
                  {"inter_node_a2a_gbps", hw.inter_node_a2a_gbps},
                  {"gpus_per_node", static_cast<double>(hw.gpus_per_node)}};
  for (auto const& f : fs)
    if (!(f.v > 0))
      return make_error(errc::invalid_argument, "gpu ", hw.name, ": ", f.name, " = ", f.v, " must be positive");
  if (hw.reserved_bytes >= hw.device_bytes)
    return make_error(errc::invalid_argument, "gpu ", hw.name, ": reserved ", hw.reserved_bytes,
                      " bytes leave nothing of ", hw.device_bytes);
  return {};
}

//! The attention FLOPs of `mask` over a sequence of S tokens relative to the causal mask's: its
//! visible (query, key) pairs over the causal mask's (1 for causal, about 2 for full, about
//! W / (S / 2) for a causal window of W << S tokens).
[[nodiscard]] constexpr double attention_work_vs_causal(attention_mask const& mask, index_t sequence) noexcept {
  double const causal = causal_mask.visible_pairs(0, sequence, 0, sequence);
  return causal > 0 ? mask.visible_pairs(0, sequence, 0, sequence) / causal : 1.0;
}

//! Model FLOPs of one training step (forward and backward, all ranks, one sequence of `sequence`
//! tokens), as the paper counts them (see the file comment); attention under `mask` counts its
//! visible pairs (`attention_work_vs_causal`), so a sliding window counts only the window.
[[nodiscard]] constexpr double model_flops(model_config const& m, index_t sequence,
                                           attention_mask const& mask = causal_mask) noexcept {
  double const s = static_cast<double>(sequence), h = static_cast<double>(m.hidden);
  double const gemm = static_cast<double>(layer_parameter_count(m)) - 2 * h; // norms are not GEMMs
  double const per_layer = 2 * s * gemm + 2 * s * s * h * attention_work_vs_causal(mask, sequence); // 4 S^2 h, causal halved
  return 3 * (static_cast<double>(m.layers) * per_layer + 2 * s * h * static_cast<double>(m.vocab));
}

//! Time of one lane-level simulation of a schedule.
struct pass_timing {
  double makespan = 0;          //!< seconds from the first step's start to the last step's end
  std::array<double, 4> busy{}; //!< seconds each lane (indexed by `lane`) is busy
};

//! Cost of one step: seconds on its own lane (ignored for copy steps, which cost bytes / rate).
//! Exchanges are steps of their own on the comm lane, priced like any other.
struct step_price {
  double seconds = 0; //!< on the step's lane
  //! For a copy step: the bytes of it that cross PCIe, when not all of `schedule_step::bytes`
  //! do (on one rank the backward's first fetch of a query chunk takes dout_i from the caller,
  //! not from host memory; with offload off it moves nothing over PCIe). Ignored for other steps.
  std::optional<std::uint64_t> pcie_bytes;

  constexpr step_price() = default;
  //! `{seconds}` or `{seconds, pcie_bytes}` (a constructor rather than an aggregate, so the
  //! one-value form stays free of missing-initializer warnings).
  // Implicit, so a price function may return plain seconds.
  constexpr step_price(double on_lane, std::optional<std::uint64_t> pcie = std::nullopt)
      : seconds(on_lane), pcie_bytes(pcie) {}
  //! Not a price: the second value is bytes (the comm lane is priced by exchange steps).
  template <std::floating_point F> step_price(double, F) = delete;
};

//! PCIe rates of a simulation, bytes per second (infinite: copies are free).
struct copy_rates {
  double h2d = 0;  //!< one direction alone
  double d2h = 0;  //!< one direction alone
  double both = 0; //!< both directions at once, the sum
};

//! Simulates schedule `s` (see the file comment): copy steps cost `bytes / rate` at `rates` (the
//! price's `pcie_bytes` when given, else the step's `bytes`), every other step (exchanges
//! included) what `price(step)` returns (a `step_price`);
//! `release` steps cost nothing.
//! Pure; linear in the number of steps and dependencies.
template <class Price>
[[nodiscard]] pass_timing simulate_schedule(schedule const& s, copy_rates const& rates, Price&& price) {
  std::vector<double> done(s.steps.size(), 0);
  std::array<double, 4> free_at{};
  pass_timing t;
  for (std::size_t k = 0; k < s.steps.size(); ++k) {
    schedule_step const& st = s.steps[k];
    double ready = 0;
    for (std::uint32_t d : s.deps_of(k)) ready = std::max(ready, done[d]);
    if (st.kind == step_kind::release) {
      done[k] = ready;
      continue;
    }
    auto const ln = static_cast<std::size_t>(st.on);
    double const start = std::max(ready, free_at[ln]);
    double secs = 0;
    if (st.on == lane::h2d || st.on == lane::d2h) {
      auto const other = static_cast<std::size_t>(st.on == lane::h2d ? lane::d2h : lane::h2d);
      double rate = st.on == lane::h2d ? rates.h2d : rates.d2h;
      if (free_at[other] > start) rate = std::min(rate, rates.both / 2);
      step_price const p = price(st);
      std::uint64_t const bytes = p.pcie_bytes.value_or(st.bytes);
      secs = bytes == 0 ? 0.0 : static_cast<double>(bytes) / rate;
    } else {
      secs = price(st).seconds;
    }
    double const end = start + secs;
    free_at[ln] = end;
    t.busy[ln] += secs;
    done[k] = end;
    t.makespan = std::max(t.makespan, end);
  }
  return t;
}

//! Predicted time of one training step on one rank.
struct step_estimate {
  double model_flops = 0;          //!< model FLOPs of the step, all ranks (see `model_flops`)
  double step_seconds = 0;         //!< predicted step time, seconds
  double no_copy_seconds = 0;      //!< the same step with free host-device copies, seconds
  double exposed_copy_seconds = 0; //!< step_seconds - no_copy_seconds: copies compute did not hide
  double comm_seconds = 0;         //!< comm-lane busy time (all-to-all, TP collectives, ZeRO), seconds
  double mfu = 0;                  //!< model FLOPs / (P x step_seconds x peak), in [0, 1]
  double tokens_per_second = 0;    //!< global tokens per second
};

//! The most chunks (u = S / C) `estimate_step` simulates: the schedules have about u^2 / 2 steps.
inline constexpr index_t max_simulated_chunks = 4096;

namespace detail::plan {

// Seconds of an all-to-all (or all-gather, reduce-scatter) moving `bytes` per rank over P ranks.
inline double collective_seconds(double bytes, index_t p, hardware_config const& hw) {
  if (p <= 1) return 0;
  double const bw = (p <= hw.gpus_per_node ? hw.intra_node_a2a_gbps : hw.inter_node_a2a_gbps) * 1e9;
  return bytes * static_cast<double>(p - 1) / static_cast<double>(p) / bw;
}

struct layer_time {
  double fwd = 0, bwd = 0, comm = 0; // bwd includes the recomputation
};

inline result<layer_time> time_layer(model_config const& m, training_config const& t,
                                     hardware_config const& hw, bool free_copies) {
  double const p = static_cast<double>(t.gpus), h = static_cast<double>(m.hidden);
  double const db = static_cast<double>(t.dtype_bytes);
  double const s_local = static_cast<double>(t.sequence) / p;
  double const d = static_cast<double>(m.hidden / m.heads);
  double const kv_dim = static_cast<double>(local_kv_heads(m, t.gpus) * t.gpus) * d;
  double const mm = hw.matmul_tflops * 1e12, af = hw.attention_fwd_tflops * 1e12,
               ab = hw.attention_bwd_tflops * 1e12, hbm = hw.hbm_gbps * 1e9;
  double const inter = m.ffn_type == ffn_kind::swiglu ? 3 : 2;
  double const qkv_flops_tok = 2 * h * (h + 2 * kv_dim);
  double const rest_flops_tok = 2 * h * h + 2 * inter * h * static_cast<double>(m.ffn);
  double const inf = std::numeric_limits<double>::infinity();
  double const ckpt_copy = (t.checkpointing && t.checkpoint_offload && !free_copies)
                               ? s_local * h * db / std::min(hw.pcie_h2d_gbps, hw.pcie_d2h_gbps) / 1e9
                               : 0;
  // ZeRO-3: gather a layer's parameters (forward, recomputation) and reduce-scatter its gradients.
  double const layer_param_bytes = static_cast<double>(layer_parameter_count(m)) * db;
  bool const zero3 = t.method != parallel_method::megatron_sp && t.zero_stage >= 3;
  double const zero_fwd = zero3 ? collective_seconds(layer_param_bytes, t.gpus, hw) : 0;
  layer_time lt;
  if (t.method == parallel_method::fpdt) {
    auto problem = fpdt_attention_problem(m, t);
    if (!problem) return problem.error();
    attention_problem const& rank = *problem; // sizes are one rank's (local heads)
    index_t const c = rank.chunk(), hl = rank.local_heads();
    if (rank.chunks() > max_simulated_chunks)
      return make_error(errc::invalid_argument, "estimate_step: sequence ", t.sequence, " / chunk ", c,
                        " = ", rank.chunks(), " chunks; the simulation takes at most ",
                        max_simulated_chunks, " (u^2 / 2 steps): use a larger chunk");
    // The schedules of one rank, exchange steps included, with the bytes their steps move.
    schedule_params const sp = rank.schedule_params_of(pass::backward);
    auto fs = rank.forward_schedule();
    if (!fs) return fs.error();
    auto bs = rank.backward_schedule();
    if (!bs) return bs.error();
    double const qe = static_cast<double>(rank.bytes(chunk_tensor::dq)) / 4; // elements of q_i
    double const cg = static_cast<double>(c);
    double const pair_fwd = 4 * cg * cg * static_cast<double>(hl) * d;
    // An exchange step moves its `bytes` from and to every rank (the gradients in fp32).
    auto exchange = [&](schedule_step const& st) {
      return collective_seconds(static_cast<double>(st.bytes), t.gpus, hw);
    };
    double const acc = static_cast<double>(rank.bytes(chunk_tensor::acc_out) + rank.bytes(chunk_tensor::acc_lse));
    copy_rates const rates = free_copies ? copy_rates{inf, inf, inf}
                                         : copy_rates{hw.pcie_h2d_gbps * 1e9, hw.pcie_d2h_gbps * 1e9,
                                                      hw.pcie_both_gbps * 1e9};
    auto fwd_price = [&](schedule_step const& st) -> step_price {
      switch (st.kind) {
      case step_kind::produce: return 0.0; // the projections: in the compute tail (rest_fwd)
      case step_kind::exchange: return exchange(st);
      case step_kind::compute: return visible_fraction(fs->params, st.i, st.j) * pair_fwd / af;
      case step_kind::merge: return 3 * acc / hbm;
      case step_kind::finalize: return (acc + static_cast<double>(st.bytes)) / hbm;
      case step_kind::sink: return 0.0;
      default: return static_cast<double>(st.bytes) / hbm;
      }
    };
    auto bwd_price = [&](schedule_step const& st) -> step_price {
      switch (st.kind) {
      case step_kind::fetch:
        // On one rank the first fetch of query chunk i (payload q_side) takes dout_i from the
        // caller, not over PCIe; q_i, out_i, lse_i come from host memory only with offload.
        if (st.what == payload::q_side)
          return {0.0, t.offload ? st.bytes - sp.dout_bytes : std::uint64_t{0}};
        return 0.0;
      case step_kind::exchange: return exchange(st);
      case step_kind::compute: return visible_fraction(bs->params, st.i, st.j) * 2 * pair_fwd / ab;
      case step_kind::delta: return 2 * qe * db / hbm;
      case step_kind::sink: return 0.0;
      default: return static_cast<double>(st.bytes) / hbm;
      }
    };
    pass_timing const f = simulate_schedule(*fs, rates, fwd_price);
    pass_timing const b = simulate_schedule(*bs, rates, bwd_price);
    double const rest_fwd = s_local * (rest_flops_tok + qkv_flops_tok) / mm;
    auto lane_max = [&](pass_timing const& x, double compute_tail, double copy_extra, double comm_extra) {
      double const h2d = x.busy[static_cast<std::size_t>(lane::h2d)] + copy_extra;
      double const d2h = x.busy[static_cast<std::size_t>(lane::d2h)] + copy_extra;
      double const cm = x.busy[static_cast<std::size_t>(lane::comm)] + comm_extra;
      return std::max({x.makespan + compute_tail, h2d, d2h, cm});
    };
    lt.fwd = lane_max(f, rest_fwd, ckpt_copy, zero_fwd);
    double const recompute = t.checkpointing ? lane_max(f, rest_fwd, 0, zero_fwd) : 0;
    // Backward: the projections' and MLP's GEMMs twice over (input and weight gradients), plus
    // the chunked MLP's recomputation of its intermediates.
    double const mlp_flops_tok = 2 * inter * h * static_cast<double>(m.ffn);
    double const rest_bwd = (2 * s_local * (rest_flops_tok + qkv_flops_tok) + s_local * mlp_flops_tok) / mm;
    lt.bwd = recompute + lane_max(b, rest_bwd, ckpt_copy, 2 * zero_fwd);
    lt.comm = f.busy[static_cast<std::size_t>(lane::comm)] * (t.checkpointing ? 2 : 1) +
              b.busy[static_cast<std::size_t>(lane::comm)] + 4 * zero_fwd;
    return lt;
  }
  // Ulysses and Megatron-SP: whole-sequence attention, collectives not overlapped with compute.
  double const s = static_cast<double>(t.sequence);
  std::vector<index_t> offsets;
  double const attn_flops =
      2 * s * s * h / p * attention_work_vs_causal(training_mask(t, offsets), t.sequence); // this rank's share
  double const gemm_fwd = s_local * (qkv_flops_tok + rest_flops_tok) / mm;
  double comm_fwd = 0;
  if (t.method == parallel_method::ulysses) // q, k, v to heads and the output back
    comm_fwd = collective_seconds(s_local * (2 * h + 2 * kv_dim) * db, t.gpus, hw);
  else // two all-gathers and two reduce-scatters of [S, h]
    comm_fwd = 4 * collective_seconds(s * h * db, t.gpus, hw);
  double const fwd_compute = gemm_fwd + attn_flops / af + comm_fwd;
  double const bwd_compute = 2 * gemm_fwd + 2 * attn_flops / ab + comm_fwd;
  lt.fwd = std::max({fwd_compute, ckpt_copy, comm_fwd + zero_fwd});
  double const recompute = t.checkpointing ? std::max(fwd_compute, comm_fwd + zero_fwd) : 0;
  lt.bwd = recompute + std::max({bwd_compute, ckpt_copy, comm_fwd + 2 * zero_fwd});
  lt.comm = comm_fwd * (t.checkpointing ? 3 : 2) + 4 * zero_fwd;
  return lt;
}

} // namespace detail::plan

//! Predicted time and MFU of one training step (one sequence of `t.sequence` tokens over
//! `t.gpus` ranks): L layers' forward, recomputation and backward (see the file comment), the
//! output projection and loss (3 x 2 S/P h V FLOPs on the GEMM rate) and the Adam update (fp32
//! states and model-dtype parameters and gradients read and written once, on HBM). Exposed copy
//! time is the difference to the same step with free copies. Errors: those of `check_training`,
//! `check_hardware` and the schedule builders; `errc::invalid_argument` for more than
//! `max_simulated_chunks` chunks.
[[nodiscard]] inline result<step_estimate> estimate_step(model_config const& m, training_config const& t,
                                                         hardware_config const& hw) {
  FPDT_TRY(check_training(m, t));
  FPDT_TRY(check_hardware(hw));
  auto run = [&](bool free_copies) -> result<std::pair<double, double>> {
    auto lt = detail::plan::time_layer(m, t, hw, free_copies);
    if (!lt) return lt.error();
    double const p = static_cast<double>(t.gpus);
    double const s_local = static_cast<double>(t.sequence) / p;
    double const loss = 3 * 2 * s_local * static_cast<double>(m.hidden) * static_cast<double>(m.vocab) /
                        (hw.matmul_tflops * 1e12);
    double const n = static_cast<double>(parameter_count(m));
    double const shard = (t.method == parallel_method::megatron_sp || t.zero_stage >= 1) ? n / p : n;
    double const adam = 2 * shard * (12 + 2 * static_cast<double>(t.dtype_bytes)) / (hw.hbm_gbps * 1e9);
    double const layers = static_cast<double>(m.layers);
    return std::pair{layers * (lt->fwd + lt->bwd) + loss + adam, layers * lt->comm};
  };
  auto real = run(false);
  if (!real) return real.error();
  auto ideal = run(true);
  if (!ideal) return ideal.error();
  step_estimate e;
  std::vector<index_t> offsets;
  e.model_flops = model_flops(m, t.sequence, training_mask(t, offsets));
  e.step_seconds = real->first;
  e.no_copy_seconds = ideal->first;
  e.exposed_copy_seconds = std::max(0.0, real->first - ideal->first);
  e.comm_seconds = real->second;
  e.mfu = e.model_flops / (static_cast<double>(t.gpus) * e.step_seconds * hw.peak_tflops * 1e12);
  e.tokens_per_second = static_cast<double>(t.sequence) / e.step_seconds;
  return e;
}

FPDT_NAMESPACE_END
