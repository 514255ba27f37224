//! \file
//! \brief The planner: the longest sequence that fits a model on P GPUs with a method, the
//! recommended chunk size, and the predicted MFU there (`fpdt-plan` prints these).
//!
//! Built on `estimate_memory` and `estimate_step`. Sequence lengths are searched over powers of
//! two, then (optionally) in eighths between the last power of two that fits and the next.
//! FPDT chunk sizes are powers of two C with C % P == 0 and S % C == 0; a length fits when some
//! such chunk fits, and the recommended chunk is the fitting one with the highest predicted MFU.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "cost_model.hpp"
#include "memory_model.hpp"
#include "../schedule/token_layout.hpp"

#include <cstdint>
#include <optional>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! One evaluated configuration.
struct plan_point {
  training_config training{};  //!< the configuration (FPDT: with its chosen chunk)
  memory_breakdown memory{};   //!< per-rank bytes
  bool fits_device = false;    //!< device_total() <= the GPU's memory
  bool fits_host = false;      //!< host_total() <= the host memory per GPU
  std::optional<step_estimate> step{}; //!< predicted time, when asked for
};

//! The answer of `longest_sequence`.
struct plan_answer {
  index_t device_limit = 0; //!< longest length whose device memory fits (host ignored), tokens; 0: none
  index_t host_limit = 0;   //!< longest length whose pinned host memory fits (device ignored); 0: none
  index_t longest = 0;      //!< longest length that fits both; 0: none
  std::optional<plan_point> at_longest{}; //!< the evaluation there (with the recommended chunk and time)
};

//! FPDT chunk candidates for S tokens on P ranks: powers of two C from `min_chunk` (or S when
//! smaller) that the token layout accepts (`token_layout::make(S, P, C)`, the one place of the
//! shape rules: today C % P == 0 and S % C == 0) with S / C <= `max_chunks`, ascending.
//! Non-FPDT: {0}.
[[nodiscard]] inline std::vector<index_t> chunk_candidates(training_config const& t, index_t min_chunk = 1024,
                                                           index_t max_chunks = 256) {
  if (t.method != parallel_method::fpdt) return {0};
  std::vector<index_t> v;
  for (index_t c = 1; c <= t.sequence; c *= 2)
    if (c >= std::min(min_chunk, t.sequence) && t.sequence / c <= max_chunks &&
        token_layout::make(t.sequence, t.gpus, c).ok())
      v.push_back(c);
  return v;
}

//! Evaluates `t` at `t.sequence` tokens on `hw`; FPDT with `t.chunk == 0` tries the chunk
//! candidates and keeps the fitting one with the best MFU (`with_time`) or the least device
//! memory (without). Errors: those of `estimate_memory` and `estimate_step`; `errc::invalid_argument`
//! when no chunk candidate exists for the length.
[[nodiscard]] inline result<plan_point> evaluate_plan(model_config const& m, training_config const& t,
                                                      hardware_config const& hw, bool with_time) {
  FPDT_TRY(check_hardware(hw));
  std::vector<index_t> const chunks = t.method == parallel_method::fpdt && t.chunk == 0
                                          ? chunk_candidates(t)
                                          : std::vector<index_t>{t.chunk};
  if (chunks.empty())
    return make_error(errc::invalid_argument, "no chunk size (a power of two divisible by ", t.gpus,
                      ", dividing ", t.sequence, ", at most 256 chunks) exists for sequence ", t.sequence);
  std::optional<plan_point> best;
  auto better = [&](plan_point const& a, plan_point const& b) {
    bool const fa = a.fits_device && a.fits_host, fb = b.fits_device && b.fits_host;
    if (fa != fb) return fa;
    if (with_time && fa && a.step->mfu != b.step->mfu) return a.step->mfu > b.step->mfu;
    return a.memory.device_total() < b.memory.device_total();
  };
  for (index_t c : chunks) {
    plan_point pt;
    pt.training = t;
    pt.training.chunk = c;
    auto mem = estimate_memory(m, pt.training, hw.reserved_bytes);
    if (!mem) return mem.error();
    pt.memory = *mem;
    pt.fits_device = pt.memory.device_total() <= hw.device_bytes;
    pt.fits_host = pt.memory.host_total() <= hw.host_bytes_per_gpu;
    if (with_time && pt.fits_device && pt.fits_host) {
      auto st = estimate_step(m, pt.training, hw);
      if (!st) return st.error();
      pt.step = *st;
    }
    if (!best || better(pt, *best)) best = std::move(pt);
  }
  if (with_time && !best->step) { // nothing fits: still say how fast it would be
    auto st = estimate_step(m, best->training, hw);
    if (!st) return st.error();
    best->step = *st;
  }
  return *best;
}

