// myelin/core/status.hpp
//
// Status and Result<T>: errors as values on the data path.
//
// A Status is either OK (no allocation, one pointer wide) or carries a code and a message. As an
// error rises through the layers each one may prepend context ("while connecting rank 3 to rank 5:
// ...") with with_context(), so the final message reads outermost-first.
//
// Codes are grouped by what the caller must do, not by where the error came from:
//   - kOk
//   - caller errors, nothing to recreate: kInvalidArgument, kOutOfRange, kNotFound, kAlreadyExists,
//     kFailedPrecondition, kUnsupported, kPermissionDenied
//   - transient, retry may succeed: kTimeout, kUnavailable, kResourceExhausted, kCancelled
//   - the connection/endpoint is dead and must be recreated: kPeerFailed, kProtocolError
//   - the context/device must be recreated: kDeviceFailed
//   - kIoError, kInternal (a bug in myelin)
// Back-pressure (a full ring) is never a Status: those calls return bool from try_* functions.
//
// Thread safety: Status and Result are values; distinct objects may be used from distinct threads.
#pragma once

#include <cstdint>
#include <memory>
#include <new>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <myelin/core/check.hpp>

namespace myelin {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,
  kOutOfRange,
  kNotFound,
  kAlreadyExists,
  kFailedPrecondition,
  kUnsupported,
  kPermissionDenied,
  kTimeout,
  kUnavailable,
  kResourceExhausted,
  kCancelled,
  kPeerFailed,
  kProtocolError,
  kDeviceFailed,
  kIoError,
  kInternal,
};

// Stable lower-case name of a code ("timeout", "peer_failed", ...).
std::string_view status_code_name(StatusCode code) noexcept;

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;
  Status(StatusCode code, std::string message);

  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;
  ~Status() = default;

  [[nodiscard]] bool ok() const noexcept { return rep_ == nullptr; }
  [[nodiscard]] StatusCode code() const noexcept { return rep_ ? rep_->code : StatusCode::kOk; }
  // The message without the code name; empty when ok().
  [[nodiscard]] std::string_view message() const noexcept {
    return rep_ ? std::string_view(rep_->message) : std::string_view();
  }
  // "timeout: while connecting rank 3 to rank 5: no answer after 5000 ms", or "ok".
  [[nodiscard]] std::string to_string() const;

  // Prepends "context: " to the message of an error; a no-op on OK. On an lvalue returns *this
  // for chaining; on a temporary returns the result by value, so that binding it to a reference
  // (as MYELIN_RETURN_IF_ERROR does) never dangles.
  Status& with_context(std::string_view context) &;
  [[nodiscard]] Status with_context(std::string_view context) &&;

  // True for codes after which the endpoint (or the whole context) must be recreated.
  [[nodiscard]] bool is_fatal_for_endpoint() const noexcept {
    const auto c = code();
    return c == StatusCode::kPeerFailed || c == StatusCode::kProtocolError ||
           c == StatusCode::kDeviceFailed;
  }

  friend bool operator==(const Status& a, const Status& b) noexcept {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;
};

inline Status ok_status() noexcept {
  return Status();
}
inline std::ostream& operator<<(std::ostream& os, const Status& s) {
  return os << s.to_string();
}

// Short constructors, e.g. `return invalid_argument("size ", n, " exceeds ", limit);`
namespace internal {
std::string concat_pieces(std::initializer_list<std::string_view> pieces);
template <typename T>
std::string piece(const T& v) {
  if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return std::string(std::string_view(v));
  } else if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_arithmetic_v<T>) {
    return std::to_string(v);
  } else {
    return v.to_string();
  }
}
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::string out;
  (out.append(piece(args)), ...);
  return out;
}
}  // namespace internal

template <typename... Args>
Status make_status(StatusCode code, const Args&... args) {
  return Status(code, internal::str_cat(args...));
}
#define MYELIN_DEFINE_STATUS_HELPER(fn, code)      \
  template <typename... Args>                      \
  Status fn(const Args&... args) {                 \
    return make_status(StatusCode::code, args...); \
  }
MYELIN_DEFINE_STATUS_HELPER(invalid_argument, kInvalidArgument)
MYELIN_DEFINE_STATUS_HELPER(out_of_range, kOutOfRange)
MYELIN_DEFINE_STATUS_HELPER(not_found, kNotFound)
MYELIN_DEFINE_STATUS_HELPER(already_exists, kAlreadyExists)
MYELIN_DEFINE_STATUS_HELPER(failed_precondition, kFailedPrecondition)
MYELIN_DEFINE_STATUS_HELPER(unsupported, kUnsupported)
MYELIN_DEFINE_STATUS_HELPER(permission_denied, kPermissionDenied)
MYELIN_DEFINE_STATUS_HELPER(timeout_error, kTimeout)
MYELIN_DEFINE_STATUS_HELPER(unavailable, kUnavailable)
MYELIN_DEFINE_STATUS_HELPER(resource_exhausted, kResourceExhausted)
MYELIN_DEFINE_STATUS_HELPER(cancelled, kCancelled)
MYELIN_DEFINE_STATUS_HELPER(peer_failed, kPeerFailed)
MYELIN_DEFINE_STATUS_HELPER(protocol_error, kProtocolError)
MYELIN_DEFINE_STATUS_HELPER(device_failed, kDeviceFailed)
MYELIN_DEFINE_STATUS_HELPER(io_error, kIoError)
MYELIN_DEFINE_STATUS_HELPER(internal_error, kInternal)
#undef MYELIN_DEFINE_STATUS_HELPER

