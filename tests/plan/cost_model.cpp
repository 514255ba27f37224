// Tests of include/fpdt/plan/cost_model.hpp: model FLOPs as the paper counts them, the lane
// simulation on hand-checkable schedules, copies exposed only when PCIe is slow, MFU in (0, 1).
#include <fpdt/plan/cost_model.hpp>
#include <fpdt/plan/memory_model.hpp>
#include <fpdt/plan/presets.hpp>

#include <doctest/doctest.h>

#include <limits>
#include <optional>
#include <vector>

using fpdt::index_t;

TEST_CASE("cost_model: model FLOPs are 3x the forward GEMMs plus causal attention") {
  fpdt::model_config m = fpdt::find_model_preset("gpt-6.7b").value();
  double const s = 65536, h = 4096, l = 32, v = 50257;
  // Megatron's formula (Narayanan et al. 2021, eq. 3, without the 2x recomputation term and with
  // the attention term halved for the causal mask): 72 s l h^2 (1 + s / (12 h) + V / (12 l h)).
  double const want = 72 * s * l * h * h * (1 + s / (12 * h) + v / (12 * l * h));
  CHECK(fpdt::model_flops(m, 65536) == doctest::Approx(want).epsilon(0.01));
  // Attention dominates at long S: quadrupling when S doubles.
  CHECK(fpdt::model_flops(m, index_t{1} << 22) / fpdt::model_flops(m, index_t{1} << 21) ==
        doctest::Approx(4).epsilon(0.05));
}

TEST_CASE("cost_model: the simulation of a one-chunk schedule is the sum of its steps") {
  fpdt::schedule_params p;
  p.chunks = 1;
  p.offload = false;
  auto s = fpdt::forward_schedule(p).value();
  double const inf = std::numeric_limits<double>::infinity();
  auto t = fpdt::simulate_schedule(s, {inf, inf, inf}, [](fpdt::schedule_step const&) {
    return fpdt::step_price{1.0};
  });
  // Every compute-lane step costs 1 s and they run one after another (one lane, FIFO).
  std::size_t const n = s.steps.size() - s.count(fpdt::step_kind::release);
  CHECK(t.busy[static_cast<std::size_t>(fpdt::lane::compute)] == doctest::Approx(static_cast<double>(n)));
  CHECK(t.busy[static_cast<std::size_t>(fpdt::lane::comm)] == 0);
  CHECK(t.makespan == doctest::Approx(static_cast<double>(n)));
}

TEST_CASE("cost_model: copies overlap compute and both directions share PCIe") {
  fpdt::schedule_params p;
  p.chunks = 8;
  p.kv_bytes = 1000;
  p.q_bytes = 1000;
  p.out_bytes = 1000;
  auto s = fpdt::forward_schedule(p).value();
  auto price = [](fpdt::schedule_step const& st) {
    return fpdt::step_price{st.kind == fpdt::step_kind::compute ? 1.0 : 0.0};
  };
  double const inf = std::numeric_limits<double>::infinity();
  auto ideal = fpdt::simulate_schedule(s, {inf, inf, inf}, price);
  auto fast = fpdt::simulate_schedule(s, {1e6, 1e6, 2e6}, price);  // 1 ms a copy: hidden
  auto slow = fpdt::simulate_schedule(s, {100, 100, 200}, price);  // 10 s a copy: exposed
  auto shared = fpdt::simulate_schedule(s, {100, 100, 100}, price); // both ways share one link
  CHECK(ideal.makespan == doctest::Approx(36)); // 8 * 9 / 2 pairs of 1 s
  CHECK(fast.makespan < ideal.makespan * 1.01);
  CHECK(slow.makespan > 2 * ideal.makespan);
  CHECK(shared.makespan >= slow.makespan);
}

namespace {
// Llama-3 8B on 8 ranks at S = 1M, C = 64K.
fpdt::training_config llama_1m() {
  fpdt::training_config t;
  t.gpus = 8;
  t.sequence = index_t{1} << 20;
  t.chunk = 65536;
  return t;
}
} // namespace

