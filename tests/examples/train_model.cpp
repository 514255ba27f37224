// Tests of examples/train/model.hpp (the model fpdt-train trains): with fpdt's pieces (FPDT
// attention, chunked MLP, chunked loss) on P in {1, 4} ranks, the loss and every parameter
// gradient equal those of the same model with plain pieces (dense attention, an MLP holding
// [N, F], a loss holding [N, V]) in float64 on one rank, within fp32 rounding; the plain model's
// gradients equal central finite differences of its loss (which checks the glue: embedding,
// RMSNorm, rotary embeddings, projections, residuals).
#include "../../examples/train/model.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

using fpdt::index_t;

namespace {

fpdt_train::model_config small_config() {
  fpdt_train::model_config c;
  c.layers = 2;
  c.hidden = 32;
  c.heads = 4;
  c.kv_heads = 2;
  c.ffn = 48;
  return c;
}

std::vector<std::uint8_t> text(index_t n) {
  std::string const s = "FPDT trains long contexts: chunks, offload, all-to-all, online softmax. ";
  std::vector<std::uint8_t> t;
  for (index_t i = 0; i < n; ++i) t.push_back(static_cast<std::uint8_t>(s[static_cast<std::size_t>(i * 7 % static_cast<index_t>(s.size()))]));
  return t;
}

// With sinks: logits of both signs and sizes instead of the initial 0, the same in every model.
template <class M> void set_test_sinks(M& m, fpdt_train::model_config const& c) {
  if (!c.sinks) return;
  auto const& lay = m.layout();
  for (std::size_t l = 0; l < lay.layer.size(); ++l)
    for (std::size_t h = 0; h < lay.sinks; ++h)
      m.w()[lay.layer[l].sink + h] = static_cast<std::remove_pointer_t<decltype(m.w())>>(0.75 * static_cast<double>(h) - 1.0 + 0.5 * static_cast<double>(l));
}

struct outcome {
  double loss = 0;
  std::vector<double> grad;
  std::string error;
};

// The plain float64 reference on one rank.
outcome plain(fpdt_train::model_config const& c, index_t s, std::vector<std::uint8_t> const& win) {
  fpdt::local_world world(1, std::chrono::seconds(60));
  auto comm = world.communicator(0).value();
  fpdt::host_backend be(fpdt::host_backend_options{});
  auto m = fpdt_train::model_rank<double, fpdt::local_communicator>::create(
      be, comm, c, {.seq = s, .chunk = s, .offload = false, .kind = fpdt_train::pieces::plain});
  outcome o;
  if (!m) {
    o.error = m.error().to_string();
    return o;
  }
  set_test_sinks(**m, c);
  auto st = (*m)->forward_backward(win);
  if (!st) {
    o.error = st.error().to_string();
    return o;
  }
  o.loss = st->loss;
  o.grad.assign((*m)->grad(), (*m)->grad() + (*m)->layout().total);
  return o;
}

// The fpdt model in float on p in-process ranks; rank 0's (all-reduced) gradients.
outcome with_fpdt(fpdt_train::model_config const& c, index_t s, index_t chunk, int p, bool offload,
                  std::vector<std::uint8_t> const& win, std::vector<index_t> const& docs = {}, index_t window = 0) {
  fpdt::local_world world(p, std::chrono::seconds(60));
  std::vector<outcome> out(static_cast<std::size_t>(p));
  std::vector<std::thread> ts;
  for (int r = 0; r < p; ++r)
    ts.emplace_back([&, r] {
      auto comm = world.communicator(r).value();
      fpdt::host_backend be(fpdt::host_backend_options{});
      outcome& o = out[static_cast<std::size_t>(r)];
      auto m = fpdt_train::model_rank<float, fpdt::local_communicator>::create(
          be, comm, c, {.seq = s, .chunk = chunk, .offload = offload, .kind = fpdt_train::pieces::fpdt, .window = window});
      if (!m) {
        o.error = m.error().to_string();
        comm.abort(o.error);
        return;
      }
      set_test_sinks(**m, c);
      auto st = (*m)->forward_backward(win, docs);
      if (!st) {
        o.error = st.error().to_string();
        return;
      }
      o.loss = st->loss;
      o.grad.assign((*m)->grad(), (*m)->grad() + (*m)->layout().total);
    });
  for (auto& t : ts) t.join();
  for (auto const& o : out)
    if (!o.error.empty()) return o;
  for (auto const& o : out) { // every rank holds the same loss and gradients
    if (o.loss != out[0].loss || o.grad != out[0].grad) {
      outcome bad;
      bad.error = "ranks disagree on the loss or the gradients";
      return bad;
    }
  }
  return out[0];
}

// The largest error of each parameter tensor's gradient relative to that tensor's largest
// reference value; returns the worst over tensors.
double worst_tensor_error(fpdt_train::model_config const& c, std::vector<double> const& got,
                          std::vector<double> const& want) {
  auto lay = fpdt_train::param_layout::make(c);
  std::vector<std::size_t> starts{lay.emb};
  for (auto const& l : lay.layer)
    for (std::size_t at : {l.g1, l.wq, l.wk, l.wv, l.wo, l.g2, l.up, l.gate, l.down, l.sink}) starts.push_back(at);
  starts.push_back(lay.gf);
  starts.push_back(lay.head);
  starts.push_back(lay.total);
  double worst = 0;
  for (std::size_t t = 0; t + 1 < starts.size(); ++t) {
    double mref = 1e-300, err = 0;
    for (std::size_t i = starts[t]; i < starts[t + 1]; ++i) {
      mref = std::max(mref, std::abs(want[i]));
      err = std::max(err, std::abs(got[i] - want[i]));
    }
    worst = std::max(worst, err / mref);
  }
  return worst;
}

} // namespace

