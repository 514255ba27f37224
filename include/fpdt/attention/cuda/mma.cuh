//! \file
//! \brief Warp-level tensor-core primitives for the CUDA attention kernels (sm_80 and newer).
//!
//! Thin wrappers over PTX: `mma.sync.m16n8k16` with fp32 accumulators and bf16 or fp16 operands,
//! `ldmatrix` (plain and transposed), `cp.async` with zero fill, and packing two floats into a
//! bf16x2 / f16x2 register. Fragment layouts are those of the PTX ISA ("Matrix fragments for
//! mma.m16n8k16"): for lane t, group g = t / 4 and thread-in-group c = t % 4,
//! - A (16 x 16, row-major): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..);
//! - B (16 x 8, column-major): b0 = (k 2c..2c+1, n g), b1 = (k 2c+8.., n g);
//! - C (16 x 8, fp32): c0, c1 = (g, 2c..2c+1), c2, c3 = (g+8, 2c..2c+1).
//! Two adjacent C tiles of one row block are exactly one A fragment once packed to 16 bits, which
//! is how FlashAttention-2 feeds P (or dS) from registers into the next product.
//!
//! Shared-memory tiles of head dimension D are stored in 16-byte chunks with the chunk index
//! XOR-swizzled by (row % 8), so the 8 row addresses of one `ldmatrix` hit 8 different bank groups.
#pragma once

#include "../../config.hpp"
#include "../../core/bfloat16.hpp"
#include "../../core/half.hpp"

#include <cstdint>
#include <type_traits>

FPDT_NAMESPACE_BEGIN

namespace detail::cuda_mma {

//! True for the 16-bit element types the tensor-core kernels take.
template <class T>
inline constexpr bool is_mma_type = std::is_same_v<T, bfloat16> || std::is_same_v<T, half>;

#if defined(__CUDACC__)

//! Packs (lo, hi) into one register of two 16-bit values of type T, rounding to nearest even.
template <class T> __device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  std::uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bfloat16>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  r = static_cast<std::uint32_t>(T(lo).bits) | (static_cast<std::uint32_t>(T(hi).bits) << 16);
#endif
  return r;
}

//! c += a * b on a 16 x 8 x 16 tile: fp32 accumulators, bf16 or fp16 operands.
template <class T>
__device__ __forceinline__ void mma(float (&c)[4], std::uint32_t const (&a)[4], std::uint32_t b0,
                                    std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  (void)c, (void)a, (void)b0, (void)b1;
  __trap();
#endif
}

//! Shared-memory address of a generic pointer, for PTX operands.
__device__ __forceinline__ std::uint32_t smem_addr(void const* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

//! Four 8 x 8 matrices of 16-bit values: lanes 8i..8i+7 give the row addresses of matrix i; lane t
//! receives row t / 4, columns 2(t % 4)..+1 of each matrix in r[0..3].
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

//! As ldmatrix_x4, transposed: lane t receives rows 2(t % 4)..+1 of column t / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

//! Asynchronous 16-byte global-to-shared copy; copies `src_bytes` (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, void const* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
//! Closes the group of cp.async issued so far by this thread.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
//! Waits until at most `N` groups of this thread's cp.async are pending.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

//! 2^x with the fast hardware approximation (ex2.approx: relative error ~2^-22; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }

//! A [Rows, D] tile of 16-bit values in shared memory, in 16-byte chunks swizzled by row % 8.
template <int Rows, int D> struct swizzled_tile {
  static_assert(D % 64 == 0, "swizzled tiles need D to be a multiple of 64");
  static constexpr int chunks = D / 8;             //!< 16-byte chunks per row
  static constexpr int bytes = Rows * D * 2;       //!< size of the tile
  //! Byte offset of chunk `c` (0..D/8) of row `r`.
  __device__ static constexpr std::uint32_t offset(int r, int c) {
    return static_cast<std::uint32_t>((r * chunks + (c ^ (r & 7))) * 16);
  }
};

//! Loads rows [0, Rows) of a tile, row r taken from `base + r * row_stride` (16-bit elements,
//! contiguous D, 16-byte aligned) for r < valid_rows and zero-filled beyond, with cp.async by
//! `Threads` threads.
template <int Rows, int D, int Threads, class T>
__device__ __forceinline__ void load_tile_async(std::uint32_t smem, T const* base,
                                                long long row_stride, int valid_rows, int tid) {
  using tile = swizzled_tile<Rows, D>;
  constexpr int total = Rows * tile::chunks;
  static_assert(total % Threads == 0, "tile chunks must divide evenly among threads");
#pragma unroll
  for (int i = 0; i < total / Threads; ++i) {
    int const idx = tid + i * Threads;
    int const r = idx / tile::chunks, c = idx % tile::chunks;
    bool const ok = r < valid_rows;
    T const* src = ok ? base + r * row_stride + c * 8 : base;
    cp_async_16(smem + tile::offset(r, c), src, ok ? 16 : 0);
  }
}

#endif // __CUDACC__

} // namespace detail::cuda_mma

FPDT_NAMESPACE_END
