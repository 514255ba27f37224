// fpdt-train: trains a small decoder-only byte-level transformer on real text with a long context,
// using fpdt's FPDT attention, chunked MLP and chunked loss (model.hpp). The main job of the
// project: ./scripts/run.sh runs it with the defaults.
//
// Ranks are threads of this process with the in-process communicator (--ranks P), or MPI
// processes when started by mpirun and built with MPI. Every rank runs the host backend (a
// budgeted "device" arena and a pinned pool); peak device bytes are the arena's exact peak.
// Each step prints "step N loss X ..." (scripts read it); at the end the program prints what
// the same model would need per rank without chunking and offload (plan/memory_model.hpp) and
// writes rank 0's last attention pass as a Perfetto trace.
#include "model.hpp"

#include "../common/cli.hpp"

#if defined(FPDT_TRAIN_WITH_CBLAS)
#include <fpdt/core/cblas_gemm.hpp>
#endif
#if defined(FPDT_EXAMPLE_WITH_MPI)
#include <fpdt/comm/mpi/mpi_communicator.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace {

using fpdt::index_t;
#if defined(FPDT_TRAIN_WITH_CBLAS)
using gemm_t = fpdt::cblas_gemm;
#else
using gemm_t = fpdt::host_gemm;
#endif

struct options {
  index_t ranks = 4, seq = 16384, chunk = 4096, layers = 2, hidden = 256, heads = 8, kv_heads = 2, steps = 10;
  index_t device_budget = index_t{1} << 30;
  index_t window = 0; // causal sliding window of W tokens (0: none)
  bool offload = true, ranks_given = false, documents = false, sinks = false;
  double lr = 3e-3;
  std::string data, trace = "fpdt-train-trace.json";
};

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: fpdt-train [--seq S] [--chunk C] [--ranks P] [--layers L] [--hidden H] [--heads N]\n"
               "                  [--kv-heads K] [--steps N] [--offload on|off] [--data FILE] [--trace FILE]\n"
               "                  [--device-budget BYTES] [--lr X] [--window W] [--documents on|off] [--sinks on|off]\n"
               "  Trains a byte-level transformer (RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP,\n"
               "  AdamW) with FPDT attention, chunked MLP and chunked loss on P ranks (threads, or MPI\n"
               "  processes under mpirun). Defaults: S=16384 C=4096 P=4 L=2 H=256 N=8 K=2, 10 steps,\n"
               "  offload on, device budget 1 GiB per rank, lr 3e-3, data: the licence texts in\n"
               "  /usr/share/common-licenses, trace fpdt-train-trace.json.\n"
               "  Rules: S %% C == 0, C %% P == 0, N %% P == 0, K %% P == 0 or P %% K == 0, H %% N == 0 with an\n"
               "  even head dim; the data must hold at least S + 1 bytes.\n"
               "  --window W: causal sliding-window attention of W tokens. --documents on: each input file\n"
               "  is a document; a step's window packs the documents it covers, attention sees only each\n"
               "  token's own document, rotary positions restart at every document and each document's\n"
               "  last byte has no label (with --data FILE there is one document). --sinks on: a learnable\n"
               "  attention sink logit per head and layer (GPT-OSS), initialised to 0.\n"
               "  Each step prints 'step N loss X tokens/s T peak_device_bytes B'.\n");
}

fpdt::result<options> parse(int argc, char** argv) {
  options o;
  fpdt_examples::int_option const specs[] = {
      {"--ranks", &o.ranks, 1, 64},          {"--seq", &o.seq, 2, index_t{1} << 26},
      {"--chunk", &o.chunk, 1, index_t{1} << 26}, {"--layers", &o.layers, 1, 1024},
      {"--hidden", &o.hidden, 2, 65536},     {"--heads", &o.heads, 1, 1024},
      {"--kv-heads", &o.kv_heads, 1, 1024},  {"--steps", &o.steps, 0, 1000000},
      {"--device-budget", &o.device_budget, 1, index_t{1} << 50}, {"--window", &o.window, 1, index_t{1} << 26}};
  bool chunk_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    }
    auto const* spec = fpdt_examples::find(specs, a);
    bool const known = a == "--offload" || a == "--documents" || a == "--sinks" || a == "--trace" || a == "--data" || a == "--lr" ||
                       spec != nullptr;
    if (!known) return fpdt::make_error(fpdt::errc::invalid_argument, "unknown option ", a, " (--help lists them)");
    if (i + 1 >= argc) return fpdt::make_error(fpdt::errc::invalid_argument, "option ", a, " needs a value");
    std::string const val = argv[++i];
    if (a == "--offload" || a == "--documents" || a == "--sinks") {
      auto on = fpdt_examples::on_off(a.c_str(), val);
      if (!on) return on.error();
      (a == "--offload" ? o.offload : a == "--documents" ? o.documents : o.sinks) = *on;
    } else if (a == "--trace") {
      o.trace = val;
    } else if (a == "--data") {
      o.data = val;
    } else if (a == "--lr") {
      char* end = nullptr;
      o.lr = std::strtod(val.c_str(), &end);
      if (val.empty() || *end != '\0' || !(o.lr > 0 && o.lr < 1))
        return fpdt::make_error(fpdt::errc::invalid_argument, "--lr '", val, "' must be a number in (0, 1)");
    } else {
      FPDT_TRY(fpdt_examples::set(*spec, val));
      chunk_given = chunk_given || spec->value == &o.chunk;
      o.ranks_given = o.ranks_given || spec->value == &o.ranks;
    }
  }
  if (!chunk_given) o.chunk = std::min(o.chunk, o.seq);
  FPDT_TRY(fpdt_examples::check_writable("--trace", o.trace));
  return o;
}

