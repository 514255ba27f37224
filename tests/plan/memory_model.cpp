// Tests of include/fpdt/plan/memory_model.hpp: the FPDT attention working set equals the layer's
// prediction and the host backend's measured arena peak (the issue asks for 5%; it is exact);
// parameter counts of the presets; memory grows with S; errors name the values.
#include <fpdt/layers/fpdt_attention.hpp>
#include <fpdt/layers/host_defaults.hpp>
#include <fpdt/plan/memory_model.hpp>
#include <fpdt/plan/presets.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

using fpdt::index_t;

namespace {

struct shape {
  index_t s, h, hkv, d, c;
  bool offload;
};

// Runs forward and backward of fpdt_attention<T> on zeros and checks the model's working set
// against the layer's prediction and the arena's measured peaks.
template <class T> void check_against_layer(shape const& x) {
  INFO("S ", x.s, " H ", x.h, " H_kv ", x.hkv, " D ", x.d, " C ", x.c, " offload ", x.offload,
       " dtype bytes ", sizeof(T));
  auto model = fpdt::fpdt_attention_memory(x.s, x.h, x.hkv, x.d, x.c, x.offload, 2,
                                           static_cast<index_t>(sizeof(T)));
  REQUIRE_MESSAGE(model.ok(), model.error().to_string());
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<T>::create(be, {x.s, x.h, x.hkv, x.d},
                                               {.chunk = x.c, .offload = x.offload});
  REQUIRE_MESSAGE(layer.ok(), layer.error().to_string());
  CHECK(model->forward == layer->predicted_forward_bytes());
  CHECK(model->backward == layer->predicted_backward_bytes());
  CHECK(model->host == layer->host_bytes_reserved());
  auto const qn = static_cast<std::size_t>(x.s * x.h * x.d), kvn = static_cast<std::size_t>(x.s * x.hkv * x.d);
  std::vector<T> q(qn, T(0.0f)), k(kvn, T(0.0f)), v(kvn, T(0.0f)), out(qn, T(0.0f)), dout(qn, T(0.0f));
  std::vector<float> dq(qn), dk(kvn), dv(kvn);
  auto cv = [](std::vector<T> const& b, index_t h, index_t s, index_t d) {
    return fpdt::contiguous_view<T const, 3>(b.data(), {s, h, d}).value();
  };
  REQUIRE(layer->forward(cv(q, x.h, x.s, x.d), cv(k, x.hkv, x.s, x.d), cv(v, x.hkv, x.s, x.d),
                         fpdt::contiguous_view<T, 3>(out.data(), {x.s, x.h, x.d}).value()).ok());
  double const fwd_peak = static_cast<double>(be.device_memory().stats().peak_bytes);
  be.device_memory().reset_peak();
  REQUIRE(layer->backward(cv(dout, x.h, x.s, x.d),
                          fpdt::contiguous_view<float, 3>(dq.data(), {x.s, x.h, x.d}).value(),
                          fpdt::contiguous_view<float, 3>(dk.data(), {x.s, x.hkv, x.d}).value(),
                          fpdt::contiguous_view<float, 3>(dv.data(), {x.s, x.hkv, x.d}).value()).ok());
  double const bwd_peak = static_cast<double>(be.device_memory().stats().peak_bytes);
  CHECK(static_cast<double>(model->forward) == doctest::Approx(fwd_peak).epsilon(0.05));
  CHECK(static_cast<double>(model->backward) == doctest::Approx(bwd_peak).epsilon(0.05));
}

// One problem of the sweep below: the planner's figures for it (fpdt_attention_memory of the
// P-rank problem), then one rank's layer run on zeros with the host backend, whose arena and
// pinned pool measure what it really held.
template <class T> void check_problem_against_layer(fpdt::attention_problem const& problem) {
  fpdt::attention_working_set const model = fpdt::fpdt_attention_memory(problem);
  fpdt::attention_problem const r = problem.per_rank();
  index_t const s = r.sequence(), h = r.local_heads(), hkv = r.local_kv_heads(), d = r.head_dim();
  fpdt::host_backend be;
  auto layer = fpdt::fpdt_attention<T>::create(
      be, {s, h, hkv, d},
      {.chunk = r.chunk(), .offload = r.offload(), .ring_slots = r.args().ring_slots, .mask = r.mask()});
  REQUIRE_MESSAGE(layer.ok(), layer.error().to_string());
  auto const qn = static_cast<std::size_t>(s * h * d), kvn = static_cast<std::size_t>(s * hkv * d);
  std::vector<T> q(qn, T(0.0f)), k(kvn, T(0.0f)), v(kvn, T(0.0f)), out(qn, T(0.0f)), dout(qn, T(0.0f));
  std::vector<float> dq(qn), dk(kvn), dv(kvn);
  auto in = [&](std::vector<T> const& b, index_t heads) {
    return fpdt::contiguous_view<T const, 3>(b.data(), {s, heads, d}).value();
  };
  auto grad = [&](std::vector<float>& b, index_t heads) {
    return fpdt::contiguous_view<float, 3>(b.data(), {s, heads, d}).value();
  };
  REQUIRE(layer->forward(in(q, h), in(k, hkv), in(v, hkv), fpdt::contiguous_view<T, 3>(out.data(), {s, h, d}).value()).ok());
  std::size_t const fwd_peak = be.device_memory().stats().peak_bytes;
  be.device_memory().reset_peak();
  REQUIRE(layer->backward(in(dout, h), grad(dq, h), grad(dk, hkv), grad(dv, hkv)).ok());
  CHECK(model.forward == fwd_peak);
  CHECK(model.backward == be.device_memory().stats().peak_bytes);
  CHECK(model.host == be.pinned_memory().stats().peak_reserved_bytes);
}

fpdt::model_config llama8b() { return fpdt::find_model_preset("llama3-8b").value(); }

} // namespace

