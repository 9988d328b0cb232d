// TCP connection: framing, matching, rendezvous and one-sided service.
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <myelin/core/copy.hpp>
#include <myelin/core/log.hpp>

#include "tcp/tcp_backend.hpp"
#include "wire.hpp"

namespace myelin::transport::internal::tcp {

namespace {
constexpr size_t kReadBuffer = 256 * 1024;
// Payload bytes still to come above this go straight into their destination with recv(2).
constexpr size_t kDirectRead = 4096;
// A payload remainder at least this large sets the socket's receive watermark (SO_RCVLOWAT) to
// it, capped at kMaxWatermark, so that a waiter asleep on the socket (or on the epoll set) is
// woken once for that much rather than for every few loopback segments (4-rank TCP 64 MiB
// allreduce on 2 CPUs: docs/performance.md, Collectives). Smaller remainders leave the watermark
// at 1: two extra system calls per payload cost more than the wake-ups they save there.
constexpr size_t kWatermarkMin = 256 * 1024;
constexpr size_t kMaxWatermark = 1024 * 1024;
// A frame with at least this much payload is likely followed by another large one: the next
// header is then read alone so that the next payload can land in place. Below it a payload is
// cheaper to copy out of the staging buffer than a second recv(2) per frame (2-rank 4 KiB
// allreduce: 1.1x the time with header-alone reads after 4 KiB frames).
constexpr size_t kHeaderAloneAfter = 64 * 1024;
constexpr int kMaxIov = 64;
// Eager payloads up to this size are copied behind the header and sent with one send(2).
constexpr size_t kSmallSend = 1024;

bool is_peer_gone(int err) {
  return err == ECONNRESET || err == EPIPE || err == ENOTCONN || err == ETIMEDOUT ||
         err == EHOSTUNREACH || err == ECONNABORTED;
}
}  // namespace

Connection::Connection(TcpBackend& backend, int fd, State state)
    : backend_(backend),
      fd_(fd),
      state_(state),
      peer_name_(std::make_shared<const std::string>("unidentified peer")),
      rbuf_(kReadBuffer) {
  // Our hello always carries sequence number 0; it is queued when the socket is known.
  wseq_ = 1;
}

Connection::~Connection() {
  if (fd_ >= 0) ::close(fd_);
}

void Connection::set_peer(std::vector<uint8_t> address, std::string name) {
  auto decoded = TcpAddress::decode(address);
  peer_instance_ = decoded.ok() ? decoded->instance : 0;
  std::string label = std::move(name);
  if (decoded.ok()) label += " (" + decoded->to_string() + ")";
  peer_name_ = std::make_shared<const std::string>(std::move(label));
  peer_bytes_ = std::move(address);
}

// The sequence number is assigned when the frame is first handed to sendmsg (see OutFrame).
FrameHeader Connection::next_header(FrameType type) {
  FrameHeader h;
  h.type = type;
  return h;
}

namespace {
// Frames that carry no payload and no message-ordering meaning of their own relative to a
// rendezvous payload: they may go out ahead of DATA frames that have not started. An RTS overtaking
// DATA keeps per-channel matching order (the DATA belongs to a message matched already); letting it
// through early lets the receiver grant the next message while the current payloads still stream,
// so the sender never drains its queue waiting for a clear-to-send.
bool may_overtake_data(FrameType t) {
  return t == FrameType::kRts || t == FrameType::kCts || t == FrameType::kGet ||
         t == FrameType::kPutAck;
}
}  // namespace

void Connection::enqueue(const FrameHeader& h, const void* payload, size_t len,
                         RequestStateRef done, size_t done_bytes) {
  OutFrame f;
  f.h = h;
  f.payload = static_cast<const uint8_t*>(payload);
  f.payload_len = len;
  f.done = std::move(done);
  f.done_bytes = done_bytes;
  auto at = out_.end();
  if (may_overtake_data(h.type)) {
    while (at != out_.begin()) {
      const OutFrame& prev = *std::prev(at);
      if (prev.encoded || prev.h.type != FrameType::kData) break;
      --at;
    }
  }
  out_.insert(at, std::move(f));
}

void Connection::queue_hello(bool is_reply) {
  Hello hello{backend_.info().name, backend_.self_bytes(), peer_bytes_};
  FrameHeader h;
  h.type = FrameType::kHello;
  h.flags = is_reply ? kFlagReply : 0;
  h.seq = 0;
  OutFrame f;
  f.owned = hello.encode();
  h.length = f.owned.size();
  f.h = h;
  f.encoded = true;
  encode_header(h, f.header);
  f.payload = f.owned.data();
  f.payload_len = f.owned.size();
  out_.push_front(std::move(f));
}

// Writes header + payload at once when nothing is queued; queues the rest otherwise.
Request Connection::post_send_fast(FrameHeader& h, const void* data, size_t size) {
  if (fd_ >= 0 && out_.empty()) {
    // A small message is copied behind its header and goes out with send(2): cheaper than
    // sendmsg's iovec import, and the copy is a few cache lines.
    uint8_t header[kHeaderSize + kSmallSend];
    h.seq = wseq_++;
    encode_header(h, header);
    ssize_t w;
    if (size <= kSmallSend) {
      if (size > 0) std::memcpy(header + kHeaderSize, data, size);
      w = ::send(fd_, header, kHeaderSize + size, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
      iovec iov[2] = {{header, kHeaderSize}, {const_cast<void*>(data), size}};
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = 2;
      w = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    if (w == static_cast<ssize_t>(kHeaderSize + size)) return Request::completed(size);
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      const int err = errno;
      fail(is_peer_gone(err) ? peer_failed("connection to ", peer_name(),
                                           " lost: ", errno_status("send", err).message())
                             : errno_status("send to " + peer_name(), err),
           true);
      return Request::failed(status_);
    }
    auto [req, st] = Request::make_pending();
    st->describe("send", h.channel, peer_name_);
    OutFrame f;
    f.h = h;
    f.encoded = true;
    std::memcpy(f.header, header, kHeaderSize);
    f.payload = static_cast<const uint8_t*>(data);
    f.payload_len = size;
    f.sent = w > 0 ? static_cast<size_t>(w) : 0;
    f.done = st;
    f.done_bytes = size;
    out_.push_back(std::move(f));
    backend_.update_events(*this);
    return std::move(req);
  }
  auto [req, st] = Request::make_pending();
  st->describe("send", h.channel, peer_name_);
  enqueue(h, data, size, st, size);
  flush();
  return std::move(req);
}

Request Connection::send(uint32_t channel, const void* data, size_t size) {
  if (state_ == State::kFailed) return Request::failed(status_);
  if (size > backend_.options().max_message_size) {
    return Request::failed(invalid_argument("send of ", size, " bytes exceeds max_message_size ",
                                            backend_.options().max_message_size));
  }
  if (size > 0 && data == nullptr) return Request::failed(invalid_argument("send: null buffer"));
  if (size <= backend_.limits().eager_limit) {
    FrameHeader h = next_header(FrameType::kEager);
    h.channel = channel;
    h.length = size;
    return post_send_fast(h, data, size);
  }
  auto [req, st] = Request::make_pending();
  st->describe("rendezvous send", channel, peer_name_);
  FrameHeader h = next_header(FrameType::kRts);
  h.channel = channel;
  h.id = next_op_++;
  h.a0 = size;
  rts_sent_.emplace(h.id, PendingSend{static_cast<const uint8_t*>(data), size, channel, st});
  enqueue(h, nullptr, 0, nullptr, 0);
  flush();
  return std::move(req);
}

void Connection::answer_rts(uint32_t channel, uint64_t send_id, uint64_t size, PostedRecv recv) {
  FrameHeader h = next_header(FrameType::kCts);
  h.id = send_id;
  if (size > recv.capacity) {
    h.flags = kFlagDiscard;
    recv.state->complete(
        out_of_range("message of ", size, " bytes on channel ", channel, " from ", peer_name(),
                     " exceeds the receive buffer of ", recv.capacity, " bytes"),
        0);
  } else {
    h.a0 = next_op_++;
    awaiting_.emplace(h.a0, AwaitingData{recv.data, size, recv.state});
  }
  enqueue(h, nullptr, 0, nullptr, 0);
  flush();
}

Request Connection::recv(uint32_t channel, void* data, size_t capacity) {
  if (capacity > 0 && data == nullptr)
    return Request::failed(invalid_argument("recv: null buffer"));
  auto& queue = queues(channel).unexpected;
  if (!queue.empty()) {
    Unexpected u = std::move(queue.front());
    queue.pop_front();
    if (!u.rts) {
      if (u.data.size() > capacity) {
        return Request::failed(out_of_range("message of ", u.data.size(), " bytes on channel ",
                                            channel, " from ", peer_name(),
                                            " exceeds the receive buffer of ", capacity, " bytes"));
      }
      copy_bytes(data, u.data.data(), u.data.size());
      return Request::completed(u.data.size());
    }
    if (state_ == State::kFailed) return Request::failed(status_);
    auto [req, st] = Request::make_pending();
    st->describe("recv", channel, peer_name_);
    answer_rts(channel, u.send_id, u.size, PostedRecv{static_cast<uint8_t*>(data), capacity, st});
    return std::move(req);
  }
  if (state_ == State::kFailed) return Request::failed(status_);
  auto [req, st] = Request::make_pending();
  st->describe("recv", channel, peer_name_);
  queues(channel).posted.push_back(PostedRecv{static_cast<uint8_t*>(data), capacity, st});
  return std::move(req);
}

Status Connection::check_key(const RemoteKey& remote, uint64_t offset, size_t size,
                             const char* op) const {
  const auto blob = remote.backend_blob(Backend::kTcp);
  if (blob.size() != 8) {
    return invalid_argument(op,
                            ": the remote key has no tcp part (the region was not registered "
                            "with a tcp Context)");
  }
  if (load_le(blob.data(), 8) != peer_instance_) {
    return invalid_argument(op, ": the remote key belongs to another Context, not ", peer_name());
  }
  if (offset > remote.length() || size > remote.length() - offset) {
    return out_of_range(op, " of ", size, " bytes at offset ", offset,
                        " is outside the remote "
                        "region of ",
                        remote.length(), " bytes");
  }
  if (size > backend_.options().max_message_size) {
    return invalid_argument(op, " of ", size, " bytes exceeds max_message_size");
  }
  return ok_status();
}

Request Connection::put(const void* local, size_t size, const RemoteKey& remote, uint64_t offset,
                        bool with_immediate, uint32_t immediate) {
  if (state_ == State::kFailed) return Request::failed(status_);
  if (Status s = check_key(remote, offset, size, "put"); !s.ok()) return Request::failed(s);
  auto [req, st] = Request::make_pending();
  st->describe(with_immediate ? "put_with_immediate" : "put", immediate, peer_name_);
  FrameHeader h = next_header(FrameType::kPut);
  h.id = next_op_++;
  h.a0 = remote.region_id();
  h.a1 = offset;
  h.length = size;
  if (with_immediate) {
    h.flags = kFlagImmediate;
    h.channel = immediate;
  }
  remote_ops_.emplace(h.id, RemoteOp{false, nullptr, size, h.a0, offset, st});
  enqueue(h, local, size, nullptr, 0);
  flush();
  return std::move(req);
}

Request Connection::get(void* local, size_t size, const RemoteKey& remote, uint64_t offset) {
  if (state_ == State::kFailed) return Request::failed(status_);
  if (Status s = check_key(remote, offset, size, "get"); !s.ok()) return Request::failed(s);
  auto [req, st] = Request::make_pending();
  st->describe("get", 0, peer_name_);
  FrameHeader h = next_header(FrameType::kGet);
  h.id = next_op_++;
  h.a0 = remote.region_id();
  h.a1 = offset;
  h.a2 = size;
  remote_ops_.emplace(h.id, RemoteOp{true, static_cast<uint8_t*>(local), size, h.a0, offset, st});
  enqueue(h, nullptr, 0, nullptr, 0);
  flush();
  return std::move(req);
}

bool Connection::try_pop_immediate(uint32_t& value) {
  if (immediates_.empty()) return false;
  value = immediates_.front();
  immediates_.pop_front();
  return true;
}

void Connection::reply(FrameType type, uint64_t id, uint64_t code, uint64_t reason,
                       const void* payload, size_t len) {
  FrameHeader h = next_header(type);
  h.id = id;
  h.a0 = code;
  h.a1 = reason;
  h.length = len;
  enqueue(h, payload, len, nullptr, 0);
}

void Connection::flush() {
  if (fd_ < 0 || state_ == State::kFailed) return;
  while (!out_.empty()) {
    iovec iov[kMaxIov];
    int n = 0;
    for (auto it = out_.begin(); it != out_.end() && n + 2 <= kMaxIov; ++it) {
      if (!it->encoded) {
        it->h.seq = wseq_++;
        encode_header(it->h, it->header);
        it->encoded = true;
      }
      if (it->sent < kHeaderSize) {
        iov[n++] = {it->header + it->sent, kHeaderSize - it->sent};
        if (it->payload_len > 0) iov[n++] = {const_cast<uint8_t*>(it->payload), it->payload_len};
      } else {
        const size_t off = it->sent - kHeaderSize;
        iov[n++] = {const_cast<uint8_t*>(it->payload) + off, it->payload_len - off};
      }
    }
    size_t want = 0;
    for (int i = 0; i < n; ++i) want += iov[i].iov_len;
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n);
    ssize_t w = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      const int err = errno;
      fail(is_peer_gone(err) ? peer_failed("connection to ", peer_name(),
                                           " lost: ", errno_status("send", err).message())
                             : errno_status("send to " + peer_name(), err),
           true);
      return;
    }
    auto left = static_cast<size_t>(w);
    while (left > 0) {
      OutFrame& f = out_.front();
      const size_t total = kHeaderSize + f.payload_len;
      const size_t take = std::min(left, total - f.sent);
      f.sent += take;
      left -= take;
      if (f.sent == total) {
        if (f.done) f.done->complete(ok_status(), f.done_bytes);
        out_.pop_front();
      }
    }
    // A short write filled the socket's send buffer: another try now would only see EAGAIN.
    if (static_cast<size_t>(w) < want) break;
  }
  backend_.update_events(*this);
}