TEST_CASE("cost_model: step estimates are positive, MFU below 1, and offload costs little at long S") {
  auto m = fpdt::find_model_preset("llama3-8b").value();
  auto hw = fpdt::find_gpu_preset("a100-80gb").value();
  fpdt::training_config t = llama_1m();
  auto e = fpdt::estimate_step(m, t, hw);
  REQUIRE_MESSAGE(e.ok(), e.error().to_string());
  CHECK(e->step_seconds > 0);
  CHECK(e->mfu > 0.2);
  CHECK(e->mfu < 1.0);
  CHECK(e->exposed_copy_seconds < 0.05 * e->step_seconds);
  CHECK(e->tokens_per_second == doctest::Approx(static_cast<double>(t.sequence) / e->step_seconds));
  // Slow PCIe exposes the copies.
  fpdt::hardware_config slow = hw;
  slow.pcie_h2d_gbps = slow.pcie_d2h_gbps = slow.pcie_both_gbps = 0.05;
  auto es = fpdt::estimate_step(m, t, slow).value();
  CHECK(es.exposed_copy_seconds > 0.1 * es.step_seconds);
  CHECK(es.mfu < e->mfu);
  // Errors are those of the layout and of the hardware.
  t.sequence = 65536 + 8;
  CHECK_FALSE(fpdt::estimate_step(m, t, hw).ok());
  t.sequence = index_t{1} << 20;
  hw.hbm_gbps = 0;
  auto bad = fpdt::estimate_step(m, t, hw);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().message().find("hbm_gbps") != std::string::npos);
}

TEST_CASE("cost_model: exchange steps run on the comm lane beside compute (the backward's dout once per chunk)") {
  // On P ranks the backward takes dout_i from the caller through its exchange only at query chunk
  // i's first use: u dout exchanges, and one dq and one dk/dv exchange per chunk.
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    fpdt::schedule_params p;
    p.chunks = 4;
    p.ranks = 2;
    p.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
    p.q_side_bytes = 1000;
    p.dout_bytes = 250;
    p.dq_bytes = 500;
    p.kv_bytes = 1000;
    auto s = fpdt::backward_schedule(p).value();
    auto t = fpdt::simulate_schedule(s, {1e6, 1e6, 2e6}, [](fpdt::schedule_step const& st) {
      if (st.kind == fpdt::step_kind::exchange) return fpdt::step_price{st.what == fpdt::payload::dout ? 0.25 : 0.5};
      return fpdt::step_price{st.kind == fpdt::step_kind::compute ? 1.0 : 0.0};
    });
    double const comm = 4 * 0.25 + 8 * 0.5;
    CHECK(t.busy[static_cast<std::size_t>(fpdt::lane::comm)] == doctest::Approx(comm));
    // Free exchanges leave the pairs' compute alone; priced ones delay it by at most their sum
    // (dk_j, dv_j are one accumulator pair: the next zero waits for their exchange).
    auto free = fpdt::simulate_schedule(s, {1e6, 1e6, 2e6}, [](fpdt::schedule_step const& st) {
      return fpdt::step_price{st.kind == fpdt::step_kind::compute ? 1.0 : 0.0};
    });
    double const pairs = causal ? 10 : 16;
    CHECK(free.makespan == doctest::Approx(pairs).epsilon(1e-3));
    CHECK(t.makespan > pairs + 0.25);
    CHECK(t.makespan <= pairs + comm + 1e-3);
  }
}

