// Fuzz target: fpdt-plan's config-file parser (parse_plan_config). Any text is either refused with
// "SOURCE:LINE: ..." or gives models and GPUs that pass their checks; the memory model then prices
// each model on each GPU without crashing (any error it returns names its values).
#include <fpdt/plan/planner.hpp>
#include <fpdt/plan/presets.hpp>

#include "fuzz_common.hpp"

#include <cstdint>
#include <string>

namespace {
[[noreturn]] void fail(char const* what, std::string const& detail) {
  fpdt_fuzz::fail("fuzz_plan_config", what, detail.c_str());
}
} // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::string const text(reinterpret_cast<char const*>(data), size);
  auto cfg = fpdt::parse_plan_config(text, "fuzz.cfg");
  if (!cfg) {
    if (cfg.error().message().rfind("fuzz.cfg:", 0) != 0) fail("a refusal without SOURCE:LINE", cfg.error().message());
    return 0;
  }
  for (auto const& m : cfg->models) {
    if (auto st = fpdt::check_model(m); !st.ok()) fail("a parsed model that fails check_model", st.message());
    for (fpdt::index_t gpus : {1, 4}) {
      fpdt::training_config t;
      t.gpus = gpus;
      t.sequence = 65536;
      auto mem = fpdt::estimate_memory(m, t);
      if (!mem && mem.error().message().empty()) fail("an estimate_memory error without a message", m.name);
    }
  }
  for (auto const& g : cfg->gpus)
    if (auto st = fpdt::check_hardware(g); !st.ok()) fail("a parsed GPU that fails check_hardware", st.message());
  return 0;
}
