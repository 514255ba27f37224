//! \file
//! \brief `FPDT_MPI_CHECK`: turns a failing MPI call into an `fpdt::status`.
//!
//! Needs an MPI implementation's `mpi.h` (link `fpdt::mpi`). fpdt never creates the MPI world:
//! callers pass their own `MPI_Comm` (docs/design.md 4.8).
#pragma once

#include "../../config.hpp"
#include "../../core/status.hpp"

#include <mpi.h>

FPDT_NAMESPACE_BEGIN

//! The status for MPI return code `code` of `call` at `file`:`line`: ok for `MPI_SUCCESS`, else
//! `errc::comm_error` with MPI's error string in the message.
[[nodiscard]] inline status mpi_status(int code, char const* call, char const* file, int line) {
  if (code == MPI_SUCCESS) return {};
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  return make_error(errc::comm_error, call, " failed with MPI error ", code, " (",
                    len > 0 ? text : "no description", ") at ", file, ":", line);
}

FPDT_NAMESPACE_END

//! Evaluates the MPI call `call`; on failure returns an `fpdt::status` from the enclosing function.
//! Only useful with `MPI_ERRORS_RETURN` set on the communicator (the default handler aborts).
#define FPDT_MPI_CHECK(call)                                                                       \
  do {                                                                                             \
    if (int const fpdt_mpi_rc_ = (call); fpdt_mpi_rc_ != MPI_SUCCESS)                             \
      return ::fpdt::mpi_status(fpdt_mpi_rc_, #call, __FILE__, __LINE__);                          \
  } while (0)
