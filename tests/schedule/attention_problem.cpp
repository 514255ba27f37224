// Tests of include/fpdt/schedule/attention_problem.hpp: every shape rule is refused once, naming
// the values; the per-rank problem; slot layouts; the schedules and byte figures it derives.
#include <fpdt/schedule/attention_problem.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

using fpdt::attention_problem;
using fpdt::chunk_tensor;
using fpdt::index_t;
using fpdt::slot_kind;

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

std::string refusal(fpdt::attention_problem_args const& a) {
  auto p = attention_problem::create(a, "layer");
  return p.ok() ? std::string("accepted") : p.error().message();
}
} // namespace

TEST_CASE("attention_problem: each rule is refused naming the values and the rule") {
  fpdt::attention_problem_args ok{.sequence = 64, .ranks = 4, .chunk = 16, .heads = 8, .kv_heads = 2, .head_dim = 8};
  CHECK(refusal(ok) == "accepted");
  struct bad {
    fpdt::attention_problem_args a;
    char const* want;
  };
  auto with = [&](auto f) {
    auto a = ok;
    f(a);
    return a;
  };
  std::vector<bad> const cases = {
      {with([](auto& a) { a.sequence = 0; }), "S = 0, H = 8, H_kv = 2, D = 8, P = 4 must all be >= 1"},
      {with([](auto& a) { a.head_dim = -1; }), "D = -1"},
      {with([](auto& a) { a.kv_heads = 3; }), "H = 8 must be a multiple of H_kv = 3"},
      {with([](auto& a) { a.chunk = -16; }), "chunk C = -16 must be >= 1 (or 0: C = S)"},
      {with([](auto& a) { a.sequence = 72; a.chunk = 16; }), "S = 72 is not a multiple of the chunk C = 16"},
      {with([](auto& a) { a.chunk = 6; a.sequence = 48; }), "C = 6 is not a multiple of P = 4"},
      {with([](auto& a) { a.heads = 6; a.kv_heads = 6; }), "H = 6 query heads are not a multiple of P = 4"},
      {with([](auto& a) { a.ranks = 8; a.sequence = 64; a.chunk = 16; a.heads = 24; a.kv_heads = 3; }),
       "H_kv must be a multiple of P"},
      {with([](auto& a) { a.ring_slots = 1; }), "ring_slots = 1 must be in [2, 64]"},
      {with([](auto& a) { a.type = fpdt::dtype::f64; }), "dtype f64 is not a model dtype"},
      {with([](auto& a) { a.ranks = 1; a.sequence = index_t{1} << 21; a.chunk = 1; }), "chunks; at most 2^20"},
  };
  for (bad const& b : cases) {
    std::string const m = refusal(b.a);
    INFO(m);
    CHECK(contains(m, b.want));
    CHECK(contains(m, "layer: ")); // the caller's name leads
  }
}

TEST_CASE("attention_problem: C = 0 means S, and per_rank keeps S and C and takes the rank's heads") {
  auto p = attention_problem::create({.sequence = 96, .ranks = 4, .chunk = 0, .heads = 8, .kv_heads = 2, .head_dim = 16}).value();
  CHECK(p.chunk() == 96);
  CHECK(p.chunks() == 1);
  CHECK(p.local_heads() == 2);
  CHECK(p.local_kv_heads() == 1); // H_kv = 2 < P = 4: one replicated head per rank
  attention_problem const r = p.per_rank();
  CHECK(r.ranks() == 1);
  CHECK(r.sequence() == 96);
  CHECK(r.chunk() == 96);
  CHECK(r.local_heads() == 2);
  CHECK(r.local_kv_heads() == 1);
  CHECK(r.bytes(chunk_tensor::q) == p.bytes(chunk_tensor::q)); // the tensors are already per rank
  auto s = attention_problem::create({.sequence = 64, .ranks = 2, .chunk = 16, .heads = 8, .kv_heads = 4, .head_dim = 8}).value();
  CHECK(s.local_kv_heads() == 2); // sharded
}

