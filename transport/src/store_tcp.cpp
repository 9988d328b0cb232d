// TcpStoreServer (a poll(2) loop on its own thread) and the TcpStore client.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include <myelin/core/log.hpp>
#include <myelin/transport/bootstrap.hpp>

#include "wire.hpp"

namespace myelin::transport {

namespace {
using internal::WireReader;
using internal::WireWriter;

enum Op : uint8_t { kSet = 1, kGet = 2, kAdd = 3, kContains = 4 };
enum Reply : uint8_t { kOk = 0, kNotFound = 1, kBadRequest = 2, kNotCounter = 3 };
constexpr size_t kMaxKey = 1024;
constexpr size_t kMaxValue = 16u << 20;
constexpr size_t kMaxMessage = kMaxValue + kMaxKey + 64;

Result<uint32_t> resolve_ipv4(const std::string& host) {
  if (host.empty() || host == "0.0.0.0") return htonl(INADDR_ANY);
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) == 1) return a.s_addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    return unavailable("cannot resolve store host '", host, "': ", gai_strerror(rc));
  }
  const uint32_t ip = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr.s_addr;
  freeaddrinfo(res);
  return ip;
}

bool parse_counter(const std::vector<uint8_t>& v, int64_t& out) {
  if (v.empty() || v.size() > 20) return false;
  const char* b = reinterpret_cast<const char*>(v.data());
  auto [p, ec] = std::from_chars(b, b + v.size(), out);
  return ec == std::errc() && p == b + v.size();
}

std::vector<uint8_t> counter_bytes(int64_t v) {
  const std::string s = std::to_string(v);
  return std::vector<uint8_t>(s.begin(), s.end());
}
}  // namespace

// ---- server -------------------------------------------------------------------------------------

struct TcpStoreServer::Impl {
  int listen_fd = -1;
  int wake_fd = -1;
  uint16_t port = 0;
  std::thread thread;
  struct Client {
    int fd;
    std::vector<uint8_t> in;
    std::vector<uint8_t> out;
    bool close_after_write = false;
  };
  std::vector<Client> clients;                       // server thread only
  std::map<std::string, std::vector<uint8_t>> data;  // server thread only

  ~Impl() {
    if (thread.joinable()) {
      const uint64_t one = 1;
      (void)::write(wake_fd, &one, sizeof(one));
      thread.join();
    }
    for (auto& c : clients) ::close(c.fd);
    if (listen_fd >= 0) ::close(listen_fd);
    if (wake_fd >= 0) ::close(wake_fd);
  }

  static void respond(Client& c, Reply status, std::span<const uint8_t> body) {
    std::vector<uint8_t> msg;
    WireWriter w(msg);
    w.u32(static_cast<uint32_t>(1 + body.size()));
    w.u8(status);
    w.bytes(body);
    c.out.insert(c.out.end(), msg.begin(), msg.end());
  }

  void bad(Client& c, std::string_view why) {
    MYELIN_LOG_WARN << "store server: closing a client connection: " << why;
    respond(c, kBadRequest, {});
    c.close_after_write = true;
  }

  void handle(Client& c, std::span<const uint8_t> body) {
    WireReader r(body);
    uint8_t op = 0;
    uint16_t klen = 0;
    std::string key;
    if (!r.u8(op) || op < kSet || op > kContains) return bad(c, "unknown operation");
    if (!r.u16(klen) || klen == 0 || klen > kMaxKey || !r.string(klen, key)) {
      return bad(c, "bad key length");
    }
    switch (op) {
      case kSet: {
        uint32_t vlen = 0;
        std::span<const uint8_t> value;
        if (!r.u32(vlen) || vlen > kMaxValue || !r.bytes(vlen, value) || !r.at_end()) {
          return bad(c, "malformed set");
        }
        data[key].assign(value.begin(), value.end());
        return respond(c, kOk, {});
      }
      case kGet: {
        if (!r.at_end()) return bad(c, "malformed get");
        auto it = data.find(key);
        if (it == data.end()) return respond(c, kNotFound, {});
        return respond(c, kOk, it->second);
      }
      case kAdd: {
        uint64_t raw = 0;
        if (!r.u64(raw) || !r.at_end()) return bad(c, "malformed add");
        const auto delta = static_cast<int64_t>(raw);
        int64_t cur = 0;
        auto it = data.find(key);
        if (it != data.end() && !parse_counter(it->second, cur)) {
          return respond(c, kNotCounter, {});
        }
        int64_t next = 0;
        if (__builtin_add_overflow(cur, delta, &next)) return respond(c, kNotCounter, {});
        data[key] = counter_bytes(next);
        std::vector<uint8_t> body8;
        WireWriter(body8).u64(static_cast<uint64_t>(next));
        return respond(c, kOk, body8);
      }
      case kContains: {
        if (!r.at_end()) return bad(c, "malformed contains");
        const uint8_t found = data.count(key) != 0 ? 1 : 0;
        return respond(c, kOk, std::span<const uint8_t>(&found, 1));
      }
    }
  }

