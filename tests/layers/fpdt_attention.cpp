// Tests of include/fpdt/layers/fpdt_attention.hpp: the layer equals dense float64 attention with
// offload on and off; its device peak does not grow with S and equals the schedule's prediction;
// CASES.md A12 (backward reads the right chunk), A18 (copy/compute race, run under tsan), A19
// (pinned memory does not grow); allocation fault injection; argument errors.
#include "../attention/chunked_driver.hpp"
#include "../attention/reference.hpp"
#include "../backend/device_like_backend.hpp"
#include "a12_case.hpp"

#include <fpdt/layers/fpdt_attention.hpp>
#include <fpdt/layers/host_defaults.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <map>
#include <memory>
#include <span>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using fpdt::index_t;
using fpdt_test::attn_shape;
using namespace fpdt_test::chunked;

namespace {

// Runs forward and backward of the layer on problem p; out converted to float.
template <class T, class B, class K = fpdt::host_chunk_kernel>
run_result run_layer(B& be, problem<T> const& p, fpdt::fpdt_attention_options const& o,
                     K kernel = {}, fpdt::status* error = nullptr) {
  attn_shape const& s = p.s;
  auto layer = fpdt::fpdt_attention<T, B, K>::create(be, {s.sq, s.h, s.hkv, s.d}, o, kernel);
  REQUIRE_MESSAGE(layer.ok(), layer.error().to_string());
  std::vector<T> out(s.q_size(), T(7.0f));
  run_result r;
  r.lse.assign(s.lse_size(), fnan);
  fpdt::status st = layer->forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()),
                                   cview(p.v, s.kv_ext()), view(out, s.q_ext()),
                                   view(r.lse, s.lse_ext()));
  if (error) *error = st;
  if (!st.ok()) return r;
  for (T x : out)
    r.out.push_back(static_cast<float>(x));
  r.dq.assign(s.q_size(), fnan);
  r.dk.assign(s.kv_size(), fnan);
  r.dv.assign(s.kv_size(), fnan);
  st = layer->backward(cview(p.dout, s.q_ext()), view(r.dq, s.q_ext()), view(r.dk, s.kv_ext()),
                       view(r.dv, s.kv_ext()));
  if (error) *error = st;
  return r;
}

template <class T> double layer_tol() { return std::is_same_v<T, float> ? 1e-4 : 2e-2; }

} // namespace

TEST_CASE_TEMPLATE("fpdt_attention: equals float64 dense attention with offload on and off", T,
                   float, fpdt::bfloat16) {
  fpdt::host_backend be;
  for (index_t u : {1, 2, 5, 8})
    for (bool causal : {true, false})
      for (bool offload : {true, false})
        for (index_t ring : {2, 3}) {
          if (!offload && ring == 3) continue; // no ring without offload
          CAPTURE(u);
          CAPTURE(causal);
          CAPTURE(offload);
          CAPTURE(ring);
          attn_shape const s{8 * u, 8 * u, 4, 2, 16};
          auto p = random_problem<T>(s, 100 + static_cast<std::uint32_t>(u));
          fpdt::fpdt_attention_options o;
          o.chunk = 8;
          o.offload = offload;
          o.ring_slots = ring;
          o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
          run_options ro;
          ro.mask = o.mask;
          run_result const r = run_layer<T>(be, p, o);
          check_against_reference(r, reference_of(p, ro), p, layer_tol<T>());
        }
  CHECK(be.device_memory().stats().live_allocations == 0);
}

TEST_CASE("fpdt_attention: device peak at fixed C does not grow with S and matches the schedule") {
  index_t const c = 32;
  std::size_t peaks[2] = {}, bwd_peaks[2] = {};
  int k = 0;
  for (index_t u : {4, 16}) {
    fpdt::host_backend be;
    attn_shape const s{c * u, c * u, 4, 2, 16};
    auto p = random_problem<float>(s, 7);
    auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d},
                                                      {.chunk = c, .offload = true}).value();
    std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
    REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                          view(out, s.q_ext())).ok());
    peaks[k] = be.device_memory().stats().peak_bytes;
    CHECK(peaks[k] == layer.predicted_forward_bytes()); // exact; the issue asks for 1%
    be.device_memory().reset_peak();
    REQUIRE(layer.backward(cview(p.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()),
                           view(dv, s.kv_ext())).ok());
    bwd_peaks[k] = be.device_memory().stats().peak_bytes;
    CHECK(bwd_peaks[k] == layer.predicted_backward_bytes());
    // Host memory holds the chunks instead: it grows with S.
    CHECK(layer.host_bytes() >= static_cast<std::size_t>(s.sq) * 4 * (4 + 2 + 2 + 4) * 16);
    ++k;
  }
  MESSAGE("forward peak S=4C: ", peaks[0], " S=16C: ", peaks[1], "; backward ", bwd_peaks[0], " ",
          bwd_peaks[1]);
  CHECK(static_cast<double>(peaks[1]) <= 1.05 * static_cast<double>(peaks[0]));
  CHECK(static_cast<double>(bwd_peaks[1]) <= 1.05 * static_cast<double>(bwd_peaks[0]));
  // Without offload the device holds every chunk: the peak grows with S.
  fpdt::host_backend be;
  attn_shape const s{c * 16, c * 16, 4, 2, 16};
  auto p = random_problem<float>(s, 8);
  auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d},
                                                    {.chunk = c, .offload = false}).value();
  std::vector<float> out(s.q_size());
  REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                        view(out, s.q_ext())).ok());
  CHECK(be.device_memory().stats().peak_bytes == layer.predicted_forward_bytes());
  CHECK(be.device_memory().stats().peak_bytes > 3 * peaks[1]);
}

namespace {
// The host kernel with a workspace (kernel_with_workspace) of an odd size, which it fills with
// NaN on every call: a workspace that overlapped any buffer the layer uses would spoil results.
struct workspace_kernel {
  fpdt::host_chunk_kernel inner{1};
  std::span<std::byte> workspace{};
  std::shared_ptr<std::atomic<int>> calls = std::make_shared<std::atomic<int>>(0);
  // Forward: H * Sq floats and 100 bytes; backward: also H_kv * Sk * D floats (odd sizes, and
  // different per pass).
  [[nodiscard]] std::size_t workspace_bytes(fpdt::chunk_pair_shape const& c) const noexcept {
    return static_cast<std::size_t>(c.heads * c.q_rows + (c.backward ? c.kv_heads * c.k_rows * c.head_dim : 0)) * 4 + 100;
  }
  [[nodiscard]] fpdt::status use(index_t q_rows, index_t heads, index_t kv_heads, index_t d, bool backward) const {
    std::size_t const need = workspace_bytes({q_rows, q_rows, heads, kv_heads, d, backward});
    if (workspace.size() != need)
      return fpdt::make_error(fpdt::errc::invalid_argument, "workspace of ", workspace.size(),
                              " bytes, expected ", need);
    if (reinterpret_cast<std::uintptr_t>(workspace.data()) % fpdt::device_arena::granularity != 0)
      return fpdt::make_error(fpdt::errc::invalid_argument, "workspace not aligned to the arena granularity");
    std::memset(workspace.data(), 0xff, workspace.size());
    ++*calls;
    return {};
  }
  template <class T> [[nodiscard]] fpdt::status forward(fpdt::chunk_forward_args<T> const& a) const {
    FPDT_TRY(use(a.q.extent(0), a.q.extent(1), a.k.extent(1), a.q.extent(2), false));
    return inner.forward(a);
  }
  template <class T> [[nodiscard]] fpdt::status backward(fpdt::chunk_backward_args<T> const& a) const {
    FPDT_TRY(use(a.q.extent(0), a.q.extent(1), a.k.extent(1), a.q.extent(2), true));
    return inner.backward(a);
  }
};
static_assert(fpdt::kernel_with_workspace<workspace_kernel>);
struct throwing_size_kernel : workspace_kernel { // a size query that may throw is not accepted
  [[nodiscard]] std::size_t workspace_bytes(fpdt::chunk_pair_shape const&) const { return 0; }
};
static_assert(!fpdt::kernel_with_workspace<throwing_size_kernel>);
static_assert(!fpdt::kernel_with_workspace<fpdt::host_chunk_kernel>);
} // namespace

