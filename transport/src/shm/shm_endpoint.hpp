// transport/src/shm/shm_endpoint.hpp — an Endpoint to a process on the same node.
//
// Two RecordRings, one per direction, each in its own memfd ShmSegment (versioned header, both
// pids joined), carry eager messages, rendezvous descriptors and immediates. A SOCK_SEQPACKET Unix
// socket beside them carries file descriptors (the rings, doorbells, the key table, shared
// allocations) and tells us at once when the peer's process is gone (EOF). Large messages and
// put/get move with a single memcpy between shared allocations (or process_vm_readv/writev when
// ptrace rules allow it); otherwise large messages are streamed through the ring after a
// clear-to-send.
//
// States: pending (we asked the peer to dial us back; operations queue), established, failed
// (status() holds the error; every operation completes with it).
//
// Thread safety: none; the Context's progress thread only (like every Endpoint).
// Ownership: owned by the Context (claimed) or by the ShmBackend (accepted, not yet claimed); it
// points to its ShmBackend, which outlives it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <myelin/core/record_ring.hpp>
#include <myelin/core/shm_segment.hpp>
#include <myelin/transport/endpoint.hpp>
#include <myelin/transport/request.hpp>

#include "shm/shm_wire.hpp"

namespace myelin::transport::internal::shm {

class ShmBackend;
struct SharedAlloc;

// A ring segment received from a peer, validated (segment header, then ring header).
struct AttachedRing {
  ShmSegment segment;
  RecordRing ring;
};
// Maps the memfd `fd` and attaches the record ring inside; refuses foreign or corrupt headers and
// capacities outside [RecordRing::kMinCapacity, max_capacity].
Result<AttachedRing> attach_ring_fd(int fd, size_t max_capacity);

class ShmEndpoint final : public Endpoint {
 public:
  ShmEndpoint(ShmBackend* backend, std::vector<uint8_t> peer_bytes, ShmAddress peer,
              std::string peer_name);
  ~ShmEndpoint() override;

