// Tests of include/fpdt/layers/chunked_mlp.hpp: GeLU and SwiGLU, with and without biases, over
// chunk sizes 1, 3, N and an N that is not a multiple of the chunk, against a dense float64
// reference written here (itself checked by finite differences); gradients accumulate; CASE A17
// (inputs and weights bit-identical after forward and backward); the arena's peak equals
// workspace_bytes() and does not grow with N; out-of-memory and argument errors.
#include <fpdt/layers/chunked_cross_entropy.hpp>
#include <fpdt/layers/chunked_mlp.hpp>
#include <fpdt/layers/host_defaults.hpp>

#include "dense_helpers.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using fpdt::index_t;

namespace {

using namespace fpdt_test::dense;

// One MLP problem: weights, input, upstream gradient, all float64.
struct problem {
  index_t n, hd, f;
  fpdt::mlp_activation act;
  bool bias;
  vec w_up, w_gate, w_down, b_up, b_down, x, dy;

  problem(index_t n_, index_t hd_, index_t f_, fpdt::mlp_activation a, bool b, std::uint64_t seed)
      : n(n_), hd(hd_), f(f_), act(a), bias(b) {
    double const s_up = 1.0 / std::sqrt(static_cast<double>(hd)), s_down = 1.0 / std::sqrt(static_cast<double>(f));
    w_up = random_vec(static_cast<std::size_t>(f * hd), seed + 1, -2 * s_up, 2 * s_up);
    if (swiglu()) w_gate = random_vec(static_cast<std::size_t>(f * hd), seed + 2, -2 * s_up, 2 * s_up);
    w_down = random_vec(static_cast<std::size_t>(hd * f), seed + 3, -s_down, s_down);
    if (bias) {
      b_up = random_vec(static_cast<std::size_t>(f), seed + 4, -0.5, 0.5);
      b_down = random_vec(static_cast<std::size_t>(hd), seed + 5, -0.5, 0.5);
    }
    x = random_vec(static_cast<std::size_t>(n * hd), seed + 6, -1.5, 1.5);
    dy = random_vec(static_cast<std::size_t>(n * hd), seed + 7);
  }
  [[nodiscard]] bool swiglu() const { return act == fpdt::mlp_activation::swiglu; }
  [[nodiscard]] fpdt::mlp_weights<double> weights() const {
    fpdt::mlp_weights<double> w;
    w.w_up = cmat(w_up, f, hd);
    if (swiglu()) w.w_gate = cmat(w_gate, f, hd);
    w.w_down = cmat(w_down, hd, f);
    if (bias) {
      w.b_up = cvecv(b_up);
      w.b_down = cvecv(b_down);
    }
    return w;
  }
};

struct grads {
  vec w_up, w_gate, w_down, b_up, b_down, dx;
};

double sig(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double gelu(double v) {
  double const k = std::sqrt(2.0 / 3.14159265358979323846);
  return 0.5 * v * (1.0 + std::tanh(k * (v + 0.044715 * v * v * v)));
}
double gelu_d(double v) {
  double const k = std::sqrt(2.0 / 3.14159265358979323846);
  double const t = std::tanh(k * (v + 0.044715 * v * v * v));
  return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * v * v);
}

// Dense float64 forward over all N tokens; returns y, and the pre-activations up, gate.
vec dense_forward(problem const& p, vec const& x, vec* up_out = nullptr, vec* gate_out = nullptr,
                  vec* act_out = nullptr) {
  index_t const n = p.n, hd = p.hd, f = p.f;
  vec up(static_cast<std::size_t>(n * f)), gate(up.size()), act(up.size()), y(static_cast<std::size_t>(n * hd));
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < f; ++j) {
      double su = p.bias ? p.b_up[static_cast<std::size_t>(j)] : 0.0, sg = 0.0;
      for (index_t q = 0; q < hd; ++q) {
        double const xv = x[static_cast<std::size_t>(i * hd + q)];
        su += xv * p.w_up[static_cast<std::size_t>(j * hd + q)];
        if (p.swiglu()) sg += xv * p.w_gate[static_cast<std::size_t>(j * hd + q)];
      }
      auto const o = static_cast<std::size_t>(i * f + j);
      up[o] = su;
      gate[o] = sg;
      act[o] = p.swiglu() ? sg * sig(sg) * su : gelu(su);
    }
  for (index_t i = 0; i < n; ++i)
    for (index_t q = 0; q < hd; ++q) {
      double s = p.bias ? p.b_down[static_cast<std::size_t>(q)] : 0.0;
      for (index_t j = 0; j < f; ++j)
        s += act[static_cast<std::size_t>(i * f + j)] * p.w_down[static_cast<std::size_t>(q * f + j)];
      y[static_cast<std::size_t>(i * hd + q)] = s;
    }
  if (up_out) *up_out = up;
  if (gate_out) *gate_out = gate;
  if (act_out) *act_out = act;
  return y;
}

