// collectives/src/pairwise_alltoall.cpp — pairwise exchange: every receive is posted first (each
// block has its own place), then block j is sent to rank j in the order me+1, me+2, ... so that at
// any moment ranks send to different targets; this rank's own block is a local copy.
#include <cstring>

#include "exchange.hpp"

namespace myelin::collectives::internal {

Status pairwise_alltoall(Exchange& ex, const Group& g, const void* send, void* recv, size_t count,
                         uint8_t phase) {
  const int n = g.size();
  const size_t es = ex.elem();
  const size_t bytes = count * es;
  const auto block = [&](int i) { return static_cast<size_t>(i) * count; };
  if (bytes > 0) copy_bytes(at(recv, block(g.me), es), at(send, block(g.me), es), bytes);
  for (int s = 1; s < n; ++s) {
    const int from = mod(g.me - s, n);
    MYELIN_RETURN_IF_ERROR(
        ex.post_recv(g.ranks[static_cast<size_t>(from)], phase, at(recv, block(from), es), bytes));
  }
  for (int s = 1; s < n; ++s) {
    const int to = mod(g.me + s, n);
    MYELIN_RETURN_IF_ERROR(
        ex.post_send(g.ranks[static_cast<size_t>(to)], phase, at(send, block(to), es), bytes));
  }
  return ex.wait_all();
}

}  // namespace myelin::collectives::internal
