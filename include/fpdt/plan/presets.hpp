//! \file
//! \brief Presets for the planner (GPUs and models the FPDT paper uses) and a small key = value
//! config file format for your own.
//!
//! GPU figures: memory, HBM bandwidth, BF16 dense peak, NVLink and PCIe generation are NVIDIA's
//! published specifications (A100 datasheet, H100 datasheet, H200 product page; DGX A100, DGX
//! H100 and DGX H200 user guides for host memory and network). Achievable rates (GEMM, attention,
//! PCIe, all-to-all) are typical measurements, cited beside each; replace them with your own
//! measurements in a config file (`bench/`, `scripts/gpu-check.sh` and nccl-tests give them).
//!
//! Config file: lines `key = value`; `#` starts a comment; a section header `[model NAME]` or
//! `[gpu NAME]` starts a definition, optionally copying a preset with `base = PRESET`. Keys:
//! - model: layers, hidden, heads, kv_heads, ffn, ffn_kind (gelu | swiglu), vocab,
//!   tied_embeddings (true | false);
//! - gpu: memory_gib, host_memory_gib (per GPU), reserved_gib, peak_tflops, matmul_tflops,
//!   attention_fwd_tflops, attention_bwd_tflops, hbm_gbps, pcie_h2d_gbps, pcie_d2h_gbps,
//!   pcie_both_gbps, intra_node_a2a_gbps, inter_node_a2a_gbps, gpus_per_node.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"
#include "cost_model.hpp"
#include "memory_model.hpp"

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

FPDT_NAMESPACE_BEGIN

namespace detail::plan {
inline constexpr std::uint64_t gib = std::uint64_t{1} << 30;
inline constexpr std::uint64_t mib = std::uint64_t{1} << 20;
} // namespace detail::plan