// Dense float64 backward: dx and the weight gradients (not accumulated).
grads dense_backward(problem const& p) {
  index_t const n = p.n, hd = p.hd, f = p.f;
  vec up, gate, act;
  (void)dense_forward(p, p.x, &up, &gate, &act);
  grads g;
  g.w_up.assign(static_cast<std::size_t>(f * hd), 0.0);
  if (p.swiglu()) g.w_gate.assign(static_cast<std::size_t>(f * hd), 0.0);
  g.w_down.assign(static_cast<std::size_t>(hd * f), 0.0);
  if (p.bias) {
    g.b_up.assign(static_cast<std::size_t>(f), 0.0);
    g.b_down.assign(static_cast<std::size_t>(hd), 0.0);
  }
  g.dx.assign(static_cast<std::size_t>(n * hd), 0.0);
  vec du(up.size()), dg(up.size());
  for (index_t i = 0; i < n; ++i) {
    for (index_t q = 0; q < hd; ++q) {
      double const d = p.dy[static_cast<std::size_t>(i * hd + q)];
      if (p.bias) g.b_down[static_cast<std::size_t>(q)] += d;
      for (index_t j = 0; j < f; ++j) g.w_down[static_cast<std::size_t>(q * f + j)] += d * act[static_cast<std::size_t>(i * f + j)];
    }
    for (index_t j = 0; j < f; ++j) {
      double da = 0.0;
      for (index_t q = 0; q < hd; ++q)
        da += p.dy[static_cast<std::size_t>(i * hd + q)] * p.w_down[static_cast<std::size_t>(q * f + j)];
      auto const o = static_cast<std::size_t>(i * f + j);
      if (p.swiglu()) {
        double const s = sig(gate[o]);
        du[o] = da * gate[o] * s;
        dg[o] = da * up[o] * (s + gate[o] * s * (1.0 - s));
      } else {
        du[o] = da * gelu_d(up[o]);
      }
      if (p.bias) g.b_up[static_cast<std::size_t>(j)] += du[o];
      for (index_t q = 0; q < hd; ++q) {
        double const xv = p.x[static_cast<std::size_t>(i * hd + q)];
        g.w_up[static_cast<std::size_t>(j * hd + q)] += du[o] * xv;
        g.dx[static_cast<std::size_t>(i * hd + q)] += du[o] * p.w_up[static_cast<std::size_t>(j * hd + q)];
        if (p.swiglu()) {
          g.w_gate[static_cast<std::size_t>(j * hd + q)] += dg[o] * xv;
          g.dx[static_cast<std::size_t>(i * hd + q)] += dg[o] * p.w_gate[static_cast<std::size_t>(j * hd + q)];
        }
      }
    }
  }
  return g;
}

double max_rel_err(vec const& got, vec const& want) {
  REQUIRE(got.size() == want.size());
  double e = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const d = std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i]));
    if (!(d <= e)) e = std::isnan(d) ? 1e300 : d;
  }
  return e;
}

vec plus(vec a, vec const& b, double times = 1.0) {
  for (std::size_t i = 0; i < a.size(); ++i) a[i] += times * b[i];
  return a;
}

// Gradient views over `g` (sized like the problem's weights).
fpdt::mlp_gradients<double> grad_views(problem const& p, grads& g) {
  fpdt::mlp_gradients<double> v;
  v.w_up = mat(g.w_up, p.f, p.hd);
  if (p.swiglu()) v.w_gate = mat(g.w_gate, p.f, p.hd);
  v.w_down = mat(g.w_down, p.hd, p.f);
  if (p.bias) {
    v.b_up = vecv(g.b_up);
    v.b_down = vecv(g.b_down);
  }
  return v;
}