  // ---- Endpoint ----
  [[nodiscard]] Backend backend() const noexcept override { return Backend::kShm; }
  [[nodiscard]] const std::string& peer_name() const noexcept override { return *peer_name_; }
  [[nodiscard]] Status status() const override { return status_; }
  Request send(uint32_t channel, const void* data, size_t size,
               const MemoryRegion* region) override;
  Request recv(uint32_t channel, void* data, size_t capacity, const MemoryRegion* region) override;
  Request put(const void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
              const MemoryRegion* local_region) override;
  Request put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                             uint64_t remote_offset, uint32_t immediate,
                             const MemoryRegion* local_region) override;
  Request get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
              const MemoryRegion* local_region) override;
  [[nodiscard]] bool try_pop_immediate(uint32_t& value) override;

  // ---- for ShmBackend ----
  // Dialer: makes the rings and doorbells and sends kHello over `sock` (just connected, or the
  // socket a kDialMe arrived on). The endpoint is established when this returns OK.
  Status establish_as_dialer(UniqueFd sock, Deadline deadline);
  // Acceptor: adopts the rings and doorbells of a kHello that arrived on `sock` (the socket our
  // kDialMe went out on, or one the peer dialed on its own).
  Status establish_from_hello(UniqueFd sock, CtlMessage& hello, bool via_dial_socket);
  // We sent kDialMe over `sock`; wait there (or on an accepted socket) for the peer's kHello.
  // Call send_info() next: our allocations and key table travel with the dial-me, so the peer
  // can put/get as soon as it answers, even before our progress() sees its kHello.
  void set_dial_socket(UniqueFd sock);
  // The peer's kDialMe crossed our own dial: its info and allocations arrive on `sock`; read
  // them there until the peer closes it.
  void adopt_info_socket(UniqueFd sock);
  // Sends every shared allocation and then kInfo (key table, CMA probe, may-sleep).
  Status send_info();

  // Drains the inbound ring and flushes queued output; no syscalls. Returns events handled.
  size_t progress();
  // Reads the control socket, checks the peer's process (every few ms), retries deferred
  // one-sided operations. `now` is monotonic_ns().
  void service(int64_t now);
  // Announces sleeping on the inbound ring; false when work is pending (then don't sleep).
  bool arm();
  void disarm() noexcept;

  void announce_alloc(const SharedAlloc& alloc);
  void announce_free(uint64_t id);
  void set_peer_name(std::string name) {
    peer_name_ = std::make_shared<const std::string>(std::move(name));
  }
  [[nodiscard]] bool established() const noexcept { return established_; }
  [[nodiscard]] bool failed() const noexcept { return !status_.ok(); }
  [[nodiscard]] const std::vector<uint8_t>& peer_bytes() const noexcept { return peer_bytes_; }

 private:
  struct Posted {
    std::byte* data;
    size_t capacity;
    RequestStateRef req;
  };
  struct Unexpected {
    bool is_rts;
    RtsRecord rts;                 // when is_rts
    std::vector<std::byte> bytes;  // eager payload otherwise
  };
  struct Channel {
    std::deque<Posted> posted;
    std::deque<Unexpected> unexpected;
  };
  // One queued ring record (or a whole streamed message, chunk by chunk).
  struct OutItem {
    uint32_t type = 0;
    uint32_t header_len = 0;
    alignas(8) std::byte header[sizeof(RtsRecord)] = {};
    const std::byte* data = nullptr;
    size_t size = 0;
    size_t report_bytes = 0;  // the byte count req completes with
    RequestStateRef req;      // completed once written (eager, immediate)
    bool stream = false;      // kData chunks of rendezvous `token`
    uint64_t token = 0;
    size_t streamed = 0;
  };
  struct RndvSend {
    const std::byte* data;
    size_t size;
    RequestStateRef req;
  };
  struct RndvRecv {
    std::byte* data;
    size_t size;
    size_t received;
    RequestStateRef req;
    // Split copy (kSplit sent, the sender was writing the head when we were done with the tail):
    // waits for the sender's kSplitDone; the grant is revoked then.
    bool split = false;
    uint32_t grant_slot = 0;
    uint64_t grant = 0;
    size_t head = 0;      // bytes lent to the sender, from the start
    uint64_t remote = 0;  // the message in the sender (CMA address)
    Status own;           // how our own part went
  };
  struct PeerAlloc {
    std::byte* base;
    size_t size;
  };
  enum class OneSided : uint8_t { kPut, kPutImm, kGet };
  struct Deferred {
    OneSided op;
    std::byte* local;
    size_t size;
    RemoteKey key;
    uint64_t offset;
    uint32_t immediate;
    RequestStateRef req;
  };

  void handle_record(uint32_t type, std::span<const std::byte> payload);
  void deliver_eager(Posted& p, std::span<const std::byte> bytes);
  void start_rendezvous(Posted& p, const RtsRecord& rts);
  bool flush();
  void notify_peer() noexcept;
  template <typename T>
  void queue_control(uint32_t type, const T& record);
  // Writes one record now when nothing is queued and the ring has room.
  bool write_now(uint32_t type, const void* header, uint32_t header_len, const std::byte* data,
                 size_t size);
  void enqueue(uint32_t type, const void* header, uint32_t header_len, const std::byte* data,
               size_t size, size_t report_bytes, RequestStateRef req);
  Request one_sided(OneSided op, std::byte* local, size_t size, const RemoteKey& key,
                    uint64_t offset, uint32_t immediate);
  // OK once done; unavailable when the peer's tables have not arrived yet (try again later).
  Status do_one_sided(OneSided op, std::byte* local, size_t size, const RemoteKey& key,
                      uint64_t offset);
  const PeerAlloc* peer_alloc(uint64_t id);
  bool cma_read(void* local, uint64_t remote, size_t size) const;
  // Receiver: lends the head of `p`'s buffer to the sender and reads the rest itself. False when
  // no grant slot is free (then read it all as usual).
  bool start_split(Posted& p, const RtsRecord& rts);
  // Receiver: reads the head of a split message itself (after a steal or a hand-back).
  void read_head(RndvRecv& rr);
  // Receiver: sends kFin for `token` and completes the receive with rr.own.
  void finish_split(uint64_t token, RndvRecv& rr);
  // Sender: writes the head of rendezvous send `token` into the receiver's grant (kSplit).
  void serve_split(const SplitRecord& sr);
  // Receiver: takes a split receive's grant back, waiting (bounded) for a writer still inside it.
  void revoke_grant(RndvRecv& rr) noexcept;
  Status handle_ctl(CtlMessage& msg);
  void read_socket();
  void drain_inbound();
  void fail(Status status);
  [[nodiscard]] int ctl_fd() const noexcept {
    return established_ ? sock_.get() : dial_sock_.get();
  }

  ShmBackend* backend_;
  std::vector<uint8_t> peer_bytes_;
  ShmAddress peer_;
  std::shared_ptr<const std::string> peer_name_;
  Status status_;
  bool established_ = false;
  bool info_received_ = false;
  bool armed_ = false;
  bool peer_may_sleep_ = true;      // until its kInfo says otherwise
  bool can_cma_read_peer_ = false;  // our probe of the peer's memory worked
  bool peer_can_cma_read_us_ = false;
  bool peer_split_ = false;  // the peer handles kSplit records (kInfoSplit)
  int64_t next_liveness_ns_ = 0;

  UniqueFd sock_;       // control socket of the connection
  UniqueFd dial_sock_;  // the kDialMe socket while pending
  UniqueFd aux_sock_;   // the peer's crossed kDialMe socket (info and allocations only)
  UniqueFd doorbell_in_, doorbell_out_;
  std::optional<AttachedRing> in_;   // peer -> us
  std::optional<AttachedRing> out_;  // us -> peer
  std::optional<ShmSegment> peer_keys_segment_;
  const KeySlot* peer_keys_ = nullptr;
  std::unordered_map<uint64_t, PeerAlloc> peer_allocs_;

  uint32_t send_seq_ = 0;
  uint32_t recv_seq_ = 0;
  uint64_t next_token_ = 1;
  uint32_t last_channel_ = 0;
  Channel* last_channel_state_ = nullptr;
  std::unordered_map<uint32_t, Channel> channels_;
  std::deque<OutItem> outq_;
  std::unordered_map<uint64_t, RndvSend> rndv_sends_;
  std::unordered_map<uint64_t, RndvRecv> rndv_recvs_;
  // Split receives completed before the sender's kSplitDone (head stolen or seen written): the
  // kSplitDone still to come is dropped.
  std::unordered_set<uint64_t> split_leftovers_;
  std::deque<uint32_t> immediates_;
  // States of completed eager receives, reused by later posted receives (see RequestStatePool).
  RequestStatePool request_pool_;
  std::deque<Deferred> deferred_;
  Status ring_error_;     // set by the record handler, acted on after consume()
  Status socket_status_;  // set by read_socket() and announcements, acted on in service()

  Channel& channel(uint32_t id) {
    if (last_channel_state_ != nullptr && last_channel_ == id) return *last_channel_state_;
    last_channel_ = id;
    last_channel_state_ = &channels_[id];  // unordered_map references stay valid on insert
    return *last_channel_state_;
  }
};

}  // namespace myelin::transport::internal::shm