//! The GPU presets: "a100-40gb", "a100-80gb", "h100-sxm", "h200".
[[nodiscard]] inline std::vector<hardware_config> gpu_presets() {
  using detail::plan::gib;
  using detail::plan::mib;
  std::vector<hardware_config> v;
  // Shared assumptions: 2 GiB of each GPU go to the CUDA context, NCCL and cuBLAS workspaces and
  // allocator slack. GEMMs reach about 80% (A100) / 70% (H100) of peak on large BF16 shapes
  // (cuBLAS measurements, e.g. NVIDIA's "Deep Learning Performance" GEMM guide). Attention rates are
  // model FLOP/s: FlashAttention-2 on A100 (Dao, arXiv 2307.08691, fig. 5-6: causal, head dim 128,
  // 16K: ~195 TFLOP/s forward, ~175 backward counted at 2.5x forward FLOPs = ~140 at 2x) and
  // FlashAttention-3 on H100 (Shah et al., arXiv 2407.08608, fig. 5-6: ~640 forward, ~500 backward
  // at 2.5x = ~400 at 2x). PCIe: pinned cudaMemcpy measurements reach ~80% of the link (gen4 x16:
  // 32 GB/s a direction, ~25 measured, ~42 both ways; gen5 x16: 64, ~50, ~90). All-to-all bus
  // bandwidth: nccl-tests alltoall inside a DGX (NVLink 3: 600 GB/s total, ~220 measured; NVLink 4:
  // 900 total, ~350) and across nodes one NIC per GPU (HDR 200 Gb/s = 25 GB/s, ~22; NDR 400 Gb/s =
  // 50 GB/s, ~45).
  hardware_config a100_40;
  a100_40.name = "a100-40gb";
  a100_40.device_bytes = 40 * gib;          // A100 SXM4 40GB: 40960 MiB HBM2, 1555 GB/s
  a100_40.host_bytes_per_gpu = 1024 * gib / 8; // DGX A100 320GB: 1 TB system memory, 8 GPUs
  a100_40.reserved_bytes = 2 * gib;
  a100_40.peak_tflops = 312;                // BF16 tensor core, dense
  a100_40.matmul_tflops = 250;
  a100_40.attention_fwd_tflops = 195;
  a100_40.attention_bwd_tflops = 140;
  a100_40.hbm_gbps = 1555;
  a100_40.pcie_h2d_gbps = 25;               // PCIe gen4 x16
  a100_40.pcie_d2h_gbps = 25;
  a100_40.pcie_both_gbps = 42;
  a100_40.intra_node_a2a_gbps = 220;        // NVLink 3, 600 GB/s total
  a100_40.inter_node_a2a_gbps = 22;         // 8x HDR 200 Gb/s per DGX A100
  a100_40.gpus_per_node = 8;
  v.push_back(a100_40);
  hardware_config a100_80 = a100_40;
  a100_80.name = "a100-80gb";
  a100_80.device_bytes = 80 * gib;          // A100 SXM4 80GB: 81920 MiB HBM2e, 2039 GB/s
  a100_80.host_bytes_per_gpu = 2048 * gib / 8; // DGX A100 640GB: 2 TB system memory
  a100_80.hbm_gbps = 2039;
  v.push_back(a100_80);
  hardware_config h100;
  h100.name = "h100-sxm";
  h100.device_bytes = 81559 * mib;          // H100 SXM5 80GB: HBM3, 3.35 TB/s
  h100.host_bytes_per_gpu = 2048 * gib / 8; // DGX H100: 2 TB system memory
  h100.reserved_bytes = 2 * gib;
  h100.peak_tflops = 989;                   // BF16 tensor core, dense (1979 with sparsity)
  h100.matmul_tflops = 700;
  h100.attention_fwd_tflops = 640;
  h100.attention_bwd_tflops = 400;
  h100.hbm_gbps = 3350;
  h100.pcie_h2d_gbps = 50;                  // PCIe gen5 x16
  h100.pcie_d2h_gbps = 50;
  h100.pcie_both_gbps = 90;
  h100.intra_node_a2a_gbps = 350;           // NVLink 4, 900 GB/s total
  h100.inter_node_a2a_gbps = 45;            // 8x NDR 400 Gb/s per DGX H100
  h100.gpus_per_node = 8;
  v.push_back(h100);
  hardware_config h200 = h100;
  h200.name = "h200";
  h200.device_bytes = 143771 * mib;         // H200 SXM: 141 GB HBM3e, 4.8 TB/s; H100's compute
  h200.hbm_gbps = 4800;
  h200.host_bytes_per_gpu = 2048 * gib / 8; // DGX H200: 2 TB system memory
  v.push_back(h200);
  return v;
}

//! The model presets: "gpt-2.7b", "gpt-6.7b", "gpt-13b", "gpt-30b" (GPT: vocab 50257, ffn 4h
//! gelu, tied embeddings, as in the FPDT paper's table 1), "llama3-8b", "llama3-70b" (Llama 3:
//! vocab 128256, SwiGLU, untied output, 8 kv heads; Meta's model cards).
[[nodiscard]] inline std::vector<model_config> model_presets() {
  auto gpt = [](char const* name, index_t layers, index_t hidden, index_t heads) {
    return model_config{name, layers, hidden, heads, heads, 4 * hidden, ffn_kind::gelu, 50257, true};
  };
  return {gpt("gpt-2.7b", 32, 2560, 32), gpt("gpt-6.7b", 32, 4096, 32), gpt("gpt-13b", 40, 5120, 40),
          gpt("gpt-30b", 64, 6144, 64),
          model_config{"llama3-8b", 32, 4096, 32, 8, 14336, ffn_kind::swiglu, 128256, false},
          model_config{"llama3-70b", 80, 8192, 64, 8, 28672, ffn_kind::swiglu, 128256, false}};
}

//! Models and GPUs read from a config file (presets not included).
struct plan_config {
  std::vector<model_config> models; //!< in file order
  std::vector<hardware_config> gpus; //!< in file order
};

