// Fuzz target: make_tensor_view over arbitrary extents, strides and capacities (rank 3). An
// accepted view reaches no element at or past the capacity, never aliases itself (distinct index
// tuples, distinct offsets), and its furthest offset is exact (no wrapped products).
#include <fpdt/core/tensor_view.hpp>

#include "fuzz_common.hpp"

#include <cstdint>
#include <set>

namespace {
[[noreturn]] void fail(char const* what) { fpdt_fuzz::fail("fuzz_tensor_view", what); }
fpdt::index_t pick(FuzzedDataProvider& in) { return fpdt_fuzz::pick(in, -2, 12); }
} // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  std::array<fpdt::index_t, 3> e{pick(in), pick(in), pick(in)}, st{pick(in), pick(in), pick(in)};
  fpdt::index_t const capacity = in.ConsumeBool() ? -1 : pick(in);
  static float buffer[1];
  auto v = fpdt::make_tensor_view<float, 3>(buffer, e, st, capacity);
  if (!v) {
    if (v.error().code() != fpdt::errc::shape_mismatch || v.error().message().empty())
      fail("a refusal that is not shape_mismatch with a message");
    return 0;
  }
  for (fpdt::index_t x : e)
    if (x < 0) fail("accepted a negative extent");
  if (e[0] == 0 || e[1] == 0 || e[2] == 0) return 0; // an empty view reaches nothing
  __int128 reach = 0;
  for (int d = 0; d < 3; ++d)
    if (e[d] > 1) {
      if (st[d] < 1) fail("accepted a stride below 1 on a dimension of extent > 1");
      reach += static_cast<__int128>(e[d] - 1) * st[d];
    }
  if (reach > INT64_MAX) fail("accepted a view whose furthest offset overflows 64 bits");
  if (capacity >= 0 && reach >= capacity) fail("accepted a view that reaches past its capacity");
  // Small views: every index tuple has its own offset.
  if (e[0] <= 4096 && e[1] <= 4096 && e[2] <= 4096 && e[0] * e[1] * e[2] <= 4096) { // (bounded first: no overflow)
    std::set<__int128> seen;
    for (fpdt::index_t i = 0; i < e[0]; ++i)
      for (fpdt::index_t j = 0; j < e[1]; ++j)
        for (fpdt::index_t k = 0; k < e[2]; ++k) {
          __int128 const off = (e[0] > 1 ? static_cast<__int128>(i) * st[0] : 0) +
                               (e[1] > 1 ? static_cast<__int128>(j) * st[1] : 0) +
                               (e[2] > 1 ? static_cast<__int128>(k) * st[2] : 0);
          if (!seen.insert(off).second) fail("accepted a view that aliases itself");
        }
  }
  return 0;
}
