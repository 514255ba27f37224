// The chunked driver the attention kernel tests share (host and CUDA): problems in a model
// dtype with exact float64 copies, the FPDT way of running a kernel chunk pair by chunk pair
// (forward partials merged with merge_partials, then delta and a backward per pair), and the
// scaled error metrics against the float64 reference. Kernel-agnostic: run_chunked takes any
// type modelling fpdt::chunk_kernel over host-addressable tensors.
#pragma once

#include "reference.hpp"

#include <fpdt/attention/chunk_kernel.hpp>
#include <fpdt/attention/host/chunk_attention.hpp>
#include <fpdt/attention/mask.hpp>
#include <fpdt/attention/online_softmax.hpp>
#include <fpdt/core/bfloat16.hpp>
#include <fpdt/core/half.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace fpdt_test::chunked {

using fpdt::index_t;
using fpdt_test::attn_shape;
using fpdt_test::cview;
using fpdt_test::ref_options;
using fpdt_test::ref_result;
using fpdt_test::view;

inline constexpr float ninf = -std::numeric_limits<float>::infinity();
inline constexpr float fnan = std::numeric_limits<float>::quiet_NaN();

// Tolerance of fp32 accumulation against float64, as a fraction of each tensor's scale (see
// check_against_reference for the scales). The inputs the reference gets are the T-rounded values
// the kernel sees, so this one tolerance covers fp32, bf16 and fp16 inputs alike.
inline constexpr double fp32_tol = 1e-5;

inline bool contains(std::string const& s, std::string const& part) {
  return s.find(part) != std::string::npos;
}

// One attention problem: inputs in T, and the same values exactly in double for the reference.
template <class T>
struct problem {
  attn_shape s;
  std::vector<T> q, k, v, dout;
  std::vector<double> qd, kd, vd, doutd;
};

template <class T>
problem<T> from_double(attn_shape s, std::vector<double> const& q, std::vector<double> const& k,
                       std::vector<double> const& v, std::vector<double> const& dout) {
  problem<T> p;
  p.s = s;
  p.q = fpdt_test::convert<T>(q);
  p.k = fpdt_test::convert<T>(k);
  p.v = fpdt_test::convert<T>(v);
  p.dout = fpdt_test::convert<T>(dout);
  p.qd = fpdt_test::to_double(p.q);
  p.kd = fpdt_test::to_double(p.k);
  p.vd = fpdt_test::to_double(p.v);
  p.doutd = fpdt_test::to_double(p.dout);
  return p;
}

// q, k, v, dout from N(0, 1) (q times q_std), fixed seeds.
template <class T>
problem<T> random_problem(attn_shape s, std::uint32_t seed, double q_std = 1.0) {
  return from_double<T>(s, fpdt_test::random_normal(s.q_size(), seed, q_std),
                        fpdt_test::random_normal(s.kv_size(), seed + 1),
                        fpdt_test::random_normal(s.kv_size(), seed + 2),
                        fpdt_test::random_normal(s.q_size(), seed + 3));
}

// fp32 results of a chunked run.
struct run_result {
  std::vector<float> out, lse, dq, dk, dv;
};

struct run_options {
  fpdt::attention_mask mask{};
  index_t q_offset = 0, k_offset = 0;
  std::optional<float> scale{};
  std::vector<index_t> q_chunks{}; // chunk sizes summing to Sq; empty: one chunk
  std::vector<index_t> k_chunks{}; // chunk sizes summing to Sk; empty: one chunk
  bool skip_invisible = false;     // skip chunk pairs in which no query sees a key
  bool backward = true;
  unsigned threads = 2;
};

inline std::vector<index_t> bounds(std::vector<index_t> const& sizes, index_t n) {
  std::vector<index_t> b{0};
  if (sizes.empty()) {
    b.push_back(n);
    return b;
  }
  for (index_t c : sizes)
    b.push_back(b.back() + c);
  REQUIRE(b.back() == n);
  return b;
}

inline ref_options ref_opts(run_options const& o) {
  // The dense reference knows full and causal only; masks with windows or documents are tested
  // against explicit mask matrices (tests/layers/masked_attention.cpp).
  REQUIRE_MESSAGE(!o.mask.limits_by_position(), "chunked_driver: no reference for mask ", fpdt::to_string(o.mask));
  ref_options r;
  r.causal = o.mask.kind == fpdt::mask_kind::causal;
  r.q_offset = o.q_offset;
  r.k_offset = o.k_offset;
  if (o.scale) r.scale = double{*o.scale};
  return r;
}

