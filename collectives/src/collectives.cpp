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

struct Call {
  Collective collective;
  DataType type = DataType::kU8;
  ReduceOp op = ReduceOp::kSum;
  size_t count = 0;         // as the caller passed it
  size_t select_bytes = 0;  // what the selection table sees
  int root = 0;
};

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
  Status status;
  {
    Exchange ex(comm, options.tag, Deadline::after(timeout), info);
    size_t desc_recv = 0;
    bool desc_posted = false;
    const int prev = (comm.rank() + n - 1) % n;
    if (n > 1) {
      auto r = ex.post_recv(prev, internal::kDescriptorPhase, &theirs, sizeof(theirs));
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
    if (status.ok()) status = body(ex, algo);
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
      const bool have_theirs = ex.done(desc_recv) && ex.status_of(desc_recv).ok();
      if (have_theirs && !same_call(mine, theirs)) {
        status =
            invalid_argument("mismatched collective calls: rank ", prev, " called ",
                             describe_call(theirs), ", this rank called ", describe_call(mine));
      }
      if (status.ok()) status = ex.wait_all();
    }
    if (!status.ok()) {
      status = std::move(status).with_context(
          ::myelin::internal::str_cat(name, " (", algorithm_name(algo), ", ", call.count, " x ",
                                      dtype_name(call.type), ") on rank ", comm.rank(), " of ", n));
      MYELIN_LOG_WARN << status.to_string();
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
  const Call call{Collective::kAllreduce, type, op, count, count * dtype_size(type), 0};
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
