// Consumer of fpdt::mpi: compiles and links against MPI through the exported target.
#include <fpdt/comm/mpi/mpi_check.hpp>

#include <cstdio>

int main() {
  // Not run under mpirun: only proves the target carries MPI's include path and library.
  fpdt::status s = fpdt::mpi_status(MPI_SUCCESS, "MPI_Barrier", __FILE__, __LINE__);
  std::printf("consumer_mpi ok: %s\n", s.to_string().c_str());
  return s.ok() ? 0 : 1;
}
