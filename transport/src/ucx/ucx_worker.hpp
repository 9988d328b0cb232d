// transport/src/ucx/ucx_worker.hpp — UCP context and worker shared by the UCX backend, its
// endpoints and its registrations (not public API).
//
// UcxWorker owns the ucp_context_h (through UcpContext, which registrations also hold so that a
// MemoryRegion outliving its Context never unmaps into a destroyed UCP context) and the
// ucp_worker_h. It receives every active message, finds the sender's Inbox by the sender id in the
// message header and matches messages against posted recvs there, in sequence order per channel.
//
// Wire formats (little-endian, all checked on arrival):
//   worker address  "MYUX" u32 | version u16 | 0 u16 | context id u64 | pid u32 | process start
//                   time u64 | cma probe address u64 | node id length u16 | node id | length u32 |
//                   ucp address
//   AM header       sender id u64 | sequence u32 | channel or immediate u32         (16 bytes)
//   packed message  AM header | payload, as the AM's data with no AM header (payload at most
//                   kPackedLimit bytes)
//   cma header      AM header | sender address u64 | length u64 | cookie u64 | guard address u64
//                                                                                 (48 bytes)
//   cma ack         sender id u64 | cookie u64 | errno u32 (0: consumed) | 0 u32  (24 bytes)
// The AM id says what the message is (kAmMessageId: a two-sided message on a channel;
// kAmPackedId: the same for a small message whose AM header leads its data, one piece for UCX;
// kAmImmediateId: the immediate of a put_with_immediate; kAmCmaId: a message the receiver reads
// from the sender's memory itself; kAmCmaHelloId: "I can read your memory" (value 1) or not (0);
// kAmCmaAckId: a cma message was consumed (or could not be read); kAmCmaWithdrawId, in the ack's
// layout: the sender disconnected before the cma message with this cookie was consumed, so its
// buffer may be gone). The wire version travels once, in the
// address: peers of another version are refused at connect(). Sequence numbers count per
// (sender, channel) (immediates: per sender) and wrap at 2^32; the receiver extends them to 64
// bits relative to the next one it expects (extend_sequence), which is exact while fewer than
// 2^31 messages of one channel are in flight.
//
// Thread safety: none; everything here runs on the owning Context's progress thread.
// Ownership: the backend and every endpoint hold a shared_ptr, so the worker is destroyed after
// the last endpoint closed its ucp_ep_h.
#pragma once

#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <myelin/core/status.hpp>
#include <myelin/transport/options.hpp>
#include <myelin/transport/request.hpp>

#include "backend.hpp"

