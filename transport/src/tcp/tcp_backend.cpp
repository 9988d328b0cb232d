// TCP backend: listening socket, epoll progress engine, the symmetric connection rule.
#include "tcp/tcp_backend.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <myelin/core/log.hpp>

#include "registry.hpp"
#include "tcp/tcp_endpoint.hpp"
#include "wire.hpp"

namespace myelin::transport::internal {

Result<std::unique_ptr<BackendContext>> create_tcp_backend(const Options& options,
                                                           const ContextInfo& info) {
  return tcp::TcpBackend::create(options, info);
}

namespace tcp {

namespace {
constexpr size_t kDefaultEager = 64 * 1024;
constexpr int64_t kTimerPeriodNs = 10'000'000;
constexpr uint32_t kEpollEvery = 16;
constexpr uint32_t kIdleEpollEvery = 4;
static_assert(kEpollEvery % kIdleEpollEvery == 0, "a busy stretch must also reach epoll_wait");
// A wait asleep in its sole connection's recv declines every kBlockingEpollEvery-th time (and
// after a sleep that brought nothing), so the Context sleeps on the epoll set, listener included.
// Declining costs a few system calls (the connection goes back into the set and out again), hence
// not more often.
constexpr uint32_t kBlockingEpollEvery = 64;

class TcpRegistration final : public BackendRegistration {
 public:
  TcpRegistration(std::shared_ptr<RegionTable> table, uint64_t id, uint64_t instance)
      : table_(std::move(table)), id_(id), instance_(instance) {}
  ~TcpRegistration() override { table_->regions.erase(id_); }
  [[nodiscard]] Backend backend() const noexcept override { return Backend::kTcp; }
  [[nodiscard]] std::vector<uint8_t> remote_key_blob() const override {
    std::vector<uint8_t> blob(8);
    store_le(blob.data(), instance_, 8);
    return blob;
  }

 private:
  std::shared_ptr<RegionTable> table_;
  uint64_t id_;
  uint64_t instance_;
};

void set_nodelay(int fd) {
  int one = 1;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Both ends of a connected IPv4 socket on this host: the peer on loopback, or the same address at
// both ends (a connection to this host's own interface address).
bool same_host(int fd) {
  sockaddr_in local{};
  sockaddr_in peer{};
  socklen_t local_len = sizeof(local);
  socklen_t peer_len = sizeof(peer);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
      getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0 ||
      local.sin_family != AF_INET || peer.sin_family != AF_INET) {
    return false;
  }
  return (ntohl(peer.sin_addr.s_addr) >> 24) == 127 ||
         local.sin_addr.s_addr == peer.sin_addr.s_addr;
}

// Options::tcp_local_send_buffer on a connection within this host (docs/transport.md, "Send
// buffer of same-host connections"); remote connections keep the kernel's autotuning.
void limit_local_send_buffer(int fd, size_t bytes) {
  if (bytes == 0 || !same_host(fd)) return;
  const int v = static_cast<int>(bytes);  // validate() caps it far below INT_MAX
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v)) != 0) {
    MYELIN_LOG_DEBUG << "tcp: SO_SNDBUF " << bytes << ": " << errno_status("setsockopt", errno);
  }
}

// Connection sockets stay in blocking mode: every send and receive passes MSG_DONTWAIT except
// the one receive a spin-then-block wait sleeps in (Connection::on_readable), which needs no
// fcntl per wait that way.
Status set_blocking(int fd) {
  const int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) return errno_status("fcntl", errno);
  return ok_status();
}

Result<uint32_t> interface_ipv4(const std::string& iface) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return errno_status("getifaddrs", errno);
  uint32_t found = 0;
  bool ok = false;
  for (ifaddrs* a = list; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr != nullptr && a->ifa_addr->sa_family == AF_INET && iface == a->ifa_name) {
      found = reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr.s_addr;
      ok = true;
      break;
    }
  }
  freeifaddrs(list);
  if (!ok) return invalid_argument("network interface '", iface, "' has no IPv4 address");
  return found;
}

// The IPv4 address this host's name resolves to, if any.
bool hostname_ipv4(uint32_t& out) {
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) return false;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host, nullptr, &hints, &res) != 0 || res == nullptr) return false;
  out = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr.s_addr;
  freeaddrinfo(res);
  return true;
}

