// ShmBackend: listening socket, connection set-up, shared allocations, the key table and the
// slow path of progress (sockets, liveness).
#include "shm/shm_backend.hpp"

#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>

#include <myelin/core/log.hpp>
#include <myelin/core/record_ring.hpp>

namespace myelin::transport::internal {

Result<std::unique_ptr<BackendContext>> create_shm_backend(const Options& options,
                                                           const ContextInfo& info) {
  MYELIN_ASSIGN_OR_RETURN(auto be, shm::ShmBackend::create(options, info));
  return std::unique_ptr<BackendContext>(std::move(be));
}

namespace shm {

namespace {
// Ring size per direction and the default eager limit. A 1 MiB ring holds ~40 000 small
// messages; eager messages up to 16 KiB are copied through it (twice), larger ones move once.
constexpr size_t kRingCapacity = size_t{1} << 20;
constexpr size_t kDefaultEager = 16 * 1024;
static_assert(kDefaultEager + sizeof(EagerHeader) <
              kRingCapacity / 2 - RecordRing::kRecordHeaderBytes);
// How many progress() calls pass between two looks at the sockets when nothing asks for one:
// often enough to notice a dead peer within a millisecond, rarely enough to cost nothing.
constexpr uint32_t kServiceEvery = 4096;
constexpr int64_t kIncomingTimeoutNs = 30'000'000'000;

uint64_t random_u64() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}
}  // namespace

AllocBook::~AllocBook() {
  for (auto& [base, a] : by_base) {
    if (a.fd >= 0) ::close(a.fd);
  }
}

void KeyTable::release(uint32_t slot, uint64_t token) noexcept {
  KeySlot& s = slots[slot];
  // Pairs with the peer's acquire load of the token before it uses the slot: from here on the
  // peer sees 0 (or a newer token) and refuses the old key.
  if (s.token.load(std::memory_order_relaxed) == token) s.token.store(0, std::memory_order_release);
  free_slots.push_back(slot);
}

bool KeyTable::grant(void* where, size_t length, uint32_t& slot, uint64_t& token) noexcept {
  if (free_slots.empty()) return false;
  slot = free_slots.back();
  free_slots.pop_back();
  token = next_token++;
  KeySlot& s = slots[slot];
  s.kind.store(static_cast<uint64_t>(KeyKind::kGrant), std::memory_order_relaxed);
  s.access.store(static_cast<uint64_t>(Access::kRemoteWrite), std::memory_order_relaxed);
  s.where.store(reinterpret_cast<uintptr_t>(where), std::memory_order_relaxed);
  s.offset.store(0, std::memory_order_relaxed);
  s.length.store(length, std::memory_order_relaxed);
  // Pairs with the writer's compare-exchange on the token: the fields above are visible with it.
  s.token.store(token, std::memory_order_release);
  return true;
}

KeyTable::Revoke KeyTable::try_revoke(uint32_t slot, uint64_t token) noexcept {
  KeySlot& s = slots[slot];
  uint64_t expected = token;
  // Success pairs with a writer's compare-exchange (G -> G|kGrantBusy) in serve_split(): only one
  // of the two takes the bare token, so once this succeeds no writer has started and none will.
  // Acquire (success and failure) pairs with the writer's release stores of G (it handed the grant
  // back, maybe after a partial write) and of G|kGrantDone (all written): what the writer wrote is
  // visible before we copy into or hand back the buffer.
  if (s.token.compare_exchange_strong(expected, 0, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
    free_slots.push_back(slot);
    return Revoke::kTaken;
  }
  if (expected == (token | kGrantDone)) {
    // The writer is done and never touches the word again. Release: pairs with the acquire load
    // of whoever reads the slot next (a grant's new token is stored after this, in grant()).
    s.token.store(0, std::memory_order_release);
    free_slots.push_back(slot);
    return Revoke::kWritten;
  }
  if (expected == (token | kGrantBusy)) return Revoke::kBusy;
  return Revoke::kLost;
}

KeyTable::Revoke KeyTable::revoke(uint32_t slot, uint64_t token, Deadline deadline) noexcept {
  for (;;) {
    const Revoke r = try_revoke(slot, token);
    if (r != Revoke::kBusy || deadline.expired()) return r;
    cpu_relax();
  }
}

namespace {
class ShmRegistration final : public BackendRegistration {
 public:
  ShmRegistration(std::shared_ptr<KeyTable> table, uint32_t slot, uint64_t token)
      : table_(std::move(table)), slot_(slot), token_(token) {}
  ~ShmRegistration() override { table_->release(slot_, token_); }
  [[nodiscard]] Backend backend() const noexcept override { return Backend::kShm; }
  [[nodiscard]] std::vector<uint8_t> remote_key_blob() const override {
    KeyBlob blob;
    blob.slot = slot_;
    blob.token = token_;
    std::vector<uint8_t> out(sizeof(blob));
    std::memcpy(out.data(), &blob, sizeof(blob));
    return out;
  }

 private:
  std::shared_ptr<KeyTable> table_;
  uint32_t slot_;
  uint64_t token_;
};
}  // namespace

bool parse_split_setting(std::string_view text, SplitMode& mode, size_t& threshold) noexcept {
  const auto bytes = [](std::string_view t, size_t& out) {
    if (t.empty() || t.size() > 19) return false;
    size_t v = 0;
    for (const char c : t) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + static_cast<size_t>(c - '0');
    }
    out = v;
    return true;
  };
  size_t v = 0;
  if (text == "off" || text == "0") {
    mode = SplitMode::kOff;
    return true;
  }
  if (text == "auto") {
    mode = SplitMode::kAuto;
    threshold = ShmBackend::kDefaultSplitThreshold;
    return true;
  }
  if (text.starts_with("auto:") && bytes(text.substr(5), v) && v > 0) {
    mode = SplitMode::kAuto;
    threshold = v;
    return true;
  }
  if (bytes(text, v) && v > 0) {
    mode = SplitMode::kOn;
    threshold = v;
    return true;
  }
  return false;
}

bool ShmBackend::split_wanted(size_t size) const noexcept {
  if (size < split_threshold_) return false;
  switch (split_mode_) {
    case SplitMode::kOff:
      return false;
    case SplitMode::kOn:
      return true;
    case SplitMode::kAuto:
      // This process and every peer it is connected to (a lower bound of the ranks on the node)
      // must each have a CPU, or the split waits for descheduled senders (stealing bounds that
      // wait, but the hand-over is then pure overhead).
      return live_.size() + 1 <= online_cpus_;
  }
  return false;
}

Result<std::unique_ptr<ShmBackend>> ShmBackend::create(const Options& options,
                                                       const ContextInfo& info) {
  std::unique_ptr<ShmBackend> be(new ShmBackend(options, info));
  be->ring_capacity_ = kRingCapacity;
  const size_t max_eager = kRingCapacity / 2 - RecordRing::kRecordHeaderBytes - sizeof(EagerHeader);
  be->eager_limit_ =
      options.eager_limit == 0 ? kDefaultEager : std::min(options.eager_limit, max_eager);
  be->probe_value_ = random_u64() | 1;
  if (const char* cma = std::getenv("MYELIN_SHM_CMA");
      cma != nullptr && std::strcmp(cma, "0") == 0) {
    be->cma_allowed_ = false;
  }
  if (const char* split = std::getenv("MYELIN_SHM_SPLIT"); split != nullptr && *split != '\0') {
    if (!parse_split_setting(split, be->split_mode_, be->split_threshold_)) {
      MYELIN_LOG_WARN << "shm: MYELIN_SHM_SPLIT='" << split
                      << "' is not off, auto, auto:<bytes> or <bytes>; keeping the default";
    }
  }
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  be->online_cpus_ = cpus > 0 ? static_cast<size_t>(cpus) : 1;

  const ProcessIdentity self = current_process_identity();
  ShmAddress addr;
  addr.pid = self.pid;
  addr.uid = static_cast<uint32_t>(::getuid());
  addr.start_time = self.start_time;
  char name[64];
  std::snprintf(name, sizeof(name), "myelin-shm.%d.%016llx", self.pid,
                static_cast<unsigned long long>(random_u64()));
  addr.socket_name = name;
  MYELIN_ASSIGN_OR_RETURN(be->listen_, listen_abstract(addr.socket_name));
  be->address_bytes_ = encode_address(addr);

  be->epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!be->epoll_.valid()) return errno_status("epoll_create1 for the shm backend", errno);
  be->watch(be->listen_.get());