namespace myelin::transport::internal::ucx {

inline constexpr uint32_t kAddressMagic = 0x5855594d;  // "MYUX"
// Version 5: small messages travel packed (kAmPackedId); version 4: the cma header carries a
// guard address; version 3: the cma probe address and the cma messages (version 2: 16-byte AM
// header, the message kind in the AM id; version 1: 24 bytes, kind and version in the header).
inline constexpr uint16_t kAddressVersion = 5;
inline constexpr size_t kAddressFixedSize = 4 + 2 + 2 + 8 + 4 + 8 + 8 + 2 + 4;
inline constexpr unsigned kAmMessageId = 7;
inline constexpr unsigned kAmImmediateId = 8;
inline constexpr unsigned kAmCmaId = 9;
inline constexpr unsigned kAmCmaHelloId = 10;
inline constexpr unsigned kAmCmaAckId = 11;
inline constexpr unsigned kAmCmaWithdrawId = 12;
inline constexpr unsigned kAmPackedId = 13;
// Sends of at most this many bytes that UCX can finish at once go packed: the AM header and the
// payload copied into one buffer on the stack, sent as the AM's data with no AM header. UCX then
// moves one piece instead of two (over posix, about 50 instructions less per message at each end;
// the copy of at most this many bytes costs less).
inline constexpr size_t kPackedLimit = 256;
inline constexpr size_t kDefaultEagerLimit = 8192;
// Same-node messages of at least this many bytes go by the cma path (see UcxWorker) unless
// MYELIN_UCX_CMA says otherwise ("off", or a byte count).
inline constexpr size_t kDefaultCmaThreshold = 16384;
// The cma path reads at most this many bytes per process_vm_readv, with progress in between.
inline constexpr size_t kCmaPiece = size_t{1} << 20;

struct AmHeader {
  uint64_t sender_id;
  uint32_t sequence;  // low 32 bits of the per-(sender, channel) sequence number
  uint32_t value;     // channel for kAmMessageId, the immediate for kAmImmediateId
};
static_assert(sizeof(AmHeader) == 16, "AM header layout is part of the wire format");

struct CmaHeader {
  AmHeader am;       // as a kAmMessageId message: sender, sequence, channel
  uint64_t address;  // of the payload in the sender's address space
  uint64_t length;
  uint64_t cookie;  // names the send in the sender's ack table; never 0
  // Of a 64-bit word in the sender's memory that holds `cookie` for as long as the payload may be
  // read, and anything else once the sender gave the send up (see UcxWorker's cma path).
  uint64_t guard;
};
static_assert(sizeof(CmaHeader) == 48, "cma header layout is part of the wire format");

struct CmaAck {
  uint64_t sender_id;  // of the receiver, which sends the ack
  uint64_t cookie;
  uint32_t error;  // 0: the message was consumed; else the errno of the failed read
  uint32_t reserved;
};
static_assert(sizeof(CmaAck) == 24, "cma ack layout is part of the wire format");

// The 64-bit sequence number a 32-bit wire sequence stands for, given the next one expected: the
// one within [next - 2^31, next + 2^31). kStaleSequence when that one would be negative (a
// duplicate from before the first message); any other result below `next` is a duplicate too.
inline constexpr uint64_t kStaleSequence = ~uint64_t{0};
inline uint64_t extend_sequence(uint32_t wire, uint64_t next) noexcept {
  const auto ahead = static_cast<int32_t>(wire - static_cast<uint32_t>(next));
  if (ahead < 0 && static_cast<uint64_t>(-static_cast<int64_t>(ahead)) > next) {
    return kStaleSequence;
  }
  return next + static_cast<uint64_t>(static_cast<int64_t>(ahead));
}

// CLOCK_MONOTONIC_COARSE (one tick of the kernel's timer, a few ms; about 5 ns to read against
// 30-50 ns for CLOCK_MONOTONIC under KVM): for periodic checks polled from the progress loop.
inline int64_t coarse_monotonic_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Copies n bytes (the buffers must not overlap). Up to 16 bytes, the sizes of a latency-bound
// message, with one or two overlapping loads and stores inline instead of a call into the C
// library; larger with memcpy.
inline void copy_bytes(void* dst, const void* src, size_t n) noexcept {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
  if (n > 16) {
    std::memcpy(d, s, n);
  } else if (n >= 8) {
    uint64_t head, tail;
    std::memcpy(&head, s, 8);
    std::memcpy(&tail, s + n - 8, 8);
    std::memcpy(d, &head, 8);
    std::memcpy(d + n - 8, &tail, 8);
  } else if (n >= 4) {
    uint32_t head, tail;
    std::memcpy(&head, s, 4);
    std::memcpy(&tail, s + n - 4, 4);
    std::memcpy(d, &head, 4);
    std::memcpy(d + n - 4, &tail, 4);
  } else if (n != 0) {
    d[0] = s[0];
    d[n / 2] = s[n / 2];
    d[n - 1] = s[n - 1];
  }
}

// Maps a UCX status to a myelin Status ("<what>: <ucx message>").
Status ucs_to_status(ucs_status_t status, std::string_view what);

// The peer's part of a Context address, parsed.
struct PeerAddress {
  uint64_t context_id = 0;
  uint32_t pid = 0;
  uint64_t start_time = 0;  // of the process, in clock ticks since boot (/proc/<pid>/stat)
  uint64_t cma_probe = 0;   // where the peer's context id lies in its memory (0: no cma path)
  std::string node_id;
  std::vector<uint8_t> worker_address;
};
Result<PeerAddress> parse_peer_address(std::span<const uint8_t> bytes);

// RAII owner of a ucp_context_h.
class UcpContext {
 public:
  explicit UcpContext(ucp_context_h h) : handle_(h) {}
  UcpContext(const UcpContext&) = delete;
  UcpContext& operator=(const UcpContext&) = delete;
  ~UcpContext() { ucp_cleanup(handle_); }
  [[nodiscard]] ucp_context_h get() const noexcept { return handle_; }