Result<int> dial(const TcpAddress& peer, Deadline deadline) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno_status("socket", errno);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(peer.port);
  sa.sin_addr.s_addr = peer.ipv4;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 && errno != EINPROGRESS) {
    const int err = errno;
    ::close(fd);
    return errno_status("connect to " + peer.to_string(), err, StatusCode::kUnavailable);
  }
  for (;;) {
    pollfd p{fd, POLLOUT, 0};
    const int r = ::poll(&p, 1, deadline.remaining_ms_for_poll());
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      ::close(fd);
      return timeout_error("connect to ", peer.to_string(), " did not complete by the deadline");
    }
    break;
  }
  int err = 0;
  socklen_t len = sizeof(err);
  (void)getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    ::close(fd);
    return errno_status("connect to " + peer.to_string(), err, StatusCode::kUnavailable);
  }
  set_nodelay(fd);
  if (Status s = set_blocking(fd); !s.ok()) {
    ::close(fd);
    return s;
  }
  return fd;
}
}  // namespace

TcpBackend::TcpBackend(const Options& options, const ContextInfo& info)
    : options_(options), info_(info) {
  limits_.max_inline = 0;
  limits_.eager_limit = std::min(options.eager_limit != 0 ? options.eager_limit : kDefaultEager,
                                 options.max_message_size);
  limits_.max_message = options.max_message_size;
}

Result<std::unique_ptr<BackendContext>> TcpBackend::create(const Options& options,
                                                           const ContextInfo& info) {
  std::unique_ptr<TcpBackend> be(new TcpBackend(options, info));
  MYELIN_RETURN_IF_ERROR(be->open_listener());
  return std::unique_ptr<BackendContext>(std::move(be));
}

Status TcpBackend::open_listener() {
  uint32_t bind_ip = htonl(INADDR_LOOPBACK);
  uint32_t advertise = bind_ip;
  bool fallback_to_loopback = false;
  if (!options_.device.empty()) {
    MYELIN_ASSIGN_OR_RETURN(bind_ip, interface_ipv4(options_.device));
    advertise = bind_ip;
  } else if (!options_.listen_address.empty()) {
    in_addr a{};
    if (inet_pton(AF_INET, options_.listen_address.c_str(), &a) != 1) {
      return invalid_argument("listen address '", options_.listen_address,
                              "' is not an IPv4 address");
    }
    bind_ip = a.s_addr;
    advertise = bind_ip;
    if (bind_ip == htonl(INADDR_ANY) && !hostname_ipv4(advertise)) {
      advertise = htonl(INADDR_LOOPBACK);
    }
  } else if (hostname_ipv4(bind_ip)) {
    advertise = bind_ip;
    fallback_to_loopback = true;
  }

  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return errno_status("socket", errno);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = bind_ip;
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    if (!fallback_to_loopback) {
      return errno_status("bind to " + TcpAddress{bind_ip, 0, 0}.to_string(), errno);
    }
    MYELIN_LOG_INFO << "tcp: cannot bind the hostname's address; listening on loopback";
    advertise = sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      return errno_status("bind to 127.0.0.1", errno);
    }
  }
  if (::listen(listen_fd_, 1024) != 0) return errno_status("listen", errno);
  socklen_t len = sizeof(sa);
  if (getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&sa), &len) != 0) {
    return errno_status("getsockname", errno);
  }
  self_.ipv4 = advertise;
  self_.port = ntohs(sa.sin_port);
  while (self_.instance == 0) {
    if (getrandom(&self_.instance, sizeof(self_.instance), 0) != sizeof(self_.instance)) {
      return errno_status("getrandom", errno);
    }
  }
  self_bytes_ = self_.encode();

  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) return errno_status("epoll_create1", errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;  // the listener
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev) != 0) {
    return errno_status("epoll_ctl(listener)", errno);
  }
  MYELIN_LOG_INFO << "tcp: " << info_.name << " listening on " << self_.to_string();
  return ok_status();
}

TcpBackend::~TcpBackend() {
  std::vector<std::shared_ptr<Connection>> all;
  for (auto& [p, c] : live_) all.push_back(c);
  for (auto& c : all) c->fail(cancelled("the tcp backend of ", info_.name, " is closing"), false);
  hot_ = nullptr;
  live_.clear();
  by_peer_.clear();
  pending_reads_.clear();
  graveyard_.clear();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

Status TcpBackend::watch(Connection& conn) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &conn;
  conn.want_write = false;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, conn.fd(), &ev) != 0) {
    return errno_status("epoll_ctl(add connection)", errno);
  }
  return ok_status();
}