TEST_CASE("fpdt_attention: a chunk kernel's workspace comes from the arena, inside the predicted peak") {
  index_t const c = 8;
  attn_shape const s{4 * c, 4 * c, 4, 2, 16};
  auto p = random_problem<float>(s, 31);
  std::size_t const ws_fwd = fpdt::device_arena::rounded_size(static_cast<std::size_t>(s.h * c) * 4 + 100);
  std::size_t const ws_bwd = fpdt::device_arena::rounded_size(
      static_cast<std::size_t>(s.h * c + s.hkv * c * s.d) * 4 + 100);
  for (bool offload : {true, false}) {
    CAPTURE(offload);
    fpdt::fpdt_attention_options o;
    o.chunk = c;
    o.offload = offload;
    run_options ro;
    ro.mask = o.mask;
    fpdt::host_backend be;
    workspace_kernel k;
    fpdt::status err;
    run_result const r = run_layer<float>(be, p, o, k, &err);
    REQUIRE_MESSAGE(err.ok(), err.to_string());
    check_against_reference(r, reference_of(p, ro), p, layer_tol<float>());
    CHECK(*k.calls == 2 * 10); // 10 causal pairs forward and backward, each with its workspace
    CHECK(be.device_memory().stats().live_allocations == 0);
    // The peaks are the plain kernel's plus the workspace, and the predictions say so.
    auto plain = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, o).value();
    auto with = fpdt::fpdt_attention<float, fpdt::host_backend, workspace_kernel>::create(
                    be, {s.sq, s.h, s.hkv, s.d}, o, k).value();
    CHECK(with.predicted_forward_bytes() == plain.predicted_forward_bytes() + ws_fwd);
    CHECK(with.predicted_backward_bytes() == plain.predicted_backward_bytes() + ws_bwd);
    std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
    be.device_memory().reset_peak();
    REQUIRE(with.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                         view(out, s.q_ext())).ok());
    CHECK(be.device_memory().stats().peak_bytes == with.predicted_forward_bytes());
    be.device_memory().reset_peak();
    REQUIRE(with.backward(cview(p.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()),
                          view(dv, s.kv_ext())).ok());
    CHECK(be.device_memory().stats().peak_bytes == with.predicted_backward_bytes());
    // The workspace counts in the budget: one byte short of the prediction fails before any step,
    // naming the bytes the pass needs, and leaves nothing allocated.
    fpdt::host_backend tight({.device_budget_bytes = with.predicted_forward_bytes() - 1});
    auto small = fpdt::fpdt_attention<float, fpdt::host_backend, workspace_kernel>::create(
                     tight, {s.sq, s.h, s.hkv, s.d}, o, k).value();
    int const before = *k.calls;
    fpdt::status const st = small.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()),
                                          cview(p.v, s.kv_ext()), view(out, s.q_ext()));
    REQUIRE_FALSE(st.ok());
    CHECK(st.code() == fpdt::errc::out_of_memory);
    CHECK(st.message().find(std::to_string(with.predicted_forward_bytes())) != std::string::npos);
    CHECK(*k.calls == before);
    CHECK(tight.device_memory().stats().live_allocations == 0);
  }
}

namespace {
// The host kernel, handing the K and V each backward chunk pair reads to an A12 recorder.
struct recording_kernel {
  fpdt::host_chunk_kernel inner{1};
  fpdt_test::a12::recorder* rec = nullptr;
  static std::vector<float> values(fpdt::tensor_view<float const, 3> const& t) {
    std::vector<float> x;
    for (index_t a = 0; a < t.extent(0); ++a)
      for (index_t b = 0; b < t.extent(1); ++b)
        for (index_t c = 0; c < t.extent(2); ++c) x.push_back(t(a, b, c));
    return x;
  }
  fpdt::status forward(fpdt::chunk_forward_args<float> const& a) const { return inner.forward(a); }
  fpdt::status backward(fpdt::chunk_backward_args<float> const& a) const {
    rec->put(a.q_offset, a.k_offset, values(a.k), values(a.v));
    return inner.backward(a);
  }
};
} // namespace

namespace {
// Fails (or throws) on one chunk pair of one pass, otherwise the host kernel.
struct failing_kernel {
  fpdt::host_chunk_kernel inner{1};
  index_t c = 8, fail_i = 2, fail_j = 1;
  bool in_backward = false, throws = false;
  [[nodiscard]] fpdt::status maybe_fail(index_t q_offset, index_t k_offset, bool backward) const {
    if (backward != in_backward || q_offset != fail_i * c || k_offset != fail_j * c) return {};
    if (throws) throw std::runtime_error("kernel exploded");
    return fpdt::make_error(fpdt::errc::not_supported, "kernel refuses");
  }
  template <class T> [[nodiscard]] fpdt::status forward(fpdt::chunk_forward_args<T> const& a) const {
    FPDT_TRY(maybe_fail(a.q_offset, a.k_offset, false));
    return inner.forward(a);
  }
  template <class T> [[nodiscard]] fpdt::status backward(fpdt::chunk_backward_args<T> const& a) const {
    FPDT_TRY(maybe_fail(a.q_offset, a.k_offset, true));
    return inner.backward(a);
  }
};
} // namespace

