// transport/src/verbs/verbs_backend.cpp — device set-up, wire-up (UD or rdma_cm), progress.
#include "verbs/verbs_backend.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string_view>
#include <unordered_map>

#include <myelin/core/log.hpp>

#include "verbs/verbs_device.hpp"
#include "verbs/verbs_endpoint.hpp"
#include "verbs/verbs_pool.hpp"
#include "verbs/verbs_wire.hpp"

namespace myelin::transport::internal {
namespace verbs {
namespace {

constexpr uint32_t kQkey = 0x4d594c4e;  // "MYLN": wire-up UD datagrams carry it
constexpr uint32_t kUdRecvSlots = 32;
constexpr uint32_t kUdSendSlots = 16;
constexpr size_t kUdSlotBytes = 1024;  // 40-byte GRH + payload (a handshake is < 200 bytes)
constexpr size_t kGrhBytes = 40;
constexpr uint64_t kUdSendTag = uint64_t{1} << 63;
constexpr int64_t kHandshakeRetryNs = 200'000'000;
constexpr int kCmTimeoutMs = 5000;
constexpr char kTieMarker[4] = {'T', 'I', 'E', 'B'};
static_assert(kUdSlotBytes > kGrhBytes + 256, "UD slots hold a GRH and a handshake");

Status set_nonblocking(int fd, const char* what) {
  const int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return errno_status(what, errno);
  return ok_status();
}

std::string hex_token(uint64_t t) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(t));
  return buf;
}

Result<CmMode> cm_mode_from_env() {
  const char* env = std::getenv("MYELIN_VERBS_CM");
  if (env == nullptr || *env == 0 || std::string_view(env) == "exchange") return CmMode::kExchange;
  if (std::string_view(env) == "rdmacm") return CmMode::kRdmaCm;
  return invalid_argument("MYELIN_VERBS_CM='", env, "' (expected exchange or rdmacm)");
}

sockaddr_storage make_sockaddr(const VerbsAddress& a, uint16_t port) {
  sockaddr_storage ss{};
  if (a.ip_family == 4) {
    auto* in = reinterpret_cast<sockaddr_in*>(&ss);
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
    std::memcpy(&in->sin_addr, a.ip.data(), 4);
  } else {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    std::memcpy(&in6->sin6_addr, a.ip.data(), 16);
  }
  return ss;
}

class VerbsBackend final : public BackendContext {
 public:
  VerbsBackend(const Options& options, const ContextInfo& info) : options_(options), info_(info) {}
  ~VerbsBackend() override {
    unclaimed_.clear();  // before the wire-up QP, listener and shared state they use
  }

  Status init();

  [[nodiscard]] Backend kind() const noexcept override { return Backend::kVerbs; }
  [[nodiscard]] Limits limits() const noexcept override {
    Limits l;
    l.max_inline = rc_inline_ > sizeof(RingHeader) ? rc_inline_ - sizeof(RingHeader) : 0;
    l.eager_limit = shared_->slot_size - sizeof(RingHeader);
    l.max_message = shared_->max_message;
    return l;
  }
  [[nodiscard]] std::vector<uint8_t> local_address() const override {
    return shared_->address_bytes;
  }
  Result<std::unique_ptr<Endpoint>> connect(std::span<const uint8_t> peer_address,
                                            const std::string& peer_name,
                                            Deadline deadline) override;
  Result<std::unique_ptr<BackendRegistration>> register_memory(const RegionState& region) override;
  size_t progress() override;
  [[nodiscard]] int wait_fd() const noexcept override { return epoll_.get(); }
  bool arm_wait() override;

 private:
  Status init_ud();
  Status init_listener();
  void send_handshake(VerbsEndpoint& ep);
  void on_ud_completion(const ibv_wc& wc);
  void on_handshake(const ConnectInfo& info);
  size_t poll_cq();
  size_t drain_async();
  size_t drain_cm();
  void on_cm_event(rdma_cm_event_type type, rdma_cm_id* id, rdma_cm_id* listen_id, int status,
                   const std::vector<uint8_t>& data);
  Status accept_incoming(rdma_cm_id* raw_id, const std::vector<uint8_t>& data);
  Status start_cm_connect(VerbsEndpoint& ep);
  rdma_conn_param conn_param(const std::vector<uint8_t>& private_data) const;