bool Connection::bulk_pending() const noexcept {
  if (in_payload_ && cur_.length - pay_done_ >= kDirectRead) return true;
  return !out_.empty() && out_.front().payload_len >= kDirectRead;
}

Status Connection::frame_error(const Status& s) const {
  return Status(s.code(), "frame from " + peer_name() + " at seq " + std::to_string(rseq_) + ": " +
                              std::string(s.message()));
}

// Parses every complete header and copies buffered payload bytes; false once the connection is
// gone (failed or adopted).
bool Connection::parse_buffered() {
  const size_t max_payload = backend_.options().max_message_size;
  for (;;) {
    if (fd_ < 0 || state_ == State::kFailed) return false;
    if (in_payload_) {
      const uint64_t left = cur_.length - pay_done_;
      if (left == 0) {
        in_payload_ = false;
        Status s = finish_payload();
        if (!s.ok()) {
          fail(frame_error(s), true);
          return false;
        }
        continue;
      }
      const size_t avail = rlen_ - rpos_;
      if (avail == 0) return true;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(avail, left));
      if (sink_ptr_ != nullptr) copy_bytes(sink_ptr_ + pay_done_, rbuf_.data() + rpos_, n);
      rpos_ += n;
      pay_done_ += n;
      continue;
    }
    if (rlen_ - rpos_ < kHeaderSize) return true;
    FrameHeader h;
    Status s = decode_header(rbuf_.data() + rpos_, max_payload, h);
    if (s.ok()) s = begin_frame(h);
    if (!s.ok()) {
      fail(frame_error(s), true);
      return false;
    }
    rpos_ += kHeaderSize;
    // After a large frame read the next header alone (read_available); a frame with a smaller
    // payload goes back to large staging reads; payload-less control frames (RTS, CTS) leave the
    // choice as it was.
    if (h.length >= kHeaderAloneAfter) {
      header_only_read_ = true;
    } else if (h.length > 0) {
      header_only_read_ = false;
    }
  }
}

