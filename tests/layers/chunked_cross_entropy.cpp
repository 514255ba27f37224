// Tests of include/fpdt/layers/chunked_cross_entropy.hpp against a dense float64 reference
// written here (full [N, V] logits): CASES A14 (loss scaling across ranks), A15 (a rank whose
// labels are all ignored), A16 (reduction none with per-token upstream gradients), A17 (inputs
// untouched); label smoothing, sum, chunk sizes 1, 3, N and uneven; workspace and errors.
#include <fpdt/comm/communicator.hpp>
#include <fpdt/layers/chunked_cross_entropy.hpp>
#include <fpdt/layers/host_defaults.hpp>

#include "dense_helpers.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

using fpdt::index_t;

namespace {

using namespace fpdt_test::dense;
using labels_t = std::vector<std::int32_t>;

struct ref_out {
  double loss = 0.0; // as the layer reports it (mean / sum / weighted sum for none)
  index_t valid = 0;
  vec per_token, dx, dw;
};

// Dense float64 cross-entropy of the LM head: logits z = x w^T over all N tokens at once.
ref_out reference(vec const& x, vec const& w, labels_t const& labels, index_t hd, index_t v,
                  fpdt::cross_entropy_options const& o, vec const& grad_output = {}, double scale = 1.0) {
  auto const n = static_cast<index_t>(labels.size());
  ref_out r;
  r.per_token.assign(static_cast<std::size_t>(n), 0.0);
  r.dx.assign(static_cast<std::size_t>(n * hd), 0.0);
  r.dw.assign(static_cast<std::size_t>(v * hd), 0.0);
  for (auto y : labels) r.valid += y == o.ignore_index ? 0 : 1;
  double const eps = o.label_smoothing;
  double sum = 0.0;
  for (index_t i = 0; i < n; ++i) {
    std::int32_t const y = labels[static_cast<std::size_t>(i)];
    if (y == o.ignore_index) continue;
    vec z(static_cast<std::size_t>(v));
    for (index_t j = 0; j < v; ++j)
      for (index_t q = 0; q < hd; ++q)
        z[static_cast<std::size_t>(j)] += x[static_cast<std::size_t>(i * hd + q)] * w[static_cast<std::size_t>(j * hd + q)];
    double const m = *std::max_element(z.begin(), z.end());
    double se = 0.0, zs = 0.0;
    for (double zj : z) {
      se += std::exp(zj - m);
      zs += zj;
    }
    double const lse = m + std::log(se);
    double const li = (1 - eps) * (lse - z[static_cast<std::size_t>(y)]) + eps * (lse - zs / static_cast<double>(v));
    r.per_token[static_cast<std::size_t>(i)] = li;
    double wt = scale;
    if (o.reduction == fpdt::loss_reduction::mean) wt = scale / static_cast<double>(r.valid);
    if (o.reduction == fpdt::loss_reduction::none) {
      double const go = grad_output.empty() ? 1.0 : grad_output[static_cast<std::size_t>(i)];
      wt = scale * go;
      sum += go * li;
    } else {
      sum += li;
    }
    for (index_t j = 0; j < v; ++j) {
      double d = std::exp(z[static_cast<std::size_t>(j)] - lse) - eps / static_cast<double>(v);
      if (j == y) d -= 1 - eps;
      d *= wt;
      for (index_t q = 0; q < hd; ++q) {
        r.dx[static_cast<std::size_t>(i * hd + q)] += d * w[static_cast<std::size_t>(j * hd + q)];
        r.dw[static_cast<std::size_t>(j * hd + q)] += d * x[static_cast<std::size_t>(i * hd + q)];
      }
    }
  }
  r.loss = o.reduction == fpdt::loss_reduction::mean ? (r.valid > 0 ? sum / static_cast<double>(r.valid) : 0.0) : sum;
  return r;
}

double max_abs_err(vec const& got, vec const& want) {
  REQUIRE(got.size() == want.size());
  double e = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const d = std::abs(got[i] - want[i]);
    if (!(d <= e)) e = std::isnan(d) ? 1e300 : d;
  }
  return e;
}

bool all_finite(vec const& v) {
  return std::all_of(v.begin(), v.end(), [](double d) { return std::isfinite(d); });
}

// One rank's (or the whole problem's) run of the one-rank API.
struct run_out {
  fpdt::status st;
  double loss = 0.0;
  index_t valid = 0;
  vec dx, dw, per_token;
  std::size_t peak = 0;
};

