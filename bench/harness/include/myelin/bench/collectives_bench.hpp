// myelin/bench/collectives_bench.hpp — measurement of one collective over a size sweep, printed
// the way nccl-tests prints it (size, count, type, op, then time/algbw/busbw/#wrong for
// out-of-place and in-place) and, with json, one JSON line per size.
//
//   busbw = algbw * factor, algbw = bytes / time, where bytes is the per-rank buffer (for
//   allgather/reduce_scatter/alltoall the whole n * count buffer) and factor is:
//     allreduce 2(n-1)/n; reduce_scatter, allgather, alltoall (n-1)/n; broadcast, reduce,
//     barrier 1.
//   (The nccl-tests definitions: busbw is comparable to the link bandwidth whatever n.)
// #wrong counts elements that differ from the reference after the first, checked, iteration.
//
// Thread safety: none; one call per rank, collectively (every rank runs the same sweep).
#pragma once

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>

#include <myelin/bench/report.hpp>
#include <myelin/collectives/collectives.hpp>

namespace myelin::bench {

struct CollectiveBenchOptions {
  collectives::Collective collective = collectives::Collective::kAllreduce;
  collectives::DataType type = collectives::DataType::kF32;
  collectives::ReduceOp op = collectives::ReduceOp::kSum;
  collectives::Algorithm algorithm = collectives::Algorithm::kAuto;
  size_t min_bytes = 8;         // -b
  size_t max_bytes = 64 << 20;  // -e
  size_t step_factor = 2;       // -f
  int iterations = 20;          // -n
  int warmup = 5;               // -w
  bool json = false;
  bool csv = false;  // (json wins when both are set)
  // Fault injection for the tool's own tests: rank 0 flips one byte of its first, checked,
  // out-of-place result, so #wrong must come out non-zero.
  bool corrupt = false;
  std::string transport = "tcp";  // reported only
};

// One size, out-of-place and in-place. Times are the slowest rank's mean per iteration; wrong is
// the total over ranks (elements that differ from the reference after the first, checked, call).
struct CollectiveResult {
  size_t size = 0;   // bytes, as nccl-tests counts them (see above)
  size_t count = 0;  // elements per rank
  collectives::Algorithm algorithm = collectives::Algorithm::kAuto;  // what auto chose
  double time_us = 0, algbw_gbps = 0, busbw_gbps = 0;
  uint64_t wrong = 0;
  double ip_time_us = 0, ip_algbw_gbps = 0, ip_busbw_gbps = 0;
  uint64_t ip_wrong = 0;
};

// Collective: every rank calls it with the same options and bytes; every rank gets the result.
Result<CollectiveResult> measure_collective(collectives::Communicator& comm,
                                            const CollectiveBenchOptions& options, size_t bytes);

// The report layout of a collective sweep and one row of it (JSON keys: bench, ranks, transport,
// size, count, dtype, op, algo, time_us, algbw_GBps, busbw_GBps, wrong, then the in-place
// figures ip_time_us, ip_algbw_GBps, ip_busbw_GBps, ip_wrong).
std::vector<Column> collective_columns();
std::vector<Value> collective_row(const CollectiveBenchOptions& options, int ranks,
                                  const CollectiveResult& r);

// Factor that turns algbw into busbw for n ranks.
double busbw_factor(collectives::Collective c, int n) noexcept;

// Runs the sweep min_bytes..max_bytes on this rank; rank 0 prints to `out` (table, JSON lines or
// CSV). Errors end the sweep.
Status run_collective_bench(collectives::Communicator& comm, const CollectiveBenchOptions& options,
                            std::ostream& out);

}  // namespace myelin::bench