  be->book_ = std::make_shared<AllocBook>();
  auto keys = std::make_shared<KeyTable>();
  MYELIN_ASSIGN_OR_RETURN(keys->segment,
                          ShmSegment::create_memfd("myelin-shm-keys", kKeySlots * sizeof(KeySlot)));
  keys->slots = reinterpret_cast<KeySlot*>(keys->segment.data());
  for (uint32_t i = 0; i < kKeySlots; ++i) new (&keys->slots[i]) KeySlot{};
  keys->free_slots.reserve(kKeySlots);
  for (uint32_t i = kKeySlots; i > 0; --i) keys->free_slots.push_back(i - 1);
  // Tokens start at a random point so a key of another backend (or an older one) does not match.
  // Bits 63 and 62 stay clear (kGrantBusy, kGrantDone), even after 2^32 tokens.
  keys->next_token = (random_u64() & uint64_t{0x1fffffff00000000}) | 1;
  be->keys_ = std::move(keys);
  return be;
}

ShmBackend::~ShmBackend() {
  unclaimed_.clear();  // their destructors detach from live_
}

Limits ShmBackend::limits() const noexcept {
  return Limits{
      .max_inline = 0, .eager_limit = eager_limit_, .max_message = options_.max_message_size};
}

void ShmBackend::watch(int fd) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    // Only the blocking mode loses: the Context's wait still wakes every 100 ms.
    MYELIN_LOG_WARN << "shm: epoll_ctl(ADD) failed: " << errno_status("epoll_ctl", errno);
  }
}

