// CASES.md A12 (the backward reads the chunk that was offloaded), one body for the host and the
// GPU layer tests: S = 16, H = 2, D = 8, fp32, chunks of 8, offload on with 2 ring slots, causal
// and full; chunk 1's K and V are chunk 0's plus 3, so a chunk fetched back from the wrong slot
// gives wrong gradients and a wrong checksum. A recording kernel (one per backend) hands the K
// and V values each backward chunk pair reads, in index order, to a `recorder`; the body checks
// the gradients against float64 and each pair's checksum against the chunk's own K and V.
#pragma once

#include "../attention/chunked_driver.hpp"
#include "../attention/reference.hpp"

#include <fpdt/layers/fpdt_attention.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace fpdt_test::a12 {

using fpdt::index_t;

// FNV-1a over the bits of `x`, in order.
inline std::uint64_t hash_values(std::vector<float> const& x) {
  std::uint64_t h = 1469598103934665603ull;
  for (float const f : x) {
    std::uint32_t b;
    std::memcpy(&b, &f, 4);
    h = (h ^ b) * 1099511628211ull;
  }
  return h;
}

// The checksum of a chunk pair's K and V (values in index order).
inline std::uint64_t checksum(std::vector<float> const& k, std::vector<float> const& v) {
  return hash_values(k) * 31 + hash_values(v);
}

// What the recording kernels saw: checksum by (q_offset, k_offset). Shared by the kernel's copies.
struct recorder {
  std::map<std::pair<int, int>, std::uint64_t> seen;
  std::mutex m;
  void put(index_t q_offset, index_t k_offset, std::vector<float> const& k, std::vector<float> const& v) {
    std::lock_guard lock(m);
    seen[{static_cast<int>(q_offset), static_cast<int>(k_offset)}] = checksum(k, v);
  }
};

// Runs A12. `run(problem, options, recorder&)` runs the layer's forward and backward on the
// problem with a recording kernel that reports to the recorder, and returns the results.
template <class Run> void check(Run&& run) {
  using namespace fpdt_test::chunked;
  attn_shape const s{16, 16, 2, 2, 8};
  auto p = random_problem<float>(s, 12);
  for (index_t r = 8; r < 16; ++r)
    for (index_t x = 0; x < 2 * 8; ++x) {
      auto const at = static_cast<std::size_t>(r * 16 + x), src = static_cast<std::size_t>((r - 8) * 16 + x);
      p.k[at] = p.k[src] + 3.0f;
      p.v[at] = p.v[src] + 3.0f;
    }
  p.kd = fpdt_test::to_double(p.k);
  p.vd = fpdt_test::to_double(p.v);
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    fpdt::fpdt_attention_options o;
    o.chunk = 8;
    o.offload = true;
    o.ring_slots = 2;
    o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
    run_options ro;
    ro.mask = o.mask;
    recorder rec;
    run_result const r = run(p, o, rec);
    check_against_reference(r, reference_of(p, ro), p, 1e-5);
    for (int j = 0; j < 2; ++j) {
      std::vector<float> kj, vj; // key chunk j's rows, in index order
      for (index_t row = 8 * j; row < 8 * j + 8; ++row)
        for (index_t x = 0; x < 2 * 8; ++x) {
          kj.push_back(p.k[static_cast<std::size_t>(row * 16 + x)]);
          vj.push_back(p.v[static_cast<std::size_t>(row * 16 + x)]);
        }
      for (int i = 0; i < 2; ++i) {
        if (causal && j > i) continue;
        CAPTURE(i);
        CAPTURE(j);
        auto it = rec.seen.find({8 * i, 8 * j});
        REQUIRE(it != rec.seen.end());
        CHECK(it->second == checksum(kj, vj));
      }
    }
  }
}

} // namespace fpdt_test::a12
