// collectives/src/exchange.hpp — what every algorithm file builds on: the group of ranks taking
// part, and Exchange, the posted sends/receives of one collective call with its deadline and
// error wording. Not public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <myelin/collectives/collectives.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/copy.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/context.hpp>
#include <myelin/transport/memory.hpp>
#include <myelin/transport/request.hpp>

#include "schedule.hpp"
#include "yield_wait.hpp"

namespace myelin::collectives::internal {

// The ranks taking part in one (sub-)collective, in the order the algorithm numbers them.
struct Group {
  std::vector<int> ranks;  // communicator ranks
  int me = 0;              // my index in ranks
  [[nodiscard]] int size() const noexcept { return static_cast<int>(ranks.size()); }
};

// Channel of a phase: see collectives.hpp ("Channels").
constexpr uint32_t kChannelSpace = 0xC0000000u;
constexpr uint32_t channel_for(uint16_t tag, uint8_t phase) noexcept {
  return kChannelSpace | (static_cast<uint32_t>(tag) << 8) | phase;
}
// Phase 0 carries the descriptors; algorithms get a base so that the parts of a hierarchical
// collective never share a channel. Each algorithm uses phases base .. base + 3.
constexpr uint8_t kDescriptorPhase = 0;
constexpr uint8_t kTopPhase = 4;

// Pipelining unit of the ring and chain algorithms when Options::segment_size is 0 and
// MYELIN_COLL_SEGMENT is not set (docs/collectives.md, "Segment size").
constexpr size_t kDefaultSegmentBytes = 1024 * 1024;

// The parameters of one call, shared by its algorithm functions.
struct CallInfo {
  Collective collective = Collective::kAllreduce;
  Algorithm algorithm = Algorithm::kAuto;
  DataType type = DataType::kU8;
  ReduceOp op = ReduceOp::kSum;
  size_t segment_bytes = kDefaultSegmentBytes;
  // The call's size as the selection table sees it (one rank's data; the whole input of a
  // reduce_scatter or alltoall): whether its waits may yield (kYieldWaitMaxBytes).
  size_t bytes = 0;
};

// One posted operation of an Exchange.
struct PendingOp {
  transport::Request request;
  int peer = -1;
  size_t bytes = 0;
  bool is_recv = false;
  bool exact = true;  // a receive must bring exactly `bytes`
  bool waited = false;
};

// The Communicator keeps the list of posted operations from call to call, so that a call does not
// allocate it anew (an Exchange borrows it for its lifetime and hands it back cleared).
struct PendingPool {
  std::vector<PendingOp> ops;
  // Scratch lists of the small recursive doubling (collectives.cpp), for the same reason.
  std::vector<int> peers;
  std::vector<size_t> handles;
  // Shared working memory of the ring allreduce between same-node shm peers
  // (ring_allreduce.cpp): from Context::allocate, so every connected shm peer has it mapped and
  // copies what is sent from it with a plain memcpy. Grown on demand, kept from call to call,
  // deregistered with the pool (the Context outlives the Communicator that owns the pool).
  transport::Context* work_context = nullptr;
  transport::MemoryRegion work;
  // Whether small waits may yield (yield_wait.hpp); kept from call to call, as its holds outlast
  // a call.
  YieldGuard yield_guard;

  PendingPool() = default;
  PendingPool(const PendingPool&) = delete;
  PendingPool& operator=(const PendingPool&) = delete;
  ~PendingPool();
};

// Posted operations of one collective call on this rank. Handles are indices; wait() turns every
// failure into a Status that names the peer, the direction and the size.
class Exchange {
 public:
  Exchange(Communicator& comm, uint16_t tag, Deadline deadline, const CallInfo& info)
      : comm_(comm),
        tag_(tag),
        deadline_(deadline),
        info_(info),
        yield_budget_ns_(info.bytes <= kYieldWaitMaxBytes && yield_first(comm.context())
                             ? yield_budget_ns()
                             : 0) {
    pending_.swap(comm_.pending_pool().ops);  // capacity of earlier calls; empty
  }
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  // Waits (up to the deadline) for operations still in flight, so that no buffer is released
  // while the transport may still touch it.
  ~Exchange();