 private:
  ucp_context_h handle_;
};

// A recv posted before its message arrived.
struct PostedRecv {
  RequestStateRef state;
  void* data = nullptr;
  size_t capacity = 0;
  uint64_t peer_id = 0;  // whose inbox it was posted to
};

// A message that arrived before its recv: owned bytes, a persistent UCX data descriptor, a
// rendezvous descriptor whose payload still sits at the sender, or a cma message (the payload's
// address in the sender's memory).
struct ArrivedMessage {
  enum class Kind : uint8_t { kOwned, kUcxData, kRendezvous, kCma } kind = Kind::kOwned;
  std::vector<uint8_t> bytes;
  void* desc = nullptr;  // kUcxData: the data pointer; kRendezvous: the data descriptor
  size_t length = 0;
  uint64_t remote_address = 0;  // kCma
  uint64_t cookie = 0;          // kCma
  uint64_t guard_address = 0;   // kCma
  uint32_t channel = 0;         // kCma
};

// A cma message being read into its recv buffer, a piece per progress().
struct CmaRead {
  PostedRecv recv;
  uint64_t remote_address = 0;
  size_t length = 0;
  size_t done = 0;
  uint64_t cookie = 0;
  uint64_t guard_address = 0;
  uint32_t channel = 0;
};

// The recvs posted on one channel, in order: a ring over one vector that doubles when full and
// never shrinks. A ping-pong posts and completes one recv at a time, so after the first message
// this touches the same slot's cache lines every time and never allocates (a std::deque frees
// and allocates a node every few messages and keeps its elements behind a map of nodes).
class RecvQueue {
 public:
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  [[nodiscard]] size_t size() const noexcept { return size_; }
  PostedRecv& front() noexcept { return slots_[head_]; }
  // Drops the first recv. Only its state reference is released (already empty where the caller
  // moved it out); the slot's other fields are plain values nothing reads until a push_back()
  // overwrites them.
  [[gnu::always_inline]] void pop_front() noexcept {
    slots_[head_].state.reset();
    head_ = (head_ + 1) & mask_;
    --size_;
  }
  [[gnu::always_inline]] void push_back(PostedRecv&& recv) {
    if (size_ == slots_.size()) grow();
    slots_[(head_ + size_) & mask_] = std::move(recv);
    ++size_;
  }
  // Queues a recv ahead of the others (the worker's fast recv going back to its stream).
  void push_front(PostedRecv&& recv) {
    if (size_ == slots_.size()) grow();
    head_ = (head_ + mask_) & mask_;  // head_ - 1, modulo the power-of-two size
    slots_[head_] = std::move(recv);
    ++size_;
  }
  // Calls f on every queued recv, oldest first.
  template <typename F>
  void for_each(F&& f) {
    for (size_t i = 0; i < size_; ++i) f(slots_[(head_ + i) & mask_]);
  }

 private:
  void grow() {
    std::vector<PostedRecv> bigger(slots_.empty() ? 4 : slots_.size() * 2);  // a power of two
    for (size_t i = 0; i < size_; ++i) bigger[i] = std::move(slots_[(head_ + i) & mask_]);
    slots_.swap(bigger);
    mask_ = slots_.size() - 1;
    head_ = 0;
  }

  std::vector<PostedRecv> slots_;
  size_t mask_ = 0;  // slots_.size() - 1 once there are slots
  size_t head_ = 0;
  size_t size_ = 0;
};

struct ChannelStream {
  uint64_t next_sequence = 0;
  RecvQueue posted;                          // in order, waiting for messages
  std::deque<ArrivedMessage> ready;          // in order, waiting for recvs
  std::map<uint64_t, ArrivedMessage> early;  // arrived ahead of a gap, keyed by sequence
};

// Everything received from one peer Context (identified by its context id), kept from the first
// message on, whether or not connect() to that peer has happened yet.
struct Inbox {
  // The stream of a channel, created on first use. A one-entry cache sits in front of the map
  // (unordered_map nodes never move, so the pointer stays valid until the inbox goes).
  ChannelStream& stream(uint32_t channel) {
    if (cached_stream_ == nullptr || cached_channel_ != channel) {
      cached_stream_ = &channels[channel];
      cached_channel_ = channel;
    }
    return *cached_stream_;
  }