run_out run_single(vec const& x, vec const& w, labels_t const& labels, index_t hd, index_t v,
                   fpdt::cross_entropy_options const& o, vec const& grad_output = {}, double scale = 1.0,
                   vec const& dw0 = {}) {
  auto const n = static_cast<index_t>(labels.size());
  fpdt::host_backend be;
  auto ce = fpdt::chunked_cross_entropy<double>::create(be, hd, v, o);
  REQUIRE_MESSAGE(ce.ok(), ce.error().to_string());
  run_out r;
  r.dx.assign(static_cast<std::size_t>(n * hd), 1e30);
  r.dw = dw0.empty() ? vec(static_cast<std::size_t>(v * hd), 0.0) : dw0;
  r.per_token.assign(static_cast<std::size_t>(n), 1e30);
  auto res = ce->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(r.dx, n, hd), mat(r.dw, v, hd),
                                  vecv(r.per_token), grad_output.empty() ? fpdt::tensor_view<double const, 1>{} : cvecv(grad_output),
                                  scale);
  r.st = res.error();
  if (res.ok()) {
    r.loss = res->loss;
    r.valid = res->valid_tokens;
  }
  r.peak = be.device_memory().peak_bytes();
  CHECK(be.device_memory().current_bytes() == 0);
  return r;
}

// P ranks as threads; rank r gets tokens [r N/P, (r+1) N/P). Checks run in the main thread.
std::vector<run_out> run_ranks(int p, vec const& x, vec const& w, labels_t const& labels, index_t hd,
                               index_t v, fpdt::cross_entropy_options const& o, labels_t const* bad_rank_labels = nullptr,
                               int bad_rank = -1, fpdt::cross_entropy_options const* bad_rank_options = nullptr,
                               double bad_rank_scale = 1.0) {
  auto const n = static_cast<index_t>(labels.size());
  index_t const nl = n / p;
  fpdt::local_world world(p, std::chrono::seconds(20));
  std::vector<run_out> out(static_cast<std::size_t>(p));
  std::vector<std::unique_ptr<fpdt::host_backend>> backends;
  for (int r = 0; r < p; ++r) backends.push_back(std::make_unique<fpdt::host_backend>());
  std::vector<std::thread> threads;
  for (int r = 0; r < p; ++r)
    threads.emplace_back([&, r] {
      run_out& ro = out[static_cast<std::size_t>(r)];
      auto comm = world.communicator(r);
      if (!comm.ok()) {
        ro.st = comm.error();
        return;
      }
      auto ce = fpdt::chunked_cross_entropy<double>::create(*backends[static_cast<std::size_t>(r)], hd, v,
                                                            r == bad_rank && bad_rank_options ? *bad_rank_options : o);
      if (!ce.ok()) {
        ro.st = ce.error();
        return;
      }
      vec const xl(x.begin() + r * nl * hd, x.begin() + (r + 1) * nl * hd);
      labels_t ll(labels.begin() + r * nl, labels.begin() + (r + 1) * nl);
      if (r == bad_rank && bad_rank_labels) ll = *bad_rank_labels;
      ro.dx.assign(static_cast<std::size_t>(nl * hd), 1e30);
      ro.dw.assign(static_cast<std::size_t>(v * hd), 0.0);
      ro.per_token.assign(static_cast<std::size_t>(nl), 1e30);
      auto res = ce->forward_backward(*comm, 42, cmat(xl, nl, hd), cmat(w, v, hd), ll, mat(ro.dx, nl, hd),
                                      mat(ro.dw, v, hd), vecv(ro.per_token), {}, r == bad_rank ? bad_rank_scale : 1.0);
      ro.st = res.error();
      if (res.ok()) {
        ro.loss = res->loss;
        ro.valid = res->valid_tokens;
      }
    });
  for (auto& t : threads) t.join();
  return out;
}

// Concatenates the ranks' dx and sums their dw (what a trainer's data-parallel reduce gives).
void gather(std::vector<run_out> const& ranks, vec& dx, vec& dw) {
  dx.clear();
  dw.assign(ranks[0].dw.size(), 0.0);
  for (auto const& r : ranks) {
    dx.insert(dx.end(), r.dx.begin(), r.dx.end());
    for (std::size_t i = 0; i < dw.size(); ++i) dw[i] += r.dw[i];
  }
}

} // namespace

