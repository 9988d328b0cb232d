// ShmEndpoint: rings, matching, rendezvous, one-sided copies, liveness.
#include "shm/shm_endpoint.hpp"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include <myelin/core/copy.hpp>
#include <myelin/core/log.hpp>

#include "shm/shm_backend.hpp"

namespace myelin::transport::internal::shm {

namespace {
constexpr size_t kMaxRingCapacity = size_t{1} << 30;
constexpr int64_t kLivenessEveryNs = 20'000'000;
Deadline ctl_send_deadline() {
  return Deadline::after_ms(2000);
}

Result<AttachedRing> make_ring(const char* label, size_t capacity) {
  MYELIN_ASSIGN_OR_RETURN(ShmSegment seg,
                          ShmSegment::create_memfd(label, RecordRing::bytes_for(capacity)));
  MYELIN_ASSIGN_OR_RETURN(RecordRing ring,
                          RecordRing::format(seg.data(), seg.data_size(), capacity));
  return AttachedRing{std::move(seg), std::move(ring)};
}

Result<UniqueFd> make_doorbell() {
  UniqueFd fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!fd.valid()) return errno_status("eventfd for an shm doorbell", errno);
  return fd;
}

const char* op_name(int op) {
  switch (op) {
    case 0:
      return "put";
    case 1:
      return "put_with_immediate";
    default:
      return "get";
  }
}
}  // namespace

Result<AttachedRing> attach_ring_fd(int fd, size_t max_capacity) {
  MYELIN_ASSIGN_OR_RETURN(ShmSegment seg, ShmSegment::open_fd(fd));
  auto ring = RecordRing::attach(seg.data(), seg.data_size());
  if (!ring.ok()) return std::move(ring).status().with_context("shm ring segment refused");
  if (ring->capacity() > max_capacity) {
    return invalid_argument("shm ring segment of ", ring->capacity(), " bytes exceeds the ",
                            max_capacity, " this build accepts");
  }
  return AttachedRing{std::move(seg), std::move(ring).value()};
}

ShmEndpoint::ShmEndpoint(ShmBackend* backend, std::vector<uint8_t> peer_bytes, ShmAddress peer,
                         std::string peer_name)
    : backend_(backend),
      peer_bytes_(std::move(peer_bytes)),
      peer_(std::move(peer)),
      peer_name_(std::make_shared<const std::string>(std::move(peer_name))) {
  backend_->attach(this);
}

ShmEndpoint::~ShmEndpoint() {
  fail(cancelled("the shm endpoint to ", *peer_name_, " was disconnected"));
  for (auto& [id, a] : peer_allocs_) ::munmap(a.base, a.size);
  backend_->detach(this);
}

// ---- connection
// ----------------------------------------------------------------------------------

Status ShmEndpoint::establish_as_dialer(UniqueFd sock, Deadline deadline) {
  const size_t cap = backend_->ring_capacity();
  MYELIN_ASSIGN_OR_RETURN(AttachedRing out, make_ring("myelin-shm-ring", cap));
  MYELIN_ASSIGN_OR_RETURN(AttachedRing in, make_ring("myelin-shm-ring", cap));
  MYELIN_ASSIGN_OR_RETURN(UniqueFd bell_peer, make_doorbell());
  MYELIN_ASSIGN_OR_RETURN(UniqueFd bell_self, make_doorbell());
  MYELIN_RETURN_IF_ERROR(out.segment.join("dialer: producer"));
  MYELIN_RETURN_IF_ERROR(in.segment.join("dialer: consumer"));
  CtlHeader h;
  h.type = static_cast<uint16_t>(CtlType::kHello);
  h.a = cap;
  const int fds[4] = {out.segment.fd(), in.segment.fd(), bell_peer.get(), bell_self.get()};
  // Not through MYELIN_RETURN_IF_ERROR: with_context() on a temporary returns a reference to it.
  if (Status sent = send_ctl(sock.get(), h, backend_->address_bytes(), fds, deadline); !sent.ok()) {
    return std::move(sent).with_context("sending the shm hello");
  }
  out_.emplace(std::move(out));
  in_.emplace(std::move(in));
  doorbell_out_ = std::move(bell_peer);
  doorbell_in_ = std::move(bell_self);
  sock_ = std::move(sock);
  established_ = true;
  backend_->watch(sock_.get());
  backend_->watch(doorbell_in_.get());
  return send_info();
}

Status ShmEndpoint::establish_from_hello(UniqueFd sock, CtlMessage& hello, bool via_dial_socket) {
  if (hello.fds.size() != 4) {
    return protocol_error("shm hello carried ", hello.fds.size(), " fds instead of 4");
  }
  if (hello.header.a < RecordRing::kMinCapacity || hello.header.a > kMaxRingCapacity) {
    return protocol_error("shm hello announces a ring of ", hello.header.a, " bytes");
  }
  MYELIN_ASSIGN_OR_RETURN(AttachedRing in, attach_ring_fd(hello.fds[0].get(), kMaxRingCapacity));
  MYELIN_ASSIGN_OR_RETURN(AttachedRing out, attach_ring_fd(hello.fds[1].get(), kMaxRingCapacity));
  MYELIN_RETURN_IF_ERROR(in.segment.join("acceptor: consumer"));
  MYELIN_RETURN_IF_ERROR(out.segment.join("acceptor: producer"));
  if (dial_sock_.valid()) {
    backend_->unwatch(dial_sock_.get());
    dial_sock_.reset();
  }
  in_.emplace(std::move(in));
  out_.emplace(std::move(out));
  doorbell_in_ = std::move(hello.fds[2]);
  doorbell_out_ = std::move(hello.fds[3]);
  sock_ = std::move(sock);
  established_ = true;
  backend_->unwatch(sock_.get());
  backend_->watch(sock_.get());
  backend_->watch(doorbell_in_.get());
  // Over the dial-me socket our info went out already (with the dial-me itself).
  return via_dial_socket ? ok_status() : send_info();
}

