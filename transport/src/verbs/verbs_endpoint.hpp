// transport/src/verbs/verbs_endpoint.hpp — one RC connection and its data path.
//
// Eager messages (header + payload <= slot size) are RDMA WRITE WITH IMMEDIATE into the peer's
// receive ring: slot = message sequence mod ring slots, immediate = sequence. The receiver keeps
// one zero-length receive WR posted per ring slot, copies a slot out (into the matching recv, or
// into an unexpected-message queue) and returns credit by RDMA-writing its consumed count into
// the sender's credit word. The sender never has more messages in flight than the ring has slots,
// so no RNR and no overwrite; a full ring is back-pressure (operations queue, nothing fails).
// Why not SEND/RECV with an SRQ: a shared receive queue needs receive buffers sized for the
// largest eager message on every WR and one consumed buffer per message regardless of size, and
// credits are needed anyway to avoid RNR; the ring gives the same flow control with one
// registration, lets the NIC place data straight into a known slot and keeps memory per peer
// bounded and predictable.
// Large messages: the sender registers (or uses the caller's region) and sends an RTS naming
// address, rkey and size; the receiver RDMA READs straight into the recv buffer and answers FIN.
// put/get are RDMA WRITE/READ on the caller's buffers; put_with_immediate is the WRITE followed
// by a kImmediate ring message (RC ordering puts the data in place first).
// Send queue: work requests are posted in lists of up to kPostBatch; only WRs whose completion
// matters and the last one of each list are signalled, so the send queue always drains.
// Inline: ring messages that fit the granted max_inline_data are posted with IBV_SEND_INLINE.
// Errors: any non-success completion fails the endpoint (peer_failed naming peer, operation and
// ibv_wc_status_str), moves the QP to ERR and completes everything pending with that error.
//
// Thread safety: none. Ownership: the Context owns the endpoint; the endpoint shares the backend's
// Shared state (device, CQ, pool), so the order the Context destroys them in does not matter.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/endpoint.hpp>
#include <myelin/transport/memory.hpp>
#include <myelin/transport/request.hpp>

#include "verbs/verbs_device.hpp"
#include "verbs/verbs_handles.hpp"
#include "verbs/verbs_pool.hpp"
#include "verbs/verbs_wire.hpp"

namespace myelin::transport::internal::verbs {

class VerbsEndpoint;

// The verbs part of a MemoryRegion: one ibv_mr in the backend's PD.
class VerbsRegistration final : public BackendRegistration {
 public:
  VerbsRegistration(std::shared_ptr<Device> device, MrPtr mr)
      : device_(std::move(device)), mr_(std::move(mr)) {}
  [[nodiscard]] Backend backend() const noexcept override { return Backend::kVerbs; }
  [[nodiscard]] std::vector<uint8_t> remote_key_blob() const override {
    return make_key_blob(mr_->rkey);
  }
  [[nodiscard]] ibv_mr* mr() const noexcept { return mr_.get(); }
  [[nodiscard]] const Device* device() const noexcept { return device_.get(); }

 private:
  std::shared_ptr<Device> device_;  // keeps the PD alive; declared first, released last
  MrPtr mr_;
};

// Tuning constants and how they relate.
inline constexpr uint32_t kDefaultSlots = 32;
inline constexpr uint32_t kDefaultSlotSize = 8192;
inline constexpr uint32_t kSendQueueDepth = 256;
inline constexpr uint32_t kPostBatch = 32;
inline constexpr int kPollBatch = 32;
inline constexpr uint32_t kMaxInlineWanted = 256;
inline constexpr uint64_t kRecvWrId = ~uint64_t{0};
inline constexpr int64_t kKeepaliveNs = 500'000'000;
static_assert(kPostBatch < kSendQueueDepth / 2, "a post list must fit the reserved queue space");
static_assert(kDefaultSlotSize > sizeof(RingHeader), "a slot holds at least the header");

// State shared by the backend and its endpoints.
struct Shared {
  std::shared_ptr<Device> device;
  EventChannelPtr cm_channel;  // rdmacm mode; outlives every cm id (endpoints hold Shared)
  CompChannelPtr channel;      // before cq: the CQ is destroyed first
  CqPtr cq;
  int cq_capacity = 0;
  int cq_needed = 0;
  std::shared_ptr<BlockPool> pool;
  CmMode mode = CmMode::kExchange;
  uint64_t token = 0;
  std::vector<uint8_t> address_bytes;
  VerbsAddress address;
  uint32_t slots = kDefaultSlots;
  uint32_t slot_size = kDefaultSlotSize;
  uint32_t sq_depth = kSendQueueDepth;
  uint32_t max_inline = 0;  // granted by the device on the last QP created
  size_t max_message = 0;
  std::string self_name;
  std::unordered_map<uint32_t, VerbsEndpoint*> by_qpn;
  std::unordered_map<uint64_t, VerbsEndpoint*> by_token;
  Status device_status;  // set on a device-fatal async event