namespace detail::plan {

template <class T> [[nodiscard]] result<T> find_named(std::vector<T> const& v, std::string_view name, char const* what) {
  std::string known;
  for (auto const& x : v) {
    if (x.name == name) return x;
    known += known.empty() ? x.name : ", " + x.name;
  }
  return make_error(errc::invalid_argument, "unknown ", what, " '", name, "' (known: ", known, ")");
}

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

inline result<double> parse_number(std::string_view v) {
  double x = 0;
  auto const [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc{} || ptr != v.data() + v.size() || !(x >= 0))
    return make_error(errc::invalid_argument, "'", v, "' is not a non-negative number");
  return x;
}

inline result<index_t> parse_count(std::string_view v) {
  index_t x = 0;
  auto const [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc{} || ptr != v.data() + v.size() || x < 0)
    return make_error(errc::invalid_argument, "'", v, "' is not a non-negative integer");
  return x;
}

inline status set_model_key(model_config& m, std::string_view k, std::string_view v) {
  struct field {
    char const* key;
    index_t* to;
  } const fs[] = {{"layers", &m.layers}, {"hidden", &m.hidden}, {"heads", &m.heads},
                  {"kv_heads", &m.kv_heads}, {"ffn", &m.ffn}, {"vocab", &m.vocab}};
  for (auto const& f : fs)
    if (k == f.key) {
      auto x = parse_count(v);
      if (!x) return x.error();
      *f.to = *x;
      return {};
    }
  if (k == "ffn_kind") {
    if (v == "gelu") m.ffn_type = ffn_kind::gelu;
    else if (v == "swiglu") m.ffn_type = ffn_kind::swiglu;
    else return make_error(errc::invalid_argument, "'", v, "' is not gelu or swiglu");
    return {};
  }
  if (k == "tied_embeddings") {
    if (v == "true") m.tied_embeddings = true;
    else if (v == "false") m.tied_embeddings = false;
    else return make_error(errc::invalid_argument, "'", v, "' is not true or false");
    return {};
  }
  return make_error(errc::invalid_argument, "unknown model key");
}

inline status set_gpu_key(hardware_config& g, std::string_view k, std::string_view v) {
  struct field {
    char const* key;
    double* to;
  } const fs[] = {{"peak_tflops", &g.peak_tflops}, {"matmul_tflops", &g.matmul_tflops},
                  {"attention_fwd_tflops", &g.attention_fwd_tflops},
                  {"attention_bwd_tflops", &g.attention_bwd_tflops}, {"hbm_gbps", &g.hbm_gbps},
                  {"pcie_h2d_gbps", &g.pcie_h2d_gbps}, {"pcie_d2h_gbps", &g.pcie_d2h_gbps},
                  {"pcie_both_gbps", &g.pcie_both_gbps}, {"intra_node_a2a_gbps", &g.intra_node_a2a_gbps},
                  {"inter_node_a2a_gbps", &g.inter_node_a2a_gbps}};
  for (auto const& f : fs)
    if (k == f.key) {
      auto x = parse_number(v);
      if (!x) return x.error();
      *f.to = *x;
      return {};
    }
  struct bytes_field {
    char const* key;
    std::uint64_t* to;
  } const bs[] = {{"memory_gib", &g.device_bytes}, {"host_memory_gib", &g.host_bytes_per_gpu},
                  {"reserved_gib", &g.reserved_bytes}};
  for (auto const& f : bs)
    if (k == f.key) {
      auto x = parse_number(v);
      if (!x) return x.error();
      *f.to = static_cast<std::uint64_t>(*x * static_cast<double>(gib));
      return {};
    }
  if (k == "gpus_per_node") {
    auto x = parse_count(v);
    if (!x) return x.error();
    g.gpus_per_node = *x;
    return {};
  }
  return make_error(errc::invalid_argument, "unknown gpu key");
}

} // namespace detail::plan