TEST_CASE("fpdt_attention: a chunk kernel's error or exception names the pass and the pair") {
  index_t const c = 8;
  attn_shape const s{4 * c, 4 * c, 4, 2, 16};
  auto p = random_problem<float>(s, 33);
  for (bool backward : {false, true})
    for (bool throws : {false, true}) {
      CAPTURE(backward);
      CAPTURE(throws);
      fpdt::host_backend be;
      failing_kernel k;
      k.c = c;
      k.in_backward = backward;
      k.throws = throws;
      fpdt::status err;
      (void)run_layer<float>(be, p, {.chunk = c}, k, &err);
      CHECK(err.code() == (throws ? fpdt::errc::backend_error : fpdt::errc::not_supported));
      std::string const want = std::string("chunk kernel ") + (backward ? "backward" : "forward") +
                               " at q_offset 16, k_offset 8: " + (throws ? "threw kernel exploded" : "kernel refuses");
      CHECK_MESSAGE(err.message().find(want) != std::string::npos, err.message());
      CHECK(be.device_memory().stats().live_allocations == 0);
    }
  // A source's exception is errc::backend_error too (errc::internal is for fpdt's own bugs).
  struct throwing_source {
    fpdt::status produce(index_t c, index_t, fpdt::tensor_view<float, 3> const&, fpdt::tensor_view<float, 3> const&,
                         fpdt::tensor_view<float, 3> const&) const {
      if (c == 1) throw std::runtime_error("projection exploded");
      return {};
    }
  };
  struct null_sink {
    fpdt::status consume(index_t, index_t, fpdt::tensor_view<float const, 3> const&,
                         fpdt::tensor_view<float const, 2> const&) {
      return {};
    }
  };
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, {.chunk = c}).value();
  null_sink snk;
  fpdt::status const st = layer.forward(throwing_source{}, snk);
  CHECK(st.code() == fpdt::errc::backend_error);
  CHECK(st.message().find("chunk source, chunk 1: threw projection exploded") != std::string::npos);
  // A failing dout source (on the h2d lane) is named once, with its own stream only, though the
  // compute lane's task that waited for it fails too.
  struct failing_dout {
    fpdt::status produce_dout(index_t c, index_t, fpdt::tensor_view<float, 3> const&) const {
      return c == 1 ? fpdt::make_error(fpdt::errc::invalid_argument, "my dout failed") : fpdt::status{};
    }
  };
  std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()), view(out, s.q_ext()))
              .ok());
  fpdt::tensor_gradient_sink grads{view(dq, s.q_ext()), view(dk, s.kv_ext()), view(dv, s.kv_ext())};
  fpdt::status const bst = layer.backward(failing_dout{}, grads);
  CHECK(bst.code() == fpdt::errc::invalid_argument);
  CHECK_MESSAGE(bst.message().find("dout source, chunk 1: my dout failed") != std::string::npos, bst.message());
  CHECK_MESSAGE(bst.message().find("task on stream '", 1) == std::string::npos, bst.message());
}

TEST_CASE("fpdt_attention: A12 the backward reads the chunk that was offloaded") {
  fpdt_test::a12::check([](problem<float> const& p, fpdt::fpdt_attention_options const& o,
                           fpdt_test::a12::recorder& rec) {
    fpdt::host_backend be;
    return run_layer<float>(be, p, o, recording_kernel{{1}, &rec});
  });
}

namespace {
// The host backend with a delay before every copy: copies race compute (CASES.md A18).
struct slow_copy_backend {
  using backend_tag = fpdt::backend_tag;
  using stream_type = fpdt::host::stream;
  using event_type = fpdt::host::event;
  static constexpr bool runs_host_tasks = true; // launch runs host tasks in order, as inner's
  fpdt::host_backend inner;
  std::chrono::microseconds delay{300};
  fpdt::result<stream_type> create_stream(fpdt::lane l) { return inner.create_stream(l); }
  fpdt::result<event_type> create_event() { return inner.create_event(); }
  fpdt::status record(event_type& e, stream_type& s) { return inner.record(e, s); }
  fpdt::status wait(stream_type& s, event_type const& e) { return inner.wait(s, e); }
  fpdt::status copy_async(void* d, void const* src, std::size_t n, stream_type& s) {
    auto const pause = delay;
    FPDT_TRY(inner.launch(s, [pause] { std::this_thread::sleep_for(pause); }));
    return inner.copy_async(d, src, n, s);
  }
  template <class F> fpdt::status launch(stream_type& s, F&& f) { return inner.launch(s, std::forward<F>(f)); }
  fpdt::status synchronize(stream_type& s) { return inner.synchronize(s); }
  fpdt::device_arena& device_memory() { return inner.device_memory(); }
  fpdt::pinned_pool& pinned_memory() { return inner.pinned_memory(); }
};
static_assert(fpdt::backend<slow_copy_backend>);
static_assert(fpdt::runs_host_tasks_in_order<slow_copy_backend>);
} // namespace

TEST_CASE("fpdt_attention: A18 copies racing compute give bit-identical results") {
  // 8 chunks with a delay on every copy; offload on must equal offload off bit for bit, every
  // iteration (the 200 iterations of 4 MiB chunks are scaled to fit CI's 2 cores).
  attn_shape const s{8 * 16, 8 * 16, 4, 2, 16};
  auto p = random_problem<float>(s, 18);
  fpdt::host_backend plain;
  run_options ro;
  ro.mask = fpdt::causal_mask;
  run_result const want = run_layer<float>(plain, p, {.chunk = 16, .offload = false});
  slow_copy_backend be;
  auto layer = fpdt::fpdt_attention<float, slow_copy_backend>::create(
                   be, {s.sq, s.h, s.hkv, s.d}, {.chunk = 16, .offload = true, .ring_slots = 2})
                   .value();
  for (int it = 0; it < 12; ++it) {
    be.delay = std::chrono::microseconds(it % 3 == 0 ? 0 : 100 * (it % 4));
    std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
    REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                          view(out, s.q_ext())).ok());
    REQUIRE(layer.backward(cview(p.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()),
                           view(dv, s.kv_ext())).ok());
    CHECK(out == want.out);
    CHECK(dq == want.dq);
    CHECK(dk == want.dk);
    CHECK(dv == want.dv);
  }
}

namespace {
// The host backend with a delay before every copy on the d2h lane only (CASES.md A27): offloads
// and write-backs finish late while fetches and compute run at once.
struct slow_offload_backend : slow_copy_backend {
  fpdt::status copy_async(void* d, void const* src, std::size_t n, stream_type& s) {
    if (s.name() == fpdt::to_string(fpdt::lane::d2h)) return slow_copy_backend::copy_async(d, src, n, s);
    return inner.copy_async(d, src, n, s);
  }
};
} // namespace

TEST_CASE("fpdt_attention: A27 every reload waits for its own offload") {
  // 8 chunks whose offloads (d2h) each sleep 2 ms before copying, reloaded as soon as the schedule
  // allows: with a full mask every q_i and k_j, v_j is fetched back right after its offload was
  // queued (ring 2, nothing prefetched ahead), and with ring 4 fetches run ahead of compute; the
  // backward re-reads dq_i and dout_i written back just before. Every result must equal offload
  // off bit for bit, from the first iteration (the case's 200 are scaled to CI's 2 cores).
  attn_shape const s{8 * 8, 8 * 8, 2, 1, 8};
  auto p = random_problem<float>(s, 27);
  for (fpdt::attention_mask m : {fpdt::full_mask, fpdt::causal_mask})
    for (index_t ring : {2, 4}) {
      CAPTURE(fpdt::to_string(m.kind));
      CAPTURE(ring);
      fpdt::host_backend plain;
      run_result const want = run_layer<float>(plain, p, {.chunk = 8, .offload = false, .mask = m});
      slow_offload_backend be;
      be.delay = std::chrono::milliseconds(2);
      auto layer = fpdt::fpdt_attention<float, slow_offload_backend>::create(
                       be, {s.sq, s.h, s.hkv, s.d}, {.chunk = 8, .offload = true, .ring_slots = ring, .mask = m})
                       .value();
      for (int it = 0; it < 3; ++it) {
        std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
        REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                              view(out, s.q_ext())).ok());
        REQUIRE(layer.backward(cview(p.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()),
                               view(dv, s.kv_ext())).ok());
        CHECK(out == want.out);
        CHECK(dq == want.dq);
        CHECK(dk == want.dk);
        CHECK(dv == want.dv);
      }
    }
}