// Starting gradients: random (so += is visible), same sizes as the reference's.
grads start_grads(grads const& ref, std::uint64_t seed) {
  grads g;
  g.w_up = random_vec(ref.w_up.size(), seed + 11);
  g.w_gate = random_vec(ref.w_gate.size(), seed + 12);
  g.w_down = random_vec(ref.w_down.size(), seed + 13);
  g.b_up = random_vec(ref.b_up.size(), seed + 14);
  g.b_down = random_vec(ref.b_down.size(), seed + 15);
  g.dx.assign(ref.dx.size(), 1e30); // overwritten, never read
  return g;
}

void check_grads(grads const& got, grads const& g0, grads const& ref, double times, double tol) {
  CHECK(max_rel_err(got.w_up, plus(g0.w_up, ref.w_up, times)) <= tol);
  CHECK(max_rel_err(got.w_gate, plus(g0.w_gate, ref.w_gate, times)) <= tol);
  CHECK(max_rel_err(got.w_down, plus(g0.w_down, ref.w_down, times)) <= tol);
  CHECK(max_rel_err(got.b_up, plus(g0.b_up, ref.b_up, times)) <= tol);
  CHECK(max_rel_err(got.b_down, plus(g0.b_down, ref.b_down, times)) <= tol);
  CHECK(max_rel_err(got.dx, ref.dx) <= tol);
}

char const* name(fpdt::mlp_activation a) { return a == fpdt::mlp_activation::swiglu ? "swiglu" : "gelu"; }

} // namespace

TEST_CASE("chunked_mlp: GeLU and SwiGLU with and without biases equal dense float64 for every chunk size") {
  index_t const n = 10, hd = 6, f = 14;
  for (auto act : {fpdt::mlp_activation::gelu_tanh, fpdt::mlp_activation::swiglu})
    for (bool bias : {false, true}) {
      problem const p(n, hd, f, act, bias, 100 + static_cast<std::uint64_t>(bias));
      vec const y_ref = dense_forward(p, p.x);
      grads const ref = dense_backward(p);
      for (index_t chunk : {index_t{1}, index_t{3}, index_t{4}, n, index_t{0}, index_t{64}}) {
        INFO(name(act), " bias=", bias, " chunk=", chunk);
        fpdt::host_backend be;
        auto mlp = fpdt::chunked_mlp<double>::create(be, {hd, f, act}, {chunk});
        REQUIRE_MESSAGE(mlp.ok(), mlp.error().to_string());
        vec y(static_cast<std::size_t>(n * hd), 1e30);
        fpdt::status st = mlp->forward(p.weights(), cmat(p.x, n, hd), mat(y, n, hd));
        REQUIRE_MESSAGE(st.ok(), st.to_string());
        CHECK(max_rel_err(y, y_ref) <= 1e-12);
        grads const g0 = start_grads(ref, 7);
        grads g = g0;
        st = mlp->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), grad_views(p, g));
        REQUIRE_MESSAGE(st.ok(), st.to_string());
        check_grads(g, g0, ref, 1.0, 1e-12);
        // a second call accumulates the weight gradients again and overwrites dx
        st = mlp->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), grad_views(p, g));
        REQUIRE_MESSAGE(st.ok(), st.to_string());
        check_grads(g, g0, ref, 2.0, 1e-12);
        CHECK(be.device_memory().current_bytes() == 0);
      }
    }
}