void ShmBackend::unwatch(int fd) noexcept {
  if (fd >= 0) (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

void ShmBackend::attach(ShmEndpoint* ep) {
  live_.push_back(ep);
}

void ShmBackend::detach(ShmEndpoint* ep) noexcept {
  auto it = std::find(live_.begin(), live_.end(), ep);
  if (it != live_.end()) live_.erase(it);
}

const SharedAlloc* ShmBackend::find_alloc(const void* p, size_t n) const noexcept {
  const auto& m = book_->by_base;
  if (m.empty()) return nullptr;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = m.upper_bound(addr);
  if (it == m.begin()) return nullptr;
  --it;
  const SharedAlloc& a = it->second;
  if (addr - it->first > a.size || n > a.size - (addr - it->first)) return nullptr;
  return &a;
}

Result<std::shared_ptr<void>> ShmBackend::allocate_shared(size_t size) {
  if (size == 0) return invalid_argument("allocate_shared(0)");
  UniqueFd fd(::memfd_create("myelin-shm-region", MFD_CLOEXEC));
  if (!fd.valid()) return errno_status("memfd_create for a shared region", errno);
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return errno_status("ftruncate of a shared region to " + std::to_string(size) + " bytes", errno,
                        StatusCode::kResourceExhausted);
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) {
    return errno_status("mmap of a shared region of " + std::to_string(size) + " bytes", errno,
                        StatusCode::kResourceExhausted);
  }
  SharedAlloc alloc{next_alloc_id_++, static_cast<std::byte*>(p), size, fd.get()};
  book_->by_base.emplace(reinterpret_cast<uintptr_t>(p), alloc);
  (void)fd.release();  // the book owns it now
  for (ShmEndpoint* ep : live_) ep->announce_alloc(alloc);
  std::weak_ptr<AllocBook> weak = book_;
  const uint64_t id = alloc.id;
  return std::shared_ptr<void>(p, [weak, size, id](void* q) {
    ::munmap(q, size);
    if (auto book = weak.lock()) {
      auto it = book->by_base.find(reinterpret_cast<uintptr_t>(q));
      if (it != book->by_base.end() && it->second.id == id) {
        ::close(it->second.fd);
        book->by_base.erase(it);
        book->freed.push_back(id);
      }
    }
  });
}

Result<std::unique_ptr<BackendRegistration>> ShmBackend::register_memory(
    const RegionState& region) {
  if (keys_->free_slots.empty()) {
    return resource_exhausted("the shm key table is full (", kKeySlots,
                              " registrations); deregister regions no longer used");
  }
  const uint32_t slot = keys_->free_slots.back();
  keys_->free_slots.pop_back();
  const uint64_t token = keys_->next_token++;
  KeySlot& s = keys_->slots[slot];
  if (const SharedAlloc* a = find_alloc(region.data, region.size)) {
    s.kind.store(static_cast<uint64_t>(KeyKind::kShared), std::memory_order_relaxed);
    s.where.store(a->id, std::memory_order_relaxed);
    s.offset.store(static_cast<uint64_t>(static_cast<std::byte*>(region.data) - a->base),
                   std::memory_order_relaxed);
  } else {
    s.kind.store(static_cast<uint64_t>(KeyKind::kCma), std::memory_order_relaxed);
    s.where.store(reinterpret_cast<uintptr_t>(region.data), std::memory_order_relaxed);
    s.offset.store(0, std::memory_order_relaxed);
  }
  s.access.store(static_cast<uint64_t>(region.access), std::memory_order_relaxed);
  s.length.store(region.size, std::memory_order_relaxed);
  // Pairs with the peer's acquire load of the token: the fields above are visible with it.
  s.token.store(token, std::memory_order_release);
  return std::unique_ptr<BackendRegistration>(new ShmRegistration(keys_, slot, token));
}

Result<std::unique_ptr<Endpoint>> ShmBackend::connect(std::span<const uint8_t> peer_address,
                                                      const std::string& peer_name,
                                                      Deadline deadline) {
  MYELIN_ASSIGN_OR_RETURN(ShmAddress peer, decode_address(peer_address));
  std::vector<uint8_t> bytes(peer_address.begin(), peer_address.end());
  if (bytes == address_bytes_)
    return invalid_argument("shm connect() to this backend's own address");
  service();  // a connection the peer made already is claimed rather than duplicated
  if (auto it = unclaimed_.find(bytes); it != unclaimed_.end()) {
    std::unique_ptr<ShmEndpoint> ep = std::move(it->second);
    unclaimed_.erase(it);
    ep->set_peer_name(peer_name);
    return std::unique_ptr<Endpoint>(std::move(ep));
  }
  for (ShmEndpoint* ep : live_) {
    if (ep->peer_bytes() == bytes) {
      return already_exists("an shm endpoint to ", peer_name, " exists already");
    }
  }
  if (!process_is_alive(peer.pid, peer.start_time)) {
    return unavailable("shm peer ", peer_name, " (pid ", peer.pid, ") is not running");
  }
  MYELIN_ASSIGN_OR_RETURN(UniqueFd sock, connect_abstract(peer.socket_name, deadline));
  auto ep = std::make_unique<ShmEndpoint>(this, bytes, peer, peer_name);
  if (address_bytes_ < bytes) {
    MYELIN_RETURN_IF_ERROR(ep->establish_as_dialer(std::move(sock), deadline));
  } else {
    CtlHeader h;
    h.type = static_cast<uint16_t>(CtlType::kDialMe);
    MYELIN_RETURN_IF_ERROR(send_ctl(sock.get(), h, address_bytes_, {}, deadline));
    ep->set_dial_socket(std::move(sock));
    MYELIN_RETURN_IF_ERROR(ep->send_info());
  }
  return std::unique_ptr<Endpoint>(std::move(ep));
}

void ShmBackend::accept_new() {
  for (;;) {
    UniqueFd s(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!s.valid()) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        MYELIN_LOG_WARN << "shm: accept4: " << errno_status("accept4", errno);
      }
      return;
    }
    watch(s.get());
    incoming_.push_back(Incoming{std::move(s), monotonic_ns()});
  }
}

