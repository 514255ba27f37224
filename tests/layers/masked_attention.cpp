// Sliding-window and document masks through the layers (include/fpdt/attention/mask.hpp, issue
// 19): one-rank fpdt_attention and sequence_parallel_attention on P ranks equal float64 dense
// attention whose mask is an explicit [S, S] boolean matrix built here from the definitions (the
// flash-attention window convention: key p_k visible to query p_q iff p_q - left <= p_k <= p_q +
// right, and p_k <= p_q when causal; packed documents: only keys of the query's own document), not
// by the library's mask code. Windows smaller than, equal to and larger than the chunk C, edges on
// chunk and piece boundaries; random document lengths with empty and one-token documents, a
// document spanning many chunks, and windows with documents; GQA (H_kv < P included), offload on
// and off, fp32 and bf16, and the same inputs twice giving the same bits.
#include "../attention/chunked_driver.hpp"
#include "rank_runner.hpp"

#include <fpdt/layers/fpdt_attention.hpp>
#include <fpdt/layers/host_defaults.hpp>
#include <fpdt/layers/sequence_parallel_attention.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using fpdt::index_t;
using fpdt_test::attn_shape;
using namespace fpdt_test::chunked;
using namespace fpdt_test::ranks;

namespace {

struct window {
  bool causal = true;
  index_t left = -1;  // -1: unbounded
  index_t right = -1; // full masks only; -1: unbounded
  std::vector<index_t> lengths{}; // documents; empty: one
  std::vector<index_t> offsets{}; // filled by mask()
  [[nodiscard]] fpdt::attention_mask mask() {
    fpdt::attention_mask m{causal ? fpdt::mask_kind::causal : fpdt::mask_kind::full, left,
                           causal ? fpdt::unbounded_window : right};
    if (lengths.empty()) return m;
    offsets = fpdt::document_offsets_from_lengths(lengths).value();
    return fpdt::with_documents(m, offsets);
  }
};

// allowed[i * S + j]: key j visible to query i, from the definitions.
std::vector<char> allowed_matrix(index_t s, window const& w) {
  std::vector<index_t> doc(static_cast<std::size_t>(s), 0); // document of each token
  index_t t = 0;
  for (std::size_t d = 0; d < w.lengths.size(); ++d)
    for (index_t x = 0; x < w.lengths[d]; ++x) doc[static_cast<std::size_t>(t++)] = static_cast<index_t>(d);
  std::vector<char> a(static_cast<std::size_t>(s * s), 0);
  for (index_t i = 0; i < s; ++i)
    for (index_t j = 0; j < s; ++j) {
      bool ok = w.left < 0 || j >= i - w.left;
      if (w.causal) ok = ok && j <= i;
      else ok = ok && (w.right < 0 || j <= i + w.right);
      ok = ok && doc[static_cast<std::size_t>(i)] == doc[static_cast<std::size_t>(j)];
      a[static_cast<std::size_t>(i * s + j)] = ok ? 1 : 0;
    }
  return a;
}

// Random document lengths summing to s: empty and one-token documents, one long document, and
// the rest random (seeded).
std::vector<index_t> random_documents(index_t s, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<index_t> l{0, 1};
  index_t left = s - 1;
  index_t const long_doc = std::min<index_t>(left, s / 2 + static_cast<index_t>(rng() % 5));
  l.push_back(long_doc);
  left -= long_doc;
  while (left > 0) {
    index_t const n = std::min<index_t>(left, static_cast<index_t>(rng() % 9));
    l.push_back(n); // 0 now and then: empty documents in the middle
    left -= n;
  }
  l.push_back(0); // and at the end
  std::shuffle(l.begin(), l.end(), rng);
  return l;
}

// Dense float64 attention and its backward (loss = sum(out * dout)) under an explicit mask; with
// `sinks` ([H], empty: none) each row's softmax denominator gains exp(sink[h]) (a key of value 0),
// and `dsink` receives d loss / d sink[h] = sum over rows of -p_sink * rowsum(dout * out).
template <class T>
ref_result masked_reference(problem<T> const& p, std::vector<char> const& allowed, std::vector<double> const& sinks = {},
                            std::vector<double>* dsink = nullptr) {
  attn_shape const& sh = p.s;
  index_t const s = sh.sq, h = sh.h, d = sh.d, group = sh.h / sh.hkv;
  double const scale = static_cast<double>(1.0f / std::sqrt(static_cast<float>(d)));
  ref_result r;
  r.out.assign(sh.q_size(), 0.0);
  r.lse.assign(sh.lse_size(), -fpdt_test::inf64);
  r.dq.assign(sh.q_size(), 0.0);
  r.dk.assign(sh.kv_size(), 0.0);
  r.dv.assign(sh.kv_size(), 0.0);
  auto q = [&](index_t i, index_t hh, index_t x) { return p.qd[static_cast<std::size_t>((i * h + hh) * d + x)]; };
  auto kv = [&](std::vector<double> const& t, index_t j, index_t g, index_t x) {
    return t[static_cast<std::size_t>((j * sh.hkv + g) * d + x)];
  };
  std::vector<double> pr(static_cast<std::size_t>(s));
  if (dsink) dsink->assign(static_cast<std::size_t>(h), 0.0);
  for (index_t hh = 0; hh < h; ++hh) {
    index_t const g = hh / group;
    double const sink = sinks.empty() ? -fpdt_test::inf64 : sinks[static_cast<std::size_t>(hh)];
    for (index_t i = 0; i < s; ++i) {
      double m = sink;
      for (index_t j = 0; j < s; ++j) {
        if (!allowed[static_cast<std::size_t>(i * s + j)]) continue;
        double dot = 0;
        for (index_t x = 0; x < d; ++x) dot += q(i, hh, x) * kv(p.kd, j, g, x);
        pr[static_cast<std::size_t>(j)] = dot * scale;
        m = std::max(m, dot * scale);
      }
      double l = sink == -fpdt_test::inf64 ? 0.0 : std::exp(sink - m);
      for (index_t j = 0; j < s; ++j)
        if (allowed[static_cast<std::size_t>(i * s + j)]) l += std::exp(pr[static_cast<std::size_t>(j)] - m);
      double const lse = m + std::log(l);
      r.lse[static_cast<std::size_t>(hh * s + i)] = lse;
      for (index_t j = 0; j < s; ++j)
        pr[static_cast<std::size_t>(j)] =
            allowed[static_cast<std::size_t>(i * s + j)] ? std::exp(pr[static_cast<std::size_t>(j)] - lse) : 0.0;
      auto const row = static_cast<std::size_t>((i * h + hh) * d);
      for (index_t j = 0; j < s; ++j)
        for (index_t x = 0; x < d; ++x) r.out[row + static_cast<std::size_t>(x)] += pr[static_cast<std::size_t>(j)] * kv(p.vd, j, g, x);
      double delta = 0;
      for (index_t x = 0; x < d; ++x) delta += p.doutd[row + static_cast<std::size_t>(x)] * r.out[row + static_cast<std::size_t>(x)];
      if (dsink && sink != -fpdt_test::inf64) (*dsink)[static_cast<std::size_t>(hh)] -= std::exp(sink - lse) * delta;
      for (index_t j = 0; j < s; ++j) {
        double const pj = pr[static_cast<std::size_t>(j)];
        if (pj == 0.0) continue;
        double dp = 0;
        for (index_t x = 0; x < d; ++x) dp += p.doutd[row + static_cast<std::size_t>(x)] * kv(p.vd, j, g, x);
        double const ds = pj * (dp - delta) * scale;
        auto const krow = static_cast<std::size_t>((j * sh.hkv + g) * d);
        for (index_t x = 0; x < d; ++x) {
          auto const xs = static_cast<std::size_t>(x);
          r.dq[row + xs] += ds * kv(p.kd, j, g, x);
          r.dk[krow + xs] += ds * q(i, hh, x);
          r.dv[krow + xs] += pj * p.doutd[row + xs];
        }
      }
    }
  }
  return r;
}

// One-rank layer: out, lse, dq, dk, dv; with `sinks` ([H] fp32) bound, their gradient to `dsink`.
template <class T>
run_result run_one_rank(problem<T> const& p, index_t chunk, bool offload, fpdt::attention_mask m,
                        std::vector<float> const& sinks = {}, std::vector<float>* dsink = nullptr) {
  attn_shape const& s = p.s;
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<T>::create(be, {s.sq, s.h, s.hkv, s.d},
                                               {.chunk = chunk, .offload = offload, .mask = m},
                                               fpdt::host_chunk_kernel{2});
  REQUIRE_MESSAGE(layer.ok(), layer.error().to_string());
  if (!sinks.empty()) {
    dsink->assign(sinks.size(), fnan);
    auto const e = std::array<index_t, 1>{s.h};
    REQUIRE(layer->bind_sinks(fpdt::contiguous_view<float const>(sinks.data(), e).value(),
                              fpdt::contiguous_view(dsink->data(), e).value()).ok());
  }
  std::vector<T> out(s.q_size());
  run_result r;
  r.lse.assign(s.lse_size(), fnan);
  r.dq.assign(s.q_size(), fnan);
  r.dk.assign(s.kv_size(), fnan);
  r.dv.assign(s.kv_size(), fnan);
  auto qe = s.q_ext(), ke = s.kv_ext();
  auto cv = [](std::vector<T> const& v, std::array<index_t, 3> e) { return fpdt::contiguous_view<T const>(v.data(), e).value(); };
  auto fv = [](std::vector<float>& v, auto e) { return fpdt::contiguous_view(v.data(), e).value(); };
  auto st = layer->forward(cv(p.q, qe), cv(p.k, ke), cv(p.v, ke), fpdt::contiguous_view(out.data(), qe).value(),
                           fv(r.lse, s.lse_ext()));
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  st = layer->backward(cv(p.dout, qe), fv(r.dq, qe), fv(r.dk, ke), fv(r.dv, ke));
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  r.out.resize(out.size());
  for (std::size_t i = 0; i < out.size(); ++i) r.out[i] = static_cast<float>(out[i]);
  return r;
}

// Options of run_p_ranks beyond the mask: a mask to make the layer with and run one pass under
// before `set_mask(m)` (null: made with m), and sink gradients accumulated onto 7.0 instead of
// overwritten.
struct p_run_options {
  fpdt::attention_mask const* first = nullptr;
  bool accumulate = false;
};

// sequence_parallel_attention on P ranks: out, lse (through a tensor_sink and token_layout),
// dq, dk, dv; with `sinks` ([H] fp32, every rank the same) bound, `dsink` gets the sum over the
// ranks of their sink gradients, and each rank's is checked to be 0 (accumulating: unchanged)
// outside its own heads.
run_result run_p_ranks(problem<float> const& p, index_t ranks, index_t c, bool offload, fpdt::attention_mask const& m,
                       std::vector<float> const& sinks = {}, std::vector<float>* dsink = nullptr, p_run_options o = {}) {
  float const g0 = o.accumulate ? 7.0f : fnan; // the sink grads' values before the backward
  attn_shape const& s = p.s;
  std::vector<std::vector<float>> lse(static_cast<std::size_t>(ranks)), grad(static_cast<std::size_t>(ranks));
  std::vector<fpdt::status> st;
  run_result r = run_ranks(p, ranks, c, [&](fpdt::host_backend& be, fpdt::local_communicator& comm, index_t rank,
                                            rank_io& x, fpdt::token_layout const& tl) -> fpdt::status {
    auto layer = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(
        be, comm, {s.sq, s.h, s.hkv, s.d}, {.chunk = c, .offload = offload, .mask = o.first ? *o.first : m}, 0,
        fpdt::host_chunk_kernel{1});
    if (!layer) return layer.error();
    index_t const local = tl.local_tokens();
    auto& l = lse[static_cast<std::size_t>(rank)];
    auto& g = grad[static_cast<std::size_t>(rank)];
    l.assign(static_cast<std::size_t>(s.h * local), fnan);
    if (o.first) { // one pass under the first mask, then the mask under test
      FPDT_TRY(run_one(*layer, x, s, local));
      FPDT_TRY(layer->set_mask(m));
    }
    if (!sinks.empty()) {
      g.assign(sinks.size(), g0);
      auto const e = std::array<index_t, 1>{s.h};
      FPDT_TRY(layer->bind_sinks(fpdt::contiguous_view<float const>(sinks.data(), e).value(),
                                 fpdt::contiguous_view(g.data(), e).value(), o.accumulate));
    }
    std::array<index_t, 3> const qe{local, s.h, s.d}, ke{local, s.hkv, s.d};
    fpdt::tensor_source<float> src{fpdt::contiguous_view<float const>(x.q.data(), qe).value(),
                                   fpdt::contiguous_view<float const>(x.k.data(), ke).value(),
                                   fpdt::contiguous_view<float const>(x.v.data(), ke).value()};
    fpdt::tensor_sink<float> snk{fpdt::contiguous_view(x.out.data(), qe).value(),
                                 fpdt::contiguous_view(l.data(), std::array<index_t, 2>{s.h, local}).value()};
    FPDT_TRY(layer->forward(src, snk));
    return layer->backward(fpdt::contiguous_view<float const>(x.dout.data(), qe).value(),
                           fpdt::contiguous_view(x.dq.data(), qe).value(), fpdt::contiguous_view(x.dk.data(), ke).value(),
                           fpdt::contiguous_view(x.dv.data(), ke).value());
  }, &st);
  for (auto const& x : st) REQUIRE_MESSAGE(x.ok(), x.to_string());
  // lse [H, S/P] per rank -> [S/P, H] -> the global [S, H] -> [H, S].
  auto tl = fpdt::token_layout::make(s.sq, ranks, c).value();
  std::vector<float> global(static_cast<std::size_t>(s.sq * s.h), fnan);
  for (index_t rank = 0; rank < ranks; ++rank) {
    index_t const local = tl.local_tokens();
    std::vector<float> t(static_cast<std::size_t>(local * s.h));
    for (index_t hh = 0; hh < s.h; ++hh)
      for (index_t i = 0; i < local; ++i)
        t[static_cast<std::size_t>(i * s.h + hh)] = lse[static_cast<std::size_t>(rank)][static_cast<std::size_t>(hh * local + i)];
    gather(tl, t, s.h, rank, global);
  }
  r.lse.assign(s.lse_size(), fnan);
  for (index_t hh = 0; hh < s.h; ++hh)
    for (index_t i = 0; i < s.sq; ++i)
      r.lse[static_cast<std::size_t>(hh * s.sq + i)] = global[static_cast<std::size_t>(i * s.h + hh)];
  if (!sinks.empty()) {
    dsink->assign(sinks.size(), 0.0f);
    index_t const per = s.h / ranks;
    for (index_t rank = 0; rank < ranks; ++rank)
      for (index_t hh = 0; hh < s.h; ++hh) {
        float const x = grad[static_cast<std::size_t>(rank)][static_cast<std::size_t>(hh)];
        if (hh / per != rank) CHECK(x == (o.accumulate ? g0 : 0.0f)); // another rank's head
        else (*dsink)[static_cast<std::size_t>(hh)] += o.accumulate ? x - g0 : x;
      }
  }
  return r;
}

// The masks of the grid, for chunk C, piece C / P and S tokens: windows smaller than, equal to
// and larger than C, edges on chunk boundaries, two-sided full windows; then documents (random,
// on chunk and piece edges, one token each, a whole-sequence one) alone and with windows.
std::vector<window> masks_for(index_t c, index_t piece, index_t s) {
  std::vector<window> m = {{true, 0, -1},     {true, 1, -1},         {true, c - 1, -1}, {true, c, -1},
                           {true, c + 1, -1}, {true, 2 * c + 3, -1}, {true, -1, -1},    {false, 1, 2},
                           {false, c, c},     {false, c / 2, -1},    {false, -1, c + 1}, {false, 0, 0},
                           {false, 3 * c, 1}};
  std::vector<index_t> const random = random_documents(s, static_cast<std::uint32_t>(s + c));
  std::vector<index_t> on_edges; // chunk and piece edges: c, piece, c + piece, ... up to s
  for (index_t t = 0, k = 0; t < s; ++k) {
    index_t const n = std::min(s - t, k % 2 == 0 ? c : piece);
    on_edges.push_back(n);
    t += n;
  }
  m.push_back({true, -1, -1, random});
  m.push_back({false, -1, -1, random});
  m.push_back({true, -1, -1, on_edges});
  m.push_back({false, -1, -1, on_edges});
  m.push_back({true, c / 2, -1, random});
  m.push_back({false, 2, c, random});
  m.push_back({true, -1, -1, std::vector<index_t>(static_cast<std::size_t>(s), 1)}); // one token each
  m.push_back({true, -1, -1, {0, s, 0}});
  return m;
}

} // namespace

