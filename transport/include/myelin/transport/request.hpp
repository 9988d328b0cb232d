// myelin/transport/request.hpp
//
// Request: the handle of one asynchronous operation (send, recv, put, get). It completes exactly
// once, with a Status and a byte count (bytes received for recv, bytes moved otherwise). Requests
// are completed by the progress engine of their Context; wait with Context::wait(request, deadline)
// or poll with Context::progress() and done().
//
// Operations that finish at once (an eager send copied into a ring, a recv matching a message that
// already arrived) return a completed Request with no allocation.
//
// Thread safety: a Request belongs to its Context's progress thread, like the Context.
// Ownership: the state is shared between the caller's handle and the backend; dropping the handle
// does not cancel the operation, but the caller must keep the data buffer alive until completion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <myelin/core/status.hpp>

namespace myelin::transport {

// The shared completion record. Backends create it with Request::make_pending() and finish it
// with complete(); both only on the progress thread.
class RequestState {
 public:
  [[nodiscard]] bool done() const noexcept { return done_; }
  [[nodiscard]] const Status& status() const noexcept { return status_; }
  [[nodiscard]] size_t bytes() const noexcept { return bytes_; }
  // Completes once; later calls are ignored (the first outcome wins), so error paths that may race
  // a success on teardown stay simple.
  void complete(Status status, size_t bytes) {
    if (done_) return;
    status_ = std::move(status);
    bytes_ = bytes;
    done_ = true;
  }
  // Optional: what the operation is, so a timed-out wait can name it ("recv on channel 3 from
  // rank 1"). op must be a string literal; peer is shared with the endpoint (may be null).
  void describe(const char* op, uint32_t channel, std::shared_ptr<const std::string> peer) {
    op_ = op;
    channel_ = channel;
    peer_ = std::move(peer);
  }
  [[nodiscard]] std::string description() const {
    if (op_ == nullptr) return "request";
    std::string s(op_);
    s += " on channel " + std::to_string(channel_);
    if (peer_) s += " with " + *peer_;
    return s;
  }

 private:
  bool done_ = false;
  size_t bytes_ = 0;
  Status status_;
  const char* op_ = nullptr;
  uint32_t channel_ = 0;
  std::shared_ptr<const std::string> peer_;
};

class [[nodiscard]] Request {
 public:
  // An empty Request counts as completed OK with 0 bytes.
  Request() = default;

  static Request completed(size_t bytes) { return Request(bytes); }
  static Request failed(Status status) {
    Request r;
    r.inline_status_ = std::move(status);
    return r;
  }
  // A request the backend will complete later; returns the handle and the state to complete.
  static std::pair<Request, std::shared_ptr<RequestState>> make_pending() {
    auto state = std::make_shared<RequestState>();
    Request r;
    r.state_ = state;
    return {std::move(r), std::move(state)};
  }

  [[nodiscard]] bool done() const noexcept { return !state_ || state_->done(); }
  // The outcome; meaningful once done().
  [[nodiscard]] const Status& status() const noexcept {
    return state_ ? state_->status() : inline_status_;
  }
  [[nodiscard]] size_t bytes() const noexcept { return state_ ? state_->bytes() : inline_bytes_; }
  // The backend's description of the operation (see RequestState::describe()).
  [[nodiscard]] std::string description() const {
    return state_ ? state_->description() : std::string("completed request");
  }

 private:
  explicit Request(size_t bytes) : inline_bytes_(bytes) {}
  std::shared_ptr<RequestState> state_;
  size_t inline_bytes_ = 0;
  Status inline_status_;
};

}  // namespace myelin::transport