  Options options_;
  ContextInfo info_;
  std::shared_ptr<Shared> shared_;  // first: released after everything below
  uint32_t rc_inline_ = 0;
  // Exchange mode wire-up.
  std::unique_ptr<uint8_t, decltype(&std::free)> ud_buf_{nullptr, &std::free};
  MrPtr ud_mr_;
  QpPtr ud_qp_;
  std::vector<uint32_t> ud_free_send_;
  // rdmacm mode.
  CmIdPtr listener_;
  Fd epoll_;
  // Blocking waits: wakes the wait at the earliest endpoint timer (handshake retransmission,
  // connect deadline, keepalive), so nothing timer-driven depends on a completion arriving.
  Fd timer_;
  int64_t timer_at_ns_ = 0;  // when the armed timer fires; 0 = not armed
  std::unordered_map<uint64_t, std::unique_ptr<VerbsEndpoint>> unclaimed_;
};

Status VerbsBackend::init() {
  MYELIN_ASSIGN_OR_RETURN(const CmMode mode, cm_mode_from_env());
  MYELIN_ASSIGN_OR_RETURN(auto device, Device::open(options_.device, mode == CmMode::kRdmaCm));
  shared_ = std::make_shared<Shared>();
  Shared& s = *shared_;
  s.device = device;
  s.mode = mode;
  s.self_name = info_.name;
  s.max_message = options_.max_message_size;
  if (options_.eager_limit != 0) {
    const size_t want = (options_.eager_limit + sizeof(RingHeader) + 63) / 64 * 64;
    if (want > (size_t{1} << 20)) {
      return invalid_argument("verbs: eager_limit ", options_.eager_limit, " exceeds 1 MiB");
    }
    s.slot_size = static_cast<uint32_t>(std::max<size_t>(want, 256));
  }
  s.sq_depth = std::min<uint32_t>(kSendQueueDepth, static_cast<uint32_t>(device->attr().max_qp_wr));
  s.channel.reset(ibv_create_comp_channel(device->context()));
  if (!s.channel) return errno_status("ibv_create_comp_channel", errno);
  MYELIN_RETURN_IF_ERROR(set_nonblocking(s.channel->fd, "completion channel O_NONBLOCK"));
  const int cqe = std::min(4096, device->attr().max_cqe);
  s.cq.reset(ibv_create_cq(device->context(), cqe, nullptr, s.channel.get(), 0));
  if (!s.cq) return errno_status("ibv_create_cq", errno, StatusCode::kResourceExhausted);
  s.cq_capacity = s.cq->cqe;
  MYELIN_RETURN_IF_ERROR(set_nonblocking(device->context()->async_fd, "async fd O_NONBLOCK"));
  const int numa = options_.numa_node >= 0 ? options_.numa_node : device->numa_node();
  s.pool = BlockPool::create(device, 2 * size_t{s.slots} * s.slot_size + 128, numa);
  std::random_device rd;
  do {
    s.token = (uint64_t{rd()} << 32) | rd();
  } while (s.token == 0);

  // Learn the inline size the device grants an RC QP like ours.
  {
    ibv_qp_init_attr a{};
    a.send_cq = a.recv_cq = s.cq.get();
    a.qp_type = IBV_QPT_RC;
    a.cap.max_send_wr = s.sq_depth;
    a.cap.max_recv_wr = s.slots;
    a.cap.max_send_sge = a.cap.max_recv_sge = 1;
    a.cap.max_inline_data = kMaxInlineWanted;
    QpPtr probe(ibv_create_qp(device->pd(), &a));
    rc_inline_ = probe ? a.cap.max_inline_data : 0;
    s.max_inline = rc_inline_;
  }

  const PortChoice& port = device->port();
  VerbsAddress& addr = s.address;
  addr.mode = mode;
  addr.link_layer = port.link_layer;
  addr.port = port.port;
  addr.mtu = static_cast<uint8_t>(port.active_mtu);
  addr.lid = port.lid;
  std::memcpy(addr.gid.data(), port.gid.raw, 16);
  addr.token = s.token;
  if (mode == CmMode::kExchange) {
    MYELIN_RETURN_IF_ERROR(init_ud());
  } else {
    MYELIN_RETURN_IF_ERROR(init_listener());
  }
  s.address_bytes = addr.serialize();

  epoll_ = Fd(epoll_create1(EPOLL_CLOEXEC));
  if (epoll_.get() < 0) return errno_status("epoll_create1", errno);
  timer_ = Fd(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (timer_.get() < 0) return errno_status("timerfd_create", errno);
  int fds[4] = {s.channel->fd, device->context()->async_fd, s.cm_channel ? s.cm_channel->fd : -1,
                timer_.get()};
  for (int fd : fds) {
    if (fd < 0) continue;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      return errno_status("epoll_ctl", errno);
  }
  MYELIN_LOG_INFO << "verbs: " << port.reason << ", " << cm_mode_name(mode) << " connection mode, "
                  << "eager pool on "
                  << (numa >= 0 ? "NUMA node " + std::to_string(numa) : "any node") << ", inline "
                  << rc_inline_ << " B";
  return ok_status();
}

Status VerbsBackend::init_ud() {
  Shared& s = *shared_;
  const size_t bytes = (kUdRecvSlots + kUdSendSlots) * kUdSlotBytes;
  ud_buf_.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, bytes)));
  if (!ud_buf_) return resource_exhausted("verbs: wire-up buffers");
  ud_mr_.reset(ibv_reg_mr(s.device->pd(), ud_buf_.get(), bytes, IBV_ACCESS_LOCAL_WRITE));
  if (!ud_mr_) return errno_status("ibv_reg_mr (wire-up buffers)", errno);
  MYELIN_RETURN_IF_ERROR(s.reserve_cq(static_cast<int>(kUdRecvSlots + kUdSendSlots)));
  ibv_qp_init_attr a{};
  a.send_cq = a.recv_cq = s.cq.get();
  a.qp_type = IBV_QPT_UD;
  a.cap.max_send_wr = kUdSendSlots;
  a.cap.max_recv_wr = kUdRecvSlots;
  a.cap.max_send_sge = a.cap.max_recv_sge = 1;
  ud_qp_.reset(ibv_create_qp(s.device->pd(), &a));
  if (!ud_qp_) return errno_status("ibv_create_qp (UD wire-up)", errno);
  ibv_qp_attr q{};
  q.qp_state = IBV_QPS_INIT;
  q.pkey_index = 0;
  q.port_num = s.device->port().port;
  q.qkey = kQkey;
  if (int rc = ibv_modify_qp(ud_qp_.get(), &q,
                             IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY)) {
    return errno_status("ibv_modify_qp UD RESET->INIT", rc);
  }
  q = ibv_qp_attr{};
  q.qp_state = IBV_QPS_RTR;
  if (int rc = ibv_modify_qp(ud_qp_.get(), &q, IBV_QP_STATE)) {
    return errno_status("ibv_modify_qp UD INIT->RTR", rc);
  }
  q = ibv_qp_attr{};
  q.qp_state = IBV_QPS_RTS;
  q.sq_psn = 0;
  if (int rc = ibv_modify_qp(ud_qp_.get(), &q, IBV_QP_STATE | IBV_QP_SQ_PSN)) {
    return errno_status("ibv_modify_qp UD RTR->RTS", rc);
  }
  for (uint32_t i = 0; i < kUdRecvSlots; ++i) {
    ibv_sge sge{reinterpret_cast<uintptr_t>(ud_buf_.get() + i * kUdSlotBytes),
                static_cast<uint32_t>(kUdSlotBytes), ud_mr_->lkey};
    ibv_recv_wr wr{};
    wr.wr_id = i;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    if (int rc = ibv_post_recv(ud_qp_.get(), &wr, &bad))
      return errno_status("ibv_post_recv (UD)", rc);
  }
  for (uint32_t i = 0; i < kUdSendSlots; ++i) ud_free_send_.push_back(kUdRecvSlots + i);
  s.address.ud_qpn = ud_qp_->qp_num;
  return ok_status();
}

