// transport/src/verbs/verbs_endpoint.cpp — RC queue pair bring-up and the verbs data path.
#include "verbs/verbs_endpoint.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

#include <myelin/core/log.hpp>

namespace myelin::transport::internal::verbs {
namespace {

constexpr const char* kCreditWhat = "credit return";
constexpr size_t kWordArea = 128;  // credit-in word, credit-out word, each on its own line

size_t block_bytes(const Shared& s) {
  return size_t{2} * s.slots * s.slot_size + kWordArea;
}

uint32_t random_psn() {
  static thread_local std::mt19937 gen(std::random_device{}());
  return gen() & 0xffffff;
}

}  // namespace

Status Shared::reserve_cq(int delta) {
  cq_needed += delta;
  if (cq_needed <= cq_capacity) return ok_status();
  const int max_cqe = device->attr().max_cqe;
  int want = std::max(cq_capacity * 2, cq_needed);
  if (want > max_cqe) want = max_cqe;
  if (want < cq_needed) {
    cq_needed -= delta;
    return resource_exhausted("verbs CQ would need ", cq_needed + delta, " entries; device max ",
                              max_cqe);
  }
  if (int rc = ibv_resize_cq(cq.get(), want)) {
    cq_needed -= delta;
    return errno_status("ibv_resize_cq to " + std::to_string(want), rc,
                        StatusCode::kResourceExhausted);
  }
  cq_capacity = cq->cqe;
  return ok_status();
}

VerbsEndpoint::VerbsEndpoint(std::shared_ptr<Shared> shared, uint64_t peer_token, VerbsAddress peer,
                             std::string peer_name, Deadline connect_deadline)
    : shared_(std::move(shared)),
      peer_token_(peer_token),
      peer_(peer),
      peer_name_(std::move(peer_name)),
      peer_label_(std::make_shared<const std::string>(peer_name_)),
      connect_deadline_(connect_deadline),
      psn_(random_psn()) {
  last_activity_ns_ = monotonic_ns();
}

VerbsEndpoint::~VerbsEndpoint() {
  fail(cancelled("endpoint to ", peer_name_, " was disconnected"));
  if (cm_id_ && have_remote_) rdma_disconnect(cm_id_.get());
  if (ibv_qp* q = qp()) shared_->by_qpn.erase(q->qp_num);
  if (auto it = shared_->by_token.find(peer_token_);
      it != shared_->by_token.end() && it->second == this) {
    shared_->by_token.erase(it);
  }
  (void)shared_->reserve_cq(-cq_reserved_);
}

ibv_qp* VerbsEndpoint::qp() const noexcept {
  return cm_id_ ? cm_id_->qp : qp_.get();
}

std::string VerbsEndpoint::op_context(const char* what) const {
  return std::string("verbs ") + what + " to " + peer_name_;
}

namespace {
ibv_qp_init_attr rc_init_attr(const Shared& s, uint32_t max_inline) {
  ibv_qp_init_attr a{};
  a.send_cq = s.cq.get();
  a.recv_cq = s.cq.get();
  a.qp_type = IBV_QPT_RC;
  a.sq_sig_all = 0;
  a.cap.max_send_wr = s.sq_depth;
  a.cap.max_recv_wr = s.slots;
  a.cap.max_send_sge = 1;
  a.cap.max_recv_sge = 1;
  a.cap.max_inline_data = max_inline;
  return a;
}
}  // namespace

Status VerbsEndpoint::init_exchange() {
  MYELIN_ASSIGN_OR_RETURN(block_, shared_->pool->acquire());
  std::memset(block_.data() + block_bytes(*shared_) - kWordArea, 0, kWordArea);
  MYELIN_RETURN_IF_ERROR(shared_->reserve_cq(static_cast<int>(shared_->sq_depth + shared_->slots)));
  cq_reserved_ = static_cast<int>(shared_->sq_depth + shared_->slots);
  ibv_qp_init_attr a = rc_init_attr(*shared_, kMaxInlineWanted);
  qp_.reset(ibv_create_qp(shared_->device->pd(), &a));
  if (!qp_) {  // some devices refuse inline data of that size: retry without
    a = rc_init_attr(*shared_, 0);
    qp_.reset(ibv_create_qp(shared_->device->pd(), &a));
  }
  if (!qp_) return errno_status("ibv_create_qp (RC)", errno, StatusCode::kResourceExhausted);
  shared_->max_inline = a.cap.max_inline_data;
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_INIT;
  attr.pkey_index = 0;
  attr.port_num = shared_->device->port().port;
  attr.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  if (int rc = ibv_modify_qp(
          qp_.get(), &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
    return errno_status("ibv_modify_qp RESET->INIT", rc);
  }
  MYELIN_RETURN_IF_ERROR(post_recvs(shared_->slots));
  shared_->by_qpn[qp_->qp_num] = this;
  return ok_status();
}

Status VerbsEndpoint::init_rdma_cm(CmIdPtr id) {
  if (id->verbs != shared_->device->context()) {
    return failed_precondition("rdma_cm bound the connection to another device than ",
                               shared_->device->name());
  }
  if (!block_.data()) {
    MYELIN_ASSIGN_OR_RETURN(block_, shared_->pool->acquire());
    std::memset(block_.data() + block_bytes(*shared_) - kWordArea, 0, kWordArea);
  }
  if (cq_reserved_ == 0) {
    MYELIN_RETURN_IF_ERROR(
        shared_->reserve_cq(static_cast<int>(shared_->sq_depth + shared_->slots)));
    cq_reserved_ = static_cast<int>(shared_->sq_depth + shared_->slots);
  }
  if (ibv_qp* old = qp()) shared_->by_qpn.erase(old->qp_num);
  cm_id_.reset();
  ibv_qp_init_attr a = rc_init_attr(*shared_, kMaxInlineWanted);
  if (rdma_create_qp(id.get(), shared_->device->pd(), &a) != 0) {
    a = rc_init_attr(*shared_, 0);
    if (rdma_create_qp(id.get(), shared_->device->pd(), &a) != 0) {
      return errno_status("rdma_create_qp", errno, StatusCode::kResourceExhausted);
    }
  }
  shared_->max_inline = a.cap.max_inline_data;
  cm_id_ = std::move(id);
  cm_id_->context = this;
  recv_seq_ = 0;
  MYELIN_RETURN_IF_ERROR(post_recvs(shared_->slots));
  shared_->by_qpn[cm_id_->qp->qp_num] = this;
  return ok_status();
}

void VerbsEndpoint::drop_cm_id() {
  if (cm_id_ && cm_id_->qp) shared_->by_qpn.erase(cm_id_->qp->qp_num);
  cm_id_.reset();
}

ConnectInfo VerbsEndpoint::local_info() const {
  ConnectInfo c;
  c.mtu = static_cast<uint8_t>(shared_->device->port().active_mtu);
  c.src_token = shared_->token;
  c.dst_token = peer_token_;
  c.qpn = qp() ? qp()->qp_num : 0;
  c.psn = psn_;
  const size_t ring_bytes = size_t{shared_->slots} * shared_->slot_size;
  c.ring_addr = reinterpret_cast<uintptr_t>(block_.data());
  c.ring_rkey = block_.rkey();
  c.credit_addr = reinterpret_cast<uintptr_t>(block_.data() + 2 * ring_bytes);
  c.credit_rkey = block_.rkey();
  c.slots = shared_->slots;
  c.slot_size = shared_->slot_size;
  return c;
}

Status VerbsEndpoint::set_remote_ring(const ConnectInfo& info) {
  ring_addr_ = info.ring_addr;
  ring_rkey_ = info.ring_rkey;
  credit_addr_ = info.credit_addr;
  credit_rkey_ = info.credit_rkey;
  peer_slots_ = info.slots;
  peer_slot_size_ = info.slot_size;
  have_remote_ = true;
  return ok_status();
}

void VerbsEndpoint::set_peer_ready() {
  if (!peer_ready_) last_activity_ns_ = monotonic_ns();
  peer_ready_ = true;
}

Status VerbsEndpoint::apply_remote(const ConnectInfo& info) {
  if (have_remote_) {
    if (info.qpn != remote_qpn_) {
      return protocol_error("verbs: ", peer_name_, " announced QP ", info.qpn, " after QP ",
                            remote_qpn_);
    }
    return ok_status();
  }
  const PortChoice& port = shared_->device->port();
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = static_cast<ibv_mtu>(std::min<int>(info.mtu, port.active_mtu));
  a.dest_qp_num = info.qpn;
  a.rq_psn = info.psn;
  a.max_dest_rd_atomic =
      static_cast<uint8_t>(std::clamp(shared_->device->attr().max_qp_rd_atom, 1, 16));
  a.min_rnr_timer = 12;
  a.ah_attr.port_num = port.port;
  if (port.is_roce() || peer_.link_layer == IBV_LINK_LAYER_ETHERNET) {
    a.ah_attr.is_global = 1;
    std::memcpy(a.ah_attr.grh.dgid.raw, peer_.gid.data(), 16);
    a.ah_attr.grh.sgid_index = static_cast<uint8_t>(port.gid_index);
    a.ah_attr.grh.hop_limit = 64;
  } else {
    a.ah_attr.dlid = peer_.lid;
  }
  if (int rc =
          ibv_modify_qp(qp_.get(), &a,
                        IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                            IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)) {
    return errno_status("ibv_modify_qp INIT->RTR", rc);
  }
  ibv_qp_attr r{};
  r.qp_state = IBV_QPS_RTS;
  r.timeout = 14;  // 4.096 us * 2^14 = 67 ms per try
  // 6, not 7: rxe (and some providers) treat 7 like rnr_retry 7, as "retry forever", and a
  // dead peer would then never be reported. 7 x 67 ms: a dead peer is seen in about 0.5 s.
  r.retry_cnt = 6;
  r.rnr_retry = 7;  // credits make RNR impossible; never give up on a slow receiver
  r.sq_psn = psn_;
  r.max_rd_atomic =
      static_cast<uint8_t>(std::clamp(shared_->device->attr().max_qp_init_rd_atom, 1, 16));
  if (int rc = ibv_modify_qp(qp_.get(), &r,
                             IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                 IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC)) {
    return errno_status("ibv_modify_qp RTR->RTS", rc);
  }
  remote_qpn_ = info.qpn;
  remote_psn_ = info.psn;
  MYELIN_LOG_DEBUG << "verbs: QP " << qp_->qp_num << " to " << peer_name_ << " in RTS: remote QPN "
                   << info.qpn << ", receive PSN " << info.psn << ", send PSN " << psn_;
  return set_remote_ring(info);
}

Status VerbsEndpoint::post_recvs(uint32_t n) {
  ibv_recv_wr wrs[kPostBatch];
  while (n > 0) {
    const uint32_t k = std::min(n, kPostBatch);
    for (uint32_t i = 0; i < k; ++i) {
      wrs[i] = ibv_recv_wr{};
      wrs[i].wr_id = kRecvWrId;
      wrs[i].sg_list = nullptr;
      wrs[i].num_sge = 0;  // WRITE WITH IMMEDIATE places data by rkey; the WR only carries imm
      wrs[i].next = i + 1 < k ? &wrs[i + 1] : nullptr;
    }
    ibv_recv_wr* bad = nullptr;
    if (int rc = ibv_post_recv(qp(), wrs, &bad)) return errno_status("ibv_post_recv", rc);
    n -= k;
  }
  return ok_status();
}

uint64_t VerbsEndpoint::peer_consumed() const noexcept {
  auto* word =
      reinterpret_cast<uint64_t*>(block_.data() + 2 * size_t{shared_->slots} * shared_->slot_size);
  // Pairs with the peer's RDMA WRITE of its consumed count (a DMA store, not a CPU one).
  return std::atomic_ref<uint64_t>(*word).load(std::memory_order_acquire);
}

uint32_t VerbsEndpoint::send_eager_limit() const noexcept {
  uint32_t slot = shared_->slot_size;
  if (have_remote_) slot = std::min(slot, peer_slot_size_);
  return slot - static_cast<uint32_t>(sizeof(RingHeader));
}

bool VerbsEndpoint::waiting_on_peer() const noexcept {
  if (!rdv_sends_.empty() || !inflight_.empty()) return true;
  for (const auto& [ch, q] : channels_) {
    if (!q.recvs.empty()) return true;
  }
  return false;
}

int64_t VerbsEndpoint::next_timer_ns() const noexcept {
  if (failed()) return kNoTimer;
  if (!established()) {
    int64_t t = connect_deadline_.is_never() ? kNoTimer : connect_deadline_.at_ns();
    if (shared_->mode == CmMode::kExchange) t = std::min(t, next_handshake_ns);
    return t;
  }
  // flush() probes once more than kKeepaliveNs passed without activity.
  return waiting_on_peer() ? last_activity_ns_ + kKeepaliveNs + 1 : kNoTimer;
}

bool VerbsEndpoint::has_postable_work() const noexcept {
  if (failed() || !established()) return false;
  if (recv_seq_ != consumed_reported_) return true;
  return !outgoing_.empty();
}

// ---- operations -----------------------------------------------------------------------------

void VerbsEndpoint::enqueue_ring(const RingHeader& h) {
  Outgoing o;
  o.kind = OpKind::kRing;
  o.header = h;
  o.what = h.type == static_cast<uint8_t>(MsgType::kFin)         ? "rendezvous FIN"
           : h.type == static_cast<uint8_t>(MsgType::kImmediate) ? "put immediate"
                                                                 : "rendezvous RTS";
  outgoing_.push_back(std::move(o));
}

Request VerbsEndpoint::send(uint32_t channel, const void* data, size_t size,
                            const MemoryRegion* region) {
  if (!status_.ok()) return Request::failed(status_);
  if (size > shared_->max_message) {
    return Request::failed(invalid_argument("send of ", size, " bytes exceeds max_message_size ",
                                            shared_->max_message));
  }
  if (size > 0 && data == nullptr) return Request::failed(invalid_argument("send: null buffer"));
  if (size <= send_eager_limit()) {
    Outgoing o;
    o.kind = OpKind::kRing;
    o.header.type = static_cast<uint8_t>(MsgType::kEager);
    o.header.channel = channel;
    o.header.size = size;
    o.what = "eager send";
    const auto* p = static_cast<const uint8_t*>(data);
    o.payload.assign(p, p + size);
    outgoing_.push_back(std::move(o));
    size_t posted = 0;
    post_outgoing(posted);
    if (!status_.ok()) return Request::failed(status_);
    if (outgoing_.empty()) return Request::completed(size);  // ours was the last one queued
    auto [req, state] = Request::make_pending();
    state->describe("send", channel, peer_label_);
    outgoing_.back().on_posted = std::move(state);
    return std::move(req);
  }
  // Rendezvous: the receiver reads straight from our buffer.
  MrPtr transient;
  auto key = local_key(data, size, region ? region->state().get() : nullptr, IBV_ACCESS_REMOTE_READ,
                       transient);
  if (!key.ok()) return Request::failed(std::move(key).status().with_context(op_context("send")));
  uint32_t rkey = 0;
  if (transient) {
    rkey = transient->rkey;
  } else {
    rkey = static_cast<VerbsRegistration*>(region->registration(Backend::kVerbs))->mr()->rkey;
  }
  const uint32_t id = next_rdv_id_++;
  auto [req, state] = Request::make_pending();
  state->describe("rendezvous send", channel, peer_label_);
  rdv_sends_[id] = RendezvousSend{std::move(state), size, std::move(transient)};
  RingHeader h;
  h.type = static_cast<uint8_t>(MsgType::kRts);
  h.channel = channel;
  h.size = size;
  h.addr = reinterpret_cast<uintptr_t>(data);
  h.rkey = rkey;
  h.id = id;
  enqueue_ring(h);
  size_t posted = 0;
  post_outgoing(posted);
  return std::move(req);
}

Request VerbsEndpoint::recv(uint32_t channel, void* data, size_t capacity,
                            const MemoryRegion* region) {
  if (!status_.ok()) return Request::failed(status_);
  if (capacity > 0 && data == nullptr)
    return Request::failed(invalid_argument("recv: null buffer"));
  ChannelQueues& q = channels_[channel];
  PostedRecv r{data, capacity, nullptr, region ? region->state() : nullptr};
  if (q.recvs.empty() && !q.arrived.empty()) {
    Arrived a = std::move(q.arrived.front());
    q.arrived.pop_front();
    if (a.header.type == static_cast<uint8_t>(MsgType::kEager)) {
      if (a.header.size > capacity) {
        return Request::failed(out_of_range("message of ", a.header.size,
                                            " bytes does not fit a receive buffer of ", capacity,
                                            " bytes on channel ", channel));
      }
      if (a.header.size > 0) std::memcpy(data, a.payload.data(), a.header.size);
      return Request::completed(a.header.size);
    }
    auto [req, state] = Request::make_pending();
    state->describe("recv", channel, peer_label_);
    r.request = std::move(state);
    start_rendezvous_read(a.header, r);
    size_t posted = 0;
    post_outgoing(posted);
    return std::move(req);
  }
  auto [req, state] = Request::make_pending();
  state->describe("recv", channel, peer_label_);
  r.request = std::move(state);
  q.recvs.push_back(std::move(r));
  return std::move(req);
}

Result<uint32_t> VerbsEndpoint::local_key(const void* p, size_t n, const RegionState* region,
                                          int access, MrPtr& transient) const {
  if (region != nullptr && region->valid) {
    const auto base = reinterpret_cast<uintptr_t>(region->data);
    const auto addr = reinterpret_cast<uintptr_t>(p);
    if (addr >= base && n <= region->size && addr - base <= region->size - n) {
      auto* reg = dynamic_cast<VerbsRegistration*>(region->registration(Backend::kVerbs));
      if (reg != nullptr && reg->device() == shared_->device.get()) return reg->mr()->lkey;
    }
  }
  // Not covered by a registration of ours: register for this operation only.
  transient.reset(ibv_reg_mr(shared_->device->pd(), const_cast<void*>(p), n, access));
  if (!transient) {
    return errno_status("ibv_reg_mr of " + std::to_string(n) + " bytes", errno,
                        StatusCode::kResourceExhausted);
  }
  return transient->lkey;
}

Request VerbsEndpoint::enqueue_rdma(OpKind kind, const void* local, size_t size,
                                    const RemoteKey& remote, uint64_t remote_offset,
                                    const MemoryRegion* local_region, bool for_put) {
  const char* what = for_put ? "put" : "get";
  if (!status_.ok()) return Request::failed(status_);
  auto rkey = parse_key_blob(remote.backend_blob(Backend::kVerbs));
  if (!rkey.ok()) return Request::failed(std::move(rkey).status().with_context(op_context(what)));
  if (!allows(remote.access(), for_put ? Access::kRemoteWrite : Access::kRemoteRead)) {
    return Request::failed(permission_denied(op_context(what), ": region ", remote.region_id(),
                                             " does not allow remote ",
                                             for_put ? "write" : "read"));
  }
  if (remote_offset > remote.length() || size > remote.length() - remote_offset) {
    return Request::failed(out_of_range(op_context(what), ": [", remote_offset, ", +", size,
                                        ") is outside region ", remote.region_id(), " of ",
                                        remote.length(), " bytes"));
  }
  if (size == 0) return Request::completed(0);
  if (local == nullptr) return Request::failed(invalid_argument(what, ": null buffer"));
  auto group = std::make_shared<OpGroup>();
  group->bytes = size;
  uint32_t lkey = 0;
  const bool use_inline = for_put && local_region == nullptr && size <= shared_->max_inline;
  if (!use_inline) {
    auto key = local_key(local, size, local_region ? local_region->state().get() : nullptr,
                         for_put ? 0 : IBV_ACCESS_LOCAL_WRITE, group->transient);
    if (!key.ok()) return Request::failed(std::move(key).status().with_context(op_context(what)));
    lkey = *key;
  }
  auto [req, state] = Request::make_pending();
  state->describe(what, 0, peer_label_);
  group->request = std::move(state);
  const uint64_t max_chunk = std::min<uint64_t>(
      shared_->device->port().max_msg_sz ? shared_->device->port().max_msg_sz : uint64_t{1} << 30,
      uint64_t{1} << 30);
  for (uint64_t off = 0; off < size; off += max_chunk) {
    Outgoing o;
    o.kind = kind;
    o.group = group;
    o.local_addr = reinterpret_cast<uintptr_t>(local) + off;
    o.lkey = lkey;
    o.length = static_cast<uint32_t>(std::min<uint64_t>(max_chunk, size - off));
    o.remote_addr = remote.address() + remote_offset + off;
    o.rkey = *rkey;
    o.inline_data = use_inline;
    o.what = what;
    ++group->pending;
    outgoing_.push_back(std::move(o));
  }
  size_t posted = 0;
  post_outgoing(posted);
  return std::move(req);
}

Request VerbsEndpoint::put(const void* local, size_t size, const RemoteKey& remote,
                           uint64_t remote_offset, const MemoryRegion* local_region) {
  return enqueue_rdma(OpKind::kWrite, local, size, remote, remote_offset, local_region, true);
}

Request VerbsEndpoint::put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                                          uint64_t remote_offset, uint32_t immediate,
                                          const MemoryRegion* local_region) {
  Request r = enqueue_rdma(OpKind::kWrite, local, size, remote, remote_offset, local_region, true);
  if (r.done() && !r.status().ok()) return r;
  RingHeader h;
  h.type = static_cast<uint8_t>(MsgType::kImmediate);
  h.channel = immediate;
  enqueue_ring(h);
  size_t posted = 0;
  post_outgoing(posted);
  return r;
}

Request VerbsEndpoint::get(void* local, size_t size, const RemoteKey& remote,
                           uint64_t remote_offset, const MemoryRegion* local_region) {
  return enqueue_rdma(OpKind::kRead, local, size, remote, remote_offset, local_region, false);
}

bool VerbsEndpoint::try_pop_immediate(uint32_t& value) {
  if (immediates_.empty()) return false;
  value = immediates_.front();
  immediates_.pop_front();
  return true;
}

// ---- posting --------------------------------------------------------------------------------

void VerbsEndpoint::fill_ring_wr(Outgoing& o, ibv_send_wr& wr, ibv_sge& sge) {
  const size_t slot_bytes = shared_->slot_size;
  const size_t ring_bytes = size_t{shared_->slots} * slot_bytes;
  uint8_t* staging = block_.data() + ring_bytes + (msg_sent_ % shared_->slots) * slot_bytes;
  std::memcpy(staging, &o.header, sizeof(RingHeader));
  if (!o.payload.empty())
    std::memcpy(staging + sizeof(RingHeader), o.payload.data(), o.payload.size());
  const uint32_t len = static_cast<uint32_t>(sizeof(RingHeader) + o.payload.size());
  sge.addr = reinterpret_cast<uintptr_t>(staging);
  sge.length = len;
  sge.lkey = block_.lkey();
  wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
  wr.imm_data = htonl(static_cast<uint32_t>(msg_sent_));
  wr.wr.rdma.remote_addr = ring_addr_ + (msg_sent_ % peer_slots_) * uint64_t{peer_slot_size_};
  wr.wr.rdma.rkey = ring_rkey_;
  if (len <= shared_->max_inline) wr.send_flags |= IBV_SEND_INLINE;
}

bool VerbsEndpoint::post_outgoing(size_t& posted) {
  if (failed() || !established() || outgoing_.empty()) return false;
  ibv_send_wr wrs[kPostBatch];
  ibv_sge sges[kPostBatch];
  RequestStateRef posted_reqs[kPostBatch];
  size_t eager_bytes[kPostBatch];
  uint64_t ring_plus1[kPostBatch];
  bool any = false;
  while (!outgoing_.empty()) {
    uint32_t n = 0;
    const uint64_t first_seq = wr_seq_;
    const uint64_t consumed = peer_consumed();
    while (n < kPostBatch && n < outgoing_.size()) {
      // Keep two WRs of room for credit returns and keepalives.
      if (wr_seq_ + n - wr_retired_ + 2 >= shared_->sq_depth) break;
      Outgoing& o = outgoing_[n];
      ibv_send_wr& wr = wrs[n];
      wr = ibv_send_wr{};
      wr.wr_id = wr_seq_ + n;
      wr.sg_list = &sges[n];
      wr.num_sge = 1;
      eager_bytes[n] = 0;
      ring_plus1[n] = 0;
      if (o.kind == OpKind::kRing) {
        const uint64_t m = msg_sent_;
        if (m >= consumed + peer_slots_ || m >= msg_retired_ + shared_->slots) break;
        if (o.payload.size() + sizeof(RingHeader) > peer_slot_size_) {
          // Queued before the peer's (smaller) slot size was known.
          if (o.on_posted) {
            o.on_posted->complete(
                invalid_argument("eager message of ", o.payload.size(),
                                 " bytes exceeds the peer's slot of ", peer_slot_size_, " bytes"),
                0);
          }
          outgoing_.erase(outgoing_.begin() + n);
          continue;
        }
        fill_ring_wr(o, wr, sges[n]);
        eager_bytes[n] = o.payload.size();
        ring_plus1[n] = ++msg_sent_;
      } else {
        sges[n].addr = o.local_addr;
        sges[n].length = o.length;
        sges[n].lkey = o.lkey;
        wr.opcode = o.kind == OpKind::kWrite ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
        wr.wr.rdma.remote_addr = o.remote_addr;
        wr.wr.rdma.rkey = o.rkey;
        if (o.inline_data) wr.send_flags |= IBV_SEND_INLINE;
      }
      const bool must_signal =
          o.group != nullptr || wr_seq_ + n - wr_last_signalled_ >= shared_->sq_depth / 4;
      if (must_signal) {
        wr.send_flags |= IBV_SEND_SIGNALED;
        wr_last_signalled_ = wr_seq_ + n;
      }
      wr.next = nullptr;
      if (n > 0) wrs[n - 1].next = &wr;
      ++n;
    }
    if (n == 0) break;
    // The last WR of every list is signalled, so everything posted eventually retires.
    if (!(wrs[n - 1].send_flags & IBV_SEND_SIGNALED)) {
      wrs[n - 1].send_flags |= IBV_SEND_SIGNALED;
      wr_last_signalled_ = wr_seq_ + n - 1;
    }
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(qp(), wrs, &bad)) {
      fail(errno_status(op_context("ibv_post_send"), rc, StatusCode::kPeerFailed));
      return any;
    }
    for (uint32_t i = 0; i < n; ++i) {
      Outgoing& o = outgoing_.front();
      inflight_.push_back(Inflight{first_seq + i, o.what, false, o.group, ring_plus1[i]});
      posted_reqs[i] = std::move(o.on_posted);
      outgoing_.pop_front();
    }
    wr_seq_ += n;
    posted += n;
    any = true;
    for (uint32_t i = 0; i < n; ++i) {
      if (posted_reqs[i]) posted_reqs[i]->complete(ok_status(), eager_bytes[i]);
      posted_reqs[i].reset();
    }
  }
  return any;
}