  [[nodiscard]] Communicator& comm() noexcept { return comm_; }
  [[nodiscard]] const CallInfo& info() const noexcept { return info_; }
  [[nodiscard]] Deadline deadline() const noexcept { return deadline_; }
  [[nodiscard]] size_t elem() const noexcept { return dtype_size(info_.type); }
  // Segment size in elements (at least 1).
  [[nodiscard]] size_t segment_elems() const noexcept;
  // At least `bytes` of the Communicator's shared working memory (PendingPool::work); reallocated
  // when smaller. Only between calls' operations: every send from the old memory has completed
  // (an Exchange waits for its operations before it ends).
  Result<uint8_t*> shared_work(size_t bytes);

  Result<size_t> post_send(int peer, uint8_t phase, const void* data, size_t bytes);
  Result<size_t> post_recv(int peer, uint8_t phase, void* data, size_t bytes);
  // A receive of at most `capacity` bytes: wait() accepts any size up to it (received() tells).
  Result<size_t> post_recv_upto(int peer, uint8_t phase, void* data, size_t capacity);
  // Waits for one operation; a receive posted with post_recv() must bring exactly the posted
  // number of bytes. On a node whose ranks outnumber its CPUs (yield_first()), the waits of a call
  // of at most kYieldWaitMaxBytes first poll and yield for up to yield_budget_ns()
  // (yield_wait.hpp).
  Status wait(size_t handle);
  // Bytes a completed receive brought.
  [[nodiscard]] size_t received(size_t handle) const noexcept {
    return pending_[handle].request.bytes();
  }
  // True when the operation has completed (successfully or not); never waits.
  [[nodiscard]] bool done(size_t handle) const noexcept { return pending_[handle].request.done(); }
  [[nodiscard]] const Status& status_of(size_t handle) const noexcept {
    return pending_[handle].request.status();
  }
  // Waits for every operation posted so far and not yet waited for.
  Status wait_all();
  // Drives progress until every posted send has completed (successfully or not) or `until`
  // passes; reports nothing. Used before failing the communicator.
  void settle_sends(Deadline until);
  // Drives progress until operation `handle` has completed or `until` passes; reports nothing
  // and does not count as waiting for it.
  void settle(size_t handle, Deadline until);

  // Convenience: post both, wait both.
  Status sendrecv(int send_peer, const void* send, size_t send_bytes, int recv_peer, void* recv,
                  size_t recv_bytes, uint8_t phase);

 private:
  using Pending = PendingOp;
  Status describe(const Pending& p, Status error) const;