void ShmEndpoint::set_dial_socket(UniqueFd sock) {
  dial_sock_ = std::move(sock);
  backend_->watch(dial_sock_.get());
  backend_->want_service();
}

void ShmEndpoint::adopt_info_socket(UniqueFd sock) {
  if (failed() || aux_sock_.valid()) return;  // dropping it is harmless: the peer sends again
  aux_sock_ = std::move(sock);
  backend_->watch(aux_sock_.get());
  backend_->want_service();
}

Status ShmEndpoint::send_info() {
  // Every shared allocation first, so that keys naming them resolve once kInfo is in.
  for (const auto& [base, alloc] : backend_->allocs()) announce_alloc(alloc);
  CtlHeader h;
  h.type = static_cast<uint16_t>(CtlType::kInfo);
  h.a = backend_->probe_address();
  h.b = backend_->probe_value();
  h.c = (backend_->may_sleep() ? kInfoMaySleep : 0) | kInfoSplit;
  const int fds[1] = {backend_->key_table_fd()};
  return send_ctl(ctl_fd(), h, {}, fds, ctl_send_deadline()).with_context("sending shm info");
}

void ShmEndpoint::announce_alloc(const SharedAlloc& alloc) {
  if (failed() || ctl_fd() < 0) return;
  CtlHeader h;
  h.type = static_cast<uint16_t>(CtlType::kAlloc);
  h.a = alloc.id;
  h.b = alloc.size;
  const int fds[1] = {alloc.fd};
  if (Status s = send_ctl(ctl_fd(), h, {}, fds, ctl_send_deadline()); !s.ok()) {
    socket_status_ = std::move(s);
  }
}

void ShmEndpoint::announce_free(uint64_t id) {
  if (failed() || ctl_fd() < 0) return;
  CtlHeader h;
  h.type = static_cast<uint16_t>(CtlType::kFree);
  h.a = id;
  if (Status s = send_ctl(ctl_fd(), h, {}, {}, ctl_send_deadline()); !s.ok()) {
    socket_status_ = std::move(s);
  }
}

Status ShmEndpoint::handle_ctl(CtlMessage& msg) {
  switch (static_cast<CtlType>(msg.header.type)) {
    case CtlType::kInfo: {
      if (msg.fds.size() != 1) return protocol_error("shm info without the key table fd");
      MYELIN_ASSIGN_OR_RETURN(ShmSegment keys, ShmSegment::open_fd(msg.fds[0].get()));
      if (keys.data_size() < kKeySlots * sizeof(KeySlot)) {
        return protocol_error("shm key table of ", keys.data_size(), " bytes is too small");
      }
      peer_keys_segment_.emplace(std::move(keys));
      peer_keys_ = reinterpret_cast<const KeySlot*>(peer_keys_segment_->data());
      peer_may_sleep_ = (msg.header.c & kInfoMaySleep) != 0;
      peer_split_ = (msg.header.c & kInfoSplit) != 0;
      // Probe cross-memory attach: can we read the peer's probe word?
      uint64_t value = 0;
      iovec local{&value, sizeof(value)};
      iovec remote{reinterpret_cast<void*>(msg.header.a), sizeof(value)};
      can_cma_read_peer_ = backend_->cma_allowed() &&
                           ::process_vm_readv(peer_.pid, &local, 1, &remote, 1, 0) ==
                               static_cast<ssize_t>(sizeof(value)) &&
                           value == msg.header.b;
      info_received_ = true;
      CtlHeader h;
      h.type = static_cast<uint16_t>(CtlType::kCmaResult);
      h.a = can_cma_read_peer_ ? 1 : 0;
      return send_ctl(sock_.get(), h, {}, {}, ctl_send_deadline());
    }
    case CtlType::kAlloc: {
      if (msg.fds.size() != 1 || msg.header.b == 0) return protocol_error("malformed shm alloc");
      void* p =
          ::mmap(nullptr, msg.header.b, PROT_READ | PROT_WRITE, MAP_SHARED, msg.fds[0].get(), 0);
      if (p == MAP_FAILED) {
        MYELIN_LOG_WARN << "shm: cannot map the peer's shared region " << msg.header.a << " of "
                        << msg.header.b << " bytes: " << errno_status("mmap", errno);
        return ok_status();  // operations on it fall back or fail with not_found
      }
      auto [it, inserted] =
          peer_allocs_.emplace(msg.header.a, PeerAlloc{static_cast<std::byte*>(p), msg.header.b});
      if (!inserted) ::munmap(p, msg.header.b);  // announced on two sockets after crossed dials
      return ok_status();
    }
    case CtlType::kFree: {
      if (auto it = peer_allocs_.find(msg.header.a); it != peer_allocs_.end()) {
        ::munmap(it->second.base, it->second.size);
        peer_allocs_.erase(it);
      }
      return ok_status();
    }
    case CtlType::kCmaResult:
      peer_can_cma_read_us_ = msg.header.a != 0;
      return ok_status();
    default:
      return protocol_error("unexpected shm control message type ", msg.header.type);
  }
}

