// Options: names, parsing and the environment overlay.
#include <myelin/transport/options.hpp>

#include <cerrno>
#include <cstdlib>
#include <string>

namespace myelin::transport {

std::string_view backend_name(Backend b) noexcept {
  switch (b) {
    case Backend::kAuto:
      return "auto";
    case Backend::kShm:
      return "shm";
    case Backend::kTcp:
      return "tcp";
    case Backend::kUcx:
      return "ucx";
    case Backend::kVerbs:
      return "verbs";
  }
  return "unknown";
}

Result<Backend> parse_backend(std::string_view name) {
  for (Backend b : {Backend::kAuto, Backend::kShm, Backend::kTcp, Backend::kUcx, Backend::kVerbs}) {
    if (name == backend_name(b)) return b;
  }
  return invalid_argument("unknown transport '", name, "' (expected auto, shm, tcp, ucx or verbs)");
}

std::string_view progress_mode_name(ProgressMode m) noexcept {
  return m == ProgressMode::kBusyPoll ? "busy" : "block";
}

Result<ProgressMode> parse_progress_mode(std::string_view name) {
  if (name == "busy" || name == "poll") return ProgressMode::kBusyPoll;
  if (name == "block" || name == "spin-then-block") return ProgressMode::kSpinThenBlock;
  return invalid_argument("unknown progress mode '", name, "' (expected busy or block)");
}

namespace {
Result<long long> parse_env_integer(const char* var, const char* text, long long lo, long long hi) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
    return invalid_argument(var, "='", text, "' is not an integer in [", lo, ", ", hi, "]");
  }
  return v;
}
}  // namespace

Result<Options> Options::with_env_overlay() const {
  Options o = *this;
  if (const char* v = std::getenv("MYELIN_TRANSPORT")) {
    MYELIN_ASSIGN_OR_RETURN(o.backend, parse_backend(v));
  }
  if (const char* v = std::getenv("MYELIN_DEVICE")) o.device = v;
  if (const char* v = std::getenv("MYELIN_TCP_ADDR")) o.listen_address = v;
  if (const char* v = std::getenv("MYELIN_NUMA_NODE")) {
    MYELIN_ASSIGN_OR_RETURN(long long n, parse_env_integer("MYELIN_NUMA_NODE", v, -1, 4095));
    o.numa_node = static_cast<int>(n);
  }
  if (const char* v = std::getenv("MYELIN_PROGRESS")) {
    MYELIN_ASSIGN_OR_RETURN(o.progress, parse_progress_mode(v));
  }
  if (const char* v = std::getenv("MYELIN_SPIN_US")) {
    MYELIN_ASSIGN_OR_RETURN(long long us, parse_env_integer("MYELIN_SPIN_US", v, 0, 1'000'000));
    o.spin_before_block = std::chrono::microseconds(us);
  }
  if (const char* v = std::getenv("MYELIN_TIMEOUT_MS")) {
    MYELIN_ASSIGN_OR_RETURN(long long ms,
                            parse_env_integer("MYELIN_TIMEOUT_MS", v, 1, 7LL * 24 * 3600 * 1000));
    o.timeout = std::chrono::milliseconds(ms);
  }
  MYELIN_RETURN_IF_ERROR(o.validate());
  return o;
}

Status Options::validate() const {
  if (timeout.count() <= 0) return invalid_argument("timeout must be positive");
  if (spin_before_block.count() < 0) return invalid_argument("spin_before_block is negative");
  if (numa_node < -1) return invalid_argument("numa_node ", numa_node, " is invalid");
  if (max_message_size == 0) return invalid_argument("max_message_size must be positive");
  if (eager_limit > max_message_size) {
    return invalid_argument("eager_limit ", eager_limit, " exceeds max_message_size ",
                            max_message_size);
  }
  return ok_status();
}

}  // namespace myelin::transport