void TcpBackend::update_events(Connection& conn) {
  if (conn.fd() < 0) return;
  const bool want = conn.has_output();
  if (&conn == detached_) {
    if (want) reattach();  // EPOLLOUT must come from the set again
    return;
  }
  if (want == conn.want_write) return;
  epoll_event ev{};
  ev.events = want ? (EPOLLIN | EPOLLOUT) : EPOLLIN;
  ev.data.ptr = &conn;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, conn.fd(), &ev) == 0) conn.want_write = want;
}

void TcpBackend::accept_all() {
  for (;;) {
    // Blocking mode, as dialed sockets (see set_blocking); Linux does not pass the listener's
    // O_NONBLOCK on to accepted sockets.
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        MYELIN_LOG_WARN << "tcp: accept failed: " << errno_status("accept4", errno);
      }
      return;
    }
    set_nodelay(fd);
    limit_local_send_buffer(fd, options_.tcp_local_send_buffer);
    auto conn = std::make_shared<Connection>(*this, fd, Connection::State::kOpen);
    conn->deadline_ns = Deadline::after(options_.timeout).at_ns();
    timers_armed_ = true;
    if (Status s = watch(*conn); !s.ok()) {
      MYELIN_LOG_WARN << "tcp: dropping an accepted connection: " << s;
      continue;  // the Connection closes the fd
    }
    live_.emplace(conn.get(), conn);
    // The hello may already be waiting.
    pending_reads_.push_back(conn);
  }
}

Result<std::unique_ptr<Endpoint>> TcpBackend::connect(std::span<const uint8_t> peer_address,
                                                      const std::string& peer_name,
                                                      Deadline deadline) {
  MYELIN_ASSIGN_OR_RETURN(TcpAddress peer, TcpAddress::decode(peer_address));
  std::vector<uint8_t> key(peer_address.begin(), peer_address.end());
  if (key == self_bytes_) return invalid_argument("tcp: connect to this Context's own address");
  if (auto it = by_peer_.find(key); it != by_peer_.end()) {
    std::shared_ptr<Connection> conn = it->second;
    if (conn->claimed) return already_exists("an endpoint to ", peer_name, " already exists");
    conn->claimed = true;
    return std::unique_ptr<Endpoint>(new TcpEndpoint(*this, std::move(conn), peer_name));
  }
  std::shared_ptr<Connection> conn;
  if (self_bytes_ < key) {
    // The smaller address dials.
    MYELIN_ASSIGN_OR_RETURN(int fd, dial(peer, deadline));
    limit_local_send_buffer(fd, options_.tcp_local_send_buffer);
    conn = std::make_shared<Connection>(*this, fd, Connection::State::kOpen);
    conn->dialer = true;
    conn->set_peer(key, peer_name);
    conn->queue_hello(false);
    MYELIN_RETURN_IF_ERROR(watch(*conn));
  } else {
    conn = std::make_shared<Connection>(*this, -1, Connection::State::kAwaiting);
    conn->set_peer(key, peer_name);
  }
  conn->deadline_ns = deadline.is_never() ? 0 : deadline.at_ns();
  timers_armed_ = timers_armed_ || conn->deadline_ns != 0;
  conn->claimed = true;
  live_.emplace(conn.get(), conn);
  by_peer_[key] = conn;
  conn->flush();
  return std::unique_ptr<Endpoint>(new TcpEndpoint(*this, std::move(conn), peer_name));
}

Status TcpBackend::on_hello(Connection& conn, const Hello& hello, bool reply) {
  if (hello.target != self_bytes_) {
    auto meant = TcpAddress::decode(hello.target);
    return protocol_error("hello from ", hello.name, " meant for ",
                          meant.ok() ? meant->to_string() : "?", " instance ",
                          meant.ok() ? meant->instance : 0, ", but this is ", self_.to_string(),
                          " instance ", self_.instance);
  }
  if (reply) {
    if (hello.sender != conn.peer_address()) {
      return protocol_error("dialed ", conn.peer_name(), " but ", hello.name, " answered");
    }
    conn.deadline_ns = 0;
    return ok_status();
  }
  auto it = by_peer_.find(hello.sender);
  if (it != by_peer_.end()) {
    std::shared_ptr<Connection> awaiting = it->second;
    if (awaiting->state() != Connection::State::kAwaiting) {
      return protocol_error("duplicate connection from ", hello.name);
    }
    auto self = live_.find(&conn);
    awaiting->adopt(conn);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = awaiting.get();
    awaiting->want_write = false;
    (void)epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, awaiting->fd(), &ev);
    awaiting->queue_hello(true);
    if (self != live_.end()) {
      graveyard_.push_back(self->second);
      live_.erase(self);
    }
    pending_reads_.push_back(awaiting);
    awaiting->flush();
    return ok_status();
  }
  conn.set_peer(hello.sender, hello.name);
  conn.deadline_ns = 0;
  by_peer_[hello.sender] = live_.at(&conn);
  conn.queue_hello(true);
  conn.flush();
  return ok_status();
}