  uint64_t peer_id = 0;
  bool claimed = false;
  std::string peer_name;                          // set when claimed
  std::shared_ptr<const std::string> peer_label;  // the same, for RequestState::describe()
  Status failure;  // once the peer failed: posted and later unmatched recvs fail with it
  // The cma path (set by the endpoint when it claims the inbox, and by the peer's hello):
  uint32_t peer_pid = 0;
  uint64_t peer_start_time = 0;  // of peer_pid, from its address (0: unknown)
  bool can_read_peer = false;   // this process read the peer's probe: its cma messages are readable
  bool peer_reads_us = false;   // the peer's hello: large sends to it may go by cma
  ucp_ep_h reply_ep = nullptr;  // the endpoint's UCP endpoint, for acks (null once closed)
  std::function<void(uint64_t cookie, uint32_t error)> on_cma_ack;  // the endpoint's ack table
  // Cookies of cma messages the sender withdrew while they were still queued or being read here;
  // each leaves when its read or its recv comes to it (or with the inbox), so the list never
  // holds more than the messages outstanding. A withdraw of a message already read is not kept.
  std::vector<uint64_t> withdrawn;
  std::unordered_map<uint32_t, ChannelStream> channels;
  uint64_t next_immediate_sequence = 0;
  std::map<uint64_t, uint32_t> early_immediates;
  std::deque<uint32_t> immediates;

 private:
  ChannelStream* cached_stream_ = nullptr;
  uint32_t cached_channel_ = 0;
};

// The recv that an arriving packed message can complete without its stream's queue (see
// UcxWorker::post_recv): the first recv of a stream that had nothing queued, posted or early.
// It is logically the front of `stream`'s posted queue, which stays empty while it is here; any
// other way into that stream puts it back there first (UcxWorker::unslot_fast()).
struct FastRecv {
  ChannelStream* stream = nullptr;  // null: no recv here
  uint64_t sender_id = 0;           // the first 8 header bytes the message must carry
  uint64_t key = 0;                 // the next 8: the expected sequence's low 32 bits, channel
  void* data = nullptr;
  size_t limit = 0;  // min(capacity, kPackedLimit): a larger payload takes the general path
  size_t capacity = 0;
  uint64_t peer_id = 0;
  // The recv's state. Kept after the fast path completed it (dropping it there would be a call
  // on the way from the message to the caller) until the next recv takes the slot.
  RequestStateRef state;
};

// The header's second 8 bytes (sequence, channel) as one word, in the wire's byte order.
inline uint64_t header_key(uint32_t sequence, uint32_t channel) noexcept {
  const AmHeader h{0, sequence, channel};
  uint64_t key;
  std::memcpy(&key, reinterpret_cast<const uint8_t*>(&h) + 8, sizeof key);
  return key;
}

class UcxWorker : public std::enable_shared_from_this<UcxWorker> {
 public:
  static Result<std::shared_ptr<UcxWorker>> create(const Options& options, const ContextInfo& info);
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;
  ~UcxWorker();

  [[nodiscard]] ucp_worker_h worker() const noexcept { return worker_; }
  [[nodiscard]] const std::shared_ptr<UcpContext>& context() const noexcept { return context_; }
  [[nodiscard]] uint64_t id() const noexcept { return id_; }
  [[nodiscard]] const std::vector<uint8_t>& address() const noexcept { return address_; }
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  [[nodiscard]] const ContextInfo& info() const noexcept { return info_; }
  [[nodiscard]] Limits limits() const noexcept { return limits_; }
  [[nodiscard]] int event_fd() const noexcept { return event_fd_; }

  // The inbox of a peer, created when nothing arrived from it yet; already_exists when an
  // endpoint already claimed it.
  Result<Inbox*> claim_inbox(uint64_t peer_id, const std::string& peer_name);
  // Forgets a peer's inbox: releases held UCX descriptors and cancels posted recvs.
  void drop_inbox(uint64_t peer_id);

