//! \file
//! \brief `memory_resource`: the upstream allocator under fpdt's arenas and pools.
//!
//! A plain table of two function pointers and a context, so the same arena and pool code sits on
//! ordinary host memory (host backend), `cudaMallocAsync` / `cudaHostAlloc` (CUDA backend), or
//! memory the caller already owns, without templating every user of the arena.
#pragma once

#include "../config.hpp"
#include "../core/status.hpp"

#include <cstddef>

FPDT_NAMESPACE_BEGIN

//! Upstream allocator: allocate and deallocate raw bytes with an alignment.
//!
//! `allocate` returns a pointer to at least `bytes` bytes aligned to `alignment` (a power of two),
//! or `errc::out_of_memory`; it is never called with 0 bytes. `deallocate` receives exactly the
//! pointer, size and alignment of a previous allocation and must not fail. Both must be safe to
//! call from any thread.
struct memory_resource {
  void* context = nullptr; //!< passed back as the first argument of both functions
  //! Allocates `bytes` bytes aligned to `alignment`; returns the pointer or an error.
  result<void*> (*allocate)(void* context, std::size_t bytes, std::size_t alignment) = nullptr;
  //! Frees memory returned by `allocate` with the same size and alignment.
  void (*deallocate)(void* context, void* p, std::size_t bytes, std::size_t alignment) noexcept =
      nullptr;
  char const* name = "memory"; //!< short description used in error messages, e.g. "host"
};

FPDT_NAMESPACE_END