void Connection::read_failed(ssize_t r, int err) {
  if (r == 0) {
    const bool mid = in_payload_ || rlen_ > rpos_;
    fail(peer_failed("connection to ", peer_name(), " lost: the peer closed it",
                     mid ? " in the middle of a frame (truncated frame)" : ""),
         mid || has_pending());
    return;
  }
  fail(peer_failed("connection to ", peer_name(), " lost: ", errno_status("recv", err).message()),
       true);
}

bool Connection::set_receive_timeout(int ms) {
  if (ms == rcvtimeo_ms_) return true;
  timeval tv{};
  tv.tv_sec = ms / 1000;
  tv.tv_usec = static_cast<suseconds_t>(ms % 1000) * 1000;
  if (setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0) return false;
  rcvtimeo_ms_ = ms;
  return true;
}

size_t Connection::wait_and_serve(int max_ms) {
  if (fd_ < 0 || state_ == State::kFailed) return 0;
  // A watermark raised while the Context slept on the epoll set must not outlive it here: this
  // sleep reads a payload with MSG_WAITALL, and under a raised watermark the rest of the peer's
  // payload could stall until the sleep step ran out. No system call when it is already 1.
  update_receive_watermark();
  if (!has_output()) return on_readable(max_ms);
  pollfd p{fd_, POLLIN | POLLOUT, 0};
  if (::poll(&p, 1, max_ms) <= 0) return 0;
  if ((p.revents & POLLOUT) != 0) flush();
  if ((p.revents & (POLLIN | POLLERR | POLLHUP)) != 0 && fd_ >= 0) return on_readable();
  return 0;
}

