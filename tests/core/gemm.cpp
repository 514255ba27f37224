// Tests of include/fpdt/core/gemm.hpp (host_gemm) and, when fpdt::blas is linked,
// include/fpdt/core/cblas_gemm.hpp: every transpose combination, odd sizes, alpha/beta variants
// and padded leading dimensions against a float64 triple loop; argument errors.
#include <fpdt/core/gemm.hpp>
#if defined(FPDT_HAVE_CBLAS)
#include <fpdt/core/cblas_gemm.hpp>
#endif

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

using fpdt::index_t;

namespace {

struct gemm_case {
  bool ta, tb;
  index_t m, n, k;
  double alpha, beta;
};

// Runs policy g on one case with leading dimensions padded by `pad`; returns the max abs error
// against a float64 loop, relative to the sum of |terms| (so float and double share a tolerance
// scaled by their epsilon).
template <class T, class G> double run_case(G const& g, gemm_case const& c, index_t pad) {
  std::mt19937_64 rng(static_cast<std::uint64_t>(c.m * 131 + c.n * 17 + c.k * 7 + (c.ta ? 1 : 0) +
                                                 (c.tb ? 2 : 0)));
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  index_t const a_rows = c.ta ? c.k : c.m, a_cols = c.ta ? c.m : c.k;
  index_t const b_rows = c.tb ? c.n : c.k, b_cols = c.tb ? c.k : c.n;
  index_t const lda = a_cols + pad, ldb = b_cols + pad, ldc = c.n + pad;
  std::vector<T> a(static_cast<std::size_t>(std::max<index_t>(1, a_rows * lda)));
  std::vector<T> b(static_cast<std::size_t>(std::max<index_t>(1, b_rows * ldb)));
  std::vector<T> cm(static_cast<std::size_t>(std::max<index_t>(1, c.m * ldc)));
  for (auto& v : a) v = static_cast<T>(u(rng));
  for (auto& v : b) v = static_cast<T>(u(rng));
  for (auto& v : cm) v = static_cast<T>(u(rng));
  if (c.beta == 0.0) // beta == 0 must not read C: NaN there must not survive
    for (auto& v : cm) v = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> const c0 = cm;
  auto at = [&](index_t i, index_t p) {
    return static_cast<double>(c.ta ? a[static_cast<std::size_t>(p * lda + i)]
                                    : a[static_cast<std::size_t>(i * lda + p)]);
  };
  auto bt = [&](index_t p, index_t j) {
    return static_cast<double>(c.tb ? b[static_cast<std::size_t>(j * ldb + p)]
                                    : b[static_cast<std::size_t>(p * ldb + j)]);
  };
  fpdt::status st = g(c.ta, c.tb, c.m, c.n, c.k, static_cast<T>(c.alpha), a.data(), lda, b.data(),
                      ldb, static_cast<T>(c.beta), cm.data(), ldc);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  double worst = 0.0;
  for (index_t i = 0; i < c.m; ++i) {
    for (index_t j = 0; j < c.n; ++j) {
      double s = 0.0, mag = 0.0;
      for (index_t p = 0; p < c.k; ++p) {
        s += at(i, p) * bt(p, j);
        mag += std::abs(at(i, p) * bt(p, j));
      }
      double const old = static_cast<double>(c0[static_cast<std::size_t>(i * ldc + j)]);
      double const ref = c.alpha * s + (c.beta == 0.0 ? 0.0 : c.beta * old);
      double const got = static_cast<double>(cm[static_cast<std::size_t>(i * ldc + j)]);
      double const err = std::abs(got - ref) / (1.0 + std::abs(c.alpha) * mag + std::abs(c.beta));
      if (!(err <= worst)) worst = std::isnan(err) ? 1e300 : err;
    }
    for (index_t j = c.n; j < ldc; ++j) { // padding of C untouched (bit for bit, NaN included)
      T const was = c0[static_cast<std::size_t>(i * ldc + j)], now = cm[static_cast<std::size_t>(i * ldc + j)];
      bool const same = (std::isnan(was) && std::isnan(now)) || was == now;
      if (!same) worst = 1e300;
    }
  }
  return worst;
}

template <class T, class G> void check_policy(G const& g, char const* name) {
  double const tol = 64 * std::numeric_limits<T>::epsilon();
  index_t const sizes[] = {1, 7, 33, 130};
  double const ab[][2] = {{1.0, 0.0}, {1.0, 1.0}, {-0.5, 2.0}, {0.0, 0.5}, {1.5, 0.0}};
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (index_t m : sizes)
        for (index_t n : sizes)
          for (index_t k : sizes) {
            std::size_t const v = static_cast<std::size_t>(m + 3 * n + 5 * k) % 5;
            gemm_case const c{ta, tb, m, n, k, ab[v][0], ab[v][1]};
            index_t const pad = (m + n + k) % 2 == 0 ? 0 : 3;
            double const err = run_case<T>(g, c, pad);
            INFO(name, " ta=", ta, " tb=", tb, " m=", m, " n=", n, " k=", k, " alpha=", c.alpha,
                 " beta=", c.beta, " pad=", pad);
            CHECK(err <= tol);
          }
  // k = 0: C = beta C; sizes beyond one packed panel (k > 256, n > 512)
  for (gemm_case const c : {gemm_case{false, false, 5, 6, 0, 1.0, 0.5}, gemm_case{true, true, 9, 520, 300, 0.75, 1.0},
                            gemm_case{false, true, 70, 600, 260, 1.0, 0.0}}) {
    INFO(name, " m=", c.m, " n=", c.n, " k=", c.k);
    CHECK(run_case<T>(g, c, 1) <= tol);
  }
}

template <class G> void check_errors(G const& g) {
  std::vector<double> a(64, 1.0), b(64, 1.0), c(64, 0.0);
  auto call = [&](index_t m, index_t n, index_t k, index_t lda, index_t ldb, index_t ldc,
                  bool ta = false, bool tb = false) {
    return g(ta, tb, m, n, k, 1.0, a.data(), lda, b.data(), ldb, 0.0, c.data(), ldc);
  };
  CHECK(call(2, 2, 2, 2, 2, 2).ok());
  fpdt::status st = call(-1, 2, 2, 2, 2, 2);
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("m = -1") != std::string::npos);
  st = call(3, 2, 4, 3, 2, 2); // A is [3, 4]: lda 3 < 4
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("lda = 3") != std::string::npos);
  CHECK(call(3, 2, 4, 3, 2, 2, true).ok()); // A^T stored [4, 3]: lda 3 is enough
  st = call(2, 5, 2, 2, 4, 5);
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("ldb = 4") != std::string::npos);
  st = call(2, 5, 2, 2, 5, 4);
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(st.message().find("ldc = 4") != std::string::npos);
  st = g(false, false, 2, 2, 2, 1.0, static_cast<double const*>(nullptr), 2, b.data(), 2, 0.0, c.data(), 2);
  CHECK(st.code() == fpdt::errc::invalid_argument);
  CHECK(call(0, 0, 0, 1, 1, 1).ok()); // empty product
}

} // namespace