TEST_CASE("chunked_cross_entropy: CASE A14 loss scaling across ranks gives the global mean 12/7") {
  int const p = 4;
  index_t const s = 16, v = 32, hd = v + 3, nl = s / p;
  int const masks[4][4] = {{0, 0, 0, 1}, {1, 1, 1, 1}, {0, 1, 0, 1}, {0, 0, 0, 0}};
  double const target[4] = {4.0, 1.0, 2.0, 0.0};
  // w = [I | random]: with x = [z | 0] the logits are exactly z; z is 0 except a at the label,
  // with a chosen so that the loss log(1 + (V - 1) e^-a) is the target.
  vec w(static_cast<std::size_t>(v * hd), 0.0);
  vec const extra = random_vec(static_cast<std::size_t>(v * 3), 5);
  for (index_t j = 0; j < v; ++j) {
    w[static_cast<std::size_t>(j * hd + j)] = 1.0;
    for (index_t q = 0; q < 3; ++q) w[static_cast<std::size_t>(j * hd + v + q)] = extra[static_cast<std::size_t>(j * 3 + q)];
  }
  vec x(static_cast<std::size_t>(s * hd), 0.0);
  labels_t labels(static_cast<std::size_t>(s), -100);
  for (int r = 0; r < p; ++r)
    for (index_t t = 0; t < nl; ++t) {
      index_t const i = r * nl + t;
      auto const y = static_cast<std::int32_t>((7 * i + 3) % v);
      // invalid tokens still get logits (they must not count)
      double const a = masks[r][t] ? -std::log((std::exp(target[r]) - 1.0) / static_cast<double>(v - 1)) : 5.0;
      x[static_cast<std::size_t>(i * hd + y)] = a;
      x[static_cast<std::size_t>(i * hd + (y + 1) % v)] = 0.0;
      if (masks[r][t]) labels[static_cast<std::size_t>(i)] = y;
    }
  fpdt::cross_entropy_options o;
  o.chunk = 2;
  ref_out const ref = reference(x, w, labels, hd, v, o);
  CHECK(ref.valid == 7);
  CHECK(std::abs(ref.loss - 12.0 / 7.0) <= 1e-12);

  auto const ranks = run_ranks(p, x, w, labels, hd, v, o);
  for (int r = 0; r < p; ++r) {
    INFO("rank ", r);
    run_out const& ro = ranks[static_cast<std::size_t>(r)];
    REQUIRE_MESSAGE(ro.st.ok(), ro.st.to_string());
    CHECK(std::abs(ro.loss - 12.0 / 7.0) <= 1e-12);
    CHECK(ro.valid == 7);
    CHECK(all_finite(ro.dx));
    CHECK(all_finite(ro.dw));
    CHECK(all_finite(ro.per_token));
    for (index_t t = 0; t < nl; ++t)
      CHECK(ro.per_token[static_cast<std::size_t>(t)] == doctest::Approx(masks[r][t] ? target[r] : 0.0).epsilon(1e-12));
  }
  // rank 3 has no valid token: 0 gradient, not NaN
  CHECK(std::all_of(ranks[3].dx.begin(), ranks[3].dx.end(), [](double d) { return d == 0.0; }));
  CHECK(std::all_of(ranks[3].dw.begin(), ranks[3].dw.end(), [](double d) { return d == 0.0; }));
  vec dx, dw;
  gather(ranks, dx, dw);
  CHECK(max_abs_err(dx, ref.dx) <= 1e-10);
  CHECK(max_abs_err(dw, ref.dw) <= 1e-10);
  // and the unsharded run of the layer itself
  run_out const one = run_single(x, w, labels, hd, v, o);
  REQUIRE_MESSAGE(one.st.ok(), one.st.to_string());
  CHECK(std::abs(one.loss - 12.0 / 7.0) <= 1e-12);
  CHECK(max_abs_err(dx, one.dx) <= 1e-10);
  CHECK(max_abs_err(dw, one.dw) <= 1e-10);
}