TEST_CASE("chunked_mlp: the float64 reference gradients agree with finite differences") {
  for (auto act : {fpdt::mlp_activation::gelu_tanh, fpdt::mlp_activation::swiglu}) {
    INFO(name(act));
    problem p(5, 4, 7, act, true, 300);
    grads const ref = dense_backward(p);
    fpdt::host_backend be;
    auto mlp = fpdt::chunked_mlp<double>::create(be, {p.hd, p.f, act}, {2});
    REQUIRE(mlp.ok());
    grads g = start_grads(ref, 9);
    for (auto* v : {&g.w_up, &g.w_gate, &g.w_down, &g.b_up, &g.b_down}) std::fill(v->begin(), v->end(), 0.0);
    REQUIRE(mlp->backward(p.weights(), cmat(p.x, p.n, p.hd), cmat(p.dy, p.n, p.hd), mat(g.dx, p.n, p.hd),
                          grad_views(p, g)).ok());
    // L = sum(y * dy); central differences on a few entries of x and of each weight
    auto loss = [&](problem const& q) {
      vec const y = dense_forward(q, q.x);
      double s = 0.0;
      for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * q.dy[i];
      return s;
    };
    double const h = 1e-6;
    auto fd = [&](vec problem::*member, std::size_t idx) {
      problem q = p;
      (q.*member)[idx] += h;
      double const lp = loss(q);
      (q.*member)[idx] -= 2 * h;
      return (lp - loss(q)) / (2 * h);
    };
    for (std::size_t idx : {std::size_t{0}, std::size_t{5}, std::size_t{13}}) {
      CHECK(std::abs(fd(&problem::x, idx) - g.dx[idx]) <= 1e-7);
      CHECK(std::abs(fd(&problem::w_up, idx) - g.w_up[idx]) <= 1e-7);
      CHECK(std::abs(fd(&problem::w_down, idx) - g.w_down[idx]) <= 1e-7);
      if (p.swiglu()) CHECK(std::abs(fd(&problem::w_gate, idx) - g.w_gate[idx]) <= 1e-7);
    }
    CHECK(std::abs(fd(&problem::b_up, 3) - g.b_up[3]) <= 1e-7);
    CHECK(std::abs(fd(&problem::b_down, 2) - g.b_down[2]) <= 1e-7);
  }
}

TEST_CASE("chunked_mlp: CASE A17 input and weights bit-identical after forward and backward") {
  index_t const s = 4096, hd = 64, f = 256, chunk = 1024;
  for (auto act : {fpdt::mlp_activation::gelu_tanh, fpdt::mlp_activation::swiglu}) {
    INFO(name(act));
    problem const p(s, hd, f, act, true, 500);
    problem const copy = p; // the bits to compare against
    grads const ref = dense_backward(p);
    fpdt::host_backend be;
    auto mlp = fpdt::chunked_mlp<double>::create(be, {hd, f, act}, {chunk});
    REQUIRE(mlp.ok());
    vec y(static_cast<std::size_t>(s * hd));
    REQUIRE(mlp->forward(p.weights(), cmat(p.x, s, hd), mat(y, s, hd)).ok());
    CHECK(be.device_memory().peak_bytes() == mlp->forward_workspace_bytes(s));
    grads const g0 = start_grads(ref, 21);
    grads g = g0;
    be.device_memory().reset_peak();
    REQUIRE(mlp->backward(p.weights(), cmat(p.x, s, hd), cmat(p.dy, s, hd), mat(g.dx, s, hd), grad_views(p, g)).ok());
    CHECK(be.device_memory().peak_bytes() == mlp->workspace_bytes());
    CHECK(mlp->workspace_bytes() == (act == fpdt::mlp_activation::swiglu ? 3u : 2u) * chunk * f * sizeof(double));
    for (auto m : {&problem::x, &problem::dy, &problem::w_up, &problem::w_gate, &problem::w_down,
                   &problem::b_up, &problem::b_down}) {
      REQUIRE((p.*m).size() == (copy.*m).size());
      if (!(p.*m).empty())
        CHECK(std::memcmp((p.*m).data(), (copy.*m).data(), (p.*m).size() * sizeof(double)) == 0);
    }
    CHECK(max_rel_err(y, dense_forward(p, p.x)) <= 1e-11);
    check_grads(g, g0, ref, 1.0, 1e-11);
  }
}