void Connection::update_receive_watermark() {
  if (fd_ < 0) return;
  const uint64_t left =
      in_payload_ && sink_ptr_ != nullptr && cur_.length > pay_done_ ? cur_.length - pay_done_ : 0;
  // A watermark up to the payload's remainder stays valid while that payload is read: the
  // remainder always arrives in full (the sender completes a payload it has started), so it
  // never waits for bytes that do not come, and a closed or failed connection wakes a sleeper
  // whatever the watermark. One set per large payload, one reset after it.
  const bool on_set = backend_.sleeps_on_set();
  if (on_set && left > 0 && rcvlowat_ > 1 && static_cast<uint64_t>(rcvlowat_) <= left) return;
  const int want = on_set && left >= kWatermarkMin
                       ? static_cast<int>(std::min<uint64_t>(left, kMaxWatermark))
                       : 1;
  if (want == rcvlowat_) return;
  if (setsockopt(fd_, SOL_SOCKET, SO_RCVLOWAT, &want, sizeof(want)) == 0) rcvlowat_ = want;
}

size_t Connection::on_readable(int block_ms) {
  const size_t total = read_available(block_ms);
  update_receive_watermark();
  return total;
}

size_t Connection::read_available(int block_ms) {
  size_t total = 0;
  // The first read may sleep (blocking socket, SO_RCVTIMEO bounds it); every later one must not.
  int flags = block_ms > 0 && set_receive_timeout(block_ms) ? 0 : MSG_DONTWAIT;
  for (;;) {
    if (!parse_buffered()) return total;
    if (in_payload_) {
      // The staging buffer is empty; read a large remainder straight into its destination.
      const uint64_t left = cur_.length - pay_done_;
      if (left >= kDirectRead && sink_ptr_ != nullptr) {
        rpos_ = rlen_ = 0;
        // A sleeping read of a payload waits for all of it (MSG_WAITALL): the kernel then copies
        // each arriving segment without a return to user space and a new recv per segment. Safe
        // here: nothing of ours is queued (the caller only sleeps in recv then), and the sender
        // completes a payload it has started without waiting for us; SO_RCVTIMEO still bounds it.
        const ssize_t r = ::recv(fd_, sink_ptr_ + pay_done_, static_cast<size_t>(left),
                                 flags == 0 ? MSG_WAITALL : flags);
        const bool blocked = flags == 0;
        flags = MSG_DONTWAIT;
        if (r > 0) {
          total += static_cast<size_t>(r);
          pay_done_ += static_cast<uint64_t>(r);
          if (static_cast<uint64_t>(r) < left) return total;  // drained; epoll reports more
          continue;
        }
        if (r < 0 && errno == EINTR && !blocked) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return total;
        read_failed(r, errno);
        return total;
      }
    }
    if (rpos_ > 0) {
      std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rlen_ - rpos_);
      rlen_ -= rpos_;
      rpos_ = 0;
    }
    // Fetch just the next header when a large payload is likely to follow it: after a large
    // frame (see parse_buffered), or while a rendezvous payload we cleared is due (its DATA frame
    // comes next but for control frames). That payload then lands in its destination instead of
    // arriving behind its header in the staging buffer and being copied out of it.
    const bool header_only =
        !in_payload_ && rlen_ < kHeaderSize && (header_only_read_ || !awaiting_.empty());
    const size_t room = header_only ? kHeaderSize - rlen_ : rbuf_.size() - rlen_;
    const ssize_t r = ::recv(fd_, rbuf_.data() + rlen_, room, flags);
    const bool blocked = flags == 0;
    flags = MSG_DONTWAIT;
    if (r > 0) {
      total += static_cast<size_t>(r);
      rlen_ += static_cast<size_t>(r);
      if (static_cast<size_t>(r) < room) {
        (void)parse_buffered();  // a short read drained the socket
        return total;
      }
      continue;
    }
    if (r < 0 && errno == EINTR && !blocked) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return total;
    read_failed(r, errno);
    return total;
  }
}