TEST_CASE("chunked_cross_entropy: CASE A15 a rank whose labels are all ignored") {
  int const p = 4;
  index_t const s = 16, v = 32, hd = 12, nl = s / p;
  vec const x = random_vec(static_cast<std::size_t>(s * hd), 11, -2, 2);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 12);
  labels_t labels(static_cast<std::size_t>(s));
  for (index_t i = 0; i < s; ++i) labels[static_cast<std::size_t>(i)] = i < nl ? -100 : static_cast<std::int32_t>((5 * i) % v);
  fpdt::cross_entropy_options o;
  o.chunk = 4;
  ref_out const ref = reference(x, w, labels, hd, v, o);
  auto const ranks = run_ranks(p, x, w, labels, hd, v, o);
  for (int r = 0; r < p; ++r) {
    INFO("rank ", r);
    REQUIRE_MESSAGE(ranks[static_cast<std::size_t>(r)].st.ok(), ranks[static_cast<std::size_t>(r)].st.to_string());
    CHECK(std::isfinite(ranks[static_cast<std::size_t>(r)].loss));
    CHECK(ranks[static_cast<std::size_t>(r)].loss == doctest::Approx(ref.loss).epsilon(1e-12));
    CHECK(ranks[static_cast<std::size_t>(r)].valid == s - nl);
  }
  CHECK(std::all_of(ranks[0].dx.begin(), ranks[0].dx.end(), [](double d) { return d == 0.0 && !std::signbit(d); }));
  CHECK(std::all_of(ranks[0].dw.begin(), ranks[0].dw.end(), [](double d) { return d == 0.0; }));
  CHECK(std::all_of(ranks[0].per_token.begin(), ranks[0].per_token.end(), [](double d) { return d == 0.0; }));
  vec dx, dw;
  gather(ranks, dx, dw);
  CHECK(max_abs_err(dx, ref.dx) <= 1e-10);
  CHECK(max_abs_err(dw, ref.dw) <= 1e-10);

  // every label of every rank ignored: mean loss 0 and zero gradients, never NaN
  labels_t const none(static_cast<std::size_t>(s), -100);
  auto const empty = run_ranks(p, x, w, none, hd, v, o);
  for (auto const& ro : empty) {
    REQUIRE(ro.st.ok());
    CHECK(ro.loss == 0.0);
    CHECK(ro.valid == 0);
    CHECK(std::all_of(ro.dx.begin(), ro.dx.end(), [](double d) { return d == 0.0; }));
    CHECK(std::all_of(ro.dw.begin(), ro.dw.end(), [](double d) { return d == 0.0; }));
  }
}

TEST_CASE("chunked_cross_entropy: CASE A16 reduction none with per-token upstream gradients") {
  index_t const n = 8, hd = 10, v = 15;
  vec const x = random_vec(static_cast<std::size_t>(n * hd), 21, -2, 2);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 22);
  labels_t const labels = {3, -100, 14, 0, 7, -100, 9, 1};
  vec const up = {1, 0, 2, 0.5, -1, 3, 0.25, 1.5};
  for (index_t chunk : {index_t{0}, index_t{1}, index_t{3}, n}) {
    for (double eps : {0.0, 0.2}) {
      INFO("chunk=", chunk, " eps=", eps);
      fpdt::cross_entropy_options o;
      o.chunk = chunk;
      o.reduction = fpdt::loss_reduction::none;
      o.label_smoothing = eps;
      ref_out const ref = reference(x, w, labels, hd, v, o, up);
      run_out const got = run_single(x, w, labels, hd, v, o, up);
      REQUIRE_MESSAGE(got.st.ok(), got.st.to_string());
      CHECK(got.valid == 6);
      CHECK(std::abs(got.loss - ref.loss) <= 1e-10);
      CHECK(max_abs_err(got.per_token, ref.per_token) <= 1e-10);
      CHECK(max_abs_err(got.dx, ref.dx) <= 1e-10);
      CHECK(max_abs_err(got.dw, ref.dw) <= 1e-10);
      CHECK(got.per_token[1] == 0.0);
      CHECK(got.per_token[5] == 0.0);
      for (index_t q = 0; q < hd; ++q) { // ignored tokens (up[5] = 3 notwithstanding): exactly 0
        CHECK(got.dx[static_cast<std::size_t>(1 * hd + q)] == 0.0);
        CHECK(got.dx[static_cast<std::size_t>(5 * hd + q)] == 0.0);
      }
    }
  }
  // empty grad_output: ones
  fpdt::cross_entropy_options o;
  o.reduction = fpdt::loss_reduction::none;
  ref_out const ref = reference(x, w, labels, hd, v, o);
  run_out const got = run_single(x, w, labels, hd, v, o);
  REQUIRE(got.st.ok());
  CHECK(max_abs_err(got.dx, ref.dx) <= 1e-10);
}

