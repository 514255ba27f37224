// fpdt-plan: will a long-context training run fit, with which chunk size, and how fast?
//
// The planner (include/fpdt/plan/) prices the same schedules the FPDT layer runs: per-rank device
// and pinned host memory of a training step, the longest sequence that fits, the recommended
// chunk size, and the predicted MFU.
//
//   fpdt-plan --model llama3-8b --gpus 4 --gpu a100-80gb --method fpdt
//   fpdt-plan --model gpt-13b --gpus 8 --gpu h200 --method ulysses --seq 256K
//   fpdt-plan --model llama3-8b --gpus 8 --gpu a100-80gb --sweep     (CSV for scripts/plot-plan.sh)
#include <fpdt/plan/plan.hpp>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace {

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: fpdt-plan --model NAME --gpus P --gpu NAME [--method fpdt|ulysses|megatron_sp]\n"
               "                 [--seq N] [--chunk C] [--zero 0-3] [--checkpointing on|off]\n"
               "                 [--checkpoint-offload on|off] [--offload on|off] [--dtype-bytes 1|2|4]\n"
               "                 [--window W] [--documents L1[,L2,...]] [--coarse] [--csv] [--sweep] [--config FILE]\n"
               "  Without --seq: the longest sequence that fits (device and host), the per-rank memory\n"
               "  there, the recommended chunk size and the predicted MFU. --seq N (suffix K = 1024,\n"
               "  M = 1048576) evaluates one length; --chunk fixes FPDT's chunk (global tokens); --window W\n"
               "  prices causal sliding-window attention of W tokens (FPDT skips the chunk pairs outside it,\n"
               "  and MFU counts only the window's FLOPs); --documents L1,L2,... prices packed documents of\n"
               "  these lengths (a sample of the training set's, K and M allowed; a prefix of them when S is\n"
               "  shorter than their sum, so mix the order), repeated to fill S, each\n"
               "  token attending within its document (FPDT skips the pairs across documents); --coarse\n"
               "  searches powers of two only; --csv prints a header and one row (the limit columns\n"
               "  are empty with --seq, which searches nothing); --sweep prints per-rank device\n"
               "  GiB of the three methods for S = 4K .. 16M (CSV, for scripts/plot-plan.sh).\n"
               "  Exit status: 0 with an answer that fits, 1 when nothing from 1K tokens up fits (with\n"
               "  --seq: when that length does not fit; the answer is printed either way), 2 on bad arguments.\n"
               "  Defaults: fpdt, ZeRO-3, checkpointing on with checkpoints offloaded, offload on, bf16.\n"
               "  --config FILE adds [model NAME] / [gpu NAME] sections (see include/fpdt/plan/presets.hpp).\n"
               "  models: gpt-2.7b gpt-6.7b gpt-13b gpt-30b llama3-8b llama3-70b\n"
               "  gpus:   a100-40gb a100-80gb h100-sxm h200\n");
}

constexpr fpdt::index_t max_search = fpdt::index_t{1} << 28; // tokens

struct options {
  std::string model, gpu, config;
  fpdt::training_config t;
  bool csv = false, sweep = false, finer = true, help = false;
};