TEST_CASE("memory_model: FPDT attention working set equals the layer's measured arena peak") {
  for (shape const& x : {shape{256, 4, 2, 16, 64, true}, shape{512, 8, 8, 32, 64, true},
                         shape{384, 4, 1, 16, 128, true}, shape{256, 4, 2, 16, 64, false},
                         shape{128, 2, 2, 64, 128, false}}) {
    check_against_layer<float>(x);
    check_against_layer<fpdt::bfloat16>(x);
  }
}

TEST_CASE("memory_model: with offload the attention working set does not depend on S") {
  auto a = fpdt::fpdt_attention_memory(index_t{1} << 16, 8, 2, 128, 4096, true, 2, 2).value();
  auto b = fpdt::fpdt_attention_memory(index_t{1} << 22, 8, 2, 128, 4096, true, 2, 2).value();
  CHECK(a.forward == b.forward);
  CHECK(a.backward == b.backward);
  CHECK(b.host == 64 * a.host); // the host copies grow with S instead
  auto c = fpdt::fpdt_attention_memory(index_t{1} << 16, 8, 2, 128, 4096, false, 2, 2).value();
  CHECK(c.forward > 4 * a.forward);
  CHECK(c.host == 0);
}

TEST_CASE("memory_model: parameter counts of the presets match their published sizes") {
  struct want {
    char const* name;
    double billions;
  } const ws[] = {{"gpt-2.7b", 2.7}, {"gpt-6.7b", 6.7}, {"gpt-13b", 13.0},
                  {"gpt-30b", 30.0}, {"llama3-8b", 8.03}, {"llama3-70b", 70.6}};
  for (auto const& w : ws) {
    CAPTURE(w.name);
    double const n = static_cast<double>(fpdt::parameter_count(fpdt::find_model_preset(w.name).value())) / 1e9;
    CHECK(n == doctest::Approx(w.billions).epsilon(0.06));
  }
}

TEST_CASE("memory_model: device memory grows with S for every method and FPDT grows slowest") {
  for (auto meth : {fpdt::parallel_method::fpdt, fpdt::parallel_method::ulysses,
                    fpdt::parallel_method::megatron_sp}) {
    CAPTURE(fpdt::to_string(meth));
    std::uint64_t prev = 0;
    for (index_t s = 8192; s <= (index_t{1} << 20); s *= 2) {
      fpdt::training_config t;
      t.method = meth;
      t.gpus = 4;
      t.sequence = s;
      t.chunk = meth == fpdt::parallel_method::fpdt ? 4096 : 0;
      auto m = fpdt::estimate_memory(llama8b(), t);
      REQUIRE_MESSAGE(m.ok(), m.error().to_string());
      CHECK(m->device_total() > prev);
      prev = m->device_total();
    }
  }
  fpdt::training_config f, u;
  f.gpus = u.gpus = 4;
  f.sequence = u.sequence = index_t{1} << 20;
  f.chunk = 65536;
  u.method = fpdt::parallel_method::ulysses;
  CHECK(fpdt::estimate_memory(llama8b(), f)->activation_total() * 4 <
        fpdt::estimate_memory(llama8b(), u)->activation_total());
}

TEST_CASE("memory_model: ZeRO stages partition the model states") {
  fpdt::training_config t;
  t.gpus = 8;
  t.sequence = 65536;
  t.chunk = 8192;
  std::uint64_t const n = fpdt::parameter_count(llama8b());
  for (int z = 0; z <= 3; ++z) {
    CAPTURE(z);
    t.zero_stage = z;
    auto m = fpdt::estimate_memory(llama8b(), t).value();
    CHECK(m.optimizer == (z >= 1 ? n * 12 / 8 : n * 12));
    CHECK(m.gradients == (z >= 2 ? n * 2 / 8 : n * 2));
    CHECK(m.parameters == (z >= 3 ? n * 2 / 8 : n * 2));
    CHECK((m.zero_buffers > 0) == (z == 3));
  }
}