TEST_CASE("host_gemm: all transposes and odd sizes equal the float64 loop") {
  check_policy<double>(fpdt::host_gemm{}, "host_gemm double");
  check_policy<float>(fpdt::host_gemm{}, "host_gemm float");
  check_policy<double>(fpdt::host_gemm{3}, "host_gemm double 3 threads");
}

TEST_CASE("host_gemm: argument errors name the values") { check_errors(fpdt::host_gemm{}); }

#if defined(FPDT_HAVE_CBLAS)
TEST_CASE("cblas_gemm: all transposes and odd sizes equal the float64 loop") {
  check_policy<double>(fpdt::cblas_gemm{}, "cblas_gemm double");
  check_policy<float>(fpdt::cblas_gemm{}, "cblas_gemm float");
}

TEST_CASE("cblas_gemm: argument errors name the values") { check_errors(fpdt::cblas_gemm{}); }

TEST_CASE("cblas_kernel_note: empty, or naming OpenBLAS's kernel and the remedy") {
  // Which it is depends on the machine (and OPENBLAS_CORETYPE, which the test does not set).
  std::string const note = fpdt::cblas_kernel_note();
  INFO(note);
  if (!note.empty()) {
    CHECK(note.find("OpenBLAS runs its ") != std::string::npos);
    CHECK(note.find("OPENBLAS_CORETYPE=Haswell") != std::string::npos);
  }
}
#endif