  // Parses every complete request in c.in.
  void parse(Client& c) {
    size_t pos = 0;
    while (!c.close_after_write && c.in.size() - pos >= 4) {
      const uint32_t len = static_cast<uint32_t>(internal::load_le(c.in.data() + pos, 4));
      if (len == 0 || len > kMaxMessage) {
        bad(c, "request length " + std::to_string(len) + " out of bounds");
        break;
      }
      if (c.in.size() - pos - 4 < len) break;
      handle(c, std::span<const uint8_t>(c.in.data() + pos + 4, len));
      pos += 4 + len;
    }
    c.in.erase(c.in.begin(), c.in.begin() + static_cast<ptrdiff_t>(pos));
  }

  void run() {
    for (;;) {
      std::vector<pollfd> fds;
      fds.push_back({wake_fd, POLLIN, 0});
      fds.push_back({listen_fd, POLLIN, 0});
      for (auto& c : clients) {
        fds.push_back({c.fd, static_cast<short>(c.out.empty() ? POLLIN : (POLLIN | POLLOUT)), 0});
      }
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        MYELIN_LOG_ERROR << "store server: " << errno_status("poll", errno);
        return;
      }
      if (fds[0].revents != 0) return;
      if (fds[1].revents & POLLIN) {
        for (;;) {
          const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (fd < 0) break;
          int one = 1;
          (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          clients.push_back(Client{fd, {}, {}, false});
        }
      }
      std::vector<bool> drop(clients.size(), false);
      for (size_t i = 0; i + 2 < fds.size() && i < clients.size(); ++i) {
        Client& c = clients[i];
        const short ev = fds[i + 2].revents;
        if (ev & (POLLIN | POLLHUP | POLLERR)) {
          uint8_t buf[65536];
          const ssize_t n = ::recv(c.fd, buf, sizeof(buf), 0);
          if (n > 0) {
            c.in.insert(c.in.end(), buf, buf + n);
            parse(c);
          } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            drop[i] = true;
            continue;
          }
        }
        if (!c.out.empty()) {
          const ssize_t n = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
          if (n > 0) {
            c.out.erase(c.out.begin(), c.out.begin() + n);
          } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            drop[i] = true;
            continue;
          }
        }
        if (c.close_after_write && c.out.empty()) drop[i] = true;
      }
      for (size_t i = clients.size(); i-- > 0;) {
        if (drop[i]) {
          ::close(clients[i].fd);
          clients.erase(clients.begin() + static_cast<ptrdiff_t>(i));
        }
      }
    }
  }
};

TcpStoreServer::TcpStoreServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TcpStoreServer::~TcpStoreServer() = default;
uint16_t TcpStoreServer::port() const noexcept {
  return impl_->port;
}

Result<std::unique_ptr<TcpStoreServer>> TcpStoreServer::start(const std::string& host,
                                                              uint16_t port) {
  auto impl = std::make_unique<Impl>();
  MYELIN_ASSIGN_OR_RETURN(uint32_t ip, resolve_ipv4(host));
  impl->listen_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (impl->listen_fd < 0) return errno_status("store server socket", errno);
  int one = 1;
  (void)setsockopt(impl->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = ip;
  if (::bind(impl->listen_fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    return errno_status("store server bind to " + host + ":" + std::to_string(port), errno,
                        errno == EADDRINUSE ? StatusCode::kAlreadyExists : StatusCode::kIoError);
  }
  if (::listen(impl->listen_fd, 1024) != 0) return errno_status("store server listen", errno);
  socklen_t len = sizeof(sa);
  (void)getsockname(impl->listen_fd, reinterpret_cast<sockaddr*>(&sa), &len);
  impl->port = ntohs(sa.sin_port);
  impl->wake_fd = eventfd(0, EFD_CLOEXEC);
  if (impl->wake_fd < 0) return errno_status("store server eventfd", errno);
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->run(); });
  return std::unique_ptr<TcpStoreServer>(new TcpStoreServer(std::move(impl)));
}