TEST_CASE("cost_model: only bytes that cross PCIe cost copy time (no exposed copies with offload off)") {
  // A copy step priced with pcie_bytes costs those bytes, not all of the step's.
  fpdt::schedule_params p;
  p.chunks = 2;
  p.offload = false;
  p.q_side_bytes = 1000;
  p.dout_bytes = 250;
  auto s = fpdt::backward_schedule(p).value();
  REQUIRE(s.count(fpdt::step_kind::fetch) == 2);
  auto run = [&](std::optional<std::uint64_t> pcie) {
    return fpdt::simulate_schedule(s, {100, 100, 200}, [&](fpdt::schedule_step const& st) {
      return fpdt::step_price{st.kind == fpdt::step_kind::compute ? 1.0 : 0.0,
                              st.kind == fpdt::step_kind::fetch ? pcie : std::nullopt};
    });
  };
  auto const h2d = static_cast<std::size_t>(fpdt::lane::h2d);
  CHECK(run(std::nullopt).busy[h2d] == doctest::Approx(2 * 1000 / 100.0));
  CHECK(run(std::uint64_t{750}).busy[h2d] == doctest::Approx(2 * 750 / 100.0));
  CHECK(run(std::uint64_t{0}).busy[h2d] == 0);
  // With offload off nothing of the attention crosses PCIe: however slow PCIe is, no copy time
  // is exposed and the step time does not change (the backward's first fetch of each query chunk
  // takes only dout_i, from the caller).
  auto m = fpdt::find_model_preset("llama3-8b").value();
  auto hw = fpdt::find_gpu_preset("a100-80gb").value();
  fpdt::training_config t = llama_1m();
  t.offload = false;
  t.checkpoint_offload = false;
  auto fast = fpdt::estimate_step(m, t, hw).value();
  hw.pcie_h2d_gbps = hw.pcie_d2h_gbps = hw.pcie_both_gbps = 0.05;
  auto slow = fpdt::estimate_step(m, t, hw).value();
  CHECK(slow.exposed_copy_seconds == 0);
  CHECK(slow.step_seconds == doctest::Approx(fast.step_seconds).epsilon(1e-12));
  // With offload on, the same slow PCIe is exposed.
  t.offload = true;
  CHECK(fpdt::estimate_step(m, t, hw).value().exposed_copy_seconds > 0.1 * slow.step_seconds);
}

TEST_CASE("cost_model: on P ranks the forward's exchanges hide behind the pairs but for the first and the last") {
  // Causal, u = 4: 10 pairs of 1 s; each exchange 0.5 s. Chunk i + 1's q/k/v exchange runs during
  // chunk i, and chunk i's output exchange during chunk i + 1: only chunk 0's q/k/v exchange and
  // chunk 3's output exchange stay exposed (one after the other: 1 s), not all eight (4 s).
  fpdt::schedule_params p;
  p.chunks = 4;
  p.ranks = 4;
  p.q_bytes = p.kv_bytes = p.out_bytes = 1000;
  for (bool offload : {true, false}) {
    CAPTURE(offload);
    p.offload = offload;
    auto s = fpdt::forward_schedule(p).value();
    auto t = fpdt::simulate_schedule(s, {1e9, 1e9, 2e9}, [](fpdt::schedule_step const& st) {
      return fpdt::step_price{st.kind == fpdt::step_kind::compute ? (st.i == st.j ? 0.5 : 1.0)
                              : st.kind == fpdt::step_kind::exchange ? 0.5 : 0.0};
    });
    CHECK(t.busy[static_cast<std::size_t>(fpdt::lane::comm)] == doctest::Approx(8 * 0.5));
    CHECK(t.makespan == doctest::Approx(8.0 + 1.0).epsilon(1e-3)); // 4 diagonals at 0.5, 6 pairs at 1
  }
}

TEST_CASE("cost model: a sliding window prices only its visible pairs, in FPDT's schedule and in model FLOPs") {
  fpdt::model_config const m = fpdt::find_model_preset("llama3-8b").value();
  fpdt::hardware_config const hw = fpdt::find_gpu_preset("h100-sxm").value();
  fpdt::training_config t;
  t.gpus = 4;
  t.sequence = index_t{1} << 18;
  t.chunk = index_t{1} << 14;
  auto causal = fpdt::estimate_step(m, t, hw).value();
  t.mask = fpdt::causal_window_mask(4096);
  auto window = fpdt::estimate_step(m, t, hw).value();
  // Attention is the larger part at 256K tokens; a 4K window leaves a small fraction of it.
  CHECK(window.step_seconds < 0.6 * causal.step_seconds);
  double const frac = fpdt::attention_work_vs_causal(t.mask, t.sequence);
  CHECK(frac == doctest::Approx(4096.0 * 2 / static_cast<double>(t.sequence)).epsilon(0.01));
  CHECK(fpdt::model_flops(m, t.sequence, t.mask) < fpdt::model_flops(m, t.sequence));
  CHECK(fpdt::model_flops(m, t.sequence, fpdt::causal_mask) == fpdt::model_flops(m, t.sequence));
  // The schedule it prices holds only the pairs the window reaches: 16 chunks of 16K, 4K window.
  auto problem = fpdt::fpdt_attention_problem(m, t).value();
  CHECK(problem.forward_schedule().value().count(fpdt::step_kind::compute) == 16 + 15);
  t.mask.window_left = -7;
  auto bad = fpdt::estimate_step(m, t, hw);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().to_string().find("window (-7") != std::string::npos);
}