TEST_CASE("fpdt_attention: A19 pinned memory does not grow from call to call") {
  fpdt::host_backend be;
  attn_shape const s{64, 64, 2, 1, 16};
  auto p = random_problem<float>(s, 19);
  auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, {.chunk = 16}).value();
  std::vector<float> out(s.q_size()), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
  fpdt::pinned_pool_stats first{};
  for (int it = 0; it < 100; ++it) {
    REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                          view(out, s.q_ext())).ok());
    REQUIRE(layer.backward(cview(p.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()),
                           view(dv, s.kv_ext())).ok());
    auto const st = be.pinned_memory().stats();
    if (it == 0) first = st;
    CHECK(st.upstream_allocations == first.upstream_allocations);
    CHECK(st.reserved_bytes == first.reserved_bytes);
  }
  CHECK(be.device_memory().stats().live_allocations == 0);
}

namespace {
// A memory resource that fails its n-th allocation (counting from 0) and counts live blocks.
struct failing_resource {
  int fail_at = -1;
  int calls = 0;
  int live = 0;
  static fpdt::result<void*> allocate(void* ctx, std::size_t bytes, std::size_t align) {
    auto* self = static_cast<failing_resource*>(ctx);
    if (self->calls++ == self->fail_at)
      return fpdt::make_error(fpdt::errc::out_of_memory, "injected failure of allocation ",
                              self->fail_at);
    ++self->live;
    return ::operator new(bytes, std::align_val_t{align});
  }
  static void deallocate(void* ctx, void* p, std::size_t, std::size_t align) noexcept {
    --static_cast<failing_resource*>(ctx)->live;
    ::operator delete(p, std::align_val_t{align});
  }
  fpdt::memory_resource resource(char const* name) { return {this, &allocate, &deallocate, name}; }
};
} // namespace

TEST_CASE("fpdt_attention: every failing allocation is a clear error and leaves outputs untouched") {
  attn_shape const s{32, 32, 2, 1, 8};
  auto p = random_problem<float>(s, 5);
  for (bool pinned : {false, true})
    for (bool offload : {true, false}) {
      if (pinned && !offload) continue; // no pinned memory without offload
      for (int n = 0;; ++n) {
        CAPTURE(pinned);
        CAPTURE(offload);
        CAPTURE(n);
        failing_resource dev, pin;
        (pinned ? pin : dev).fail_at = n;
        {
          fpdt::host_backend be({.device_upstream = dev.resource("device"),
                                 .pinned_upstream = pin.resource("pinned")});
          auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d},
                                                            {.chunk = 8, .offload = offload}).value();
          std::vector<float> out(s.q_size(), 7.0f), dq(s.q_size(), 7.0f), dk(s.kv_size(), 7.0f),
              dv(s.kv_size(), 7.0f);
          fpdt::status st = layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()),
                                          cview(p.v, s.kv_ext()), view(out, s.q_ext()));
          bool failed = !st.ok();
          if (failed) {
            for (float x : out)
              REQUIRE(x == 7.0f);
          } else {
            st = layer.backward(cview(p.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()),
                                view(dv, s.kv_ext()));
            failed = !st.ok();
            if (failed)
              for (auto const* g : {&dq, &dk, &dv})
                for (float x : *g)
                  REQUIRE(x == 7.0f);
          }
          if (failed) {
            CHECK(st.code() == fpdt::errc::out_of_memory);
            CHECK(st.message().find("injected failure of allocation") != std::string::npos);
            CHECK(st.message().find("device bytes") != std::string::npos); // says what it needs
            // and advises offload only when it is off
            CHECK((st.message().find("turn offload on") != std::string::npos) == !offload);
          }
          if (!failed) break; // every allocation of both passes has been failed once
        }
        CHECK(dev.live == 0); // nothing leaked once the backend is gone
        CHECK(pin.live == 0);
        REQUIRE(n < 200);
      }
    }
}

TEST_CASE_TEMPLATE("fpdt_attention: a pinned limit of host_bytes_reserved() is enough and one byte less is not", T,
                   float, fpdt::bfloat16) {
  // Small chunks: each chunk's copy of each tensor takes whole 4 KiB pages in the pool, so the
  // reserved bytes are well above host_bytes_needed(); the error must give the figure that
  // works. The second shape has copies of several pages that are not page multiples (and
  // tensors of both element sizes in bf16).
  struct shape_case {
    attn_shape s;
    index_t c;
  };
  for (shape_case const sc : {shape_case{{64, 64, 4, 2, 8}, 16}, shape_case{{90, 90, 6, 3, 40}, 30}}) {
    attn_shape const& s = sc.s;
    CAPTURE(s.h);
    auto p = random_problem<T>(s, 35);
    fpdt::fpdt_attention_options const o{.chunk = sc.c};
    fpdt::host_backend probe;
    auto layer = fpdt::fpdt_attention<T>::create(probe, {s.sq, s.h, s.hkv, s.d}, o).value();
    std::size_t const reserved = layer.host_bytes_reserved();
    if (sc.c == 16) {
      CHECK(reserved == 4 * 7 * fpdt::pinned_pool::granularity); // 4 chunks, 7 tensors, a page each
      CHECK(layer.host_bytes_needed() < reserved / 2);
    }
    fpdt::status err;
    {
      fpdt::host_backend be({.pinned_limit_bytes = reserved});
      (void)run_layer<T>(be, p, o, fpdt::host_chunk_kernel{}, &err);
      CHECK_MESSAGE(err.ok(), err.to_string());
      CHECK(be.pinned_memory().stats().peak_reserved_bytes == reserved);
    }
    fpdt::host_backend be({.pinned_limit_bytes = reserved - 1});
    (void)run_layer<T>(be, p, o, fpdt::host_chunk_kernel{}, &err);
    CHECK(err.code() == fpdt::errc::out_of_memory);
    CHECK_MESSAGE(err.message().find(" and " + std::to_string(reserved) +
                                     " pinned host bytes as the pool reserves them (host_bytes_reserved(); "
                                     "host_bytes_needed() = " + std::to_string(layer.host_bytes_needed())) !=
                      std::string::npos,
                  err.message());
    CHECK(err.message().find("not the pinned ones, which hold all S tokens") != std::string::npos);
  }
}

