// Tests of include/fpdt/comm/mpi/mpi_communicator.hpp and of the sequence-parallel FPDT layer
// over MPI, run as 2 and 4 processes: collectives, tag matching across threads, aborts, and the
// layer's local outputs and gradients against float64 dense attention over the global sequence.
#include "../../attention/chunked_driver.hpp"
#include "../../attention/reference.hpp"

#include <fpdt/comm/mpi/mpi_communicator.hpp>
#include <fpdt/layers/host_defaults.hpp>
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

// Rank 0 expects fewer bytes from its peers than they send (its receives are truncated); the
// peers get fewer bytes from rank 0 than they expect. Both sides get errc::shape_mismatch naming
// the operation, the rank, the tag and the peer, and the communicator stays usable.
TEST_CASE("mpi communicator: a peer sending more bytes than expected is a shape mismatch, not an MPI error") {
  dup_comm d;
  auto c = fpdt::mpi_communicator::create(d.c, 30s).value();
  int const p = c.size(), r = c.rank();
  auto const np = static_cast<std::size_t>(p);
  std::string const self = "(rank " + std::to_string(r) + ", tag ";
  auto check_mismatch = [&](fpdt::status const& st, char const* op, std::uint64_t tag, std::size_t small,
                            std::size_t large) {
    INFO(st.message());
    CHECK(st.code() == fpdt::errc::shape_mismatch);
    CHECK(has(st.message(), std::string("mpi_communicator::") + op + " " + self + std::to_string(tag) + ")"));
    if (r == 0)
      CHECK(has(st.message(), "rank 1 sent more than the expected " + std::to_string(small) + " bytes"));
    else
      CHECK(has(st.message(), "rank 0 sent " + std::to_string(small) + " bytes, expected " + std::to_string(large)));
  };
  // The communicator still works: a matching all_to_all moves the right blocks.
  auto check_usable = [&](std::uint64_t tag) {
    std::vector<int> send(np), recv(np, -1);
    for (int q = 0; q < p; ++q)
      send[static_cast<std::size_t>(q)] = 100 * r + q + static_cast<int>(tag);
    REQUIRE(c.all_to_all(send.data(), recv.data(), sizeof(int), tag).ok());
    for (int q = 0; q < p; ++q)
      CHECK(recv[static_cast<std::size_t>(q)] == 100 * q + r + static_cast<int>(tag));
  };

  std::vector<std::byte> send(16 * np, std::byte{1}), recv(16 * np);
  fpdt::status st = c.all_to_all(send.data(), recv.data(), r == 0 ? 8 : 16, 21);
  check_mismatch(st, "all_to_all", 21, 8, 16);
  check_usable(22);

  std::vector<double> x(4, 1.0), y(4);
  st = c.all_reduce_sum(x.data(), y.data(), r == 0 ? 2 : 4, 23);
  check_mismatch(st, "all_reduce_sum", 23, 2 * sizeof(double), 4 * sizeof(double));
  check_usable(24);

  // all_to_all_v: rank 0 sends and expects 8 bytes per peer, the others 16 (16 to and from self).
  std::vector<std::size_t> bytes(np), offsets(np);
  for (std::size_t q = 0; q < np; ++q) {
    bytes[q] = r == 0 && q != 0 ? 8 : 16;
    offsets[q] = 16 * q;
  }
  st = c.all_to_all_v(send.data(), bytes, offsets, recv.data(), bytes, offsets, 25);
  check_mismatch(st, "all_to_all_v", 25, 8, 16);
  check_usable(26);

  // Blocks large enough for MPI's rendezvous protocol.
  std::vector<std::byte> big_send((128u << 10) * np, std::byte{2}), big_recv(big_send.size());
  st = c.all_to_all(big_send.data(), big_recv.data(), r == 0 ? 64u << 10 : 128u << 10, 27);
  check_mismatch(st, "all_to_all", 27, 64u << 10, 128u << 10);
  check_usable(28);
  REQUIRE(c.barrier(29).ok());
}

TEST_CASE("mpi communicator: errors name the operation called") {
  dup_comm d;
  auto c = fpdt::mpi_communicator::create(d.c, 30s).value();
  auto const np = static_cast<std::size_t>(c.size());
  auto names = [](fpdt::status const& st, fpdt::errc code, std::string const& op) {
    INFO(st.message());
    CHECK(st.code() == code);
    CHECK(has(st.message(), "mpi_communicator::" + op + " (rank "));
  };
  std::vector<std::size_t> bytes(np, 4), offsets(np, 0);
  names(c.all_to_all(nullptr, nullptr, 4, 1), fpdt::errc::invalid_argument, "all_to_all");
  names(c.all_to_all_v(nullptr, bytes, offsets, nullptr, bytes, offsets, 1), fpdt::errc::invalid_argument,
        "all_to_all_v");
  std::vector<int> buf(np, 0);
  for (std::size_t q = 0; q < np; ++q)
    offsets[q] = 4 * q;
  auto const big = c.max_tag() + 1;
  names(c.all_to_all(buf.data(), buf.data(), 4, big), fpdt::errc::invalid_argument, "all_to_all");
  names(c.all_to_all_v(buf.data(), bytes, offsets, buf.data(), bytes, offsets, big),
        fpdt::errc::invalid_argument, "all_to_all_v");
  double v = 1;
  names(c.all_reduce_sum(&v, &v, 1, big), fpdt::errc::invalid_argument, "all_reduce_sum");
  float f = 1;
  names(c.all_reduce_sum(&f, &f, 1, big), fpdt::errc::invalid_argument, "all_reduce_sum");
  names(c.all_gather(&v, buf.data(), 0, big), fpdt::errc::invalid_argument, "all_gather");
  names(c.barrier(big), fpdt::errc::invalid_argument, "barrier");

  // A timeout inside all_reduce_sum: only rank 0 calls it (on its own communicator, which the
  // timeout ends); the others then take rank 0's message so that its send completes.
  dup_comm d2;
  auto c2 = fpdt::mpi_communicator::create(d2.c, 300ms).value();
  if (c2.rank() == 0) {
    fpdt::status const st = c2.all_reduce_sum(&v, &v, 1, 9);
    names(st, fpdt::errc::timeout, "all_reduce_sum");
    CHECK(has(st.message(), "mpi_communicator::all_reduce_sum (rank 0, tag 9): timed out"));
    names(c2.barrier(10), fpdt::errc::comm_error, "barrier");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (c2.rank() != 0) {
    double got = 0;
    CHECK(MPI_Recv(&got, 1, MPI_DOUBLE, 0, 9, d2.c, MPI_STATUS_IGNORE) == MPI_SUCCESS);
    CHECK(got == 1.0);
  }
  MPI_Barrier(MPI_COMM_WORLD);
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
