// Tests of include/fpdt/comm/communicator.hpp (the in-process world) and comm/ulysses.hpp:
// collectives matched by tag, aborts and timeouts that end every rank's wait, CASES.md A1 (the
// all-to-all layout, bit for bit) and A3 (GQA heads replicated or refused).
#include <fpdt/comm/communicator.hpp>
#include <fpdt/comm/ulysses.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

using fpdt::index_t;
using namespace std::chrono_literals;

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

// Runs body(rank, communicator) on P threads; returns each rank's status.
std::vector<fpdt::status> on_ranks(fpdt::local_world& w,
                                   std::function<fpdt::status(int, fpdt::local_communicator&)> body) {
  std::vector<fpdt::status> out(static_cast<std::size_t>(w.size()));
  std::vector<std::thread> ts;
  for (int r = 0; r < w.size(); ++r)
    ts.emplace_back([&, r] {
      auto c = w.communicator(r).value();
      out[static_cast<std::size_t>(r)] = body(r, c);
    });
  for (auto& t : ts)
    t.join();
  return out;
}
} // namespace

TEST_CASE("local communicator: collectives give the documented blocks") {
  for (int p : {1, 2, 3, 4}) {
    CAPTURE(p);
    fpdt::local_world w(p, 10s);
    auto st = on_ranks(w, [p](int r, fpdt::local_communicator& c) -> fpdt::status {
      // all_to_all: value = 100 * source + destination
      std::vector<int> send(static_cast<std::size_t>(p)), recv(send.size(), -1);
      for (int q = 0; q < p; ++q)
        send[static_cast<std::size_t>(q)] = 100 * r + q;
      FPDT_TRY(c.all_to_all(send.data(), recv.data(), sizeof(int), 1));
      for (int q = 0; q < p; ++q)
        CHECK(recv[static_cast<std::size_t>(q)] == 100 * q + r);
      // all_to_all_v: rank r sends q + 1 ints to rank q, at offset (q + 1) in its buffer
      std::vector<std::size_t> sb(static_cast<std::size_t>(p)), so(sb.size()), rb(sb.size()), ro(sb.size());
      std::vector<int> vs(64, -7), vr(64, -1);
      for (int q = 0; q < p; ++q) {
        sb[static_cast<std::size_t>(q)] = static_cast<std::size_t>(q + 1) * sizeof(int);
        so[static_cast<std::size_t>(q)] = static_cast<std::size_t>(q * 8 + 1) * sizeof(int);
        rb[static_cast<std::size_t>(q)] = static_cast<std::size_t>(r + 1) * sizeof(int);
        ro[static_cast<std::size_t>(q)] = static_cast<std::size_t>(q * 8) * sizeof(int);
        for (int k = 0; k <= q; ++k)
          vs[static_cast<std::size_t>(q * 8 + 1 + k)] = 1000 * r + 10 * q + k;
      }
      FPDT_TRY(c.all_to_all_v(vs.data(), sb, so, vr.data(), rb, ro, 2));
      for (int q = 0; q < p; ++q)
        for (int k = 0; k <= r; ++k)
          CHECK(vr[static_cast<std::size_t>(q * 8 + k)] == 1000 * q + 10 * r + k);
      // all_reduce_sum (in place) and all_gather
      std::vector<double> x{static_cast<double>(r), 1.0};
      FPDT_TRY(c.all_reduce_sum(x.data(), x.data(), 2, 3));
      CHECK(x[0] == p * (p - 1) / 2.0);
      CHECK(x[1] == p);
      std::vector<int> g(static_cast<std::size_t>(p), -1);
      int const mine = r * r;
      FPDT_TRY(c.all_gather(&mine, g.data(), sizeof(int), 4));
      for (int q = 0; q < p; ++q)
        CHECK(g[static_cast<std::size_t>(q)] == q * q);
      return c.barrier(5);
    });
    for (auto const& s : st)
      CHECK_MESSAGE(s.ok(), s.to_string());
  }
}

TEST_CASE("local communicator: tags match operations issued in different orders") {
  fpdt::local_world w(2, 10s);
  auto st = on_ranks(w, [](int r, fpdt::local_communicator& c) -> fpdt::status {
    // Rank 0 issues tag 7 then 8 on two threads; rank 1 issues 8 then 7 on one thread.
    int a = 10 + r, b = 20 + r, ra[2] = {}, rb[2] = {};
    if (r == 0) {
      fpdt::status s8;
      std::thread t([&] { s8 = c.all_gather(&b, rb, sizeof(int), 8); });
      fpdt::status s7 = c.all_gather(&a, ra, sizeof(int), 7);
      t.join();
      FPDT_TRY(s7);
      FPDT_TRY(s8);
    } else {
      FPDT_TRY(c.all_gather(&b, rb, sizeof(int), 8));
      FPDT_TRY(c.all_gather(&a, ra, sizeof(int), 7));
    }
    CHECK(ra[0] == 10);
    CHECK(ra[1] == 11);
    CHECK(rb[0] == 20);
    CHECK(rb[1] == 21);
    return {};
  });
  CHECK(st[0].ok());
  CHECK(st[1].ok());
}

