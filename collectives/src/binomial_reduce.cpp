// collectives/src/binomial_reduce.cpp — binomial-tree reduce: each rank receives the partial
// results of its children (nearest subtree first), reduces them into its accumulator, and sends
// that to its parent. ceil(log2 n) message latencies. Any n, any root.
//
// The receive from the next child is posted before the current one is reduced (two buffers), so
// reducing overlaps the next transfer.
#include <myelin/collectives/reduce.hpp>

#include "exchange.hpp"

namespace myelin::collectives::internal {

Status binomial_reduce(Exchange& ex, const Group& g, void* acc, void* tmp, size_t count,
                       int root_index, uint8_t phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  const size_t bytes = count * ex.elem();
  const TreeNode node = binomial_tree(g.me, n, root_index);
  uint8_t* bufs[2] = {static_cast<uint8_t*>(tmp), ex.comm().scratch(kScratchAlgo1, bytes)};
  const size_t k = node.children.size();
  // Children are listed farthest first; the nearest one finishes its own subtree first.
  const auto child_rank = [&](size_t i) {
    return g.ranks[static_cast<size_t>(node.children[k - 1 - i])];
  };
  size_t pending = 0;
  if (k > 0) {
    MYELIN_ASSIGN_OR_RETURN(pending, ex.post_recv(child_rank(0), phase, bufs[0], bytes));
  }
  for (size_t i = 0; i < k; ++i) {
    MYELIN_RETURN_IF_ERROR(ex.wait(pending));
    if (i + 1 < k) {
      MYELIN_ASSIGN_OR_RETURN(pending,
                              ex.post_recv(child_rank(i + 1), phase, bufs[(i + 1) % 2], bytes));
    }
    reduce_into(acc, bufs[i % 2], count, ex.info().type, ex.info().op);
  }
  if (node.parent >= 0) {
    MYELIN_RETURN_IF_ERROR(
        ex.post_send(g.ranks[static_cast<size_t>(node.parent)], phase, acc, bytes));
  }
  return ex.wait_all();
}

}  // namespace myelin::collectives::internal
