// tests/broker/raw_connection.hpp — one TCP connection to a broker driven by hand with the
// broker's own codec, for the tests of what Client never does: a protocol-1 handshake, forged and
// replayed attaches, ending one connection of a session while the other goes on, staying silent.
//
// Thread safety: one thread per Raw.
#pragma once

#include <poll.h>

#include <span>
#include <string>
#include <string_view>

#include <myelin/broker/frame.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

#include "broker_daemon.hpp"
#include "wire.hpp"

namespace myelin::broker::test_support {

class Raw {
 public:
  // buffer_bytes > 0 caps the socket's kernel buffers (connect_tcp()).
  explicit Raw(const std::string& address, int buffer_bytes = 0) {
    auto hp = internal::parse_host_port(address);
    if (!hp.ok()) return;
    auto fd = internal::connect_tcp(*hp, Deadline::after_ms(5000), buffer_bytes);
    if (fd.ok()) fd_ = std::move(*fd);
  }
  [[nodiscard]] bool ok() const { return fd_.valid(); }
  int fd() const { return fd_.get(); }
  void close() { fd_.reset(); }
  Status send(FrameHeader h, std::string_view topic = {}, std::span<const std::byte> p = {}) {
    MYELIN_RETURN_IF_ERROR(out_.push(h, topic, p, nullptr, false, monotonic_ns()));
    const Deadline d = Deadline::after_ms(5000);
    while (true) {
      MYELIN_ASSIGN_OR_RETURN(bool done, out_.flush(fd_.get()));
      if (done) return ok_status();
      if (d.expired()) return timeout_error("raw send");
      pollfd p2{fd_.get(), POLLOUT, 0};
      (void)::poll(&p2, 1, d.remaining_ms_for_poll());
    }
  }
  // The next frame other than heartbeats and credits (unless `all`); the view lives until the
  // next call. Errors: peer_failed when the broker closed the connection, timeout_error.
  Result<FrameView> next(Deadline d, bool all = false) {
    while (true) {
      FrameView f;
      MYELIN_ASSIGN_OR_RETURN(bool got, rx_.next(&f));
      if (got) {
        if (!all && (f.header.type == FrameType::kHeartbeat || f.header.type == FrameType::kCredit))
          continue;
        return f;
      }
      if (!wait_readable(fd_.get(), d)) return timeout_error("raw read");
      MYELIN_ASSIGN_OR_RETURN(size_t n, rx_.read_from(fd_.get()));
      (void)n;
    }
  }
  // Waits for the broker to close this connection (end of stream); false at the deadline.
  bool closed_by_peer(Deadline d) {
    while (true) {
      auto f = next(d, true);
      if (!f.ok()) return f.status().code() == StatusCode::kPeerFailed;
    }
  }

 private:
  internal::Fd fd_;
  internal::OutQueue out_;
  internal::RxBuffer rx_{DecodeLimits{}};
};

}  // namespace myelin::broker::test_support
