// collectives/src/halving_doubling_allreduce.cpp — Rabenseifner's allreduce: a reduce-scatter by
// recursive halving (log2 p steps exchanging half, a quarter, ... of the buffer with partners
// p/2, p/4, ... apart) followed by an allgather by recursive doubling that retraces the steps.
// Bandwidth like the ring (2 (p - 1) / p of the buffer) in 2 log2 p steps instead of 2 (p - 1).
//
// Rank counts that are not a power of two are folded (schedule.hpp, fold()): the first 2 * rem
// ranks pair up, the even one of each pair sends its whole buffer to the odd one and waits for the
// result; the remaining pof2 ranks run the algorithm. This costs two extra full-buffer messages
// on the folded pairs and is why the ring wins for large buffers at such counts.
#include <algorithm>

#include <myelin/collectives/reduce.hpp>

#include "exchange.hpp"

namespace myelin::collectives::internal {

Status halving_doubling_allreduce(Exchange& ex, const Group& g, void* buf, size_t count,
                                  uint8_t phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  const size_t es = ex.elem();
  const Fold f = fold(g.me, n);
  uint8_t* tmp = ex.comm().scratch(kScratchAlgo0, count * es);
  const auto type = ex.info().type;
  const auto op = ex.info().op;

  if (f.partner >= 0) {  // folded pair: pre-step
    const int partner = g.ranks[static_cast<size_t>(f.partner)];
    if (f.new_rank < 0) {
      MYELIN_ASSIGN_OR_RETURN(size_t s, ex.post_send(partner, phase, buf, count * es));
      MYELIN_ASSIGN_OR_RETURN(
          size_t r, ex.post_recv(partner, static_cast<uint8_t>(phase + 3), buf, count * es));
      MYELIN_RETURN_IF_ERROR(ex.wait(s));
      return ex.wait(r);
    }
    MYELIN_ASSIGN_OR_RETURN(size_t r, ex.post_recv(partner, phase, tmp, count * es));
    MYELIN_RETURN_IF_ERROR(ex.wait(r));
    reduce_into(buf, tmp, count, type, op);
  }

  const std::vector<HalvingStep> steps = halving_steps(f.new_rank, f.pof2);
  for (const HalvingStep& st : steps) {  // reduce-scatter by recursive halving
    const int partner = g.ranks[static_cast<size_t>(unfold(st.partner, f.rem))];
    const Range keep = balanced_blocks(count, f.pof2, st.keep_lo, st.keep_hi);
    const Range give = balanced_blocks(count, f.pof2, st.send_lo, st.send_hi);
    MYELIN_RETURN_IF_ERROR(ex.sendrecv(partner, at(buf, give.offset, es), give.count * es, partner,
                                       tmp, keep.count * es, static_cast<uint8_t>(phase + 1)));
    reduce_into(at(buf, keep.offset, es), tmp, keep.count, type, op);
  }
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {  // allgather by recursive doubling
    const int partner = g.ranks[static_cast<size_t>(unfold(it->partner, f.rem))];
    const Range have = balanced_blocks(count, f.pof2, it->keep_lo, it->keep_hi);
    const Range want = balanced_blocks(count, f.pof2, it->send_lo, it->send_hi);
    MYELIN_RETURN_IF_ERROR(ex.sendrecv(partner, at(buf, have.offset, es), have.count * es, partner,
                                       at(buf, want.offset, es), want.count * es,
                                       static_cast<uint8_t>(phase + 2)));
  }

  if (f.partner >= 0) {  // post-step: hand the result back to the folded partner
    const int partner = g.ranks[static_cast<size_t>(f.partner)];
    MYELIN_ASSIGN_OR_RETURN(
        size_t s, ex.post_send(partner, static_cast<uint8_t>(phase + 3), buf, count * es));
    return ex.wait(s);
  }
  return ok_status();
}

}  // namespace myelin::collectives::internal
