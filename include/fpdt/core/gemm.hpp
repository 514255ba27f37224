//! \file
//! \brief The `gemm_policy` concept and `host_gemm`, a portable cache-blocked matrix product.
//!
//! The chunked MLP and the chunked LM head + loss (docs/design.md 2.5) are matrix products over token
//! chunks; they take the product as a policy so a trainer can plug in its BLAS (`cblas_gemm`,
//! core/cblas_gemm.hpp, when built with fpdt::blas) or its own kernel. Every policy computes, in
//! BLAS's row-major convention,
//!
//!     C[m, n] = alpha * op(A) * op(B) + beta * C
//!
//! with op(X) = X or X^T as the flag says: A is `[m, k]` (`[k, m]` when trans_a) with leading
//! dimension lda (elements between rows), B `[k, n]` (`[n, k]` when trans_b) with ldb, C `[m, n]`
//! with ldc. beta == 0 means C is not read (NaN in C does not survive); alpha == 0 means A and B
//! are not read.
#pragma once

#include "../config.hpp"
#include "parallel_for.hpp"
#include "status.hpp"
#include "tensor_view.hpp"

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <exception>
#include <new>
#include <type_traits>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! A matrix-product policy for element type `T`: a const call operator
//! `g(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) -> status` computing
//! C = alpha op(A) op(B) + beta C (row-major, see the file comment).
template <class G, class T>
concept gemm_policy = requires(G const& g, bool t, index_t s, T alpha, T const* a, T* c) {
  { g(t, t, s, s, s, alpha, a, s, a, s, alpha, c, s) } -> std::same_as<status>;
};

namespace detail {
//! Checks the arguments of a row-major GEMM the way BLAS's xerbla would, with fpdt messages:
//! sizes >= 0, each leading dimension >= max(1, row length), non-null pointers where read or
//! written. `who` names the policy in the message.
template <class T>
[[nodiscard]] status check_gemm_args(char const* who, bool trans_a, bool trans_b, index_t m,
                                     index_t n, index_t k, T alpha, T const* a, index_t lda,
                                     T const* b, index_t ldb, T* c, index_t ldc) {
  if (m < 0 || n < 0 || k < 0)
    return make_error(errc::invalid_argument, who, ": sizes m = ", m, ", n = ", n, ", k = ", k,
                      " must be >= 0");
  index_t const a_row = trans_a ? m : k; // elements in one stored row of A
  index_t const b_row = trans_b ? k : n;
  if (lda < std::max<index_t>(1, a_row))
    return make_error(errc::invalid_argument, who, ": lda = ", lda, " is below max(1, ", a_row,
                      "), the length of a stored row of A (", trans_a ? "[k, m]" : "[m, k]",
                      " with m = ", m, ", k = ", k, ")");
  if (ldb < std::max<index_t>(1, b_row))
    return make_error(errc::invalid_argument, who, ": ldb = ", ldb, " is below max(1, ", b_row,
                      "), the length of a stored row of B (", trans_b ? "[n, k]" : "[k, n]",
                      " with k = ", k, ", n = ", n, ")");
  if (ldc < std::max<index_t>(1, n))
    return make_error(errc::invalid_argument, who, ": ldc = ", ldc, " is below max(1, n = ", n,
                      ")");
  if (m > 0 && n > 0 && c == nullptr)
    return make_error(errc::invalid_argument, who, ": C is null for m = ", m, ", n = ", n);
  if (m > 0 && n > 0 && k > 0 && alpha != T(0) && (a == nullptr || b == nullptr))
    return make_error(errc::invalid_argument, who, ": ", a == nullptr ? "A" : "B",
                      " is null for m = ", m, ", n = ", n, ", k = ", k);
  return {};
}
} // namespace detail

//! Portable GEMM for float and double (see the file comment for the contract).
//!
//! Blocked for caches: B is packed in `[kc, nc]` panels, A in `[kc, mr]` slivers (scaled by
//! alpha), and a register tile of mr rows by one cache line of columns is accumulated in a local
//! array with loop bounds known at compile time, so g++ -O2 vectorises it without alias checks.
//! Row slivers run in parallel on `threads` threads (`parallel_for`; 1 = the calling thread only,
//! 0 = all hardware threads). Scratch: about (kc nc + threads kc mr) elements of host memory per
//! call.
//!
//! Errors: `errc::invalid_argument` for negative sizes, a leading dimension below its row length,
//! or a null pointer that would be used; `errc::out_of_memory` when the packing scratch cannot be
//! allocated. On error C is untouched.
struct host_gemm {
  unsigned threads = 1; //!< worker threads per call (0: all hardware threads)