bool VerbsEndpoint::post_credit(bool probe) {
  if (failed() || !established()) return false;
  if (wr_seq_ - wr_retired_ + 1 >= shared_->sq_depth) return false;
  const bool use_inline = shared_->max_inline >= sizeof(uint64_t);
  if (!use_inline && credit_write_busy_) return false;
  uint64_t value = recv_seq_;
  auto* out_word = reinterpret_cast<uint64_t*>(
      block_.data() + 2 * size_t{shared_->slots} * shared_->slot_size + 64);
  ibv_sge sge{};
  sge.length = sizeof(uint64_t);
  if (use_inline) {
    sge.addr = reinterpret_cast<uintptr_t>(&value);
  } else {
    *out_word = value;
    sge.addr = reinterpret_cast<uintptr_t>(out_word);
    sge.lkey = block_.lkey();
  }
  ibv_send_wr wr{};
  wr.wr_id = wr_seq_;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.wr.rdma.remote_addr = credit_addr_;
  wr.wr.rdma.rkey = credit_rkey_;
  wr.send_flags = use_inline ? IBV_SEND_INLINE : 0;
  if (probe || !use_inline || wr_seq_ - wr_last_signalled_ >= shared_->sq_depth / 4) {
    wr.send_flags |= IBV_SEND_SIGNALED;
    wr_last_signalled_ = wr_seq_;
  }
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(qp(), &wr, &bad)) {
    fail(errno_status(op_context("ibv_post_send (credit)"), rc, StatusCode::kPeerFailed));
    return false;
  }
  inflight_.push_back(Inflight{wr_seq_, kCreditWhat, !use_inline, nullptr, 0});
  ++wr_seq_;
  if (!use_inline) credit_write_busy_ = true;
  consumed_reported_ = value;
  return true;
}