TEST_CASE("attention_problem: slot layouts are disjoint, aligned and sized by their tensors") {
  for (fpdt::dtype t : {fpdt::dtype::f32, fpdt::dtype::bf16, fpdt::dtype::f16}) {
    auto p = attention_problem::create(
                 {.sequence = 60, .ranks = 1, .chunk = 20, .heads = 3, .kv_heads = 1, .head_dim = 5, .type = t})
                 .value();
    CHECK(p.bytes(chunk_tensor::q) == 20u * 3 * 5 * fpdt::size_bytes(t));
    CHECK(p.bytes(chunk_tensor::k) == 20u * 1 * 5 * fpdt::size_bytes(t));
    CHECK(p.bytes(chunk_tensor::lse) == 20u * 3 * 4);
    CHECK(p.bytes(chunk_tensor::dq) == 20u * 3 * 5 * 4);
    CHECK(p.bytes(chunk_tensor::dk) == 20u * 1 * 5 * 4);
    for (std::size_t k = 0; k < fpdt::slot_kind_count; ++k) {
      fpdt::slot_layout const l = p.slot(static_cast<slot_kind>(k));
      std::vector<std::pair<std::size_t, std::size_t>> spans;
      std::size_t sum = 0;
      for (std::size_t i = 0; i < fpdt::chunk_tensor_count; ++i) {
        auto const ct = static_cast<chunk_tensor>(i);
        if (!l.has(ct)) continue;
        CHECK(l.at(ct) % fpdt::device_arena::granularity == 0);
        std::size_t const b = fpdt::device_arena::rounded_size(p.bytes(ct));
        spans.emplace_back(l.at(ct), l.at(ct) + b);
        sum += b;
      }
      CHECK(sum == l.bytes);
      std::sort(spans.begin(), spans.end());
      for (std::size_t i = 1; i < spans.size(); ++i) CHECK(spans[i - 1].second <= spans[i].first);
    }
  }
}

TEST_CASE("attention_problem: its schedules are checked and hold the rings ring_sizes gives") {
  for (bool offload : {true, false})
    for (fpdt::attention_mask m : {fpdt::causal_mask, fpdt::full_mask}) {
      auto p = attention_problem::create({.sequence = 48, .ranks = 2, .chunk = 8, .heads = 4, .kv_heads = 2,
                                          .head_dim = 8, .type = fpdt::dtype::bf16, .mask = m, .offload = offload,
                                          .ring_slots = 3})
                   .value()
                   .per_rank();
      auto f = p.forward_schedule().value();
      auto b = p.backward_schedule().value();
      CHECK(fpdt::check_schedule(f).ok());
      CHECK(fpdt::check_schedule(b).ok());
      CHECK(f.ring_size == fpdt::ring_sizes(fpdt::pass::forward, f.params));
      CHECK(b.ring_size == fpdt::ring_sizes(fpdt::pass::backward, b.params));
      CHECK(f.params.chunks == 6);
      CHECK(f.params.mask.kind == m.kind);
      CHECK(f.params.chunk_tokens == p.chunk());
      CHECK(f.params.bytes.q == p.slot(slot_kind::forward_q).bytes);
      CHECK(b.params.bytes.q == p.slot(slot_kind::backward_q).bytes);
      std::size_t const acc = 2 * p.slot(slot_kind::forward_acc).bytes;
      CHECK(p.forward_device_bytes() == f.ring_bytes() + acc);
      CHECK(p.forward_device_bytes(1) == f.ring_bytes() + acc + 256); // a workspace takes whole granules
      if (offload)
        CHECK(p.backward_device_bytes() == b.ring_bytes() + p.slot(slot_kind::backward_dkv).bytes);
      CHECK((p.host_bytes_needed() == 0) == !offload);
      CHECK(p.host_bytes_reserved() >= p.host_bytes_needed());
      // The P-rank problem's schedules (exchange steps, one chunk ahead) and their bytes.
      auto whole = attention_problem::create({.sequence = 48, .ranks = 2, .chunk = 8, .heads = 4, .kv_heads = 2,
                                              .head_dim = 8, .type = fpdt::dtype::bf16, .mask = m,
                                              .offload = offload, .ring_slots = 3})
                       .value();
      auto wf = whole.forward_schedule().value();
      auto wb = whole.backward_schedule().value();
      CHECK(fpdt::check_schedule(wf).ok());
      CHECK(fpdt::check_schedule(wb).ok());
      CHECK(whole.forward_device_bytes() == wf.ring_bytes() + acc);
      if (offload) {
        CHECK(wf.ring_size == std::array<index_t, 3>{2, 5, 1});
        CHECK(whole.backward_device_bytes() == wb.ring_bytes() + 2 * p.slot(slot_kind::backward_dkv).bytes);
      }
    }
}