Status VerbsBackend::init_listener() {
  Shared& s = *shared_;
  const PortChoice& port = s.device->port();
  VerbsAddress& addr = s.address;
  const char* override_addr = std::getenv("MYELIN_VERBS_CM_ADDR");
  if (override_addr != nullptr && *override_addr != 0) {
    if (inet_pton(AF_INET, override_addr, addr.ip.data()) == 1) {
      addr.ip_family = 4;
    } else if (inet_pton(AF_INET6, override_addr, addr.ip.data()) == 1) {
      addr.ip_family = 6;
    } else {
      return invalid_argument("MYELIN_VERBS_CM_ADDR='", override_addr, "' is not an IP address");
    }
  } else if (port.is_roce()) {
    bool mapped = true;
    for (int i = 0; i < 10; ++i) mapped = mapped && port.gid.raw[i] == 0;
    mapped = mapped && port.gid.raw[10] == 0xff && port.gid.raw[11] == 0xff;
    if (mapped) {
      addr.ip_family = 4;
      std::memcpy(addr.ip.data(), port.gid.raw + 12, 4);
    } else {
      addr.ip_family = 6;
      std::memcpy(addr.ip.data(), port.gid.raw, 16);
    }
  } else {
    return failed_precondition("verbs rdmacm mode on InfiniBand needs the IPoIB address of ",
                               s.device->name(), ": set MYELIN_VERBS_CM_ADDR");
  }
  s.cm_channel.reset(rdma_create_event_channel());
  if (!s.cm_channel)
    return errno_status("rdma_create_event_channel", errno, StatusCode::kUnavailable);
  MYELIN_RETURN_IF_ERROR(set_nonblocking(s.cm_channel->fd, "rdma_cm channel O_NONBLOCK"));
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(s.cm_channel.get(), &raw, nullptr, RDMA_PS_TCP) != 0) {
    return errno_status("rdma_create_id (listener)", errno);
  }
  listener_.reset(raw);
  sockaddr_storage ss = make_sockaddr(addr, 0);
  if (rdma_bind_addr(raw, reinterpret_cast<sockaddr*>(&ss)) != 0) {
    return errno_status("rdma_bind_addr", errno, StatusCode::kUnavailable);
  }
  if (rdma_listen(raw, 128) != 0) return errno_status("rdma_listen", errno);
  addr.cm_port = ntohs(rdma_get_src_port(raw));
  return ok_status();
}

