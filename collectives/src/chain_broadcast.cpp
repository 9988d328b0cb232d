// collectives/src/chain_broadcast.cpp — pipelined chain broadcast: root -> root+1 -> ... in
// segments; every rank forwards a segment as soon as it has it, so after the pipeline fills each
// link carries the buffer once: time ~ (n - 2 + S) segment transfers for S segments. For large
// buffers. Any n, any root.
#include "exchange.hpp"

namespace myelin::collectives::internal {

Status chain_broadcast(Exchange& ex, const Group& g, void* buf, size_t count, int root_index,
                       uint8_t phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  const size_t es = ex.elem();
  const size_t seg = ex.segment_elems();
  const int vrank = mod(g.me - root_index, n);
  const int prev = vrank > 0 ? g.ranks[static_cast<size_t>(mod(g.me - 1, n))] : -1;
  const int next = vrank < n - 1 ? g.ranks[static_cast<size_t>(mod(g.me + 1, n))] : -1;
  const Range all{0, count};
  const size_t segs = segment_count(count, seg);

  std::vector<size_t> recvs;
  if (prev >= 0) {
    for (size_t j = 0; j < segs; ++j) {
      const Range piece = segment(all, seg, j);
      MYELIN_ASSIGN_OR_RETURN(
          size_t h, ex.post_recv(prev, phase, at(buf, piece.offset, es), piece.count * es));
      recvs.push_back(h);
    }
  }
  for (size_t j = 0; j < segs; ++j) {
    if (prev >= 0) MYELIN_RETURN_IF_ERROR(ex.wait(recvs[j]));
    if (next >= 0) {
      const Range piece = segment(all, seg, j);
      MYELIN_RETURN_IF_ERROR(
          ex.post_send(next, phase, at(buf, piece.offset, es), piece.count * es));
    }
  }
  return ex.wait_all();
}

}  // namespace myelin::collectives::internal