TEST_CASE("window masks: one rank equals float64 dense attention with the explicit mask (out, lse, dq, dk, dv)") {
  index_t const c = 8, u = 5, h = 4, d = 8;
  for (window w : masks_for(c, c, c * u))
    for (index_t hkv : {1, 4})
      for (bool offload : {true, false}) {
        CAPTURE(w.causal);
        CAPTURE(w.left);
        CAPTURE(w.right);
        CAPTURE(w.lengths.size());
        CAPTURE(hkv);
        CAPTURE(offload);
        attn_shape const s{c * u, c * u, h, hkv, d};
        auto p = random_problem<float>(s, 900 + static_cast<std::uint32_t>(w.left * 7 + w.right * 3 + hkv));
        run_result const got = run_one_rank(p, c, offload, w.mask());
        std::vector<char> const allowed = allowed_matrix(s.sq, w);
        check_against_reference(got, masked_reference(p, allowed), p, 1e-4);
        // The layer computes exactly the chunk pairs with a visible key: forward and backward.
        fpdt::host_backend be;
        auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, h, hkv, d},
                                                         {.chunk = c, .offload = offload, .mask = w.mask()});
        REQUIRE(layer.ok());
        std::size_t pairs = 0;
        for (index_t i = 0; i < u; ++i)
          for (index_t j = 0; j < u; ++j) {
            bool any = false;
            for (index_t a = i * c; a < (i + 1) * c && !any; ++a)
              for (index_t b = j * c; b < (j + 1) * c && !any; ++b) any = allowed[static_cast<std::size_t>(a * s.sq + b)] != 0;
            pairs += any ? 1 : 0;
          }
        CHECK(layer->forward_plan().count(fpdt::step_kind::compute) == pairs);
        CHECK(layer->backward_plan().count(fpdt::step_kind::compute) == pairs);
      }
}