TEST_CASE("chunked_mlp: arena peak equals workspace_bytes and does not grow with N") {
  index_t const hd = 8, f = 40, chunk = 8;
  for (auto act : {fpdt::mlp_activation::gelu_tanh, fpdt::mlp_activation::swiglu}) {
    std::size_t fwd_peak = 0, bwd_peak = 0;
    for (index_t n : {index_t{8}, index_t{37}, index_t{256}}) {
      INFO(name(act), " N=", n);
      problem const p(n, hd, f, act, false, 700);
      fpdt::host_backend be;
      auto mlp = fpdt::chunked_mlp<double>::create(be, {hd, f, act}, {chunk});
      REQUIRE(mlp.ok());
      vec y(static_cast<std::size_t>(n * hd));
      REQUIRE(mlp->forward(p.weights(), cmat(p.x, n, hd), mat(y, n, hd)).ok());
      CHECK(be.device_memory().peak_bytes() == mlp->forward_workspace_bytes(n));
      if (fwd_peak == 0) fwd_peak = be.device_memory().peak_bytes();
      CHECK(be.device_memory().peak_bytes() == fwd_peak);
      grads g = start_grads(dense_backward(p), 3);
      be.device_memory().reset_peak();
      REQUIRE(mlp->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), grad_views(p, g)).ok());
      CHECK(be.device_memory().peak_bytes() == mlp->workspace_bytes());
      if (bwd_peak == 0) bwd_peak = be.device_memory().peak_bytes();
      CHECK(be.device_memory().peak_bytes() == bwd_peak);
      CHECK(be.device_memory().current_bytes() == 0);

      // count-only arena: the same code path reports the same bytes and writes nothing
      fpdt::host_backend counter({.device_budget_bytes = std::size_t{1} << 40, .device_mode = fpdt::arena_mode::count_only});
      auto sized = fpdt::chunked_mlp<double>::create(counter, {hd, f, act}, {chunk});
      REQUIRE(sized.ok());
      vec y2(y.size(), 5.0);
      REQUIRE(sized->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(y2, n, hd), grad_views(p, g)).ok());
      CHECK(counter.device_memory().peak_bytes() == mlp->workspace_bytes());
      CHECK(std::all_of(y2.begin(), y2.end(), [](double v) { return v == 5.0; }));
    }
    CHECK(bwd_peak == (act == fpdt::mlp_activation::swiglu ? 3u : 2u) * fpdt::device_arena::rounded_size(chunk * f * sizeof(double)));
  }
  // chunk 0: one chunk of all N tokens
  fpdt::host_backend be;
  auto mlp = fpdt::chunked_mlp<double>::create(be, {4, 9, fpdt::mlp_activation::gelu_tanh}, {});
  REQUIRE(mlp.ok());
  CHECK(mlp->workspace_bytes() == 0);
  CHECK(mlp->workspace_bytes(11) == 2 * fpdt::device_arena::rounded_size(11 * 9 * sizeof(double)));
}

TEST_CASE("chunked_mlp and chunked_cross_entropy: workspace sizes too large for size_t saturate, never wrap") {
  // A planner in count-only mode reads the workspace; a product that wrapped (to 0 here) would
  // read as "fits".
  fpdt::host_backend be;
  index_t const huge = index_t{1} << 40;
  auto mlp = fpdt::chunked_mlp<float>::create(be, {4096, huge, fpdt::mlp_activation::swiglu}, {index_t{1} << 22});
  REQUIRE(mlp.ok());
  std::size_t const max = ~std::size_t{0};
  CHECK(mlp->forward_workspace_bytes(index_t{1} << 22) == max);
  CHECK(mlp->workspace_bytes() == max);
  auto ce = fpdt::chunked_cross_entropy<float>::create(be, 4096, huge, {.chunk = index_t{1} << 22});
  REQUIRE(ce.ok());
  CHECK(ce->workspace_bytes() == max);
  // Realistic sizes stay exact: V = 128256 (Llama 3), chunk 2^20 tokens, fp32.
  auto llama = fpdt::chunked_cross_entropy<float>::create(be, 4096, 128256, {.chunk = index_t{1} << 20});
  REQUIRE(llama.ok());
  CHECK(llama->workspace_bytes() == std::size_t{128256} * (std::size_t{1} << 20) * 4);
}

