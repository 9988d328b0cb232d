// collectives/src/ring_allreduce.cpp — ring allreduce: the pipelined ring reduce-scatter, after
// which rank r owns block r + 1, then the pipelined ring allgather of those blocks. Each rank sends
// and receives 2 (n - 1) / n of the buffer: bandwidth-optimal, latency 2 (n - 1) steps.
#include "exchange.hpp"

#include <cstring>

namespace myelin::collectives::internal {

Status ring_allreduce(Exchange& ex, const Group& g, const void* src, void* buf, size_t count,
                      uint8_t phase) {
  if (g.size() == 1) {
    if (src != buf && count > 0) std::memcpy(buf, src, count * ex.elem());
    return ok_status();
  }
  // Every element of buf is written: the reduce-scatter writes the blocks it reduces (including
  // this rank's own), the allgather the others.
  MYELIN_RETURN_IF_ERROR(ring_reduce_scatter_phase(ex, g, src, buf, count, 1, phase));
  return ring_allgather_phase(ex, g, buf, count, 1, static_cast<uint8_t>(phase + 1));
}

}  // namespace myelin::collectives::internal