// ---- client -------------------------------------------------------------------------------------

struct TcpStore::Impl {
  int fd = -1;
  std::string where;
  std::mutex mu;  // serialises whole request/response exchanges
  // The longest one exchange may take (set_request_timeout()); guarded by mu.
  std::chrono::nanoseconds request_timeout = kDefaultRequestTimeout;
  ~Impl() {
    if (fd >= 0) ::close(fd);
  }

  Status io(bool writing, uint8_t* p, size_t n, Deadline deadline) {
    while (n > 0) {
      const ssize_t r = writing ? ::send(fd, p, n, MSG_NOSIGNAL) : ::recv(fd, p, n, 0);
      if (r > 0) {
        p += r;
        n -= static_cast<size_t>(r);
        continue;
      }
      if (r == 0) return unavailable("store at ", where, " closed the connection");
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        return errno_status(std::string(writing ? "send to" : "recv from") + " store at " + where,
                            errno, StatusCode::kUnavailable);
      }
      pollfd pf{fd, static_cast<short>(writing ? POLLOUT : POLLIN), 0};
      const int pr = ::poll(&pf, 1, deadline.remaining_ms_for_poll());
      if (pr == 0) return timeout_error("store at ", where, " did not answer in time");
    }
    return ok_status();
  }

  // One request and its response, by the caller's deadline and within the request timeout. A
  // deadline about to pass still gets kMinExchange: an exchange cut short loses the connection
  // (the late answer would be taken for the next one's), so a healthy store must have time to
  // answer.
  Result<std::pair<uint8_t, std::vector<uint8_t>>> call(const std::vector<uint8_t>& body,
                                                        Deadline caller = Deadline::never()) {
    static constexpr std::chrono::milliseconds kMinExchange{100};
    std::lock_guard<std::mutex> lock(mu);
    if (fd < 0) return unavailable("store connection to ", where, " is closed");
    const Deadline floor = Deadline::after(kMinExchange);
    const Deadline deadline =
        Deadline::after(request_timeout).min(caller.at_ns() < floor.at_ns() ? floor : caller);
    std::vector<uint8_t> msg;
    WireWriter w(msg);
    w.u32(static_cast<uint32_t>(body.size()));
    w.bytes(body);
    Status s = io(true, msg.data(), msg.size(), deadline);
    uint8_t head[5];
    if (s.ok()) s = io(false, head, sizeof(head), deadline);
    if (!s.ok()) {
      ::close(fd);
      fd = -1;
      return s;
    }
    const uint32_t len = static_cast<uint32_t>(internal::load_le(head, 4));
    if (len == 0 || len > kMaxMessage) {
      ::close(fd);
      fd = -1;
      return protocol_error("store at ", where, " sent a response of ", len, " bytes");
    }
    std::vector<uint8_t> rest(len - 1);
    if (!rest.empty()) {
      s = io(false, rest.data(), rest.size(), deadline);
      if (!s.ok()) {
        ::close(fd);
        fd = -1;
        return s;
      }
    }
    return std::make_pair(head[4], std::move(rest));
  }

  static std::vector<uint8_t> request(Op op, std::string_view key) {
    std::vector<uint8_t> b;
    WireWriter w(b);
    w.u8(op);
    w.u16(static_cast<uint16_t>(key.size()));
    w.bytes(key);
    return b;
  }
};

namespace {
Status check_key(std::string_view key) {
  if (key.empty() || key.size() > kMaxKey) {
    return invalid_argument("store key of ", key.size(), " bytes (must be 1..", kMaxKey, ")");
  }
  return ok_status();
}
}  // namespace

TcpStore::TcpStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TcpStore::~TcpStore() = default;