void ShmBackend::handle_incoming() {
  const int64_t now = monotonic_ns();
  for (size_t i = 0; i < incoming_.size();) {
    Incoming& in = incoming_[i];
    CtlMessage msg;
    auto got = recv_ctl(in.sock.get(), msg);
    bool drop = false;
    if (!got.ok()) {
      MYELIN_LOG_WARN << "shm: refusing a connection: " << got.status();
      drop = true;
    } else if (*got == RecvOutcome::kEmpty) {
      drop = now - in.since_ns > kIncomingTimeoutNs;
    } else if (*got == RecvOutcome::kClosed) {
      drop = true;
    } else {
      drop = true;  // the socket moves to an endpoint or is refused
      const auto type = static_cast<CtlType>(msg.header.type);
      auto peer = decode_address(msg.text);
      if (!peer.ok() || (type != CtlType::kHello && type != CtlType::kDialMe)) {
        MYELIN_LOG_WARN << "shm: refusing a connection that opened with message type "
                        << msg.header.type << ": "
                        << (peer.ok() ? std::string("unexpected type") : peer.status().to_string());
      } else {
        ShmEndpoint* existing = nullptr;
        for (ShmEndpoint* ep : live_) {
          if (ep->peer_bytes() == msg.text) existing = ep;
        }
        const std::string label = "pid " + std::to_string(peer->pid) + " (shm)";
        unwatch(in.sock.get());
        if (type == CtlType::kHello) {
          if (existing != nullptr && existing->established()) {
            MYELIN_LOG_WARN << "shm: a second connection from " << label << " refused";
          } else if (existing != nullptr) {
            if (Status s = existing->establish_from_hello(std::move(in.sock), msg, false);
                !s.ok()) {
              MYELIN_LOG_WARN << "shm: connection from " << label << " refused: " << s;
            }
          } else {
            auto ep = std::make_unique<ShmEndpoint>(this, msg.text, *peer, label);
            if (Status s = ep->establish_from_hello(std::move(in.sock), msg, false); !s.ok()) {
              MYELIN_LOG_WARN << "shm: connection from " << label << " refused: " << s;
            } else {
              unclaimed_[msg.text] = std::move(ep);
            }
          }
        } else if (existing != nullptr) {
          // Our dial crossed its dial-me: the info and allocations it sent with it are read from
          // this socket, so it need not progress before we can put/get.
          existing->adopt_info_socket(std::move(in.sock));
        } else {  // kDialMe, and we have not dialed it yet
          auto ep = std::make_unique<ShmEndpoint>(this, msg.text, *peer, label);
          if (Status s = ep->establish_as_dialer(std::move(in.sock), Deadline::after_ms(1000));
              !s.ok()) {
            MYELIN_LOG_WARN << "shm: dialing back " << label << " failed: " << s;
          } else {
            unclaimed_[msg.text] = std::move(ep);
          }
        }
      }
    }
    if (drop) {
      if (in.sock.valid()) unwatch(in.sock.get());
      incoming_.erase(incoming_.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
}

void ShmBackend::service() {
  service_soon_ = false;
  accept_new();
  if (!incoming_.empty()) handle_incoming();
  const int64_t now = monotonic_ns();
  // Index loop: service() of one endpoint never adds or removes endpoints.
  for (size_t i = 0; i < live_.size(); ++i) live_[i]->service(now);
  if (!book_->freed.empty()) {
    for (uint64_t id : book_->freed) {
      for (ShmEndpoint* ep : live_) ep->announce_free(id);
    }
    book_->freed.clear();
  }
  // Unclaimed connections whose peer went away are dropped.
  for (auto it = unclaimed_.begin(); it != unclaimed_.end();) {
    it = it->second->failed() ? unclaimed_.erase(it) : std::next(it);
  }
}

size_t ShmBackend::progress() {
  if (armed_) {
    for (ShmEndpoint* ep : live_) ep->disarm();
    armed_ = false;
    service();
  } else if (service_soon_ || ++ticks_ % kServiceEvery == 0 || !incoming_.empty()) {
    service();
  }
  size_t n = 0;
  for (size_t i = 0; i < live_.size(); ++i) n += live_[i]->progress();
  return n;
}

bool ShmBackend::arm_wait() {
  if (service_soon_ || !incoming_.empty() || !book_->freed.empty()) return false;
  armed_ = true;
  for (ShmEndpoint* ep : live_) {
    if (!ep->arm()) {
      for (ShmEndpoint* e : live_) e->disarm();
      armed_ = false;
      return false;
    }
  }
  return true;
}

}  // namespace shm
}  // namespace myelin::transport::internal