void ShmEndpoint::read_socket() {
  if (failed() || !socket_status_.ok()) return;
  while (aux_sock_.valid()) {
    CtlMessage msg;
    auto got = recv_ctl(aux_sock_.get(), msg);
    if (got.ok() && *got == RecvOutcome::kEmpty) break;
    const auto type = got.ok() && *got == RecvOutcome::kMessage
                          ? static_cast<CtlType>(msg.header.type)
                          : CtlType::kDialMe;
    if (type == CtlType::kInfo || type == CtlType::kAlloc || type == CtlType::kFree) {
      if (Status s = handle_ctl(msg); !s.ok()) socket_status_ = std::move(s);
      continue;
    }
    backend_->unwatch(aux_sock_.get());  // closed, malformed or not meant for it: done with it
    aux_sock_.reset();
  }
  for (;;) {
    const int fd = established_ ? sock_.get() : dial_sock_.get();
    if (fd < 0) return;
    CtlMessage msg;
    auto got = recv_ctl(fd, msg);
    if (!got.ok()) {
      socket_status_ = std::move(got).status();
      return;
    }
    if (*got == RecvOutcome::kEmpty) return;
    if (*got == RecvOutcome::kClosed) {
      if (!established_) {
        // The peer dialed us on its own and dropped our "dial me": its hello comes through the
        // listening socket. Its death is caught by the liveness check.
        backend_->unwatch(dial_sock_.get());
        dial_sock_.reset();
        return;
      }
      socket_status_ = peer_failed("it closed the connection (its process exited or disconnected)");
      return;
    }
    if (!established_) {
      if (static_cast<CtlType>(msg.header.type) != CtlType::kHello) {
        socket_status_ =
            protocol_error("shm peer answered a dial-me with message type ", msg.header.type);
        return;
      }
      UniqueFd sock = std::move(dial_sock_);
      if (Status s = establish_from_hello(std::move(sock), msg, /*via_dial_socket=*/true);
          !s.ok()) {
        socket_status_ = s;
      }
      continue;
    }
    if (Status s = handle_ctl(msg); !s.ok()) {
      socket_status_ = std::move(s);
      return;
    }
  }
}

void ShmEndpoint::service(int64_t now) {
  if (failed()) return;
  read_socket();
  if (socket_status_.ok() && now >= next_liveness_ns_) {
    next_liveness_ns_ = now + kLivenessEveryNs;
    if (!process_is_alive(peer_.pid, peer_.start_time)) {
      socket_status_ = peer_failed("its process is gone");
    }
  }
  if (!socket_status_.ok()) {
    drain_inbound();  // what the peer sent before it went is still delivered
    fail(Status(socket_status_)
             .with_context("shm peer " + *peer_name_ + " (pid " + std::to_string(peer_.pid) + ")"));
    return;
  }
  if (!established_) {
    backend_->want_service();
    return;
  }
  if (info_received_ && !deferred_.empty()) {
    std::deque<Deferred> work;
    work.swap(deferred_);
    for (Deferred& d : work) {
      Status s = do_one_sided(d.op, d.local, d.size, d.key, d.offset);
      if (s.ok() && d.op == OneSided::kPutImm) {
        ImmRecord r{d.immediate, 0};
        enqueue(kImm, &r, sizeof(r), nullptr, 0, d.size, std::move(d.req));
        continue;
      }
      d.req->complete(s, s.ok() ? d.size : 0);
    }
    flush();
  }
}

void ShmEndpoint::drain_inbound() {
  if (!established_ || !in_) return;
  for (int i = 0; i < 1'000'000; ++i) {
    auto r = in_->ring.consume(
        [this](const RecordRing::Record& rec) { handle_record(rec.type, rec.data); });
    if (!r.ok() || *r == 0) return;
  }
}

void ShmEndpoint::fail(Status status) {
  if (failed()) return;
  disarm();
  status_ = std::move(status);
  for (auto& [id, ch] : channels_) {
    for (Posted& p : ch.posted) p.req->complete(status_, 0);
  }
  channels_.clear();
  last_channel_state_ = nullptr;
  for (auto& [t, s] : rndv_sends_) s.req->complete(status_, 0);
  rndv_sends_.clear();
  for (auto& [t, r] : rndv_recvs_) {
    // The peer may be writing its part of a split message: take the grant back before the
    // buffer goes back to the caller.
    if (r.split) revoke_grant(r);
    r.req->complete(status_, 0);
  }
  rndv_recvs_.clear();
  split_leftovers_.clear();
  for (OutItem& it : outq_) {
    if (it.req) it.req->complete(status_, 0);
  }
  outq_.clear();
  for (Deferred& d : deferred_) d.req->complete(status_, 0);
  deferred_.clear();
  for (UniqueFd* fd : {&sock_, &dial_sock_, &aux_sock_, &doorbell_in_}) {
    if (fd->valid()) backend_->unwatch(fd->get());
    fd->reset();
  }
  doorbell_out_.reset();
}

// ---- waiting
// ---------------------------------------------------------------------------------------

void ShmEndpoint::notify_peer() noexcept {
  if (!peer_may_sleep_) return;
  WaitWord& w = out_->ring.consumer_wait_word();
  // Pairs with the fence in the peer's arm(): either we see its sleeper count, or its re-check
  // of the ring sees the record committed before this fence.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (w.sleepers.load(std::memory_order_relaxed) != 0) {
    // Pairs with nothing that orders data (the ring's tail does); it records that a wake happened.
    w.epoch.fetch_add(1, std::memory_order_relaxed);
    const uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(doorbell_out_.get(), &one, sizeof(one));
  }
}

bool ShmEndpoint::arm() {
  if (failed() || !established_) return true;  // the sockets are watched by the epoll set
  if (!outq_.empty() || !deferred_.empty() || !socket_status_.ok()) return false;
  uint64_t stale;
  while (::read(doorbell_in_.get(), &stale, sizeof(stale)) > 0) {
  }
  WaitWord& w = in_->ring.consumer_wait_word();
  // Pairs with the fence in the producer's notify_peer(), through the fence below.
  w.sleepers.fetch_add(1, std::memory_order_seq_cst);
  armed_ = true;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return in_->ring.empty_approx();
}

void ShmEndpoint::disarm() noexcept {
  if (!armed_) return;
  armed_ = false;
  // Only the count matters to producers; nothing to order.
  in_->ring.consumer_wait_word().sleepers.fetch_sub(1, std::memory_order_relaxed);
}

// ---- output
// ------------------------------------------------------------------------------------------

bool ShmEndpoint::write_now(uint32_t type, const void* header, uint32_t header_len,
                            const std::byte* data, size_t size) {
  if (!established_ || !outq_.empty()) return false;
  RecordRing::Claim c;
  if (!out_->ring.try_claim(static_cast<uint32_t>(header_len + size), c, type)) return false;
  std::memcpy(c.data, header, header_len);
  copy_bytes(c.data + header_len, data, size);
  out_->ring.commit(c);
  notify_peer();
  return true;
}

