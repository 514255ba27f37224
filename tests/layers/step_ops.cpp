// attention_step_ops<host_backend>: the shared step bodies (step_ops_cases.hpp) on the host backend.
#include "step_ops_cases.hpp"

#include <fpdt/backend/host/host_backend.hpp>
#include <fpdt/layers/attention_step_ops.hpp>

#include <memory>

namespace {
struct host_fixture {
  using backend = fpdt::host_backend;
  static std::unique_ptr<backend> make(std::size_t budget, fpdt::arena_mode mode, std::size_t pinned_limit) {
    return std::make_unique<backend>(fpdt::host_backend_options{budget, mode, pinned_limit});
  }
};
} // namespace

using namespace fpdt_test::step_ops;

TEST_CASE("attention_step_ops host: merge equals merge_partials, exact for empty rows (A7 A9)") {
  merge_matches_host<host_fixture>();
}
TEST_CASE("attention_step_ops host: finalize rounds to bf16 like the host conversion") {
  finalize_rounds_like_host<host_fixture>();
}
TEST_CASE("attention_step_ops host: delta equals the float64 row sums") {
  delta_matches_float64<host_fixture>();
}
TEST_CASE("attention_step_ops host: copies and zero touch only their range") {
  copies_and_zero_touch_only_their_range<host_fixture>();
}
TEST_CASE("attention_step_ops host: Ulysses pack and unpack match the block formula, replicas summed in rank order (A3)") {
  ulysses_pack_unpack_match_formula<host_fixture>();
}