TEST_CASE("chunked_mlp: over budget is out_of_memory and writes nothing") {
  index_t const n = 16, hd = 8, f = 64;
  problem const p(n, hd, f, fpdt::mlp_activation::swiglu, true, 900);
  // room for the forward's two [4, 64] buffers but not the backward's three
  std::size_t const one = fpdt::device_arena::rounded_size(4 * f * sizeof(double));
  fpdt::host_backend be({.device_budget_bytes = 2 * one});
  auto mlp = fpdt::chunked_mlp<double>::create(be, {hd, f, fpdt::mlp_activation::swiglu}, {4});
  REQUIRE(mlp.ok());
  vec y(static_cast<std::size_t>(n * hd), 3.0);
  CHECK(mlp->forward(p.weights(), cmat(p.x, n, hd), mat(y, n, hd)).ok());
  grads g = start_grads(dense_backward(p), 5);
  grads const before = g;
  fpdt::status st = mlp->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), grad_views(p, g));
  CHECK(st.code() == fpdt::errc::out_of_memory);
  CHECK(st.message().find("chunked_mlp backward") != std::string::npos);
  // the arena names one buffer; the message also gives what the whole pass needs
  CHECK(st.message().find("; this chunked_mlp backward of 16 tokens needs " + std::to_string(3 * one) +
                          " bytes at its peak (chunk 4; a smaller chunk needs less)") != std::string::npos);
  CHECK(mlp->backward_workspace_bytes(n) == 3 * one);
  CHECK(g.dx == before.dx);
  CHECK(g.w_up == before.w_up);
  CHECK(be.device_memory().current_bytes() == 0);
  // a smaller chunk fits
  auto small = fpdt::chunked_mlp<double>::create(be, {hd, f, fpdt::mlp_activation::swiglu}, {2});
  REQUIRE(small.ok());
  CHECK(small->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), grad_views(p, g)).ok());
}

TEST_CASE("chunked_mlp: bad shapes and aliasing are clear errors") {
  fpdt::host_backend be;
  using mlp_t = fpdt::chunked_mlp<double>;
  CHECK(mlp_t::create(be, {0, 4, fpdt::mlp_activation::gelu_tanh}, {}).error().code() == fpdt::errc::invalid_argument);
  CHECK(mlp_t::create(be, {4, 4, fpdt::mlp_activation::gelu_tanh}, {-1}).error().code() == fpdt::errc::invalid_argument);

  index_t const n = 6, hd = 4, f = 10;
  problem p(n, hd, f, fpdt::mlp_activation::gelu_tanh, true, 1000);
  auto mlp = mlp_t::create(be, {hd, f, fpdt::mlp_activation::gelu_tanh}, {4});
  REQUIRE(mlp.ok());
  vec y(static_cast<std::size_t>(n * hd), 2.0);
  auto const y0 = y;

  auto w = p.weights();
  w.w_up = cmat(p.w_up, hd, f); // transposed extents
  fpdt::status st = mlp->forward(w, cmat(p.x, n, hd), mat(y, n, hd));
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  CHECK(st.message().find("w_up has extents [4, 10], expected [10, 4]") != std::string::npos);

  st = mlp->forward(p.weights(), cmat(p.x, n - 1, hd), mat(y, n, hd));
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  CHECK(st.message().find("y has extents [6, 4], expected [5, 4]") != std::string::npos);

  w = p.weights();
  w.w_gate = cmat(p.w_up, f, hd);
  st = mlp->forward(w, cmat(p.x, n, hd), mat(y, n, hd));
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("w_gate") != std::string::npos);

  w = p.weights();
  w.b_up = {p.b_up.data(), {f - 1}, {1}};
  CHECK(mlp->forward(w, cmat(p.x, n, hd), mat(y, n, hd)).code() == fpdt::errc::shape_mismatch);

  // a non-contiguous row (column stride 2)
  vec wide(static_cast<std::size_t>(n * hd * 2));
  fpdt::tensor_view<double const, 2> strided(wide.data(), {n, hd}, {2 * hd, 2});
  st = mlp->forward(p.weights(), strided, mat(y, n, hd));
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  CHECK(st.message().find("column stride 2") != std::string::npos);

  // y over x
  vec xy = p.x;
  st = mlp->forward(p.weights(), cmat(xy, n, hd), mat(xy, n, hd));
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("output y overlaps input x") != std::string::npos);
  CHECK(xy == p.x);
  CHECK(y == y0);

  // SwiGLU without w_gate
  auto sw = mlp_t::create(be, {hd, f, fpdt::mlp_activation::swiglu}, {});
  REQUIRE(sw.ok());
  st = sw->forward(p.weights(), cmat(p.x, n, hd), mat(y, n, hd));
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  CHECK(st.message().find("w_gate") != std::string::npos);

  // backward: dx over x, dx over dy, a bias gradient missing, a gradient over a weight
  grads g = start_grads(dense_backward(p), 1);
  vec xx = p.x;
  st = mlp->backward(p.weights(), cmat(xx, n, hd), cmat(p.dy, n, hd), mat(xx, n, hd), grad_views(p, g));
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("output dx overlaps input x") != std::string::npos);
  vec dd = p.dy;
  st = mlp->backward(p.weights(), cmat(p.x, n, hd), cmat(dd, n, hd), mat(dd, n, hd), grad_views(p, g));
  CHECK(st.message().find("output dx overlaps input dy") != std::string::npos);
  auto gv = grad_views(p, g);
  gv.b_up = {};
  st = mlp->backward(p.weights(), cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), gv);
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("db_up is empty but b_up is given") != std::string::npos);
  vec wup = p.w_up;
  w = p.weights();
  w.w_up = cmat(wup, f, hd);
  gv = grad_views(p, g);
  gv.w_up = mat(wup, f, hd);
  st = mlp->backward(w, cmat(p.x, n, hd), cmat(p.dy, n, hd), mat(g.dx, n, hd), gv);
  CHECK(st.message().find("output dw_up overlaps input w_up") != std::string::npos);
  CHECK(wup == p.w_up);

  // N = 0 is a no-op
  CHECK(mlp->forward(p.weights(), cmat(p.x, 0, hd), mat(y, 0, hd)).ok());
  CHECK(be.device_memory().current_bytes() == 0);
}