Status Connection::begin_frame(const FrameHeader& h) {
  if (h.seq != rseq_) {
    return protocol_error("out-of-sequence frame: seq ", h.seq, ", expected ", rseq_);
  }
  ++rseq_;
  if (!got_hello_ && h.type != FrameType::kHello) {
    return protocol_error("frame type ", int(h.type), " before the hello");
  }
  cur_ = h;
  pay_done_ = 0;
  sink_ptr_ = nullptr;
  sink_state_.reset();
  in_payload_ = true;  // zero-length frames finish at the next loop step
  switch (h.type) {
    case FrameType::kHello: {
      if (got_hello_) return protocol_error("second hello");
      if (((h.flags & kFlagReply) != 0) != dialer) {
        return protocol_error(dialer ? "expected a hello reply" : "unexpected hello reply");
      }
      sink_ = Sink::kHello;
      sink_buf_.resize(h.length);
      sink_ptr_ = sink_buf_.data();
      return ok_status();
    }
    case FrameType::kEager: {
      auto& posted = queues(h.channel).posted;
      if (!posted.empty()) {
        PostedRecv pr = std::move(posted.front());
        posted.pop_front();
        sink_state_ = std::move(pr.state);
        sink_capacity_ = pr.capacity;
        if (h.length <= pr.capacity) {
          sink_ = Sink::kEagerToRecv;
          sink_ptr_ = pr.data;
        } else {
          sink_ = Sink::kEagerTooSmall;
        }
        return ok_status();
      }
      sink_ = Sink::kEagerUnexpected;
      sink_buf_.assign(h.length, 0);
      sink_ptr_ = sink_buf_.data();
      return ok_status();
    }
    case FrameType::kRts: {
      in_payload_ = false;
      if (h.a0 > backend_.options().max_message_size) {
        return protocol_error("rendezvous of ", h.a0, " bytes exceeds max_message_size");
      }
      auto& posted = queues(h.channel).posted;
      if (!posted.empty()) {
        PostedRecv pr = std::move(posted.front());
        posted.pop_front();
        answer_rts(h.channel, h.id, h.a0, std::move(pr));
      } else {
        queues(h.channel).unexpected.push_back(Unexpected{true, h.id, h.a0, {}});
      }
      return ok_status();
    }
    case FrameType::kCts: {
      in_payload_ = false;
      auto it = rts_sent_.find(h.id);
      if (it == rts_sent_.end()) return protocol_error("clear-to-send for unknown send ", h.id);
      PendingSend ps = std::move(it->second);
      rts_sent_.erase(it);
      if ((h.flags & kFlagDiscard) != 0) {
        ps.state->complete(out_of_range("the receive buffer of ", peer_name(), " on channel ",
                                        ps.channel, " is smaller than the ", ps.size,
                                        "-byte message; the message was discarded"),
                           0);
        return ok_status();
      }
      FrameHeader d = next_header(FrameType::kData);
      d.id = h.a0;
      d.length = ps.size;
      enqueue(d, ps.data, ps.size, ps.state, ps.size);
      flush();
      return ok_status();
    }
    case FrameType::kData: {
      auto it = awaiting_.find(h.id);
      if (it == awaiting_.end()) return protocol_error("data for unknown receive token ", h.id);
      if (it->second.size != h.length) {
        return protocol_error("data of ", h.length, " bytes for a ", it->second.size,
                              "-byte rendezvous");
      }
      sink_ = Sink::kData;
      sink_ptr_ = it->second.data;
      sink_state_ = std::move(it->second.state);
      awaiting_.erase(it);
      return ok_status();
    }
    case FrameType::kPut: {
      sink_ = Sink::kPut;
      put_error_ = RemoteError::kNone;
      const RegionState* r = backend_.find_region(h.a0);
      if (r == nullptr || !r->valid) {
        put_error_ = RemoteError::kUnknownRegion;
      } else if (!allows(r->access, Access::kRemoteWrite)) {
        put_error_ = RemoteError::kAccessDenied;
      } else if (h.a1 > r->size || h.length > r->size - h.a1) {
        put_error_ = RemoteError::kOutOfBounds;
      } else {
        sink_ptr_ = static_cast<uint8_t*>(r->data) + h.a1;
      }
      return ok_status();
    }
    case FrameType::kPutAck:
    case FrameType::kGetResp: {
      const bool is_get = h.type == FrameType::kGetResp;
      auto it = remote_ops_.find(h.id);
      if (it == remote_ops_.end() || it->second.is_get != is_get) {
        return protocol_error(is_get ? "get response" : "put acknowledgement",
                              " for unknown operation ", h.id);
      }
      if (h.a0 > static_cast<uint64_t>(StatusCode::kInternal)) {
        return protocol_error("remote status code ", h.a0);
      }
      RemoteOp op = std::move(it->second);
      remote_ops_.erase(it);
      if (h.a0 != 0) {
        if (h.length != 0) return protocol_error("failed get response with a payload");
        in_payload_ = false;
        op.state->complete(
            Status(static_cast<StatusCode>(h.a0),
                   std::string(is_get ? "get" : "put") + " of " + std::to_string(op.size) +
                       " bytes at offset " + std::to_string(op.offset) + " of region " +
                       std::to_string(op.region) + " refused by " + peer_name() + ": " +
                       remote_error_text(h.a1)),
            0);
        return ok_status();
      }
      if (!is_get) {
        if (h.length != 0) return protocol_error("put acknowledgement with a payload");
        in_payload_ = false;
        op.state->complete(ok_status(), op.size);
        return ok_status();
      }
      if (h.length != op.size) {
        return protocol_error("get response of ", h.length, " bytes for a ", op.size, "-byte get");
      }
      sink_ = Sink::kGetResp;
      sink_ptr_ = op.local;
      sink_state_ = std::move(op.state);
      return ok_status();
    }
    case FrameType::kGet: {
      in_payload_ = false;
      const RegionState* r = backend_.find_region(h.a0);
      RemoteError e = RemoteError::kNone;
      if (r == nullptr || !r->valid) {
        e = RemoteError::kUnknownRegion;
      } else if (!allows(r->access, Access::kRemoteRead)) {
        e = RemoteError::kAccessDenied;
      } else if (h.a1 > r->size || h.a2 > r->size - h.a1) {
        e = RemoteError::kOutOfBounds;
      } else if (h.a2 > backend_.options().max_message_size) {
        e = RemoteError::kOutOfBounds;
      }
      if (e == RemoteError::kNone) {
        reply(FrameType::kGetResp, h.id, 0, 0, static_cast<const uint8_t*>(r->data) + h.a1,
              static_cast<size_t>(h.a2));
      } else {
        reply(
            FrameType::kGetResp, h.id,
            static_cast<uint64_t>(e == RemoteError::kOutOfBounds    ? StatusCode::kOutOfRange
                                  : e == RemoteError::kAccessDenied ? StatusCode::kPermissionDenied
                                                                    : StatusCode::kInvalidArgument),
            static_cast<uint64_t>(e), nullptr, 0);
      }
      flush();
      return ok_status();
    }
  }
  return protocol_error("unhandled frame type ", int(h.type));
}

