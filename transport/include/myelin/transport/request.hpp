// myelin/transport/request.hpp
//
// Request: the handle of one asynchronous operation (send, recv, put, get). It completes exactly
// once, with a Status and a byte count (bytes received for recv, bytes moved otherwise). Requests
// are completed by the progress engine of their Context; wait with Context::wait(request, deadline)
// or poll with Context::progress() and done().
//
// Operations that finish at once (an eager send copied into a ring, a recv matching a message that
// already arrived) return a completed Request with no state and no allocation. A pending Request
// shares a RequestState with the backend that will complete it. A backend that creates a pending
// Request per message takes the states from a RequestStatePool: a state whose last reference is
// gone goes back to its pool's free list and the next pending request reuses it (no allocation in
// the steady state).
//
// Thread safety: a Request, its state, and the pool the state came from belong to the Context's
// progress thread, like the Context itself (the reference counts are plain integers: copying or
// dropping a handle costs an increment, not an atomic read-modify-write). Handles may be dropped
// after their Context is gone, on the thread that used it.
// Ownership: the state lives while a Request handle or the backend refers to it; dropping the
// handle does not cancel the operation, but the caller must keep the data buffer alive until
// completion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <myelin/core/status.hpp>

namespace myelin::transport {

class Request;
class RequestStateRef;
class RequestStatePool;

// The shared completion record of a pending Request. Backends get it from Request::make_pending()
// or RequestStatePool::make_pending() (with a RequestStateRef to it) and finish it with
// complete(); both only on the progress thread.
class RequestState {
 public:
  RequestState(const RequestState&) = delete;
  RequestState& operator=(const RequestState&) = delete;

  [[nodiscard]] bool done() const noexcept { return done_; }
  [[nodiscard]] const Status& status() const noexcept { return status_; }
  [[nodiscard]] size_t bytes() const noexcept { return bytes_; }
  // Completes once; later calls are ignored (the first outcome wins), so error paths that may race
  // a success on teardown stay simple. Always inline: a successful completion is then three
  // stores where a backend delivers a message (the compiler kept the Status move out of line).
  [[gnu::always_inline]] void complete(Status status, size_t bytes) {
    if (done_) return;
    if (!status.ok()) status_ = std::move(status);  // status_ is OK until the state completes
    bytes_ = bytes;
    done_ = true;
  }
  // Optional: what the operation is, so a timed-out wait can name it ("recv on channel 3 from
  // rank 1"). op must be a string literal; peer is shared with the endpoint (may be null). A
  // reused state that already names the same peer keeps its reference (no count update).
  void describe(const char* op, uint32_t channel, const std::shared_ptr<const std::string>& peer) {
    op_ = op;
    channel_ = channel;
    if (peer_ != peer) peer_ = peer;
  }
  [[nodiscard]] std::string description() const;

 private:
  friend class Request;
  friend class RequestStateRef;
  friend class RequestStatePool;
  // The free list a pooled state returns to; shared by the pool and the states it made, and
  // freed by whichever of them goes last (see RequestStatePool).
  struct Home {
    RequestState* free = nullptr;  // singly linked through next_free_
    size_t free_count = 0;
    size_t capacity = 0;  // most states kept on the free list; 0 once the pool is gone
    size_t attached = 0;  // states whose home_ is this, listed or in use
    bool pool_alive = true;
  };

  explicit RequestState(Home* home) noexcept : home_(home) {}
  ~RequestState() = default;

  void add_ref() noexcept { ++refs_; }
  // Drops a reference; the last one puts the state back on its pool's free list (inline: the
  // usual end of a pooled request), or frees it (no pool, the pool gone, or its list full).
  void release() noexcept {
    if (--refs_ != 0) return;
    Home* home = home_;
    if (home != nullptr && home->free_count < home->capacity) {
      next_free_ = home->free;
      home->free = this;
      ++home->free_count;
      return;
    }
    free_unlisted();
  }
  void free_unlisted() noexcept;

  bool done_ = false;
  uint32_t channel_ = 0;
  uint32_t refs_ = 0;  // Request handles and RequestStateRefs to this state
  size_t bytes_ = 0;
  Status status_;
  const char* op_ = nullptr;
  std::shared_ptr<const std::string> peer_;
  Home* home_ = nullptr;  // null: not from a pool
  RequestState* next_free_ = nullptr;
};

// A backend's counted reference to a RequestState (its half of a pending request). Copy, move,
// reset() and comparison as a smart pointer; null when default-constructed or moved from.
class RequestStateRef {
 public:
  RequestStateRef() noexcept = default;
  RequestStateRef(std::nullptr_t) noexcept {}  // NOLINT(google-explicit-constructor)
  RequestStateRef(const RequestStateRef& other) noexcept : state_(other.state_) {
    if (state_ != nullptr) state_->add_ref();
  }
  RequestStateRef(RequestStateRef&& other) noexcept
      : state_(std::exchange(other.state_, nullptr)) {}
  RequestStateRef& operator=(const RequestStateRef& other) noexcept {
    RequestStateRef(other).swap(*this);
    return *this;
  }
  RequestStateRef& operator=(RequestStateRef&& other) noexcept {
    RequestStateRef(std::move(other)).swap(*this);
    return *this;
  }
  ~RequestStateRef() {
    if (state_ != nullptr) state_->release();
  }

