// bench/harness/collectives_bench.hpp — measurement of one collective over a size sweep, printed
// the way nccl-tests prints it (size, count, type, op, then time/algbw/busbw/#wrong for
// out-of-place and in-place) and, with json, one JSON line per size.
//
//   busbw = algbw * factor, algbw = bytes / time, where bytes is the per-rank buffer (for
//   allgather/reduce_scatter/alltoall the whole n * count buffer) and factor is:
//     allreduce 2(n-1)/n; reduce_scatter, allgather, alltoall (n-1)/n; broadcast, reduce, barrier 1.
//   (The nccl-tests definitions: busbw is comparable to the link bandwidth whatever n.)
// #wrong counts elements that differ from the reference after the first, checked, iteration.
//
// Thread safety: none; one call per rank, collectively (every rank runs the same sweep).
#pragma once

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>

#include <myelin/collectives/collectives.hpp>

namespace myelin::bench {

struct CollectiveBenchOptions {
  collectives::Collective collective = collectives::Collective::kAllreduce;
  collectives::DataType type = collectives::DataType::kF32;
  collectives::ReduceOp op = collectives::ReduceOp::kSum;
  collectives::Algorithm algorithm = collectives::Algorithm::kAuto;
  size_t min_bytes = 8;            // -b
  size_t max_bytes = 64 << 20;     // -e
  size_t step_factor = 2;          // -f
  int iterations = 20;             // -n
  int warmup = 5;                  // -w
  bool json = false;
  std::string transport = "tcp";   // reported only
};

// Factor that turns algbw into busbw for n ranks.
double busbw_factor(collectives::Collective c, int n) noexcept;

// Runs the sweep on this rank; rank 0 prints to `out`. Errors end the sweep.
Status run_collective_bench(collectives::Communicator& comm, const CollectiveBenchOptions& options,
                            std::ostream& out);

}  // namespace myelin::bench
