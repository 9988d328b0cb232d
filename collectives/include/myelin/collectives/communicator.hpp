// myelin/collectives/communicator.hpp
//
// Communicator: a group of `size` ranks that run collectives together, over one transport Context
// per rank and the bootstrap Store they share.
//
//   auto ctx = transport::Context::create({.backend = transport::Backend::kAuto});
//   MYELIN_ASSIGN_OR_RETURN(auto comm, Communicator::create({.rank = r, .size = n,
//                                                            .context = ctx->get(),
//                                                            .store = &store}));
//   MYELIN_RETURN_IF_ERROR(allreduce(*comm, grads, grads, count, DataType::kF32, ReduceOp::kSum));
//
// Creation publishes this rank's transport address under "<key_prefix>/addr/<rank>" (the
// bootstrap convention) and its node identity with its CPU affinity ("<node id>\n<CPU list>")
// under "<key_prefix>/node/<rank>", then reads every rank's (to group ranks by node for the
// hierarchical algorithm, and to count the ranks that compete for this rank's CPUs). Connections
// are made lazily, the first time a collective needs a peer; the Context picks the backend per peer
// (with Backend::kAuto: shared memory for same-node peers, the network otherwise).
//
// Progress: create() tells the Context how many of this node's ranks may run on this rank's CPUs
// (Context::set_local_ranks; ranks whose affinity masks share a CPU with this rank's, itself
// included: every rank of the node when none is pinned); a Context in
// transport::ProgressMode::kAuto (the default) then polls and yields when they outnumber the CPUs
// this rank may use (transport::usable_cpus()), and busy-polls otherwise. context().progress_mode()
// and progress_reason() say what was chosen (also logged at info when it is yield).
//
// Failure: when a collective fails (a peer died, did not answer within the timeout, called a
// different collective or size), the error names the operation and the rank, and the communicator
// becomes unusable: it disconnects its endpoints (so that its peers fail fast instead of waiting
// for their timeout) and every later call returns failed_precondition quoting the first error.
// Build a new Communicator (on a new Context) to continue.
//
// Thread safety: none, like the Context: one thread calls the collectives of a communicator (and
// drives its Context). Different communicators on different Contexts are independent.
// Ownership: the Context and the Store are borrowed and must outlive the Communicator.
// Blocking: create() waits (bounded by `timeout`) for every rank's node identity.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/context.hpp>
#include <myelin/transport/store.hpp>

namespace myelin::collectives {

namespace internal {
struct PendingPool;  // collectives/src/exchange.hpp
}  // namespace internal

struct CommunicatorOptions {
  int rank = -1;
  int size = 0;
  transport::Context* context = nullptr;  // borrowed
  transport::Store* store = nullptr;      // borrowed
  // Keys used in the store: "<key_prefix>/addr/<rank>", "<key_prefix>/node/<rank>".
  std::string key_prefix = "myelin";
  // Publish context->address() under "<key_prefix>/addr/<rank>" (off when the bootstrap already
  // did).
  bool publish_address = true;
  // Which node this rank is on; ranks with equal ids form one node for the hierarchical algorithm.
  // Empty: hostname plus the kernel boot id.
  std::string node_id;
  // Default deadline of each collective (Options::timeout overrides it per call) and of create().
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
};

class Communicator {
 public:
  static Result<std::unique_ptr<Communicator>> create(const CommunicatorOptions& options);

  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  ~Communicator();

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return options_.timeout; }
  [[nodiscard]] transport::Context& context() noexcept { return *options_.context; }

  // Node structure: every rank's node index (nodes numbered by their lowest rank), and the ranks
  // on this rank's node in increasing order.
  [[nodiscard]] int node_count() const noexcept { return node_count_; }
  [[nodiscard]] int node_of(int rank) const noexcept { return node_of_[rank]; }
  [[nodiscard]] const std::vector<int>& node_ranks() const noexcept { return node_ranks_; }

  // OK while usable; after a failed collective, the first error.
  [[nodiscard]] const Status& status() const noexcept { return failure_; }
  [[nodiscard]] bool usable() const noexcept { return failure_.ok(); }

  // --- for the collective algorithms (myelin internal) ---
  // The endpoint of a peer, connecting on first use (waits for its address in the store).
  Result<transport::Endpoint*> peer(int rank, Deadline deadline);
  // Marks the communicator unusable with this error and disconnects every endpoint it made.
  void fail(const Status& error);
  // Sequence number of the next collective (same on every rank while they call the same ones).
  uint64_t next_sequence() noexcept { return sequence_++; }
  // A scratch buffer of at least `bytes`, one per slot (0..3), reused across calls.
  uint8_t* scratch(int slot, size_t bytes);
  // The list of posted operations, reused across calls.
  internal::PendingPool& pending_pool() noexcept { return *pending_pool_; }

 private:
  explicit Communicator(const CommunicatorOptions& options);
  Status init();

  CommunicatorOptions options_;
  int rank_;
  int size_;
  int node_count_ = 1;
  std::vector<int> node_of_;
  std::vector<int> node_ranks_;
  std::vector<transport::Endpoint*> endpoints_;  // by rank; owned by the Context
  Status failure_;
  uint64_t sequence_ = 0;
  std::vector<uint8_t> scratch_[4];
  std::unique_ptr<internal::PendingPool> pending_pool_;
};

}  // namespace myelin::collectives
