// collectives/src/binomial_broadcast.cpp — binomial-tree broadcast: each rank receives the whole
// buffer from its parent, then sends it to its children, farthest subtree first. ceil(log2 n)
// message latencies; for small and medium buffers. Any n, any root.
#include "exchange.hpp"

namespace myelin::collectives::internal {

Status binomial_broadcast(Exchange& ex, const Group& g, void* buf, size_t count, int root_index,
                          uint8_t phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  const size_t bytes = count * ex.elem();
  const TreeNode node = binomial_tree(g.me, n, root_index);
  if (node.parent >= 0) {
    MYELIN_ASSIGN_OR_RETURN(
        size_t r, ex.post_recv(g.ranks[static_cast<size_t>(node.parent)], phase, buf, bytes));
    MYELIN_RETURN_IF_ERROR(ex.wait(r));
  }
  for (int child : node.children) {
    MYELIN_RETURN_IF_ERROR(ex.post_send(g.ranks[static_cast<size_t>(child)], phase, buf, bytes));
  }
  return ex.wait_all();
}

}  // namespace myelin::collectives::internal