//! The preset model called `name`. Errors: `errc::invalid_argument` listing the known names.
[[nodiscard]] inline result<model_config> find_model_preset(std::string_view name) {
  return detail::plan::find_named(model_presets(), name, "model");
}

//! The preset GPU called `name`. Errors: `errc::invalid_argument` listing the known names.
[[nodiscard]] inline result<hardware_config> find_gpu_preset(std::string_view name) {
  return detail::plan::find_named(gpu_presets(), name, "gpu");
}

//! Parses a config file's text (see the file comment); `source` names it in messages. Each
//! definition is checked (`check_model`, `check_hardware`) when its section ends.
//! Errors: `errc::invalid_argument` as "SOURCE:LINE: ..." naming the key or section, for an
//! unknown section kind or key, a value that does not parse, a key outside a section, an unknown
//! base, or a definition that fails its check.
[[nodiscard]] inline result<plan_config> parse_plan_config(std::string_view text, std::string_view source) {
  plan_config out;
  enum class kind { none, model, gpu } cur = kind::none;
  std::size_t section_line = 0, line_no = 0;
  auto finish = [&]() -> status {
    status s;
    if (cur == kind::model) s = check_model(out.models.back());
    if (cur == kind::gpu) s = check_hardware(out.gpus.back());
    if (!s) return s.with_context(detail::concat(source, ":", section_line));
    return {};
  };
  while (!text.empty()) {
    std::size_t const nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    ++line_no;
    if (auto const hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    line = detail::plan::trim(line);
    if (line.empty()) continue;
    auto where = [&](auto const&... args) {
      return make_error(errc::invalid_argument, source, ":", line_no, ": ", args...);
    };
    if (line.front() == '[') {
      if (line.back() != ']') return where("section header '", line, "' lacks ']'");
      FPDT_TRY(finish());
      std::string_view const body = detail::plan::trim(line.substr(1, line.size() - 2));
      std::size_t const sp = body.find(' ');
      std::string_view const k = body.substr(0, sp);
      std::string_view const name = sp == std::string_view::npos ? std::string_view{} : detail::plan::trim(body.substr(sp));
      if (name.empty()) return where("section '", body, "' needs a name: [model NAME] or [gpu NAME]");
      section_line = line_no;
      if (k == "model") {
        cur = kind::model;
        out.models.push_back(model_config{});
        out.models.back().name = std::string(name);
      } else if (k == "gpu") {
        cur = kind::gpu;
        out.gpus.push_back(hardware_config{});
        out.gpus.back().name = std::string(name);
      } else {
        return where("unknown section kind '", k, "' (model or gpu)");
      }
      continue;
    }
    std::size_t const eq = line.find('=');
    if (eq == std::string_view::npos) return where("expected key = value, got '", line, "'");
    std::string_view const key = detail::plan::trim(line.substr(0, eq));
    std::string_view const value = detail::plan::trim(line.substr(eq + 1));
    if (cur == kind::none) return where("key '", key, "' outside a [model NAME] or [gpu NAME] section");
    if (key == "base") {
      if (cur == kind::model) {
        auto b = find_model_preset(value);
        if (!b) return where("key 'base': ", b.error().message());
        std::string const name = out.models.back().name;
        out.models.back() = *b;
        out.models.back().name = name;
      } else {
        auto b = find_gpu_preset(value);
        if (!b) return where("key 'base': ", b.error().message());
        std::string const name = out.gpus.back().name;
        out.gpus.back() = *b;
        out.gpus.back().name = name;
      }
      continue;
    }
    status const s = cur == kind::model ? detail::plan::set_model_key(out.models.back(), key, value)
                                        : detail::plan::set_gpu_key(out.gpus.back(), key, value);
    if (!s) return where("key '", key, "': ", s.message());
  }
  FPDT_TRY(finish());
  return out;
}

FPDT_NAMESPACE_END
