// myelin/transport/request.hpp
//
// Request: the handle of one asynchronous operation (send, recv, put, get). It completes exactly
// once, with a Status and a byte count (bytes received for recv, bytes moved otherwise). Requests
// are completed by the progress engine of their Context; wait with Context::wait(request, deadline)
// or poll with Context::progress() and done().
//
// Operations that finish at once (an eager send copied into a ring, a recv matching a message that
// already arrived) return a completed Request with no allocation. A backend that creates a pending
// Request per message can take them from a RequestStatePool, which reuses the states of finished
// requests whose handles are gone (no allocation in the steady state).
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
#include <vector>

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
  // rank 1"). op must be a string literal; peer is shared with the endpoint (may be null). A
  // recycled state that already names the same peer keeps its reference (no count update).
  void describe(const char* op, uint32_t channel, const std::shared_ptr<const std::string>& peer) {
    op_ = op;
    channel_ = channel;
    if (peer_ != peer) peer_ = peer;
  }
  [[nodiscard]] std::string description() const {
    if (op_ == nullptr) return "request";
    std::string s(op_);
    s += " on channel " + std::to_string(channel_);
    if (peer_) s += " with " + *peer_;
    return s;
  }

 private:
  friend class RequestStatePool;
  // Back to a fresh pending state; the peer label stays (describe() usually sets the same one).
  void reset() noexcept {
    done_ = false;
    bytes_ = 0;
    status_ = Status();
    op_ = nullptr;
    channel_ = 0;
  }

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
    return pending_from(std::make_shared<RequestState>());
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
  friend class RequestStatePool;
  explicit Request(size_t bytes) : inline_bytes_(bytes) {}
  static std::pair<Request, std::shared_ptr<RequestState>> pending_from(
      std::shared_ptr<RequestState> state) {
    Request r;
    r.state_ = state;
    return {std::move(r), std::move(state)};
  }
  std::shared_ptr<RequestState> state_;
  size_t inline_bytes_ = 0;
  Status inline_status_;
};

// RequestStatePool: a backend's cache of the states of requests it finished, reused once every
// Request handle of them is gone, so that a backend creating one pending Request per message (a
// recv posted before its message arrives) allocates nothing in the steady state.
//
// A backend calls recycle() with its own reference to a state it completed and will not touch
// again; make_pending() reuses the oldest or newest cached state that nobody else holds any more
// (use_count() == 1: the pool's reference is the only one), else allocates one. At most
// `capacity` states are cached; beyond that the oldest is released.
//
// Thread safety: none; the pool and the Requests it hands out belong to one progress thread (as
// every Request does), which is what makes the use_count() test exact.
class RequestStatePool {
 public:
  static constexpr size_t kDefaultCapacity = 64;
  explicit RequestStatePool(size_t capacity = kDefaultCapacity)
      : slots_(capacity == 0 ? 1 : capacity) {}
  RequestStatePool(const RequestStatePool&) = delete;
  RequestStatePool& operator=(const RequestStatePool&) = delete;

  // A pending request: a recycled state when one is free, else a new one.
  std::pair<Request, std::shared_ptr<RequestState>> make_pending() {
    if (count_ != 0) {
      if (slots_[head_].use_count() == 1) {
        std::shared_ptr<RequestState> state = std::move(slots_[head_]);
        head_ = next(head_);
        --count_;
        state->reset();
        return Request::pending_from(std::move(state));
      }
      auto& newest = slots_[index(count_ - 1)];
      if (newest.use_count() == 1) {
        std::shared_ptr<RequestState> state = std::move(newest);
        --count_;
        state->reset();
        return Request::pending_from(std::move(state));
      }
    }
    return Request::make_pending();
  }

  // Takes back the backend's reference to a completed state (an unfinished one is just dropped:
  // it must never be handed out again while someone may still complete it).
  void recycle(std::shared_ptr<RequestState> state) noexcept {
    if (!state || !state->done()) return;
    if (count_ == slots_.size()) {
      slots_[head_].reset();
      head_ = next(head_);
      --count_;
    }
    slots_[index(count_)] = std::move(state);
    ++count_;
  }

  [[nodiscard]] size_t cached() const noexcept { return count_; }

 private:
  [[nodiscard]] size_t next(size_t i) const noexcept { return i + 1 == slots_.size() ? 0 : i + 1; }
  [[nodiscard]] size_t index(size_t k) const noexcept {
    const size_t i = head_ + k;
    return i >= slots_.size() ? i - slots_.size() : i;
  }

  std::vector<std::shared_ptr<RequestState>> slots_;  // a ring: count_ entries from head_
  size_t head_ = 0;
  size_t count_ = 0;
};

}  // namespace myelin::transport
