// Fuzz target: token_layout (S, P, C) and its position maps. What `make` accepts satisfies its
// rules; global_position and local_of are inverse bijections; the checked forms refuse exactly the
// out-of-range arguments; scatter then gather of a small sequence gives it back.
#include <fpdt/schedule/token_layout.hpp>

#include "fuzz_common.hpp"

#include <cstdint>
#include <cstdio>
#include <vector>

namespace {
[[noreturn]] void fail(char const* what, fpdt::index_t s, fpdt::index_t p, fpdt::index_t c) {
  char detail[128];
  std::snprintf(detail, sizeof detail, "S=%lld P=%lld C=%lld", static_cast<long long>(s), static_cast<long long>(p),
                static_cast<long long>(c));
  fpdt_fuzz::fail("fuzz_token_layout", what, detail);
}
} // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fpdt::index_t const s = fpdt_fuzz::pick(in, -2, 96), p = fpdt_fuzz::pick(in, -2, 96), c = fpdt_fuzz::pick(in, -2, 96);
  auto tl = fpdt::token_layout::make(s, p, c);
  if (!tl) {
    if (tl.error().message().empty()) fail("a refusal without a message", s, p, c);
    return 0;
  }
  if (s < 1 || p < 1 || c < 1 || s % c != 0 || c % p != 0) fail("accepted a shape that breaks a rule", s, p, c);
  // Random positions: the maps are inverse, and the checked forms agree with the ranges.
  for (int k = 0; k < 16 && in.remaining_bytes() > 0; ++k) {
    fpdt::index_t const g = in.ConsumeIntegralInRange<fpdt::index_t>(-1, s);
    auto lo = tl->checked_local_of(g);
    if (lo.ok() != (g >= 0 && g < s)) fail("checked_local_of range", s, p, c);
    if (!lo) continue;
    auto [rank, local] = *lo;
    if (rank < 0 || rank >= p || local < 0 || local >= s / p) fail("local_of out of range", s, p, c);
    auto back = tl->checked_global_position(rank, local);
    if (!back || *back != g) fail("global_position(local_of(g)) != g", s, p, c);
  }
  if (tl->checked_global_position(p, 0).ok() || tl->checked_global_position(0, s / p).ok() ||
      tl->checked_global_position(-1, 0).ok())
    fail("checked_global_position accepted an out-of-range argument", s, p, c);
  // Small sequences: scatter to every rank and gather back, element for element.
  if (s <= 512) {
    std::vector<std::int32_t> global(static_cast<std::size_t>(s)), back(static_cast<std::size_t>(s), -1);
    for (std::size_t t = 0; t < global.size(); ++t) global[t] = static_cast<std::int32_t>(t);
    std::vector<std::int32_t> local(static_cast<std::size_t>(s / p));
    auto gv = fpdt::contiguous_view<std::int32_t const, 2>(global.data(), {s, 1}).value();
    auto bv = fpdt::contiguous_view<std::int32_t, 2>(back.data(), {s, 1}).value();
    auto lv = fpdt::contiguous_view<std::int32_t, 2>(local.data(), {s / p, 1}).value();
    for (fpdt::index_t r = 0; r < p; ++r) {
      if (!tl->scatter<std::int32_t>(gv, r, lv).ok()) fail("scatter refused a right shape", s, p, c);
      for (fpdt::index_t l = 0; l < s / p; ++l)
        if (local[static_cast<std::size_t>(l)] != tl->global_position(r, l)) fail("scatter put a token out of place", s, p, c);
      if (!tl->gather<std::int32_t>(lv, r, bv).ok()) fail("gather refused a right shape", s, p, c);
    }
    if (back != global) fail("gather(scatter(x)) != x", s, p, c);
  }
  return 0;
}