// The FPDT way: for each query chunk, forward against every key chunk into a scratch partial
// state (pre-filled with NaN so an unwritten element would show), merged with merge_partials into
// slices of one [Sq, H, D] / [H, Sq] state; then delta = rowsum(dout * out) from the final fp32 out
// and a backward per chunk pair with the final lse and delta, accumulating fp32 dq, dk, dv.
template <class T, class Kernel>
run_result run_chunked(problem<T> const& p, run_options const& o, Kernel const& kernel) {
  attn_shape const& s = p.s;
  run_result r;
  r.out.assign(s.q_size(), fnan);
  r.lse.assign(s.lse_size(), fnan);
  auto out_v = view(r.out, s.q_ext());
  auto lse_v = view(r.lse, s.lse_ext());
  auto qv = cview(p.q, s.q_ext());
  auto kv = cview(p.k, s.kv_ext());
  auto vv = cview(p.v, s.kv_ext());
  std::vector<index_t> const qb = bounds(o.q_chunks, s.sq), kb = bounds(o.k_chunks, s.sk);
  auto pair_visible = [&](index_t q0, index_t q1, index_t k0, index_t k1) {
    for (index_t i = q0; i < q1; ++i) {
      fpdt::key_range const kr = o.mask.local_keys(o.q_offset + i, o.k_offset + k0, k1 - k0);
      if (kr.begin < kr.end) return true;
    }
    return false;
  };
  for (std::size_t i = 0; i + 1 < qb.size(); ++i) {
    index_t const q0 = qb[i], q1 = qb[i + 1], nq = q1 - q0;
    fpdt::partial_view acc{out_v.slice(0, q0, q1).value(), lse_v.slice(1, q0, q1).value()};
    fpdt::reset_partial(acc);
    for (std::size_t j = 0; j + 1 < kb.size(); ++j) {
      index_t const k0 = kb[j], k1 = kb[j + 1];
      if (o.skip_invisible && !pair_visible(q0, q1, k0, k1)) continue;
      std::vector<float> t_out(static_cast<std::size_t>(nq * s.h * s.d), fnan);
      std::vector<float> t_lse(static_cast<std::size_t>(s.h * nq), fnan);
      fpdt::chunk_forward_args<T> a{};
      a.q = qv.slice(0, q0, q1).value();
      a.k = kv.slice(0, k0, k1).value();
      a.v = vv.slice(0, k0, k1).value();
      a.out = {view(t_out, std::array<index_t, 3>{nq, s.h, s.d}),
               view(t_lse, std::array<index_t, 2>{s.h, nq})};
      a.mask = o.mask;
      a.q_offset = o.q_offset + q0;
      a.k_offset = o.k_offset + k0;
      a.scale = o.scale;
      auto st = kernel.forward(a);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      REQUIRE(fpdt::merge_partials(acc, fpdt::partial_cview(a.out)).ok());
    }
  }
  if (!o.backward) return r;
  std::vector<float> delta(s.lse_size(), fnan);
  auto delta_v = view(delta, s.lse_ext());
  REQUIRE(fpdt::compute_delta(cview(r.out, s.q_ext()), cview(p.dout, s.q_ext()), delta_v).ok());
  std::vector<T> out_t;
  out_t.reserve(r.out.size());
  for (float x : r.out)
    out_t.push_back(fpdt_test::to<T>(double{x})); // the model-dtype output
  r.dq.assign(s.q_size(), 0.0f);
  r.dk.assign(s.kv_size(), 0.0f);
  r.dv.assign(s.kv_size(), 0.0f);
  auto dqv = view(r.dq, s.q_ext());
  auto dkv = view(r.dk, s.kv_ext());
  auto dvv = view(r.dv, s.kv_ext());
  auto outtv = cview(out_t, s.q_ext());
  auto doutv = cview(p.dout, s.q_ext());
  fpdt::tensor_view<float const, 2> lse_c = lse_v, delta_c = delta_v;
  for (std::size_t j = 0; j + 1 < kb.size(); ++j)
    for (std::size_t i = 0; i + 1 < qb.size(); ++i) {
      index_t const q0 = qb[i], q1 = qb[i + 1], k0 = kb[j], k1 = kb[j + 1];
      if (o.skip_invisible && !pair_visible(q0, q1, k0, k1)) continue;
      fpdt::chunk_backward_args<T> b{};
      b.q = qv.slice(0, q0, q1).value();
      b.k = kv.slice(0, k0, k1).value();
      b.v = vv.slice(0, k0, k1).value();
      b.out = outtv.slice(0, q0, q1).value();
      b.dout = doutv.slice(0, q0, q1).value();
      b.lse = lse_c.slice(1, q0, q1).value();
      b.delta = delta_c.slice(1, q0, q1).value();
      b.dq = dqv.slice(0, q0, q1).value();
      b.dk = dkv.slice(0, k0, k1).value();
      b.dv = dvv.slice(0, k0, k1).value();
      b.mask = o.mask;
      b.q_offset = o.q_offset + q0;
      b.k_offset = o.k_offset + k0;
      b.scale = o.scale;
      auto st = kernel.backward(b);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
    }
  return r;
}

