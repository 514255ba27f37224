//! \file
//! \brief `cblas_gemm`: the `gemm_policy` over CBLAS's `cblas_sgemm` / `cblas_dgemm`.
//!
//! Needs a CBLAS (`cblas.h` and its library): link the `fpdt::blas` target (CMake option
//! `FPDT_ENABLE_BLAS`, OpenBLAS preferred; Debian: `libopenblas-dev`), which also defines
//! `FPDT_HAVE_CBLAS=1`. The contract is core/gemm.hpp's (row-major, C = alpha op(A) op(B) + beta C).
//! The BLAS library chooses its own threads (OpenBLAS: `OPENBLAS_NUM_THREADS`).
#pragma once

#include "../config.hpp"
#include "gemm.hpp"
#include "status.hpp"
#include "tensor_view.hpp"

#include <cblas.h>

#include <climits>
#if __has_include(<dlfcn.h>)
#include <dlfcn.h>
#endif
#include <string>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

//! GEMM through CBLAS (row-major), for float and double.
//!
//! Errors: `errc::invalid_argument` for the same argument faults as `host_gemm` (checked here,
//! so BLAS's xerbla never prints and exits), and for sizes or leading dimensions above INT_MAX
//! (the 32-bit BLAS interface).
struct cblas_gemm {
  //! C = alpha op(A) op(B) + beta C, row-major; T is float or double.
  template <class T>
    requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
  [[nodiscard]] status operator()(bool trans_a, bool trans_b, index_t m, index_t n, index_t k,
                                  T alpha, T const* a, index_t lda, T const* b, index_t ldb,
                                  T beta, T* c, index_t ldc) const {
    FPDT_TRY(detail::check_gemm_args("cblas_gemm", trans_a, trans_b, m, n, k, alpha, a, lda, b,
                                     ldb, c, ldc));
    for (index_t v : {m, n, k, lda, ldb, ldc})
      if (v > INT_MAX)
        return make_error(errc::invalid_argument, "cblas_gemm: size or leading dimension ", v,
                          " exceeds the 32-bit BLAS interface's INT_MAX = ", INT_MAX);
    if (m == 0 || n == 0) return {};
    auto const ta = trans_a ? CblasTrans : CblasNoTrans;
    auto const tb = trans_b ? CblasTrans : CblasNoTrans;
    auto const i = [](index_t v) { return static_cast<int>(v); };
    if constexpr (std::is_same_v<T, float>)
      cblas_sgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c,
                  i(ldc));
    else
      cblas_dgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c,
                  i(ldc));
    return {};
  }
};

static_assert(gemm_policy<cblas_gemm, float> && gemm_policy<cblas_gemm, double>);

//! Why `cblas_gemm` may run far below this CPU's rate, or "" when there is no known reason: an
//! OpenBLAS built for many CPUs (DYNAMIC_ARCH) that does not recognise the processor (some virtual
//! machines hide its model) falls back to kernels older than AVX2 (Prescott, Core2, ...), several
//! times slower. On an x86-64 CPU with AVX2 whose DYNAMIC_ARCH OpenBLAS chose such a kernel, the
//! note names it and the remedy (`OPENBLAS_CORETYPE=Haswell`), to print once; nothing in the
//! environment is changed. OpenBLAS is asked at run time (`dlsym`), so any other CBLAS links and
//! gets "", as do other CPUs.
[[nodiscard]] inline std::string cblas_kernel_note() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && __has_include(<dlfcn.h>)
  using query = char* (*)();
  auto const corename = reinterpret_cast<query>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  auto const config = reinterpret_cast<query>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  if (corename == nullptr || config == nullptr || corename() == nullptr || config() == nullptr) return {};
  if (std::string(config()).find("DYNAMIC_ARCH") == std::string::npos || !__builtin_cpu_supports("avx2")) return {};
  std::string const core(corename());
  std::string lower = core;
  for (char& c : lower) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  constexpr char const* before_avx2[] = {"prescott", "core2",     "penryn",   "dunnington", "nehalem",  "atom",
                                         "katmai",   "coppermine", "northwood", "banias",    "barcelona", "opteron",
                                         "opteron_sse3", "bobcat", "sandybridge", "bulldozer", "piledriver",
                                         "steamroller", "excavator", "nano", "athlon"};
  for (char const* k : before_avx2)
    if (lower == k)
      return "OpenBLAS runs its " + core + " kernels on this AVX2 CPU (it did not recognise the processor, or "
             "OPENBLAS_CORETYPE chose them), slower than it could: set OPENBLAS_CORETYPE=Haswell in the environment "
             "for AVX2 kernels (OPENBLAS_VERBOSE=2 prints the one chosen)";
#endif
  return {};
}

FPDT_NAMESPACE_END