TEST_CASE("chunked_cross_entropy: mean and sum with label smoothing and scale equal the float64 reference for every chunk size") {
  index_t const n = 11, hd = 7, v = 19;
  vec const x = random_vec(static_cast<std::size_t>(n * hd), 31, -3, 3);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 32);
  labels_t labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = i % 4 == 2 ? -1 : static_cast<std::int32_t>((3 * i + 1) % v);
  vec const dw0 = random_vec(static_cast<std::size_t>(v * hd), 33); // dw accumulates onto this
  for (auto red : {fpdt::loss_reduction::mean, fpdt::loss_reduction::sum})
    for (double eps : {0.0, 0.1, 1.0})
      for (index_t chunk : {index_t{0}, index_t{1}, index_t{3}, index_t{4}, n, index_t{100}}) {
        INFO("reduction=", red == fpdt::loss_reduction::mean ? "mean" : "sum", " eps=", eps, " chunk=", chunk);
        fpdt::cross_entropy_options o;
        o.chunk = chunk;
        o.ignore_index = -1;
        o.label_smoothing = eps;
        o.reduction = red;
        ref_out const ref = reference(x, w, labels, hd, v, o, {}, 0.75);
        run_out const got = run_single(x, w, labels, hd, v, o, {}, 0.75, dw0);
        REQUIRE_MESSAGE(got.st.ok(), got.st.to_string());
        CHECK(got.valid == ref.valid);
        CHECK(std::abs(got.loss - ref.loss) <= 1e-10);
        CHECK(max_abs_err(got.per_token, ref.per_token) <= 1e-10);
        CHECK(max_abs_err(got.dx, ref.dx) <= 1e-10);
        vec want_dw = dw0;
        for (std::size_t i = 0; i < want_dw.size(); ++i) want_dw[i] += ref.dw[i];
        CHECK(max_abs_err(got.dw, want_dw) <= 1e-10);
        index_t const rows = chunk == 0 ? n : std::min(chunk, n);
        CHECK(got.peak == fpdt::device_arena::rounded_size(static_cast<std::size_t>(rows * v) * sizeof(double)));
      }
}

TEST_CASE("chunked_cross_entropy: CASE A17 inputs untouched and workspace independent of N") {
  index_t const n = 300, hd = 16, v = 50;
  vec const x = random_vec(static_cast<std::size_t>(n * hd), 41, -2, 2);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 42);
  labels_t labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = i % 7 == 0 ? -100 : static_cast<std::int32_t>(i % v);
  vec const go = random_vec(static_cast<std::size_t>(n), 43);
  vec const x0 = x, w0 = w, go0 = go;
  labels_t const labels0 = labels;
  fpdt::cross_entropy_options o;
  o.chunk = 64;
  o.reduction = fpdt::loss_reduction::none;
  ref_out const ref = reference(x, w, labels, hd, v, o, go);
  run_out const got = run_single(x, w, labels, hd, v, o, go);
  REQUIRE(got.st.ok());
  CHECK(std::memcmp(x.data(), x0.data(), x.size() * sizeof(double)) == 0);
  CHECK(std::memcmp(w.data(), w0.data(), w.size() * sizeof(double)) == 0);
  CHECK(std::memcmp(go.data(), go0.data(), go.size() * sizeof(double)) == 0);
  CHECK(labels == labels0);
  CHECK(max_abs_err(got.dx, ref.dx) <= 1e-10);
  CHECK(max_abs_err(got.dw, ref.dw) <= 1e-10);

  fpdt::host_backend be;
  auto ce = fpdt::chunked_cross_entropy<double>::create(be, hd, v, o);
  REQUIRE(ce.ok());
  CHECK(got.peak == ce->workspace_bytes());
  CHECK(ce->workspace_bytes() == fpdt::device_arena::rounded_size(64 * 50 * sizeof(double)));
  CHECK(ce->workspace_bytes(10) == fpdt::device_arena::rounded_size(10 * 50 * sizeof(double)));
  CHECK(ce->workspace_bytes(100000) == ce->workspace_bytes());
}