Status Connection::finish_payload() {
  const Sink sink = sink_;
  sink_ = Sink::kNone;
  switch (sink) {
    case Sink::kNone:
      return ok_status();
    case Sink::kHello: {
      auto hello = Hello::decode(sink_buf_);
      if (!hello.ok()) return hello.status();
      got_hello_ = true;
      return backend_.on_hello(*this, *hello, dialer);
    }
    case Sink::kEagerToRecv:
      sink_state_->complete(ok_status(), cur_.length);
      break;
    case Sink::kEagerTooSmall:
      sink_state_->complete(
          out_of_range("message of ", cur_.length, " bytes on channel ", cur_.channel, " from ",
                       peer_name(), " exceeds the receive buffer of ", sink_capacity_, " bytes"),
          0);
      break;
    case Sink::kEagerUnexpected: {
      // A recv posted while this payload was still arriving found nothing to match, so it waits
      // in its posted queue; this message is older than anything after it and belongs to that recv.
      auto& posted = queues(cur_.channel).posted;
      if (!posted.empty()) {
        PostedRecv pr = std::move(posted.front());
        posted.pop_front();
        if (sink_buf_.size() > pr.capacity) {
          pr.state->complete(out_of_range("message of ", sink_buf_.size(), " bytes on channel ",
                                          cur_.channel, " from ", peer_name(),
                                          " exceeds the receive buffer of ", pr.capacity, " bytes"),
                             0);
        } else {
          if (!sink_buf_.empty()) std::memcpy(pr.data, sink_buf_.data(), sink_buf_.size());
          pr.state->complete(ok_status(), sink_buf_.size());
        }
      } else {
        queues(cur_.channel).unexpected.push_back(Unexpected{false, 0, 0, std::move(sink_buf_)});
      }
      sink_buf_ = {};
      break;
    }
    case Sink::kData:
    case Sink::kGetResp:
      sink_state_->complete(ok_status(), cur_.length);
      break;
    case Sink::kPut: {
      if (put_error_ == RemoteError::kNone && (cur_.flags & kFlagImmediate) != 0) {
        immediates_.push_back(cur_.channel);
      }
      const StatusCode code = put_error_ == RemoteError::kNone          ? StatusCode::kOk
                              : put_error_ == RemoteError::kOutOfBounds ? StatusCode::kOutOfRange
                              : put_error_ == RemoteError::kAccessDenied
                                  ? StatusCode::kPermissionDenied
                                  : StatusCode::kInvalidArgument;
      reply(FrameType::kPutAck, cur_.id, static_cast<uint64_t>(code),
            static_cast<uint64_t>(put_error_), nullptr, 0);
      flush();
      break;
    }
  }
  sink_state_.reset();
  return ok_status();
}