TEST_CASE("attention_problem: on P ranks every rank's schedules issue the same collectives in one order") {
  // The k-th collective of every rank must be the same exchange (what, chunk, bytes), or peers
  // meet the wrong partner: a hang or corrupt blocks. Each rank builds its schedules from the
  // problem it was given; the comm lane runs them in issue order (FIFO).
  struct collective {
    fpdt::payload what;
    std::int32_t i, j;
    std::uint64_t bytes;
    bool operator==(collective const&) const = default;
  };
  auto order = [](fpdt::schedule const& s) {
    std::vector<collective> out;
    for (auto const& st : s.steps)
      if (st.kind == fpdt::step_kind::exchange) {
        CHECK(st.on == fpdt::lane::comm);
        out.push_back({st.what, st.i, st.j, st.bytes});
      }
    return out;
  };
  for (index_t ranks : {2, 4, 8})
    for (index_t kv_heads : {1, 2, 8})
      for (bool offload : {true, false})
        for (fpdt::attention_mask m : {fpdt::causal_mask, fpdt::full_mask}) {
          CAPTURE(ranks);
          CAPTURE(kv_heads);
          CAPTURE(offload);
          fpdt::attention_problem_args const a{.sequence = 128, .ranks = ranks, .chunk = 32, .heads = 8,
                                               .kv_heads = kv_heads, .head_dim = 16, .type = fpdt::dtype::bf16,
                                               .mask = m, .offload = offload, .ring_slots = 2};
          std::vector<collective> fwd0, bwd0;
          for (index_t rank = 0; rank < ranks; ++rank) {
            auto p = attention_problem::create(a).value(); // what rank `rank` builds
            auto f = p.forward_schedule().value();
            auto b = p.backward_schedule().value();
            REQUIRE(fpdt::check_schedule(f).ok());
            REQUIRE(fpdt::check_schedule(b).ok());
            if (rank == 0) {
              fwd0 = order(f);
              bwd0 = order(b);
              CHECK(fwd0.size() == 2 * 4);
              CHECK(bwd0.size() == 3 * 4);
              // Exchange bytes are one rank's share of the global chunk: q, k, v in the model
              // dtype (kv heads replicated when P exceeds H_kv), the gradients in fp32.
              index_t const hkv = std::max<index_t>(kv_heads / ranks, 1), h = 8 / ranks;
              CHECK(fwd0.front().bytes == static_cast<std::uint64_t>(32 * (h + 2 * hkv) * 16 * 2));
              CHECK(std::count_if(bwd0.begin(), bwd0.end(), [&](collective const& c) {
                      return c.what == fpdt::payload::dkv && c.bytes == static_cast<std::uint64_t>(32 * 2 * hkv * 16 * 4);
                    }) == 4);
            } else {
              CHECK(order(f) == fwd0);
              CHECK(order(b) == bwd0);
            }
          }
          // One rank built with another chunk size would issue other collectives: found here.
          auto other = a;
          other.chunk = 64;
          CHECK(order(attention_problem::create(other).value().forward_schedule().value()) != fwd0);
        }
}

TEST_CASE("attention_problem: sizes whose byte counts would wrap 64 bits are refused (found by fuzz_attention_problem)") {
  // Accepted before: every divisibility rule holds, but C x H x D x 4 bytes wrapped around, so
  // the slots, the pinned store and the planner would have been sized from garbage.
  fpdt::attention_problem_args a{.sequence = index_t{1} << 51, .ranks = 8, .chunk = index_t{1} << 35,
                                 .heads = index_t{1} << 51, .kv_heads = 8, .head_dim = 8};
  std::string const why = refusal(a);
  CHECK(contains(why, "layer: S = 2251799813685248, H = 2251799813685248, H_kv = 8, D = 8"));
  CHECK(contains(why, "exceed 2^52 bytes"));
  // The limit is far from real runs: 16M tokens of a 128-head, 8-kv-head, D = 128 model pass.
  a = {.sequence = index_t{1} << 24, .ranks = 8, .chunk = index_t{1} << 16, .heads = 128, .kv_heads = 8,
       .head_dim = 128};
  CHECK(refusal(a) == "accepted");
  // Just above and just below the bound S (5 H + 2 H_kv + 1) D x 4 = 2^52.
  a = {.sequence = index_t{1} << 40, .ranks = 1, .chunk = index_t{1} << 21, .heads = 1, .kv_heads = 1,
       .head_dim = 256};
  CHECK(contains(refusal(a), "exceed 2^52 bytes")); // 2^40 x 8 x 256 x 4 = 2^53
  a.head_dim = 128; // 2^40 x 8 x 128 x 4 = 2^52: at the bound, accepted
  CHECK(refusal(a) == "accepted");
}