TEST_CASE("chunked_cross_entropy: float runs within float tolerance") {
  index_t const n = 9, hd = 8, v = 21;
  vec const x = random_vec(static_cast<std::size_t>(n * hd), 51);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 52);
  labels_t labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((2 * i) % v);
  fpdt::cross_entropy_options o;
  o.chunk = 4;
  ref_out const ref = reference(x, w, labels, hd, v, o);
  std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), dx(x.size()), dw(w.size(), 0.0f);
  fpdt::host_backend be;
  auto ce = fpdt::chunked_cross_entropy<float>::create(be, hd, v, o);
  REQUIRE(ce.ok());
  auto res = ce->forward_backward(fpdt::tensor_view<float const, 2>(xf.data(), {n, hd}, {hd, 1}),
                                  fpdt::tensor_view<float const, 2>(wf.data(), {v, hd}, {hd, 1}), labels,
                                  fpdt::tensor_view<float, 2>(dx.data(), {n, hd}, {hd, 1}),
                                  fpdt::tensor_view<float, 2>(dw.data(), {v, hd}, {hd, 1}));
  REQUIRE_MESSAGE(res.ok(), res.error().to_string());
  CHECK(res->loss == doctest::Approx(ref.loss).epsilon(1e-5));
  CHECK(max_abs_err(vec(dx.begin(), dx.end()), ref.dx) <= 1e-5);
  CHECK(max_abs_err(vec(dw.begin(), dw.end()), ref.dw) <= 1e-5);
}

TEST_CASE("chunked_cross_entropy: bad labels and shapes are clear errors that write nothing") {
  index_t const n = 6, hd = 4, v = 10;
  vec const x = random_vec(static_cast<std::size_t>(n * hd), 61);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 62);
  fpdt::host_backend be;
  using ce_t = fpdt::chunked_cross_entropy<double>;
  CHECK(ce_t::create(be, 0, v, {}).error().code() == fpdt::errc::invalid_argument);
  fpdt::cross_entropy_options bad;
  bad.label_smoothing = 1.5;
  fpdt::status st = ce_t::create(be, hd, v, bad).error();
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("label_smoothing = 1.5") != std::string::npos);
  bad = {};
  bad.chunk = -2;
  CHECK(ce_t::create(be, hd, v, bad).error().code() == fpdt::errc::invalid_argument);

  auto ce = ce_t::create(be, hd, v, {});
  REQUIRE(ce.ok());
  vec dx(static_cast<std::size_t>(n * hd), 9.0), dw(static_cast<std::size_t>(v * hd), 9.0);
  labels_t labels = {1, 2, 10, 3, 4, 5};
  auto r = ce->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(dx, n, hd), mat(dw, v, hd));
  REQUIRE(!r.ok());
  CHECK(r.error().code() == fpdt::errc::invalid_argument);
  CHECK(r.error().message().find("label 10 of token 2 is outside [0, V = 10)") != std::string::npos);
  labels = {1, 2, 3, -7, 4, 5};
  r = ce->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(dx, n, hd), mat(dw, v, hd));
  CHECK(r.error().message().find("label -7 of token 3") != std::string::npos);
  CHECK(std::all_of(dx.begin(), dx.end(), [](double d) { return d == 9.0; }));
  CHECK(std::all_of(dw.begin(), dw.end(), [](double d) { return d == 9.0; }));

  labels = {1, 2, 3, 4, 5};
  r = ce->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(dx, n, hd), mat(dw, v, hd));
  CHECK(r.error().code() == fpdt::errc::shape_mismatch);
  CHECK(r.error().message().find("labels has 5 entries, x has N = 6") != std::string::npos);
  labels = {1, 2, 3, 4, 5, 6};
  r = ce->forward_backward(cmat(x, n, hd), cmat(w, v - 1, hd), labels, mat(dx, n, hd), mat(dw, v, hd));
  CHECK(r.error().code() == fpdt::errc::shape_mismatch);
  vec go(static_cast<std::size_t>(n), 1.0);
  r = ce->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(dx, n, hd), mat(dw, v, hd), {}, cvecv(go));
  CHECK(r.error().code() == fpdt::errc::invalid_argument);
  CHECK(r.error().message().find("grad_output is for reduction none") != std::string::npos);
  vec xx = x;
  r = ce->forward_backward(cmat(xx, n, hd), cmat(w, v, hd), labels, mat(xx, n, hd), mat(dw, v, hd));
  CHECK(r.error().message().find("output dx overlaps input x") != std::string::npos);
  CHECK(xx == x);
  r = ce->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(dx, n, hd), mat(dw, v, hd), {}, {},
                           std::nan(""));
  CHECK(r.error().code() == fpdt::errc::invalid_argument);

  // over budget: out_of_memory, nothing written
  fpdt::host_backend tiny({.device_budget_bytes = 256});
  auto ce2 = ce_t::create(tiny, hd, v, {});
  REQUIRE(ce2.ok());
  r = ce2->forward_backward(cmat(x, n, hd), cmat(w, v, hd), labels, mat(dx, n, hd), mat(dw, v, hd));
  CHECK(r.error().code() == fpdt::errc::out_of_memory);
  CHECK(r.error().message().find("; this chunked_cross_entropy call of " + std::to_string(n) + " tokens needs " +
                                 std::to_string(ce2->workspace_bytes(n)) + " bytes at its peak (chunk 0: all tokens at once") !=
        std::string::npos);
  CHECK(std::all_of(dx.begin(), dx.end(), [](double d) { return d == 9.0; }));
}

