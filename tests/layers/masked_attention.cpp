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

// Dense float64 attention and its backward (loss = sum(out * dout)) under an explicit mask.
template <class T> ref_result masked_reference(problem<T> const& p, std::vector<char> const& allowed) {
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
  for (index_t hh = 0; hh < h; ++hh) {
    index_t const g = hh / group;
    for (index_t i = 0; i < s; ++i) {
      double m = -fpdt_test::inf64;
      for (index_t j = 0; j < s; ++j) {
        if (!allowed[static_cast<std::size_t>(i * s + j)]) continue;
        double dot = 0;
        for (index_t x = 0; x < d; ++x) dot += q(i, hh, x) * kv(p.kd, j, g, x);
        pr[static_cast<std::size_t>(j)] = dot * scale;
        m = std::max(m, dot * scale);
      }
      double l = 0;
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

// One-rank layer: out, lse, dq, dk, dv.
template <class T>
run_result run_one_rank(problem<T> const& p, index_t chunk, bool offload, fpdt::attention_mask m) {
  attn_shape const& s = p.s;
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<T>::create(be, {s.sq, s.h, s.hkv, s.d},
                                               {.chunk = chunk, .offload = offload, .mask = m},
                                               fpdt::host_chunk_kernel{2});
  REQUIRE_MESSAGE(layer.ok(), layer.error().to_string());
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
        std::vector<fpdt::status> st;
        run_result r = run_ranks(p, ranks, c, [&](fpdt::host_backend& be, fpdt::local_communicator& comm, index_t,
                                                  rank_io& x, fpdt::token_layout const& tl) {
          auto layer = fpdt::sequence_parallel_attention<float, fpdt::local_communicator>::create(
              be, comm, {s.sq, h, hkv, d}, {.chunk = c, .offload = offload, .mask = m}, 0,
              fpdt::host_chunk_kernel{1});
          if (!layer) return layer.error();
          return run_one(*layer, x, s, tl.local_tokens());
        }, &st);
        for (auto const& x : st) REQUIRE_MESSAGE(x.ok(), x.to_string());
        ref_result const ref = masked_reference(p, allowed_matrix(s.sq, w));
        r.lse.assign(ref.lse.begin(), ref.lse.end()); // the tensor form does not return lse
        check_against_reference(r, ref, p, 1e-4);
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
