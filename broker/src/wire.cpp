#include "wire.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <ctime>

#include <myelin/core/check.hpp>

namespace myelin::broker::internal {

void Fd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

namespace {
// A queued frame outlives the caller's buffer: without an owner keeping the payload alive, copy
// it into one (the queue then owns the copy).
void keep_payload(std::span<const std::byte>& payload, std::shared_ptr<const void>& owner) {
  if (owner || payload.empty()) return;
  auto copy = std::make_shared<std::vector<std::byte>>(payload.begin(), payload.end());
  payload = std::span<const std::byte>(copy->data(), copy->size());
  owner = std::move(copy);
}
}  // namespace

Status set_nonblocking(int fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
    return errno_status("fcntl O_NONBLOCK", errno);
  return ok_status();
}

Result<HostPort> parse_host_port(std::string_view text) {
  HostPort hp;
  size_t colon;
  if (!text.empty() && text[0] == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return invalid_argument("bad address '", text, "': expected [v6]:port");
    }
    hp.host = std::string(text.substr(1, close - 1));
    colon = close + 1;
  } else {
    colon = text.rfind(':');
    if (colon == std::string_view::npos)
      return invalid_argument("bad address '", text, "': no port");
    hp.host = std::string(text.substr(0, colon));
  }
  const std::string_view port = text.substr(colon + 1);
  if (port.empty() || port.size() > 5) return invalid_argument("bad port in '", text, "'");
  uint32_t v = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return invalid_argument("bad port in '", text, "'");
    v = v * 10 + static_cast<uint32_t>(c - '0');
  }
  if (v > 65535) return invalid_argument("port ", v, " out of range");
  hp.port = static_cast<uint16_t>(v);
  return hp;
}

namespace {
Result<addrinfo*> resolve(const HostPort& w, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(w.port);
  const int rc =
      ::getaddrinfo(w.host.empty() ? nullptr : w.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return unavailable("resolving '", w.host, "': ", gai_strerror(rc));
  return res;
}
}  // namespace

Result<Fd> listen_tcp(const HostPort& where, int backlog) {
  MYELIN_ASSIGN_OR_RETURN(addrinfo * res, resolve(where, true));
  Status last = unavailable("no address for '", where.host, "'");
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0));
    if (!fd.valid()) {
      last = errno_status("socket", errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd.get(), backlog) != 0) {
      last = errno_status("bind/listen on port " + std::to_string(where.port), errno);
      continue;
    }
    ::freeaddrinfo(res);
    MYELIN_RETURN_IF_ERROR(set_nonblocking(fd.get()));
    return fd;
  }
  ::freeaddrinfo(res);
  return last;
}

Result<uint16_t> local_port(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0)
    return errno_status("getsockname", errno);
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
}