  // Grows the CQ so it covers every endpoint's outstanding work (`delta` entries more/less).
  Status reserve_cq(int delta);
};

// How an RDMA operation reports when all its pieces are done.
struct OpGroup {
  enum class Kind : uint8_t { kUser, kRendezvousRead };
  Kind kind = Kind::kUser;
  RequestStateRef request;
  size_t bytes = 0;
  uint32_t pending = 0;
  Status status;
  MrPtr transient;  // registration made for this operation only
  uint32_t rdv_id = 0;
};

class VerbsEndpoint final : public Endpoint {
 public:
  VerbsEndpoint(std::shared_ptr<Shared> shared, uint64_t peer_token, VerbsAddress peer,
                std::string peer_name, Deadline connect_deadline);
  ~VerbsEndpoint() override;

  // Creates the RC QP (exchange mode) and posts the ring's receives; in rdmacm mode `cm_id`
  // owns the QP made by rdma_create_qp().
  Status init_exchange();
  Status init_rdma_cm(CmIdPtr id);
  // This side's connection description (QPN, PSN, ring location).
  [[nodiscard]] ConnectInfo local_info() const;
  // Exchange mode: moves the QP to RTR/RTS for the peer's info (idempotent).
  Status apply_remote(const ConnectInfo& info);
  // rdmacm mode: the QP was moved by rdma_cm; record the peer's ring.
  Status set_remote_ring(const ConnectInfo& info);
  void set_peer_ready();
  void set_name(std::string name) {
    peer_name_ = std::move(name);
    peer_label_ = std::make_shared<const std::string>(peer_name_);
  }
  // Swaps in another cm id (the incoming connection won a simultaneous connect).
  CmIdPtr take_cm_id() { return std::move(cm_id_); }
  // rdmacm mode, before the QP exists: the id being resolved.
  void set_connecting_id(CmIdPtr id) { cm_id_ = std::move(id); }
  // rdmacm mode: forgets a losing outgoing attempt (and its QP); the incoming one will follow.
  void drop_cm_id();

  // Called by the backend's progress loop.
  void on_completion(const ibv_wc& wc);
  size_t flush();  // posts queued work, returns credit, sends keepalives, checks the deadline
  void fail(Status status);

  [[nodiscard]] bool has_remote() const noexcept { return have_remote_; }
  // Exchange mode: `info` describes the QP we connected ours to (QPN and PSN), not another
  // incarnation of the peer's endpoint.
  [[nodiscard]] bool same_remote(const ConnectInfo& info) const noexcept {
    return have_remote_ && info.qpn == remote_qpn_ && info.psn == remote_psn_;
  }
  [[nodiscard]] bool peer_ready() const noexcept { return peer_ready_; }
  [[nodiscard]] bool established() const noexcept { return have_remote_ && peer_ready_; }
  [[nodiscard]] bool failed() const noexcept { return !status_.ok(); }
  [[nodiscard]] bool has_postable_work() const noexcept;
  // Monotonic time at which progress() must run for this endpoint even if no completion or
  // event arrives (connect deadline and handshake retransmission while connecting, keepalive
  // while waiting on the peer); kNoTimer when only a completion or event can change anything.
  // A blocking wait sleeps no longer than this (see VerbsBackend::arm_wait).
  static constexpr int64_t kNoTimer = INT64_MAX;
  [[nodiscard]] int64_t next_timer_ns() const noexcept;
  [[nodiscard]] ibv_qp* qp() const noexcept;
  [[nodiscard]] rdma_cm_id* cm_id() const noexcept { return cm_id_.get(); }
  [[nodiscard]] uint64_t peer_token() const noexcept { return peer_token_; }
  [[nodiscard]] const VerbsAddress& peer_address() const noexcept { return peer_; }
  [[nodiscard]] ibv_ah* ud_ah() const noexcept { return ud_ah_.get(); }
  void set_ud_ah(AhPtr ah) { ud_ah_ = std::move(ah); }
  // Exchange-mode handshake retransmission bookkeeping (owned by the backend).
  int64_t next_handshake_ns = 0;

  // Endpoint API.
  [[nodiscard]] Backend backend() const noexcept override { return Backend::kVerbs; }
  [[nodiscard]] const std::string& peer_name() const noexcept override { return peer_name_; }
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

