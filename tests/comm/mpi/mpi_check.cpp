// Tests of include/fpdt/comm/mpi/mpi_check.hpp, run on several MPI ranks.
#include <fpdt/comm/mpi/mpi_check.hpp>

#include <doctest/doctest.h>

#include <string>

namespace {
fpdt::status send_to(int dest, MPI_Comm comm) {
  int payload = 1;
  FPDT_MPI_CHECK(MPI_Send(&payload, 1, MPI_INT, dest, 0, comm));
  return {};
}
fpdt::status sum_ranks(MPI_Comm comm, int& out) {
  int rank = 0;
  FPDT_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  FPDT_MPI_CHECK(MPI_Allreduce(&rank, &out, 1, MPI_INT, MPI_SUM, comm));
  return {};
}
} // namespace

TEST_CASE("mpi: FPDT_MPI_CHECK passes success through and names a failing call") {
  // fpdt never creates the world: it works on the caller's communicator (a duplicate here, with
  // errors returned instead of aborting).
  MPI_Comm comm;
  REQUIRE(MPI_Comm_dup(MPI_COMM_WORLD, &comm) == MPI_SUCCESS);
  REQUIRE(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN) == MPI_SUCCESS);
  int size = 0;
  MPI_Comm_size(comm, &size);
  int sum = -1;
  REQUIRE(sum_ranks(comm, sum).ok());
  CHECK(sum == size * (size - 1) / 2);
  fpdt::status bad = send_to(size + 5, comm); // no such rank
  CHECK(bad.code() == fpdt::errc::comm_error);
  CHECK(bad.message().find("MPI_Send") != std::string::npos);
  CHECK(bad.message().find("mpi_check.cpp") != std::string::npos);
  MPI_Comm_free(&comm);
}