TEST_CASE("chunked_mlp: float runs within float tolerance") {
  index_t const n = 9, hd = 6, f = 20;
  for (auto act : {fpdt::mlp_activation::gelu_tanh, fpdt::mlp_activation::swiglu}) {
    INFO(name(act));
    problem const p(n, hd, f, act, true, 1100);
    vec const y_ref = dense_forward(p, p.x);
    grads const ref = dense_backward(p);
    auto to_f = [](vec const& v) { return std::vector<float>(v.begin(), v.end()); };
    std::vector<float> const x = to_f(p.x), dy = to_f(p.dy), wu = to_f(p.w_up), wg = to_f(p.w_gate),
                             wd = to_f(p.w_down), bu = to_f(p.b_up), bd = to_f(p.b_down);
    auto m = [](std::vector<float> const& v, index_t r, index_t c) {
      return fpdt::tensor_view<float const, 2>(v.data(), {r, c}, {c, 1});
    };
    auto mw = [](std::vector<float>& v, index_t r, index_t c) {
      return fpdt::tensor_view<float, 2>(v.data(), {r, c}, {c, 1});
    };
    fpdt::mlp_weights<float> w{m(wu, f, hd), {}, m(wd, hd, f), {bu.data(), {f}, {1}}, {bd.data(), {hd}, {1}}};
    if (p.swiglu()) w.w_gate = m(wg, f, hd);
    fpdt::host_backend be;
    auto mlp = fpdt::chunked_mlp<float>::create(be, {hd, f, act}, {4});
    REQUIRE(mlp.ok());
    std::vector<float> y(x.size()), dx(x.size()), gu(wu.size()), gg(wg.size()), gd(wd.size()), gbu(bu.size()), gbd(bd.size());
    REQUIRE(mlp->forward(w, m(x, n, hd), mw(y, n, hd)).ok());
    fpdt::mlp_gradients<float> g{mw(gu, f, hd), {}, mw(gd, hd, f), {gbu.data(), {f}, {1}}, {gbd.data(), {hd}, {1}}};
    if (p.swiglu()) g.w_gate = mw(gg, f, hd);
    REQUIRE(mlp->backward(w, m(x, n, hd), m(dy, n, hd), mw(dx, n, hd), g).ok());
    auto to_d = [](std::vector<float> const& v) { return vec(v.begin(), v.end()); };
    CHECK(max_rel_err(to_d(y), y_ref) <= 1e-5);
    CHECK(max_rel_err(to_d(dx), ref.dx) <= 1e-5);
    CHECK(max_rel_err(to_d(gu), ref.w_up) <= 1e-5);
    CHECK(max_rel_err(to_d(gg), ref.w_gate) <= 1e-5);
    CHECK(max_rel_err(to_d(gd), ref.w_down) <= 1e-5);
    CHECK(max_rel_err(to_d(gbu), ref.b_up) <= 1e-5);
    CHECK(max_rel_err(to_d(gbd), ref.b_down) <= 1e-5);
  }
}