  // Matches a recv against what arrived on the channel, or posts it. Inline for the usual case of
  // a recv posted before its message (nothing ready, the peer not failed): a pending request
  // from the pool, queued on the channel.
  // A recv that finds its stream empty (nothing queued, ready or early) takes the fast slot
  // (fast_), whose recv goes back to the front of its own stream first when it holds one.
  [[gnu::always_inline]] Request post_recv(Inbox& inbox, uint32_t channel, void* data,
                                           size_t capacity) {
    if (fast_.stream != nullptr) unslot_fast();
    ChannelStream& stream = inbox.stream(channel);
    if (!stream.ready.empty() || !inbox.failure.ok()) {
      return take_ready(inbox, stream, channel, data, capacity);
    }
    auto [request, state] = request_pool_.make_pending();
    state->describe("recv", channel, inbox.peer_label);
    if (stream.posted.empty() && stream.early.empty()) {
      fast_.stream = &stream;
      fast_.sender_id = inbox.peer_id;
      fast_.key = header_key(static_cast<uint32_t>(stream.next_sequence), channel);
      fast_.data = data;
      fast_.limit = capacity < kPackedLimit ? capacity : kPackedLimit;
      fast_.capacity = capacity;
      fast_.peer_id = inbox.peer_id;
      fast_.state = std::move(state);  // drops the previous recv's, long completed
    } else {
      stream.posted.push_back(PostedRecv{std::move(state), data, capacity, inbox.peer_id});
    }
    return std::move(request);
  }
  // Fails every posted recv of the inbox with `failure` and remembers it.
  void fail_inbox(Inbox& inbox, const Status& failure);

  // Keeps an object alive until the worker is destroyed (an endpoint whose close did not finish
  // within its deadline leaves its error-handler argument here). Must not own the worker.
  void keep_until_destroyed(std::shared_ptr<void> object) {
    graveyard_.push_back(std::move(object));
  }

  // The cma path for large same-node messages: the sender sends a kAmCmaId header (its buffer's
  // address, length, a cookie, the address of its guard word); the receiver, once a recv matches
  // it, reads the payload with process_vm_readv straight into the recv buffer (kCmaPiece bytes
  // per progress()) and acks; the sender's request completes on the ack. After every piece the
  // receiver reads the guard word (a second process_vm_readv, so after the piece): unless it
  // still holds the cookie, the sender has given the send up (its endpoint failed or closed,
  // after which its buffer may be reused) or the pid is no longer the sender's process, and the
  // recv fails instead of completing with what may be a mix of old and new bytes. A sender
  // clears the guard before its send completes in any way but the ack, so it never waits on a
  // receiver that may never answer. Used towards a peer only after its hello said it
  // could read this process (it read our context id at the probe address in our address). A read
  // that finds the peer's process gone fails the recv with peer_failed.
  [[nodiscard]] size_t cma_threshold() const noexcept { return cma_threshold_; }
  // Probes the peer's memory (once, at connect) and sends it our hello; sets inbox.can_read_peer.
  void start_cma(Inbox& inbox, const PeerAddress& peer, ucp_ep_h ep);
  // A cookie for a cma send: unique within this worker, never 0, and from a random start, so a
  // guard word read from anywhere but the live send's guard (memory reused after the send, a
  // process that reused the sender's pid) holds it only by a 2^-64 accident.
  uint64_t next_cma_cookie() noexcept {
    if (++last_cma_cookie_ == 0) ++last_cma_cookie_;
    return last_cma_cookie_;
  }
  // Sends a small active message (header only) on `ep`; the header is copied when UCX cannot
  // send it at once. Not from inside a UCX callback.
  static ucs_status_t send_small_am(ucp_ep_h ep, unsigned id, const void* header, size_t length);

  // Same-node liveness: UCX 1.13's keepalive does not reliably notice a killed shared-memory
  // peer, so the worker itself checks, once per keepalive interval, that each watched peer
  // process still exists; when it is gone, on_dead runs (from progress(), not a UCX callback).
  // The watch ends when `owner` expires.
  void watch_process(uint32_t pid, uint64_t start_time, std::weak_ptr<void> owner,
                     std::function<void()> on_dead);
  [[nodiscard]] bool same_node(const PeerAddress& peer) const {
    return peer.node_id == info_.node_id;
  }

