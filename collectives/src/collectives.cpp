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
// Room for what a peer may send on the descriptor phase: a descriptor, an abort notice (two), or
// in a small recursive doubling a descriptor and the data.
constexpr size_t kDescriptorCapacity = kDescriptorBytes + internal::kFusedMaxBytes;
static_assert(kDescriptorCapacity >= 2 * kDescriptorBytes, "room for an abort notice");
// Descriptor::reserved of an abort notice: a rank that found a mismatch in a small recursive
// doubling sends, to each partner still waiting for its message, its own descriptor so marked,
// followed by the descriptor it disagreed with (reserved = the rank that sent that one).
constexpr uint32_t kAbortNotice = 0xAB0D0001u;

size_t round_up64(size_t v) noexcept {
  return (v + 63) / 64 * 64;
}

// Non-OK when a peer's descriptor-phase message (a descriptor, the head of a data message, or an
// abort notice) shows that it made a different call than `mine`; OK when the calls agree or the
// message is too short to tell (the caller checks sizes).
Status call_mismatch(int peer, const uint8_t* msg, size_t got, const Descriptor& mine) {
  if (got < kDescriptorBytes) return ok_status();
  Descriptor theirs;
  std::memcpy(&theirs, msg, kDescriptorBytes);
  if (!same_call(mine, theirs)) return mismatched_calls(peer, theirs, mine);
  if (theirs.reserved == kAbortNotice && got >= 2 * kDescriptorBytes) {
    Descriptor odd;
    std::memcpy(&odd, msg + kDescriptorBytes, kDescriptorBytes);
    return invalid_argument("mismatched collective calls: rank ", odd.reserved, " called ",
                            describe_call(odd), ", rank ", peer, " and this rank called ",
                            describe_call(mine), " (rank ", peer, " stopped the call)");
  }
  return ok_status();
}