rdma_conn_param VerbsBackend::conn_param(const std::vector<uint8_t>& private_data) const {
  rdma_conn_param p{};
  p.private_data = private_data.data();
  p.private_data_len = static_cast<uint8_t>(private_data.size());
  p.responder_resources =
      static_cast<uint8_t>(std::clamp(shared_->device->attr().max_qp_rd_atom, 1, 16));
  p.initiator_depth =
      static_cast<uint8_t>(std::clamp(shared_->device->attr().max_qp_init_rd_atom, 1, 16));
  p.retry_count = 6;  // see apply_remote(): 7 means "forever" on rxe
  p.rnr_retry_count = 7;
  return p;
}

Result<std::unique_ptr<Endpoint>> VerbsBackend::connect(std::span<const uint8_t> peer_address,
                                                        const std::string& peer_name,
                                                        Deadline deadline) {
  MYELIN_ASSIGN_OR_RETURN(VerbsAddress peer, VerbsAddress::parse(peer_address));
  Shared& s = *shared_;
  if (!s.device_status.ok()) return s.device_status;
  if (peer.mode != s.mode) {
    return invalid_argument("verbs: ", peer_name, " uses ", cm_mode_name(peer.mode),
                            " connection mode, this Context ", cm_mode_name(s.mode),
                            " (set MYELIN_VERBS_CM alike on both)");
  }
  if (peer.token == s.token) {
    return invalid_argument("verbs: a Context cannot connect to itself over verbs");
  }
  if (auto it = unclaimed_.find(peer.token); it != unclaimed_.end()) {
    std::unique_ptr<VerbsEndpoint> ep = std::move(it->second);
    unclaimed_.erase(it);
    ep->set_name(peer_name);
    return std::unique_ptr<Endpoint>(std::move(ep));
  }
  if (s.by_token.count(peer.token) != 0) {
    return already_exists("verbs: already connected to ", peer_name);
  }
  auto ep = std::make_unique<VerbsEndpoint>(shared_, peer.token, peer, peer_name, deadline);
  if (s.mode == CmMode::kExchange) {
    MYELIN_RETURN_IF_ERROR(ep->init_exchange());
    s.by_token[peer.token] = ep.get();
    send_handshake(*ep);
  } else {
    s.by_token[peer.token] = ep.get();
    if (Status st = start_cm_connect(*ep); !st.ok()) {
      s.by_token.erase(peer.token);
      return std::move(st).with_context("verbs: connecting to " + peer_name);
    }
  }
  return std::unique_ptr<Endpoint>(std::move(ep));
}

Status VerbsBackend::start_cm_connect(VerbsEndpoint& ep) {
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(shared_->cm_channel.get(), &raw, &ep, RDMA_PS_TCP) != 0) {
    return errno_status("rdma_create_id", errno);
  }
  CmIdPtr id(raw);
  sockaddr_storage src = make_sockaddr(shared_->address, 0);
  sockaddr_storage dst = make_sockaddr(ep.peer_address(), ep.peer_address().cm_port);
  if (rdma_resolve_addr(raw, reinterpret_cast<sockaddr*>(&src), reinterpret_cast<sockaddr*>(&dst),
                        kCmTimeoutMs) != 0) {
    return errno_status("rdma_resolve_addr", errno, StatusCode::kUnavailable);
  }
  ep.set_connecting_id(std::move(id));
  return ok_status();
}

Result<std::unique_ptr<BackendRegistration>> VerbsBackend::register_memory(
    const RegionState& region) {
  if (region.kind != MemoryKind::kHost) {
    return unsupported("verbs: only host memory can be registered (no GPUDirect support yet)");
  }
  int access = IBV_ACCESS_LOCAL_WRITE;
  if (allows(region.access, Access::kRemoteRead)) access |= IBV_ACCESS_REMOTE_READ;
  if (allows(region.access, Access::kRemoteWrite)) access |= IBV_ACCESS_REMOTE_WRITE;
  MrPtr mr(ibv_reg_mr(shared_->device->pd(), region.data, region.size, access));
  if (!mr) {
    return errno_status(
        "ibv_reg_mr of " + std::to_string(region.size) + " bytes on " + shared_->device->name(),
        errno, StatusCode::kResourceExhausted);
  }
  return std::unique_ptr<BackendRegistration>(
      std::make_unique<VerbsRegistration>(shared_->device, std::move(mr)));
}

