// Tests of include/fpdt/comm/mpi/mpi_communicator.hpp and of the sequence-parallel FPDT layer
// over MPI, run as 2 and 4 processes: collectives, tag matching across threads, aborts, and the
// layer's local outputs and gradients against float64 dense attention over the global sequence.
#include "../../attention/chunked_driver.hpp"
#include "../../attention/reference.hpp"

#include <fpdt/comm/mpi/mpi_communicator.hpp>
#include <fpdt/layers/sequence_parallel_attention.hpp>
#include <fpdt/schedule/token_layout.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

using fpdt::index_t;
using fpdt_test::attn_shape;
using namespace fpdt_test::chunked;
using namespace std::chrono_literals;

namespace {
struct dup_comm {
  MPI_Comm c{};
  dup_comm() { MPI_Comm_dup(MPI_COMM_WORLD, &c); }
  ~dup_comm() { MPI_Comm_free(&c); }
};
bool has(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }
} // namespace

TEST_CASE("mpi communicator: collectives give the documented blocks") {
  dup_comm d;
  auto c = fpdt::mpi_communicator::create(d.c).value();
  int const p = c.size(), r = c.rank();
  std::vector<int> send(static_cast<std::size_t>(p)), recv(send.size(), -1);
  for (int q = 0; q < p; ++q)
    send[static_cast<std::size_t>(q)] = 100 * r + q;
  REQUIRE(c.all_to_all(send.data(), recv.data(), sizeof(int), 1).ok());
  for (int q = 0; q < p; ++q)
    CHECK(recv[static_cast<std::size_t>(q)] == 100 * q + r);
  std::vector<double> x{static_cast<double>(r), 1.0};
  REQUIRE(c.all_reduce_sum(x.data(), x.data(), 2, 2).ok());
  CHECK(x[0] == p * (p - 1) / 2.0);
  CHECK(x[1] == p);
  std::vector<int> g(static_cast<std::size_t>(p), -1);
  int const mine = r * r;
  REQUIRE(c.all_gather(&mine, g.data(), sizeof(int), 3).ok());
  for (int q = 0; q < p; ++q)
    CHECK(g[static_cast<std::size_t>(q)] == q * q);
  // all_to_all_v: rank r sends q + 1 ints to rank q.
  std::vector<std::size_t> sb(static_cast<std::size_t>(p)), so(sb.size()), rb(sb.size()), ro(sb.size());
  std::vector<int> vs(64, -7), vr(64, -1);
  for (int q = 0; q < p; ++q) {
    sb[static_cast<std::size_t>(q)] = static_cast<std::size_t>(q + 1) * sizeof(int);
    so[static_cast<std::size_t>(q)] = static_cast<std::size_t>(q * 8) * sizeof(int);
    rb[static_cast<std::size_t>(q)] = static_cast<std::size_t>(r + 1) * sizeof(int);
    ro[static_cast<std::size_t>(q)] = static_cast<std::size_t>(q * 8) * sizeof(int);
    for (int k = 0; k <= q; ++k)
      vs[static_cast<std::size_t>(q * 8 + k)] = 1000 * r + 10 * q + k;
  }
  REQUIRE(c.all_to_all_v(vs.data(), sb, so, vr.data(), rb, ro, 4).ok());
  for (int q = 0; q < p; ++q)
    for (int k = 0; k <= r; ++k)
      CHECK(vr[static_cast<std::size_t>(q * 8 + k)] == 1000 * q + 10 * r + k);
  REQUIRE(c.barrier(5).ok());
  fpdt::status const big = c.barrier(c.max_tag() + 1);
  CHECK(big.code() == fpdt::errc::invalid_argument);
  CHECK(has(big.message(), "exceeds the largest usable tag"));
}

TEST_CASE("mpi communicator: tags match operations issued from two threads in different orders") {
  dup_comm d;
  auto c = fpdt::mpi_communicator::create(d.c).value();
  int const p = c.size(), r = c.rank();
  std::vector<int> ra(static_cast<std::size_t>(p)), rb(ra.size());
  int a = 10 + r, b = 20 + r;
  fpdt::status s7, s8;
  if (r % 2 == 0) {
    std::thread t([&] { s8 = c.all_gather(&b, rb.data(), sizeof(int), 8); });
    s7 = c.all_gather(&a, ra.data(), sizeof(int), 7);
    t.join();
  } else {
    s8 = c.all_gather(&b, rb.data(), sizeof(int), 8);
    s7 = c.all_gather(&a, ra.data(), sizeof(int), 7);
  }
  REQUIRE(s7.ok());
  REQUIRE(s8.ok());
  for (int q = 0; q < p; ++q) {
    CHECK(ra[static_cast<std::size_t>(q)] == 10 + q);
    CHECK(rb[static_cast<std::size_t>(q)] == 20 + q);
  }
}