 private:
  enum class OpKind : uint8_t { kRing, kWrite, kRead, kCredit };
  struct Outgoing {
    OpKind kind = OpKind::kRing;
    RingHeader header;
    std::vector<uint8_t> payload;    // eager payload copied while queued
    RequestStateRef on_posted;       // eager send: completes when posted
    std::shared_ptr<OpGroup> group;  // write/read: completes when all pieces are done
    uint64_t local_addr = 0;
    uint32_t lkey = 0;
    uint32_t length = 0;
    uint64_t remote_addr = 0;
    uint32_t rkey = 0;
    bool inline_data = false;
    const char* what = "";
  };
  struct Inflight {
    uint64_t wr_seq;
    const char* what;
    bool credit_source;  // used the credit-out word (non-inline credit write)
    std::shared_ptr<OpGroup> group;
    uint64_t ring_seq_plus1;  // 0 when not a ring message
  };
  struct PostedRecv {
    void* data;
    size_t capacity;
    RequestStateRef request;
    std::shared_ptr<RegionState> region;  // the caller's registration, if any
  };
  struct Arrived {
    RingHeader header;
    std::vector<uint8_t> payload;
  };
  struct ChannelQueues {
    std::deque<PostedRecv> recvs;
    std::deque<Arrived> arrived;
  };
  struct RendezvousSend {
    RequestStateRef request;
    size_t size;
    MrPtr transient;
  };

  Request enqueue_rdma(OpKind kind, const void* local, size_t size, const RemoteKey& remote,
                       uint64_t remote_offset, const MemoryRegion* local_region, bool for_put);
  // lkey for [p, p+n): the caller's region when it covers it, else a transient registration.
  Result<uint32_t> local_key(const void* p, size_t n, const RegionState* region, int access,
                             MrPtr& transient) const;
  void handle_ring_message();
  static void deliver(const RingHeader& h, const uint8_t* payload, PostedRecv& r);
  void enqueue_ring(const RingHeader& h);
  void fill_ring_wr(Outgoing& o, ibv_send_wr& wr, ibv_sge& sge);
  void start_rendezvous_read(const RingHeader& h, PostedRecv& r);
  void finish_group(OpGroup& g);
  void retire_through(uint64_t wr_seq, const Status& error);
  bool post_outgoing(size_t& posted);
  bool post_credit(bool probe);
  Status post_recvs(uint32_t n);
  [[nodiscard]] uint64_t peer_consumed() const noexcept;
  [[nodiscard]] uint32_t send_eager_limit() const noexcept;
  std::string op_context(const char* what) const;
  // Something of ours depends on the peer answering: the keepalive must probe the connection.
  [[nodiscard]] bool waiting_on_peer() const noexcept;

  std::shared_ptr<Shared> shared_;
  uint64_t peer_token_;
  VerbsAddress peer_;
  std::string peer_name_;
  std::shared_ptr<const std::string> peer_label_;  // peer_name_ for request descriptions
  Deadline connect_deadline_;
  Status status_;

  // Declaration order is teardown order reversed: the QP goes before the memory it uses.
  BlockPool::Block block_;  // [ring | staging | credit-in word | credit-out word]
  std::deque<Inflight> inflight_;
  std::unordered_map<uint32_t, RendezvousSend> rdv_sends_;
  std::deque<Outgoing> outgoing_;
  AhPtr ud_ah_;
  QpPtr qp_;
  CmIdPtr cm_id_;

  uint32_t psn_ = 0;
  uint32_t remote_qpn_ = 0;
  uint32_t remote_psn_ = 0;
  bool have_remote_ = false;
  bool peer_ready_ = false;
  int cq_reserved_ = 0;
  // Peer's ring.
  uint64_t ring_addr_ = 0, credit_addr_ = 0;
  uint32_t ring_rkey_ = 0, credit_rkey_ = 0, peer_slots_ = 0, peer_slot_size_ = 0;
  // Sending side counters (monotonic).
  uint64_t wr_seq_ = 0, wr_retired_ = 0, wr_last_signalled_ = 0;
  uint64_t msg_sent_ = 0, msg_retired_ = 0;
  uint32_t next_rdv_id_ = 1;
  bool credit_write_busy_ = false;  // non-inline credit write in flight (source word in use)
  // Receiving side.
  uint64_t recv_seq_ = 0, consumed_reported_ = 0;
  int64_t last_activity_ns_ = 0;
  std::unordered_map<uint32_t, ChannelQueues> channels_;
  std::deque<uint32_t> immediates_;
};

}  // namespace myelin::transport::internal::verbs