size_t VerbsEndpoint::flush() {
  if (failed()) return 0;
  const int64_t now = monotonic_ns();
  if (!established()) {
    if (connect_deadline_.expired()) {
      fail(peer_failed("verbs: connecting to ", peer_name_, " (", cm_mode_name(shared_->mode),
                       " mode) got no answer before the deadline"));
    }
    return 0;
  }
  size_t posted = 0;
  post_outgoing(posted);
  if (recv_seq_ != consumed_reported_ && post_credit(false)) ++posted;
  // Keepalive: while we wait on the peer, probe the connection so a dead peer turns into a
  // retry-exceeded completion instead of a silent wait.
  if (waiting_on_peer() && now - last_activity_ns_ > kKeepaliveNs) {
    last_activity_ns_ = now;
    if (post_credit(true)) ++posted;
  }
  return posted;
}

// ---- completions ----------------------------------------------------------------------------

void VerbsEndpoint::on_completion(const ibv_wc& wc) {
  if (wc.wr_id == kRecvWrId) {
    if (wc.status != IBV_WC_SUCCESS) {
      if (!failed()) {
        fail(peer_failed(op_context("receive"), " failed: ", ibv_wc_status_str(wc.status),
                         " (status ", int{wc.status}, ", vendor error ", wc.vendor_err, ")"));
      }
      return;
    }
    if (failed()) return;
    last_activity_ns_ = monotonic_ns();
    set_peer_ready();  // the peer wrote to us, so its QP is in RTS and it knows ours
    if (wc.opcode != IBV_WC_RECV_RDMA_WITH_IMM ||
        ntohl(wc.imm_data) != static_cast<uint32_t>(recv_seq_)) {
      fail(protocol_error(op_context("receive"), ": expected ring message ",
                          static_cast<uint32_t>(recv_seq_), ", got opcode ", int{wc.opcode},
                          " immediate ", ntohl(wc.imm_data)));
      return;
    }
    handle_ring_message();
    if (Status st = post_recvs(1); !st.ok())
      fail(std::move(st).with_context(op_context("receive")));
    return;
  }
  Status error;
  if (wc.status != IBV_WC_SUCCESS) {
    const char* what = "operation";
    for (const Inflight& f : inflight_) {
      if (f.wr_seq == wc.wr_id) {
        what = f.what;
        break;
      }
    }
    error = peer_failed(op_context(what), " failed: ", ibv_wc_status_str(wc.status), " (status ",
                        int{wc.status}, ", vendor error ", wc.vendor_err, ")");
    if (!failed()) fail(error);
  } else {
    last_activity_ns_ = monotonic_ns();
  }
  retire_through(wc.wr_id, failed() ? status_ : error);
}

