// compare_mpi_allreduce — OpenMPI's side of scripts/compare-collectives.sh: an MPI_Allreduce
// (MPI_FLOAT, MPI_SUM, out of place) timing loop at each requested size, measured the way
// `myelin-bench allreduce` measures myelin (bench/harness/src/collectives_bench.cpp): a checked
// first call, warm-up calls, a barrier, then the mean over timed calls of the slowest rank.
//
//   mpirun --allow-run-as-root --oversubscribe -np 4 --mca btl tcp,self \
//       compare_mpi_allreduce --label mpi-tcp --sizes 4096,1048576,67108864
//
// Output on rank 0, one line per size:
//   RESULT impl=mpi-tcp np=4 bytes=1048576 time_us=812.3 busbw_GBps=1.937 algo=mpi
// busbw = bytes / time * 2(n-1)/n. Exit status 1 when a result was wrong.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace {

int iterations_for(size_t bytes) {
  if (bytes <= 64 * 1024) return 2000;
  if (bytes <= 4 * 1024 * 1024) return 100;
  return 10;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  std::string label = "mpi";
  std::vector<size_t> sizes{4096, size_t{1} << 20, size_t{64} << 20};
  int iters_arg = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) break;
    if (k == "--label") {
      label = argv[++i];
    } else if (k == "--iters") {
      iters_arg = std::atoi(argv[++i]);
    } else if (k == "--sizes") {
      sizes.clear();
      std::stringstream ss(argv[++i]);
      for (std::string item; std::getline(ss, item, ',');) sizes.push_back(std::stoull(item));
    }
  }
  long wrong_total = 0;
  for (size_t bytes : sizes) {
    const size_t count = bytes / sizeof(float);
    std::vector<float> send(count, static_cast<float>(rank + 1));
    std::vector<float> recv(count, 0.0f);
    MPI_Allreduce(send.data(), recv.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                  MPI_COMM_WORLD);
    const float want = static_cast<float>(n * (n + 1) / 2);
    long wrong = 0;
    for (float v : recv) wrong += v != want;
    const int iters = iters_arg > 0 ? iters_arg : iterations_for(bytes);
    for (int i = 0; i < std::max(2, iters / 10); ++i) {
      MPI_Allreduce(send.data(), recv.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    for (int i = 0; i < iters; ++i) {
      MPI_Allreduce(send.data(), recv.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    }
    double us = (MPI_Wtime() - t0) * 1e6 / iters;
    double slowest = 0;
    long wrong_sum = 0;
    MPI_Reduce(&us, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    MPI_Reduce(&wrong, &wrong_sum, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      const double busbw =
          static_cast<double>(count * sizeof(float)) / (slowest * 1e3) * 2.0 * (n - 1) / n;
      std::printf("RESULT impl=%s np=%d bytes=%zu time_us=%.3f busbw_GBps=%.4f algo=mpi\n",
                  label.c_str(), n, count * sizeof(float), slowest, busbw);
      std::fflush(stdout);
      wrong_total += wrong_sum;
    }
  }
  MPI_Finalize();
  if (wrong_total != 0) {
    std::fprintf(stderr, "compare_mpi_allreduce: %ld wrong elements\n", wrong_total);
    return 1;
  }
  return 0;
}