TEST_CASE("mpi communicator: an abort ends every peer's wait within 10 s") {
  dup_comm d;
  auto c = fpdt::mpi_communicator::create(d.c, 30s).value();
  auto const t0 = std::chrono::steady_clock::now();
  if (c.rank() == 1) {
    c.abort("projection failed on chunk 2");
  } else {
    fpdt::status const st = c.barrier(11);
    CHECK(st.code() == fpdt::errc::comm_error);
    CHECK(has(st.message(), "rank 1 aborted: projection failed on chunk 2"));
  }
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
  MPI_Barrier(MPI_COMM_WORLD); // the next test starts together
}

TEST_CASE("mpi sequence parallel attention: local outputs and gradients equal float64 dense attention") {
  int world = 1, me = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  index_t const ranks = world, h = 8, d = 8;
  for (index_t hkv : {1, 2, 4, 8})
    for (index_t u : {1, 3})
      for (bool causal : {true, false}) {
        if (hkv % ranks != 0 && ranks % hkv != 0) continue;
        CAPTURE(hkv);
        CAPTURE(u);
        CAPTURE(causal);
        dup_comm dc;
        auto comm = fpdt::mpi_communicator::create(dc.c, 30s).value();
        index_t const chunk = 2 * ranks;
        attn_shape const s{chunk * u, chunk * u, h, hkv, d};
        auto p = random_problem<float>(s, 900 + static_cast<std::uint32_t>(hkv * 10 + u)); // same on every rank
        run_options ro;
        ro.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
        ref_result const ref = reference_of(p, ro);
        auto tl = fpdt::token_layout::make(s.sq, ranks, chunk).value();
        index_t const wq = h * d, wk = hkv * d, lt = tl.local_tokens();
        auto local_of = [&](auto const& global, index_t w) {
          std::vector<float> g(global.begin(), global.end()), l(static_cast<std::size_t>(lt * w));
          REQUIRE(tl.scatter<float>(fpdt::contiguous_view<float const>(g.data(), std::array<index_t, 2>{s.sq, w}).value(),
                                    me, fpdt::contiguous_view(l.data(), std::array<index_t, 2>{lt, w}).value())
                      .ok());
          return l;
        };
        auto q = local_of(p.q, wq), k = local_of(p.k, wk), v = local_of(p.v, wk), dout = local_of(p.dout, wq);
        std::vector<float> out(q.size()), dq(q.size()), dk(k.size()), dv(k.size());
        fpdt::host_backend be;
        auto layer = fpdt::sequence_parallel_attention<float, fpdt::mpi_communicator>::create(
                         be, comm, {s.sq, h, hkv, d},
                         {.chunk = chunk, .offload = u > 1, .mask = ro.mask}, 0, fpdt::host_chunk_kernel{1})
                         .value();
        std::array<index_t, 3> const qe{lt, h, d}, ke{lt, hkv, d};
        REQUIRE(layer.forward(fpdt::contiguous_view<float const>(q.data(), qe).value(),
                              fpdt::contiguous_view<float const>(k.data(), ke).value(),
                              fpdt::contiguous_view<float const>(v.data(), ke).value(),
                              fpdt::contiguous_view(out.data(), qe).value())
                    .ok());
        REQUIRE(layer.backward(fpdt::contiguous_view<float const>(dout.data(), qe).value(),
                               fpdt::contiguous_view(dq.data(), qe).value(),
                               fpdt::contiguous_view(dk.data(), ke).value(),
                               fpdt::contiguous_view(dv.data(), ke).value())
                    .ok());
        // Compare this rank's rows with the same rows of the global reference, scaled by the
        // global tensor's largest value (as errors_against_reference does).
        auto check = [&](std::vector<float> const& got, std::vector<double> const& want_global, index_t w,
                         double scale, char const* name) {
          std::vector<float> wg(want_global.begin(), want_global.end());
          auto want = local_of(wg, w);
          double worst = 0;
          for (std::size_t i = 0; i < got.size(); ++i)
            worst = std::max(worst, std::abs(double{got[i]} - double{want[i]}));
          INFO(name);
          CHECK(worst / std::max(scale, 1e-30) <= 1e-4);
        };
        check(out, ref.out, wq, fpdt_test::max_abs(p.vd), "out");
        check(dq, ref.dq, wq, fpdt_test::max_abs(ref.dq), "dq");
        check(dk, ref.dk, wk, fpdt_test::max_abs(ref.dk), "dk");
        check(dv, ref.dv, wk, fpdt_test::max_abs(ref.dv), "dv");
      }
}
