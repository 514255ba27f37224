//! \file
//! \brief CUDA `memory_resource`s: stream-ordered device memory and pinned host memory.
//!
//! The upstreams under the CUDA backend's `device_arena` and `pinned_pool` (docs/design.md 4.7).
//! Device memory comes from a device's default memory pool through `cudaMallocFromPoolAsync`, so
//! freed blocks stay cached in the pool (with a high release threshold) and a training step that
//! frees and reallocates the same sizes does not go back to the driver. Pinned memory comes from
//! `cudaHostAlloc` (`cudaHostAllocPortable`: usable with every device); the pool above caches it.
//! Needs the CUDA runtime (link `fpdt::cuda`); compiles with a plain C++ compiler.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../memory/memory_resource.hpp"
#include "cuda_check.hpp"

#include <cuda_runtime_api.h>

#include <cstddef>

FPDT_NAMESPACE_BEGIN

namespace cuda {

//! What a CUDA memory resource works on; it must outlive the resources made from it.
struct memory_context {
  int device = 0;                //!< the device made current before each CUDA call
  cudaStream_t stream = nullptr; //!< device memory: the stream it is allocated and freed on
  cudaMemPool_t pool = nullptr;  //!< device memory: the pool it comes from (the device's default)
};

} // namespace cuda

// Helpers live in fpdt::detail: an fpdt::cuda::detail would hide fpdt::detail from code in
// fpdt::cuda.
namespace detail {
// CUDA returns device memory aligned to at least 256 bytes and pinned memory to a page.
inline constexpr std::size_t cuda_device_alignment = 256;
inline constexpr std::size_t cuda_pinned_alignment = 4096;

[[nodiscard]] inline status cuda_alignment_error(char const* what, std::size_t alignment,
                                                 std::size_t guaranteed) {
  return make_error(errc::invalid_argument, what, ": alignment of ", alignment,
                    " bytes asked for, but CUDA guarantees only ", guaranteed);
}

[[nodiscard]] inline result<void*> cuda_device_allocate(void* context, std::size_t bytes,
                                                        std::size_t alignment) {
  auto const& c = *static_cast<cuda::memory_context const*>(context);
  if (alignment > cuda_device_alignment)
    return cuda_alignment_error("cuda device memory", alignment, cuda_device_alignment);
  FPDT_TRY(set_device(c.device));
  void* p = nullptr;
  if (cudaError_t const err = cudaMallocFromPoolAsync(&p, bytes, c.pool, c.stream);
      err != cudaSuccess)
    return cuda_status(err, "cudaMallocFromPoolAsync", __FILE__, __LINE__)
        .with_context(
            concat("cuda device memory: allocating ", bytes, " bytes on device ", c.device));
  // Waiting for the allocation makes the block usable from every stream once this returns.
  if (cudaError_t const err = cudaStreamSynchronize(c.stream); err != cudaSuccess) {
    status s = cuda_status(err, "cudaStreamSynchronize", __FILE__, __LINE__)
                   .with_context(concat("cuda device memory: allocating ", bytes,
                                        " bytes on device ", c.device));
    if (cudaFreeAsync(p, c.stream) != cudaSuccess) (void)cudaGetLastError();
    return s;
  }
  return p;
}

inline void cuda_device_deallocate(void* context, void* p, std::size_t, std::size_t) noexcept {
  auto const& c = *static_cast<cuda::memory_context const*>(context);
  // Deallocation must not fail; an error here (a context torn down at exit) is dropped.
  if (!set_device(c.device).ok()) return;
  if (cudaFreeAsync(p, c.stream) != cudaSuccess) (void)cudaGetLastError();
}

[[nodiscard]] inline result<void*> cuda_pinned_allocate(void* context, std::size_t bytes,
                                                        std::size_t alignment) {
  auto const& c = *static_cast<cuda::memory_context const*>(context);
  if (alignment > cuda_pinned_alignment)
    return cuda_alignment_error("cuda pinned memory", alignment, cuda_pinned_alignment);
  FPDT_TRY(set_device(c.device));
  void* p = nullptr;
  if (cudaError_t const err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable); err != cudaSuccess)
    return cuda_status(err, "cudaHostAlloc", __FILE__, __LINE__)
        .with_context(concat("cuda pinned memory: allocating ", bytes, " bytes"));
  return p;
}

inline void cuda_pinned_deallocate(void*, void* p, std::size_t, std::size_t) noexcept {
  if (cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();
}
} // namespace detail

namespace cuda {

//! Device memory of `context->device` from `context->pool` (`cudaMallocFromPoolAsync` and
//! `cudaFreeAsync` on `context->stream`); thread-safe.
//!
//! `allocate` waits for `context->stream`, so a block is usable from any stream when it returns.
//! `deallocate` frees in `context->stream`'s order, which knows nothing of other streams: release
//! a block only once every stream's work on it has completed (as with the host backend, whose
//! memory is freed at once), else the pool may hand it out again while a kernel still reads it.
//! Errors of `allocate`: `errc::out_of_memory` naming the bytes and the device when the pool
//! cannot grow; `errc::invalid_argument` for an alignment over 256 bytes; `errc::backend_error`
//! for other CUDA errors.
//! \param context device, stream and pool; must outlive every block.
//! \param name how errors name this memory.
[[nodiscard]] inline memory_resource
device_memory_resource(memory_context const* context,
                       char const* name = "cuda device memory") noexcept {
  return memory_resource{const_cast<memory_context*>(context), &fpdt::detail::cuda_device_allocate,
                         &fpdt::detail::cuda_device_deallocate, name};
}

//! Pinned (page-locked) host memory from `cudaHostAlloc(..., cudaHostAllocPortable)`, freed with
//! `cudaFreeHost` (which waits for the device); thread-safe.
//!
//! Errors of `allocate`: `errc::out_of_memory` naming the bytes when pinning fails;
//! `errc::invalid_argument` for an alignment over 4096 bytes; `errc::backend_error` for other CUDA
//! errors.
//! \param context only `context->device` is used: the device made current for the call; must
//!        outlive the resource's use.
//! \param name how errors name this memory.
[[nodiscard]] inline memory_resource
pinned_memory_resource(memory_context const* context,
                       char const* name = "cuda pinned memory") noexcept {
  return memory_resource{const_cast<memory_context*>(context), &fpdt::detail::cuda_pinned_allocate,
                         &fpdt::detail::cuda_pinned_deallocate, name};
}

} // namespace cuda

FPDT_NAMESPACE_END