TEST_CASE("memory_model: checkpoints go to the host when offloaded") {
  fpdt::training_config t;
  t.method = fpdt::parallel_method::ulysses;
  t.gpus = 4;
  t.sequence = 131072;
  auto on_host = fpdt::estimate_memory(llama8b(), t).value();
  t.checkpoint_offload = false;
  auto on_device = fpdt::estimate_memory(llama8b(), t).value();
  std::uint64_t const ckpt = 32ull * (131072 / 4) * 4096 * 2;
  CHECK(on_host.host_checkpoints == ckpt);
  CHECK(on_device.checkpoints == ckpt);
  CHECK(on_device.device_total() == on_host.device_total() + ckpt);
  t.checkpointing = false;
  CHECK(fpdt::estimate_memory(llama8b(), t)->checkpoints > 10 * ckpt);
}

TEST_CASE("memory_model: the trainer's query gives activations and working set only") {
  auto plain = fpdt::activation_device_bytes(llama8b(), 65536, 4, 0, false, 2, fpdt::parallel_method::fpdt);
  auto chunked = fpdt::activation_device_bytes(llama8b(), 65536, 4, 4096, true, 2, fpdt::parallel_method::fpdt);
  REQUIRE(plain.ok());
  REQUIRE(chunked.ok());
  CHECK(*plain > *chunked);
  CHECK(*chunked > 0);
}

TEST_CASE("memory_model: invalid layouts are errors that name the values") {
  fpdt::training_config t;
  t.gpus = 3;
  t.sequence = 3 * 4096;
  auto r = fpdt::estimate_memory(llama8b(), t);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == fpdt::errc::invalid_argument);
  CHECK(r.error().message().find("H = 32 query heads are not a multiple of P = 3") != std::string::npos);
  t.gpus = 4;
  t.sequence = 4096 * 3;
  t.chunk = 8192;
  r = fpdt::estimate_memory(llama8b(), t);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message().find("chunk C = 8192") != std::string::npos);
  t.chunk = 6; // divides S, not P
  t.sequence = 4 * 6;
  CHECK_FALSE(fpdt::estimate_memory(llama8b(), t).ok());
  t.chunk = 4096;
  t.sequence = 4 * 4096;
  t.zero_stage = 4;
  r = fpdt::estimate_memory(llama8b(), t);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message().find("ZeRO stage 4") != std::string::npos);
  fpdt::model_config bad = llama8b();
  bad.kv_heads = 5;
  CHECK_FALSE(fpdt::check_model(bad).ok());
  bad.kv_heads = 0;
  CHECK_FALSE(fpdt::check_model(bad).ok());
  CHECK_FALSE(fpdt::fpdt_attention_memory(100, 4, 2, 16, 30, true, 2, 2).ok());
  CHECK_FALSE(fpdt::fpdt_attention_memory(128, 4, 2, 16, 32, true, 1, 2).ok()); // ring_slots < 2
}

TEST_CASE("memory_model: over 64 problems the planner's device and pinned bytes equal one rank's measured peaks") {
  // A deterministic walk through (P, C, H, H_kv, D, dtype, offload, ring slots, mask).
  int const ranks[] = {1, 2, 4};
  int const heads[][2] = {{4, 4}, {4, 2}, {8, 2}, {4, 1}, {8, 8}};
  int const dims[] = {8, 12, 5};
  std::uint32_t x = 12345;
  auto pick = [&](std::uint32_t n) {
    x = x * 1664525u + 1013904223u;
    return (x >> 8) % n;
  };
  for (int n = 0; n < 64; ++n) {
    index_t const p = ranks[pick(3)];
    auto const hh = heads[pick(5)];
    index_t const c = p * static_cast<index_t>(1 + pick(4)) * 2;
    fpdt::attention_problem_args a{.sequence = c * static_cast<index_t>(1 + pick(4)), .ranks = p, .chunk = c,
                                   .heads = hh[0], .kv_heads = hh[1], .head_dim = dims[pick(3)],
                                   .type = pick(2) ? fpdt::dtype::bf16 : fpdt::dtype::f32,
                                   .mask = pick(2) ? fpdt::causal_mask : fpdt::full_mask,
                                   .offload = pick(4) != 0, .ring_slots = static_cast<index_t>(2 + pick(2))};
    auto problem = fpdt::attention_problem::create(a);
    REQUIRE_MESSAGE(problem.ok(), problem.error().to_string());
    INFO("S ", a.sequence, " P ", p, " C ", c, " H ", a.heads, " H_kv ", a.kv_heads, " D ", a.head_dim, " dtype ",
         fpdt::to_string(a.type), " mask ", fpdt::to_string(a.mask.kind), " offload ", a.offload, " ring ", a.ring_slots);
    if (a.type == fpdt::dtype::bf16)
      check_problem_against_layer<fpdt::bfloat16>(*problem);
    else
      check_problem_against_layer<float>(*problem);
  }
}
