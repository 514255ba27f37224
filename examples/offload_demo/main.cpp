// fpdt-offload-demo: the FPDT offload pattern on the host backend (docs/design.md 2.2, 4).
//
// u chunks are produced one by one on the compute lane into a ring of staging slots in a budgeted
// "device" arena, offloaded to pinned host memory on the d2h lane while the next chunk computes,
// then fetched back in reverse order on the h2d lane (as the backward pass does) and verified.
// The device budget is exactly slots x chunk bytes: the working set does not grow with the number
// of chunks. The same work is also run serialised on one stream, and both times are printed.
//
//   fpdt-offload-demo [--chunks N] [--chunk-kib K] [--slots R] [--work W]
#include <fpdt/fpdt.hpp>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct options {
  std::size_t chunks = 16;
  std::size_t chunk_kib = 1024;
  std::size_t slots = 2;
  std::size_t work = 4; // compute passes over each chunk (makes compute comparable to copies)
};

constexpr std::size_t max_pinned_bytes = std::size_t{8} << 30; // keeps the demo safe to run

void usage(std::FILE* to) {
  std::fprintf(to, "usage: fpdt-offload-demo [--chunks N] [--chunk-kib K] [--slots R] [--work W]\n"
                   "  Produces N chunks (1..1048576) of K KiB (1..4194304) into R device staging slots\n"
                   "  (2..64), offloads them to pinned memory while computing (W passes, 1..1000),\n"
                   "  fetches them back in reverse and checks every value. N x K must stay within 8 GiB.\n");
}

fpdt::result<options> parse(int argc, char** argv) {
  options o;
  struct spec {
    char const* name;
    std::size_t* value;
    std::size_t lo, hi;
  } const specs[] = {{"--chunks", &o.chunks, 1, std::size_t{1} << 20},
                     {"--chunk-kib", &o.chunk_kib, 1, std::size_t{1} << 22},
                     {"--slots", &o.slots, 2, 64},
                     {"--work", &o.work, 1, 1000}};
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    }
    spec const* sp = nullptr;
    for (auto const& x : specs)
      if (a == x.name) sp = &x;
    if (sp == nullptr) return fpdt::make_error(fpdt::errc::invalid_argument, "unknown option ", a);
    if (i + 1 >= argc) return fpdt::make_error(fpdt::errc::invalid_argument, "option ", a, " needs a value");
    char const* text = argv[++i];
    char* end = nullptr;
    errno = 0;
    unsigned long long const v = std::strtoull(text, &end, 10);
    if (text[0] < '0' || text[0] > '9' || end == text || *end != '\0' || errno == ERANGE)
      return fpdt::make_error(fpdt::errc::invalid_argument, "option ", a, ": '", text,
                              "' is not a non-negative integer");
    if (v < sp->lo || v > sp->hi)
      return fpdt::make_error(fpdt::errc::invalid_argument, "option ", a, " ", v, " is outside [",
                              sp->lo, ", ", sp->hi, "]",
                              a == "--slots" ? " (one slot computes while another is copied)" : "");
    *sp->value = static_cast<std::size_t>(v);
  }
  if (o.chunks * o.chunk_kib * 1024 > max_pinned_bytes) // no overflow: both are bounded above
    return fpdt::make_error(fpdt::errc::invalid_argument, "--chunks ", o.chunks, " x --chunk-kib ",
                            o.chunk_kib, " needs ", o.chunks * o.chunk_kib, " KiB of pinned memory, over the demo's ",
                            max_pinned_bytes >> 10, " KiB");
  return o;
}

float value_of(std::size_t chunk, std::size_t i) { return static_cast<float>((chunk * 2654435761u + i) % 1000003u); }

// Fills a chunk and then runs `work` passes of a cheap per-element update: stand-in for attention.
void produce(float* slot, std::size_t n, std::size_t chunk, std::size_t work) {
  for (std::size_t i = 0; i < n; ++i) slot[i] = value_of(chunk, i);
  for (std::size_t w = 0; w < work; ++w)
    for (std::size_t i = 0; i < n; ++i) slot[i] = std::fma(slot[i], 1.0f, 0.0f);
}

struct run_result {
  double seconds = 0;
  std::size_t mismatches = 0;
};

