// collectives/src/dissemination_barrier.cpp — dissemination barrier (Hensgen, Finkel, Manber):
// in round k rank r signals r + 2^k and waits for r - 2^k, ceil(log2 n) rounds, any n. After the
// last round every rank has heard, directly or transitively, from every other. Each signal carries
// its round number, checked on arrival.
#include "exchange.hpp"

namespace myelin::collectives::internal {

Status dissemination_barrier(Exchange& ex, const Group& g, uint8_t phase) {
  const int n = g.size();
  const int rounds = dissemination_rounds(n);
  for (int k = 0; k < rounds; ++k) {
    const int dist = 1 << k;
    const uint32_t out = static_cast<uint32_t>(k);
    uint32_t in = ~0u;
    MYELIN_RETURN_IF_ERROR(
        ex.sendrecv(g.ranks[static_cast<size_t>(mod(g.me + dist, n))], &out, sizeof(out),
                    g.ranks[static_cast<size_t>(mod(g.me - dist, n))], &in, sizeof(in), phase));
    if (in != out) {
      return protocol_error("barrier round ", k, " received the signal of round ", in);
    }
  }
  return ok_status();
}

}  // namespace myelin::collectives::internal