void TcpBackend::on_failed(Connection& conn) {
  if (&conn == hot_) hot_ = nullptr;
  if (&conn == detached_) detached_ = nullptr;
  if (conn.fd() >= 0) (void)epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, conn.fd(), nullptr);
  if (auto it = by_peer_.find(conn.peer_address());
      it != by_peer_.end() && it->second.get() == &conn) {
    by_peer_.erase(it);
  }
  if (auto it = live_.find(&conn); it != live_.end()) {
    graveyard_.push_back(it->second);
    live_.erase(it);
  }
}

void TcpBackend::release(Connection& conn) {
  on_failed(conn);
}

const RegionState* TcpBackend::find_region(uint64_t id) const {
  auto it = regions_->regions.find(id);
  return it == regions_->regions.end() ? nullptr : it->second;
}

Result<std::unique_ptr<BackendRegistration>> TcpBackend::register_memory(
    const RegionState& region) {
  regions_->regions[region.id] = &region;
  return std::unique_ptr<BackendRegistration>(
      new TcpRegistration(regions_, region.id, self_.instance));
}

void TcpBackend::check_timers() {
  if (!timers_armed_) return;  // no clock read per progress call while no deadline is set
  const int64_t now = monotonic_ns();
  if (now < next_timer_check_ns_) return;
  next_timer_check_ns_ = now + kTimerPeriodNs;
  std::vector<std::shared_ptr<Connection>> expired;
  bool armed = false;
  for (auto& [p, c] : live_) {
    if (c->deadline_ns != 0 && now >= c->deadline_ns) expired.push_back(c);
    armed = armed || c->deadline_ns != 0;
  }
  timers_armed_ = armed;
  for (auto& c : expired) {
    if (c->state() == Connection::State::kAwaiting) {
      c->fail(timeout_error(c->peer_name(),
                            " did not connect by the connect deadline (its address "
                            "is smaller, so it dials; did it call connect()?)"),
              true);
    } else if (c->dialer) {
      c->fail(timeout_error("no hello reply from ", c->peer_name(), " by the connect deadline"),
              true);
    } else {
      c->fail(timeout_error("an accepted connection sent no hello within ",
                            options_.timeout.count(), " ms"),
              true);
    }
  }
}

size_t TcpBackend::progress() {
  size_t handled = 0;
  // Hot path: the connection that delivered last is read directly (one recv), saving the
  // epoll_wait per message on a busy connection and per idle poll while waiting on it. Only while
  // it has nothing queued to write (its EPOLLOUT comes from epoll). epoll_wait still runs on every
  // kEpollEvery-th call and on every kIdleEpollEvery-th quiet call, so the listener and other
  // connections wait a few polls at most. Not after a sleep on the epoll set: what woke it may be
  // any socket, and with the hot one quiet the next few polls would each find the set still
  // readable, return to it at once and read the hot socket again (a recursive doubling on 4 ranks
  // talks to a different peer each step: 2 wasted polls and 3-4 empty recvs per call).
  // With several connections, a hot one found quiet stops being hot and this very poll asks the
  // set: the message a wait needs is then likely on another connection (the next step's peer of a
  // collective), and a yielding wait, which hands the CPU on after every empty poll, would
  // otherwise see it only after up to kIdleEpollEvery turns. Idle polls then cost one epoll_wait
  // each, as many system calls as the empty recv they replace; the set makes a connection hot
  // again when it delivers. One connection (and a half-way payload) keeps the direct reads.
  const bool woken = slept_on_set_;
  slept_on_set_ = false;
  if (hot_ != nullptr && !hot_->want_write && hot_->fd() >= 0 && !woken) {
    ++polls_;
    const bool got = hot_->on_readable() > 0;
    if (!got && live_.size() > 1 && hot_ != nullptr && !hot_->bulk_pending()) {
      if (detached_ == hot_) reattach();  // the set must report it again
      hot_ = nullptr;
    } else if (got ? polls_ % kEpollEvery != 0 : polls_ % kIdleEpollEvery != 0) {
      handled = got ? 1 : 0;
      finish_progress(handled);
      if (handled == 0) yield_if_bulk_stalled();
      return handled;
    }
    handled = got ? 1 : 0;
  }
  handled += serve_set(0);
  finish_progress(handled);
  if (handled == 0) yield_if_bulk_stalled();
  return handled;
}

