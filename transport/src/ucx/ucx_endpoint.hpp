// transport/src/ucx/ucx_endpoint.hpp — Endpoint over a UCP endpoint (not public API).
//
// Two-sided: every send is one active message whose 16-byte header carries this Context's id (so
// the peer knows who sent it without a hello), the channel and a per-(endpoint, channel) sequence
// number; the receiver delivers in sequence order (see UcxWorker). Messages above the eager limit
// go by UCX rendezvous and land straight in the posted recv buffer, except towards a same-node
// peer that can read this process's memory: from the cma threshold up, the send is a small cma
// header and the receiver copies the payload itself (see UcxWorker); the send completes on the
// receiver's ack.
//
// One-sided: put/get use ucp_put_nbx/ucp_get_nbx on rkeys unpacked once per (endpoint, region id).
// Bounds, access and key ownership are checked here from the RemoteKey, so a bad request fails with
// a Status before UCX sees it. A put completes when the data is in the target's memory: the puts
// issued since the last flush share one ucp_ep_flush_nbx, issued at the next progress();
// put_with_immediate sends the immediate as an active message after that flush, so the target
// never sees an immediate before its data.
//
// Failure: the UCP endpoint uses UCP_ERR_HANDLING_MODE_PEER; its error handler (or the worker's
// watch of a same-node peer process) marks the endpoint failed (peer_failed naming the peer) and
// fails posted recvs and every in-flight send, put and get with it.
//
// Thread safety: none (the Context's progress thread). Ownership: keeps the UcxWorker alive; the
// destructor closes the UCP endpoint (flushing, bounded by the Context timeout) and cancels pending
// recvs.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/transport/endpoint.hpp>

#include "ucx/ucx_worker.hpp"

namespace myelin::transport::internal::ucx {

struct PendingOp;

// State shared by the endpoint, its UCX error handler and its in-flight operations.
struct EpLink : std::enable_shared_from_this<EpLink> {
  std::shared_ptr<UcxWorker> worker;
  ucp_ep_h ep = nullptr;
  std::string peer_name;
  uint64_t peer_id = 0;
  Inbox* inbox = nullptr;
  Status failure;        // first error that ended the connection
  bool closing = false;  // set by the destructor: cancellations are then expected
  uint64_t next_immediate_sequence = 0;
  // Puts issued since the last flush, in order; one ucp_ep_flush_nbx, deferred to the next
  // progress(), completes them all (flush_scheduled: that flush is queued on the worker).
  std::vector<std::unique_ptr<PendingOp>> unflushed;
  bool flush_scheduled = false;
  PendingOp* inflight = nullptr;  // every op with a pending request, linked through the ops
  // cma sends waiting for the receiver's ack, by cookie.
  std::unordered_map<uint64_t, std::unique_ptr<PendingOp>> cma_sends;

  EpLink() = default;
  EpLink(const EpLink&) = delete;
  EpLink& operator=(const EpLink&) = delete;
  ~EpLink();

  // Issues one flush for every put in `unflushed` (fails them at once when the endpoint is gone).
  void flush_puts();
  // Records the first failure, fails posted recvs and every in-flight request with it.
  void mark_failed(Status status);
  // Closes the UCP endpoint at once (after a failure); ep becomes null.
  void force_close();
  // The receiver's ack of the cma send `cookie` (error: 0, or the errno of its failed read).
  void complete_cma(uint64_t cookie, uint32_t error);
};

class UcxEndpoint final : public Endpoint {
 public:
  static Result<std::unique_ptr<UcxEndpoint>> create(std::shared_ptr<UcxWorker> worker,
                                                     const PeerAddress& peer,
                                                     const std::string& peer_name);
  UcxEndpoint(const UcxEndpoint&) = delete;
  UcxEndpoint& operator=(const UcxEndpoint&) = delete;
  ~UcxEndpoint() override;

  [[nodiscard]] Backend backend() const noexcept override { return Backend::kUcx; }
  [[nodiscard]] const std::string& peer_name() const noexcept override { return link_->peer_name; }
  [[nodiscard]] Status status() const override { return link_->failure; }

  Request send(uint32_t channel, const void* data, size_t size,
               const MemoryRegion* region = nullptr) override;
  Request recv(uint32_t channel, void* data, size_t capacity,
               const MemoryRegion* region = nullptr) override;
  Request put(const void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
              const MemoryRegion* local_region = nullptr) override;
  Request put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                             uint64_t remote_offset, uint32_t immediate,
                             const MemoryRegion* local_region = nullptr) override;
  Request get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
              const MemoryRegion* local_region = nullptr) override;
  [[nodiscard]] bool try_pop_immediate(uint32_t& value) override;
  // Whether sends from the cma threshold up go by the cma path (the peer said it can read us).
  [[nodiscard]] bool sends_by_cma() const noexcept {
    return link_->inbox != nullptr && link_->inbox->peer_reads_us;
  }
  // Fails the endpoint as UCX's error handler does when it reports a peer error (which it may do
  // while the peer's process lives on and keeps reading): every in-flight request fails with
  // `status`. For the backend's tests; the backend itself fails endpoints from UCX's callbacks.
  void fail(Status status);
  // How many withdrawn cma cookies from the peer this endpoint's inbox still remembers.
  [[nodiscard]] size_t withdrawn_held() const noexcept;

 private:
  explicit UcxEndpoint(std::shared_ptr<EpLink> link);
  // Checks a one-sided request and returns the unpacked rkey for it.
  Result<ucp_rkey_h> prepare_rma(const void* local, size_t size, const RemoteKey& remote,
                                 uint64_t remote_offset, Access wanted, const char* op);
  // send() beyond its packed fast path: the checks with their errors, unpacked and cma sends,
  // and a pending request when UCX cannot finish at once. packed_result: null, or what UCX
  // returned for send()'s packed attempt of this message (an error status; the sequence number
  // was not used).
  Request send_general(uint32_t channel, const void* data, size_t size,
                       ucs_status_ptr_t packed_result);
  Request send_cma(uint32_t channel, const void* data, size_t size);
  Request put_impl(const void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
                   bool with_immediate, uint32_t immediate);

  struct CachedRkey {
    uint64_t checksum;
    ucp_rkey_h rkey;
  };
  // The next sequence number of a channel; a one-entry cache sits in front of the map (its nodes
  // never move).
  uint64_t& send_sequence(uint32_t channel) {
    if (cached_sequence_ == nullptr || cached_channel_ != channel) {
      cached_sequence_ = &next_send_sequence_[channel];
      cached_channel_ = channel;
    }
    return *cached_sequence_;
  }

  std::shared_ptr<EpLink> link_;
  // The worker's settings a send reads, copied here (they never change) so that a small send
  // touches this object, its link and UCX, not the worker's options and limits as well.
  size_t max_message_size_;
  size_t eager_limit_;
  size_t cma_threshold_;
  // Sizes below this go packed on send()'s fast path: min(kPackedLimit + 1, eager_limit_ + 1,
  // max_message_size_ + 1, cma_threshold_).
  size_t packed_bound_;
  uint64_t sender_id_;
  std::unordered_map<uint32_t, uint64_t> next_send_sequence_;
  uint64_t* cached_sequence_ = nullptr;
  uint32_t cached_channel_ = 0;
  std::unordered_map<uint64_t, CachedRkey> rkeys_;  // by region id
};

}  // namespace myelin::transport::internal::ucx
