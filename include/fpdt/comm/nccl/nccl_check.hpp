//! \file
//! \brief `FPDT_NCCL_CHECK`: turns a failing NCCL call into an `fpdt::status`.
//!
//! Needs NCCL's `nccl.h` (link `fpdt::nccl`). fpdt never creates the NCCL world: callers pass
//! their own `ncclComm_t` (docs/design.md 4.8).
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"

#include <nccl.h>

FPDT_NAMESPACE_BEGIN

//! The status for NCCL result `r` of `call` at `file`:`line`: ok for `ncclSuccess`, else
//! `errc::comm_error` with NCCL's error string in the message.
[[nodiscard]] inline status nccl_status(ncclResult_t r, char const* call, char const* file,
                                        int line) {
  if (r == ncclSuccess) return {};
  return make_error(errc::comm_error, call, " failed with NCCL error ", static_cast<int>(r), " (",
                    ncclGetErrorString(r), ") at ", file, ":", line);
}

FPDT_NAMESPACE_END

//! Evaluates the NCCL call `call`; on failure returns an `fpdt::status` from the enclosing
//! function.
#define FPDT_NCCL_CHECK(call)                                                                      \
  do {                                                                                             \
    if (ncclResult_t const fpdt_nccl_rc_ = (call); fpdt_nccl_rc_ != ncclSuccess)                  \
      return ::fpdt::nccl_status(fpdt_nccl_rc_, #call, __FILE__, __LINE__);                        \
  } while (0)
