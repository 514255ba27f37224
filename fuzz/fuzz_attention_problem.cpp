// Fuzz target: attention_problem::create (every shape rule in one place) over arbitrary S, P, C,
// H, H_kv, D, dtype, mask, offload and ring slots. Whatever it accepts must satisfy the rules it
// documents, and every byte figure it derives must be exact (no wrapped size_t products); small
// accepted problems must give schedules that pass check_schedule. Whatever it refuses must be an
// invalid_argument (shape_mismatch for H % H_kv) with a message.
#include <fpdt/schedule/attention_problem.hpp>

#include "fuzz_common.hpp"

#include <cstdint>
#include <cstdio>

namespace {
[[noreturn]] void fail(char const* what, fpdt::attention_problem_args const& a) {
  char detail[256];
  std::snprintf(detail, sizeof detail, "S=%lld P=%lld C=%lld H=%lld H_kv=%lld D=%lld ring=%lld",
                static_cast<long long>(a.sequence), static_cast<long long>(a.ranks), static_cast<long long>(a.chunk),
                static_cast<long long>(a.heads), static_cast<long long>(a.kv_heads),
                static_cast<long long>(a.head_dim), static_cast<long long>(a.ring_slots));
  fpdt_fuzz::fail("fuzz_attention_problem", what, detail);
}
fpdt::index_t pick(FuzzedDataProvider& in) { return fpdt_fuzz::pick(in, -2, 64); }
} // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fpdt::attention_problem_args a;
  a.sequence = pick(in);
  a.ranks = pick(in);
  a.chunk = pick(in);
  a.heads = pick(in);
  a.kv_heads = pick(in);
  a.head_dim = pick(in);
  a.type = static_cast<fpdt::dtype>(in.ConsumeIntegral<std::uint8_t>() % 8);
  a.mask = in.ConsumeBool() ? fpdt::causal_mask : fpdt::full_mask;
  a.offload = in.ConsumeBool();
  a.ring_slots = in.ConsumeIntegralInRange<fpdt::index_t>(-1, 80);
  auto p = fpdt::attention_problem::create(a, "fuzz");
  if (!p) {
    auto const code = p.error().code();
    if ((code != fpdt::errc::invalid_argument && code != fpdt::errc::shape_mismatch) || p.error().message().empty())
      fail("a refusal that is not invalid_argument (or shape_mismatch) with a message", a);
    return 0;
  }
  fpdt::index_t const c = p->chunk();
  // The documented rules hold for what was accepted.
  if (a.sequence < 1 || a.ranks < 1 || c < 1 || a.heads < 1 || a.kv_heads < 1 || a.head_dim < 1)
    fail("accepted a non-positive size", a);
  if (a.sequence % c != 0 || c % a.ranks != 0 || a.heads % a.kv_heads != 0 || a.heads % a.ranks != 0 ||
      (a.kv_heads % a.ranks != 0 && a.ranks % a.kv_heads != 0))
    fail("accepted a shape that breaks a divisibility rule", a);
  if (p->chunks() > (fpdt::index_t{1} << 20)) fail("accepted more than 2^20 chunks", a);
  // Every tensor's bytes are the exact product of its shape and element size.
  for (int t = 0; t <= static_cast<int>(fpdt::chunk_tensor::dv); ++t) {
    auto const k = static_cast<fpdt::chunk_tensor>(t);
    auto const s = p->shape(k);
    unsigned __int128 exact = static_cast<unsigned __int128>(fpdt::size_bytes(p->type_of(k)));
    for (fpdt::index_t e : s) exact *= static_cast<unsigned __int128>(e);
    if (exact != p->bytes(k)) fail("a chunk tensor's byte count wrapped around", a);
  }
  // The host figures are exact too (every chunk's copies, summed).
  unsigned __int128 host = 0;
  if (a.offload)
    for (auto t : fpdt::attention_problem::host_tensors)
      host += static_cast<unsigned __int128>(p->bytes(t)) * static_cast<unsigned __int128>(p->chunks());
  if (host != p->host_bytes_needed()) fail("host_bytes_needed wrapped around", a);
  if (p->host_bytes_reserved() < p->host_bytes_needed()) fail("host_bytes_reserved below host_bytes_needed", a);
  (void)p->forward_device_bytes();
  (void)p->backward_device_bytes();
  (void)p->exchange_bytes(fpdt::pass::forward, true);
  (void)p->exchange_bytes(fpdt::pass::backward, true);
  auto r = p->per_rank();
  if (r.local_heads() * a.ranks != a.heads) fail("per_rank lost query heads", a);
  if (p->chunks() <= 24) { // schedules are O(u^2) steps
    for (auto const& s : {p->forward_schedule(), p->backward_schedule(), r.forward_schedule()}) {
      if (!s) fail("an accepted problem without a schedule", a);
      if (!fpdt::check_schedule(*s).ok()) fail("a schedule that fails check_schedule", a);
    }
  }
  return 0;
}