  // The free list of request states (recvs, and sends/puts/gets UCX did not finish at once): see
  // RequestStatePool.
  [[nodiscard]] RequestStatePool& request_pool() noexcept { return request_pool_; }

  // Runs `action` from progress() once the coarse clock passes `deadline_ns` (read on the
  // process watch's cadence). For rare events: a failed endpoint's last requests.
  void at(int64_t deadline_ns, std::function<void()> action) {
    timers_.emplace_back(deadline_ns, std::move(action));
  }

  // Runs `action` after the current ucp_worker_progress() returns (never inside a UCX callback).
  void defer(std::function<void()> action) {
    deferred_.push_back(std::move(action));
    own_work_pending_ = true;
  }

  // ucp_worker_progress plus the worker's own work (deferred actions, a cma read's next piece,
  // and once per polls_per_clock_read_ calls the process watch and timers); returns the number
  // of events handled. Inline: the Context's busy loop calls it back to back, and the usual pass
  // is one ucp_worker_progress, a count down and one flag (the rest is out of line): an idle
  // poll decides when a message that has arrived is seen, and one that handles a message is on
  // its way to the caller.
  size_t progress() {
    const size_t events = ucp_worker_progress(worker_);
    if (--polls_to_clock_read_ != 0 && !own_work_pending_) [[likely]] {
      return events;
    }
    return events + progress_own_work();
  }
  // Arms the wakeup fd; false when events are already pending.
  bool arm();

 private:
  UcxWorker(Options options, ContextInfo info)
      : options_(std::move(options)), info_(std::move(info)) {}
  Status init();

