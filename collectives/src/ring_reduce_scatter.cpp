// collectives/src/ring_reduce_scatter.cpp — ring reduce-scatter, chunked and pipelined.
//
// n - 1 steps; in step s rank r sends block (r + k - s) to r + 1 and receives block (r + k - s - 1)
// from r - 1, reducing it into its buffer (k = shift - 1). Blocks are cut into segments, and each
// reduced segment is sent on at once: the block received in step s is the one sent in step s + 1,
// so reducing segment j overlaps the transfer of segment j + 1, and the next step starts before the
// current one ends. Receives of step s + 1 are posted at the start of step s, so data lands in
// place rather than in the transport's unexpected-message store.
// Out of place (src != buf), src is read where this rank's contribution is needed (the first block
// sent, and each received segment as it is reduced), and segments are received straight into
// their place in buf and reduced there (buf = src op buf): no copy of the input, no staging
// buffer. The block received in step s + 1 differs from the ones sent and reduced in steps s and
// s + 1 (n >= 3), so early receives never land on data still in use. In place, the received
// segments go to a double buffer of scratch (block of step s to half s % 2) and are reduced into
// buf.
// With a separate output `out` (the shared working memory of ring_allreduce.cpp over shm), each
// reduced segment goes to `out` and is sent from there, so the next rank copies it out of memory
// it has mapped instead of through cross-memory attach; buf is then never written in place, and
// out of place only receives.
// With a gather phase (the fused ring allreduce of ring_allreduce.cpp), each segment of the last
// step's block, this rank's result, goes on to the next rank in that phase as soon as it is
// reduced: the first step of the allgather, sent while the segment is still in cache and before
// the rest of the block is in. The phase then returns without waiting for its sends; the caller's
// final wait covers them.
#include <cstring>

#include <myelin/collectives/reduce.hpp>

#include "exchange.hpp"

namespace myelin::collectives::internal {

Status ring_reduce_scatter_phase(Exchange& ex, const Group& g, const void* src, void* buf,
                                 size_t count, int shift, uint8_t phase, uint8_t* out,
                                 int gather_phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  const int me = g.me;
  const int k = shift - 1;
  const size_t es = ex.elem();
  const size_t seg = ex.segment_elems();
  const int next = g.ranks[mod(me + 1, n)];
  const int prev = g.ranks[mod(me - 1, n)];
  const auto send_block = [&](int s) { return balanced_block(count, n, mod(me + k - s, n)); };
  const auto recv_block = [&](int s) { return balanced_block(count, n, mod(me + k - s - 1, n)); };

  const bool in_place = src == buf;
  uint8_t* tmp[2] = {nullptr, nullptr};
  if (in_place) {
    const size_t max_block = balanced_block(count, n, 0).count;
    tmp[0] = ex.comm().scratch(kScratchAlgo0, max_block * es);
    tmp[1] = ex.comm().scratch(kScratchAlgo1, max_block * es);
  }
  // Where segment `piece` of block `b` (received in step s) lands.
  const auto landing = [&](int s, Range b, Range piece) -> uint8_t* {
    return in_place ? tmp[s % 2] + (piece.offset - b.offset) * es : at(buf, piece.offset, es);
  };

  std::vector<size_t> recvs[2];
  const auto post_recvs = [&](int s) -> Status {
    const Range b = recv_block(s);
    auto& handles = recvs[s % 2];
    handles.clear();
    for (size_t j = 0; j < segment_count(b.count, seg); ++j) {
      const Range piece = segment(b, seg, j);
      MYELIN_ASSIGN_OR_RETURN(size_t h,
                              ex.post_recv(prev, phase, landing(s, b, piece), piece.count * es));
      handles.push_back(h);
    }
    return ok_status();
  };

  MYELIN_RETURN_IF_ERROR(post_recvs(0));
  const Range first = send_block(0);
  for (size_t j = 0; j < segment_count(first.count, seg); ++j) {
    const Range piece = segment(first, seg, j);
    MYELIN_RETURN_IF_ERROR(ex.post_send(next, phase, at(src, piece.offset, es), piece.count * es));
  }
  for (int s = 0; s < n - 1; ++s) {
    const bool more = s + 1 < n - 1;
    if (more) MYELIN_RETURN_IF_ERROR(post_recvs(s + 1));
    const Range b = recv_block(s);
    for (size_t j = 0; j < recvs[s % 2].size(); ++j) {
      MYELIN_RETURN_IF_ERROR(ex.wait(recvs[s % 2][j]));
      const Range piece = segment(b, seg, j);
      uint8_t* dst = at(out != nullptr ? out : buf, piece.offset, es);
      // This rank's contribution is the left operand, the received partial result the right one,
      // in place and out of place alike.
      reduce_to(dst, at(src, piece.offset, es), landing(s, b, piece), piece.count, ex.info().type,
                ex.info().op);
      if (more) {
        MYELIN_RETURN_IF_ERROR(ex.post_send(next, phase, dst, piece.count * es));
      } else if (gather_phase >= 0) {
        MYELIN_RETURN_IF_ERROR(
            ex.post_send(next, static_cast<uint8_t>(gather_phase), dst, piece.count * es));
      }
    }
  }
  return gather_phase >= 0 ? ok_status() : ex.wait_all();
}

Status ring_reduce_scatter(Exchange& ex, const Group& g, const void* src, void* buf, size_t count,
                           uint8_t phase) {
  // With n * count elements every balanced block is exactly count long and block i starts at
  // i * count; shift 0 leaves block me on rank me.
  if (g.size() == 1 && src != buf && count > 0) copy_bytes(buf, src, count * ex.elem());
  return ring_reduce_scatter_phase(ex, g, src, buf, count * static_cast<size_t>(g.size()), 0,
                                   phase);
}

}  // namespace myelin::collectives::internal
