//! \file
//! \brief `host_memory_resource()`: ordinary aligned host memory as a `memory_resource`.
//!
//! The host backend's "device" memory and "pinned" memory are both ordinary memory; what makes
//! them a device model is the budgeted arena and the pool on top.
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"
#include "../../memory/memory_resource.hpp"

#include <cstddef>
#include <new>

FPDT_NAMESPACE_BEGIN

namespace host {

namespace detail {
[[nodiscard]] inline result<void*> aligned_allocate(void*, std::size_t bytes, std::size_t alignment) {
  void* p = ::operator new(bytes, std::align_val_t{alignment}, std::nothrow);
  if (p == nullptr)
    return make_error(errc::out_of_memory, "host allocator: operator new of ", bytes,
                      " bytes aligned to ", alignment, " failed");
  return p;
}
inline void aligned_deallocate(void*, void* p, std::size_t, std::size_t alignment) noexcept {
  ::operator delete(p, std::align_val_t{alignment});
}
} // namespace detail

//! A `memory_resource` over aligned `operator new`; stateless, thread-safe.
//! \param name how errors name this memory, e.g. "host device memory".
[[nodiscard]] inline memory_resource host_memory_resource(char const* name = "host") noexcept {
  return memory_resource{nullptr, &detail::aligned_allocate, &detail::aligned_deallocate, name};
}

} // namespace host

FPDT_NAMESPACE_END