TEST_CASE("fpdt_attention: argument errors name the numbers") {
  fpdt::host_backend be;
  auto contains = [](std::string const& a, std::string const& b) { return a.find(b) != std::string::npos; };
  auto e = fpdt::fpdt_attention<float>::create(be, {48, 4, 2, 8}, {.chunk = 20}).error();
  CHECK(e.code() == fpdt::errc::invalid_argument);
  CHECK(contains(e.message(), "S = 48 is not a multiple of the chunk C = 20"));
  e = fpdt::fpdt_attention<float>::create(be, {48, 6, 4, 8}, {.chunk = 16}).error();
  CHECK(contains(e.message(), "H = 6 must be a multiple of H_kv = 4"));
  e = fpdt::fpdt_attention<float>::create(be, {48, 4, 2, 8}, {.chunk = 16, .ring_slots = 1}).error();
  CHECK(contains(e.message(), "ring_slots = 1"));
  e = fpdt::fpdt_attention<float>::create(be, {48, 4, 2, 8}, {.chunk = 16, .offload = false, .ring_slots = -3}).error();
  CHECK(contains(e.message(), "ring_slots = -3"));
  e = fpdt::fpdt_attention<float>::create(be, {48, 4, 2, 8}, {.chunk = 16, .scale = std::nanf("")}).error();
  CHECK(contains(e.message(), "softmax scale nan is not finite"));
  e = fpdt::fpdt_attention<float>::create(be, {0, 4, 2, 8}).error();
  CHECK(contains(e.message(), "S = 0"));
  auto layer = fpdt::fpdt_attention<float>::create(be, {16, 2, 1, 8}, {.chunk = 8}).value();
  std::vector<float> x(16 * 2 * 8), y(16 * 8), g(16 * 2 * 8);
  auto q = fpdt::contiguous_view<float const>(x.data(), std::array<index_t, 3>{16, 2, 8}).value();
  auto kv = fpdt::contiguous_view<float const>(y.data(), std::array<index_t, 3>{16, 1, 8}).value();
  auto dq = fpdt::contiguous_view(g.data(), std::array<index_t, 3>{16, 2, 8}).value();
  auto dk = fpdt::contiguous_view(y.data(), std::array<index_t, 3>{16, 1, 8}).value();
  std::vector<float> w(16 * 8);
  auto dv = fpdt::contiguous_view(w.data(), std::array<index_t, 3>{16, 1, 8}).value();
  e = layer.backward(q, dq, dk, dv);
  CHECK(contains(e.message(), "no successful forward"));
  e = layer.forward(q, q, kv, dq);
  CHECK(e.code() == fpdt::errc::shape_mismatch);
  CHECK(contains(e.message(), "k [16, 2, 8] must be [16, 1, 8]"));
  e = fpdt::fpdt_attention<float>::create(be, {48, 4, 2, 8}, {.chunk = -16}).error();
  CHECK(e.code() == fpdt::errc::invalid_argument);
  CHECK(contains(e.message(), "chunk C = -16 must be >= 1 (or 0: C = S)"));
}

TEST_CASE("fpdt_attention: outputs that share memory with inputs or each other are rejected untouched") {
  // With GQA an out [S, H, D] over the memory of k [S, H_kv, D] has its chunk i over k's chunks
  // 2i and 2i + 1: writing out chunk by chunk would change keys not yet read (a silently wrong
  // output before this check). Every overlap is an error before anything runs.
  fpdt::host_backend be;
  index_t const s = 16, h = 2, hkv = 1, d = 8;
  auto layer = fpdt::fpdt_attention<float>::create(be, {s, h, hkv, d}, {.chunk = 8}).value();
  auto fill = [](std::vector<float>& x, float base) {
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = base + 0.01f * static_cast<float>(i % 97);
  };
  std::vector<float> qb(s * h * d), kb(2 * s * h * d), vb(s * hkv * d), ob(s * h * d), lb(h * s);
  fill(qb, 0.5f);
  fill(kb, -0.25f);
  fill(vb, 1.0f);
  std::array<index_t, 3> const qe{s, h, d}, ke{s, hkv, d};
  auto q = fpdt::contiguous_view(qb.data(), qe).value();
  auto k = fpdt::contiguous_view(kb.data(), ke).value();
  auto v = fpdt::contiguous_view<float const>(vb.data(), ke).value();
  auto out_on_k = fpdt::contiguous_view(kb.data(), qe).value();
  auto out = fpdt::contiguous_view(ob.data(), qe).value();
  auto lse = fpdt::contiguous_view(lb.data(), std::array<index_t, 2>{h, s}).value();
  auto lse_on_out = fpdt::contiguous_view(ob.data() + 8, std::array<index_t, 2>{h, s}).value();
  auto const kb0 = kb, qb0 = qb;
  auto contains = [](std::string const& a, std::string const& b) { return a.find(b) != std::string::npos; };
  fpdt::status e = layer.forward(q, k, v, out_on_k);
  CHECK(e.code() == fpdt::errc::invalid_argument);
  CHECK(contains(e.message(), "output out overlaps input k"));
  e = layer.forward(q, k, v, q); // in place
  CHECK(contains(e.message(), "output out overlaps input q"));
  e = layer.forward(q, k, v, out, lse_on_out);
  CHECK(contains(e.message(), "outputs out and lse overlap"));
  CHECK(kb == kb0);
  CHECK(qb == qb0);
  // Apart, including an out right after k's last element: fine.
  auto out_after_k = fpdt::contiguous_view(kb.data() + s * hkv * d, qe).value();
  REQUIRE(layer.forward(q, k, v, out_after_k, lse).ok());
  // Backward: dq, dk, dv apart from dout and from each other.
  std::vector<float> db(s * h * d), gq(s * h * d), gk(s * hkv * d), gv(s * hkv * d);
  fill(db, 0.1f);
  auto dout = fpdt::contiguous_view<float const>(db.data(), qe).value();
  auto dq = fpdt::contiguous_view(gq.data(), qe).value();
  auto dk = fpdt::contiguous_view(gk.data(), ke).value();
  auto dv = fpdt::contiguous_view(gv.data(), ke).value();
  auto dq_on_dout = fpdt::contiguous_view(db.data(), qe).value();
  auto const db0 = db;
  e = layer.backward(dout, dq_on_dout, dk, dv);
  CHECK(contains(e.message(), "output dq overlaps input dout"));
  e = layer.backward(dout, dq, dk, dk);
  CHECK(contains(e.message(), "outputs dk and dv overlap"));
  auto dv_in_dq = fpdt::contiguous_view(gq.data() + 3, ke).value();
  e = layer.backward(dout, dq, dk, dv_in_dq);
  CHECK(contains(e.message(), "outputs dq and dv overlap"));
  CHECK(db == db0);
  REQUIRE(layer.backward(dout, dq, dk, dv).ok()); // the rejections left the saved forward usable
  // dq, dk, dv as head slices of one fused gradient [S, H + 2 H_kv, D] share no element: accepted,
  // with the same gradients.
  std::vector<float> fused(static_cast<std::size_t>(s * (h + 2 * hkv) * d), 7.0f);
  auto g = fpdt::contiguous_view(fused.data(), std::array<index_t, 3>{s, h + 2 * hkv, d}).value();
  fpdt::status const fs = layer.backward(dout, g.slice(1, 0, h).value(), g.slice(1, h, h + hkv).value(),
                                         g.slice(1, h + hkv, h + 2 * hkv).value());
  REQUIRE_MESSAGE(fs.ok(), fs.to_string());
  for (index_t t = 0; t < s; ++t)
    for (index_t x = 0; x < d; ++x) {
      for (index_t hh = 0; hh < h; ++hh) CHECK(g(t, hh, x) == dq(t, hh, x));
      CHECK(g(t, h, x) == dk(t, 0, x));
      CHECK(g(t, h + 1, x) == dv(t, 0, x));
    }
}

