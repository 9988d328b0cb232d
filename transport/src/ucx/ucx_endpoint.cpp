// UCX endpoint: active-message sends, rkey cache, put/get with origin-side checks, teardown.
#include "ucx/ucx_endpoint.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <string>

#include <myelin/core/log.hpp>

#include "ucx/ucx_memory.hpp"

namespace myelin::transport::internal::ucx {

// One in-flight UCX operation. Owned by the UCX callback (or by the caller until UCX accepts it,
// or by its EpLink while it waits for a flush).
// Every op with a request state is on its EpLink's in-flight list from track() until it is
// destroyed, so that a failed endpoint can fail them all at once (see EpLink::mark_failed).
struct PendingOp {
  enum class Kind : uint8_t { kSend, kGet, kPutFlush, kImmediateFlush, kImmediateSend, kCmaSend };

  PendingOp() = default;
  PendingOp(const PendingOp&) = delete;
  PendingOp& operator=(const PendingOp&) = delete;
  ~PendingOp() {
    clear_guard();
    if (prev_inflight != nullptr) {
      prev_inflight->next_inflight = next_inflight;
    } else if (link && link->inflight == this) {
      link->inflight = next_inflight;
    }
    if (next_inflight != nullptr) next_inflight->prev_inflight = prev_inflight;
  }
  // A cma send: from here the receiver reads none of its buffer into a recv that completes (it
  // reads the guard after every piece and fails the recv once the cookie is gone). Call before
  // the send completes in any way but the receiver's ack. The fence keeps the caller's later
  // writes into the buffer (once the send has completed) from becoming visible before the
  // cleared guard.
  void clear_guard() noexcept {
    if (kind != Kind::kCmaSend || guard.load(std::memory_order_relaxed) == 0) return;
    guard.store(0, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  // Puts the op on its link's in-flight list (once; `link` must be set).
  void track() {
    next_inflight = link->inflight;
    if (next_inflight != nullptr) next_inflight->prev_inflight = this;
    link->inflight = this;
  }

  Kind kind = Kind::kSend;
  RequestStateRef state;
  std::shared_ptr<EpLink> link;
  size_t bytes = 0;
  uint32_t immediate = 0;
  AmHeader header{};  // UCX reads the header until the send completes, so it lives here
  // kCmaSend: the cookie while the receiver may read the buffer, 0 after (read by the receiver
  // with process_vm_readv, at the address the cma header gives; this process only writes it).
  std::atomic<uint64_t> guard{0};
  PendingOp* prev_inflight = nullptr;
  PendingOp* next_inflight = nullptr;
};

EpLink::~EpLink() = default;

namespace {

// For a send that UCX must finish at once or refuse (no request, no callback).
constexpr ucp_request_param_t kAtOnce = {.op_attr_mask = UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL};

// v + 1, or v when that would wrap (a limit of SIZE_MAX means none).
constexpr size_t saturating_next(size_t v) noexcept {
  return v == std::numeric_limits<size_t>::max() ? v : v + 1;
}

const char* op_name(PendingOp::Kind kind) {
  switch (kind) {
    case PendingOp::Kind::kSend:
    case PendingOp::Kind::kCmaSend:
      return "send";
    case PendingOp::Kind::kGet:
      return "get";
    case PendingOp::Kind::kPutFlush:
      return "put";
    case PendingOp::Kind::kImmediateFlush:
    case PendingOp::Kind::kImmediateSend:
      return "put_with_immediate";
  }
  return "operation";
}

// The Status an operation that UCX finished with `status` (not OK) completes with.
Status op_error(const PendingOp& op, ucs_status_t status) {
  EpLink& link = *op.link;
  if (!link.failure.ok()) return link.failure;
  if (status == UCS_ERR_CANCELED && link.closing) {
    return cancelled(op_name(op.kind), " to ", link.peer_name, " cancelled: endpoint disconnected");
  }
  Status s = ucs_to_status(
      status, ::myelin::internal::str_cat(op_name(op.kind), " to ", link.peer_name, " (ucx)"));
  if (s.code() == StatusCode::kPeerFailed) link.mark_failed(s);
  return s;
}

void send_immediate(std::unique_ptr<PendingOp> op);
void finish(std::unique_ptr<PendingOp> op, ucs_status_t status, bool in_callback);

void finish(std::unique_ptr<PendingOp> op, ucs_status_t status, bool in_callback) {
  if (status == UCS_OK && op->kind == PendingOp::Kind::kImmediateFlush) {
    if (op->link->closing) {
      op->state->complete(op_error(*op, UCS_ERR_CANCELED), 0);
      return;
    }
    // The put is now complete at the target; the immediate may go (never from inside a callback).
    if (!in_callback) {
      send_immediate(std::move(op));
      return;
    }
    std::shared_ptr<UcxWorker> worker = op->link->worker;
    worker->defer([raw = op.release()] { send_immediate(std::unique_ptr<PendingOp>(raw)); });
    return;
  }
  // A rendezvous message the peer refused (its recv buffer was too small) completes the send
  // with UCS_ERR_CANCELED; the message was consumed by that recv, so the send itself succeeded.
  if (status == UCS_OK || (status == UCS_ERR_CANCELED && op->kind == PendingOp::Kind::kSend &&
                           !op->link->closing && op->link->failure.ok())) {
    op->state->complete(ok_status(), op->bytes);
    if (op->link->worker) op->link->worker->request_pool().recycle(std::move(op->state));
    return;
  }
  op->state->complete(op_error(*op, status), 0);
}

// The puts one ucp_ep_flush_nbx completes: every put issued on the endpoint before the flush.
struct FlushBatch {
  std::shared_ptr<EpLink> link;
  std::vector<std::unique_ptr<PendingOp>> puts;
};

void finish_batch(std::unique_ptr<FlushBatch> batch, ucs_status_t status, bool in_callback) {
  for (auto& op : batch->puts) finish(std::move(op), status, in_callback);
}

void on_flush_done(void* request, ucs_status_t status, void* user_data) {
  ucp_request_free(request);
  finish_batch(std::unique_ptr<FlushBatch>(static_cast<FlushBatch*>(user_data)), status, true);
}

void on_op_done(void* request, ucs_status_t status, void* user_data) {
  ucp_request_free(request);
  finish(std::unique_ptr<PendingOp>(static_cast<PendingOp*>(user_data)), status, true);
}

// Issues a UCX call that takes a request param with our callback; settles immediate outcomes.
template <typename Issue>
void issue(std::unique_ptr<PendingOp> op, Issue&& call) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = &on_op_done;
  param.user_data = op.get();
  ucs_status_ptr_t p = call(op.get(), param);
  if (p == nullptr) {
    finish(std::move(op), UCS_OK, false);
  } else if (UCS_PTR_IS_ERR(p)) {
    finish(std::move(op), UCS_PTR_STATUS(p), false);
  } else {
    (void)op.release();  // on_op_done owns it now
  }
}

void send_immediate(std::unique_ptr<PendingOp> op) {
  EpLink& link = *op->link;
  if (!link.failure.ok() || link.closing) {
    op->state->complete(op_error(*op, UCS_ERR_CANCELED), 0);
    return;
  }
  op->kind = PendingOp::Kind::kImmediateSend;
  op->header = AmHeader{link.worker->id(), static_cast<uint32_t>(link.next_immediate_sequence++),
                        op->immediate};
  issue(std::move(op), [&link](PendingOp* o, const ucp_request_param_t& param) {
    return ucp_am_send_nbx(link.ep, kAmImmediateId, &o->header, sizeof(AmHeader), nullptr, 0,
                           &param);
  });
}

}  // namespace

void EpLink::flush_puts() {
  flush_scheduled = false;
  if (unflushed.empty()) return;
  auto batch = std::make_unique<FlushBatch>();
  batch->link = shared_from_this();
  batch->puts.swap(unflushed);
  if (ep == nullptr || !failure.ok() || closing) {
    // Force-closed, failed or being torn down: these puts' fate is unknown, report it.
    finish_batch(std::move(batch), closing ? UCS_ERR_CANCELED : UCS_ERR_CONNECTION_RESET, false);
    return;
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = &on_flush_done;
  param.user_data = batch.get();
  ucs_status_ptr_t p = ucp_ep_flush_nbx(ep, &param);
  if (p == nullptr) {
    finish_batch(std::move(batch), UCS_OK, false);
  } else if (UCS_PTR_IS_ERR(p)) {
    finish_batch(std::move(batch), UCS_PTR_STATUS(p), false);
  } else {
    (void)batch.release();  // on_flush_done owns it now
  }
}

namespace {

void on_ep_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
  auto* link = static_cast<EpLink*>(arg);
  link->mark_failed(peer_failed("peer ", link->peer_name, " (ucx): ", ucs_status_string(status)));
}

}  // namespace

void EpLink::mark_failed(Status status) {
  if (!failure.ok()) return;
  failure = std::move(status);
  MYELIN_LOG_INFO << "ucx endpoint failed: " << failure;
  if (inbox != nullptr && worker) worker->fail_inbox(*inbox, failure);
  // UCX completes what it holds for a failed endpoint, but not always: over shared memory, data
  // queued towards a dead peer kept a forced close (and so a rendezvous send) pending for good.
  // The requests complete here; when UCX lets go of an op later, its outcome is ignored. Gets are
  // the exception: UCX may still write into their buffers, so they complete when UCX lets go of
  // them (the forced close below makes it), or, should it never, after the Context timeout (with
  // a warning that their buffers may still change).
  bool held_gets = false;
  // A cma send completes here too, whether or not the peer's process still lives and reads: its
  // guard is cleared first, so the receiver fails the recv rather than deliver bytes read after
  // the caller took the buffer back (see UcxWorker's cma path).
  for (PendingOp* op = inflight; op != nullptr; op = op->next_inflight) {
    if (!op->state) continue;
    if (op->kind == PendingOp::Kind::kGet && ep != nullptr) {
      held_gets = true;
      continue;
    }
    op->clear_guard();
    op->state->complete(failure, 0);
  }
  if (!held_gets || !worker) return;
  std::weak_ptr<EpLink> weak = weak_from_this();
  worker->defer([weak] {
    if (auto l = weak.lock()) l->force_close();
  });
  // Saturating: a timeout may be as long as milliseconds::max() (no deadline), whose count in
  // nanoseconds overflows and would put the deadline in the past.
  const int64_t now_ns = coarse_monotonic_ns();
  const int64_t timeout_ms = worker->options().timeout.count();
  const int64_t deadline_ns =
      timeout_ms >= (std::numeric_limits<int64_t>::max() - now_ns) / 1'000'000
          ? std::numeric_limits<int64_t>::max()
          : now_ns + timeout_ms * 1'000'000;
  worker->at(deadline_ns, [weak] {
    auto l = weak.lock();
    if (!l) return;
    for (PendingOp* op = l->inflight; op != nullptr; op = op->next_inflight) {
      if (op->kind != PendingOp::Kind::kGet || !op->state || op->state->done()) continue;
      MYELIN_LOG_WARN << "ucx: a get from failed peer " << l->peer_name
                      << " is still held by UCX after the timeout; it completes with the "
                      << "failure, but UCX may still write into its buffer";
      op->state->complete(l->failure, 0);
    }
  });
}

void EpLink::complete_cma(uint64_t cookie, uint32_t error) {
  auto it = cma_sends.find(cookie);
  if (it == cma_sends.end()) {
    MYELIN_LOG_WARN << "ucx: dropping a cma ack from " << peer_name << " for unknown send "
                    << cookie;
    return;
  }
  std::unique_ptr<PendingOp> op = std::move(it->second);
  cma_sends.erase(it);
  if (error == 0) {
    op->state->complete(ok_status(), op->bytes);
    if (worker) worker->request_pool().recycle(std::move(op->state));
    return;
  }
  if (error == ECANCELED) {  // the receiver confirmed our withdraw: it read none of the rest
    op->state->complete(cancelled("send of ", op->bytes, " bytes to ", peer_name,
                                  ": withdrawn, the endpoint closed before the peer read it"),
                        0);
    return;
  }
  op->state->complete(io_error("send of ", op->bytes, " bytes to ", peer_name,
                               ": the peer could not read it from this process (cma): ",
                               std::strerror(static_cast<int>(error)), " (errno ", error, ")"),
                      0);
}

void EpLink::force_close() {
  if (inbox != nullptr) inbox->reply_ep = nullptr;
  if (ep == nullptr) return;
  // Completes what UCX still holds for this peer (with errors reported as `failure`).
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t p = ucp_ep_close_nbx(ep, &param);
  if (UCS_PTR_IS_PTR(p)) ucp_request_free(p);  // UCX finishes it on its own
  ep = nullptr;
}

Result<std::unique_ptr<UcxEndpoint>> UcxEndpoint::create(std::shared_ptr<UcxWorker> worker,
                                                         const PeerAddress& peer,
                                                         const std::string& peer_name) {
  auto link = std::make_shared<EpLink>();
  link->worker = worker;
  link->peer_name = peer_name;
  link->peer_id = peer.context_id;
  MYELIN_ASSIGN_OR_RETURN(link->inbox, worker->claim_inbox(peer.context_id, peer_name));

  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(peer.worker_address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &on_ep_error;
  params.err_handler.arg = link.get();
  const ucs_status_t st = ucp_ep_create(worker->worker(), &params, &link->ep);
  if (st != UCS_OK) {
    worker->drop_inbox(peer.context_id);
    return ucs_to_status(st, "creating a ucx endpoint to " + peer_name);
  }
  link->inbox->reply_ep = link->ep;
  if (worker->same_node(peer)) {
    std::weak_ptr<EpLink> ack_target = link;
    link->inbox->on_cma_ack = [ack_target](uint64_t cookie, uint32_t error) {
      if (auto l = ack_target.lock()) l->complete_cma(cookie, error);
    };
    worker->start_cma(*link->inbox, peer, link->ep);
    std::weak_ptr<EpLink> weak = link;
    worker->watch_process(peer.pid, peer.start_time, link, [weak, pid = peer.pid] {
      if (auto l = weak.lock()) {
        l->mark_failed(peer_failed("peer ", l->peer_name, " (ucx): its process ", pid,
                                   " on this node is gone"));
        l->force_close();
      }
    });
  }
  return std::unique_ptr<UcxEndpoint>(new UcxEndpoint(std::move(link)));
}

UcxEndpoint::UcxEndpoint(std::shared_ptr<EpLink> link)
    : link_(std::move(link)),
      max_message_size_(link_->worker->options().max_message_size),
      eager_limit_(link_->worker->limits().eager_limit),
      cma_threshold_(link_->worker->cma_threshold()),
      packed_bound_(std::min({kPackedLimit + 1, saturating_next(eager_limit_),
                              saturating_next(max_message_size_), cma_threshold_})),
      sender_id_(link_->worker->id()) {}

void UcxEndpoint::fail(Status status) {
  link_->mark_failed(std::move(status));
}

size_t UcxEndpoint::withdrawn_held() const noexcept {
  return link_->inbox != nullptr ? link_->inbox->withdrawn.size() : 0;
}

UcxEndpoint::~UcxEndpoint() {
  EpLink& link = *link_;
  std::shared_ptr<UcxWorker> worker = link.worker;
  link.flush_puts();  // puts still waiting for their flush get it, like those already flushed
  link.closing = true;
  for (auto& [id, cached] : rkeys_) ucp_rkey_destroy(cached.rkey);
  rkeys_.clear();
  // cma sends not acked yet: the receiver may be reading them, and their buffers may go once
  // they complete. Withdraw them (before the close below pushes queued messages out) and wait,
  // bounded, for the receiver to answer each: an ack (it read the whole message) or a withdraw
  // confirmation (it will read no more of it; its recv fails `cancelled`). Only then do the
  // sends complete, so a caller that reuses a buffer after its send completed never has it read
  // half old, half new. A failed endpoint's peer is gone or failed: nothing to wait for.
  // How long closing may wait on the peer: for withdraw answers, then for the forced close.
  const auto close_limit =
      std::min<std::chrono::milliseconds>(worker->options().timeout, std::chrono::seconds(2));
  bool withdrawn = false;
  for (auto& [cookie, op] : link.cma_sends) {
    if (link.ep != nullptr && link.failure.ok()) {
      const CmaAck withdraw{worker->id(), cookie, 0, 0};
      withdrawn |=
          UcxWorker::send_small_am(link.ep, kAmCmaWithdrawId, &withdraw, sizeof withdraw) == UCS_OK;
    }
  }
  if (withdrawn) {
    const Deadline deadline = Deadline::after(close_limit);
    while (!link.cma_sends.empty() && link.failure.ok() && !deadline.expired()) {
      worker->progress();
    }
    if (!link.cma_sends.empty() && link.failure.ok()) {
      MYELIN_LOG_WARN << "ucx: " << link.cma_sends.size() << " cma send(s) to " << link.peer_name
                      << " not confirmed withdrawn within " << close_limit.count()
                      << " ms; they complete cancelled (their guards cleared: the peer fails "
                      << "any recv it reads from them from here on)";
    }
  }
  for (auto& [cookie, op] : link.cma_sends) {
    op->clear_guard();
    op->state->complete(op_error(*op, UCS_ERR_CANCELED), 0);
  }
  link.cma_sends.clear();
  if (link.inbox != nullptr) link.inbox->on_cma_ack = nullptr;

  // A forced close: a flush-mode close (or an ep flush) runs a handshake that needs the peer's
  // worker to make progress, which stalls a peer that is busy or drives both sides from one
  // thread. What UCX still holds queued for this peer is pushed out by a few rounds of progress
  // first; see docs/transport-ucx.md for what a disconnect may drop.
  for (int i = 0; i < 64 && worker->progress() != 0; ++i) {
  }
  bool unfinished = false;
  // The close below ends every use of the UCP endpoint: acks and the hello (sent from the
  // progress() calls that wait for the close) must not go out on it any more.
  if (link.inbox != nullptr) link.inbox->reply_ep = nullptr;
  if (link.ep != nullptr) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t p = ucp_ep_close_nbx(link.ep, &param);
    link.ep = nullptr;
    if (UCS_PTR_IS_PTR(p)) {
      const Deadline deadline = Deadline::after(close_limit);
      while (ucp_request_check_status(p) == UCS_INPROGRESS && !deadline.expired()) {
        worker->progress();
      }
      unfinished = ucp_request_check_status(p) == UCS_INPROGRESS;
      ucp_request_free(p);
    }
  }
  // What UCX still held for the endpoint (a rendezvous send the peer never pulled, a get it never
  // served, a flush) the close purged, but UCX calls their callbacks from the worker's next
  // progress, and a closing Context never progresses its worker again: without these polls
  // their Requests stayed pending for good, and each op's reference to the link kept the worker.
  if (!unfinished && link.inflight != nullptr) {
    const Deadline deadline = Deadline::after(close_limit);
    while (link.inflight != nullptr && !deadline.expired()) worker->progress();
    if (link.inflight != nullptr) {
      MYELIN_LOG_WARN << "ucx: operations to " << link.peer_name
                      << " still held by UCX after the endpoint closed; their requests complete "
                      << "only if the worker progresses again";
    }
  }
  worker->drop_inbox(link.peer_id);
  link.inbox = nullptr;
  if (unfinished) {
    MYELIN_LOG_WARN << "ucx: closing the endpoint to " << link.peer_name
                    << " did not finish within "
                    << "its deadline; its resources go with the worker";
    link.worker.reset();  // the graveyard must not own the worker
    worker->keep_until_destroyed(link_);
  }
}

Request UcxEndpoint::send(uint32_t channel, const void* data, size_t size,
                          const MemoryRegion* /*region*/) {
  // The common case in one bound and two checks: a message small enough to go packed (so also
  // within the eager limit, max_message_size and below the cma threshold), a buffer, a live
  // peer. UCX finishes it at once or refuses it without side effects (then send_general() sends
  // it with the same sequence number).
  if (size < packed_bound_ && (data != nullptr || size == 0) && link_->failure.ok()) [[likely]] {
    uint64_t& sequence = send_sequence(channel);
    const AmHeader header{sender_id_, static_cast<uint32_t>(sequence), channel};
    alignas(8) uint8_t packed[sizeof(AmHeader) + kPackedLimit];
    std::memcpy(packed, &header, sizeof header);
    copy_bytes(packed + sizeof header, data, size);
    const ucs_status_ptr_t p =
        ucp_am_send_nbx(link_->ep, kAmPackedId, nullptr, 0, packed, sizeof header + size, &kAtOnce);
    if (p == nullptr) [[likely]] {
      ++sequence;
      return Request::completed(size);
    }
    return send_general(channel, data, size, p);
  }
  return send_general(channel, data, size, nullptr);
}

Request UcxEndpoint::send_general(uint32_t channel, const void* data, size_t size,
                                  ucs_status_ptr_t packed_result) {
  EpLink& link = *link_;
  if (packed_result != nullptr) {
    // The packed attempt of send() was refused.
    MYELIN_CHECK(UCS_PTR_IS_ERR(packed_result))
        << "UCX returned a request for a forced-immediate send";
    if (UCS_PTR_STATUS(packed_result) != UCS_ERR_NO_RESOURCE) {
      PendingOp probe;
      probe.link = link_;
      return Request::failed(op_error(probe, UCS_PTR_STATUS(packed_result)));
    }
  }
  if (size > max_message_size_) {
    return Request::failed(invalid_argument("send of ", size, " bytes to ", link.peer_name,
                                            " exceeds max_message_size ", max_message_size_));
  }
  if (size != 0 && data == nullptr) {
    return Request::failed(invalid_argument("send of ", size, " bytes from a null buffer"));
  }
  if (!link.failure.ok()) return Request::failed(link.failure);

  if (size >= cma_threshold_ && link.inbox->peer_reads_us) return send_cma(channel, data, size);
  uint64_t& sequence = send_sequence(channel);
  const AmHeader header{sender_id_, static_cast<uint32_t>(sequence), channel};
  if (size <= eager_limit_ && packed_result == nullptr) {
    // No request, no allocation, the header on the stack. UCX refuses (without side effects)
    // what it cannot finish right now, and the full path below takes over (with the same
    // sequence number: the receiver orders packed and unpacked messages alike). A packed size
    // that send() tried already goes to the full path at once.
    ucs_status_ptr_t p;
    if (size <= kPackedLimit) {
      // Small: header and payload in one buffer, one piece for UCX (see kPackedLimit).
      alignas(8) uint8_t packed[sizeof(AmHeader) + kPackedLimit];
      std::memcpy(packed, &header, sizeof header);
      copy_bytes(packed + sizeof header, data, size);
      p = ucp_am_send_nbx(link.ep, kAmPackedId, nullptr, 0, packed, sizeof header + size, &kAtOnce);
    } else {
      p = ucp_am_send_nbx(link.ep, kAmMessageId, &header, sizeof header, data, size, &kAtOnce);
    }
    if (p == nullptr) {
      ++sequence;
      return Request::completed(size);
    }
    MYELIN_CHECK(UCS_PTR_IS_ERR(p)) << "UCX returned a request for a forced-immediate send";
    if (UCS_PTR_STATUS(p) != UCS_ERR_NO_RESOURCE) {
      PendingOp probe;
      probe.link = link_;
      return Request::failed(op_error(probe, UCS_PTR_STATUS(p)));
    }
  }

  auto op = std::make_unique<PendingOp>();
  op->kind = PendingOp::Kind::kSend;
  op->link = link_;
  op->bytes = size;
  op->header = header;
  auto [request, state] = link.worker->request_pool().make_pending();
  state->describe("send", channel, link.inbox->peer_label);
  op->state = state;
  op->track();
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = &on_op_done;
  param.user_data = op.get();
  ucs_status_ptr_t p =
      ucp_am_send_nbx(link.ep, kAmMessageId, &op->header, sizeof(AmHeader), data, size, &param);
  if (UCS_PTR_IS_ERR(p)) return Request::failed(op_error(*op, UCS_PTR_STATUS(p)));
  ++sequence;
  if (p == nullptr) return Request::completed(size);
  (void)op.release();  // on_op_done owns it now
  return std::move(request);
}

Request UcxEndpoint::send_cma(uint32_t channel, const void* data, size_t size) {
  EpLink& link = *link_;
  uint64_t& sequence = send_sequence(channel);
  auto op = std::make_unique<PendingOp>();
  op->kind = PendingOp::Kind::kCmaSend;
  op->link = link_;
  op->bytes = size;
  const uint64_t cookie = link.worker->next_cma_cookie();
  op->guard.store(cookie, std::memory_order_relaxed);  // before the header leaves (a system call)
  const CmaHeader header{AmHeader{sender_id_, static_cast<uint32_t>(sequence), channel},
                         reinterpret_cast<uintptr_t>(data), size, cookie,
                         reinterpret_cast<uintptr_t>(&op->guard)};
  const ucs_status_t st = UcxWorker::send_small_am(link.ep, kAmCmaId, &header, sizeof header);
  if (st != UCS_OK) {
    op->clear_guard();
    return Request::failed(op_error(*op, st));
  }
  ++sequence;
  auto [request, state] = link.worker->request_pool().make_pending();
  state->describe("send", channel, link.inbox->peer_label);
  op->state = state;
  op->track();
  link.cma_sends.emplace(cookie, std::move(op));
  return std::move(request);
}

Request UcxEndpoint::recv(uint32_t channel, void* data, size_t capacity,
                          const MemoryRegion* /*region*/) {
  if (capacity != 0 && data == nullptr) {
    return Request::failed(
        invalid_argument("recv of up to ", capacity, " bytes into a null buffer"));
  }
  return link_->worker->post_recv(*link_->inbox, channel, data, capacity);
}

Result<ucp_rkey_h> UcxEndpoint::prepare_rma(const void* local, size_t size, const RemoteKey& remote,
                                            uint64_t remote_offset, Access wanted, const char* op) {
  EpLink& link = *link_;
  if (size != 0 && local == nullptr) {
    return invalid_argument(op, " of ", size, " bytes with a null local buffer");
  }
  if (remote.kind() != MemoryKind::kHost) {
    return unsupported(op, ": the ucx backend reaches host memory only");
  }
  if (!allows(remote.access(), wanted)) {
    return permission_denied(op, ": remote region ", remote.region_id(), " of ", link.peer_name,
                             " does not allow remote ",
                             wanted == Access::kRemoteRead ? "reads" : "writes");
  }
  if (remote_offset > remote.length() || size > remote.length() - remote_offset) {
    return out_of_range(op, " of ", size, " bytes at offset ", remote_offset,
                        " falls outside remote region ", remote.region_id(), " of ",
                        remote.length(), " bytes");
  }
  if (!link.failure.ok()) return link.failure;
  MYELIN_ASSIGN_OR_RETURN(RkeyBlob blob, parse_rkey_blob(remote.backend_blob(Backend::kUcx)));
  if (blob.owner_id != link.peer_id) {
    return invalid_argument(op, ": remote region ", remote.region_id(),
                            " was registered by another ucx context, not by ", link.peer_name);
  }
  // The RemoteKey's own fields may have been altered; the registration's range and access, as
  // recorded (and checksummed) in the blob, are what the target really offers.
  const uint64_t start = remote.address() + remote_offset;
  if (!allows(blob.access, wanted) || start < blob.address || remote.address() < blob.address ||
      start - blob.address > blob.length || size > blob.length - (start - blob.address)) {
    return out_of_range(op, " of ", size, " bytes at address ", start,
                        " is not inside what remote region ", remote.region_id(), " of ",
                        link.peer_name, " registered (", blob.length, " bytes at ", blob.address,
                        ")");
  }
  auto it = rkeys_.find(remote.region_id());
  if (it != rkeys_.end()) {
    if (it->second.checksum == blob.checksum) return it->second.rkey;
    ucp_rkey_destroy(it->second.rkey);  // same id, different key: trust the newer one
    rkeys_.erase(it);
  }
  ucp_rkey_h rkey = nullptr;
  const ucs_status_t st = ucp_ep_rkey_unpack(link.ep, blob.packed.data(), &rkey);
  if (st != UCS_OK) {
    return ucs_to_status(st, ::myelin::internal::str_cat(op, ": unpacking the ucx rkey of region ",
                                                         remote.region_id()));
  }
  rkeys_.emplace(remote.region_id(), CachedRkey{blob.checksum, rkey});
  return rkey;
}

Request UcxEndpoint::put(const void* local, size_t size, const RemoteKey& remote,
                         uint64_t remote_offset, const MemoryRegion* /*local_region*/) {
  return put_impl(local, size, remote, remote_offset, false, 0);
}

Request UcxEndpoint::put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                                        uint64_t remote_offset, uint32_t immediate,
                                        const MemoryRegion* /*local_region*/) {
  return put_impl(local, size, remote, remote_offset, true, immediate);
}

Request UcxEndpoint::put_impl(const void* local, size_t size, const RemoteKey& remote,
                              uint64_t remote_offset, bool with_immediate, uint32_t immediate) {
  const char* name = with_immediate ? "put_with_immediate" : "put";
  Result<ucp_rkey_h> rkey =
      prepare_rma(local, size, remote, remote_offset, Access::kRemoteWrite, name);
  if (!rkey.ok()) return Request::failed(std::move(rkey).status());
  EpLink& link = *link_;
  auto op = std::make_unique<PendingOp>();
  op->kind = with_immediate ? PendingOp::Kind::kImmediateFlush : PendingOp::Kind::kPutFlush;
  op->link = link_;
  op->bytes = size;
  op->immediate = immediate;
  if (size != 0) {
    // Completion of the put itself is only local; the flush below is what we wait for, and it
    // reports the put's failure too.
    ucp_request_param_t param{};
    ucs_status_ptr_t p =
        ucp_put_nbx(link.ep, local, size, remote.address() + remote_offset, *rkey, &param);
    if (UCS_PTR_IS_ERR(p)) return Request::failed(op_error(*op, UCS_PTR_STATUS(p)));
    if (p != nullptr) ucp_request_free(p);  // released by UCX once it completes
  }
  auto [request, state] = link.worker->request_pool().make_pending();
  state->describe(name, 0, link.inbox->peer_label);
  op->state = state;
  op->track();
  // Remote completion: the put completes with the first ucp_ep_flush_nbx issued after it (once
  // that flush completes, the bytes are in the target's memory). Puts issued back to back share
  // one flush, issued at the next progress().
  link.unflushed.push_back(std::move(op));
  if (!link.flush_scheduled) {
    link.flush_scheduled = true;
    link.worker->defer([l = link_] { l->flush_puts(); });
  }
  return std::move(request);
}

Request UcxEndpoint::get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
                         const MemoryRegion* /*local_region*/) {
  Result<ucp_rkey_h> rkey =
      prepare_rma(local, size, remote, remote_offset, Access::kRemoteRead, "get");
  if (!rkey.ok()) return Request::failed(std::move(rkey).status());
  if (size == 0) return Request::completed(0);
  EpLink& link = *link_;
  auto op = std::make_unique<PendingOp>();
  op->kind = PendingOp::Kind::kGet;
  op->link = link_;
  op->bytes = size;
  auto [request, state] = link.worker->request_pool().make_pending();
  state->describe("get", 0, link.inbox->peer_label);
  op->state = state;
  op->track();
  const uint64_t address = remote.address() + remote_offset;
  const ucp_rkey_h key = *rkey;
  issue(std::move(op), [&](PendingOp*, const ucp_request_param_t& param) {
    return ucp_get_nbx(link.ep, local, size, address, key, &param);
  });
  return std::move(request);
}

bool UcxEndpoint::try_pop_immediate(uint32_t& value) {
  Inbox* inbox = link_->inbox;
  if (inbox == nullptr || inbox->immediates.empty()) return false;
  value = inbox->immediates.front();
  inbox->immediates.pop_front();
  return true;
}

}  // namespace myelin::transport::internal::ucx