void VerbsEndpoint::retire_through(uint64_t wr_seq, const Status& error) {
  while (!inflight_.empty() && inflight_.front().wr_seq <= wr_seq) {
    Inflight f = std::move(inflight_.front());
    inflight_.pop_front();
    wr_retired_ = f.wr_seq + 1;
    if (f.ring_seq_plus1 > msg_retired_) msg_retired_ = f.ring_seq_plus1;
    if (f.credit_source) credit_write_busy_ = false;
    if (f.group) {
      if (!error.ok() && f.group->status.ok()) f.group->status = error;
      if (--f.group->pending == 0) finish_group(*f.group);
    }
  }
}

void VerbsEndpoint::finish_group(OpGroup& g) {
  const bool ok = g.status.ok();
  if (g.request) g.request->complete(g.status, ok ? g.bytes : 0);
  if (g.kind == OpGroup::Kind::kRendezvousRead && !failed()) {
    RingHeader fin;
    fin.type = static_cast<uint8_t>(MsgType::kFin);
    fin.id = g.rdv_id;
    fin.channel = ok ? 0 : 1;
    enqueue_ring(fin);
  }
  g.transient.reset();
}

void VerbsEndpoint::deliver(const RingHeader& h, const uint8_t* payload, PostedRecv& r) {
  if (h.size > r.capacity) {
    r.request->complete(
        out_of_range("message of ", h.size, " bytes does not fit a receive buffer of ", r.capacity,
                     " bytes on channel ", h.channel),
        0);
    return;
  }
  if (h.size > 0) std::memcpy(r.data, payload, h.size);
  r.request->complete(ok_status(), h.size);
}