fpdt::result<fpdt::index_t> parse_tokens(std::string_view a, std::string_view what) {
  std::uint64_t mult = 1;
  if (!a.empty() && (a.back() == 'K' || a.back() == 'k')) mult = 1024;
  if (!a.empty() && (a.back() == 'M' || a.back() == 'm')) mult = 1024 * 1024;
  if (mult != 1) a.remove_suffix(1);
  std::uint64_t v = 0;
  if (a.empty() || a.size() > 12) return fpdt::make_error(fpdt::errc::invalid_argument, what, " '", a, "' is not a number");
  for (char c : a) {
    if (c < '0' || c > '9') return fpdt::make_error(fpdt::errc::invalid_argument, what, " '", a, "' is not a number");
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  v *= mult;
  if (v < 1 || v > (std::uint64_t{1} << 34))
    return fpdt::make_error(fpdt::errc::invalid_argument, what, " ", v, " must be in [1, 2^34]");
  return static_cast<fpdt::index_t>(v);
}

// ", packed documents of 1024, 4096 tokens (repeated to fill S)" or "".
std::string documents_note(fpdt::training_config const& t) {
  if (t.document_lengths.empty()) return {};
  std::string s = ", packed documents of ";
  for (std::size_t i = 0; i < t.document_lengths.size(); ++i)
    s += (i > 0 ? ", " : "") + std::to_string(t.document_lengths[i]);
  return s + " tokens (repeated to fill S)";
}

fpdt::result<bool> parse_on_off(std::string_view a, std::string_view what) {
  if (a == "on") return true;
  if (a == "off") return false;
  return fpdt::make_error(fpdt::errc::invalid_argument, what, " must be on or off, got '", a, "'");
}

fpdt::result<options> parse(int argc, char** argv) {
  options o;
  o.t.sequence = 0;
  for (int i = 1; i < argc; ++i) {
    std::string_view const a = argv[i];
    if (a == "--help" || a == "-h") {
      o.help = true;
      return o;
    }
    if (a == "--csv") { o.csv = true; continue; }
    if (a == "--sweep") { o.sweep = true; continue; }
    if (a == "--coarse") { o.finer = false; continue; }
    constexpr std::string_view with_value[] = {"--model", "--gpu", "--config", "--method", "--gpus", "--seq",
                                               "--chunk", "--zero", "--dtype-bytes", "--checkpointing",
                                               "--checkpoint-offload", "--offload", "--window", "--documents"};
    bool known = false;
    for (auto k : with_value) known = known || a == k;
    if (!known) return fpdt::make_error(fpdt::errc::invalid_argument, "unknown option ", a);
    if (i + 1 >= argc) return fpdt::make_error(fpdt::errc::invalid_argument, "option ", a, " needs a value");
    std::string_view const v = argv[++i];
    if (a == "--model") o.model = v;
    else if (a == "--gpu") o.gpu = v;
    else if (a == "--config") o.config = v;
    else if (a == "--method") {
      if (v == "fpdt") o.t.method = fpdt::parallel_method::fpdt;
      else if (v == "ulysses") o.t.method = fpdt::parallel_method::ulysses;
      else if (v == "megatron_sp" || v == "megatron-sp" || v == "megatron") o.t.method = fpdt::parallel_method::megatron_sp;
      else return fpdt::make_error(fpdt::errc::invalid_argument, "--method must be fpdt, ulysses or megatron_sp, got '", v, "'");
    } else if (a == "--window") {
      auto x = parse_tokens(v, a);
      if (!x) return x.error();
      o.t.mask = fpdt::causal_window_mask(*x);
    } else if (a == "--documents") {
      o.t.document_lengths.clear();
      for (std::size_t at = 0;;) { // L1,L2,...: every field a length (no empty one)
        std::size_t const comma = v.find(',', at);
        auto x = parse_tokens(v.substr(at, comma == std::string_view::npos ? comma : comma - at), "--documents length");
        if (!x) return x.error();
        o.t.document_lengths.push_back(*x);
        if (comma == std::string_view::npos) break;
        at = comma + 1;
      }
    } else if (a == "--gpus" || a == "--seq" || a == "--chunk") {
      auto x = parse_tokens(v, a);
      if (!x) return x.error();
      (a == "--gpus" ? o.t.gpus : a == "--seq" ? o.t.sequence : o.t.chunk) = *x;
    } else if (a == "--zero") {
      if (v.size() != 1 || v[0] < '0' || v[0] > '3')
        return fpdt::make_error(fpdt::errc::invalid_argument, "--zero must be 0, 1, 2 or 3, got '", v, "'");
      o.t.zero_stage = v[0] - '0';
    } else if (a == "--dtype-bytes") {
      if (v != "1" && v != "2" && v != "4")
        return fpdt::make_error(fpdt::errc::invalid_argument, "--dtype-bytes must be 1, 2 or 4, got '", v, "'");
      o.t.dtype_bytes = v[0] - '0';
    } else if (a == "--checkpointing" || a == "--checkpoint-offload" || a == "--offload") {
      auto x = parse_on_off(v, a);
      if (!x) return x.error();
      (a == "--checkpointing" ? o.t.checkpointing : a == "--offload" ? o.t.offload : o.t.checkpoint_offload) = *x;
    } else {
      return fpdt::make_error(fpdt::errc::invalid_argument, "unknown option ", a);
    }
  }
  if (o.model.empty() || o.gpu.empty())
    return fpdt::make_error(fpdt::errc::invalid_argument, "--model and --gpu are required");
  return o;
}

std::string tokens(fpdt::index_t s) {
  if (s >= (1 << 20) && s % (1 << 20) == 0) return std::to_string(s >> 20) + "M";
  if (s >= (1 << 20) && s % (1 << 17) == 0) return std::to_string(static_cast<double>(s) / (1 << 20)).substr(0, 5) + "M";
  if (s >= 1024 && s % 1024 == 0) return std::to_string(s >> 10) + "K";
  return std::to_string(s);
}

double gib(std::uint64_t b) { return static_cast<double>(b) / static_cast<double>(std::uint64_t{1} << 30); }

void print_memory(fpdt::memory_breakdown const& m, fpdt::hardware_config const& hw, fpdt::parallel_method method) {
  // FPDT prices attention and the MLP as chunked working sets of their own; the other methods run
  // them unchunked inside the layer, so their bytes are in the layer's activations and gradients.
  bool const chunked = method == fpdt::parallel_method::fpdt;
  struct row {
    char const* name;
    std::uint64_t v;
    bool shown;
  } const rows[] = {{"parameters", m.parameters, true},
                    {"gradients", m.gradients, true},
                    {"optimizer states", m.optimizer, true},
                    {"ZeRO-3 gather buffers", m.zero_buffers, true},
                    {"checkpoints / activations", m.checkpoints, true},
                    {chunked ? "layer hidden states" : "layer activations + grads", m.layer_working, true},
                    {"attention working set", m.attention_working, chunked},
                    {"MLP chunk working set", m.mlp_working, chunked},
                    {"loss working set", m.loss_working, true},
                    {"reserved (context, libs)", m.reserved, true}};
  for (auto const& r : rows)
    if (r.shown)
      std::printf("  %-27s %9.2f GiB\n", r.name, gib(r.v));
    else
      std::printf("  %-27s %9s     (unchunked: in the layer's activations above)\n", r.name, "-");
  std::printf("  %-27s %9.2f GiB of %.1f GiB (peak: states + checkpoints + max(layer, loss))\n",
              "device total", gib(m.device_total()), gib(hw.device_bytes));
  std::printf("  %-27s %9.2f GiB (checkpoints %.2f, attention chunks %.2f) of %.1f GiB per GPU\n",
              "pinned host total", gib(m.host_total()), gib(m.host_checkpoints), gib(m.host_attention),
              gib(hw.host_bytes_per_gpu));
}

void csv_header() {
  std::printf("model,gpu,gpus,method,seq,chunk,device_limit,host_limit,fits_device,fits_host,"
              "device_bytes,host_bytes,parameters,gradients,optimizer,zero_buffers,checkpoints,"
              "layer_working,attention_working,mlp_working,loss_working,reserved,step_seconds,"
              "exposed_copy_seconds,mfu\n");
}

// device_limit and host_limit are empty when no search ran (--seq).
void csv_row(options const& o, fpdt::plan_point const& p, std::optional<fpdt::index_t> dev_limit,
             std::optional<fpdt::index_t> host_limit) {
  auto const& m = p.memory;
  auto field = [](std::optional<fpdt::index_t> v) { return v ? std::to_string(*v) : std::string(); };
  std::printf("%s,%s,%lld,%s,%lld,%lld,%s,%s,%d,%d,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%.6g,%.6g,%.4f\n",
              o.model.c_str(), o.gpu.c_str(), static_cast<long long>(p.training.gpus),
              std::string(fpdt::to_string(p.training.method)).c_str(),
              static_cast<long long>(p.training.sequence), static_cast<long long>(p.training.chunk),
              field(dev_limit).c_str(), field(host_limit).c_str(), p.fits_device ? 1 : 0,
              p.fits_host ? 1 : 0, static_cast<unsigned long long>(m.device_total()),
              static_cast<unsigned long long>(m.host_total()), static_cast<unsigned long long>(m.parameters),
              static_cast<unsigned long long>(m.gradients), static_cast<unsigned long long>(m.optimizer),
              static_cast<unsigned long long>(m.zero_buffers), static_cast<unsigned long long>(m.checkpoints),
              static_cast<unsigned long long>(m.layer_working), static_cast<unsigned long long>(m.attention_working),
              static_cast<unsigned long long>(m.mlp_working), static_cast<unsigned long long>(m.loss_working),
              static_cast<unsigned long long>(m.reserved), p.step ? p.step->step_seconds : 0.0,
              p.step ? p.step->exposed_copy_seconds : 0.0, p.step ? p.step->mfu : 0.0);
}

void print_point(options const& o, fpdt::plan_point const& p, fpdt::hardware_config const& hw) {
  std::printf("per-rank memory at %s tokens (%s):\n", tokens(p.training.sequence).c_str(),
              p.fits_device && p.fits_host ? "fits"
              : !p.fits_device && !p.fits_host ? "does NOT fit device or host"
              : !p.fits_device                 ? "does NOT fit the device"
                                               : "does NOT fit host memory");
  print_memory(p.memory, hw, p.training.method);
  if (p.training.method == fpdt::parallel_method::fpdt)
    std::printf("recommended chunk: %s tokens (%lld chunks of %s local tokens per rank)\n",
                tokens(p.training.chunk).c_str(), static_cast<long long>(p.training.sequence / p.training.chunk),
                tokens(p.training.chunk / p.training.gpus).c_str());
  if (p.step)
    std::printf("predicted step: %.3f s, MFU %.1f%%, exposed copy time %.3f s, comm %.3f s, %.0f tokens/s\n",
                p.step->step_seconds, 100 * p.step->mfu, p.step->exposed_copy_seconds, p.step->comm_seconds,
                p.step->tokens_per_second);
  (void)o;
}

int run(options const& o) {
  fpdt::plan_config extra;
  if (!o.config.empty()) {
    std::ifstream in(o.config);
    if (!in) {
      std::fprintf(stderr, "fpdt-plan: cannot read config file %s\n", o.config.c_str());
      return 2;
    }
    std::ostringstream text;
    text << in.rdbuf();
    auto c = fpdt::parse_plan_config(text.str(), o.config);
    if (!c) {
      std::fprintf(stderr, "fpdt-plan: %s\n", c.error().message().c_str());
      return 2;
    }
    extra = std::move(*c);
  }
  auto model = [&]() -> fpdt::result<fpdt::model_config> {
    for (auto const& m : extra.models) if (m.name == o.model) return m;
    return fpdt::find_model_preset(o.model);
  }();
  auto gpu = [&]() -> fpdt::result<fpdt::hardware_config> {
    for (auto const& g : extra.gpus) if (g.name == o.gpu) return g;
    return fpdt::find_gpu_preset(o.gpu);
  }();
  if (!model || !gpu) {
    std::fprintf(stderr, "fpdt-plan: %s\n", (!model ? model.error() : gpu.error()).message().c_str());
    return 2;
  }
  {
    fpdt::training_config x = o.t;
    if (x.sequence == 0) x.sequence = x.method == fpdt::parallel_method::fpdt && x.chunk > 0 ? x.chunk : x.gpus;
    if (auto st = fpdt::check_training(*model, x); !st) {
      std::fprintf(stderr, "fpdt-plan: %s\n", st.message().c_str());
      return 2;
    }
    if (auto st = fpdt::check_hardware(*gpu); !st) {
      std::fprintf(stderr, "fpdt-plan: %s\n", st.message().c_str());
      return 2;
    }
  }
  if (o.sweep) {
    std::printf("seq,fpdt_gib,ulysses_gib,megatron_sp_gib,device_gib\n");
    for (fpdt::index_t s = 4096; s <= (fpdt::index_t{1} << 24); s *= 2) {
      std::printf("%lld", static_cast<long long>(s));
      for (auto meth : {fpdt::parallel_method::fpdt, fpdt::parallel_method::ulysses, fpdt::parallel_method::megatron_sp}) {
        fpdt::training_config t = o.t;
        t.method = meth;
        t.sequence = s;
        t.chunk = meth == fpdt::parallel_method::fpdt ? o.t.chunk : 0;
        auto p = fpdt::evaluate_plan(*model, t, *gpu, false);
        if (p) std::printf(",%.3f", gib(p->memory.device_total()));
        else std::printf(",");
      }
      std::printf(",%.3f\n", gib(gpu->device_bytes));
    }
    return 0;
  }
  if (!o.csv)
    std::printf("fpdt-plan: %s on %lld x %s (%.1f GiB device, %.0f GiB host per GPU), method %s, ZeRO-%d, "
                "checkpointing %s%s, mask %s%s\n",
                model->name.c_str(), static_cast<long long>(o.t.gpus), gpu->name.c_str(), gib(gpu->device_bytes),
                gib(gpu->host_bytes_per_gpu), std::string(fpdt::to_string(o.t.method)).c_str(), o.t.zero_stage,
                o.t.checkpointing ? "on" : "off",
                o.t.checkpointing ? (o.t.checkpoint_offload ? " (offloaded to host)" : " (on device)") : "",
                fpdt::to_string(o.t.mask).c_str(), documents_note(o.t).c_str());
  if (o.t.sequence > 0) {
    auto p = fpdt::evaluate_plan(*model, o.t, *gpu, true);
    if (!p) {
      std::fprintf(stderr, "fpdt-plan: %s\n", p.error().message().c_str());
      return 2;
    }
    if (o.csv) {
      csv_header();
      csv_row(o, *p, std::nullopt, std::nullopt);
    } else {
      print_point(o, *p, *gpu);
    }
    return p->fits_device && p->fits_host ? 0 : 1; // scripts can tell "does not fit" from "fits"
  }
  auto a = fpdt::longest_sequence(*model, o.t, *gpu, o.finer, 1024, max_search);
  if (!a) {
    std::fprintf(stderr, "fpdt-plan: %s\n", a.error().message().c_str());
    return 2;
  }
  if (o.csv) {
    csv_header();
    if (a->at_longest) csv_row(o, *a->at_longest, a->device_limit, a->host_limit);
    return a->longest == 0 ? 1 : 0;
  }
  auto limit = [](fpdt::index_t s) {
    return s == 0 ? std::string("nothing") : s >= max_search ? ">= " + tokens(max_search) : tokens(s);
  };
  if (a->longest == 0) {
    std::printf("nothing from 1K tokens up fits (device alone: %s, host alone: %s)\n",
                limit(a->device_limit).c_str(), limit(a->host_limit).c_str());
    fpdt::training_config t = o.t;
    t.sequence = 1024 * o.t.gpus;
    auto p = fpdt::evaluate_plan(*model, t, *gpu, false);
    if (p) print_point(o, *p, *gpu);
    return 1; // scripts can tell "nothing fits" from an answer
  }
  std::printf("longest sequence that fits: %s tokens (%lld); device memory alone allows %s, host memory alone %s\n",
              tokens(a->longest).c_str(), static_cast<long long>(a->longest), limit(a->device_limit).c_str(),
              limit(a->host_limit).c_str());
  print_point(o, *a->at_longest, *gpu);
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv);
  if (!o) {
    std::fprintf(stderr, "fpdt-plan: %s\n", o.error().message().c_str());
    usage(stderr);
    return 2;
  }
  if (o->help) {
    usage(stdout);
    return 0;
  }
  return run(*o);
}