TEST_CASE("local communicator: an abort or a missing rank ends every wait with a clear error") {
  {
    fpdt::local_world w(3, 20s);
    auto const t0 = std::chrono::steady_clock::now();
    auto st = on_ranks(w, [](int r, fpdt::local_communicator& c) -> fpdt::status {
      if (r == 2) {
        std::this_thread::sleep_for(50ms);
        c.abort("source failed on chunk 3");
        return fpdt::make_error(fpdt::errc::internal, "rank 2 failed");
      }
      return c.barrier(1);
    });
    CHECK(std::chrono::steady_clock::now() - t0 < 10s);
    for (int r = 0; r < 2; ++r) {
      CHECK(st[static_cast<std::size_t>(r)].code() == fpdt::errc::comm_error);
      CHECK(contains(st[static_cast<std::size_t>(r)].message(), "rank 2 aborted: source failed on chunk 3"));
    }
  }
  {
    fpdt::local_world w(3, 200ms);
    auto st = on_ranks(w, [](int r, fpdt::local_communicator& c) -> fpdt::status {
      if (r == 1) return {}; // never arrives
      int x = 0, y[3];
      return c.all_gather(&x, y, sizeof(int), 9);
    });
    bool saw_timeout = false;
    for (int r : {0, 2}) {
      fpdt::status const& s = st[static_cast<std::size_t>(r)];
      CHECK(!s.ok());
      saw_timeout = saw_timeout || (s.code() == fpdt::errc::timeout && contains(s.message(), "missing ranks: 1"));
    }
    CHECK(saw_timeout);
  }
  {
    fpdt::local_world w(2, 2s); // the same tag used for two different operations
    auto st = on_ranks(w, [](int r, fpdt::local_communicator& c) -> fpdt::status {
      int x = 0, y[2];
      return r == 0 ? c.all_gather(&x, y, sizeof(int), 4) : c.barrier(4);
    });
    CHECK((!st[0].ok() && !st[1].ok()));
    bool named = false; // the rank that arrived second names both operations
    for (auto const& s : st)
      named = named || (contains(s.message(), "all_gather of 4 bytes per rank does not match the barrier another") ||
                        contains(s.message(), "barrier does not match the all_gather of 4 bytes per rank"));
    CHECK(named);
  }
  {
    fpdt::local_world w(2, 2s); // ranks that disagree on a size (e.g. on the chunk C)
    auto st = on_ranks(w, [](int r, fpdt::local_communicator& c) -> fpdt::status {
      std::vector<char> send(16), recv(16);
      return c.all_to_all(send.data(), recv.data(), r == 0 ? 8 : 4, 5);
    });
    bool named = false;
    for (auto const& s : st)
      named = named || contains(s.message(), "bytes per rank does not match the all_to_all of");
    CHECK(named);
    CHECK((!st[0].ok() && !st[1].ok()));
  }
  fpdt::local_world w(2);
  CHECK(w.communicator(2).error().code() == fpdt::errc::invalid_argument);
  fpdt::local_world empty(0);
  CHECK(contains(empty.communicator(0).error().message(), "needs at least 1 rank"));
}