void VerbsEndpoint::start_rendezvous_read(const RingHeader& h, PostedRecv& r) {
  RingHeader fin;
  fin.type = static_cast<uint8_t>(MsgType::kFin);
  fin.id = h.id;
  if (h.size > r.capacity) {
    r.request->complete(
        out_of_range("message of ", h.size, " bytes does not fit a receive buffer of ", r.capacity,
                     " bytes on channel ", h.channel),
        0);
    fin.channel = 1;
    enqueue_ring(fin);
    return;
  }
  auto group = std::make_shared<OpGroup>();
  group->kind = OpGroup::Kind::kRendezvousRead;
  group->request = r.request;
  group->bytes = h.size;
  group->rdv_id = h.id;
  auto key = local_key(r.data, h.size, r.region.get(), IBV_ACCESS_LOCAL_WRITE, group->transient);
  if (!key.ok()) {
    r.request->complete(std::move(key).status().with_context(op_context("rendezvous receive")), 0);
    fin.channel = 1;
    enqueue_ring(fin);
    return;
  }
  const uint64_t max_chunk = uint64_t{1} << 30;
  for (uint64_t off = 0; off < h.size; off += max_chunk) {
    Outgoing o;
    o.kind = OpKind::kRead;
    o.group = group;
    o.local_addr = reinterpret_cast<uintptr_t>(r.data) + off;
    o.lkey = *key;
    o.length = static_cast<uint32_t>(std::min<uint64_t>(max_chunk, h.size - off));
    o.remote_addr = h.addr + off;
    o.rkey = h.rkey;
    o.what = "rendezvous read";
    ++group->pending;
    outgoing_.push_back(std::move(o));
  }
}