TEST_CASE("train model: plain float64 gradients equal finite differences of the loss") {
  auto c = small_config();
  c.sinks = true; // the sinks' gradients too (their glue: the dense attention with sinks)
  index_t const s = 24;
  auto const win = text(s + 1);
  fpdt::local_world world(1, std::chrono::seconds(60));
  auto comm = world.communicator(0).value();
  fpdt::host_backend be(fpdt::host_backend_options{});
  auto m = fpdt_train::model_rank<double, fpdt::local_communicator>::create(
      be, comm, c, {.seq = s, .chunk = s, .offload = false, .kind = fpdt_train::pieces::plain});
  REQUIRE_MESSAGE(m.ok(), m.error().to_string());
  set_test_sinks(**m, c);
  auto base = (*m)->forward_backward(win);
  REQUIRE_MESSAGE(base.ok(), base.error().to_string());
  std::vector<double> const g((*m)->grad(), (*m)->grad() + (*m)->layout().total);
  auto const& lay = (*m)->layout();
  auto const& l1 = lay.layer[1];
  // One entry of every kind of parameter, in both layers where they differ.
  std::size_t const probes[] = {lay.emb + 32 * static_cast<std::size_t>('T') + 3, lay.layer[0].g1 + 5, lay.layer[0].wq + 77,
                                lay.layer[0].wk + 40, lay.layer[0].wv + 9, lay.layer[0].wo + 300, l1.g2 + 1,
                                l1.up + 111, l1.gate + 222, l1.down + 333, l1.wk + 100, lay.gf + 7, lay.head + 32 * 101 + 4,
                                lay.layer[0].sink + 0, lay.layer[0].sink + 3, l1.sink + 2};
  for (std::size_t at : probes) {
    double* w = (*m)->w() + at;
    double const keep = *w, h = 1e-5;
    *w = keep + h;
    double const up = (*m)->forward_backward(win).value().loss;
    *w = keep - h;
    double const down = (*m)->forward_backward(win).value().loss;
    *w = keep;
    double const fd = (up - down) / (2 * h);
    CAPTURE(at);
    CHECK(std::abs(fd - g[at]) <= 1e-6 + 1e-5 * std::abs(g[at]));
  }
  CHECK(base->loss > 0);
}

TEST_CASE("train model: fpdt pieces equal the plain model at P 1 and 4 with offload on and off, with and without sinks") {
  for (bool sinks : {false, true}) {
  CAPTURE(sinks);
  auto c = small_config();
  c.sinks = sinks;
  index_t const s = 64;
  auto const win = text(s + 1);
  outcome const ref = plain(c, s, win);
  REQUIRE_MESSAGE(ref.error.empty(), ref.error);
  struct setup {
    int p;
    index_t chunk;
    bool offload;
  };
  for (setup const& u : {setup{1, 16, true}, setup{4, 16, true}, setup{4, 32, false}, setup{4, 64, true}, setup{2, 8, false}}) {
    CAPTURE(u.p);
    CAPTURE(u.chunk);
    CAPTURE(u.offload);
    outcome const got = with_fpdt(c, s, u.chunk, u.p, u.offload, win);
    REQUIRE_MESSAGE(got.error.empty(), got.error);
    CHECK(std::abs(got.loss - ref.loss) <= 2e-6 * ref.loss);
    double const e = worst_tensor_error(c, got.grad, ref.grad);
    CAPTURE(e);
    CHECK(e <= 5e-5);
  }
  }
}

TEST_CASE("train model: a device budget too small for one chunk is an out-of-memory error") {
  auto const c = small_config();
  fpdt::local_world world(1, std::chrono::seconds(60));
  auto comm = world.communicator(0).value();
  fpdt::host_backend be({.device_budget_bytes = 4096});
  auto m = fpdt_train::model_rank<float, fpdt::local_communicator>::create(
      be, comm, c, {.seq = 32, .chunk = 8, .offload = true, .kind = fpdt_train::pieces::fpdt});
  REQUIRE_FALSE(m.ok());
  CHECK(m.error().code() == fpdt::errc::out_of_memory);
}