void ShmEndpoint::enqueue(uint32_t type, const void* header, uint32_t header_len,
                          const std::byte* data, size_t size, size_t report_bytes,
                          RequestStateRef req) {
  OutItem it;
  it.type = type;
  it.header_len = header_len;
  std::memcpy(it.header, header, header_len);
  it.data = data;
  it.size = size;
  it.report_bytes = report_bytes;
  it.req = std::move(req);
  outq_.push_back(std::move(it));
}

bool ShmEndpoint::flush() {
  if (!established_ || failed()) return false;
  bool wrote = false;
  RecordRing& ring = out_->ring;
  const size_t chunk_max = ring.max_record_size() / 2 - sizeof(DataHeader);
  while (!outq_.empty()) {
    OutItem& it = outq_.front();
    if (it.stream) {
      bool full = false;
      while (it.streamed < it.size) {
        const size_t n = std::min(chunk_max, it.size - it.streamed);
        RecordRing::Claim c;
        if (!ring.try_claim(static_cast<uint32_t>(sizeof(DataHeader) + n), c, kData)) {
          full = true;
          break;
        }
        const DataHeader dh{it.token, it.streamed};
        std::memcpy(c.data, &dh, sizeof(dh));
        copy_bytes(c.data + sizeof(dh), it.data + it.streamed, n);
        ring.commit(c);
        it.streamed += n;
        wrote = true;
      }
      if (full) break;
      it.req->complete(ok_status(), it.size);
      rndv_sends_.erase(it.token);
      outq_.pop_front();
      continue;
    }
    RecordRing::Claim c;
    if (!ring.try_claim(static_cast<uint32_t>(it.header_len + it.size), c, it.type)) break;
    std::memcpy(c.data, it.header, it.header_len);
    copy_bytes(c.data + it.header_len, it.data, it.size);
    ring.commit(c);
    wrote = true;
    if (it.req) it.req->complete(ok_status(), it.report_bytes);
    outq_.pop_front();
  }
  if (wrote) notify_peer();
  return wrote;
}

template <typename T>
void ShmEndpoint::queue_control(uint32_t type, const T& record) {
  if (!write_now(type, &record, sizeof(T), nullptr, 0)) {
    enqueue(type, &record, sizeof(T), nullptr, 0, 0, nullptr);
  }
}

// ---- two-sided
// -----------------------------------------------------------------------------------------

Request ShmEndpoint::send(uint32_t channel_id, const void* data, size_t size, const MemoryRegion*) {
  if (!status_.ok()) [[unlikely]]
    return Request::failed(status_);
  const auto* bytes = static_cast<const std::byte*>(data);
  if (size <= backend_->eager_limit()) [[likely]] {
    if (data == nullptr && size != 0) {
      return Request::failed(invalid_argument("send of ", size, " bytes from a null buffer"));
    }
    const EagerHeader h{channel_id, send_seq_};
    if (established_ && outq_.empty()) [[likely]] {
      RecordRing::Claim c;
      if (out_->ring.try_claim(static_cast<uint32_t>(sizeof(h) + size), c, kEager)) [[likely]] {
        ++send_seq_;
        std::memcpy(c.data, &h, sizeof(h));
        copy_bytes(c.data + sizeof(h), bytes, size);
        out_->ring.commit(c);
        notify_peer();
        return Request::completed(size);
      }
    }
    ++send_seq_;
    auto [req, st] = Request::make_pending();
    st->describe("send", channel_id, peer_name_);
    enqueue(kEager, &h, sizeof(h), bytes, size, size, std::move(st));
    flush();
    return std::move(req);
  }
  if (size > backend_->options().max_message_size) {
    return Request::failed(invalid_argument("send of ", size, " bytes exceeds max_message_size ",
                                            backend_->options().max_message_size));
  }
  if (data == nullptr) {
    return Request::failed(invalid_argument("send of ", size, " bytes from a null buffer"));
  }
  RtsRecord r{};
  r.channel = channel_id;
  r.seq = send_seq_++;
  r.size = size;
  r.token = next_token_++;
  if (const SharedAlloc* a = backend_->find_alloc(data, size)) {
    r.kind = static_cast<uint32_t>(RtsKind::kSharedRegion);
    r.where = a->id;
    r.offset = static_cast<uint64_t>(bytes - a->base);
  } else if (peer_can_cma_read_us_) {
    r.kind = static_cast<uint32_t>(RtsKind::kCma);
    r.where = reinterpret_cast<uintptr_t>(data);
  } else {
    r.kind = static_cast<uint32_t>(RtsKind::kStream);
  }
  auto [req, st] = Request::make_pending();
  st->describe("rendezvous send", channel_id, peer_name_);
  rndv_sends_.emplace(r.token, RndvSend{bytes, size, st});
  queue_control(kRts, r);
  return std::move(req);
}

Request ShmEndpoint::recv(uint32_t channel_id, void* data, size_t capacity, const MemoryRegion*) {
  if (!status_.ok()) [[unlikely]]
    return Request::failed(status_);
  if (data == nullptr && capacity != 0) {
    return Request::failed(invalid_argument("recv into a null buffer of ", capacity, " bytes"));
  }
  Channel& ch = channel(channel_id);
  if (!ch.unexpected.empty()) {
    Unexpected u = std::move(ch.unexpected.front());
    ch.unexpected.pop_front();
    if (!u.is_rts) {
      if (u.bytes.size() > capacity) {
        return Request::failed(
            out_of_range("recv buffer of ", capacity, " bytes is smaller than the ", u.bytes.size(),
                         "-byte message on channel ", channel_id, " from ", *peer_name_));
      }
      copy_bytes(data, u.bytes.data(), u.bytes.size());
      return Request::completed(u.bytes.size());
    }
    auto [req, st] = Request::make_pending();
    st->describe("recv", channel_id, peer_name_);
    Posted p{static_cast<std::byte*>(data), capacity, std::move(st)};
    start_rendezvous(p, u.rts);
    return std::move(req);
  }
  // From the pool: a receive posted ahead of its message is the common case (every collective
  // posts its receives first), and in the steady state it then allocates nothing.
  auto [req, st] = request_pool_.make_pending();
  st->describe("recv", channel_id, peer_name_);
  ch.posted.push_back(Posted{static_cast<std::byte*>(data), capacity, std::move(st)});
  return std::move(req);
}