TEST_CASE("window masks: bf16 on one rank, and the same inputs twice give the same bits") {
  index_t const c = 16, u = 4;
  attn_shape const s{c * u, c * u, 4, 2, 16};
  auto p = random_problem<fpdt::bfloat16>(s, 77);
  for (window w : {window{true, 20, -1}, window{false, 5, 11}, window{true, 9, -1, random_documents(s.sq, 3)}}) {
    CAPTURE(w.causal);
    run_result const a = run_one_rank(p, c, true, w.mask());
    run_result const b = run_one_rank(p, c, true, w.mask());
    // The reference sees the bf16-rounded inputs (problem<T>'s doubles), so one tolerance fits.
    check_against_reference(a, masked_reference(p, allowed_matrix(s.sq, w)), p, 2e-2); // bf16 out
    for (auto [x, y] : {std::pair{&a.out, &b.out}, {&a.lse, &b.lse}, {&a.dq, &b.dq}, {&a.dk, &b.dk}, {&a.dv, &b.dv}})
      CHECK(std::memcmp(x->data(), y->data(), x->size() * sizeof(float)) == 0);
  }
}

TEST_CASE("window masks: P ranks equal float64 dense attention with the explicit mask") {
  index_t const h = 4, d = 8;
  for (index_t ranks : {2, 4})
    for (index_t hkv : {1, 2, 4}) {
      if (hkv % ranks != 0 && ranks % hkv != 0) continue;
      index_t const c = 2 * ranks, u = 4; // pieces of C / P = 2 tokens
      for (window w : masks_for(c, c / ranks, c * u)) {
        CAPTURE(ranks);
        CAPTURE(hkv);
        CAPTURE(w.causal);
        CAPTURE(w.left);
        CAPTURE(w.right);
        CAPTURE(w.lengths.size());
        attn_shape const s{c * u, c * u, h, hkv, d};
        auto p = random_problem<float>(s, 1300 + static_cast<std::uint32_t>(ranks * 31 + hkv * 5 + w.left));
        bool const offload = (w.left + hkv) % 2 == 0;
        fpdt::attention_mask const m = w.mask(); // once: the rank threads share it
        run_result const r = run_p_ranks(p, ranks, c, offload, m);
        check_against_reference(r, masked_reference(p, allowed_matrix(s.sq, w)), p, 1e-4);
      }
    }
}

