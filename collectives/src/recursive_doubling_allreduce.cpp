// collectives/src/recursive_doubling_allreduce.cpp — recursive doubling: in log2 p steps each rank
// exchanges its whole buffer with the partner 1, 2, 4, ... apart and reduces. Latency-optimal
// (log2 p messages) but moves the whole buffer each step: for small messages.
//
// Partners reduce in the same order on both sides (a op b with commutative ops gives the same bits
// as b op a), so every rank ends with identical bits. Non-power-of-two counts are folded exactly
// as in halving_doubling_allreduce.cpp.
#include <myelin/collectives/reduce.hpp>

#include "exchange.hpp"

namespace myelin::collectives::internal {

Status recursive_doubling_allreduce(Exchange& ex, const Group& g, void* buf, size_t count,
                                    uint8_t phase) {
  const int n = g.size();
  if (n == 1) return ok_status();
  const size_t es = ex.elem();
  const size_t bytes = count * es;
  const Fold f = fold(g.me, n);
  uint8_t* tmp = ex.comm().scratch(kScratchAlgo0, bytes);
  const auto type = ex.info().type;
  const auto op = ex.info().op;

  if (f.partner >= 0) {
    const int partner = g.ranks[static_cast<size_t>(f.partner)];
    if (f.new_rank < 0) {
      MYELIN_ASSIGN_OR_RETURN(size_t s, ex.post_send(partner, phase, buf, bytes));
      MYELIN_ASSIGN_OR_RETURN(size_t r,
                              ex.post_recv(partner, static_cast<uint8_t>(phase + 3), buf, bytes));
      MYELIN_RETURN_IF_ERROR(ex.wait(s));
      return ex.wait(r);
    }
    MYELIN_ASSIGN_OR_RETURN(size_t r, ex.post_recv(partner, phase, tmp, bytes));
    MYELIN_RETURN_IF_ERROR(ex.wait(r));
    reduce_into(buf, tmp, count, type, op);
  }
  for (int mask = 1; mask < f.pof2; mask <<= 1) {
    const int partner = g.ranks[static_cast<size_t>(unfold(f.new_rank ^ mask, f.rem))];
    // sendrecv waits for the send too, so buf is free to change afterwards.
    MYELIN_RETURN_IF_ERROR(
        ex.sendrecv(partner, buf, bytes, partner, tmp, bytes, static_cast<uint8_t>(phase + 1)));
    reduce_into(buf, tmp, count, type, op);
  }
  if (f.partner >= 0) {
    const int partner = g.ranks[static_cast<size_t>(f.partner)];
    MYELIN_ASSIGN_OR_RETURN(size_t s,
                            ex.post_send(partner, static_cast<uint8_t>(phase + 3), buf, bytes));
    return ex.wait(s);
  }
  return ok_status();
}

}  // namespace myelin::collectives::internal