TEST_CASE("fpdt_attention: the trace shows copies overlapping compute") {
  fpdt::host_backend be;
  attn_shape const s{128, 128, 4, 2, 32};
  auto p = random_problem<float>(s, 3);
  auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, {.chunk = 16}).value();
  std::vector<float> out(s.q_size());
  REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                        view(out, s.q_ext())).ok());
  fpdt::pipeline_trace const& t = layer.trace();
  CHECK(t.events.size() == layer.forward_plan().steps.size() -
                               layer.forward_plan().count(fpdt::step_kind::release));
  CHECK(t.busy_us(fpdt::lane::compute) > 0);
  CHECK(t.busy_us(fpdt::lane::h2d) > 0);
  CHECK(t.busy_us(fpdt::lane::d2h) > 0);
  std::string const path = "fpdt_attention_trace_test.json";
  REQUIRE(t.write_chrome_json(path).ok());
  std::remove(path.c_str());
}

namespace {
// Callbacks in both forms (chunk_source): the stream form must be the one called, on the thread
// that enqueues the pass, in chunk order; the plain form fails if it is ever called.
using host_ops = fpdt::attention_step_ops<fpdt::host_backend>;
struct two_form_source {
  fpdt::host_backend* be;
  fpdt::tensor_view<float const, 3> q, k, v;
  std::thread::id const* caller;
  std::vector<index_t>* order;
  fpdt::status produce(index_t, index_t, fpdt::tensor_view<float, 3> const&,
                       fpdt::tensor_view<float, 3> const&, fpdt::tensor_view<float, 3> const&) const {
    return fpdt::make_error(fpdt::errc::internal, "plain form called");
  }
  fpdt::status produce(index_t c, index_t first, fpdt::tensor_view<float, 3> const& qc,
                       fpdt::tensor_view<float, 3> const& kc, fpdt::tensor_view<float, 3> const& vc,
                       fpdt::host::stream& s) const {
    if (std::this_thread::get_id() != *caller)
      return fpdt::make_error(fpdt::errc::internal, "stream form called on another thread");
    order->push_back(c);
    FPDT_TRY(host_ops::copy_rows(*be, s, q, first, qc, 0, qc.extent(0)));
    FPDT_TRY(host_ops::copy_rows(*be, s, k, first, kc, 0, kc.extent(0)));
    return host_ops::copy_rows(*be, s, v, first, vc, 0, vc.extent(0));
  }
};
struct stream_sink {
  fpdt::host_backend* be;
  fpdt::tensor_view<float, 3> out;
  fpdt::status consume(index_t, index_t first, fpdt::tensor_view<float const, 3> const& o,
                       fpdt::tensor_view<float const, 2> const&, fpdt::host::stream& s) {
    return host_ops::copy_rows(*be, s, o, 0, out, first, o.extent(0));
  }
};
struct stream_dout {
  fpdt::host_backend* be;
  fpdt::tensor_view<float const, 3> dout;
  fpdt::status produce_dout(index_t, index_t first, fpdt::tensor_view<float, 3> const& d,
                            fpdt::host::stream& s) const {
    return host_ops::copy_rows(*be, s, dout, first, d, 0, d.extent(0));
  }
};
// dq in the stream form, dk/dv in the plain form: each member may take either.
struct mixed_gradient_sink {
  fpdt::host_backend* be;
  fpdt::tensor_view<float, 3> dq, dk, dv;
  fpdt::status consume_dq(index_t, index_t first, fpdt::tensor_view<float const, 3> const& g,
                          fpdt::host::stream& s) {
    return host_ops::copy_rows(*be, s, g, 0, dq, first, g.extent(0));
  }
  fpdt::status consume_dkv(index_t, index_t first, fpdt::tensor_view<float const, 3> const& gk,
                           fpdt::tensor_view<float const, 3> const& gv) {
    fpdt::detail::layer::copy_rows(gk, 0, dk, first, gk.extent(0));
    fpdt::detail::layer::copy_rows(gv, 0, dv, first, gv.extent(0));
    return {};
  }
};
static_assert(fpdt::chunk_source<two_form_source, float>);
static_assert(fpdt::chunk_sink<stream_sink, float>);
static_assert(fpdt::dout_source<stream_dout, float>);
static_assert(fpdt::gradient_sink<mixed_gradient_sink>);
static_assert(!fpdt::chunk_sink<stream_sink, float, int>); // the stream type must match
} // namespace

TEST_CASE("fpdt_attention: the backward asks the dout source once per chunk, in order, offload on or off") {
  // With offload, dout_i is written to host with dq_i at its first use and fetched from there by
  // later pairs: the caller's source (on P ranks, dout's all-to-all) runs u times, not once per
  // pair. The gradients stay those of float64.
  fpdt::host_backend be;
  attn_shape const s{32, 32, 4, 2, 8};
  auto p = random_problem<float>(s, 91);
  struct counting_dout {
    fpdt::tensor_view<float const, 3> dout;
    std::vector<index_t>* calls;
    fpdt::status produce_dout(index_t c, index_t first, fpdt::tensor_view<float, 3> const& d) const {
      calls->push_back(c);
      fpdt::detail::layer::copy_rows(dout, first, d, 0, d.extent(0));
      return {};
    }
  };
  for (bool offload : {true, false})
    for (bool causal : {true, false}) {
      CAPTURE(offload);
      CAPTURE(causal);
      fpdt::fpdt_attention_options o{.chunk = 8, .offload = offload, .mask = causal ? fpdt::causal_mask : fpdt::full_mask};
      auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, o, fpdt::host_chunk_kernel{1});
      REQUIRE(layer.ok());
      run_result r;
      r.out.assign(s.q_size(), fnan);
      r.dq.assign(s.q_size(), fnan);
      r.dk.assign(s.kv_size(), fnan);
      r.dv.assign(s.kv_size(), fnan);
      r.lse.assign(s.lse_size(), fnan);
      REQUIRE(layer->forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                             view(r.out, s.q_ext()), view(r.lse, s.lse_ext())).ok());
      std::vector<index_t> calls;
      counting_dout src{cview(p.dout, s.q_ext()), &calls};
      fpdt::tensor_gradient_sink gs{view(r.dq, s.q_ext()), view(r.dk, s.kv_ext()), view(r.dv, s.kv_ext())};
      fpdt::status const st = layer->backward(src, gs);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      CHECK(calls == std::vector<index_t>{0, 1, 2, 3});
      run_options ro;
      ro.mask = o.mask;
      check_against_reference(r, reference_of(p, ro), p, 1e-4);
    }
}