void set_socket_buffers(int fd, int bytes) {
  if (bytes <= 0) return;
  // Best effort: a refused size leaves the kernel's default, which only costs isolation.
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

Result<Fd> connect_tcp(const HostPort& where, Deadline deadline, int buffer_bytes) {
  MYELIN_ASSIGN_OR_RETURN(addrinfo * res, resolve(where, false));
  Status last = unavailable("no address for '", where.host, "'");
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) {
      last = errno_status("socket", errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    set_socket_buffers(fd.get(), buffer_bytes);
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last = errno_status("connect to " + where.host + ":" + std::to_string(where.port), errno,
                          StatusCode::kUnavailable);
      continue;
    }
    pollfd p{fd.get(), POLLOUT, 0};
    const int n = ::poll(&p, 1, deadline.remaining_ms_for_poll());
    if (n == 0) {
      last = timeout_error("connect to ", where.host, ":", where.port, " timed out");
      continue;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (n < 0 || err != 0) {
      last = errno_status("connect to " + where.host + ":" + std::to_string(where.port),
                          n < 0 ? errno : err, StatusCode::kUnavailable);
      continue;
    }
    ::freeaddrinfo(res);
    return fd;
  }
  ::freeaddrinfo(res);
  return last;
}

int epoll_wait_ns(int epfd, epoll_event* events, int max_events, int64_t timeout_ns) {
  if (timeout_ns >= 0) {
    timespec ts{.tv_sec = static_cast<time_t>(timeout_ns / 1'000'000'000),
                .tv_nsec = static_cast<long>(timeout_ns % 1'000'000'000)};
    const int n = ::epoll_pwait2(epfd, events, max_events, &ts, nullptr);
    if (n >= 0 || errno != ENOSYS) return n;
  }
  const int64_t ms = timeout_ns < 0 ? -1 : (timeout_ns + 999'999) / 1'000'000;
  return ::epoll_wait(epfd, events, max_events, static_cast<int>(std::min<int64_t>(ms, INT32_MAX)));
}

// ---- OutQueue ---------------------------------------------------------------------------------

void OutQueue::add_piece(int lane, Piece p) {
  backlog_ += p.size();
  lanes_[lane].push_back(std::move(p));
}

void OutQueue::open_batch(int lane, int64_t now_ns) {
  Batch& b = batch_[lane];
  b.opened_ns = now_ns;
  if (b.frames.capacity() == 0 && !spares_.empty()) {
    b.frames = std::move(spares_.back());
    spares_.pop_back();
  }
  // Room for a full batch up front: grown by doubling instead, every batch would copy its bytes
  // about once more on the way to batch_bytes.
  const size_t full =
      2 * kFrameHeaderSize + kMaxTopicLength + opt_.batch_bytes + opt_.batch_max_message;
  b.frames.reserve(std::min(full, kMaxBatchReserve));
  b.frames.assign(kFrameHeaderSize, std::byte{0});  // the batch header, written when it closes
}

void OutQueue::close_batch(int lane) {
  Batch& b = batch_[lane];
  if (b.count == 0) return;
  Piece p;
  size_t from = 0;
  if (b.count == 1) {
    from = kFrameHeaderSize;  // a lone frame goes as itself, without the batch header
  } else {
    FrameHeader h;
    h.type = FrameType::kBatch;
    h.flags = lane == 0 ? kFlagControl : 0;
    h.payload_len = static_cast<uint32_t>(b.frames.size() - kFrameHeaderSize);
    encode_header(h, std::span<std::byte, kFrameHeaderSize>(b.frames.data(), kFrameHeaderSize));
    batches_sent_++;
  }
  if (from == 0 && 4 * b.frames.size() >= b.frames.capacity()) {
    p.head = std::move(b.frames);  // built in place: a full batch is queued without a copy
  } else {
    // A small batch (or one frame) is copied into a buffer of its size and the big one kept for
    // the next batch: queued pieces never hold much more memory than their bytes, however many
    // small batches a slow peer lets pile up.
    p.head.assign(b.frames.begin() + static_cast<ptrdiff_t>(from), b.frames.end());
    recycle(std::move(b.frames));
  }
  b = Batch{};
  add_piece(lane, std::move(p));
}

void OutQueue::recycle(std::vector<std::byte>&& buffer) {
  if (buffer.capacity() < kMinRecycled || spares_.size() >= kMaxSpares) return;
  buffer.clear();
  spares_.push_back(std::move(buffer));
}

Status OutQueue::push(FrameHeader h, std::string_view topic, std::span<const std::byte> payload,
                      std::shared_ptr<const void> owner, bool batchable, int64_t now_ns) {
  const int lane = (h.flags & kFlagControl) ? 0 : 1;
  if (topic.size() > kMaxTopicLength)
    return invalid_argument("topic over ", kMaxTopicLength, " bytes");
  if (lane == 0 && payload.size() > opt_.chunk_size) {
    return invalid_argument("control message of ", payload.size(), " bytes exceeds one chunk (",
                            opt_.chunk_size, " bytes); send it on the bulk lane");
  }
  if (coalesce(lane, batchable, payload.size(), now_ns)) {
    Batch& b = batch_[lane];
    if (b.count == 0) open_batch(lane, now_ns);
    MYELIN_RETURN_IF_ERROR(append_frame(b.frames, h, topic, payload));
    b.count++;
    if (b.frames.size() - kFrameHeaderSize >= opt_.batch_bytes || b.count >= opt_.batch_count)
      close_batch(lane);
    return ok_status();
  }
  close_batch(lane);  // keep order with what was coalesced before
  if (payload.size() <= opt_.chunk_size) {
    Piece p;
    h.topic_len = static_cast<uint16_t>(topic.size());
    h.payload_len = static_cast<uint32_t>(payload.size());
    p.head.resize(kFrameHeaderSize + topic.size());
    encode_header(h, std::span<std::byte, kFrameHeaderSize>(p.head.data(), kFrameHeaderSize));
    if (!topic.empty()) std::memcpy(p.head.data() + kFrameHeaderSize, topic.data(), topic.size());
    keep_payload(payload, owner);
    p.owner = std::move(owner);
    p.body = payload;
    add_piece(lane, std::move(p));
    return ok_status();
  }
  keep_payload(payload, owner);
  for (size_t off = 0; off < payload.size(); off += opt_.chunk_size) {
    const size_t n = std::min<size_t>(opt_.chunk_size, payload.size() - off);
    FrameHeader c = h;
    const bool first = off == 0, last = off + n == payload.size();
    c.flags = static_cast<uint8_t>((h.flags & ~(kFlagMore | kFlagContinuation)) |
                                   (last ? 0 : kFlagMore) | (first ? 0 : kFlagContinuation));
    const std::string_view t = first ? topic : std::string_view();
    c.topic_len = static_cast<uint16_t>(t.size());
    c.payload_len = static_cast<uint32_t>(n);
    Piece p;
    p.head.resize(kFrameHeaderSize + t.size());
    encode_header(c, std::span<std::byte, kFrameHeaderSize>(p.head.data(), kFrameHeaderSize));
    // A continuation chunk has no topic, and an empty view may hold a null pointer.
    if (!t.empty()) std::memcpy(p.head.data() + kFrameHeaderSize, t.data(), t.size());
    p.owner = owner;
    p.body = payload.subspan(off, n);
    add_piece(lane, std::move(p));
    chunks_sent_++;
  }
  return ok_status();
}

bool OutQueue::coalesce(int lane, bool batchable, size_t size, int64_t now_ns) {
  if (!batchable || opt_.batch_bytes == 0 || size > opt_.batch_max_message) return false;
  const bool lone =
      batch_[lane].count == 0 && now_ns - last_batchable_ns_[lane] >= opt_.batch_window_ns;
  last_batchable_ns_[lane] = now_ns;
  return !lone;
}

Result<bool> OutQueue::push_and_flush(int fd, FrameHeader h, std::string_view topic,
                                      std::span<const std::byte> payload,
                                      std::shared_ptr<const void> owner, bool batchable,
                                      int64_t now_ns) {
  const int lane = (h.flags & kFlagControl) ? 0 : 1;
  const bool alone = !has_unsent() && batch_[0].count == 0 && batch_[1].count == 0 &&
                     payload.size() <= opt_.chunk_size && topic.size() <= kMaxTopicLength;
  if (!alone || coalesce(lane, batchable, payload.size(), now_ns)) {
    MYELIN_RETURN_IF_ERROR(push(h, topic, payload, std::move(owner), batchable, now_ns));
    // The socket was full at the last write and bytes still wait: it is watched for room (the
    // caller's contract), so asking it again per message would mostly cost a refused sendmsg, or
    // send a sliver of what came free.
    if (socket_full_ && has_unsent()) return false;
    return flush(fd);
  }
  std::array<std::byte, kFrameHeaderSize + kMaxTopicLength> head;
  h.topic_len = static_cast<uint16_t>(topic.size());
  h.payload_len = static_cast<uint32_t>(payload.size());
  encode_header(h, std::span<std::byte, kFrameHeaderSize>(head.data(), kFrameHeaderSize));
  if (!topic.empty()) std::memcpy(head.data() + kFrameHeaderSize, topic.data(), topic.size());
  const size_t head_len = kFrameHeaderSize + topic.size();
  iovec iov[2] = {{head.data(), head_len},
                  {const_cast<std::byte*>(payload.data()), payload.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = payload.empty() ? 1 : 2;
  ssize_t w;
  do {
    w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
  } while (w < 0 && errno == EINTR);
  if (w < 0) {
    if (errno == EPIPE || errno == ECONNRESET) return peer_failed("peer closed the connection");
    if (errno != EAGAIN && errno != EWOULDBLOCK) return errno_status("sendmsg", errno);
    w = 0;
  }
  const size_t sent = static_cast<size_t>(w);
  bytes_written_ += sent;
  if (sent == head_len + payload.size()) return true;
  socket_full_ = true;
  // The socket took part of it (or nothing): queue the message with what was sent marked, so the
  // writer finishes this frame before anything else (a started frame counts as started).
  Piece p;
  p.head.assign(head.begin(), head.begin() + static_cast<ptrdiff_t>(head_len));
  keep_payload(payload, owner);
  p.owner = std::move(owner);
  p.body = payload;
  p.sent = sent;
  add_piece(lane, std::move(p));
  backlog_ -= sent;
  return false;
}

size_t OutQueue::adopt_control_frames(OutQueue& from) {
  from.close_due_batches(0, true);
  MYELIN_CHECK(from.lanes_[1].empty()) << "bulk frames queued where only control frames go";
  std::deque<Piece>& dst = lanes_[0];
  // A frame this queue has started must finish first (frame boundary).
  auto pos = dst.begin();
  if (pos != dst.end() && pos->sent > 0) ++pos;
  const size_t moved = from.lanes_[0].size();
  for (Piece& p : from.lanes_[0]) {
    p.sent = 0;
    backlog_ += p.size();
    pos = dst.insert(pos, std::move(p));
    ++pos;
  }
  from.lanes_[0].clear();
  from.backlog_ = 0;
  return moved;
}

void OutQueue::close_due_batches(int64_t now_ns, bool force) {
  for (int lane = 0; lane < 2; ++lane) {
    if (batch_[lane].count > 0 &&
        (force || now_ns - batch_[lane].opened_ns >= opt_.batch_window_ns)) {
      close_batch(lane);
    }
  }
}

int64_t OutQueue::next_batch_deadline() const noexcept {
  int64_t d = INT64_MAX;
  for (const Batch& b : batch_) {
    if (b.count > 0) d = std::min(d, b.opened_ns + opt_.batch_window_ns);
  }
  return d;
}

bool OutQueue::empty() const noexcept {
  return lanes_[0].empty() && lanes_[1].empty() && batch_[0].count == 0 && batch_[1].count == 0;
}

Result<bool> OutQueue::flush(int fd, size_t bulk_budget) {
  constexpr int kMaxIov = 64;
  window_limited_ = false;
  while (!lanes_[0].empty() || !lanes_[1].empty()) {
    iovec iov[kMaxIov];
    int n = 0;
    std::pair<int, size_t> used[3];  // (lane, count), in the order written
    int nused = 0;
    auto add = [&](const Piece& p) {
      size_t skip = p.sent;
      if (skip < p.head.size()) {
        iov[n++] = {const_cast<std::byte*>(p.head.data()) + skip, p.head.size() - skip};
        skip = 0;
      } else {
        skip -= p.head.size();
      }
      if (p.body.size() > skip) {
        iov[n++] = {const_cast<std::byte*>(p.body.data()) + skip, p.body.size() - skip};
      }
    };
    // A bulk chunk already started must finish first (frame boundary); then all control; then at
    // most one bulk chunk, after which the control lane is looked at again.
    const bool bulk_started = !lanes_[1].empty() && lanes_[1].front().sent > 0;
    if (bulk_started) {
      add(lanes_[1].front());
      used[nused++] = {1, 1};
    }
    size_t c = 0;
    for (const Piece& p : lanes_[0]) {
      if (n >= kMaxIov - 2) break;
      add(p);
      c++;
    }
    if (c) used[nused++] = {0, c};
    if (!bulk_started && !lanes_[1].empty() && n < kMaxIov - 2) {
      if (bulk_budget > 0) {
        add(lanes_[1].front());
        used[nused++] = {1, 1};
      } else if (n == 0) {
        window_limited_ = true;
      }
    }
    if (n == 0) break;
    // sendmsg with MSG_NOSIGNAL: a peer that went away is an error value, never SIGPIPE.
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n);
    const ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        socket_full_ = true;
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) return peer_failed("peer closed the connection");
      return errno_status("sendmsg", errno);
    }
    size_t left = static_cast<size_t>(w);
    backlog_ -= left;
    bytes_written_ += left;
    for (int u = 0; u < nused; ++u) {
      const auto [lane, count] = used[u];
      for (size_t i = 0; i < count && left > 0; ++i) {
        Piece& p = lanes_[lane].front();
        const size_t rest = p.size() - p.sent;
        const size_t took = std::min(left, rest);
        if (lane == 1) bulk_budget -= std::min(bulk_budget, took);
        if (left >= rest) {
          left -= rest;
          recycle(std::move(p.head));
          lanes_[lane].pop_front();
        } else {
          p.sent += left;
          left = 0;
        }
      }
    }
  }
  const bool all = lanes_[0].empty() && lanes_[1].empty();
  if (all) socket_full_ = false;
  return all;
}

// ---- RxBuffer ---------------------------------------------------------------------------------

std::shared_ptr<std::byte> RxBuffer::Pool::take(const std::shared_ptr<Pool>& self, size_t size) {
  std::unique_ptr<std::byte[]> p;
  if (size == self->block_) {
    std::lock_guard<std::mutex> lock(self->mu_);
    if (!self->free_.empty()) {
      p = std::move(self->free_.back());
      self->free_.pop_back();
    }
  }
  // Not value-initialised: only bytes read from the socket are ever looked at.
  if (!p) p.reset(new std::byte[size]);
  return std::shared_ptr<std::byte>(p.release(),
                                    [self, size](std::byte* b) { self->give_back(b, size); });
}

void RxBuffer::Pool::give_back(std::byte* p, size_t size) noexcept {
  std::unique_ptr<std::byte[]> owned(p);
  if (size != block_) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.size() < kMaxFree) free_.push_back(std::move(owned));
}

RxBuffer::RxBuffer(DecodeLimits limits, size_t block)
    : limits_(limits),
      block_size_(
          std::max<size_t>(block, kFrameHeaderSize + kMaxTopicLength + limits.max_frame_payload)),
      pool_(std::make_shared<Pool>(block_size_)),
      block_(Pool::take(pool_, block_size_)),
      block_len_(block_size_) {}

void RxBuffer::make_room(size_t want) {
  if (block_len_ - end_ >= want) return;
  // Messages handed out may still reference the current block, so never move data inside it:
  // start a fresh block with the unconsumed bytes (at most one partial frame).
  const size_t len = std::max(block_size_, end_ - start_ + want);
  auto fresh = Pool::take(pool_, len);
  std::memcpy(fresh.get(), block_.get() + start_, end_ - start_);
  end_ -= start_;
  start_ = 0;
  block_ = std::move(fresh);
  block_len_ = len;
}

Result<size_t> RxBuffer::read_from(int fd, size_t max_bytes) {
  make_room(16 * 1024);
  while (true) {
    const size_t want = std::min(block_len_ - end_, std::max<size_t>(max_bytes, 1));
    const ssize_t n = ::read(fd, block_.get() + end_, want);
    if (n > 0) {
      end_ += static_cast<size_t>(n);
      drained_ = static_cast<size_t>(n) < want;
      return static_cast<size_t>(n);
    }
    if (n == 0) return peer_failed("peer closed the connection");
    if (errno == EINTR) continue;
    drained_ = true;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return size_t{0};
    if (errno == ECONNRESET) return peer_failed("connection reset by peer");
    return errno_status("read", errno);
  }
}

void RxBuffer::append(std::span<const std::byte> bytes) {
  make_room(bytes.size());
  if (!bytes.empty()) std::memcpy(block_.get() + end_, bytes.data(), bytes.size());
  end_ += bytes.size();
}

Result<bool> RxBuffer::next(FrameView* out) {
  size_t used = 0;
  MYELIN_ASSIGN_OR_RETURN(DecodeOutcome o, decode_frame(std::span<const std::byte>(
                                                            block_.get() + start_, end_ - start_),
                                                        limits_, out, &used));
  if (o == DecodeOutcome::kNeedMore) {
    // Rewind only when no handed-out message can still point into this block. Those may have
    // been read and let go on another thread (the server's loop and control thread drop each
    // other's blocks, an application drops a client's), and use_count() is a relaxed read that
    // orders nothing: a copy dropped at once makes its decrement an acquire on the count, which
    // pairs with the release decrements of those holders, so their last reads happen before the
    // bytes are overwritten.
    if (start_ == end_ && block_.use_count() == 1) {
      { const std::shared_ptr<std::byte> acquire = block_; }
      start_ = end_ = 0;
    }
    return false;
  }
  start_ += used;
  return true;
}

}  // namespace myelin::broker::internal