void VerbsEndpoint::handle_ring_message() {
  const uint8_t* slot = block_.data() + (recv_seq_ % shared_->slots) * size_t{shared_->slot_size};
  ++recv_seq_;
  auto h = decode_header(slot, shared_->slot_size);
  if (!h.ok()) {
    fail(std::move(h).status().with_context(op_context("receive")));
    return;
  }
  const uint8_t* payload = slot + sizeof(RingHeader);
  switch (static_cast<MsgType>(h->type)) {
    case MsgType::kEager: {
      ChannelQueues& q = channels_[h->channel];
      if (!q.recvs.empty()) {
        PostedRecv r = std::move(q.recvs.front());
        q.recvs.pop_front();
        deliver(*h, payload, r);
      } else {
        q.arrived.push_back(Arrived{*h, std::vector<uint8_t>(payload, payload + h->size)});
      }
      break;
    }
    case MsgType::kRts: {
      ChannelQueues& q = channels_[h->channel];
      if (!q.recvs.empty()) {
        PostedRecv r = std::move(q.recvs.front());
        q.recvs.pop_front();
        start_rendezvous_read(*h, r);
      } else {
        q.arrived.push_back(Arrived{*h, {}});
      }
      break;
    }
    case MsgType::kFin: {
      auto it = rdv_sends_.find(h->id);
      if (it == rdv_sends_.end()) {
        fail(protocol_error(op_context("receive"), ": FIN for unknown rendezvous ", h->id));
        return;
      }
      it->second.request->complete(ok_status(), it->second.size);
      rdv_sends_.erase(it);
      break;
    }
    case MsgType::kImmediate:
      immediates_.push_back(h->channel);
      break;
  }
}

void VerbsEndpoint::fail(Status status) {
  if (!status_.ok()) return;
  status_ = std::move(status);
  if (status_.code() != StatusCode::kCancelled) MYELIN_LOG_WARN << status_.to_string();
  if (ibv_qp* q = qp()) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    (void)ibv_modify_qp(q, &a, IBV_QP_STATE);  // flushes everything still queued
  }
  for (Outgoing& o : outgoing_) {
    if (o.on_posted) o.on_posted->complete(status_, 0);
    if (o.group && o.group->request) o.group->request->complete(status_, 0);
  }
  outgoing_.clear();
  for (auto& [ch, q] : channels_) {
    for (PostedRecv& r : q.recvs) r.request->complete(status_, 0);
    q.recvs.clear();
  }
  for (auto& [id, s] : rdv_sends_) s.request->complete(status_, 0);
  // Keep the transient registrations of in-flight work until the flushed completions retire it.
  for (Inflight& f : inflight_) {
    if (f.group && f.group->request) f.group->request->complete(status_, 0);
  }
  rdv_sends_.clear();  // the QP is in ERR: the peer can no longer read these buffers
}

}  // namespace myelin::transport::internal::verbs