  static ucs_status_t on_message(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param);
  // A packed message: the fast recv's when the header matches it, in a callback that calls
  // nothing and saves no registers; any other goes to on_packed_general().
  static ucs_status_t on_packed(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t on_packed_general(UcxWorker* self, size_t header_length, void* data,
                                        size_t length, const ucp_am_recv_param_t* param);
  // on_packed()'s delivery to the fast recv of a payload above 16 bytes.
  [[gnu::noinline]] ucs_status_t complete_fast(const void* data, size_t payload_length);
  // Puts the fast recv back at the front of its stream's queue (before anything else touches
  // that stream); no-op when the slot holds none.
  void unslot_fast();
  // The common case of an arriving eager message, inline in the callbacks: the next one in order
  // on its channel, a posted recv waiting for it, and room for it there. Copies it into the recv
  // buffer and completes the recv; false (nothing changed) when any of that does not hold.
  [[gnu::always_inline]] bool deliver_to_posted(Inbox& inbox, const AmHeader& h, const void* data,
                                                size_t length) {
    ChannelStream& stream = inbox.stream(h.value);
    if (stream.posted.empty() || h.sequence != static_cast<uint32_t>(stream.next_sequence)) {
      return false;
    }
    PostedRecv& recv = stream.posted.front();
    if (length > recv.capacity) return false;
    ++stream.next_sequence;
    copy_bytes(recv.data, data, length);
    recv.state->complete(Status(), length);
    // Drops the backend's reference: the state returns to the pool when the caller's handle goes.
    stream.posted.pop_front();
    if (!stream.early.empty()) drain_early(stream);  // in_callback_ is set by the caller
    return true;
  }
  static ucs_status_t on_immediate(void* arg, const void* header, size_t header_length, void* data,
                                   size_t length, const ucp_am_recv_param_t* param);
  ucs_status_t handle_message(Inbox& inbox, const AmHeader& header, void* data, size_t length,
                              uint64_t recv_attr);
  void handle_immediate(Inbox& inbox, const AmHeader& header);
  static ucs_status_t on_cma(void* arg, const void* header, size_t header_length, void* data,
                             size_t length, const ucp_am_recv_param_t* param);
  template <unsigned Id>
  static ucs_status_t on_cma_control(void* arg, const void* header, size_t header_length,
                                     void* data, size_t length, const ucp_am_recv_param_t* param);
  // Places an arrived message (any kind but a fresh rendezvous/ucx-data one) in its stream.
  void accept_in_sequence(Inbox& inbox, const AmHeader& h, ArrivedMessage m);
  void start_cma_read(ArrivedMessage& message, PostedRecv recv, uint32_t channel);
  // Whether the cma message `cookie` of this inbox is still queued here or being read.
  [[nodiscard]] bool cma_outstanding(const Inbox& inbox, uint64_t cookie) const;
  // Drops `cookie` from the inbox's withdrawn list (its message was consumed without a read).
  static void forget_withdrawn(Inbox& inbox, uint64_t cookie);
  // Reads the next piece of the first cma read; completes and acks it when done or failed.
  size_t advance_cma_read();
  void finish_cma_read(Status status, uint32_t error);  // of the first read
  // Acks a cma message to its sender (deferred when inside a callback).
  void send_cma_ack(uint64_t peer_id, uint64_t cookie, uint32_t error);
  size_t run_deferred();
  // The inbox of a peer, created on first use; a one-entry cache sits in front of the map.
  Inbox& inbox_for(uint64_t peer_id) {
    if (last_inbox_ != nullptr && last_inbox_->peer_id == peer_id) return *last_inbox_;
    return find_inbox(peer_id);
  }
  Inbox& find_inbox(uint64_t peer_id);
  // post_recv() when a message is ready on the channel (it takes the first) or the peer failed.
  Request take_ready(Inbox& inbox, ChannelStream& stream, uint32_t channel, void* data,
                     size_t capacity);

  // Delivers an in-order message to a posted recv or queues it.
  void deliver_in_order(ChannelStream& stream, ArrivedMessage message);
  void drain_early(ChannelStream& stream);
  // Moves an arrived message into a recv buffer (may start a rendezvous receive); completes it.
  void consume(ArrivedMessage& message, PostedRecv recv, uint32_t channel, const Inbox& inbox);
  void start_rendezvous(void* desc, size_t length, PostedRecv recv);
  static void on_rendezvous_done(void* request, ucs_status_t status, size_t length,
                                 void* user_data);
  void release(ArrivedMessage& message);

  Options options_;
  ContextInfo info_;
  std::shared_ptr<UcpContext> context_;
  ucp_worker_h worker_ = nullptr;
  uint64_t id_ = 0;
  std::vector<uint8_t> address_;
  Limits limits_;
  int event_fd_ = -1;
  RequestStatePool request_pool_;
  FastRecv fast_;  // after the pool: its state goes first
  std::unordered_map<uint64_t, std::unique_ptr<Inbox>> inboxes_;
  Inbox* last_inbox_ = nullptr;  // one-entry cache in front of inboxes_
  std::vector<std::function<void()>> deferred_;
  std::vector<std::shared_ptr<void>> graveyard_;
  struct ProcessWatch {
    uint32_t pid;
    uint64_t start_time;
    std::weak_ptr<void> owner;
    std::function<void()> on_dead;
  };
  std::vector<ProcessWatch> watches_;
  size_t cma_threshold_ = kDefaultCmaThreshold;
  uint64_t last_cma_cookie_ = 0;
  std::deque<CmaRead> cma_reads_;
  int64_t check_interval_ns_ = 0;
  int64_t next_check_ns_ = 0;
  // The watch reads the (coarse) clock once per this many progress() calls: 64 when polling
  // (busy, yield, or auto, which resolves to one of them for a UCX Context), which calls it
  // every few tens of ns (even a vDSO read showed in a ping-pong's profile); 1 when blocking,
  // which calls it once per wakeup.
  uint32_t polls_per_clock_read_ = 1;
  uint32_t polls_to_clock_read_ = 1;
  // Set when an action is deferred or a cma read queued; cleared by progress_own_work() once
  // both queues are empty (so it may be set while they are empty, never clear while they hold
  // work).
  bool own_work_pending_ = false;
  // The out-of-line part of progress(): the clock-driven checks when the count is down, then
  // the deferred actions and a cma read's next piece.
  size_t progress_own_work();
  void check_processes();
  void run_timers(int64_t now);
  std::vector<std::pair<int64_t, std::function<void()>>> timers_;
  bool in_callback_ = false;
};

}  // namespace myelin::transport::internal::ucx