// ---- exchange-mode wire-up ------------------------------------------------------------------

void VerbsBackend::send_handshake(VerbsEndpoint& ep) {
  ep.next_handshake_ns = monotonic_ns() + kHandshakeRetryNs;
  if (ud_free_send_.empty()) return;  // retried by the timer
  if (ep.ud_ah() == nullptr) {
    const VerbsAddress& peer = ep.peer_address();
    const PortChoice& port = shared_->device->port();
    ibv_ah_attr ah{};
    ah.port_num = port.port;
    if (port.is_roce() || peer.link_layer == IBV_LINK_LAYER_ETHERNET) {
      ah.is_global = 1;
      std::memcpy(ah.grh.dgid.raw, peer.gid.data(), 16);
      ah.grh.sgid_index = static_cast<uint8_t>(port.gid_index);
      ah.grh.hop_limit = 64;
    } else {
      ah.dlid = peer.lid;
    }
    AhPtr created(ibv_create_ah(shared_->device->pd(), &ah));
    if (!created) {
      ep.fail(errno_status("verbs: ibv_create_ah for " + ep.peer_name(), errno,
                           StatusCode::kPeerFailed));
      return;
    }
    ep.set_ud_ah(std::move(created));
  }
  ConnectInfo info = ep.local_info();
  info.flags = static_cast<uint8_t>((ep.has_remote() ? ConnectInfo::kHaveInfo : 0) |
                                    (ep.peer_ready() ? ConnectInfo::kReady : 0));
  info.sender_address = shared_->address_bytes;
  const std::vector<uint8_t> bytes = info.serialize(false);
  const uint32_t slot = ud_free_send_.back();
  ud_free_send_.pop_back();
  uint8_t* buf = ud_buf_.get() + slot * kUdSlotBytes;
  std::memcpy(buf, bytes.data(), bytes.size());
  ibv_sge sge{reinterpret_cast<uintptr_t>(buf), static_cast<uint32_t>(bytes.size()), ud_mr_->lkey};
  ibv_send_wr wr{};
  wr.wr_id = kUdSendTag | slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.ud.ah = ep.ud_ah();
  wr.wr.ud.remote_qpn = ep.peer_address().ud_qpn;
  wr.wr.ud.remote_qkey = kQkey;
  MYELIN_LOG_DEBUG << "verbs: wire-up to " << ep.peer_name() << " (UD QPN "
                   << ep.peer_address().ud_qpn << "): RC QPN " << info.qpn << ", PSN " << info.psn
                   << ", flags " << int{info.flags};
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(ud_qp_.get(), &wr, &bad)) {
    ud_free_send_.push_back(slot);
    MYELIN_LOG_WARN << "verbs: wire-up send to " << ep.peer_name()
                    << " failed: " << std::strerror(rc);
  }
}