//! The longest sequence `t` (its sequence ignored; FPDT with `t.chunk == 0`: any chunk
//! candidate, else that chunk) fits on `hw`: powers of two from `min_seq` to
//! `max_seq`, and with `finer`, eighths of a power of two above the longest power of two that
//! fits. Memory grows with S, so the search stops at the first power of two that does not fit.
//! The answer carries the evaluation (with time and recommended chunk) at the longest length
//! that fits both memories. Errors: those of `evaluate_plan` other than "no chunk candidate"
//! (such lengths are skipped); `errc::invalid_argument` for min_seq < 1 or max_seq < min_seq.
[[nodiscard]] inline result<plan_answer> longest_sequence(model_config const& m, training_config const& t,
                                                          hardware_config const& hw, bool finer = true,
                                                          index_t min_seq = 1024,
                                                          index_t max_seq = index_t{1} << 28) {
  if (min_seq < 1 || max_seq < min_seq)
    return make_error(errc::invalid_argument, "longest_sequence: min_seq ", min_seq, " and max_seq ",
                      max_seq, " must satisfy 1 <= min_seq <= max_seq");
  FPDT_TRY(check_training(m, [&] {
    training_config x = t;
    x.sequence = t.method == parallel_method::fpdt && t.chunk > 0 ? t.chunk : t.gpus;
    return x;
  }()));
  plan_answer a;
  auto eval = [&](index_t s) -> result<std::optional<plan_point>> {
    training_config x = t;
    x.sequence = s;
    bool const fpdt = t.method == parallel_method::fpdt;
    bool const fits_layout = fpdt ? (t.chunk == 0 ? !chunk_candidates(x).empty()
                                                  : token_layout::make(s, t.gpus, t.chunk).ok())
                                  : s % t.gpus == 0; // Ulysses and Megatron-SP shard S evenly
    if (!fits_layout)
      return std::optional<plan_point>{};
    auto r = evaluate_plan(m, x, hw, false);
    if (!r) return r.error();
    return std::optional<plan_point>{*r};
  };
  auto note = [&](index_t s, plan_point const& p) {
    if (p.fits_device) a.device_limit = std::max(a.device_limit, s);
    if (p.fits_host) a.host_limit = std::max(a.host_limit, s);
    if (p.fits_device && p.fits_host) a.longest = std::max(a.longest, s);
  };
  index_t s = 1;
  while (s < min_seq) s *= 2;
  bool dev = true, host = true;
  index_t last_pow_dev = 0, last_pow_host = 0, last_pow_both = 0;
  for (; s <= max_seq && (dev || host); s *= 2) {
    auto p = eval(s);
    if (!p) return p.error();
    if (!*p) continue;
    note(s, **p);
    dev = (*p)->fits_device;
    host = (*p)->fits_host;
    if (dev) last_pow_dev = s;
    if (host) last_pow_host = s;
    if (dev && host) last_pow_both = s;
  }
  if (finer)
    for (index_t base : {last_pow_dev, last_pow_host, last_pow_both})
      for (index_t k = 1; base >= 8 && k < 8; ++k) {
        index_t const sf = base + base / 8 * k;
        if (sf > max_seq) break;
        auto p = eval(sf);
        if (!p) return p.error();
        if (*p) note(sf, **p);
      }
  if (a.longest > 0) {
    training_config x = t;
    x.sequence = a.longest;
    auto r = evaluate_plan(m, x, hw, true);
    if (!r) return r.error();
    a.at_longest = *r;
  }
  return a;
}

FPDT_NAMESPACE_END