TEST_CASE("ulysses: A1 seq_to_head gives each rank its heads for every position, bit for bit") {
  struct shape_case {
    index_t p, s, h, d;
  };
  for (auto const sc : {shape_case{2, 8, 4, 2}, shape_case{3, 12, 6, 2}, shape_case{4, 16, 8, 3}}) {
    CAPTURE(sc.p);
    index_t const c = sc.s; // one chunk: the whole sequence
    auto l = fpdt::ulysses_layout::make(sc.p, sc.h, sc.h, sc.d, c).value();
    fpdt::local_world w(static_cast<int>(sc.p), 10s);
    // Element (global position g, head h, d) encodes all three.
    auto code = [](index_t g, index_t h, index_t d) { return static_cast<float>(g * 1000 + h * 10 + d); };
    auto st = on_ranks(w, [&](int r, fpdt::local_communicator& comm) -> fpdt::status {
      index_t const pc = l.piece(), hr = l.heads_per_rank(fpdt::head_kind::query);
      std::vector<float> local(static_cast<std::size_t>(pc * sc.h * sc.d)), out(static_cast<std::size_t>(c * hr * sc.d));
      std::vector<float> back(local.size(), -1.0f);
      for (index_t t = 0; t < pc; ++t)
        for (index_t h = 0; h < sc.h; ++h)
          for (index_t d = 0; d < sc.d; ++d)
            local[static_cast<std::size_t>((t * sc.h + h) * sc.d + d)] = code(r * pc + t, h, d);
      auto lv = fpdt::contiguous_view<float const>(local.data(), std::array<index_t, 3>{pc, sc.h, sc.d}).value();
      auto ov = fpdt::contiguous_view(out.data(), std::array<index_t, 3>{c, hr, sc.d}).value();
      FPDT_TRY(fpdt::seq_to_head<float>(comm, l, fpdt::head_kind::query, lv, ov, 1));
      for (index_t g = 0; g < c; ++g)
        for (index_t h = 0; h < hr; ++h)
          for (index_t d = 0; d < sc.d; ++d)
            CHECK(ov(g, h, d) == code(g, r * hr + h, d));
      auto bv = fpdt::contiguous_view(back.data(), std::array<index_t, 3>{pc, sc.h, sc.d}).value();
      FPDT_TRY(fpdt::head_to_seq<float>(comm, l, fpdt::head_kind::query,
                                        fpdt::tensor_view<float const, 3>(ov), bv, 2));
      CHECK(back == local); // head_to_seq after seq_to_head is the identity
      return {};
    });
    for (auto const& s : st)
      CHECK_MESSAGE(s.ok(), s.to_string());
  }
}

TEST_CASE("ulysses: A3 key/value heads fewer than ranks are replicated and their gradients summed") {
  // P = 4, H = 16, H_kv = 2: rank r gets kv head r * 2 / 4 = r / 2.
  auto l = fpdt::ulysses_layout::make(4, 16, 2, 2, 8).value();
  CHECK(l.kv_replicated);
  CHECK(l.heads_per_rank(fpdt::head_kind::key_value) == 1);
  fpdt::local_world w(4, 10s);
  auto st = on_ranks(w, [&](int r, fpdt::local_communicator& comm) -> fpdt::status {
    index_t const pc = 2;
    std::vector<float> local(static_cast<std::size_t>(pc * 2 * 2)), out(static_cast<std::size_t>(8 * 1 * 2));
    for (index_t t = 0; t < pc; ++t)
      for (index_t h = 0; h < 2; ++h)
        for (index_t d = 0; d < 2; ++d)
          local[static_cast<std::size_t>((t * 2 + h) * 2 + d)] = static_cast<float>((r * pc + t) * 100 + h * 10 + d);
    auto lv = fpdt::contiguous_view<float const>(local.data(), std::array<index_t, 3>{pc, 2, 2}).value();
    auto ov = fpdt::contiguous_view(out.data(), std::array<index_t, 3>{8, 1, 2}).value();
    FPDT_TRY(fpdt::seq_to_head<float>(comm, l, fpdt::head_kind::key_value, lv, ov, 1));
    for (index_t g = 0; g < 8; ++g)
      for (index_t d = 0; d < 2; ++d)
        CHECK(ov(g, 0, d) == static_cast<float>(g * 100 + (r / 2) * 10 + d));
    // Gradients: every replica sends 1 + rank; the sum for head h is over ranks 2h and 2h + 1.
    std::vector<float> grad(out.size()), back(local.size(), -1.0f);
    for (float& x : grad)
      x = static_cast<float>(1 + r);
    auto gv = fpdt::contiguous_view<float const>(grad.data(), std::array<index_t, 3>{8, 1, 2}).value();
    auto bv = fpdt::contiguous_view(back.data(), std::array<index_t, 3>{pc, 2, 2}).value();
    FPDT_TRY(fpdt::head_to_seq<float>(comm, l, fpdt::head_kind::key_value, gv, bv, 2));
    for (index_t t = 0; t < pc; ++t)
      for (index_t d = 0; d < 2; ++d) {
        CHECK(bv(t, 0, d) == 1.0f + 2.0f); // ranks 0 and 1
        CHECK(bv(t, 1, d) == 3.0f + 4.0f); // ranks 2 and 3
      }
    return {};
  });
  for (auto const& s : st)
    CHECK_MESSAGE(s.ok(), s.to_string());
  auto e = fpdt::ulysses_layout::make(4, 12, 3, 8, 8).error();
  CHECK(e.code() == fpdt::errc::invalid_argument);
  CHECK(contains(e.message(), "H = 12, H_kv = 3, P = 4"));
  CHECK(contains(fpdt::ulysses_layout::make(3, 16, 16, 8, 9).error().message(), "H = 16 query heads are not a multiple of P = 3"));
  CHECK(contains(fpdt::ulysses_layout::make(2, 4, 4, 8, 15).error().message(), "C = 15 is not a multiple of P = 2"));
}