TEST_CASE("chunked_cross_entropy: a rank with a bad label fails every rank without a hang") {
  int const p = 3;
  index_t const s = 12, v = 8, hd = 5;
  vec const x = random_vec(static_cast<std::size_t>(s * hd), 71);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 72);
  labels_t labels(static_cast<std::size_t>(s), 1);
  labels_t const bad = {0, 99, 1, 2};
  fpdt::cross_entropy_options o;
  auto const ranks = run_ranks(p, x, w, labels, hd, v, o, &bad, 1);
  CHECK(ranks[1].st.code() == fpdt::errc::invalid_argument);
  CHECK(ranks[1].st.message().find("label 99 of token 1") != std::string::npos);
  for (int r : {0, 2}) {
    CHECK(ranks[static_cast<std::size_t>(r)].st.code() == fpdt::errc::comm_error);
    CHECK(std::all_of(ranks[static_cast<std::size_t>(r)].dx.begin(), ranks[static_cast<std::size_t>(r)].dx.end(),
                      [](double d) { return d == 1e30; }));
  }
}

TEST_CASE("chunked_cross_entropy: ranks that disagree on the options fail every rank, naming both, writing nothing") {
  // Without the check each rank would return its own, silently wrong, loss: another reduction
  // (another loss scale on one rank), another label smoothing or ignore_index (another loss
  // function on one rank), or another upstream scale of the reduced loss.
  int const p = 3;
  index_t const s = 12, v = 8, hd = 5;
  vec const x = random_vec(static_cast<std::size_t>(s * hd), 73);
  vec const w = random_vec(static_cast<std::size_t>(v * hd), 74);
  labels_t const labels(static_cast<std::size_t>(s), 1);
  fpdt::cross_entropy_options const o;
  struct variant {
    fpdt::cross_entropy_options other;
    double scale;
    char const* names;
  };
  for (variant const& vr :
       {variant{{.reduction = fpdt::loss_reduction::sum}, 1.0, "rank 2 has V = 8, Hd = 5, ignore_index -100, label_smoothing 0, reduction sum, scale 1"},
        variant{{.label_smoothing = 0.1}, 1.0, "label_smoothing 0.10000000000000001, reduction mean"},
        variant{{.ignore_index = -1}, 1.0, "rank 2 has V = 8, Hd = 5, ignore_index -1,"},
        variant{{}, 0.5, "rank 2 has V = 8, Hd = 5, ignore_index -100, label_smoothing 0, reduction mean, scale 0.5"},
        variant{{.chunk = 5}, 1.0, nullptr}}) { // another chunk gives the same loss: allowed
    CAPTURE(vr.scale);
    auto const ranks = run_ranks(p, x, w, labels, hd, v, o, nullptr, 2, &vr.other, vr.scale);
    for (auto const& ro : ranks) {
      if (!vr.names) {
        CHECK_MESSAGE(ro.st.ok(), ro.st.to_string());
        continue;
      }
      CHECK(ro.st.code() == fpdt::errc::invalid_argument);
      CHECK(ro.st.message().find("the ranks disagree: rank 0 has V = 8, Hd = 5, ignore_index -100, label_smoothing 0, "
                                 "reduction mean, scale 1; ") != std::string::npos);
      CHECK(ro.st.message().find(vr.names) != std::string::npos);
      CHECK(std::all_of(ro.dx.begin(), ro.dx.end(), [](double d) { return d == 1e30; }));
      CHECK(std::all_of(ro.dw.begin(), ro.dw.end(), [](double d) { return d == 0.0; }));
    }
  }
}
