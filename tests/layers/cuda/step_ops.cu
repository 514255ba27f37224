// attention_step_ops<cuda_backend>: the shared step bodies (step_ops_cases.hpp) as CUDA kernels.
// Skipped without a device (tests/backend/cuda/main.cu).
#include "../step_ops_cases.hpp"

#include <fpdt/fpdt.cuh>

#include <memory>

namespace {
struct cuda_fixture {
  using backend = fpdt::cuda_backend;
  static std::unique_ptr<backend> make(std::size_t budget, fpdt::arena_mode mode, std::size_t pinned_limit) {
    auto be = backend::create({.device = 0, .device_budget_bytes = budget, .device_mode = mode,
                               .pinned_limit_bytes = pinned_limit});
    REQUIRE_MESSAGE(be.ok(), be.error().to_string());
    return std::move(*be);
  }
};
} // namespace

using namespace fpdt_test::step_ops;

TEST_CASE("attention_step_ops cuda: merge equals merge_partials, exact for empty rows (A7 A9)") {
  merge_matches_host<cuda_fixture>();
}
TEST_CASE("attention_step_ops cuda: finalize rounds to bf16 like the host conversion") {
  finalize_rounds_like_host<cuda_fixture>();
}
TEST_CASE("attention_step_ops cuda: delta equals the float64 row sums") {
  delta_matches_float64<cuda_fixture>();
}
TEST_CASE("attention_step_ops cuda: copies and zero touch only their range") {
  copies_and_zero_touch_only_their_range<cuda_fixture>();
}
TEST_CASE("attention_step_ops cuda: Ulysses pack and unpack match the block formula, replicas summed in rank order (A3)") {
  ulysses_pack_unpack_match_formula<cuda_fixture>();
}
