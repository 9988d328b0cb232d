// myelin/collectives/collectives.hpp
//
// Collective operations over a Communicator, as free functions taking an Options struct:
//
//   allreduce(comm, send, recv, count, DataType::kF32, ReduceOp::kSum, {.algorithm = kRing});
//
// Buffers and counts follow the nccl conventions:
//   allreduce       send, recv: count elements each.
//   reduce_scatter  send: size*count elements, recv: count (the block of this rank).
//   allgather       send: count elements, recv: size*count (rank i's block at i*count).
//   broadcast       root's send (count) lands in every rank's recv (count); send is read on root.
//   reduce          send: count on every rank; the result lands in root's recv (count).
//   alltoall        send, recv: size*count; block j of send goes to rank j, block i of recv came
//                   from rank i.
// In place: pass the same pointer for send and recv (for reduce_scatter: recv == send +
// rank*count elements; for allgather: send == recv + rank*count elements). Buffers may be any
// host memory; they must not otherwise overlap.
//
// Every function returns the Algorithm it ran (also logged at debug level), or an error naming the
// operation and the rank involved. Any error makes the communicator unusable (see
// communicator.hpp).
//
// Consistency check: every collective sends a 32-byte descriptor (sequence number, collective,
// algorithm, count, type, op, root) to the next rank on a dedicated channel, alongside its data.
// The receiver compares it with its own call; a difference fails the collective with
// invalid_argument spelling out both calls (e.g. "rank 2 called allreduce of 7 x f32 sum, this
// rank allreduce of 8 x f32 sum"). The cost is one 32-byte message per rank per call, overlapped
// with the data.
//
// Channels: collectives use Endpoint channels 0xC0000000 | tag << 8 | phase, so collectives with
// different Options::tag (e.g. two communicators sharing a Context) never mix their messages, and
// nothing outside the 0xC0xxxxxx range is touched.
//
// Thread safety: as the Communicator (one thread). Blocking: each call returns when this rank's
// part is complete, or fails within Options::timeout.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <myelin/collectives/communicator.hpp>
#include <myelin/collectives/types.hpp>
#include <myelin/core/status.hpp>

namespace myelin::collectives {

enum class Collective : uint8_t {
  kAllreduce = 0,
  kReduceScatter,
  kAllgather,
  kBroadcast,
  kReduce,
  kBarrier,
  kAlltoall,
};
std::string_view collective_name(Collective c) noexcept;  // "allreduce", "reduce_scatter", ...

enum class Algorithm : uint8_t {
  kAuto = 0,
  kRing,               // allreduce, reduce_scatter, allgather: chunked, pipelined ring
  kHalvingDoubling,    // allreduce: recursive halving reduce-scatter + doubling allgather
  kRecursiveDoubling,  // allreduce: full-buffer exchange with partners 1, 2, 4, ... apart
  kHierarchical,       // allreduce: reduce in each node, allreduce across nodes, broadcast back
  kBinomialTree,       // broadcast, reduce
  kChain,              // broadcast: pipelined chain
  kDissemination,      // barrier
  kPairwise,           // alltoall: pairwise exchange
};
std::string_view algorithm_name(Algorithm a) noexcept;  // "ring", "halving_doubling", ...
Result<Algorithm> parse_algorithm(std::string_view name);
// Whether a collective implements an algorithm (kAuto: always).
[[nodiscard]] bool supports(Collective c, Algorithm a) noexcept;

// The selection table: the algorithm kAuto picks for `bytes` per rank (the count times the element
// size of the send buffer, for alltoall/reduce_scatter the whole buffer), `ranks` ranks on
// `nodes` nodes. Documented in docs/collectives.md.
[[nodiscard]] Algorithm select_algorithm(Collective c, size_t bytes, int ranks, int nodes) noexcept;

struct Options {
  Algorithm algorithm = Algorithm::kAuto;
  // Deadline of the whole call; 0 = the communicator's timeout.
  std::chrono::milliseconds timeout{0};
  // Separates concurrent users of one Context (see Channels above).
  uint16_t tag = 0;
  // Pipelining unit of the ring and chain algorithms, in bytes (rounded to whole elements);
  // 0 = MYELIN_COLL_SEGMENT if set, else 1 MiB.
  size_t segment_size = 0;
  // Root rank of broadcast and reduce.
  int root = 0;
};

Result<Algorithm> allreduce(Communicator& comm, const void* send, void* recv, size_t count,
                            DataType type, ReduceOp op, const Options& options = {});
Result<Algorithm> reduce_scatter(Communicator& comm, const void* send, void* recv,
                                 size_t recv_count, DataType type, ReduceOp op,
                                 const Options& options = {});
Result<Algorithm> allgather(Communicator& comm, const void* send, void* recv, size_t send_count,
                            DataType type, const Options& options = {});
Result<Algorithm> broadcast(Communicator& comm, const void* send, void* recv, size_t count,
                            DataType type, const Options& options = {});
Result<Algorithm> reduce(Communicator& comm, const void* send, void* recv, size_t count,
                         DataType type, ReduceOp op, const Options& options = {});
Result<Algorithm> barrier(Communicator& comm, const Options& options = {});
Result<Algorithm> alltoall(Communicator& comm, const void* send, void* recv, size_t count,
                           DataType type, const Options& options = {});

}  // namespace myelin::collectives