TEST_CASE("window masks: bad windows are refused before any pass, naming the values") {
  fpdt::host_backend be;
  auto bad = [&](fpdt::attention_mask m, char const* part) {
    auto layer = fpdt::fpdt_attention<float>::create(be, {16, 2, 2, 8}, {.chunk = 4, .mask = m});
    REQUIRE_FALSE(layer.ok());
    CHECK(layer.error().code() == fpdt::errc::invalid_argument);
    INFO(layer.error().to_string());
    CHECK(contains(layer.error().to_string(), part));
  };
  bad({fpdt::mask_kind::causal, -2, -1}, "window (-2, -1)");
  bad({fpdt::mask_kind::full, 3, -5}, "window (3, -5)");
  bad({fpdt::mask_kind::causal, 3, 2}, "window_right = 2");
  bad({static_cast<fpdt::mask_kind>(7), -1, -1}, "mask kind 7");
  // Documents: offsets that do not sum to S, a negative length, a first offset other than 0.
  std::vector<index_t> const short_docs{0, 5, 12}, negative{0, 9, 7, 16}, shifted{2, 9, 16};
  bad(fpdt::with_documents(fpdt::causal_mask, short_docs), "hold 12 tokens, not S = 16");
  bad(fpdt::with_documents(fpdt::causal_mask, negative), "document 1 has a negative length");
  bad(fpdt::with_documents(fpdt::full_mask, shifted), "document_offsets[0] = 2");
  bad({fpdt::mask_kind::causal, -1, -1, nullptr, 3}, "documents = 3 with no document_offsets");
  std::vector<index_t> const lengths{4, -1, 13};
  auto o = fpdt::document_offsets_from_lengths(lengths);
  REQUIRE_FALSE(o.ok());
  CHECK(contains(o.error().to_string(), "document 1 has length -1"));
}

TEST_CASE("document masks: the layer keeps its own copy of the offsets, and ranks that disagree on them fail") {
  attn_shape const s{32, 32, 2, 2, 8};
  auto p = random_problem<float>(s, 21);
  window w{true, -1, -1, {10, 0, 7, 15}};
  fpdt::attention_mask m = w.mask();
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {32, 2, 2, 8}, {.chunk = 8, .mask = m});
  REQUIRE(layer.ok());
  std::vector<char> const allowed = allowed_matrix(s.sq, w);
  std::fill(w.offsets.begin(), w.offsets.end(), index_t{-99}); // the caller's array changes after create
  CHECK(layer->problem().mask().document_offsets != w.offsets.data());
  std::vector<float> out(s.q_size());
  auto cv = [](std::vector<float> const& v, std::array<index_t, 3> e) { return fpdt::contiguous_view<float const>(v.data(), e).value(); };
  REQUIRE(layer->forward(cv(p.q, s.q_ext()), cv(p.k, s.kv_ext()), cv(p.v, s.kv_ext()),
                         fpdt::contiguous_view(out.data(), s.q_ext()).value()).ok());
  ref_result const ref = masked_reference(p, allowed);
  double worst = 0;
  for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::abs(out[i] - ref.out[i]));
  CHECK(worst < 1e-5);
  // Two ranks with the same count of documents at other places: refused, naming the hashes.
  fpdt::local_world world(2, std::chrono::seconds(20));
  std::vector<std::vector<index_t>> offs{{0, 8, 32}, {0, 16, 32}};
  std::vector<fpdt::status> st(2);
  std::vector<std::thread> ts;
  for (int r = 0; r < 2; ++r)
    ts.emplace_back([&, r] {
      auto comm = world.communicator(r).value();
      fpdt::host_backend rbe;
      auto sp = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(
          rbe, comm, {32, 2, 2, 8}, {.chunk = 8, .mask = fpdt::with_documents(fpdt::causal_mask, offs[static_cast<std::size_t>(r)])});
      if (!sp) {
        st[static_cast<std::size_t>(r)] = sp.error();
        return;
      }
      std::vector<float> q(16 * 2 * 8), o(q.size());
      std::array<index_t, 3> const e{16, 2, 8};
      st[static_cast<std::size_t>(r)] = sp->forward(fpdt::contiguous_view<float const>(q.data(), e).value(),
                                                    fpdt::contiguous_view<float const>(q.data(), e).value(),
                                                    fpdt::contiguous_view<float const>(q.data(), e).value(),
                                                    fpdt::contiguous_view(o.data(), e).value());
    });
  for (auto& t : ts) t.join();
  for (auto const& e : st) {
    CHECK(e.code() == fpdt::errc::invalid_argument);
    CHECK(contains(e.to_string(), "mask causal, 2 documents (offsets hash"));
  }
}