void VerbsBackend::on_ud_completion(const ibv_wc& wc) {
  if (wc.wr_id & kUdSendTag) {
    ud_free_send_.push_back(static_cast<uint32_t>(wc.wr_id & ~kUdSendTag));
    if (wc.status != IBV_WC_SUCCESS) {
      MYELIN_LOG_WARN << "verbs: wire-up datagram failed: " << ibv_wc_status_str(wc.status);
    }
    return;
  }
  const auto slot = static_cast<uint32_t>(wc.wr_id);
  if (wc.status != IBV_WC_SUCCESS) {
    if (wc.status != IBV_WC_WR_FLUSH_ERR) {
      MYELIN_LOG_WARN << "verbs: wire-up receive failed: " << ibv_wc_status_str(wc.status);
    }
    return;
  }
  uint8_t* buf = ud_buf_.get() + slot * kUdSlotBytes;
  std::vector<uint8_t> payload;
  if (wc.byte_len > kGrhBytes && wc.byte_len <= kUdSlotBytes) {
    payload.assign(buf + kGrhBytes, buf + wc.byte_len);
  }
  ibv_sge sge{reinterpret_cast<uintptr_t>(buf), static_cast<uint32_t>(kUdSlotBytes), ud_mr_->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  if (int rc = ibv_post_recv(ud_qp_.get(), &wr, &bad)) {
    MYELIN_LOG_ERROR << "verbs: re-posting a wire-up receive failed: " << std::strerror(rc);
  }
  auto info = ConnectInfo::parse(payload, false);
  if (!info.ok()) {
    MYELIN_LOG_WARN << "verbs: dropping a malformed wire-up datagram: " << info.status();
    return;
  }
  on_handshake(*info);
}

void VerbsBackend::on_handshake(const ConnectInfo& info) {
  Shared& s = *shared_;
  MYELIN_LOG_DEBUG << "verbs: wire-up from " << hex_token(info.src_token) << " to "
                   << hex_token(info.dst_token) << ": RC QPN " << info.qpn << ", PSN " << info.psn
                   << ", flags " << int{info.flags};
  if (info.dst_token != s.token) return;  // meant for an earlier incarnation
  VerbsEndpoint* ep = nullptr;
  if (auto it = s.by_token.find(info.src_token); it != s.by_token.end()) {
    ep = it->second;
  } else {
    auto peer = VerbsAddress::parse(info.sender_address);
    if (!peer.ok() || peer->token != info.src_token || peer->mode != CmMode::kExchange) {
      MYELIN_LOG_WARN << "verbs: wire-up request with a bad sender address dropped";
      return;
    }
    auto created = std::make_unique<VerbsEndpoint>(shared_, info.src_token, *peer,
                                                   "verbs peer " + hex_token(info.src_token),
                                                   Deadline::never());
    if (Status st = created->init_exchange(); !st.ok()) {
      MYELIN_LOG_WARN << "verbs: accepting a connection failed: " << st;
      return;
    }
    ep = created.get();
    s.by_token[info.src_token] = ep;
    unclaimed_[info.src_token] = std::move(created);
  }
  if (ep->failed()) return;
  if (!ep->has_remote()) {
    if (Status st = ep->apply_remote(info); !st.ok()) {
      ep->fail(peer_failed("verbs: bringing up the QP to ", ep->peer_name(), ": ", st.to_string()));
      return;
    }
  } else if (!ep->same_remote(info)) {
    // Another QP of the same peer backend (an earlier endpoint it closed, or a new one it made
    // after closing ours): its flags say nothing about the QP ours is connected to.
    MYELIN_LOG_DEBUG << "verbs: ignoring wire-up from " << ep->peer_name() << " for RC QPN "
                     << info.qpn << ": connected to another QP of that peer";
    return;
  }
  if (info.flags & ConnectInfo::kHaveInfo) ep->set_peer_ready();
  if (!(info.flags & ConnectInfo::kReady)) send_handshake(*ep);
}

// ---- rdmacm mode ----------------------------------------------------------------------------

size_t VerbsBackend::drain_cm() {
  if (!shared_->cm_channel) return 0;
  size_t n = 0;
  rdma_cm_event* ev = nullptr;
  while (rdma_get_cm_event(shared_->cm_channel.get(), &ev) == 0) {
    const rdma_cm_event_type type = ev->event;
    rdma_cm_id* id = ev->id;
    rdma_cm_id* listen_id = ev->listen_id;
    const int status = ev->status;
    std::vector<uint8_t> data;
    if (ev->param.conn.private_data != nullptr) {
      const auto* p = static_cast<const uint8_t*>(ev->param.conn.private_data);
      data.assign(p, p + ev->param.conn.private_data_len);
    }
    rdma_ack_cm_event(ev);  // before any rdma_destroy_id below, which waits for acks
    on_cm_event(type, id, listen_id, status, data);
    ++n;
  }
  return n;
}

Status VerbsBackend::accept_incoming(rdma_cm_id* raw_id, const std::vector<uint8_t>& data) {
  CmIdPtr id(raw_id);
  Shared& s = *shared_;
  auto info = ConnectInfo::parse(data, true);
  if (!info.ok()) {
    rdma_reject(raw_id, nullptr, 0);
    return info.status();
  }
  VerbsEndpoint* ep = nullptr;
  if (auto it = s.by_token.find(info->src_token); it != s.by_token.end()) {
    ep = it->second;
    if (ep->has_remote() || ep->failed()) {
      rdma_reject(raw_id, nullptr, 0);
      return already_exists("duplicate connection request from ", ep->peer_name());
    }
    if (s.token < info->src_token) {  // our own attempt wins
      rdma_reject(raw_id, kTieMarker, sizeof kTieMarker);
      return ok_status();
    }
    ep->drop_cm_id();  // theirs wins: the peer rejects ours
  } else {
    VerbsAddress peer;
    peer.mode = CmMode::kRdmaCm;
    peer.token = info->src_token;
    auto created = std::make_unique<VerbsEndpoint>(shared_, info->src_token, peer,
                                                   "verbs peer " + hex_token(info->src_token),
                                                   Deadline::never());
    ep = created.get();
    s.by_token[info->src_token] = ep;
    unclaimed_[info->src_token] = std::move(created);
  }
  if (Status st = ep->init_rdma_cm(std::move(id)); !st.ok()) {
    ep->fail(peer_failed("verbs: accepting ", ep->peer_name(), ": ", st.to_string()));
    return ok_status();
  }
  (void)ep->set_remote_ring(*info);
  const std::vector<uint8_t> mine = ep->local_info().serialize(true);
  rdma_conn_param p = conn_param(mine);
  if (rdma_accept(ep->cm_id(), &p) != 0) {
    ep->fail(
        errno_status("verbs: rdma_accept for " + ep->peer_name(), errno, StatusCode::kPeerFailed));
  }
  return ok_status();
}

void VerbsBackend::on_cm_event(rdma_cm_event_type type, rdma_cm_id* id, rdma_cm_id* listen_id,
                               int status, const std::vector<uint8_t>& data) {
  if (type == RDMA_CM_EVENT_CONNECT_REQUEST) {
    (void)listen_id;
    if (Status st = accept_incoming(id, data); !st.ok()) {
      MYELIN_LOG_WARN << "verbs: refused a connection request: " << st;
    }
    return;
  }
  if (id == listener_.get()) {
    if (type == RDMA_CM_EVENT_DEVICE_REMOVAL) {
      shared_->device_status = device_failed("verbs: device ", shared_->device->name(), " removed");
      for (auto& [t, ep] : shared_->by_token) ep->fail(shared_->device_status);
    }
    return;
  }
  auto* ep = static_cast<VerbsEndpoint*>(id->context);
  if (ep == nullptr || ep->failed()) return;
  switch (type) {
    case RDMA_CM_EVENT_ADDR_RESOLVED:
      if (rdma_resolve_route(id, kCmTimeoutMs) != 0) {
        ep->fail(errno_status("verbs: rdma_resolve_route to " + ep->peer_name(), errno,
                              StatusCode::kPeerFailed));
      }
      return;
    case RDMA_CM_EVENT_ROUTE_RESOLVED: {
      if (Status st = ep->init_rdma_cm(ep->take_cm_id()); !st.ok()) {
        ep->fail(peer_failed("verbs: connecting to ", ep->peer_name(), ": ", st.to_string()));
        return;
      }
      const std::vector<uint8_t> mine = ep->local_info().serialize(true);
      rdma_conn_param p = conn_param(mine);
      if (rdma_connect(ep->cm_id(), &p) != 0) {
        ep->fail(errno_status("verbs: rdma_connect to " + ep->peer_name(), errno,
                              StatusCode::kPeerFailed));
      }
      return;
    }
    case RDMA_CM_EVENT_ESTABLISHED:
      if (!ep->has_remote()) {
        auto info = ConnectInfo::parse(data, true);
        if (!info.ok()) {
          ep->fail(peer_failed("verbs: ", ep->peer_name(),
                               " accepted with bad private data: ", info.status().to_string()));
          return;
        }
        (void)ep->set_remote_ring(*info);
      }
      ep->set_peer_ready();
      return;
    case RDMA_CM_EVENT_REJECTED:
      if (data.size() >= sizeof kTieMarker && std::memcmp(data.data(), kTieMarker, 4) == 0) {
        ep->drop_cm_id();  // lost a simultaneous connect; the peer's request is on its way
        return;
      }
      ep->fail(peer_failed("verbs: ", ep->peer_name(), " rejected the connection (",
                           rdma_event_str(type), ", status ", status, ")"));
      return;
    case RDMA_CM_EVENT_TIMEWAIT_EXIT:
      return;
    default:
      ep->fail(peer_failed("verbs: connection to ", ep->peer_name(), ": ", rdma_event_str(type),
                           " (status ", status, ")"));
      return;
  }
}

// ---- progress -------------------------------------------------------------------------------

size_t VerbsBackend::poll_cq() {
  Shared& s = *shared_;
  // Acknowledge completion-channel events so ibv_destroy_cq never waits on them.
  ibv_cq* ev_cq = nullptr;
  void* ev_ctx = nullptr;
  unsigned events = 0;
  while (ibv_get_cq_event(s.channel.get(), &ev_cq, &ev_ctx) == 0) ++events;
  if (events > 0) ibv_ack_cq_events(s.cq.get(), events);
  size_t total = 0;
  ibv_wc wcs[kPollBatch];
  for (int round = 0; round < 8; ++round) {
    const int n = ibv_poll_cq(s.cq.get(), kPollBatch, wcs);
    if (n < 0) {
      s.device_status = device_failed("verbs: ibv_poll_cq failed on ", s.device->name());
      for (auto& [t, ep] : s.by_token) ep->fail(s.device_status);
      return total;
    }
    for (int i = 0; i < n; ++i) {
      const ibv_wc& wc = wcs[i];
      if (ud_qp_ && wc.qp_num == ud_qp_->qp_num) {
        on_ud_completion(wc);
      } else if (auto it = s.by_qpn.find(wc.qp_num); it != s.by_qpn.end()) {
        it->second->on_completion(wc);
      }
    }
    total += static_cast<size_t>(n);
    if (n < kPollBatch) break;
  }
  return total;
}

size_t VerbsBackend::drain_async() {
  Shared& s = *shared_;
  size_t n = 0;
  ibv_async_event ev{};
  while (ibv_get_async_event(s.device->context(), &ev) == 0) {
    ++n;
    const char* what = ibv_event_type_str(ev.event_type);
    switch (ev.event_type) {
      case IBV_EVENT_QP_FATAL:
      case IBV_EVENT_QP_REQ_ERR:
      case IBV_EVENT_QP_ACCESS_ERR:
      case IBV_EVENT_PATH_MIG_ERR:
        if (auto it = s.by_qpn.find(ev.element.qp->qp_num); it != s.by_qpn.end()) {
          it->second->fail(
              peer_failed("verbs: QP to ", it->second->peer_name(), ": async event ", what));
        }
        break;
      case IBV_EVENT_PORT_ERR:
        MYELIN_LOG_ERROR << "verbs: " << s.device->name() << " port " << ev.element.port_num << ": "
                         << what << " (link down); connections fail until it is back";
        if (ev.element.port_num == s.device->port().port) {
          for (auto& [t, ep] : s.by_token) {
            ep->fail(peer_failed("verbs: ", s.device->name(), " port ", ev.element.port_num,
                                 " went down (", what, ")"));
          }
        }
        break;
      case IBV_EVENT_DEVICE_FATAL:
      case IBV_EVENT_CQ_ERR:
        s.device_status = device_failed("verbs: ", s.device->name(), ": async event ", what);
        for (auto& [t, ep] : s.by_token) ep->fail(s.device_status);
        break;
      default:
        MYELIN_LOG_INFO << "verbs: " << s.device->name() << ": async event " << what;
        break;
    }
    ibv_ack_async_event(&ev);
  }
  return n;
}

size_t VerbsBackend::progress() {
  size_t n = poll_cq();
  n += drain_async();
  n += drain_cm();
  const int64_t now = monotonic_ns();
  if (timer_at_ns_ != 0 && now >= timer_at_ns_) {
    uint64_t expirations = 0;  // drained so the wait fd stops being readable
    (void)!::read(timer_.get(), &expirations, sizeof expirations);
    timer_at_ns_ = 0;
  }
  for (auto& [token, ep] : shared_->by_token) {
    if (shared_->mode == CmMode::kExchange && !ep->failed() && !ep->established() &&
        now >= ep->next_handshake_ns) {
      send_handshake(*ep);
    }
    n += ep->flush();
  }
  return n;
}

bool VerbsBackend::arm_wait() {
  if (ibv_req_notify_cq(shared_->cq.get(), 0) != 0) return false;
  // Anything that completed before the arm would not wake us: handle it now instead.
  if (progress() > 0) return false;
  int64_t wake = VerbsEndpoint::kNoTimer;
  for (auto& [token, ep] : shared_->by_token) {
    if (ep->has_postable_work()) return false;
    wake = std::min(wake, ep->next_timer_ns());
  }
  // Sleep no longer than the earliest endpoint timer: handshake datagrams are retransmitted,
  // connect deadlines enforced and keepalives sent while the caller blocks, so a silent dead
  // peer still ends in peer_failed rather than in the caller's wait timeout.
  if (wake != VerbsEndpoint::kNoTimer && wake <= monotonic_ns()) return false;
  itimerspec when{};  // all zero: disarmed
  if (wake != VerbsEndpoint::kNoTimer) {
    when.it_value.tv_sec = static_cast<time_t>(wake / 1'000'000'000);
    when.it_value.tv_nsec = static_cast<long>(wake % 1'000'000'000);
  }
  if (timerfd_settime(timer_.get(), TFD_TIMER_ABSTIME, &when, nullptr) != 0) {
    MYELIN_LOG_WARN << "verbs: timerfd_settime: " << std::strerror(errno) << "; spinning instead";
    return false;
  }
  timer_at_ns_ = wake == VerbsEndpoint::kNoTimer ? 0 : wake;
  return true;
}

}  // namespace
}  // namespace verbs

Result<std::unique_ptr<BackendContext>> create_verbs_backend(const Options& options,
                                                             const ContextInfo& info) {
  auto backend = std::make_unique<verbs::VerbsBackend>(options, info);
  MYELIN_RETURN_IF_ERROR(backend->init());
  return std::unique_ptr<BackendContext>(std::move(backend));
}

}  // namespace myelin::transport::internal