// User-given text (a key, a value, a name) as an error message quotes it: at most `max_bytes`,
// longer text cut with its size ("abc... (500000 bytes)"), so hostile input cannot flood a log.
inline std::string message_excerpt(std::string_view text, size_t max_bytes = 64) {
  if (text.size() <= max_bytes) return std::string(text);
  return std::string(text.substr(0, max_bytes)) + "... (" + std::to_string(text.size()) + " bytes)";
}

// An io_error (or the given code) from errno: "<what>: <strerror(err)> (errno N)".
Status errno_status(std::string_view what, int err, StatusCode code = StatusCode::kIoError);

// Result<T>: a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
  static_assert(!std::is_reference_v<T>, "Result<T&> is not supported; use a pointer");
  static_assert(!std::is_same_v<std::remove_cv_t<T>, Status>, "Result<Status> is meaningless");

 public:
  // NOLINTNEXTLINE(google-explicit-constructor): implicit from T and from an error Status.
  Result(T value) : has_value_(true) { new (&storage_.value) T(std::move(value)); }
  Result(Status status) : has_value_(false) {  // NOLINT(google-explicit-constructor)
    MYELIN_CHECK(!status.ok()) << "Result<T> built from an OK Status without a value";
    new (&storage_.status) Status(std::move(status));
  }
  template <typename U>
  requires(std::is_constructible_v<T, U&&> && !std::is_same_v<std::decay_t<U>, T> &&
           !std::is_same_v<std::decay_t<U>, Status> && !std::is_same_v<std::decay_t<U>, Result>)
      Result(U&& value)
      : has_value_(true) {  // NOLINT(google-explicit-constructor)
    new (&storage_.value) T(std::forward<U>(value));
  }

  Result(const Result& o) : has_value_(o.has_value_) {
    if (has_value_)
      new (&storage_.value) T(o.storage_.value);
    else
      new (&storage_.status) Status(o.storage_.status);
  }
  Result(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) : has_value_(o.has_value_) {
    if (has_value_)
      new (&storage_.value) T(std::move(o.storage_.value));
    else
      new (&storage_.status) Status(std::move(o.storage_.status));
  }
  Result& operator=(const Result& o) {
    if (this != &o) {
      destroy();
      has_value_ = o.has_value_;
      if (has_value_)
        new (&storage_.value) T(o.storage_.value);
      else
        new (&storage_.status) Status(o.storage_.status);
    }
    return *this;
  }
  Result& operator=(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) {
    if (this != &o) {
      destroy();
      has_value_ = o.has_value_;
      if (has_value_)
        new (&storage_.value) T(std::move(o.storage_.value));
      else
        new (&storage_.status) Status(std::move(o.storage_.status));
    }
    return *this;
  }
  ~Result() { destroy(); }

  [[nodiscard]] bool ok() const noexcept { return has_value_; }
  // OK when a value is held, else the error.
  [[nodiscard]] Status status() const& { return has_value_ ? Status() : storage_.status; }
  [[nodiscard]] Status status() && { return has_value_ ? Status() : std::move(storage_.status); }

  // Access to the value; calling these on an error is a broken invariant and aborts.
  T& value() & { return checked(), storage_.value; }
  const T& value() const& { return checked(), storage_.value; }
  T&& value() && { return checked(), std::move(storage_.value); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  template <typename U>
  T value_or(U&& fallback) const& {
    return has_value_ ? storage_.value : static_cast<T>(std::forward<U>(fallback));
  }

  Result& with_context(std::string_view context) & {
    if (!has_value_) storage_.status.with_context(context);
    return *this;
  }
  // By value for the same reason as Status::with_context.
  Result with_context(std::string_view context) && {
    if (!has_value_) storage_.status.with_context(context);
    return std::move(*this);
  }

 private:
  void checked() const {
    MYELIN_CHECK(has_value_) << "value() on an error Result: " << storage_.status.to_string();
  }
  void destroy() noexcept {
    if (has_value_)
      storage_.value.~T();
    else
      storage_.status.~Status();
  }
  union Storage {
    Storage() {}
    ~Storage() {}
    T value;
    Status status;
  } storage_;
  bool has_value_;
};

namespace internal {
inline Status as_status(Status&& s) {
  return std::move(s);
}
inline Status as_status(const Status& s) {
  return s;
}
template <typename T>
Status as_status(Result<T>&& r) {
  return std::move(r).status();
}
template <typename T>
Status as_status(const Result<T>& r) {
  return r.status();
}
}  // namespace internal

}  // namespace myelin

#define MYELIN_STATUS_CONCAT_INNER(a, b) a##b
#define MYELIN_STATUS_CONCAT(a, b) MYELIN_STATUS_CONCAT_INNER(a, b)

// Returns the error of a Status- or Result-valued expression from the enclosing function.
#define MYELIN_RETURN_IF_ERROR(expr)                                   \
  do {                                                                 \
    auto&& myelin_status_ = (expr);                                    \
    if (!myelin_status_.ok()) {                                        \
      return ::myelin::internal::as_status(std::move(myelin_status_)); \
    }                                                                  \
  } while (0)

// `MYELIN_ASSIGN_OR_RETURN(auto fd, open_socket(...));`
#define MYELIN_ASSIGN_OR_RETURN(lhs, expr) \
  MYELIN_ASSIGN_OR_RETURN_IMPL(MYELIN_STATUS_CONCAT(myelin_result_, __LINE__), lhs, expr)
#define MYELIN_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = std::move(tmp).value()