TEST_CASE("window masks: device peak equals the prediction and the causal mask's at the same S and C") {
  index_t const c = 16, u = 6;
  attn_shape const s{c * u, c * u, 4, 2, 16};
  auto p = random_problem<float>(s, 5);
  std::size_t peak[2][2] = {};
  int k = 0;
  for (fpdt::attention_mask m : {fpdt::causal_mask, fpdt::causal_window_mask(20)}) {
    fpdt::host_backend be;
    auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, {.chunk = c, .mask = m}).value();
    std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
    auto cv = [](std::vector<float> const& v, std::array<index_t, 3> e) { return fpdt::contiguous_view<float const>(v.data(), e).value(); };
    auto vv = [](std::vector<float>& v, std::array<index_t, 3> e) { return fpdt::contiguous_view(v.data(), e).value(); };
    REQUIRE(layer.forward(cv(p.q, s.q_ext()), cv(p.k, s.kv_ext()), cv(p.v, s.kv_ext()), vv(out, s.q_ext())).ok());
    peak[k][0] = be.device_memory().stats().peak_bytes;
    CHECK(peak[k][0] == layer.predicted_forward_bytes());
    be.device_memory().reset_peak();
    REQUIRE(layer.backward(cv(p.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext())).ok());
    peak[k][1] = be.device_memory().stats().peak_bytes;
    CHECK(peak[k][1] == layer.predicted_backward_bytes());
    ++k;
  }
  CHECK(peak[1][0] == peak[0][0]);
  CHECK(peak[1][1] == peak[0][1]);
}

namespace {
// Sink logits per head: a large one (the sink takes most of the mass), a small, a -inf (no sink)
// and a moderate one, cycled over H.
std::vector<float> test_sinks(index_t h) {
  std::vector<float> const pattern{2.5f, -1.25f, -std::numeric_limits<float>::infinity(), 0.5f};
  std::vector<float> s;
  for (index_t i = 0; i < h; ++i) s.push_back(pattern[static_cast<std::size_t>(i) % pattern.size()]);
  return s;
}
std::vector<double> as_double(std::vector<float> const& v) { return {v.begin(), v.end()}; }
void check_sink_grad(std::vector<float> const& got, std::vector<double> const& ref, double tol) {
  REQUIRE(got.size() == ref.size());
  double scale = 1;
  for (double x : ref) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(std::isfinite(got[i]));
    CHECK(std::abs(double{got[i]} - ref[i]) <= tol * scale);
  }
}
} // namespace

TEST_CASE("attention sinks: one rank equals float64 attention with a sink in each row's denominator (out, lse, grads, dsink)") {
  index_t const c = 8, u = 5, h = 4, d = 8;
  std::vector<float> const sinks = test_sinks(h);
  std::vector<window> ws = {{true, -1, -1}, {false, -1, -1}, {true, c, -1}, {false, 2, c}};
  std::vector<window> const docs = masks_for(c, c, c * u);
  ws.push_back(docs[13]); // random documents, causal
  ws.push_back(docs[18]); // random documents with a window
  for (window w : ws)
    for (index_t hkv : {1, 4})
      for (bool offload : {true, false}) {
        CAPTURE(w.causal);
        CAPTURE(w.left);
        CAPTURE(w.lengths.size());
        CAPTURE(hkv);
        CAPTURE(offload);
        attn_shape const s{c * u, c * u, h, hkv, d};
        auto p = random_problem<float>(s, 400 + static_cast<std::uint32_t>(w.left * 7 + hkv));
        std::vector<float> dsink;
        run_result const got = run_one_rank(p, c, offload, w.mask(), sinks, &dsink);
        std::vector<double> ref_dsink;
        ref_result const ref = masked_reference(p, allowed_matrix(s.sq, w), as_double(sinks), &ref_dsink);
        check_against_reference(got, ref, p, 1e-4);
        check_sink_grad(dsink, ref_dsink, 1e-4);
        CHECK(dsink[2] == 0.0f); // the -inf sink: no sink, no gradient
      }
}

TEST_CASE("attention sinks: bf16, the same inputs twice give the same bits, and -inf sinks are plain attention") {
  index_t const c = 16, u = 4;
  attn_shape const s{c * u, c * u, 4, 2, 16};
  auto p = random_problem<fpdt::bfloat16>(s, 78);
  std::vector<float> const sinks = test_sinks(s.h);
  window w{true, 9, -1, random_documents(s.sq, 4)};
  std::vector<float> ga, gb;
  run_result const a = run_one_rank(p, c, true, w.mask(), sinks, &ga);
  run_result const b = run_one_rank(p, c, true, w.mask(), sinks, &gb);
  std::vector<double> ref_dsink;
  check_against_reference(a, masked_reference(p, allowed_matrix(s.sq, w), as_double(sinks), &ref_dsink), p, 2e-2);
  check_sink_grad(ga, ref_dsink, 2e-2);
  for (auto [x, y] : {std::pair{&a.out, &b.out}, {&a.lse, &b.lse}, {&a.dq, &b.dq}, {&a.dk, &b.dk}, {&a.dv, &b.dv}, {&ga, &gb}})
    CHECK(std::memcmp(x->data(), y->data(), x->size() * sizeof(float)) == 0);
  // All sinks -inf: plain attention, bit for bit, and a zero gradient.
  std::vector<float> const none(static_cast<std::size_t>(s.h), -std::numeric_limits<float>::infinity());
  std::vector<float> gn;
  run_result const n = run_one_rank(p, c, true, w.mask(), none, &gn);
  run_result const plain = run_one_rank(p, c, true, w.mask());
  for (auto [x, y] : {std::pair{&n.out, &plain.out}, {&n.lse, &plain.lse}, {&n.dq, &plain.dq}, {&n.dk, &plain.dk}, {&n.dv, &plain.dv}})
    CHECK(std::memcmp(x->data(), y->data(), x->size() * sizeof(float)) == 0);
  for (float g : gn) CHECK(g == 0.0f);
}