void Connection::adopt(Connection& accepted) {
  fd_ = accepted.fd_;
  rcvtimeo_ms_ = accepted.rcvtimeo_ms_;  // the socket's SO_RCVTIMEO comes along
  rcvlowat_ = accepted.rcvlowat_;        // and its SO_RCVLOWAT
  accepted.fd_ = -1;
  rbuf_.swap(accepted.rbuf_);
  rpos_ = accepted.rpos_;
  rlen_ = accepted.rlen_;
  rseq_ = accepted.rseq_;
  header_only_read_ = accepted.header_only_read_;
  got_hello_ = true;
  dialer = false;
  state_ = State::kOpen;
  deadline_ns = 0;
  accepted.state_ = State::kFailed;
  accepted.status_ = cancelled("adopted by an awaiting endpoint");
}

bool Connection::has_pending() const noexcept {
  if (!out_.empty() || !rts_sent_.empty() || !awaiting_.empty() || !remote_ops_.empty()) {
    return true;
  }
  for (const auto& [ch, q] : channels_) {
    if (!q.posted.empty()) return true;
  }
  return false;
}

void Connection::fail(Status why, bool warn) {
  if (state_ == State::kFailed) return;
  state_ = State::kFailed;
  if (warn) {
    MYELIN_LOG_WARN << "tcp: closing connection to " << peer_name() << ": " << why;
  } else {
    MYELIN_LOG_INFO << "tcp: closing connection to " << peer_name() << ": " << why;
  }
  status_ = why;
  backend_.on_failed(*this);
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  auto finish = [&](const RequestStateRef& st) {
    if (st) st->complete(status_, 0);
  };
  for (auto& f : out_) finish(f.done);
  out_.clear();
  for (auto& [id, ps] : rts_sent_) finish(ps.state);
  rts_sent_.clear();
  for (auto& [ch, q] : channels_) {
    for (auto& pr : q.posted) finish(pr.state);
    q.posted.clear();
  }
  for (auto& [id, a] : awaiting_) finish(a.state);
  awaiting_.clear();
  for (auto& [id, op] : remote_ops_) finish(op.state);
  remote_ops_.clear();
  finish(sink_state_);
  sink_state_.reset();
  in_payload_ = false;
}

}  // namespace myelin::transport::internal::tcp