// One forward (produce + offload) and backward (fetch + verify) over all chunks. With
// `overlap == false`, every lane is the same stream: the serial baseline.
fpdt::result<run_result> run(options const& o, bool overlap) {
  std::size_t const elems = o.chunk_kib * 1024 / sizeof(float);
  std::size_t const bytes = elems * sizeof(float);
  fpdt::host_backend be({.device_budget_bytes = o.slots * fpdt::device_arena::rounded_size(bytes),
                         .pinned_limit_bytes = o.chunks * fpdt::pinned_pool::rounded_size(bytes)});
  auto compute = be.create_stream(fpdt::lane::compute, fpdt::stream_priority::high);
  FPDT_TRY(compute);
  auto d2h_s = be.create_stream(fpdt::lane::d2h);
  auto h2d_s = be.create_stream(fpdt::lane::h2d);
  FPDT_TRY(d2h_s);
  FPDT_TRY(h2d_s);
  fpdt::host::stream& d2h = overlap ? *d2h_s : *compute;
  fpdt::host::stream& h2d = overlap ? *h2d_s : *compute;

  std::vector<fpdt::arena_allocation> ring;
  for (std::size_t s = 0; s < o.slots; ++s) {
    auto a = be.device_memory().allocate(bytes, "staging slot");
    FPDT_TRY(a);
    ring.push_back(std::move(*a));
  }
  std::vector<fpdt::pinned_block> host;
  for (std::size_t c = 0; c < o.chunks; ++c) {
    auto b = be.pinned_memory().acquire(bytes);
    FPDT_TRY(b);
    host.push_back(std::move(*b));
  }
  std::vector<fpdt::host::event> slot_written(o.slots), slot_read(o.slots);
  std::vector<std::size_t> bad(o.chunks, 0);

  auto const t0 = std::chrono::steady_clock::now();
  for (std::size_t c = 0; c < o.chunks; ++c) { // forward: produce, offload
    std::size_t const s = c % o.slots;
    float* slot = ring[s].as<float>();
    FPDT_TRY(be.wait(*compute, slot_read[s]));
    FPDT_TRY(be.launch(*compute, [=] { produce(slot, elems, c, o.work); }));
    FPDT_TRY(be.record(slot_written[s], *compute));
    FPDT_TRY(be.wait(d2h, slot_written[s]));
    FPDT_TRY(be.copy_async(host[c].data(), slot, bytes, d2h));
    FPDT_TRY(be.record(slot_read[s], d2h));
  }
  for (std::size_t c = o.chunks; c-- > 0;) { // backward: fetch in reverse, verify
    std::size_t const s = c % o.slots;
    float* slot = ring[s].as<float>();
    FPDT_TRY(be.wait(h2d, slot_read[s]));
    FPDT_TRY(be.wait(h2d, slot_written[s]));
    FPDT_TRY(be.copy_async(slot, host[c].data(), bytes, h2d));
    FPDT_TRY(be.record(slot_written[s], h2d));
    FPDT_TRY(be.wait(*compute, slot_written[s]));
    FPDT_TRY(be.launch(*compute, [=, &bad] {
      for (std::size_t i = 0; i < elems; ++i) bad[c] += slot[i] != value_of(c, i);
    }));
    FPDT_TRY(be.record(slot_read[s], *compute));
  }
  FPDT_TRY(be.synchronize(*compute));
  FPDT_TRY(be.synchronize(d2h));
  FPDT_TRY(be.synchronize(h2d));
  run_result r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (std::size_t b : bad) r.mismatches += b;
  if (be.device_memory().peak_bytes() != o.slots * fpdt::device_arena::rounded_size(bytes))
    return fpdt::make_error(fpdt::errc::internal, "device peak ", be.device_memory().peak_bytes(),
                            " bytes differs from the ring's ", o.slots, " slots");
  std::printf("  %-10s %8.2f ms  device peak %zu bytes (%zu slots), pinned %zu bytes (%zu chunks), mismatches %zu\n",
              overlap ? "overlapped" : "serial", r.seconds * 1e3, be.device_memory().peak_bytes(), o.slots,
              be.pinned_memory().stats().reserved_bytes, o.chunks, r.mismatches);
  return r;
}

} // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv);
  if (!o.ok()) {
    std::fprintf(stderr, "fpdt-offload-demo: %s\n", o.error().message().c_str());
    usage(stderr);
    return 2;
  }
  std::printf("fpdt %s offload demo: %zu chunks of %zu KiB, %zu staging slots (host backend)\n",
              FPDT_VERSION_STRING, o->chunks, o->chunk_kib, o->slots);
  auto serial = run(*o, false);
  auto overlapped = run(*o, true);
  for (auto const* r : {&serial, &overlapped})
    if (!r->ok()) {
      std::fprintf(stderr, "fpdt-offload-demo: %s\n", r->error().to_string().c_str());
      return 1;
    }
  if (serial->mismatches + overlapped->mismatches != 0) {
    std::fprintf(stderr, "fpdt-offload-demo: FAILED, chunks fetched back differ from what was offloaded\n");
    return 1;
  }
  std::printf("all %zu chunks verified; serial / overlapped time = %.2f\n", o->chunks,
              serial->seconds / overlapped->seconds);
  return 0;
}