TEST_CASE("train model: bad shapes are errors naming the numbers") {
  fpdt::local_world world(2, std::chrono::seconds(60));
  auto comm = world.communicator(0).value();
  fpdt::host_backend be(fpdt::host_backend_options{});
  auto c = small_config();
  auto m = fpdt_train::model_rank<float, fpdt::local_communicator>::create(be, comm, c, {.seq = 30, .chunk = 8});
  REQUIRE_FALSE(m.ok());
  CHECK(m.error().message().find("30") != std::string::npos);
  c.heads = 5;
  auto m2 = fpdt_train::model_rank<float, fpdt::local_communicator>::create(be, comm, c, {.seq = 32, .chunk = 8});
  REQUIRE_FALSE(m2.ok());
  CHECK(m2.error().message().find("heads 5") != std::string::npos);
  auto plain2 = fpdt_train::model_rank<double, fpdt::local_communicator>::create(
      be, comm, small_config(), {.seq = 32, .chunk = 8, .kind = fpdt_train::pieces::plain});
  REQUIRE_FALSE(plain2.ok());
}

TEST_CASE("train model: measured device peak per rank agrees with planned_device_bytes within 5 percent") {
  auto c = small_config();
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 128;
  struct setup {
    int p;
    index_t seq, chunk;
    bool offload;
  };
  for (setup const& u : {setup{4, 256, 64, true}, setup{4, 256, 64, false}, setup{2, 256, 256, false},
                         setup{1, 128, 32, true}}) {
    CAPTURE(u.p);
    CAPTURE(u.seq);
    CAPTURE(u.chunk);
    CAPTURE(u.offload);
    fpdt_train::run_options const ro{.seq = u.seq, .chunk = u.chunk, .offload = u.offload};
    auto planned = fpdt_train::planned_device_bytes(c, ro, u.p);
    REQUIRE_MESSAGE(planned.ok(), planned.error().to_string());
    auto const win = text(u.seq + 1);
    fpdt::local_world world(u.p, std::chrono::seconds(60));
    std::vector<std::size_t> peak(static_cast<std::size_t>(u.p));
    std::vector<std::string> err(peak.size());
    std::vector<std::thread> ts;
    for (int r = 0; r < u.p; ++r)
      ts.emplace_back([&, r] {
        auto comm = world.communicator(r).value();
        fpdt::host_backend be(fpdt::host_backend_options{});
        auto m = fpdt_train::model_rank<float, fpdt::local_communicator>::create(be, comm, c, ro);
        if (!m) {
          err[static_cast<std::size_t>(r)] = m.error().to_string();
          comm.abort(err[static_cast<std::size_t>(r)]);
          return;
        }
        for (int step = 0; step < 2; ++step) { // the second step holds the first's resident state
          be.device_memory().reset_peak();
          auto st = (*m)->forward_backward(win);
          if (!st) {
            err[static_cast<std::size_t>(r)] = st.error().to_string();
            return;
          }
        }
        peak[static_cast<std::size_t>(r)] = be.device_memory().peak_bytes();
      });
    for (auto& t : ts) t.join();
    for (auto const& e : err) REQUIRE_MESSAGE(e.empty(), e);
    for (std::size_t const pk : peak) {
      CAPTURE(pk);
      CAPTURE(*planned);
      CHECK(pk <= *planned);
      CHECK(static_cast<double>(pk) >= 0.95 * static_cast<double>(*planned));
    }
  }
}

TEST_CASE("train model: packed documents train as the documents alone (mask, restarted positions, labels)") {
  // Two documents of 32 tokens packed into S = 64: the loss sum and gradient of the packed run
  // equal the sums over two runs on each document alone (each with its last label dropped, as
  // the packed run drops it), on P = 2 and 4 ranks, with a window too.
  auto const c = small_config();
  auto const win = text(65);
  std::vector<std::uint8_t> const first(win.begin(), win.begin() + 33), second(win.begin() + 32, win.end());
  for (int p : {2, 4})
    for (index_t w : {index_t{0}, index_t{10}}) {
      CAPTURE(p);
      CAPTURE(w);
      outcome const packed = with_fpdt(c, 64, 16, p, true, win, {0, 32, 64}, w);
      outcome const a = with_fpdt(c, 32, 16, p, true, first, {0, 32}, w);
      outcome const b = with_fpdt(c, 32, 16, p, false, second, {0, 32}, w);
      REQUIRE_MESSAGE(packed.error.empty(), packed.error);
      REQUIRE_MESSAGE(a.error.empty(), a.error);
      REQUIRE_MESSAGE(b.error.empty(), b.error);
      // Means over 62 and 31 valid labels.
      CHECK(packed.loss * 62 == doctest::Approx(a.loss * 31 + b.loss * 31).epsilon(1e-6));
      std::vector<double> sum(a.grad.size());
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = (a.grad[i] + b.grad[i]) / 2; // x 31 / 62
      double const e = worst_tensor_error(c, packed.grad, sum);
      CAPTURE(e);
      CHECK(e <= 5e-5);
    }
  // Without documents the packed run differs (the second document attends to the first).
  outcome const unmasked = with_fpdt(c, 64, 16, 2, true, win);
  outcome const masked = with_fpdt(c, 64, 16, 2, true, win, {0, 32, 64});
  CHECK(std::abs(unmasked.loss - masked.loss) > 1e-4);
}