  void reset() noexcept {
    if (state_ != nullptr) std::exchange(state_, nullptr)->release();
  }
  void swap(RequestStateRef& other) noexcept { std::swap(state_, other.state_); }
  [[nodiscard]] RequestState* get() const noexcept { return state_; }
  RequestState* operator->() const noexcept { return state_; }
  RequestState& operator*() const noexcept { return *state_; }
  explicit operator bool() const noexcept { return state_ != nullptr; }
  // Request handles and backend references to the state (0 when null).
  [[nodiscard]] uint32_t use_count() const noexcept {
    return state_ != nullptr ? state_->refs_ : 0;
  }
  friend bool operator==(const RequestStateRef& a, const RequestStateRef& b) noexcept {
    return a.state_ == b.state_;
  }

 private:
  friend class Request;
  friend class RequestStatePool;
  // Takes over one reference the caller already counted.
  explicit RequestStateRef(RequestState* adopted) noexcept : state_(adopted) {}
  RequestState* state_ = nullptr;
};

class [[nodiscard]] Request {
 public:
  // An empty Request counts as completed OK with 0 bytes.
  Request() noexcept = default;
  Request(const Request& other)
      : state_(other.state_),
        inline_bytes_(other.inline_bytes_),
        inline_status_(other.inline_status_) {
    if (state_ != nullptr) state_->add_ref();
  }
  Request(Request&& other) noexcept
      : state_(std::exchange(other.state_, nullptr)),
        inline_bytes_(other.inline_bytes_),
        inline_status_(std::move(other.inline_status_)) {}
  Request& operator=(const Request& other) {
    Request(other).swap(*this);
    return *this;
  }
  Request& operator=(Request&& other) noexcept {
    Request(std::move(other)).swap(*this);
    return *this;
  }
  ~Request() {
    if (state_ != nullptr) state_->release();
  }

  static Request completed(size_t bytes) noexcept {
    Request r;
    r.inline_bytes_ = bytes;
    return r;
  }
  static Request failed(Status status) noexcept {
    Request r;
    r.inline_status_ = std::move(status);
    return r;
  }
  // A request the backend will complete later, with a state of its own (one allocation, freed
  // with its last reference); returns the handle and the backend's reference.
  static std::pair<Request, RequestStateRef> make_pending();

  [[nodiscard]] bool done() const noexcept { return state_ == nullptr || state_->done(); }
  // The outcome; meaningful once done().
  [[nodiscard]] const Status& status() const noexcept {
    return state_ != nullptr ? state_->status() : inline_status_;
  }
  [[nodiscard]] size_t bytes() const noexcept {
    return state_ != nullptr ? state_->bytes() : inline_bytes_;
  }
  // The backend's description of the operation (see RequestState::describe()).
  [[nodiscard]] std::string description() const {
    return state_ != nullptr ? state_->description() : std::string("completed request");
  }

 private:
  friend class RequestStatePool;
  void swap(Request& other) noexcept {
    std::swap(state_, other.state_);
    std::swap(inline_bytes_, other.inline_bytes_);
    std::swap(inline_status_, other.inline_status_);
  }
  // A fresh state with its two references counted: the handle's and the backend's.
  static std::pair<Request, RequestStateRef> pending_from(RequestState* state) noexcept {
    state->refs_ = 2;
    Request r;
    r.state_ = state;
    return {std::move(r), RequestStateRef(state)};
  }

  RequestState* state_ = nullptr;
  size_t inline_bytes_ = 0;
  Status inline_status_;
};

// RequestStatePool: a backend's free list of request states, so that a backend creating one
// pending Request per message (a recv posted before its message arrives) allocates nothing in the
// steady state. A state made here returns to the list when its last reference (the caller's
// Request handles, the backend's RequestStateRefs) goes, and make_pending() takes the most
// recently returned one, whose cache lines are the warmest. At most `capacity` states wait on the
// list; beyond that a returning state is freed. States may outlive the pool (a handle kept after
// its Context closed): the pool's destructor frees the listed states, and each one still in use
// is freed with its last reference.
//
// Thread safety: none; the pool and the Requests it hands out belong to one progress thread (as
// every Request does).
class RequestStatePool {
 public:
  static constexpr size_t kDefaultCapacity = 64;
  explicit RequestStatePool(size_t capacity = kDefaultCapacity);
  RequestStatePool(const RequestStatePool&) = delete;
  RequestStatePool& operator=(const RequestStatePool&) = delete;
  ~RequestStatePool();

  // A pending request: a listed state when there is one, else a new one. Always inline: it is
  // the body of a backend's recv post.
  [[gnu::always_inline]] std::pair<Request, RequestStateRef> make_pending() {
    RequestState* state = home_->free;
    if (state == nullptr) return pending_from_new();
    home_->free = state->next_free_;
    --home_->free_count;
    // A listed state is as its last use left it: back to pending (status_ is OK unless it failed).
    state->done_ = false;
    state->bytes_ = 0;
    state->op_ = nullptr;
    state->channel_ = 0;
    if (!state->status_.ok()) state->status_ = Status();
    return Request::pending_from(state);
  }

  // Drops the backend's reference to a state (kept for the backends' symmetry with make_pending:
  // the state returns to the list by itself once its handles are gone as well).
  void recycle(RequestStateRef state) noexcept { state.reset(); }

  // States waiting on the free list.
  [[nodiscard]] size_t cached() const noexcept { return home_->free_count; }

 private:
  std::pair<Request, RequestStateRef> pending_from_new();

  RequestState::Home* home_;
};

}  // namespace myelin::transport
