// collectives/src/hierarchical_allreduce.cpp — two-level allreduce for several ranks per node:
//   1. binomial reduce inside each node to its leader (the node's lowest rank) — over shared
//      memory when the Context picked shm for same-node peers;
//   2. allreduce among the leaders, one per node, across the network (the algorithm the
//      selection table picks for that many leaders);
//   3. broadcast inside each node from the leader (binomial, or chain for large buffers).
// Only one rank per node touches the network, so the network carries 2 (nodes - 1) / nodes of the
// buffer per node instead of per rank.
#include "exchange.hpp"

namespace myelin::collectives::internal {

namespace {
constexpr uint8_t kNodeReducePhase = 16;
constexpr uint8_t kLeadersPhase = 32;
constexpr uint8_t kNodeBroadcastPhase = 48;
constexpr size_t kChainBroadcastBytes = 256 * 1024;
}  // namespace

Status hierarchical_allreduce(Exchange& ex, void* buf, size_t count) {
  Communicator& comm = ex.comm();
  const size_t bytes = count * ex.elem();

  Group node;
  node.ranks = comm.node_ranks();
  for (size_t i = 0; i < node.ranks.size(); ++i) {
    if (node.ranks[i] == comm.rank()) node.me = static_cast<int>(i);
  }
  Group leaders;
  std::vector<bool> seen(static_cast<size_t>(comm.node_count()), false);
  for (int r = 0; r < comm.size(); ++r) {  // nodes are numbered by their lowest rank: in order
    const auto nd = static_cast<size_t>(comm.node_of(r));
    if (!seen[nd]) {
      seen[nd] = true;
      if (r == comm.rank()) leaders.me = static_cast<int>(leaders.ranks.size());
      leaders.ranks.push_back(r);
    }
  }
  const bool leader = node.me == 0;

  uint8_t* tmp = comm.scratch(kScratchAlgo0, bytes);
  MYELIN_RETURN_IF_ERROR(binomial_reduce(ex, node, buf, tmp, count, 0, kNodeReducePhase)
                             .with_context("reducing inside the node"));
  if (leader && leaders.size() > 1) {
    const Algorithm inter =
        select_algorithm(Collective::kAllreduce, bytes, leaders.size(), leaders.size());
    Status s;
    switch (inter) {
      case Algorithm::kRecursiveDoubling:
        s = recursive_doubling_allreduce(ex, leaders, buf, count, kLeadersPhase);
        break;
      case Algorithm::kHalvingDoubling:
        s = halving_doubling_allreduce(ex, leaders, buf, count, kLeadersPhase);
        break;
      default:
        s = ring_allreduce(ex, leaders, buf, buf, count, kLeadersPhase);
        break;
    }
    MYELIN_RETURN_IF_ERROR(std::move(s).with_context(::myelin::internal::str_cat(
        "allreduce across ", leaders.size(), " nodes (", algorithm_name(inter), ")")));
  }
  Status s = bytes >= kChainBroadcastBytes
                 ? chain_broadcast(ex, node, buf, count, 0, kNodeBroadcastPhase)
                 : binomial_broadcast(ex, node, buf, count, 0, kNodeBroadcastPhase);
  return std::move(s).with_context("broadcasting inside the node");
}

}  // namespace myelin::collectives::internal
