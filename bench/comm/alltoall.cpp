// The Ulysses all-to-all through fpdt::mpi_communicator versus a bare MPI_Alltoall on the same
// buffers, side by side (issue 5 target: >= 0.9x). Run under mpirun (rank 0 reports); each
// iteration's time is the slowest rank's. Bytes per rank and iteration: P blocks of the size.
//
//   mpirun -np 4 --oversubscribe build/default/bench/fpdt-comm-bench
#include <fpdt/comm/mpi/mpi_communicator.hpp>

#include <benchmark/benchmark.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <vector>

namespace {

double max_over_ranks(double x) {
  double m = 0;
  MPI_Allreduce(&x, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

void bm_alltoall(benchmark::State& state, bool ours) {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  auto const block = static_cast<std::size_t>(state.range(0));
  std::vector<std::uint8_t> send(block * static_cast<std::size_t>(p)), recv(send.size());
  for (std::size_t i = 0; i < send.size(); ++i)
    send[i] = static_cast<std::uint8_t>(i * 131 + 7);
  MPI_Comm comm{};
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  auto fc = fpdt::mpi_communicator::create(comm);
  if (!fc) {
    state.SkipWithError(fc.error().to_string().c_str());
    return;
  }
  std::uint64_t tag = 0;
  for (auto _ : state) {
    MPI_Barrier(comm);
    auto const t0 = std::chrono::steady_clock::now();
    if (ours) {
      if (fpdt::status st = fc->all_to_all(send.data(), recv.data(), block, tag++ % 1024); !st.ok()) {
        state.SkipWithError(st.to_string().c_str());
        break;
      }
    } else {
      MPI_Alltoall(send.data(), static_cast<int>(block), MPI_BYTE, recv.data(), static_cast<int>(block), MPI_BYTE, comm);
    }
    double const t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(max_over_ranks(t));
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(send.size()));
  state.counters["ranks"] = p;
  MPI_Comm_free(&comm);
}

// A reporter that prints nothing: ranks other than 0 run the same benchmarks silently.
class null_reporter : public benchmark::BenchmarkReporter {
public:
  bool ReportContext(Context const&) override { return true; }
  void ReportRuns(std::vector<Run> const&) override {}
};

} // namespace

BENCHMARK_CAPTURE(bm_alltoall, fpdt, true)->Name("comm/alltoall/fpdt")->RangeMultiplier(16)->Range(1 << 10, 1 << 22)->Iterations(40)->UseManualTime();
BENCHMARK_CAPTURE(bm_alltoall, bare, false)->Name("comm/alltoall/bare")->RangeMultiplier(16)->Range(1 << 10, 1 << 22)->Iterations(40)->UseManualTime();

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  benchmark::Initialize(&argc, argv);
  // Every rank must run the same iterations: fix them instead of letting each rank choose.
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    null_reporter quiet;
    benchmark::RunSpecifiedBenchmarks(&quiet);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