  Communicator& comm_;
  uint16_t tag_;
  Deadline deadline_;
  CallInfo info_;
  std::vector<Pending> pending_;
  size_t first_unwaited_ = 0;
  int64_t yield_budget_ns_;  // 0: waits go straight to the Context's wait
};

// Scratch slots of the Communicator: 0 and 1 belong to the algorithms, 2 to the dispatcher, 3 to
// the call descriptors (and the data that travels with them in a small recursive doubling).
constexpr int kScratchAlgo0 = 0;
constexpr int kScratchAlgo1 = 1;
constexpr int kScratchWork = 2;
constexpr int kScratchDescriptor = 3;

// Largest allreduce (bytes) whose recursive doubling carries the call descriptor in each data
// message instead of a separate descriptor message (docs/collectives.md, "Small allreduce: the
// descriptor rides with the data").
constexpr size_t kFusedMaxBytes = 16 * 1024;

// Number of segments of `count` elements cut in pieces of `seg`, and segment j.
inline size_t segment_count(size_t count, size_t seg) noexcept {
  return (count + seg - 1) / seg;
}
inline Range segment(Range block, size_t seg, size_t j) noexcept {
  const size_t off = j * seg;
  const size_t left = block.count - off;
  return Range{block.offset + off, left < seg ? left : seg};
}
inline int mod(int a, int n) noexcept {
  return ((a % n) + n) % n;
}

// Byte pointer helpers.
inline uint8_t* at(void* base, size_t elems, size_t elem) noexcept {
  return static_cast<uint8_t*>(base) + elems * elem;
}
inline const uint8_t* at(const void* base, size_t elems, size_t elem) noexcept {
  return static_cast<const uint8_t*>(base) + elems * elem;
}

// ---- the algorithms (one per file) ----
// Buffers are "working" buffers: the algorithm may modify them; the dispatcher in collectives.cpp
// takes care of in-place/out-of-place copies and of finishing avg.

// Ring reduce-scatter phase: afterwards block (me + shift) % n of `buf` (balanced partition of
// count) holds the reduction of that block over the group. This rank's input is `src` (== buf in
// place; else src is only read, and buf holds count elements whose prior contents do not matter).
// Pipelined by segments. With `out` (count elements, not overlapping src or buf), every reduced
// segment is written to `out` at its offset instead of to buf and sent on from there, and the
// result block ends in `out`; buf then only receives (out of place) or is only read (in place).
// With gather_phase >= 0 (0..255), every segment of the result block is also sent to the next
// rank in that phase as soon as it is reduced (the first step of a ring allgather phase with the
// same count and shift, whose receives the caller posted), and the phase returns without waiting
// for its sends (the caller's wait_all covers them).
Status ring_reduce_scatter_phase(Exchange& ex, const Group& g, const void* src, void* buf,
                                 size_t count, int shift, uint8_t phase, uint8_t* out = nullptr,
                                 int gather_phase = -1);
// Ring allgather phase: rank me owns block (me + shift) % n of the balanced partition of count;
// afterwards every block is on every rank. Pipelined by segments.
Status ring_allgather_phase(Exchange& ex, const Group& g, void* buf, size_t count, int shift,
                            uint8_t phase);
// The two halves of ring_allgather_phase around the send of this rank's own block, for a caller
// that sends that block itself (the fused ring allreduce): the receive handles of every step,
// per step and segment; then the forwarding of each received segment and the wait for all.
using GatherRecvs = std::vector<std::vector<size_t>>;
Result<GatherRecvs> post_ring_allgather_recvs(Exchange& ex, const Group& g, void* buf, size_t count,
                                              int shift, uint8_t phase);
Status ring_allgather_forward(Exchange& ex, const Group& g, void* buf, size_t count, int shift,
                              uint8_t phase, const GatherRecvs& recvs);

// src: this rank's input (== buf in place); buf receives the result.
Status ring_allreduce(Exchange& ex, const Group& g, const void* src, void* buf, size_t count,
                      uint8_t phase);
Status halving_doubling_allreduce(Exchange& ex, const Group& g, void* buf, size_t count,
                                  uint8_t phase);
Status recursive_doubling_allreduce(Exchange& ex, const Group& g, void* buf, size_t count,
                                    uint8_t phase);
Status hierarchical_allreduce(Exchange& ex, void* buf, size_t count);
// src holds count*n elements of input (== buf in place); afterwards block me of buf (count
// elements at me*count) is reduced. src is not written when it differs from buf.
Status ring_reduce_scatter(Exchange& ex, const Group& g, const void* src, void* buf, size_t count,
                           uint8_t phase);
// buf holds count*n elements with this rank's block at me*count; afterwards all blocks.
Status ring_allgather(Exchange& ex, const Group& g, void* buf, size_t count, uint8_t phase);
Status binomial_broadcast(Exchange& ex, const Group& g, void* buf, size_t count, int root_index,
                          uint8_t phase);
Status chain_broadcast(Exchange& ex, const Group& g, void* buf, size_t count, int root_index,
                       uint8_t phase);
// `acc` holds this rank's contribution and is used as the accumulator; on the root it ends with
// the result. `tmp` holds count elements.
Status binomial_reduce(Exchange& ex, const Group& g, void* acc, void* tmp, size_t count,
                       int root_index, uint8_t phase);
Status dissemination_barrier(Exchange& ex, const Group& g, uint8_t phase);
// send and recv hold n blocks of count elements and do not overlap.
Status pairwise_alltoall(Exchange& ex, const Group& g, const void* send, void* recv, size_t count,
                         uint8_t phase);

}  // namespace myelin::collectives::internal
