// collectives/src/collectives.cpp — the public entry points: argument checks, algorithm choice,
// the descriptor check, in-place/out-of-place copies, avg, and failure handling. The algorithms
// themselves live one per file.
#include <myelin/collectives/collectives.hpp>

#include <cstdlib>
#include <cstring>
#include <functional>

#include <myelin/collectives/reduce.hpp>
#include <myelin/core/log.hpp>

#include "exchange.hpp"

namespace myelin::collectives {

using internal::CallInfo;
using internal::Exchange;
using internal::Group;

namespace {

constexpr uint32_t kDescriptorMagic = 0x4D59434Fu;  // "MYCO"

// What each rank tells the next one about the call it is making; compared field by field.
struct Descriptor {
  uint32_t magic = kDescriptorMagic;
  uint8_t collective = 0;
  uint8_t algorithm = 0;
  uint8_t type = 0;
  uint8_t op = 0;
  uint64_t sequence = 0;
  uint64_t count = 0;
  int32_t root = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(Descriptor) == 32, "descriptor layout is part of the wire protocol");

std::string describe_call(const Descriptor& d) {
  const auto c = static_cast<Collective>(d.collective);
  std::string s =
      ::myelin::internal::str_cat(collective_name(c), " #", d.sequence, " (",
                                  algorithm_name(static_cast<Algorithm>(d.algorithm)), ") of ",
                                  d.count, " x ", dtype_name(static_cast<DataType>(d.type)));
  if (c == Collective::kAllreduce || c == Collective::kReduceScatter || c == Collective::kReduce) {
    s += ::myelin::internal::str_cat(" ", reduce_op_name(static_cast<ReduceOp>(d.op)));
  }
  if (c == Collective::kBroadcast || c == Collective::kReduce) {
    s += ::myelin::internal::str_cat(" root ", d.root);
  }
  return s;
}

bool same_call(const Descriptor& a, const Descriptor& b) {
  return a.magic == b.magic && a.collective == b.collective && a.algorithm == b.algorithm &&
         a.type == b.type && a.op == b.op && a.sequence == b.sequence && a.count == b.count &&
         a.root == b.root;
}

Group world(const Communicator& comm) {
  Group g;
  g.ranks.resize(static_cast<size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) g.ranks[static_cast<size_t>(r)] = r;
  g.me = comm.rank();
  return g;
}

Status mismatched_calls(int peer, const Descriptor& theirs, const Descriptor& mine) {
  return invalid_argument("mismatched collective calls: rank ", peer, " called ",
                          describe_call(theirs), ", this rank called ", describe_call(mine));
}

struct Call {
  Collective collective;
  DataType type = DataType::kU8;
  ReduceOp op = ReduceOp::kSum;
  size_t count = 0;         // as the caller passed it
  size_t select_bytes = 0;  // what the selection table sees
  int root = 0;
  // allreduce only (for the two-rank fast path)
  const void* send = nullptr;
  void* recv = nullptr;
};

constexpr size_t kDescriptorBytes = sizeof(Descriptor);
// Room for what a peer may send on the descriptor phase: a descriptor, or on the two-rank fast
// path a descriptor and the data.
constexpr size_t kDescriptorCapacity = kDescriptorBytes + internal::kFusedPairMaxBytes;

// Two ranks, small allreduce: each rank sends one message carrying its call descriptor followed by
// its data, receives the peer's, checks the descriptor and reduces — one message each way, no
// separate descriptor message, no copy of the input into recv first. Both ranks take this path
// exactly when their descriptors agree (it depends only on the collective, algorithm, count and
// type, which the descriptor holds, and on the rank count); a peer that took the ordinary path
// (a different count) sends a bare descriptor on the same channel and is reported as a mismatch.
Status fused_pair_allreduce(Exchange& ex, const Descriptor& mine, const Call& call) {
  Communicator& comm = ex.comm();
  const int peer = 1 - comm.rank();
  const size_t bytes = call.count * ex.elem();
  uint8_t* in = comm.scratch(internal::kScratchDescriptor, 2 * kDescriptorCapacity);
  uint8_t* out = in + kDescriptorCapacity;
  MYELIN_ASSIGN_OR_RETURN(
      size_t r, ex.post_recv_upto(peer, internal::kDescriptorPhase, in, kDescriptorCapacity));
  std::memcpy(out, &mine, kDescriptorBytes);
  if (bytes > 0) std::memcpy(out + kDescriptorBytes, call.send, bytes);
  MYELIN_ASSIGN_OR_RETURN(
      size_t s, ex.post_send(peer, internal::kDescriptorPhase, out, kDescriptorBytes + bytes));
  MYELIN_RETURN_IF_ERROR(ex.wait(r));
  const size_t got = ex.received(r);
  if (got < kDescriptorBytes) {
    return invalid_argument("rank ", peer, " sent ", got, " bytes where a ", kDescriptorBytes,
                            "-byte call descriptor was expected");
  }
  Descriptor theirs;
  std::memcpy(&theirs, in, kDescriptorBytes);
  if (!same_call(mine, theirs)) return mismatched_calls(peer, theirs, mine);
  if (got != kDescriptorBytes + bytes) {
    return invalid_argument("size mismatch: rank ", peer, " sent ", got - kDescriptorBytes,
                            " bytes of data where this rank expected ", bytes);
  }
  // This rank's contribution is the left operand, as in recursive doubling.
  reduce_to(call.recv, call.send, in + kDescriptorBytes, call.count, call.type, call.op);
  if (call.op == ReduceOp::kAvg) divide_by(call.recv, call.count, call.type, 2);
  return ex.wait(s);
}

// Options::segment_size 0: MYELIN_COLL_SEGMENT (bytes; K/M suffixes) when set, else the built-in
// default. Read once.
size_t default_segment_bytes() {
  static const size_t bytes = [] {
    size_t v = internal::kDefaultSegmentBytes;
    if (const char* env = std::getenv("MYELIN_COLL_SEGMENT"); env != nullptr && *env != '\0') {
      char* end = nullptr;
      const unsigned long long parsed = std::strtoull(env, &end, 10);
      size_t scale = 1;
      if (end != nullptr && (*end == 'K' || *end == 'k')) {
        scale = 1024;
        ++end;
      } else if (end != nullptr && (*end == 'M' || *end == 'm')) {
        scale = 1024 * 1024;
        ++end;
      }
      if (parsed == 0 || end == nullptr || *end != '\0' || parsed > (1ull << 30) / scale) {
        MYELIN_LOG_WARN << "MYELIN_COLL_SEGMENT='" << env << "' is not a size in bytes (1..1G); "
                        << "using " << v;
      } else {
        v = static_cast<size_t>(parsed) * scale;
      }
    }
    return v;
  }();
  return bytes;
}

Status check_enum_ranges(DataType type, ReduceOp op) {
  if (static_cast<uint8_t>(type) > static_cast<uint8_t>(DataType::kU8)) {
    return invalid_argument("unknown data type value ", static_cast<int>(type));
  }
  if (static_cast<uint8_t>(op) > static_cast<uint8_t>(ReduceOp::kAvg)) {
    return invalid_argument("unknown reduction value ", static_cast<int>(op));
  }
  return ok_status();
}

// Validates, picks the algorithm, runs `body` with the descriptor exchange around it, and turns a
// failure into a communicator-wide one.
Result<Algorithm> run(Communicator& comm, const Call& call, const Options& options,
                      const std::function<Status(Exchange&, Algorithm)>& body) {
  const std::string_view name = collective_name(call.collective);
  if (!comm.usable()) {
    return failed_precondition(name, " on rank ", comm.rank(),
                               ": the communicator is unusable after an earlier failure and must "
                               "be rebuilt (",
                               comm.status().to_string(), ")");
  }
  MYELIN_RETURN_IF_ERROR(check_enum_ranges(call.type, call.op));
  if (!supports(call.collective, options.algorithm)) {
    return invalid_argument(name, " has no algorithm '", algorithm_name(options.algorithm), "'");
  }
  if (options.timeout.count() < 0) {
    return invalid_argument(name, ": negative timeout ", options.timeout.count(), " ms");
  }
  const size_t es = dtype_size(call.type);
  if (call.count > (size_t{1} << 40) / es) {
    return invalid_argument(name, ": count ", call.count, " is too large");
  }
  Algorithm algo = options.algorithm;
  if (algo == Algorithm::kAuto) {
    algo = select_algorithm(call.collective, call.select_bytes, comm.size(), comm.node_count());
  }
  const auto timeout = options.timeout.count() > 0 ? options.timeout : comm.timeout();
  CallInfo info;
  info.collective = call.collective;
  info.algorithm = algo;
  info.type = call.type;
  info.op = call.op;
  info.segment_bytes = options.segment_size > 0 ? options.segment_size : default_segment_bytes();

  Descriptor mine;
  mine.collective = static_cast<uint8_t>(call.collective);
  mine.algorithm = static_cast<uint8_t>(algo);
  mine.type = static_cast<uint8_t>(call.type);
  mine.op = static_cast<uint8_t>(call.op);
  mine.sequence = comm.next_sequence();
  mine.count = call.count;
  mine.root = call.root;
  Descriptor theirs{};
  theirs.magic = 0;

  const int n = comm.size();
  const bool fused = n == 2 && call.collective == Collective::kAllreduce &&
                     algo == Algorithm::kRecursiveDoubling &&
                     call.select_bytes <= internal::kFusedPairMaxBytes;
  Status status;
  {
    Exchange ex(comm, options.tag, Deadline::after(timeout), info);
    size_t desc_recv = 0;
    bool desc_posted = false;
    const int prev = (comm.rank() + n - 1) % n;
    // With two ranks the peer may be on the fast path (if its call differs from this one), and
    // its descriptor then comes with data: receive into room for both.
    uint8_t* desc_in = n == 2 ? comm.scratch(internal::kScratchDescriptor, kDescriptorCapacity)
                              : reinterpret_cast<uint8_t*>(&theirs);
    if (fused) {
      status = fused_pair_allreduce(ex, mine, call);
    } else if (n > 1) {
      auto r =
          n == 2 ? ex.post_recv_upto(prev, internal::kDescriptorPhase, desc_in, kDescriptorCapacity)
                 : ex.post_recv(prev, internal::kDescriptorPhase, desc_in, sizeof(theirs));
      if (r.ok()) {
        desc_recv = *r;
        desc_posted = true;
        status =
            ex.post_send((comm.rank() + 1) % n, internal::kDescriptorPhase, &mine, sizeof(mine))
                .status();
      } else {
        status = std::move(r).status();
      }
    }
    if (status.ok() && !fused) status = body(ex, algo);
    if (desc_posted) {
      if (status.ok()) {
        status = ex.wait(desc_recv);
      } else {
        // The data exchange failed; if the previous rank's descriptor tells why (a different
        // call), report that instead of the symptom. It was sent first, so unless that rank is
        // dead it is here or about to be: give it a moment (bounded by the call's deadline).
        const Deadline grace = Deadline::after(std::chrono::milliseconds(200)).min(ex.deadline());
        while (!ex.done(desc_recv) && !grace.expired()) comm.context().progress();
      }
      const bool have_theirs = ex.done(desc_recv) && ex.status_of(desc_recv).ok() &&
                               ex.received(desc_recv) >= kDescriptorBytes;
      if (have_theirs && desc_in != reinterpret_cast<uint8_t*>(&theirs)) {
        std::memcpy(&theirs, desc_in, kDescriptorBytes);
      }
      if (have_theirs && !same_call(mine, theirs)) status = mismatched_calls(prev, theirs, mine);
      if (status.ok() && have_theirs && ex.received(desc_recv) != kDescriptorBytes) {
        status = invalid_argument("rank ", prev, " sent a ", ex.received(desc_recv),
                                  "-byte call descriptor where ", kDescriptorBytes,
                                  " bytes were expected");
      }
      if (status.ok()) status = ex.wait_all();
    }
    if (!status.ok()) {
      status = std::move(status).with_context(
          ::myelin::internal::str_cat(name, " (", algorithm_name(algo), ", ", call.count, " x ",
                                      dtype_name(call.type), ") on rank ", comm.rank(), " of ", n));
      MYELIN_LOG_WARN << status.to_string();
      // Disconnecting drops what the transport has not sent yet. Let the sends already posted (the
      // call descriptor above all, which tells the next rank why this call failed) go out first,
      // briefly: a dead peer must not hold the failure up.
      ex.settle_sends(Deadline::after(std::chrono::milliseconds(200)).min(ex.deadline()));
      comm.fail(status);
    }
  }  // the Exchange waits for stragglers here, after fail() cancelled them
  if (!status.ok()) return status;
  MYELIN_LOG_DEBUG << name << " of " << call.count << " x " << dtype_name(call.type) << " on " << n
                   << " ranks: " << algorithm_name(algo);
  return algo;
}

Status need_buffers(const void* send, const void* recv, size_t count, std::string_view name) {
  if (count > 0 && (send == nullptr || recv == nullptr)) {
    return invalid_argument(name, ": null buffer with count ", count);
  }
  return ok_status();
}

}  // namespace

Result<Algorithm> allreduce(Communicator& comm, const void* send, void* recv, size_t count,
                            DataType type, ReduceOp op, const Options& options) {
  MYELIN_RETURN_IF_ERROR(need_buffers(send, recv, count, "allreduce"));
  const Call call{Collective::kAllreduce, type, op, count, count * dtype_size(type), 0, send, recv};
  return run(comm, call, options, [&](Exchange& ex, Algorithm algo) -> Status {
    const size_t bytes = count * ex.elem();
    // The ring reads the send buffer where it needs it; the others work in recv from the start.
    if (algo != Algorithm::kRing && send != recv && bytes > 0) std::memcpy(recv, send, bytes);
    const Group g = world(comm);
    Status s;
    switch (algo) {
      case Algorithm::kRing:
        s = ring_allreduce(ex, g, send, recv, count, internal::kTopPhase);
        break;
      case Algorithm::kHalvingDoubling:
        s = halving_doubling_allreduce(ex, g, recv, count, internal::kTopPhase);
        break;
      case Algorithm::kRecursiveDoubling:
        s = recursive_doubling_allreduce(ex, g, recv, count, internal::kTopPhase);
        break;
      case Algorithm::kHierarchical:
        s = hierarchical_allreduce(ex, recv, count);
        break;
      default:
        return internal_error("allreduce dispatch of ", algorithm_name(algo));
    }
    MYELIN_RETURN_IF_ERROR(s);
    if (op == ReduceOp::kAvg) divide_by(recv, count, type, static_cast<uint32_t>(comm.size()));
    return ok_status();
  });
}

Result<Algorithm> reduce_scatter(Communicator& comm, const void* send, void* recv,
                                 size_t recv_count, DataType type, ReduceOp op,
                                 const Options& options) {
  MYELIN_RETURN_IF_ERROR(need_buffers(send, recv, recv_count, "reduce_scatter"));
  const size_t n = static_cast<size_t>(comm.size());
  const Call call{Collective::kReduceScatter,        type, op, recv_count,
                  recv_count * n * dtype_size(type), 0};
  return run(comm, call, options, [&](Exchange& ex, Algorithm) -> Status {
    const size_t es = ex.elem();
    const size_t block = recv_count * es;
    // The ring reads the send buffer and reduces into a work buffer: send stays untouched.
    uint8_t* work = comm.scratch(internal::kScratchWork, block * n);
    MYELIN_RETURN_IF_ERROR(
        ring_reduce_scatter(ex, world(comm), send, work, recv_count, internal::kTopPhase));
    uint8_t* mine = work + block * static_cast<size_t>(comm.rank());
    if (op == ReduceOp::kAvg) divide_by(mine, recv_count, type, static_cast<uint32_t>(n));
    if (block > 0) std::memmove(recv, mine, block);
    return ok_status();
  });
}

Result<Algorithm> allgather(Communicator& comm, const void* send, void* recv, size_t send_count,
                            DataType type, const Options& options) {
  MYELIN_RETURN_IF_ERROR(need_buffers(send, recv, send_count, "allgather"));
  const Call call{Collective::kAllgather,        type, ReduceOp::kSum, send_count,
                  send_count * dtype_size(type), 0};
  return run(comm, call, options, [&](Exchange& ex, Algorithm) -> Status {
    const size_t block = send_count * ex.elem();
    uint8_t* mine = static_cast<uint8_t*>(recv) + block * static_cast<size_t>(comm.rank());
    if (mine != send && block > 0) std::memcpy(mine, send, block);
    return ring_allgather(ex, world(comm), recv, send_count, internal::kTopPhase);
  });
}

Result<Algorithm> broadcast(Communicator& comm, const void* send, void* recv, size_t count,
                            DataType type, const Options& options) {
  if (options.root < 0 || options.root >= comm.size()) {
    return invalid_argument("broadcast: root ", options.root, " outside [0, ", comm.size(), ")");
  }
  const bool root = comm.rank() == options.root;
  MYELIN_RETURN_IF_ERROR(need_buffers(root ? send : recv, recv, count, "broadcast"));
  const Call call{Collective::kBroadcast,   type,        ReduceOp::kSum, count,
                  count * dtype_size(type), options.root};
  return run(comm, call, options, [&](Exchange& ex, Algorithm algo) -> Status {
    const size_t bytes = count * ex.elem();
    if (root && send != recv && bytes > 0) std::memcpy(recv, send, bytes);
    const Group g = world(comm);
    if (algo == Algorithm::kChain) {
      return chain_broadcast(ex, g, recv, count, options.root, internal::kTopPhase);
    }
    return binomial_broadcast(ex, g, recv, count, options.root, internal::kTopPhase);
  });
}

Result<Algorithm> reduce(Communicator& comm, const void* send, void* recv, size_t count,
                         DataType type, ReduceOp op, const Options& options) {
  if (options.root < 0 || options.root >= comm.size()) {
    return invalid_argument("reduce: root ", options.root, " outside [0, ", comm.size(), ")");
  }
  const bool root = comm.rank() == options.root;
  MYELIN_RETURN_IF_ERROR(need_buffers(send, root ? recv : send, count, "reduce"));
  const Call call{Collective::kReduce, type, op, count, count * dtype_size(type), options.root};
  return run(comm, call, options, [&](Exchange& ex, Algorithm) -> Status {
    const size_t bytes = count * ex.elem();
    // The accumulator: the root's recv buffer, else a copy (the send buffer stays untouched).
    void* acc = root ? recv : comm.scratch(internal::kScratchWork, bytes);
    if (acc != send && bytes > 0) std::memcpy(acc, send, bytes);
    uint8_t* tmp = comm.scratch(internal::kScratchAlgo0, bytes);
    MYELIN_RETURN_IF_ERROR(
        binomial_reduce(ex, world(comm), acc, tmp, count, options.root, internal::kTopPhase));
    if (root && op == ReduceOp::kAvg) {
      divide_by(recv, count, type, static_cast<uint32_t>(comm.size()));
    }
    return ok_status();
  });
}

Result<Algorithm> barrier(Communicator& comm, const Options& options) {
  const Call call{Collective::kBarrier, DataType::kU8, ReduceOp::kSum, 0, 0, 0};
  return run(comm, call, options, [&](Exchange& ex, Algorithm) -> Status {
    return dissemination_barrier(ex, world(comm), internal::kTopPhase);
  });
}

Result<Algorithm> alltoall(Communicator& comm, const void* send, void* recv, size_t count,
                           DataType type, const Options& options) {
  MYELIN_RETURN_IF_ERROR(need_buffers(send, recv, count, "alltoall"));
  const size_t n = static_cast<size_t>(comm.size());
  const Call call{Collective::kAlltoall,        type, ReduceOp::kSum, count,
                  count * n * dtype_size(type), 0};
  return run(comm, call, options, [&](Exchange& ex, Algorithm) -> Status {
    const void* src = send;
    if (send == recv && count > 0) {  // in place: send from a copy
      uint8_t* copy = comm.scratch(internal::kScratchWork, count * n * ex.elem());
      std::memcpy(copy, send, count * n * ex.elem());
      src = copy;
    }
    return pairwise_alltoall(ex, world(comm), src, recv, count, internal::kTopPhase);
  });
}

}  // namespace myelin::collectives
