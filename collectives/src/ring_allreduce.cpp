// collectives/src/ring_allreduce.cpp — ring allreduce: the pipelined ring reduce-scatter, after
// which rank r owns block r + 1, then the pipelined ring allgather of those blocks. Each rank sends
// and receives 2 (n - 1) / n of the buffer: bandwidth-optimal, latency 2 (n - 1) steps.
//
// Towards a shm peer (three or more ranks, up to kSharedWorkMaxBytes), the reduced segments go to
// the Communicator's shared working memory instead of buf: every connected shm peer has it
// mapped, so a message sent from it is one plain memcpy on the receiver, where a message from
// ordinary memory is a cross-memory-attach copy that pins the sender's pages again for every
// message. Only the first reduce-scatter step still sends from the caller's input. The messages
// are the same either way, so each rank decides this alone (by its next rank's transport).
// When every rank of the group is a shm peer (and there are at most kDirectMaxRanks), the owner of
// each reduced block then sends it from there to every other rank directly: an allgather in one
// step instead of n - 1 forwarding steps, the same bytes per rank, none forwarded out of buf. That
// changes the messages, so it is decided by a property every rank sees alike.
#include "exchange.hpp"

#include <cstring>

#include <myelin/transport/endpoint.hpp>

namespace myelin::collectives::internal {
namespace {

// Largest allreduce (bytes) that takes the shared working memory: that much shared memory stays
// allocated per Communicator. Above it the ring runs as before (where 64 MiB already moves at
// 1.8-2.2x OpenMPI's shared-memory rate, docs/performance.md).
constexpr size_t kSharedWorkMaxBytes = 8 * 1024 * 1024;
// Largest group that gathers directly: the direct allgather connects every pair of ranks (two
// transport rings per pair), the ring allgather only neighbours.
constexpr int kDirectMaxRanks = 8;

Result<bool> is_shm(Exchange& ex, int rank) {
  MYELIN_ASSIGN_OR_RETURN(transport::Endpoint * ep, ex.comm().peer(rank, ex.deadline()));
  return ep->backend() == transport::Backend::kShm;
}

// True when every other rank of the group is reached over shm. Every rank of a group on one node
// over shm answers true and every rank of a group that spans nodes (it has a peer elsewhere)
// answers false, so all ranks take the same variant. The node map (the same on every rank) rules
// out a group that spans nodes before any connection is made.
Result<bool> all_shm(Exchange& ex, const Group& g) {
  const Communicator& comm = ex.comm();
  const int my_node = comm.node_of(g.ranks[static_cast<size_t>(g.me)]);
  for (int r : g.ranks) {
    if (comm.node_of(r) != my_node) return false;
  }
  for (int i = 0; i < g.size(); ++i) {
    if (i == g.me) continue;
    MYELIN_ASSIGN_OR_RETURN(const bool shm, is_shm(ex, g.ranks[static_cast<size_t>(i)]));
    if (!shm) return false;
  }
  return true;
}

// Sends this rank's reduced block (in `work`) to every other rank and receives theirs into buf.
Status direct_allgather(Exchange& ex, const Group& g, const uint8_t* work, void* buf, size_t count,
                        int shift, uint8_t phase) {
  const int n = g.size();
  const size_t es = ex.elem();
  const size_t seg = ex.segment_elems();
  for (int d = 1; d < n; ++d) {
    const int from = mod(g.me - d, n);
    const Range b = balanced_block(count, n, mod(from + shift, n));
    for (size_t j = 0; j < segment_count(b.count, seg); ++j) {
      const Range piece = segment(b, seg, j);
      MYELIN_RETURN_IF_ERROR(ex.post_recv(g.ranks[static_cast<size_t>(from)], phase,
                                          at(buf, piece.offset, es), piece.count * es)
                                 .status());
    }
  }
  const Range mine = balanced_block(count, n, mod(g.me + shift, n));
  for (int d = 1; d < n; ++d) {  // the next rank first: it is the one the ring woke last
    const int to = g.ranks[static_cast<size_t>(mod(g.me + d, n))];
    for (size_t j = 0; j < segment_count(mine.count, seg); ++j) {
      const Range piece = segment(mine, seg, j);
      MYELIN_RETURN_IF_ERROR(
          ex.post_send(to, phase, at(work, piece.offset, es), piece.count * es).status());
    }
  }
  if (mine.count > 0) {
    copy_bytes(at(buf, mine.offset, es), at(work, mine.offset, es), mine.count * es);
  }
  return ex.wait_all();
}

}  // namespace

Status ring_allreduce(Exchange& ex, const Group& g, const void* src, void* buf, size_t count,
                      uint8_t phase) {
  if (g.size() == 1) {
    if (src != buf && count > 0) copy_bytes(buf, src, count * ex.elem());
    return ok_status();
  }
  const int n = g.size();
  const size_t es = ex.elem();
  const size_t bytes = count * es;
  if (n >= 3 && bytes > 0 && bytes <= kSharedWorkMaxBytes) {
    MYELIN_ASSIGN_OR_RETURN(const bool next_shm,
                            is_shm(ex, g.ranks[static_cast<size_t>(mod(g.me + 1, n))]));
    if (next_shm) {
      bool direct = false;
      if (n <= kDirectMaxRanks) {
        MYELIN_ASSIGN_OR_RETURN(direct, all_shm(ex, g));
      }
      MYELIN_ASSIGN_OR_RETURN(uint8_t * work, ex.shared_work(bytes));
      MYELIN_RETURN_IF_ERROR(ring_reduce_scatter_phase(ex, g, src, buf, count, 1, phase, work));
      if (direct) {
        return direct_allgather(ex, g, work, buf, count, 1, static_cast<uint8_t>(phase + 1));
      }
      const Range mine = balanced_block(count, n, mod(g.me + 1, n));
      if (mine.count > 0) {
        copy_bytes(at(buf, mine.offset, es), at(work, mine.offset, es), mine.count * es);
      }
      return ring_allgather_phase(ex, g, buf, count, 1, static_cast<uint8_t>(phase + 1));
    }
  }
  // Every element of buf is written: the reduce-scatter writes the blocks it reduces (including
  // this rank's own), the allgather the others.
  // The two phases run as one pipeline: the allgather's receives are posted first, and each
  // segment of this rank's result block goes on to the next rank as soon as it is reduced, so no
  // rank waits for its whole reduce-scatter to drain before the allgather starts, and the
  // segment leaves while it is still in cache. Posting every allgather receive up front is safe:
  // the final value of a segment reaches this rank only after every rank, this one included, has
  // reduced and sent its part of that segment, so it never lands on bytes a send or reduction
  // still reads (in place or out of place).
  const auto gather = static_cast<uint8_t>(phase + 1);
  MYELIN_ASSIGN_OR_RETURN(const GatherRecvs recvs,
                          post_ring_allgather_recvs(ex, g, buf, count, 1, gather));
  MYELIN_RETURN_IF_ERROR(
      ring_reduce_scatter_phase(ex, g, src, buf, count, 1, phase, nullptr, gather));
  return ring_allgather_forward(ex, g, buf, count, 1, gather, recvs);
}

}  // namespace myelin::collectives::internal