TEST_CASE("cost model: a document-length distribution packed into S prices only the pairs inside documents") {
  fpdt::model_config const m = fpdt::find_model_preset("llama3-8b").value();
  fpdt::hardware_config const hw = fpdt::find_gpu_preset("h100-sxm").value();
  fpdt::training_config t;
  t.gpus = 4;
  t.sequence = index_t{1} << 18;
  t.chunk = index_t{1} << 14;
  auto causal = fpdt::estimate_step(m, t, hw).value();
  // 16K and 48K tokens, repeated: 4 pairs of documents fill 256K exactly.
  t.document_lengths = {index_t{1} << 14, 3 * (index_t{1} << 14)};
  std::vector<index_t> offsets;
  fpdt::attention_mask const mask = fpdt::training_mask(t, offsets);
  CHECK(offsets == std::vector<index_t>{0, 16384, 65536, 81920, 131072, 147456, 196608, 212992, 262144});
  REQUIRE(mask.documents == 8);
  // Causal pairs inside the documents, written out: n (n + 1) / 2 per document of n tokens.
  auto tri = [](double n) { return n * (n + 1) / 2; };
  double const s = static_cast<double>(t.sequence);
  double const want = 4 * (tri(16384) + tri(49152)) / tri(s);
  CHECK(fpdt::attention_work_vs_causal(mask, t.sequence) == doctest::Approx(want).epsilon(1e-12));
  auto packed = fpdt::estimate_step(m, t, hw).value();
  CHECK(packed.step_seconds < 0.6 * causal.step_seconds);
  CHECK(packed.model_flops < causal.model_flops);
  // The schedule it prices: the 16 chunks of 16K fall 1 | 3 | 1 | 3 ...: per pair of documents
  // 1 + 6 compute pairs (a 3-chunk document's causal triangle).
  auto problem = fpdt::fpdt_attention_problem(m, t).value();
  CHECK(problem.forward_schedule().value().count(fpdt::step_kind::compute) == 4 * (1 + 6));
  // A last document cut at S: one length of 100K fills 256K as 100K, 100K, 56K.
  t.document_lengths = {100 * 1024};
  (void)fpdt::training_mask(t, offsets);
  CHECK(offsets == std::vector<index_t>{0, 102400, 204800, 262144});
  // Errors name the values: a negative length, all zero, documents given twice.
  t.document_lengths = {4096, -3};
  auto bad = fpdt::estimate_step(m, t, hw);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().to_string().find("document length 1 is -3") != std::string::npos);
  t.document_lengths = {0, 0};
  bad = fpdt::estimate_step(m, t, hw);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().to_string().find("all 0") != std::string::npos);
}

TEST_CASE("cost model: many tiny documents are refused naming the count, and memory ignores the documents") {
  fpdt::model_config const m = fpdt::find_model_preset("llama3-8b").value();
  fpdt::hardware_config const hw = fpdt::find_gpu_preset("h100-sxm").value();
  fpdt::training_config t;
  t.gpus = 8;
  t.sequence = index_t{1} << 24;
  t.chunk = index_t{1} << 20;
  auto const plain = fpdt::estimate_memory(m, t, hw.reserved_bytes).value();
  t.document_lengths = {1};
  auto bad = fpdt::estimate_step(m, t, hw);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().to_string().find("pack about 16777216 documents into S = 16777216; at most 4194304") != std::string::npos);
  t.document_lengths = {4096};
  auto const docs = fpdt::estimate_memory(m, t, hw.reserved_bytes).value();
  CHECK(docs.device_total() == plain.device_total());
}