TEST_CASE("attention sinks: P ranks, each sink on its head's rank, lse and the summed sink gradient as on one rank") {
  index_t const h = 4, d = 8;
  for (index_t ranks : {2, 4})
    for (index_t hkv : {1, 2, 4}) {
      if (hkv % ranks != 0 && ranks % hkv != 0) continue;
      index_t const c = 2 * ranks, u = 4;
      std::vector<window> const all = masks_for(c, c / ranks, c * u);
      for (window w : {window{true, -1, -1}, window{false, 3, 5}, all[13], all[15]}) {
        CAPTURE(ranks);
        CAPTURE(hkv);
        CAPTURE(w.lengths.size());
        attn_shape const s{c * u, c * u, h, hkv, d};
        auto p = random_problem<float>(s, 1700 + static_cast<std::uint32_t>(ranks * 31 + hkv * 5));
        std::vector<float> sinks = test_sinks(h);
        std::rotate(sinks.begin(), sinks.begin() + 1, sinks.end()); // a head's sink is not its rank's
        std::vector<float> dsink;
        fpdt::attention_mask const m = w.mask();
        // Accumulating on some, and on others made with causal and given this mask by set_mask.
        p_run_options const o{hkv == 1 ? &fpdt::causal_mask : nullptr, hkv == 2};
        run_result const r = run_p_ranks(p, ranks, c, (hkv + ranks) % 2 == 0, m, sinks, &dsink, o);
        std::vector<double> ref_dsink;
        check_against_reference(r, masked_reference(p, allowed_matrix(s.sq, w), as_double(sinks), &ref_dsink), p, 1e-4);
        check_sink_grad(dsink, ref_dsink, 1e-4);
      }
    }
}

TEST_CASE("attention sinks: contexts in flight accumulate, a backward writes where its forward's binding said, unbinding restores plain attention") {
  index_t const c = 8, u = 3;
  attn_shape const s{c * u, c * u, 4, 2, 8};
  auto p1 = random_problem<float>(s, 31), p2 = random_problem<float>(s, 32);
  std::vector<float> const sinks = test_sinks(s.h);
  fpdt::attention_mask const m = fpdt::causal_mask;
  // Each forward alone (fresh layers): out and dsink.
  std::vector<float> g1, g2;
  run_result const r1 = run_one_rank(p1, c, true, m, sinks, &g1);
  run_result const r2 = run_one_rank(p2, c, true, m, sinks, &g2);
  run_result const plain1 = run_one_rank(p1, c, true, m);
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, {.chunk = c, .offload = true}).value();
  auto cv = [](std::vector<float> const& v, std::array<index_t, 3> e) { return fpdt::contiguous_view<float const>(v.data(), e).value(); };
  auto vv = [](std::vector<float>& v, std::array<index_t, 3> e) { return fpdt::contiguous_view(v.data(), e).value(); };
  auto v1 = [](auto& x) { return fpdt::contiguous_view(x.data(), std::array<index_t, 1>{static_cast<index_t>(x.size())}).value(); };
  std::vector<float> grad(sinks.size(), 100.0f); // accumulated into: starts at 100
  REQUIRE(layer.bind_sinks(v1(sinks), v1(grad), {.accumulate = true}).ok());
  std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  fpdt::attention_context c1, c2;
  REQUIRE(layer.forward(c1, cv(p1.q, s.q_ext()), cv(p1.k, s.kv_ext()), cv(p1.v, s.kv_ext()), vv(out, s.q_ext())).ok());
  for (std::size_t i = 0; i < out.size(); ++i) REQUIRE(out[i] == r1.out[i]);
  REQUIRE(layer.forward(c2, cv(p2.q, s.q_ext()), cv(p2.k, s.kv_ext()), cv(p2.v, s.kv_ext()), vv(out, s.q_ext())).ok());
  REQUIRE(layer.bind_sinks({}).ok()); // unbound before the backwards: they still write where their forwards said
  REQUIRE(layer.backward(c1, cv(p1.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext())).ok());
  for (std::size_t i = 0; i < dq.size(); ++i) REQUIRE(dq[i] == r1.dq[i]);
  REQUIRE(layer.backward(c2, cv(p2.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext())).ok());
  for (std::size_t h = 0; h < grad.size(); ++h) {
    CAPTURE(h);
    CHECK(grad[h] == doctest::Approx(100.0 + double{g1[h]} + double{g2[h]}).epsilon(1e-6));
  }
  // Unbound: the next passes are plain attention, bit for bit, and write no grad.
  std::vector<float> const before = grad;
  REQUIRE(layer.forward(cv(p1.q, s.q_ext()), cv(p1.k, s.kv_ext()), cv(p1.v, s.kv_ext()), vv(out, s.q_ext())).ok());
  REQUIRE(layer.backward(cv(p1.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext())).ok());
  CHECK(std::memcmp(out.data(), std::vector<float>(plain1.out.begin(), plain1.out.end()).data(), out.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(dk.data(), plain1.dk.data(), dk.size() * sizeof(float)) == 0);
  CHECK(grad == before);
  // Overwriting (the default) with first_head: the layer's heads are entries [2, 6) of 8; the
  // others become 0.
  std::vector<float> wide(8, 0.0f), wide_grad(8, 5.0f);
  std::copy(sinks.begin(), sinks.end(), wide.begin() + 2);
  REQUIRE(layer.bind_sinks(v1(wide), v1(wide_grad), {.first_head = 2}).ok());
  REQUIRE(layer.forward(cv(p1.q, s.q_ext()), cv(p1.k, s.kv_ext()), cv(p1.v, s.kv_ext()), vv(out, s.q_ext())).ok());
  REQUIRE(layer.backward(cv(p1.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext())).ok());
  for (std::size_t h = 0; h < 8; ++h)
    CHECK(wide_grad[h] == (h >= 2 && h < 6 ? g1[h - 2] : 0.0f));
  CHECK(layer.bind_sinks(v1(wide), v1(wide_grad), {.first_head = 5}).code() == fpdt::errc::shape_mismatch);
}

