// Tests of include/fpdt/plan/presets.hpp: the presets are valid, and the config file parser reads
// models and GPUs and names the line and key of every error.
#include <fpdt/plan/presets.hpp>

#include <doctest/doctest.h>

#include <string>

TEST_CASE("presets: every preset passes its check") {
  for (auto const& m : fpdt::model_presets()) CHECK_MESSAGE(fpdt::check_model(m).ok(), m.name);
  for (auto const& g : fpdt::gpu_presets()) CHECK_MESSAGE(fpdt::check_hardware(g).ok(), g.name);
  CHECK(fpdt::find_gpu_preset("h200")->device_bytes > fpdt::find_gpu_preset("h100-sxm")->device_bytes);
  auto missing = fpdt::find_model_preset("gpt-5");
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().message().find("llama3-70b") != std::string::npos); // lists the known ones
}

TEST_CASE("presets: a config file defines models and GPUs, from scratch or from a base") {
  char const* text = R"(# my cluster
[model tiny]
layers = 4
hidden = 256   # comment after a value
heads = 8
kv_heads = 2
ffn = 1024
ffn_kind = swiglu
vocab = 32000
tied_embeddings = false

[gpu my-h100]
base = h100-sxm
memory_gib = 94
pcie_both_gbps = 100
)";
  auto c = fpdt::parse_plan_config(text, "my.cfg");
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  REQUIRE(c->models.size() == 1);
  REQUIRE(c->gpus.size() == 1);
  CHECK(c->models[0].name == "tiny");
  CHECK(c->models[0].ffn_type == fpdt::ffn_kind::swiglu);
  CHECK(c->models[0].kv_heads == 2);
  CHECK_FALSE(c->models[0].tied_embeddings);
  CHECK(c->gpus[0].name == "my-h100");
  CHECK(c->gpus[0].device_bytes == std::uint64_t{94} << 30);
  CHECK(c->gpus[0].pcie_both_gbps == 100);
  CHECK(c->gpus[0].peak_tflops == fpdt::find_gpu_preset("h100-sxm")->peak_tflops);
}

TEST_CASE("presets: config errors name the file, line and key") {
  struct bad {
    char const* text;
    char const* want;
  } const cases[] = {
      {"[model a]\nbase = llama3-8b\nlayerz = 3\n", "x.cfg:3: key 'layerz'"},
      {"[model a]\nbase = llama3-8b\nlayers = -3\n", "x.cfg:3: key 'layers'"},
      {"[gpu g]\nbase = a100-80gb\nhbm_gbps = fast\n", "x.cfg:3: key 'hbm_gbps'"},
      {"layers = 3\n", "x.cfg:1: key 'layers' outside"},
      {"[cpu c]\n", "x.cfg:1: unknown section kind 'cpu'"},
      {"[model]\n", "x.cfg:1: section 'model' needs a name"},
      {"[model a]\nbase = gpt-99\n", "x.cfg:2: key 'base'"},
      {"[model a]\nbase = gpt-2.7b\nheads = 7\n", "x.cfg:1: model a: hidden 2560 is not divisible by heads 7"},
      {"[gpu g]\nmemory_gib = 80\n", "x.cfg:1: gpu g: host_memory"},
      {"[model a]\nlayers 3\n", "x.cfg:2: expected key = value"},
  };
  for (auto const& b : cases) {
    CAPTURE(b.text);
    auto c = fpdt::parse_plan_config(b.text, "x.cfg");
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().code() == fpdt::errc::invalid_argument);
    CHECK_MESSAGE(c.error().message().find(b.want) != std::string::npos, c.error().message());
  }
}