void ShmEndpoint::deliver_eager(Posted& p, std::span<const std::byte> bytes) {
  if (bytes.size() > p.capacity) {
    p.req->complete(out_of_range("recv buffer of ", p.capacity, " bytes is smaller than the ",
                                 bytes.size(), "-byte message from ", *peer_name_),
                    0);
    return;
  }
  copy_bytes(p.data, bytes.data(), bytes.size());
  p.req->complete(ok_status(), bytes.size());
  // Completed and never touched again here: reusable once the caller's handle is gone.
  request_pool_.recycle(std::move(p.req));
}

const ShmEndpoint::PeerAlloc* ShmEndpoint::peer_alloc(uint64_t id) {
  auto it = peer_allocs_.find(id);
  if (it == peer_allocs_.end()) {
    read_socket();  // its kAlloc may still wait in the socket; errors are acted on in service()
    it = peer_allocs_.find(id);
    if (it == peer_allocs_.end()) return nullptr;
  }
  return &it->second;
}

bool ShmEndpoint::cma_read(void* local, uint64_t remote, size_t size) const {
  size_t done = 0;
  while (done < size) {
    iovec l{static_cast<std::byte*>(local) + done, size - done};
    iovec r{reinterpret_cast<void*>(remote + done), size - done};
    const ssize_t n = ::process_vm_readv(peer_.pid, &l, 1, &r, 1, 0);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

void ShmEndpoint::start_rendezvous(Posted& p, const RtsRecord& rts) {
  if (rts.size > p.capacity) {
    p.req->complete(
        out_of_range("recv buffer of ", p.capacity, " bytes is smaller than the ", rts.size,
                     "-byte message on channel ", rts.channel, " from ", *peer_name_),
        0);
    queue_control(kFin, FinRecord{rts.token, static_cast<uint32_t>(StatusCode::kOutOfRange), 0});
    return;
  }
  const auto kind = static_cast<RtsKind>(rts.kind);
  bool copied = false;
  if (kind == RtsKind::kSharedRegion) {
    const PeerAlloc* a = peer_alloc(rts.where);
    if (a != nullptr && rts.offset <= a->size && rts.size <= a->size - rts.offset) {
      copy_bytes(p.data, a->base + rts.offset, rts.size);
      copied = true;
    }
  } else if (kind == RtsKind::kCma && can_cma_read_peer_) {
    if (backend_->split_wanted(rts.size) && peer_split_ && peer_can_cma_read_us_ &&
        start_split(p, rts)) {
      return;
    }
    copied = cma_read(p.data, rts.where, rts.size);
  }
  if (copied) {
    p.req->complete(ok_status(), rts.size);
    queue_control(kFin, FinRecord{rts.token, 0, 0});
    return;
  }
  // Neither path reaches the sender's bytes: have them streamed through the ring.
  rndv_recvs_.emplace(rts.token, RndvRecv{p.data, rts.size, 0, std::move(p.req)});
  queue_control(kCts, TokenRecord{rts.token});
}

// Split copy, receiver side. The protocol, in ring order:
//   receiver: grant(head) -> kSplit -> reads the tail -> try_revoke():
//     kTaken   (the sender has not started): reads the head too ("steals" it) -> kFin, done;
//     kWritten (the sender wrote the head already): -> kFin, done;
//     kBusy    (the sender is writing): waits for kSplitDone (the receive's deadline bounds it).
//   sender, on kSplit: CAS G -> G|kGrantBusy; if that fails (stolen or revoked) writes nothing;
//     else writes the head, stores G|kGrantDone (or G when the write failed: "hand back");
//     answers kSplitDone either way; its send completes at kFin.
//   receiver, on kSplitDone: done already (stolen / written): forgets the token; else revokes:
//     kWritten -> kFin, done; kTaken (handed back) -> reads the head itself -> kFin, done.
// kFin goes out only once the receiver will not read the sender's buffer again, so the sender's
// buffer stays valid for a steal or a read after a hand-back.
bool ShmEndpoint::start_split(Posted& p, const RtsRecord& rts) {
  // The sender takes the head, we take the tail; page-aligned so neither side pins a page twice.
  const size_t head = (rts.size / 2) & ~size_t{4095};
  if (head == 0) return false;
  uint32_t slot = 0;
  uint64_t grant = 0;
  if (!backend_->keys().grant(p.data, head, slot, grant)) return false;
  RndvRecv rr{p.data, rts.size, 0, std::move(p.req)};
  rr.split = true;
  rr.grant_slot = slot;
  rr.grant = grant;
  rr.head = head;
  rr.remote = rts.where;
  // First the request, so the sender copies while we do.
  queue_control(kSplit, SplitRecord{rts.token, rr.grant, head, rr.grant_slot, 0});
  if (!cma_read(p.data + head, rts.where + head, rts.size - head)) {
    rr.own = errno_status("reading the tail of a " + std::to_string(rts.size) +
                              "-byte message from " + *peer_name_ + " with process_vm_readv",
                          errno, StatusCode::kIoError);
  }
  switch (backend_->keys().try_revoke(rr.grant_slot, rr.grant)) {
    case KeyTable::Revoke::kTaken:
      // The sender has not started (descheduled, or busy elsewhere) and now never will: copy the
      // head ourselves rather than wait for it. Its kSplitDone (cancelled) is still to come.
      rr.split = false;
      read_head(rr);
      split_leftovers_.insert(rts.token);
      finish_split(rts.token, rr);
      return true;
    case KeyTable::Revoke::kWritten:
      rr.split = false;
      split_leftovers_.insert(rts.token);
      finish_split(rts.token, rr);
      return true;
    case KeyTable::Revoke::kBusy:
      rndv_recvs_.emplace(rts.token, std::move(rr));  // completes at kSplitDone
      return true;
    case KeyTable::Revoke::kLost:
      break;
  }
  rr.split = false;
  rr.own = protocol_error("shm peer ", *peer_name_, " left grant slot ", rr.grant_slot,
                          " in a state it may not set; the slot is retired");
  split_leftovers_.insert(rts.token);
  finish_split(rts.token, rr);
  return true;
}

void ShmEndpoint::read_head(RndvRecv& rr) {
  if (!rr.own.ok() || cma_read(rr.data, rr.remote, rr.head)) return;
  rr.own = errno_status("reading the head of a " + std::to_string(rr.size) + "-byte message from " +
                            *peer_name_ + " with process_vm_readv",
                        errno, StatusCode::kIoError);
}

void ShmEndpoint::finish_split(uint64_t token, RndvRecv& rr) {
  // We are done with the sender's buffer: its send may complete.
  queue_control(kFin, FinRecord{token, static_cast<uint32_t>(rr.own.code()), 0});
  const bool ok = rr.own.ok();
  rr.req->complete(std::move(rr.own), ok ? rr.size : 0);
}

void ShmEndpoint::serve_split(const SplitRecord& sr) {
  auto it = rndv_sends_.find(sr.token);
  if (it == rndv_sends_.end() || sr.length > it->second.size || sr.slot >= kKeySlots) {
    ring_error_ = protocol_error("shm split request for token ", sr.token, " of ", sr.length,
                                 " bytes in slot ", sr.slot, " does not fit a pending send");
    return;
  }
  StatusCode code = StatusCode::kOk;
  int err = 0;
  if (!can_cma_read_peer_ || peer_keys_ == nullptr) {
    // Not a failure of the message: the grant stays bare and the receiver reads the head itself.
    code = StatusCode::kUnsupported;
  } else {
    // The key table is mapped writable: the grant's token is the one word a peer may change.
    auto& token = const_cast<KeySlot&>(peer_keys_[sr.slot]).token;
    uint64_t expected = sr.grant;
    // Success: acquire pairs with the owner's release store of the token in KeyTable::grant()
    // (the slot's fields are visible). It races with the owner's compare-exchange from the same
    // bare token in try_revoke(): exactly one succeeds. Failure (relaxed): the owner took the
    // grant back (stole the head, or the receive ended); we write nothing.
    if (!token.compare_exchange_strong(expected, sr.grant | kGrantBusy, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
      code = StatusCode::kCancelled;
    } else {
      const KeySlot& slot = peer_keys_[sr.slot];
      const uint64_t where = slot.where.load(std::memory_order_relaxed);
      const bool fits =
          slot.kind.load(std::memory_order_relaxed) == static_cast<uint64_t>(KeyKind::kGrant) &&
          slot.length.load(std::memory_order_relaxed) >= sr.length;
      size_t done = 0;
      while (fits && done < sr.length) {
        iovec l{const_cast<std::byte*>(it->second.data) + done, sr.length - done};
        iovec r{reinterpret_cast<void*>(where + done), sr.length - done};
        const ssize_t n = ::process_vm_writev(peer_.pid, &l, 1, &r, 1, 0);
        if (n <= 0) {
          err = n < 0 ? errno : EIO;
          break;
        }
        done += static_cast<size_t>(n);
      }
      if (!fits) {
        code = StatusCode::kProtocolError;
      } else if (done < sr.length) {
        code = StatusCode::kIoError;
        MYELIN_LOG_WARN << "shm: writing the head of a split message into " << *peer_name_
                        << " stopped after " << done << " of " << sr.length
                        << " bytes: " << errno_status("process_vm_writev", err)
                        << "; the receiver reads it itself";
      }
      // Release pairs with the owner's acquire in try_revoke(): our writes into its buffer happen
      // before it sees G|kGrantDone (all written, it may complete) or G (handed back after a
      // failure: it copies the head itself, over whatever we wrote).
      token.store(code == StatusCode::kOk ? (sr.grant | kGrantDone) : sr.grant,
                  std::memory_order_release);
    }
  }
  queue_control(kSplitDone,
                FinRecord{sr.token, static_cast<uint32_t>(code), static_cast<uint32_t>(err)});
}

void ShmEndpoint::revoke_grant(RndvRecv& rr) noexcept {
  if (!rr.split) return;
  rr.split = false;
  // A writer holds the grant for one process_vm_writev of at most half a message: milliseconds
  // at worst. Past that the writer is stuck or gone; the slot stays retired.
  if (backend_->keys().revoke(rr.grant_slot, rr.grant, Deadline::after_ms(500)) ==
      KeyTable::Revoke::kBusy) {
    MYELIN_LOG_WARN << "shm: " << *peer_name_ << " still holds the grant of a " << rr.size
                    << "-byte receive after 500 ms; its key table slot " << rr.grant_slot
                    << " is retired";
  }
}

void ShmEndpoint::handle_record(uint32_t type, std::span<const std::byte> payload) {
  if (!ring_error_.ok()) return;
  auto too_short = [&](size_t need) {
    if (payload.size() >= need) return false;
    ring_error_ = protocol_error("shm record of type ", type, " has ", payload.size(),
                                 " bytes, fewer than its ", need, "-byte header");
    return true;
  };
  switch (type) {
    case kEager: {
      if (too_short(sizeof(EagerHeader))) return;
      EagerHeader h;
      std::memcpy(&h, payload.data(), sizeof(h));
      if (h.seq != recv_seq_) {
        ring_error_ =
            protocol_error("shm message sequence ", h.seq, " where ", recv_seq_, " was expected");
        return;
      }
      ++recv_seq_;
      const auto bytes = payload.subspan(sizeof(h));
      Channel& ch = channel(h.channel);
      if (!ch.posted.empty()) {
        Posted p = std::move(ch.posted.front());
        ch.posted.pop_front();
        deliver_eager(p, bytes);
      } else {
        ch.unexpected.push_back(
            Unexpected{false, RtsRecord{}, std::vector<std::byte>(bytes.begin(), bytes.end())});
      }
      return;
    }
    case kRts: {
      if (too_short(sizeof(RtsRecord))) return;
      RtsRecord r;
      std::memcpy(&r, payload.data(), sizeof(r));
      if (r.seq != recv_seq_) {
        ring_error_ =
            protocol_error("shm message sequence ", r.seq, " where ", recv_seq_, " was expected");
        return;
      }
      ++recv_seq_;
      Channel& ch = channel(r.channel);
      if (!ch.posted.empty()) {
        Posted p = std::move(ch.posted.front());
        ch.posted.pop_front();
        start_rendezvous(p, r);
      } else {
        ch.unexpected.push_back(Unexpected{true, r, {}});
      }
      return;
    }
    case kCts: {
      if (too_short(sizeof(TokenRecord))) return;
      TokenRecord t;
      std::memcpy(&t, payload.data(), sizeof(t));
      auto it = rndv_sends_.find(t.token);
      if (it == rndv_sends_.end()) {
        ring_error_ = protocol_error("shm clear-to-send for unknown token ", t.token);
        return;
      }
      OutItem item;
      item.stream = true;
      item.token = t.token;
      item.data = it->second.data;
      item.size = it->second.size;
      item.req = it->second.req;
      outq_.push_back(std::move(item));
      return;
    }
    case kData: {
      if (too_short(sizeof(DataHeader))) return;
      DataHeader dh;
      std::memcpy(&dh, payload.data(), sizeof(dh));
      auto it = rndv_recvs_.find(dh.token);
      const size_t n = payload.size() - sizeof(dh);
      if (it == rndv_recvs_.end() || it->second.split || dh.offset > it->second.size ||
          n > it->second.size - dh.offset) {
        ring_error_ = protocol_error("shm data chunk for token ", dh.token, " at ", dh.offset,
                                     " does not fit a pending receive");
        return;
      }
      RndvRecv& rr = it->second;
      copy_bytes(rr.data + dh.offset, payload.data() + sizeof(dh), n);
      rr.received += n;
      if (rr.received >= rr.size) {
        rr.req->complete(ok_status(), rr.size);
        rndv_recvs_.erase(it);
      }
      return;
    }
    case kFin: {
      if (too_short(sizeof(FinRecord))) return;
      FinRecord f;
      std::memcpy(&f, payload.data(), sizeof(f));
      auto it = rndv_sends_.find(f.token);
      if (it == rndv_sends_.end()) {
        ring_error_ = protocol_error("shm finish for unknown token ", f.token);
        return;
      }
      // The message was consumed either way (an undersized receive is the receiver's error).
      it->second.req->complete(ok_status(), it->second.size);
      rndv_sends_.erase(it);
      return;
    }
    case kSplit: {
      if (too_short(sizeof(SplitRecord))) return;
      SplitRecord sr;
      std::memcpy(&sr, payload.data(), sizeof(sr));
      serve_split(sr);
      return;
    }
    case kSplitDone: {
      if (too_short(sizeof(FinRecord))) return;
      FinRecord f;
      std::memcpy(&f, payload.data(), sizeof(f));
      if (split_leftovers_.erase(f.token) != 0) return;  // stolen or seen written: done already
      auto it = rndv_recvs_.find(f.token);
      if (it == rndv_recvs_.end() || !it->second.split) {
        ring_error_ = protocol_error("shm split completion for unknown token ", f.token);
        return;
      }
      RndvRecv& rr = it->second;
      rr.split = false;
      // The writer let go of the grant before it sent this, so this does not wait.
      switch (backend_->keys().revoke(rr.grant_slot, rr.grant, Deadline::after_ms(500))) {
        case KeyTable::Revoke::kWritten:
          break;
        case KeyTable::Revoke::kTaken:
          // Handed back (the writer could not write it all, f.code says why): the sender's buffer
          // is still ours to read (no kFin yet), so the head is read from here.
          if (f.code == static_cast<uint32_t>(StatusCode::kOk)) {
            rr.own = protocol_error("shm peer ", *peer_name_,
                                    " reported the head of a split message written but handed "
                                    "its grant back");
          }
          read_head(rr);
          break;
        case KeyTable::Revoke::kBusy:
        case KeyTable::Revoke::kLost:
          rr.own =
              protocol_error("shm peer ", *peer_name_, " still holds (or broke) grant slot ",
                             rr.grant_slot, " after its split completion; the slot is retired");
          break;
      }
      finish_split(f.token, rr);
      rndv_recvs_.erase(it);
      return;
    }
    case kImm: {
      if (too_short(sizeof(ImmRecord))) return;
      ImmRecord r;
      std::memcpy(&r, payload.data(), sizeof(r));
      immediates_.push_back(r.value);
      return;
    }
    default:
      ring_error_ = protocol_error("unknown shm record type ", type);
  }
}

size_t ShmEndpoint::progress() {
  if (!established_ || failed()) return 0;
  auto r = in_->ring.consume(
      [this](const RecordRing::Record& rec) { handle_record(rec.type, rec.data); }, 256);
  if (!r.ok()) {
    fail(std::move(r).status().with_context("shm ring from " + *peer_name_));
    return 1;
  }
  size_t n = *r;
  if (!ring_error_.ok()) [[unlikely]] {
    fail(ring_error_);
    return n + 1;
  }
  if (!outq_.empty()) n += flush() ? 1 : 0;
  return n;
}

// ---- one-sided
// ---------------------------------------------------------------------------------------

Status ShmEndpoint::do_one_sided(OneSided op, std::byte* local, size_t size, const RemoteKey& key,
                                 uint64_t offset) {
  const char* what = op_name(static_cast<int>(op));
  const auto blob_bytes = key.backend_blob(Backend::kShm);
  if (blob_bytes.empty()) {
    return invalid_argument(what, ": the remote key of region ", key.region_id(),
                            " has no shm part (registered in a Context without shm?)");
  }
  MYELIN_ASSIGN_OR_RETURN(KeyBlob blob, decode_key_blob(blob_bytes));
  if (peer_keys_ == nullptr) return unavailable("the peer's key table has not arrived yet");
  const KeySlot& slot = peer_keys_[blob.slot];
  // Pairs with the owner's release store of the token in register_memory()/release().
  if (slot.token.load(std::memory_order_acquire) != blob.token) {
    return not_found(what, ": the remote key of region ", key.region_id(),
                     " is stale (deregistered) or was not issued by ", *peer_name_);
  }
  const auto kind = static_cast<KeyKind>(slot.kind.load(std::memory_order_relaxed));
  const auto access = static_cast<Access>(slot.access.load(std::memory_order_relaxed));
  const uint64_t where = slot.where.load(std::memory_order_relaxed);
  const uint64_t base = slot.offset.load(std::memory_order_relaxed);
  const uint64_t length = slot.length.load(std::memory_order_relaxed);
  const Access wanted = op == OneSided::kGet ? Access::kRemoteRead : Access::kRemoteWrite;
  if (!allows(access, wanted)) {
    return permission_denied(what, ": region ", key.region_id(), " of ", *peer_name_,
                             " does not allow remote ", op == OneSided::kGet ? "reads" : "writes");
  }
  if (offset > length || size > length - offset) {
    return out_of_range(what, " of ", size, " bytes at offset ", offset,
                        " is outside the remote region of ", length, " bytes");
  }
  if (size == 0) return ok_status();
  if (kind == KeyKind::kShared) {
    const PeerAlloc* a = peer_alloc(where);
    if (a == nullptr) {
      return not_found(what, ": the shared memory behind region ", key.region_id(), " of ",
                       *peer_name_, " is gone");
    }
    if (base > a->size || length > a->size - base) {
      return protocol_error("shm key slot of region ", key.region_id(),
                            " runs past its allocation");
    }
    std::byte* remote = a->base + base + offset;
    if (op == OneSided::kGet) {
      copy_bytes(local, remote, size);
    } else {
      copy_bytes(remote, local, size);
    }
    return ok_status();
  }
  if (kind != KeyKind::kCma) return protocol_error("shm key slot of unknown kind");
  if (!can_cma_read_peer_) {
    return unsupported(what, " on region ", key.region_id(), " of ", *peer_name_,
                       ": it is ordinary registered memory, reachable only through cross-memory "
                       "attach (process_vm_readv/writev), which ptrace rules forbid here; use "
                       "Context::allocate() for regions peers access");
  }
  size_t done = 0;
  while (done < size) {
    iovec l{local + done, size - done};
    iovec r{reinterpret_cast<void*>(where + offset + done), size - done};
    const ssize_t n = op == OneSided::kGet ? ::process_vm_readv(peer_.pid, &l, 1, &r, 1, 0)
                                           : ::process_vm_writev(peer_.pid, &l, 1, &r, 1, 0);
    if (n <= 0) {
      return errno_status(
          std::string(what) + " through process_vm_" + (op == OneSided::kGet ? "readv" : "writev"),
          errno, errno == EPERM ? StatusCode::kUnsupported : StatusCode::kIoError);
    }
    done += static_cast<size_t>(n);
  }
  return ok_status();
}

Request ShmEndpoint::one_sided(OneSided op, std::byte* local, size_t size, const RemoteKey& key,
                               uint64_t offset, uint32_t immediate) {
  if (!status_.ok()) return Request::failed(status_);
  if (local == nullptr && size != 0) {
    return Request::failed(invalid_argument(op_name(static_cast<int>(op)), " with a null buffer"));
  }
  if (!established_ || !info_received_) read_socket();
  if (!established_ || !info_received_) {
    auto [req, st] = Request::make_pending();
    st->describe(op_name(static_cast<int>(op)), immediate, peer_name_);
    deferred_.push_back(Deferred{op, local, size, key, offset, immediate, std::move(st)});
    backend_->want_service();
    return std::move(req);
  }
  Status s = do_one_sided(op, local, size, key, offset);
  if (!s.ok()) return Request::failed(std::move(s));
  if (op == OneSided::kPutImm) {
    const ImmRecord r{immediate, 0};
    if (write_now(kImm, &r, sizeof(r), nullptr, 0)) return Request::completed(size);
    auto [req, st] = Request::make_pending();
    st->describe("put_with_immediate", immediate, peer_name_);
    enqueue(kImm, &r, sizeof(r), nullptr, 0, size, std::move(st));
    return std::move(req);
  }
  return Request::completed(size);
}

Request ShmEndpoint::put(const void* local, size_t size, const RemoteKey& remote,
                         uint64_t remote_offset, const MemoryRegion*) {
  return one_sided(OneSided::kPut, const_cast<std::byte*>(static_cast<const std::byte*>(local)),
                   size, remote, remote_offset, 0);
}

Request ShmEndpoint::put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                                        uint64_t remote_offset, uint32_t immediate,
                                        const MemoryRegion*) {
  return one_sided(OneSided::kPutImm, const_cast<std::byte*>(static_cast<const std::byte*>(local)),
                   size, remote, remote_offset, immediate);
}

Request ShmEndpoint::get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
                         const MemoryRegion*) {
  return one_sided(OneSided::kGet, static_cast<std::byte*>(local), size, remote, remote_offset, 0);
}

bool ShmEndpoint::try_pop_immediate(uint32_t& value) {
  if (immediates_.empty()) return false;
  value = immediates_.front();
  immediates_.pop_front();
  return true;
}

}  // namespace myelin::transport::internal::shm