TEST_CASE("fpdt_attention: stream-form sources and sinks run at enqueue time and equal the plain form") {
  fpdt::host_backend be;
  attn_shape const s{32, 32, 4, 2, 16};
  auto p = random_problem<float>(s, 77);
  for (bool offload : {true, false}) {
    CAPTURE(offload);
    fpdt::fpdt_attention_options o;
    o.chunk = 8;
    o.offload = offload;
    run_result const plain = run_layer<float>(be, p, o);
    auto layer = fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, o);
    REQUIRE(layer.ok());
    std::thread::id const me = std::this_thread::get_id();
    std::vector<index_t> order;
    std::vector<float> out(s.q_size(), fnan), dq(s.q_size(), fnan), dk(s.kv_size(), fnan),
        dv(s.kv_size(), fnan);
    two_form_source src{&be, cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                        &me, &order};
    stream_sink snk{&be, view(out, s.q_ext())};
    fpdt::status st = layer->forward(src, snk);
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    CHECK(order == std::vector<index_t>{0, 1, 2, 3});
    CHECK(out == plain.out); // same kernel, same order: bit for bit
    stream_dout dsrc{&be, cview(p.dout, s.q_ext())};
    mixed_gradient_sink gsnk{&be, view(dq, s.q_ext()), view(dk, s.kv_ext()), view(dv, s.kv_ext())};
    st = layer->backward(dsrc, gsnk);
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    CHECK(dq == plain.dq);
    CHECK(dk == plain.dk);
    CHECK(dv == plain.dv);
  }
}

TEST_CASE("fpdt_attention: a backend without host tasks runs through attention_step_ops with an event-timed trace") {
  // device_like_backend (tests/backend/device_like_backend.hpp) is what fpdt sees of a GPU
  // backend: the layer must use its attention_step_ops specialization and stream-form callbacks,
  // and the executor times steps with events. Same kernel and order: equal to the host bit for bit.
  attn_shape const s{48, 48, 4, 2, 16};
  auto p = random_problem<float>(s, 5);
  for (bool offload : {true, false}) {
    CAPTURE(offload);
    fpdt::fpdt_attention_options o;
    o.chunk = 12;
    o.offload = offload;
    fpdt::host_backend hb;
    run_result const want = run_layer<float>(hb, p, o);
    fpdt_test::device_like_backend be;
    run_result const got = run_layer<float>(be, p, o);
    CHECK(got.out == want.out);
    CHECK(got.lse == want.lse);
    CHECK(got.dq == want.dq);
    CHECK(got.dk == want.dk);
    CHECK(got.dv == want.dv);
    auto layer = fpdt::fpdt_attention<float, fpdt_test::device_like_backend>::create(
                     be, {s.sq, s.h, s.hkv, s.d}, o).value();
    std::vector<float> out(s.q_size());
    REQUIRE(layer.forward(cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()),
                          view(out, s.q_ext())).ok());
    auto const& ev = layer.trace().events;
    REQUIRE(ev.size() > 0);
    std::size_t timed = 0, compute = 0;
    for (auto const& e : ev) {
      timed += e.begin_us >= 0 && e.end_us >= e.begin_us;
      compute += e.on == fpdt::lane::compute;
    }
    CHECK(timed == ev.size());
    CHECK(compute > 0);
    CHECK(layer.trace().busy_us(fpdt::lane::compute) > 0);
  }
}

