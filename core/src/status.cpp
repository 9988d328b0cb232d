// Status: error values with context.
#include <myelin/core/status.hpp>

#include <cstring>

namespace myelin {

std::string_view status_code_name(StatusCode code) noexcept {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kInvalidArgument:
      return "invalid_argument";
    case StatusCode::kOutOfRange:
      return "out_of_range";
    case StatusCode::kNotFound:
      return "not_found";
    case StatusCode::kAlreadyExists:
      return "already_exists";
    case StatusCode::kFailedPrecondition:
      return "failed_precondition";
    case StatusCode::kUnsupported:
      return "unsupported";
    case StatusCode::kPermissionDenied:
      return "permission_denied";
    case StatusCode::kTimeout:
      return "timeout";
    case StatusCode::kUnavailable:
      return "unavailable";
    case StatusCode::kResourceExhausted:
      return "resource_exhausted";
    case StatusCode::kCancelled:
      return "cancelled";
    case StatusCode::kPeerFailed:
      return "peer_failed";
    case StatusCode::kProtocolError:
      return "protocol_error";
    case StatusCode::kDeviceFailed:
      return "device_failed";
    case StatusCode::kIoError:
      return "io_error";
    case StatusCode::kInternal:
      return "internal";
  }
  return "unknown";
}

Status::Status(StatusCode code, std::string message) {
  // An OK code never allocates, whatever message came with it.
  if (code != StatusCode::kOk) rep_ = std::make_unique<Rep>(Rep{code, std::move(message)});
}

Status::Status(const Status& other)
    : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}

Status& Status::operator=(const Status& other) {
  if (this != &other) rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
  return *this;
}

std::string Status::to_string() const {
  if (ok()) return "ok";
  std::string out(status_code_name(rep_->code));
  if (!rep_->message.empty()) {
    out += ": ";
    out += rep_->message;
  }
  return out;
}

Status& Status::with_context(std::string_view context) & {
  if (rep_ && !context.empty()) {
    std::string msg;
    msg.reserve(context.size() + 2 + rep_->message.size());
    msg.append(context).append(": ").append(rep_->message);
    rep_->message = std::move(msg);
  }
  return *this;
}

Status Status::with_context(std::string_view context) && {
  with_context(context);
  return std::move(*this);
}

Status errno_status(std::string_view what, int err, StatusCode code) {
  char buf[256];
  // GNU strerror_r returns the message pointer (which may or may not be buf).
  const char* text = strerror_r(err, buf, sizeof(buf));
  return make_status(code, what, ": ", text, " (errno ", err, ")");
}

}  // namespace myelin