Result<std::unique_ptr<TcpStore>> TcpStore::connect(const std::string& host, uint16_t port,
                                                    Deadline deadline) {
  const std::string where = host + ":" + std::to_string(port);
  std::mt19937_64 rng(std::random_device{}());
  int64_t backoff_ms = 10;
  Status last = unavailable("no attempt made");
  for (;;) {
    auto ip = resolve_ipv4(host.empty() ? "127.0.0.1" : host);
    if (ip.ok()) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) return errno_status("store client socket", errno);
      sockaddr_in sa{};
      sa.sin_family = AF_INET;
      sa.sin_port = htons(port);
      sa.sin_addr.s_addr = *ip == htonl(INADDR_ANY) ? htonl(INADDR_LOOPBACK) : *ip;
      int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
      int err = rc == 0 ? 0 : errno;
      if (err == EINPROGRESS) {
        pollfd pf{fd, POLLOUT, 0};
        const Deadline attempt = Deadline::after_ms(2000).min(deadline);
        if (::poll(&pf, 1, attempt.remaining_ms_for_poll()) == 1) {
          socklen_t len = sizeof(err);
          (void)getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        } else {
          err = ETIMEDOUT;
        }
      }
      if (err == 0) {
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        auto impl = std::make_unique<Impl>();
        impl->fd = fd;
        impl->where = where;
        return std::unique_ptr<TcpStore>(new TcpStore(std::move(impl)));
      }
      ::close(fd);
      last = errno_status("connect", err, StatusCode::kUnavailable);
    } else {
      last = ip.status();
    }
    if (deadline.expired()) {
      return timeout_error("could not reach the store at ", where,
                           " by the deadline; last error: ", last.to_string());
    }
    // Exponential backoff with +-50% jitter, never past the deadline.
    const int64_t jittered = backoff_ms / 2 + static_cast<int64_t>(rng() % (backoff_ms + 1));
    const int64_t sleep_ms = std::min(jittered, deadline.remaining_ns() / 1'000'000 + 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
    backoff_ms = std::min<int64_t>(backoff_ms * 2, 1000);
  }
}

void TcpStore::set_request_timeout(std::chrono::nanoseconds timeout) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->request_timeout = timeout;
}

Status TcpStore::set(std::string_view key, std::span<const uint8_t> value) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  if (value.size() > kMaxValue) return invalid_argument("store value of ", value.size(), " bytes");
  auto body = Impl::request(kSet, key);
  WireWriter w(body);
  w.u32(static_cast<uint32_t>(value.size()));
  w.bytes(value);
  MYELIN_ASSIGN_OR_RETURN(auto reply, impl_->call(body));
  if (reply.first != kOk) return protocol_error("store refused set of '", key, "'");
  return ok_status();
}

Result<std::vector<uint8_t>> TcpStore::get(std::string_view key, Deadline deadline) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  const int64_t start = monotonic_ns();
  int64_t backoff_us = 500;
  for (;;) {
    MYELIN_ASSIGN_OR_RETURN(auto reply, impl_->call(Impl::request(kGet, key), deadline));
    if (reply.first == kOk) return std::move(reply.second);
    if (reply.first != kNotFound) return protocol_error("store refused get of '", key, "'");
    if (deadline.expired()) {
      return timeout_error("store key '", key, "' was not set within ",
                           (monotonic_ns() - start) / 1'000'000, " ms");
    }
    const int64_t sleep_us = std::min(backoff_us, deadline.remaining_ns() / 1000 + 1);
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    backoff_us = std::min<int64_t>(backoff_us * 2, 100'000);
  }
}

Result<int64_t> TcpStore::add(std::string_view key, int64_t delta) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  auto body = Impl::request(kAdd, key);
  WireWriter(body).u64(static_cast<uint64_t>(delta));
  MYELIN_ASSIGN_OR_RETURN(auto reply, impl_->call(body));
  if (reply.first == kNotCounter) {
    return failed_precondition("store key '", key, "' does not hold a counter (or it overflows)");
  }
  if (reply.first != kOk || reply.second.size() != 8) {
    return protocol_error("store refused add on '", key, "'");
  }
  return static_cast<int64_t>(internal::load_le(reply.second.data(), 8));
}

Result<bool> TcpStore::contains(std::string_view key) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  MYELIN_ASSIGN_OR_RETURN(auto reply, impl_->call(Impl::request(kContains, key)));
  if (reply.first != kOk || reply.second.size() != 1) {
    return protocol_error("store refused contains of '", key, "'");
  }
  return reply.second[0] != 0;
}

}  // namespace myelin::transport
