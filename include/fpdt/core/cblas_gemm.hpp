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

FPDT_NAMESPACE_END
