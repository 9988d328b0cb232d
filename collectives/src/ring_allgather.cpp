// collectives/src/ring_allgather.cpp — ring allgather, chunked and pipelined.
//
// n - 1 steps; in step s rank r forwards block (own - s) to r + 1 and receives block (own - s - 1)
// from r - 1 straight into place. Every receive is posted up front (the blocks are distinct), and
// each received segment is forwarded as soon as it lands. The fused ring allreduce
// (ring_allreduce.cpp) uses the two halves apart: it posts the receives before its
// reduce-scatter, which sends this rank's block itself, then forwards.
#include "exchange.hpp"

namespace myelin::collectives::internal {

Result<GatherRecvs> post_ring_allgather_recvs(Exchange& ex, const Group& g, void* buf, size_t count,
                                              int shift, uint8_t phase) {
  const int n = g.size();
  GatherRecvs recvs(static_cast<size_t>(n > 1 ? n - 1 : 0));
  const int own = mod(g.me + shift, n);
  const size_t es = ex.elem();
  const size_t seg = ex.segment_elems();
  const int prev = g.ranks[mod(g.me - 1, n)];
  for (int s = 0; s < n - 1; ++s) {
    const Range b = balanced_block(count, n, mod(own - s - 1, n));
    for (size_t j = 0; j < segment_count(b.count, seg); ++j) {
      const Range piece = segment(b, seg, j);
      MYELIN_ASSIGN_OR_RETURN(
          size_t h, ex.post_recv(prev, phase, at(buf, piece.offset, es), piece.count * es));
      recvs[static_cast<size_t>(s)].push_back(h);
    }
  }
  return recvs;
}

Status ring_allgather_forward(Exchange& ex, const Group& g, void* buf, size_t count, int shift,
                              uint8_t phase, const GatherRecvs& recvs) {
  const int n = g.size();
  const int own = mod(g.me + shift, n);
  const size_t es = ex.elem();
  const size_t seg = ex.segment_elems();
  const int next = g.ranks[mod(g.me + 1, n)];
  for (int s = 0; s < n - 2; ++s) {
    const Range b = balanced_block(count, n, mod(own - s - 1, n));
    const auto& handles = recvs[static_cast<size_t>(s)];
    for (size_t j = 0; j < handles.size(); ++j) {
      MYELIN_RETURN_IF_ERROR(ex.wait(handles[j]));
      const Range piece = segment(b, seg, j);
      MYELIN_RETURN_IF_ERROR(
          ex.post_send(next, phase, at(buf, piece.offset, es), piece.count * es));
    }
  }
  return ex.wait_all();
}

Status ring_allgather_phase(Exchange& ex, const Group& g, void* buf, size_t count, int shift,
                            uint8_t phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  MYELIN_ASSIGN_OR_RETURN(const GatherRecvs recvs,
                          post_ring_allgather_recvs(ex, g, buf, count, shift, phase));
  const size_t es = ex.elem();
  const size_t seg = ex.segment_elems();
  const int next = g.ranks[mod(g.me + 1, n)];
  const Range mine = balanced_block(count, n, mod(g.me + shift, n));
  for (size_t j = 0; j < segment_count(mine.count, seg); ++j) {
    const Range piece = segment(mine, seg, j);
    MYELIN_RETURN_IF_ERROR(ex.post_send(next, phase, at(buf, piece.offset, es), piece.count * es));
  }
  return ring_allgather_forward(ex, g, buf, count, shift, phase, recvs);
}

Status ring_allgather(Exchange& ex, const Group& g, void* buf, size_t count, uint8_t phase) {
  return ring_allgather_phase(ex, g, buf, count * static_cast<size_t>(g.size()), 0, phase);
}

}  // namespace myelin::collectives::internal