// Max abs error of lse relative to max(1, |lse|) per element; -inf must match exactly.
inline double lse_error(std::vector<float> const& got, std::vector<double> const& ref) {
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ref[i]) || !std::isfinite(got[i])) {
      if (double{got[i]} != ref[i]) return fpdt_test::inf64;
      continue;
    }
    worst = std::max(worst, std::abs(double{got[i]} - ref[i]) / std::max(1.0, std::abs(ref[i])));
  }
  return worst;
}

// Errors of a run against the reference, each scaled (see check_against_reference).
struct scaled_errors {
  double out = 0, lse = 0, dq = 0, dk = 0, dv = 0;
  [[nodiscard]] double worst() const { return std::max({out, lse, dq, dk, dv}); }
};

// Scales: out is a convex combination of rows of v, so its rounding error is proportional to
// max|v| (|out| itself cancels toward 0 where attention is flat, which would make a relative test
// unsound); lse is compared per element relative to max(1, |lse|) (fp32 carries ~1e-7 relative,
// and absolute ~1e-7 near 0); each gradient element is a sum of terms whose magnitudes are those
// of the tensor's largest elements, so its error is measured relative to max|reference| of that
// tensor. Any NaN or inf where the reference is finite makes the error infinite.
template <class T>
scaled_errors errors_against_reference(run_result const& got, ref_result const& ref,
                                       problem<T> const& p, bool grads) {
  scaled_errors e;
  double const vmax = std::max(fpdt_test::max_abs(p.vd), 1e-30);
  auto const eo = fpdt_test::compare(got.out, ref.out);
  e.out = eo.max_abs / vmax;
  e.lse = lse_error(got.lse, ref.lse);
  if (grads) {
    e.dq = fpdt_test::compare(got.dq, ref.dq).scaled();
    e.dk = fpdt_test::compare(got.dk, ref.dk).scaled();
    e.dv = fpdt_test::compare(got.dv, ref.dv).scaled();
  }
  return e;
}

template <class T>
scaled_errors check_against_reference(run_result const& got, ref_result const& ref,
                                      problem<T> const& p, double tol, bool grads = true) {
  scaled_errors const e = errors_against_reference(got, ref, p, grads);
  INFO("scaled errors: out " << e.out << " lse " << e.lse << " dq " << e.dq << " dk " << e.dk
                             << " dv " << e.dv);
  CHECK(e.out <= tol);
  CHECK(e.lse <= tol);
  if (grads) {
    CHECK(e.dq <= tol);
    CHECK(e.dk <= tol);
    CHECK(e.dv <= tol);
    CHECK(fpdt_test::no_nan(got.dq));
    CHECK(fpdt_test::no_nan(got.dk));
    CHECK(fpdt_test::no_nan(got.dv));
  }
  CHECK(fpdt_test::no_nan(got.out));
  CHECK(fpdt_test::no_nan(got.lse));
  return e;
}

template <class T>
ref_result reference_of(problem<T> const& p, run_options const& o) {
  return fpdt_test::reference_backward(p.qd, p.kd, p.vd, p.doutd, p.s, ref_opts(o));
}

// Random chunk sizes summing to n (some of size 1 when force_ones, one of size 0 somewhere when
// with_empty), in random order, fixed seed.
inline std::vector<index_t> random_split(index_t n, std::uint32_t seed, bool force_ones,
                                  bool with_empty = false) {
  std::mt19937 gen(seed);
  std::vector<index_t> sizes;
  index_t left = n;
  while (left > 0) {
    index_t c;
    if (force_ones && sizes.size() % 3 == 1)
      c = 1;
    else
      c = std::uniform_int_distribution<index_t>(1, std::max<index_t>(1, n / 2))(gen);
    c = std::min(c, left);
    sizes.push_back(c);
    left -= c;
  }
  if (with_empty) sizes.push_back(0);
  std::shuffle(sizes.begin(), sizes.end(), gen);
  return sizes;
}

template <class T>
char const* type_name() {
  if constexpr (std::is_same_v<T, float>)
    return "float";
  else if constexpr (std::is_same_v<T, fpdt::bfloat16>)
    return "bfloat16";
  else
    return "half";
}

// run_chunked with the host kernel on o.threads threads.
template <class T>
run_result run_chunked(problem<T> const& p, run_options const& o) {
  return run_chunked(p, o, fpdt::host_chunk_kernel{o.threads});
}

} // namespace fpdt_test::chunked