TEST_CASE("attention sinks: wrong counts, NaN and +inf are refused, naming the values") {
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {16, 4, 2, 8}, {.chunk = 4}).value();
  std::vector<float> three(3, 0.0f), four(4, 0.0f), g(4, 0.0f);
  auto v1 = [](std::vector<float>& x) { return fpdt::contiguous_view(x.data(), std::array<index_t, 1>{static_cast<index_t>(x.size())}).value(); };
  auto st = layer.bind_sinks(v1(three));
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  CHECK(contains(st.to_string(), "logits [3] and grad [0] must be the same length (grad may be empty) and hold this layer's H = 4 heads"));
  st = layer.bind_sinks(v1(four), v1(three));
  CHECK(st.code() == fpdt::errc::shape_mismatch);
  st = layer.bind_sinks(v1(four), v1(four));
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(contains(st.to_string(), "grad overlaps input logits"));
  std::vector<float> q(16 * 4 * 8, 0.1f), kv(16 * 2 * 8, 0.1f), out(q.size(), -7.0f);
  auto cq = fpdt::contiguous_view<float const>(q.data(), std::array<index_t, 3>{16, 4, 8}).value();
  auto ck = fpdt::contiguous_view<float const>(kv.data(), std::array<index_t, 3>{16, 2, 8}).value();
  auto vo = fpdt::contiguous_view(out.data(), std::array<index_t, 3>{16, 4, 8}).value();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    four[1] = bad;
    REQUIRE(layer.bind_sinks(v1(four), v1(g)).ok());
    st = layer.forward(cq, ck, ck, vo);
    CHECK(st.code() == fpdt::errc::invalid_argument);
    CHECK(contains(st.to_string(), "sink logit of head 1 is"));
    CHECK(out[0] == -7.0f); // nothing written
  }
  REQUIRE(layer.bind_sinks({}).ok()); // unbound: plain attention again
  CHECK(layer.forward(cq, ck, ck, vo).ok());
  // P ranks: the count is the whole layer's H.
  fpdt::local_world world(2, std::chrono::seconds(20));
  std::vector<fpdt::status> sts(2);
  std::vector<std::thread> ts;
  for (int r = 0; r < 2; ++r)
    ts.emplace_back([&, r] {
      auto comm = world.communicator(r).value();
      fpdt::host_backend rbe;
      auto sp = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(rbe, comm, {16, 4, 2, 8}, {.chunk = 4});
      std::vector<float> two(2, 0.0f);
      sts[static_cast<std::size_t>(r)] = sp->bind_sinks(v1(two));
    });
  for (auto& t : ts) t.join();
  for (auto const& e : sts) {
    CHECK(e.code() == fpdt::errc::shape_mismatch);
    CHECK(contains(e.to_string(), "must be [H] = [4]"));
  }
}

// Field case A20 (../shared/cases/CASES.md), as far as fpdt can state it: there is no padded mode
// (issue 20), so the 3 pad positions are a document of their own, which no real row sees; the loss
// ignores them (dout 0 there), so they add nothing to any real token's gradient. H = 1 on P = 1,
// and H = 2 identical heads on P = 2 (H % P must be 0 until issue 20).
TEST_CASE("field case A20: a packed document with tail padding, then a second document, and 20 repeats bit-identical") {
  for (std::vector<index_t> const& lengths : {std::vector<index_t>{13, 3}, std::vector<index_t>{13, 3, 8}})
    for (index_t ranks : {1, 2}) {
      CAPTURE(lengths.size());
      CAPTURE(ranks);
      index_t s = 0;
      for (index_t l : lengths) s += l;
      index_t const h = ranks;
      attn_shape const sh{s, s, h, h, 1};
      // Q = 0; K = V = the position within the document (global position in the first one).
      std::vector<double> q(sh.q_size(), 0.0), kv(sh.kv_size()), dout(sh.q_size(), 0.0);
      std::vector<index_t> pos, doc;
      for (std::size_t d = 0; d < lengths.size(); ++d)
        for (index_t i = 0; i < lengths[d]; ++i) {
          pos.push_back(i);
          doc.push_back(static_cast<index_t>(d));
        }
      for (index_t t = 0; t < s; ++t)
        for (index_t hh = 0; hh < h; ++hh) {
          kv[static_cast<std::size_t>(t * h + hh)] = static_cast<double>(pos[static_cast<std::size_t>(t)]);
          if (doc[static_cast<std::size_t>(t)] != 1) dout[static_cast<std::size_t>(t * h + hh)] = 1.0; // pads: no loss
        }
      auto const p = from_double<float>(sh, q, kv, kv, dout);
      window w{true, -1, -1, lengths};
      fpdt::attention_mask const m = w.mask();
      auto run = [&] { return ranks == 1 ? run_one_rank(p, 8, true, m) : run_p_ranks(p, ranks, 8, true, m); };
      run_result const first = run();
      for (index_t t = 0; t < s; ++t) {
        if (doc[static_cast<std::size_t>(t)] == 1) continue;
        auto const i = static_cast<double>(pos[static_cast<std::size_t>(t)]);
        for (index_t hh = 0; hh < h; ++hh) {
          CAPTURE(t);
          CHECK(first.out[static_cast<std::size_t>(t * h + hh)] == doctest::Approx(i / 2).epsilon(1e-6));
          CHECK(first.lse[static_cast<std::size_t>(hh * s + t)] == doctest::Approx(std::log(i + 1)).epsilon(1e-6));
        }
      }
      CHECK(first.out[12 * static_cast<std::size_t>(h)] == doctest::Approx(6.0).epsilon(1e-6));
      // The pads (and the second document) never reach the first: its keys' gradients equal the
      // float64 attention over it alone.
      check_against_reference(first, masked_reference(p, allowed_matrix(s, w)), p, 1e-5);
      for (int rep = 1; rep < 20; ++rep) {
        run_result const again = run();
        for (auto [x, y] : {std::pair{&first.out, &again.out}, {&first.lse, &again.lse}, {&first.dq, &again.dq},
                            {&first.dk, &again.dk}, {&first.dv, &again.dv}})
          REQUIRE(std::memcmp(x->data(), y->data(), x->size() * sizeof(float)) == 0);
      }
    }
}