// The training text and where each file starts in it (the documents of --documents).
struct corpus {
  std::vector<std::uint8_t> bytes;
  std::vector<std::size_t> starts;
};

// The training text: --data FILE, or the licence texts every Debian system ships, concatenated
// in name order.
fpdt::result<corpus> load_text(options const& o) {
  corpus c;
  std::vector<std::uint8_t>& text = c.bytes;
  auto append = [&](std::filesystem::path const& p) {
    std::ifstream in(p, std::ios::binary);
    c.starts.push_back(text.size());
    text.insert(text.end(), std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  if (!o.data.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(o.data, ec))
      return fpdt::make_error(fpdt::errc::invalid_argument, "--data ", o.data, ": not a readable file");
    append(o.data);
  } else {
    std::filesystem::path const dir = "/usr/share/common-licenses";
    std::error_code ec;
    std::vector<std::filesystem::path> files;
    for (auto const& e : std::filesystem::directory_iterator(dir, ec))
      if (e.is_regular_file()) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (auto const& f : files) append(f);
  }
  if (static_cast<index_t>(text.size()) < o.seq + 1)
    return fpdt::make_error(fpdt::errc::invalid_argument, "training text has ", text.size(), " bytes, fewer than S + 1 = ",
                            o.seq + 1, (o.data.empty() ? " (from /usr/share/common-licenses; pass --data FILE)" : ""));
  return c;
}

// Where step n's window of S + 1 bytes starts: a deterministic walk through the text.
std::size_t window_start(std::vector<std::uint8_t> const& text, index_t seq, index_t step) {
  std::size_t const room = text.size() - static_cast<std::size_t>(seq) - 1 + 1;
  return static_cast<std::size_t>(step) * 2654435761u % room;
}
std::span<std::uint8_t const> window(std::vector<std::uint8_t> const& text, index_t seq, index_t step) {
  return {text.data() + window_start(text, seq, step), static_cast<std::size_t>(seq) + 1};
}

// The documents of step n's window (cu_seqlens: 0, each file start inside the window, S).
std::vector<index_t> window_documents(corpus const& c, index_t seq, index_t step) {
  std::size_t const at = window_start(c.bytes, seq, step);
  std::vector<index_t> offsets{0};
  for (std::size_t b : c.starts)
    if (b > at && b < at + static_cast<std::size_t>(seq)) offsets.push_back(static_cast<index_t>(b - at));
  offsets.push_back(seq);
  return offsets;
}

struct rank_report {
  std::vector<double> loss, seconds;
  std::vector<double> causal_seconds; // the plain causal baseline's steps (runs with a window, documents or sinks)
  std::size_t peak = 0, pinned = 0;
};

std::mutex print_mutex;

// host_gemm parallelises over rows itself; a BLAS has its own threads.
template <class G> void set_threads(G& g, unsigned threads) {
  if constexpr (requires { g.threads; }) g.threads = threads;
}

template <class Comm>
fpdt::status run_rank(options const& o, corpus const& corpus_text, Comm& comm, rank_report& rep) {
  std::vector<std::uint8_t> const& text = corpus_text.bytes;
  bool const lead = comm.rank() == 0;
  fpdt_train::model_config cfg;
  cfg.layers = o.layers;
  cfg.hidden = o.hidden;
  cfg.heads = o.heads;
  cfg.kv_heads = o.kv_heads;
  cfg.sinks = o.sinks;
  fpdt::host_backend be({.device_budget_bytes = static_cast<std::size_t>(o.device_budget)});
  unsigned const hw = std::max(1u, std::thread::hardware_concurrency());
  unsigned const threads = std::max(1u, hw / static_cast<unsigned>(comm.size()));
  fpdt_train::run_options ro{.seq = o.seq, .chunk = o.chunk, .offload = o.offload, .kind = fpdt_train::pieces::fpdt,
                             .kernel_threads = threads, .window = o.window};
  gemm_t gemm{};
  set_threads(gemm, threads);
  // Fail at once, not minutes into a step, when the plan does not fit the budget.
  auto need = fpdt_train::planned_device_bytes(cfg, ro, static_cast<index_t>(comm.size()));
  if (!need) return need.error();
  if (*need > static_cast<std::size_t>(o.device_budget))
    return fpdt::make_error(fpdt::errc::out_of_memory, "a step needs ", *need,
                            " device bytes per rank (planned_device_bytes), over --device-budget ", o.device_budget,
                            o.offload ? "; use a smaller --chunk or a larger budget"
                                      : "; use a smaller --chunk, --offload on, or a larger budget");
  auto model = fpdt_train::model_rank<float, Comm, gemm_t>::create(be, comm, cfg, ro, gemm);
  if (!model) return model.error();
  auto t_step = std::chrono::steady_clock::now();
  auto t_print = t_step;
  index_t step_no = 0;
  if (lead)
    (*model)->on_progress([&](char const* phase, index_t l) {
      auto now = std::chrono::steady_clock::now();
      if (now - t_print < std::chrono::seconds(5)) return;
      t_print = now;
      std::lock_guard lock(print_mutex);
      double const secs = std::chrono::duration<double>(now - t_step).count();
      if (l < o.layers)
        std::fprintf(stderr, "  ... step %lld: %s, layer %lld of %lld, %.0f s into the step\n",
                     static_cast<long long>(step_no), phase, static_cast<long long>(l + 1),
                     static_cast<long long>(o.layers), secs);
      else
        std::fprintf(stderr, "  ... step %lld: %s, %.0f s into the step\n", static_cast<long long>(step_no), phase, secs);
    });
  for (index_t s = 0; s < o.steps; ++s) {
    step_no = s;
    t_step = t_print = std::chrono::steady_clock::now();
    be.device_memory().reset_peak();
    std::vector<index_t> const docs = o.documents ? window_documents(corpus_text, o.seq, s) : std::vector<index_t>{};
    auto st = (*model)->forward_backward(window(text, o.seq, s), docs);
    if (!st) return st.error();
    (*model)->adamw(o.lr, static_cast<int>(s + 1));
    double const secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_step).count();
    rep.loss.push_back(st->loss);
    rep.seconds.push_back(secs);
    rep.peak = std::max(rep.peak, be.device_memory().stats().peak_bytes);
    rep.pinned = std::max(rep.pinned, be.pinned_memory().stats().peak_reserved_bytes);
    if (lead) {
      std::lock_guard lock(print_mutex);
      std::printf("step %lld loss %.4f tokens/s %.0f peak_device_bytes %zu\n", static_cast<long long>(s), st->loss,
                  static_cast<double>(o.seq) / secs, be.device_memory().stats().peak_bytes);
      std::fflush(stdout);
    }
  }
  if (lead && !o.trace.empty() && o.steps > 0)
    FPDT_TRY((*model)->attention(0).trace().write_chrome_json(o.trace));
  // Beside a run with a window, documents or sinks: two steps of the plain causal model at the
  // same S and C (same data, no documents), for the tokens/s the summary compares.
  if ((o.window > 0 || o.documents || o.sinks) && o.steps > 0) {
    model->reset();
    fpdt_train::model_config plain_cfg = cfg;
    plain_cfg.sinks = false;
    fpdt_train::run_options plain_ro = ro;
    plain_ro.window = 0;
    auto causal = fpdt_train::model_rank<float, Comm, gemm_t>::create(be, comm, plain_cfg, plain_ro, gemm);
    if (!causal) return causal.error();
    for (index_t s = 0; s < 2; ++s) {
      auto const t0 = std::chrono::steady_clock::now();
      auto st = (*causal)->forward_backward(window(text, o.seq, s));
      if (!st) return st.error();
      (*causal)->adamw(o.lr, static_cast<int>(s + 1));
      rep.causal_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  return {};
}

// Tokens per second over the steps after the first (which makes the layers' lanes and buffers),
// or over the one step there is.
double tokens_per_second(index_t seq, std::vector<double> const& seconds) {
  if (seconds.empty()) return 0;
  std::size_t const skip = seconds.size() > 1 ? 1 : 0;
  double total = 0;
  for (std::size_t i = skip; i < seconds.size(); ++i) total += seconds[i];
  return static_cast<double>(seq) * static_cast<double>(seconds.size() - skip) / total;
}

void summary(options const& o, index_t ranks, std::vector<rank_report> const& reps, char const* how) {
  std::size_t peak = 0, pinned = 0;
  for (auto const& r : reps) {
    peak = std::max(peak, r.peak);
    pinned = std::max(pinned, r.pinned);
  }
  auto const& r0 = reps.front();
  double total = 0;
  for (double s : r0.seconds) total += s;
  std::printf("fpdt-train: P=%lld (%s) S=%lld C=%lld L=%lld hidden=%lld heads=%lld kv_heads=%lld offload %s, mask %s%s%s\n",
              static_cast<long long>(ranks), how, static_cast<long long>(o.seq), static_cast<long long>(o.chunk),
              static_cast<long long>(o.layers), static_cast<long long>(o.hidden), static_cast<long long>(o.heads),
              static_cast<long long>(o.kv_heads), o.offload ? "on" : "off",
              fpdt::to_string(o.window > 0 ? fpdt::causal_window_mask(o.window) : fpdt::causal_mask).c_str(),
              o.documents ? ", packed documents (one per input file)" : "", o.sinks ? ", attention sinks" : "");
  if (!r0.loss.empty())
    std::printf("  loss %.4f -> %.4f over %zu step(s); %.0f tokens/s on average\n", r0.loss.front(), r0.loss.back(),
                r0.loss.size(), static_cast<double>(o.seq) * static_cast<double>(r0.loss.size()) / total);
  if (!r0.causal_seconds.empty()) {
    double const mine = tokens_per_second(o.seq, r0.seconds), causal = tokens_per_second(o.seq, r0.causal_seconds);
    std::printf("  tokens/s after the first step: %.0f with this mask%s, %.0f plain causal at the same S and C "
                "(2 steps run after training): %.2fx\n",
                mine, o.sinks ? " and sinks" : "", causal, mine / causal);
  }
  std::printf("  peak device bytes per rank %zu (%.1f MiB), pinned host bytes per rank %zu (%.1f MiB) (the largest over ranks)\n", peak,
              static_cast<double>(peak) / (1 << 20), pinned, static_cast<double>(pinned) / (1 << 20));
  fpdt_train::model_config cfg;
  cfg.layers = o.layers;
  cfg.hidden = o.hidden;
  cfg.heads = o.heads;
  cfg.kv_heads = o.kv_heads;
  cfg.sinks = o.sinks;
  auto plan = [&](index_t seq, index_t chunk, bool offload) {
    return fpdt_train::planned_device_bytes(cfg, {.seq = seq, .chunk = chunk, .offload = offload}, ranks);
  };
  auto mib = [](std::size_t b) { return static_cast<double>(b) / (1 << 20); };
  auto with = plan(o.seq, o.chunk, o.offload);
  auto without = plan(o.seq, o.seq, false);
  if (with && without) {
    std::printf("  planned device bytes per rank (schedule and layer sizes): %zu (%.1f MiB) as run; %zu (%.1f MiB) "
                "without chunking and offload (C = S, offload off)\n",
                *with, mib(*with), *without, mib(*without));
    // The longest context within the device budget: without chunking and offload, by doubling S;
    // with them, the need does not grow with S (checked at 2S), so host memory sets the limit.
    index_t longest = 0;
    for (index_t s = ranks; s <= (index_t{1} << 24); s *= 2) {
      auto b = plan(s, s, false);
      if (!b || *b > static_cast<std::size_t>(o.device_budget)) break;
      longest = s;
    }
    auto twice = o.offload ? plan(2 * o.seq, o.chunk, true) : fpdt::result<std::size_t>(std::size_t{0});
    std::printf("  in a device budget of %.0f MiB per rank: without chunking and offload at most S = %lld (power of two)",
                mib(static_cast<std::size_t>(o.device_budget)), static_cast<long long>(longest));
    if (o.offload && twice && *twice == *with) {
      std::printf("; with C = %lld and offload the device need does not grow with S (%.1f MiB at S and at 2S)",
                  static_cast<long long>(o.chunk), mib(*twice));
      // Pinned host memory grows with S instead: this run's bytes per token, against this machine.
      long const pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
      if (pinned > 0 && pages > 0 && page > 0) {
        double const per_token = static_cast<double>(pinned) / static_cast<double>(o.seq);
        double const host = static_cast<double>(pages) * static_cast<double>(page) / static_cast<double>(ranks);
        std::printf(", and pinned host memory sets the limit: %.0f bytes per token per rank, so this machine's %.1f GiB "
                    "allow about S = %.0f",
                    per_token, static_cast<double>(pages) * static_cast<double>(page) / (1 << 30), host / per_token);
      }
    } else if (o.offload && twice) {
      std::printf("; with C = %lld and offload the need grows to %.1f MiB at 2S", static_cast<long long>(o.chunk), mib(*twice));
    }
    std::printf("\n");
  }
  if (!o.trace.empty() && o.steps > 0)
    std::printf("  trace of rank 0's last attention pass (layer 0): %s\n", o.trace.c_str());
}

// Ranks already run in parallel: each BLAS call gets this machine's cores divided among them
// (OpenBLAS would otherwise start all cores' threads for every rank's call: 1.45x slower measured).
void blas_threads([[maybe_unused]] index_t ranks) {
#if defined(OPENBLAS_VERSION)
  unsigned const hw = std::max(1u, std::thread::hardware_concurrency());
  openblas_set_num_threads(static_cast<int>(std::max<index_t>(1, static_cast<index_t>(hw) / ranks)));
#endif
}

} // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv);
  if (!o) {
    std::fprintf(stderr, "fpdt-train: %s\n", o.error().message().c_str());
    usage(stderr);
    return 2;
  }
  auto text = load_text(*o);
  if (!text) {
    std::fprintf(stderr, "fpdt-train: %s\n", text.error().message().c_str());
    return 2;
  }
#if defined(FPDT_EXAMPLE_WITH_MPI)
  if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE")) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    int world_size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (o->ranks_given && o->ranks != world_size) {
      std::fprintf(stderr, "fpdt-train: --ranks %lld but mpirun started %d processes (under MPI the ranks are the processes)\n",
                   static_cast<long long>(o->ranks), world_size);
      MPI_Finalize();
      return 2;
    }
    blas_threads(world_size);
    int rc = 0;
    {
      auto comm = fpdt::mpi_communicator::create(MPI_COMM_WORLD);
      if (!comm) {
        std::fprintf(stderr, "fpdt-train: %s\n", comm.error().to_string().c_str());
        rc = 2;
      } else {
        std::vector<rank_report> rep(1);
        fpdt::status st = run_rank(*o, *text, *comm, rep[0]);
        if (!st.ok()) std::fprintf(stderr, "fpdt-train rank %d: %s\n", comm->rank(), st.to_string().c_str());
        int failed = st.ok() ? 0 : 1, any = 0;
        MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        unsigned long long mine[2] = {rep[0].peak, rep[0].pinned}, most[2] = {};
        MPI_Allreduce(mine, most, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
        rep[0].peak = most[0];
        rep[0].pinned = most[1];
        if (!any && comm->rank() == 0) summary(*o, comm->size(), rep, "MPI processes");
        rc = any ? 2 : 0;
      }
    }
    MPI_Finalize();
    return rc;
  }
#endif
  index_t const p = o->ranks;
  blas_threads(p);
#if defined(FPDT_TRAIN_WITH_CBLAS)
  if (std::string const note = fpdt::cblas_kernel_note(); !note.empty()) std::fprintf(stderr, "fpdt-train: %s\n", note.c_str());
#endif
  fpdt::local_world world(static_cast<int>(p), std::chrono::seconds(600));
  std::vector<rank_report> rep(static_cast<std::size_t>(p));
  std::vector<fpdt::status> st(rep.size());
  std::vector<std::thread> ts;
  for (index_t r = 0; r < p; ++r)
    ts.emplace_back([&, r] {
      auto comm = world.communicator(static_cast<int>(r)).value();
      st[static_cast<std::size_t>(r)] = run_rank(*o, *text, comm, rep[static_cast<std::size_t>(r)]);
    });
  for (auto& t : ts) t.join();
  for (index_t r = 0; r < p; ++r)
    if (!st[static_cast<std::size_t>(r)].ok()) {
      std::fprintf(stderr, "fpdt-train rank %lld: %s\n", static_cast<long long>(r), st[static_cast<std::size_t>(r)].to_string().c_str());
      return 2;
    }
  summary(*o, p, rep, "threads");
  return 0;
}
