// Options: names, parsing and the environment overlay.
#include <myelin/transport/options.hpp>

#include <sched.h>
#include <unistd.h>

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
  switch (m) {
    case ProgressMode::kBusyPoll:
      return "busy";
    case ProgressMode::kSpinThenBlock:
      return "block";
    case ProgressMode::kPollYield:
      return "yield";
    case ProgressMode::kAuto:
      return "auto";
  }
  return "unknown";
}

Result<ProgressMode> parse_progress_mode(std::string_view name) {
  if (name == "busy" || name == "poll") return ProgressMode::kBusyPoll;
  if (name == "block" || name == "spin-then-block") return ProgressMode::kSpinThenBlock;
  if (name == "yield" || name == "poll-yield") return ProgressMode::kPollYield;
  if (name == "auto") return ProgressMode::kAuto;
  return invalid_argument("unknown progress mode '", name,
                          "' (expected busy, block, yield or auto)");
}

int usable_cpus() noexcept {
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  int n = online > 0 ? static_cast<int>(online) : 1;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int allowed = CPU_COUNT(&set);
    if (allowed > 0 && allowed < n) n = allowed;
  }
  return n;
}

ProgressMode resolve_progress_mode(ProgressMode requested, int local_ranks, int cpus,
                                   std::string* why, bool tcp_only) {
  if (requested != ProgressMode::kAuto) {
    if (why != nullptr) *why = std::string(progress_mode_name(requested)) + " (requested)";
    return requested;
  }
  const bool oversubscribed = local_ranks > 0 && cpus > 0 && local_ranks > cpus;
  const ProgressMode mode = !oversubscribed ? ProgressMode::kBusyPoll
                            : tcp_only      ? ProgressMode::kSpinThenBlock
                                            : ProgressMode::kPollYield;
  if (why != nullptr) {
    const std::string counts =
        std::to_string(local_ranks) + " ranks on this node, " + std::to_string(cpus) + " CPUs";
    *why = "auto: " + std::string(progress_mode_name(mode)) + " (" +
           (local_ranks <= 0  ? std::string("ranks on this node unknown")
            : !oversubscribed ? counts
            : tcp_only        ? counts + ": more ranks than CPUs, TCP only"
                              : counts + ": more ranks than CPUs") +
           ")";
  }
  return mode;
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
  if (const char* v = std::getenv("MYELIN_LOCAL_SIZE"); v != nullptr && o.local_ranks == 0) {
    MYELIN_ASSIGN_OR_RETURN(long long n, parse_env_integer("MYELIN_LOCAL_SIZE", v, 1, 1 << 20));
    o.local_ranks = static_cast<int>(n);
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
  if (static_cast<uint8_t>(progress) > static_cast<uint8_t>(ProgressMode::kAuto)) {
    return invalid_argument("unknown progress mode value ", static_cast<int>(progress));
  }
  if (local_ranks < 0) return invalid_argument("local_ranks ", local_ranks, " is negative");
  if (max_message_size == 0) return invalid_argument("max_message_size must be positive");
  if (eager_limit > max_message_size) {
    return invalid_argument("eager_limit ", eager_limit, " exceeds max_message_size ",
                            max_message_size);
  }
  return ok_status();
}

}  // namespace myelin::transport