// Small allreduce by recursive doubling on any number of ranks, with the call descriptor carried
// at the head of every data message: no separate descriptor message, so each rank sends log2(p)
// messages (one more for the ranks folded in or out when n is not a power of two) instead of one
// more per call. Every received message is checked against this rank's call before its data is
// used, and every rank receives at least one message, so every rank checks the call. The data
// is reduced straight from the receive buffers into the next outgoing message (this rank's
// contribution the left operand, as in recursive_doubling_allreduce.cpp, so every rank ends with
// the same bits), and the last step straight into recv: the input is copied once, into the first
// message. All messages travel on the descriptor phase, which the ordinary path's descriptor
// receive also listens on, so a rank whose call differs (and that took the ordinary path) is
// reported as a mismatch by whoever hears from it. All ranks take this path exactly when their
// calls agree on the fields that decide it (collective, algorithm, count, type; and the rank
// count), which the descriptor carries.
Status fused_recursive_doubling(Exchange& ex, const Descriptor& mine, const Call& call) {
  Communicator& comm = ex.comm();
  const int n = comm.size();
  const int me = comm.rank();
  const size_t bytes = call.count * ex.elem();
  const size_t msg_bytes = kDescriptorBytes + bytes;
  const internal::Fold f = internal::fold(me, n);
  int steps = 0;
  while ((1 << steps) < f.pof2) ++steps;

  // Receive buffers: [0] the folded rank's message (or, for a rank sitting out, the result),
  // [1 + k] step k's. Send buffers: [k] step k's message, [steps] the result for a folded rank.
  const size_t in_stride = round_up64(kDescriptorCapacity);
  const size_t out_stride = round_up64(msg_bytes);
  const auto slots = static_cast<size_t>(steps + 1);
  uint8_t* base =
      comm.scratch(internal::kScratchDescriptor, slots * in_stride + slots * out_stride);
  const auto in = [&](int i) { return base + static_cast<size_t>(i) * in_stride; };
  const auto out = [&](int k) {
    return base + slots * in_stride + static_cast<size_t>(k) * out_stride;
  };
  const auto head = [&](uint8_t* msg) { std::memcpy(msg, &mine, kDescriptorBytes); };

  // Partners, in the order this rank sends to them; the first `sent` have had their message.
  std::vector<int>& will_send = comm.pending_pool().peers;
  will_send.clear();
  size_t sent = 0;
  const auto step_partner = [&](int k) { return internal::unfold(f.new_rank ^ (1 << k), f.rem); };
  if (f.new_rank < 0) {
    will_send.push_back(f.partner);
  } else {
    for (int k = 0; k < steps; ++k) will_send.push_back(step_partner(k));
    if (f.partner >= 0) will_send.push_back(f.partner);
  }

  // On a mismatch, tell every partner this rank has not sent to yet (each waits for exactly one
  // message from it) which call it disagreed with, so that they report it too instead of a
  // disconnected peer.
  const auto give_up = [&](int peer, const uint8_t* msg, Status why) -> Status {
    // The call that differs: the peer's own, or the one an abort notice from it quotes.
    Descriptor odd;
    std::memcpy(&odd, msg, kDescriptorBytes);
    if (same_call(mine, odd)) {
      std::memcpy(&odd, msg + kDescriptorBytes, kDescriptorBytes);
    } else {
      odd.reserved = static_cast<uint32_t>(peer);
    }
    Descriptor marked = mine;
    marked.reserved = kAbortNotice;
    uint8_t* notice = comm.scratch(internal::kScratchWork, 2 * kDescriptorBytes);
    std::memcpy(notice, &marked, kDescriptorBytes);
    std::memcpy(notice + kDescriptorBytes, &odd, kDescriptorBytes);
    for (size_t i = sent; i < will_send.size(); ++i) {
      (void)ex.post_send(will_send[i], internal::kDescriptorPhase, notice, 2 * kDescriptorBytes);
    }
    sent = will_send.size();
    return why;
  };
  const auto send = [&](int peer, const uint8_t* msg) -> Status {
    ++sent;
    return ex.post_send(peer, internal::kDescriptorPhase, msg, msg_bytes).status();
  };
  // Waits for receive `h` from `peer` and checks it; the data follows the descriptor.
  const auto receive = [&](size_t h, int peer, const uint8_t* msg) -> Status {
    MYELIN_RETURN_IF_ERROR(ex.wait(h));
    const size_t got = ex.received(h);
    if (got < kDescriptorBytes) {
      return invalid_argument("rank ", peer, " sent ", got, " bytes where a ", kDescriptorBytes,
                              "-byte call descriptor was expected");
    }
    if (Status s = call_mismatch(peer, msg, got, mine); !s.ok()) {
      return give_up(peer, msg, std::move(s));
    }
    if (got != msg_bytes) {
      return invalid_argument("size mismatch: rank ", peer, " sent ", got - kDescriptorBytes,
                              " bytes of data where this rank expected ", bytes);
    }
    return ok_status();
  };
  const auto post_in = [&](int peer, int slot) {
    return ex.post_recv_upto(peer, internal::kDescriptorPhase, in(slot), kDescriptorCapacity);
  };
  const auto type = call.type;
  const auto op = call.op;

  if (f.new_rank < 0) {  // folded out: hand the input to the partner, get the result back
    MYELIN_ASSIGN_OR_RETURN(size_t r, post_in(f.partner, 0));
    head(out(0));
    if (bytes > 0) std::memcpy(out(0) + kDescriptorBytes, call.send, bytes);
    MYELIN_RETURN_IF_ERROR(send(f.partner, out(0)));
    MYELIN_RETURN_IF_ERROR(receive(r, f.partner, in(0)));
    if (bytes > 0) std::memcpy(call.recv, in(0) + kDescriptorBytes, bytes);
  } else {
    size_t fold_in = 0;
    if (f.partner >= 0) {
      MYELIN_ASSIGN_OR_RETURN(fold_in, post_in(f.partner, 0));
    }
    std::vector<size_t>& step_in = comm.pending_pool().handles;
    step_in.clear();
    for (int k = 0; k < steps; ++k) {
      MYELIN_ASSIGN_OR_RETURN(size_t h, post_in(step_partner(k), 1 + k));
      step_in.push_back(h);
    }
    // cur: this rank's running result, kept in the data part of the next message to send.
    const uint8_t* cur = static_cast<const uint8_t*>(call.send);
    if (f.partner >= 0) {
      MYELIN_RETURN_IF_ERROR(receive(fold_in, f.partner, in(0)));
      uint8_t* dst = steps > 0 ? out(0) + kDescriptorBytes : static_cast<uint8_t*>(call.recv);
      if (bytes > 0) reduce_to(dst, cur, in(0) + kDescriptorBytes, call.count, type, op);
      cur = dst;
    } else if (steps > 0 && bytes > 0) {
      std::memcpy(out(0) + kDescriptorBytes, cur, bytes);
      cur = out(0) + kDescriptorBytes;
    }
    for (int k = 0; k < steps; ++k) {
      const int partner = step_partner(k);
      head(out(k));
      MYELIN_RETURN_IF_ERROR(send(partner, out(k)));
      MYELIN_RETURN_IF_ERROR(receive(step_in[static_cast<size_t>(k)], partner, in(1 + k)));
      const bool last = k + 1 == steps;
      uint8_t* dst = last ? static_cast<uint8_t*>(call.recv) : out(k + 1) + kDescriptorBytes;
      if (bytes > 0) reduce_to(dst, cur, in(1 + k) + kDescriptorBytes, call.count, type, op);
      cur = dst;
    }
    if (f.partner >= 0) {  // hand the result to the rank folded out
      head(out(steps));
      if (bytes > 0) std::memcpy(out(steps) + kDescriptorBytes, call.recv, bytes);
      MYELIN_RETURN_IF_ERROR(send(f.partner, out(steps)));
    }
  }
  if (call.op == ReduceOp::kAvg && bytes > 0) {
    divide_by(call.recv, call.count, call.type, static_cast<uint32_t>(n));
  }
  return ex.wait_all();
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
  info.bytes = call.select_bytes;

  Descriptor mine;
  mine.collective = static_cast<uint8_t>(call.collective);
  mine.algorithm = static_cast<uint8_t>(algo);
  mine.type = static_cast<uint8_t>(call.type);
  mine.op = static_cast<uint8_t>(call.op);
  mine.sequence = comm.next_sequence();
  mine.count = call.count;
  mine.root = call.root;

  const int n = comm.size();
  const bool fused = n >= 2 && call.collective == Collective::kAllreduce &&
                     algo == Algorithm::kRecursiveDoubling &&
                     call.select_bytes <= internal::kFusedMaxBytes;
  Status status;
  {
    Exchange ex(comm, options.tag, Deadline::after(timeout), info);
    size_t desc_recv = 0;
    bool desc_posted = false;
    const int prev = (comm.rank() + n - 1) % n;
    // The previous rank may be in a small recursive doubling (if its call differs from this
    // one), and its descriptor then comes with data: receive into room for both.
    uint8_t* desc_in = nullptr;
    if (fused) {
      status = fused_recursive_doubling(ex, mine, call);
    } else if (n > 1) {
      desc_in = comm.scratch(internal::kScratchDescriptor, kDescriptorCapacity);
      auto r = ex.post_recv_upto(prev, internal::kDescriptorPhase, desc_in, kDescriptorCapacity);
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
        ex.settle(desc_recv, grace);
      }
      const bool have_theirs = ex.done(desc_recv) && ex.status_of(desc_recv).ok() &&
                               ex.received(desc_recv) >= kDescriptorBytes;
      if (have_theirs) {
        if (Status m = call_mismatch(prev, desc_in, ex.received(desc_recv), mine); !m.ok()) {
          status = std::move(m);
        }
      }
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
    if (algo != Algorithm::kRing && send != recv && bytes > 0) copy_bytes(recv, send, bytes);
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
    if (mine != send && block > 0) copy_bytes(mine, send, block);
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
    if (root && send != recv && bytes > 0) copy_bytes(recv, send, bytes);
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
    if (acc != send && bytes > 0) copy_bytes(acc, send, bytes);
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
      copy_bytes(copy, send, count * n * ex.elem());
      src = copy;
    }
    return pairwise_alltoall(ex, world(comm), src, recv, count, internal::kTopPhase);
  });
}

}  // namespace myelin::collectives