  //! C = alpha op(A) op(B) + beta C, row-major; T is float or double.
  template <class T>
    requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
  [[nodiscard]] status operator()(bool trans_a, bool trans_b, index_t m, index_t n, index_t k,
                                  T alpha, T const* a, index_t lda, T const* b, index_t ldb,
                                  T beta, T* c, index_t ldc) const {
    FPDT_TRY(detail::check_gemm_args("host_gemm", trans_a, trans_b, m, n, k, alpha, a, lda, b,
                                     ldb, c, ldc));
    if (m == 0 || n == 0) return {};
    bool const product = k > 0 && alpha != T(0);
    std::vector<T> bpack;
    std::vector<T> apack;
    unsigned workers = 1;
    if (product) {
      index_t const tiles = (m + mr - 1) / mr;
      workers = parallel_workers(static_cast<std::size_t>(tiles), threads);
      try {
        bpack.resize(static_cast<std::size_t>(kc * round_up(std::min(n, nc), width<T>)));
        apack.resize(static_cast<std::size_t>(kc * mr) * workers);
      } catch (std::bad_alloc const&) {
        return make_error(errc::out_of_memory, "host_gemm: cannot allocate the packing scratch of ",
                          (bpack.size() + apack.size()) * sizeof(T), " bytes");
      }
    }
    // beta first, over the whole of C: beta == 0 writes zeros without reading C.
    for (index_t i = 0; i < m; ++i) {
      T* cr = c + i * ldc;
      if (beta == T(0))
        for (index_t j = 0; j < n; ++j) cr[j] = T(0);
      else if (beta != T(1))
        for (index_t j = 0; j < n; ++j) cr[j] *= beta;
    }
    if (!product) return {};
    for (index_t pc = 0; pc < k; pc += kc) {
      index_t const kb = std::min(kc, k - pc);
      for (index_t jc = 0; jc < n; jc += nc) {
        index_t const nb = std::min(nc, n - jc);
        index_t const nbp = round_up(nb, width<T>);
        pack_b(trans_b, b, ldb, pc, kb, jc, nb, nbp, bpack.data());
        T const* bp = bpack.data();
        index_t const tiles = (m + mr - 1) / mr;
        auto done = parallel_for(static_cast<std::size_t>(tiles), workers,
                                 [&](std::size_t tile, unsigned worker) {
          index_t const i0 = static_cast<index_t>(tile) * mr;
          index_t const rows = std::min(mr, m - i0);
          T* ap = apack.data() + static_cast<std::size_t>(kc * mr) * worker;
          pack_a(trans_a, a, lda, alpha, i0, rows, pc, kb, ap);
          for (index_t j = 0; j < nbp; j += width<T>)
            micro_tile(kb, ap, bp + j, nbp, c + i0 * ldc + jc + j, ldc, rows,
                       std::min(width<T>, nb - j));
        });
        if (!done.ok()) return done.error();
      }
    }
    return {};
  }

private:
  static constexpr index_t mr = 4;   // rows per register tile
  static constexpr index_t kc = 256; // depth of a packed panel
  static constexpr index_t nc = 512; // columns of a packed panel
  template <class T> static constexpr index_t width = index_t{64} / index_t{sizeof(T)}; // a cache line

  [[nodiscard]] static constexpr index_t round_up(index_t v, index_t to) noexcept {
    return (v + to - 1) / to * to;
  }

  // bp[p, j] = op(B)[pc + p, jc + j] for j < nb, 0 for nb <= j < nbp.
  template <class T>
  static void pack_b(bool trans_b, T const* b, index_t ldb, index_t pc, index_t kb, index_t jc,
                     index_t nb, index_t nbp, T* bp) noexcept {
    for (index_t p = 0; p < kb; ++p) {
      T* row = bp + p * nbp;
      if (trans_b)
        for (index_t j = 0; j < nb; ++j) row[j] = b[(jc + j) * ldb + pc + p];
      else
        for (index_t j = 0; j < nb; ++j) row[j] = b[(pc + p) * ldb + jc + j];
      for (index_t j = nb; j < nbp; ++j) row[j] = T(0);
    }
  }

  // ap[p, r] = alpha op(A)[i0 + r, pc + p] for r < rows, 0 for rows <= r < mr.
  template <class T>
  static void pack_a(bool trans_a, T const* a, index_t lda, T alpha, index_t i0, index_t rows,
                     index_t pc, index_t kb, T* ap) noexcept {
    for (index_t p = 0; p < kb; ++p) {
      T* col = ap + p * mr;
      for (index_t r = 0; r < mr; ++r)
        col[r] = r < rows ? alpha * (trans_a ? a[(pc + p) * lda + i0 + r] : a[(i0 + r) * lda + pc + p])
                          : T(0);
    }
  }

  // c[r, v] += sum_p ap[p, r] bp[p, v] for r < rows, v < cols; the tile lives in `acc`.
  template <class T>
  static void micro_tile(index_t kb, T const* ap, T const* bp, index_t ldbp, T* c, index_t ldc,
                         index_t rows, index_t cols) noexcept {
    constexpr index_t w = width<T>;
    T acc[mr][w] = {};
    for (index_t p = 0; p < kb; ++p) {
      T const* brow = bp + p * ldbp;
      T bv[w];
      for (index_t v = 0; v < w; ++v) bv[v] = brow[v];
      for (index_t r = 0; r < mr; ++r) {
        T const x = ap[p * mr + r];
        for (index_t v = 0; v < w; ++v) acc[r][v] += x * bv[v];
      }
    }
    for (index_t r = 0; r < rows; ++r)
      for (index_t v = 0; v < cols; ++v) c[r * ldc + v] += acc[r][v];
  }
};

static_assert(gemm_policy<host_gemm, float> && gemm_policy<host_gemm, double>);

FPDT_NAMESPACE_END