TEST_CASE_TEMPLATE("fpdt_attention: forwards in flight each keep their own context, and each backward its own gradients", T,
                   float, fpdt::bfloat16) {
  // Found by wrapping the layer in an autograd function: a second forward before the first
  // backward replaced the saved state, and that backward returned the second forward's
  // gradients. With contexts, two micro-batches interleave and each gets its own, bit for bit
  // those of a forward and backward run alone.
  for (bool offload : {true, false}) {
    CAPTURE(offload);
    fpdt::host_backend be;
    attn_shape const s{32, 32, 4, 2, 8};
    auto const a = random_problem<T>(s, 11), b = random_problem<T>(s, 12);
    fpdt::fpdt_attention_options o;
    o.chunk = 8;
    o.offload = offload;
    run_result const alone_a = run_layer<T>(be, a, o), alone_b = run_layer<T>(be, b, o);
    auto layer = fpdt::fpdt_attention<T>::create(be, {s.sq, s.h, s.hkv, s.d}, o).value();
    fpdt::attention_context ca, cb;
    CHECK_FALSE(ca.ready());
    std::vector<T> out_a(s.q_size()), out_b(s.q_size());
    REQUIRE(layer.forward(ca, cview(a.q, s.q_ext()), cview(a.k, s.kv_ext()), cview(a.v, s.kv_ext()), view(out_a, s.q_ext())).ok());
    REQUIRE(layer.forward(cb, cview(b.q, s.q_ext()), cview(b.k, s.kv_ext()), cview(b.v, s.kv_ext()), view(out_b, s.q_ext())).ok());
    CHECK(ca.ready());
    CHECK(cb.ready());
    CHECK(ca.host_bytes() == (offload ? layer.host_bytes_reserved() : 0));
    CHECK((ca.device_bytes() > 0) == !offload); // without offload the forward's rings stay on the device
    auto grads = [&](fpdt::attention_context& c, problem<T> const& p) {
      run_result r;
      r.dq.assign(s.q_size(), fnan);
      r.dk.assign(s.kv_size(), fnan);
      r.dv.assign(s.kv_size(), fnan);
      fpdt::status const st = layer.backward(c, cview(p.dout, s.q_ext()), view(r.dq, s.q_ext()),
                                             view(r.dk, s.kv_ext()), view(r.dv, s.kv_ext()));
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      return r;
    };
    run_result const ga = grads(ca, a); // the first forward's backward runs after the second forward
    run_result const gb = grads(cb, b);
    for (std::size_t i = 0; i < out_a.size(); ++i) {
      CHECK(static_cast<float>(out_a[i]) == alone_a.out[i]);
      CHECK(static_cast<float>(out_b[i]) == alone_b.out[i]);
    }
    CHECK(ga.dq == alone_a.dq);
    CHECK(ga.dk == alone_a.dk);
    CHECK(ga.dv == alone_a.dv);
    CHECK(gb.dq == alone_b.dq);
    CHECK(gb.dk == alone_b.dk);
    CHECK(gb.dv == alone_b.dv);
    CHECK(ga.dq != gb.dq);
    // A context is consumed: its memory is back and a second backward is refused by name.
    CHECK_FALSE(ca.ready());
    CHECK(ca.host_bytes() == 0);
    CHECK(ca.device_bytes() == 0);
    std::vector<float> dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size());
    auto again = [&](fpdt::attention_context& c, decltype(layer)& l) {
      return l.backward(c, cview(a.dout, s.q_ext()), view(dq, s.q_ext()), view(dk, s.kv_ext()), view(dv, s.kv_ext()));
    };
    fpdt::status st = again(ca, layer);
    CHECK(st.code() == fpdt::errc::invalid_argument);
    CHECK(st.message().find("already ran") != std::string::npos);
    fpdt::attention_context empty;
    st = again(empty, layer);
    CHECK(st.message().find("no successful forward") != std::string::npos);
    // A context from another layer (even one of the same shape) is refused.
    auto other = fpdt::fpdt_attention<T>::create(be, {s.sq, s.h, s.hkv, s.d}, o).value();
    fpdt::attention_context co;
    REQUIRE(other.forward(co, cview(a.q, s.q_ext()), cview(a.k, s.kv_ext()), cview(a.v, s.kv_ext()), view(out_a, s.q_ext())).ok());
    st = again(co, layer);
    CHECK(st.message().find("another layer") != std::string::npos);
    CHECK(co.ready()); // refused without touching it
    CHECK(again(co, other).ok());
    // A layer destroyed and another made in its place (very likely at the same addresses) is
    // another layer: the dead layer's context is refused, not read with the new one's buffers.
    fpdt::attention_context orphan;
    {
      auto gone = fpdt::fpdt_attention<T>::create(be, {s.sq, s.h, s.hkv, s.d}, o).value();
      REQUIRE(gone.forward(orphan, cview(a.q, s.q_ext()), cview(a.k, s.kv_ext()), cview(a.v, s.kv_ext()), view(out_a, s.q_ext())).ok());
    }
    auto successor = fpdt::fpdt_attention<T>::create(be, {s.sq, s.h, s.hkv, s.d}, o).value();
    CHECK_FALSE(successor.owns(orphan));
    st = again(orphan, successor);
    CHECK(st.message().find("another layer") != std::string::npos);
    orphan.clear();
    CHECK(orphan.host_bytes() == 0);
    // A moved-from context is empty; an out-of-memory error before the backward's first step
    // leaves the context ready, so the backward can be retried once memory is back.
    REQUIRE(layer.forward(cb, cview(b.q, s.q_ext()), cview(b.k, s.kv_ext()), cview(b.v, s.kv_ext()), view(out_b, s.q_ext())).ok());
    fpdt::attention_context moved_to = std::move(cb);
    CHECK_FALSE(cb.ready());
    CHECK(cb.host_bytes() == 0);
    CHECK(moved_to.ready());
    CHECK(again(moved_to, layer).ok());
    CHECK_FALSE(moved_to.ready());
    {
      fpdt::host_backend tight({.device_budget_bytes = std::size_t{1} << 20});
      auto small = fpdt::fpdt_attention<T>::create(tight, {s.sq, s.h, s.hkv, s.d}, o).value();
      fpdt::attention_context cr;
      REQUIRE(small.forward(cr, cview(a.q, s.q_ext()), cview(a.k, s.kv_ext()), cview(a.v, s.kv_ext()), view(out_a, s.q_ext())).ok());
      {
        auto const ms = tight.device_memory().stats();
        auto hog = tight.device_memory().allocate(ms.budget_bytes - ms.current_bytes - 256, "hog");
        REQUIRE(hog.ok());
        st = again(cr, small);
        CHECK(st.code() == fpdt::errc::out_of_memory);
        CHECK(cr.ready());
      }
      CHECK(again(cr, small).ok());
      CHECK(dq == alone_a.dq);
      CHECK_FALSE(cr.ready());
    }
    // A layer moved keeps its identity: its contexts stay valid.
    REQUIRE(layer.forward(ca, cview(a.q, s.q_ext()), cview(a.k, s.kv_ext()), cview(a.v, s.kv_ext()), view(out_a, s.q_ext())).ok());
    auto moved = std::move(layer);
    CHECK(again(ca, moved).ok());
    CHECK(dq == alone_a.dq);
  }
}

namespace {
// Threads of this process (Linux: /proc/self/task), or -1 where that cannot be read.
long process_threads() {
  std::error_code ec;
  long n = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/task", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++n;
  return ec || n == 0 ? -1 : n;
}
} // namespace

TEST_CASE("fpdt_attention: layers sharing the caller's lanes add no threads and give the same results") {
  // A 4-layer model on the host backend: with lanes of their own every layer starts 4 worker
  // threads (one per lane); on one shared executor the model has 4, whatever its layer count.
  attn_shape const s{32, 32, 4, 2, 8};
  auto const p = random_problem<float>(s, 31);
  fpdt::fpdt_attention_options o;
  o.chunk = 8;
  auto run_model = [&](bool shared, long& threads_added) {
    fpdt::host_backend be;
    long const before = process_threads();
    auto lanes = fpdt::executor<fpdt::host_backend>::create(be).value();
    std::vector<fpdt::fpdt_attention<float>> layers;
    for (int l = 0; l < 4; ++l) {
      layers.push_back(fpdt::fpdt_attention<float>::create(be, {s.sq, s.h, s.hkv, s.d}, o).value());
      if (shared) layers.back().run_on(lanes);
    }
    std::vector<run_result> rs;
    for (auto& layer : layers) {
      run_result r;
      std::vector<float> out(s.q_size());
      r.dq.assign(s.q_size(), fnan);
      r.dk.assign(s.kv_size(), fnan);
      r.dv.assign(s.kv_size(), fnan);
      fpdt::attention_context ctx;
      REQUIRE(layer.forward(ctx, cview(p.q, s.q_ext()), cview(p.k, s.kv_ext()), cview(p.v, s.kv_ext()), view(out, s.q_ext())).ok());
      REQUIRE(layer.backward(ctx, cview(p.dout, s.q_ext()), view(r.dq, s.q_ext()), view(r.dk, s.kv_ext()), view(r.dv, s.kv_ext())).ok());
      r.out = out;
      rs.push_back(std::move(r));
    }
    long const after = process_threads();
    threads_added = before < 0 || after < 0 ? -1 : after - before;
    return rs;
  };
  long own_threads = 0, shared_threads = 0;
  (void)run_model(false, own_threads); // warm-up: any thread pool of the kernels exists from here on
  auto const own = run_model(false, own_threads);
  auto const shared = run_model(true, shared_threads);
  for (std::size_t l = 0; l < own.size(); ++l) {
    CHECK(shared[l].out == own[l].out);
    CHECK(shared[l].dq == own[l].dq);
    CHECK(shared[l].dk == own[l].dk);
    CHECK(shared[l].dv == own[l].dv);
  }
  if (own_threads < 0) {
    MESSAGE("/proc/self/task is not readable here: thread counts not checked");
  } else {
    MESSAGE("threads of a 4-layer model: own lanes +", own_threads, ", shared lanes +", shared_threads);
    CHECK(shared_threads == 4);          // the shared executor's lanes
    CHECK(own_threads == 4 + 4 * 4);     // the (unused) executor and 4 per layer
  }
}