size_t TcpBackend::serve_set(int timeout_ms) {
  size_t handled = 0;
  epoll_event ev[64];
  const int n = epoll_wait(epoll_fd_, ev, 64, timeout_ms);
  for (int i = 0; i < n; ++i) {
    ++handled;
    if (ev[i].data.ptr == nullptr) {
      accept_all();
      continue;
    }
    auto* c = static_cast<Connection*>(ev[i].data.ptr);
    if (live_.find(c) == live_.end()) continue;  // adopted or failed earlier in this batch
    if ((ev[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) != 0 && c->on_readable() > 0 &&
        c->fd() >= 0) {
      if (detached_ != nullptr && detached_ != c) reattach();  // only the hot one may be out
      hot_ = c;
    }
    if ((ev[i].events & EPOLLOUT) != 0 && c->fd() >= 0) c->flush();
  }
  return handled;
}

// A busy-polling rank that found nothing to do while a large payload is half-way (its socket's
// send buffer full, or the rest of a payload not there yet) offers its CPU: on a host with fewer
// free cores than busy ranks the peer, or the kernel's network processing, may need this very CPU
// to move those bytes, and spinning until the time slice ends starves the transfer (1 MiB busy
// bandwidth collapses to a tenth). Small messages never get here: no payload is half-way, so
// ping-pong latency keeps its pure spin.
void TcpBackend::yield_if_bulk_stalled() {
  if (hot_ != nullptr && hot_->bulk_pending()) sched_yield();
}

bool TcpBackend::progress_blocking(int max_ms, size_t& handled) {
  if (!pending_reads_.empty() || !graveyard_.empty()) return false;
  if (live_.size() != 1) {
    sleeps_on_set_ = true;
    // Several connections (or none): sleep in the set itself and serve what it reports, one
    // system call per wakeup fewer than the Context's poll on the set followed by progress().
    reattach();
    handled = serve_set(max_ms);
    finish_progress(handled);
    return true;
  }
  Connection& c = *live_.begin()->second;
  if (c.state() != Connection::State::kOpen || c.fd() < 0 || c.deadline_ns != 0) return false;
  // Declines every kBlockingEpollEvery-th call, and the call after a sleep that brought nothing:
  // the Context then sleeps on the epoll set, so a connection on the listener waits at most one
  // sleep while this one is quiet, and a few dozen messages while it is busy.
  if (++polls_ % kBlockingEpollEvery == 0 || quiet_sleep_) {
    quiet_sleep_ = false;
    return false;
  }
  if (!c.has_output() && detached_ != &c) {
    // Out of the epoll set while it sleeps in recv: a registered socket costs every arriving
    // segment a callback into the set (0.3-0.5 us per one-way in a C ping-pong on this VM).
    if (detached_ != nullptr) reattach();
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c.fd(), nullptr) == 0) {
      detached_ = &c;
      c.want_write = false;
    }
  }
  hot_ = &c;               // progress() reads it directly, the set no longer reports it
  sleeps_on_set_ = false;  // wait_and_serve() drops a watermark raised for a sleep on the set
  handled = c.wait_and_serve(max_ms) > 0 ? 1 : 0;
  quiet_sleep_ = handled == 0;
  finish_progress(handled);
  return true;
}

void TcpBackend::reattach() {
  Connection* c = detached_;
  detached_ = nullptr;
  if (c == nullptr || c->fd() < 0) return;
  epoll_event ev{};
  ev.events = c->has_output() ? (EPOLLIN | EPOLLOUT) : EPOLLIN;
  ev.data.ptr = c;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, c->fd(), &ev) == 0) {
    c->want_write = c->has_output();
  } else {
    c->fail(errno_status("epoll_ctl(re-add connection)", errno), true);
  }
}

bool TcpBackend::arm_wait() {
  sleeps_on_set_ = true;
  reattach();  // the Context is about to sleep on the set: it must see every socket
  slept_on_set_ = pending_reads_.empty();
  return slept_on_set_;
}

void TcpBackend::finish_progress(size_t& handled) {
  while (!pending_reads_.empty()) {
    std::vector<std::shared_ptr<Connection>> reads;
    reads.swap(pending_reads_);
    for (auto& c : reads) {
      if (c->fd() >= 0) c->on_readable();
    }
    handled += reads.size();
  }
  check_timers();
  for (const auto& c : graveyard_) {
    if (c.get() == hot_) hot_ = nullptr;
    if (c.get() == detached_) detached_ = nullptr;
  }
  graveyard_.clear();
}

}  // namespace tcp
}  // namespace myelin::transport::internal