// Field case A26: per-head and per-document offsets on every rank. Head h = head 0 + h (so a rank
// reading another head's values is wrong), documents of 5 and 11 tokens (the boundary inside a
// chunk) and of 8 and 8 (on a chunk edge), chunk 4: dq, dk, dv gathered from every rank equal
// float64 attention. H = 2 on P = 2 as the case states; H = 4 on P = 4 (H % P must be 0 until
// issue 20).
TEST_CASE("field case A26: per-head and per-document values on every rank equal float64 attention") {
  for (index_t ranks : {2, 4})
    for (std::vector<index_t> const& lengths : {std::vector<index_t>{5, 11}, std::vector<index_t>{8, 8}}) {
      CAPTURE(ranks);
      CAPTURE(lengths[0]);
      index_t const s = 16, h = ranks, d = 4;
      attn_shape const sh{s, s, h, h, d};
      auto base = random_problem<float>({s, s, 1, 1, d}, 2600 + static_cast<std::uint32_t>(ranks));
      auto widen = [&](std::vector<double> const& x) { // [S, 1, D] -> [S, H, D], head h = head 0 + h
        std::vector<double> y(static_cast<std::size_t>(s * h * d));
        for (index_t t = 0; t < s; ++t)
          for (index_t hh = 0; hh < h; ++hh)
            for (index_t e = 0; e < d; ++e)
              y[static_cast<std::size_t>((t * h + hh) * d + e)] = x[static_cast<std::size_t>(t * d + e)] + static_cast<double>(hh);
        return y;
      };
      auto const p = from_double<float>(sh, widen(base.qd), widen(base.kd), widen(base.vd), widen(base.doutd));
      window w{true, -1, -1, lengths};
      fpdt::attention_mask const m = w.mask();
      run_result const r = run_p_ranks(p, ranks, 4, ranks == 2, m);
      check_against_reference(r, masked_reference(p, allowed_matrix(s, w)), p, 1e-4);
    }
}

TEST_CASE("set_mask: a new batch's documents on the same layer equal a layer made with them, and old contexts and bad masks are refused") {
  index_t const c = 8, u = 4;
  attn_shape const s{c * u, c * u, 4, 2, 8};
  auto p = random_problem<float>(s, 41);
  window docs{true, -1, -1, {5, 0, 19, 8}};
  fpdt::attention_mask const dm = docs.mask();
  run_result const want = run_one_rank(p, c, true, dm);
  run_result const causal = run_one_rank(p, c, true, fpdt::causal_mask);
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, {.chunk = c, .offload = true},
                                                   fpdt::host_chunk_kernel{2}).value();
  auto cv = [](std::vector<float> const& v, std::array<index_t, 3> e) { return fpdt::contiguous_view<float const>(v.data(), e).value(); };
  auto vv = [](std::vector<float>& v, std::array<index_t, 3> e) { return fpdt::contiguous_view(v.data(), e).value(); };
  std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  auto pass = [&](fpdt::attention_context* ctx) {
    auto st = ctx ? layer.forward(*ctx, cv(p.q, s.q_ext()), cv(p.k, s.kv_ext()), cv(p.v, s.kv_ext()), vv(out, s.q_ext()))
                  : layer.forward(cv(p.q, s.q_ext()), cv(p.k, s.kv_ext()), cv(p.v, s.kv_ext()), vv(out, s.q_ext()));
    REQUIRE(st.ok());
    if (!ctx) REQUIRE(layer.backward(cv(p.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext())).ok());
  };
  fpdt::attention_context old;
  pass(&old);
  REQUIRE(layer.set_mask(dm).ok());
  std::fill(docs.offsets.begin(), docs.offsets.end(), index_t{-1}); // the layer copied them
  auto st = layer.backward(old, cv(p.dout, s.q_ext()), vv(dq, s.q_ext()), vv(dk, s.kv_ext()), vv(dv, s.kv_ext()));
  CHECK(st.code() == fpdt::errc::invalid_argument); // made under the old mask
  pass(nullptr);
  CHECK(std::memcmp(out.data(), want.out.data(), out.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(dq.data(), want.dq.data(), dq.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(dv.data(), want.dv.data(), dv.size() * sizeof(float)) == 0);
  CHECK(layer.forward_plan().count(fpdt::step_kind::compute) < static_cast<std::size_t>(u * (u + 1) / 2));
  // A bad mask leaves the layer as it was (still the documents).
  std::vector<index_t> const bad{0, 7, 30};
  st = layer.set_mask(fpdt::with_documents(fpdt::causal_mask, bad));
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(contains(st.to_string(), "hold 30 tokens, not S = 32"));
  pass(nullptr);
  CHECK(std::memcmp(out.data(), want.out.data(), out.size() * sizeof(float)) == 0);
  // Back to causal.
  REQUIRE(layer.set_mask(fpdt::causal_mask).ok());
  pass(nullptr);
  CHECK(std::memcmp(out.data(), causal.out.data(), out.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(dk.data(), causal.dk.data(), dk.size() * sizeof(float)) == 0);
}

TEST_CASE("set_mask on P ranks: the same new documents give the layer made with them, and ranks that set different ones fail") {
  index_t const ranks = 2, c = 4, u = 4;
  attn_shape const s{c * u, c * u, 2, 2, 8};
  auto p = random_problem<float>(s, 43);
  window w{true, -1, -1, {3, 9, 4}};
  fpdt::attention_mask const m = w.mask();
  ref_result const ref = masked_reference(p, allowed_matrix(s.sq, w));
  run_result const r = run_p_ranks(p, ranks, c, true, m, {}, nullptr, {&fpdt::causal_mask, false}); // causal first
  check_against_reference(r, ref, p, 1e-4);
  std::vector<fpdt::status> st;
  // Rank 1 sets other documents: the next pass names the disagreement on every rank.
  std::vector<std::vector<index_t>> offs{{0, 8, 16}, {0, 4, 16}};
  (void)run_ranks(p, ranks, c, [&](fpdt::host_backend& be, fpdt::local_communicator& comm, index_t rank,
                                   rank_io& x, fpdt::token_layout const& tl) -> fpdt::status {
    auto layer = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(
        be, comm, {s.sq, s.h, s.hkv, s.d}, {.chunk = c, .offload = true}, 0, fpdt::host_chunk_kernel{1});
    if (!layer) return layer.error();
    FPDT_TRY(run_one(*layer, x, s, tl.local_tokens()));
    FPDT_TRY(layer->set_mask(fpdt::with_documents(fpdt::causal_mask, offs[static_cast<std::size_t>(rank)])));
    return run_one(*layer, x, s, tl.local_tokens());
  }, &st);
  for (auto const& x : st) {
    CHECK(x.code() == fpdt::errc::invalid_argument);
    CHECK(contains(x.to_string(), "ranks disagree"));
  }
}
