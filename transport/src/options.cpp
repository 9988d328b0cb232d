// Options: names, parsing and the environment overlay.
#include <myelin/transport/options.hpp>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
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

namespace {
// CPUs in a Linux CPU list ("0-3,8,10-11"); 0 when the text is not one.
int count_cpu_list(const std::string& text) {
  int n = 0;
  size_t i = 0;
  while (i < text.size() && text[i] != '\n') {
    char* end = nullptr;
    const long lo = std::strtol(text.c_str() + i, &end, 10);
    if (end == text.c_str() + i || lo < 0) return 0;
    i = static_cast<size_t>(end - text.c_str());
    long hi = lo;
    if (i < text.size() && text[i] == '-') {
      const char* start = text.c_str() + i + 1;
      hi = std::strtol(start, &end, 10);
      if (end == start || hi < lo) return 0;
      i = static_cast<size_t>(end - text.c_str());
    }
    n += static_cast<int>(hi - lo + 1);
    if (i < text.size() && text[i] == ',') ++i;
  }
  return n;
}

std::string read_first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return line;
}

// CPUs of this process's cpuset cgroup (v2 cpuset.cpus.effective, v1 cpuset.effective_cpus): the
// CPUs the job was given on this node, whatever each rank is pinned to; 0 when unknown.
int cgroup_cpus() {
  std::ifstream cg("/proc/self/cgroup");
  std::string line;
  while (std::getline(cg, line)) {
    // "hierarchy-id:controllers:path"; v2 is "0::path", v1 names the controller.
    const size_t a = line.find(':');
    const size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string path = line.substr(b + 1);
    std::string file;
    if (controllers.empty()) {
      file = "/sys/fs/cgroup" + path + "/cpuset.cpus.effective";
    } else if (controllers == "cpuset" || controllers.find("cpuset,") == 0 ||
               controllers.find(",cpuset") != std::string::npos) {
      file = "/sys/fs/cgroup/cpuset" + path + "/cpuset.effective_cpus";
    } else {
      continue;
    }
    if (const int n = count_cpu_list(read_first_line(file)); n > 0) return n;
  }
  return 0;
}

// CPUs in the calling thread's affinity mask; 0 when it cannot be read. The mask is sized for the
// kernel's CPU count, which may exceed CPU_SETSIZE (sched_getaffinity says EINVAL when the set is
// too small).
int affinity_cpus() noexcept {
  for (size_t ncpus = CPU_SETSIZE; ncpus <= (size_t{1} << 20); ncpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(ncpus);
    if (set == nullptr) return 0;
    const size_t bytes = CPU_ALLOC_SIZE(ncpus);
    const int rc = sched_getaffinity(0, bytes, set);
    const int err = errno;
    const int n = rc == 0 ? CPU_COUNT_S(bytes, set) : 0;
    CPU_FREE(set);
    if (rc == 0) return n;
    if (err != EINVAL) return 0;
  }
  return 0;
}
}  // namespace

namespace {
// The online CPUs bounded by this process's cpuset cgroup: the CPUs a node's ranks share.
int node_cpus() noexcept {
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  int n = online > 0 ? static_cast<int>(online) : 1;
  try {
    const int cpuset = cgroup_cpus();
    if (cpuset > 0 && cpuset < n) n = cpuset;
  } catch (...) {  // reading /proc or /sys cannot throw in practice; keep the online count
  }
  return n;
}
}  // namespace

int usable_cpus() noexcept {
  int n = node_cpus();
  if (const int mask = affinity_cpus(); mask > 0 && mask < n) n = mask;
  return n;
}

int ranks_sharing_cpus(int node_ranks) noexcept {
  const int node = node_cpus();
  const int mine = usable_cpus();
  if (node_ranks <= 0 || mine >= node) return node_ranks;
  const long long share = (static_cast<long long>(node_ranks) * mine + node - 1) / node;
  return static_cast<int>(std::max<long long>(1, share));
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
        std::to_string(local_ranks) + " ranks on " + std::to_string(cpus) + " CPUs";
    *why = "auto: " + std::string(progress_mode_name(mode)) + " (" +
           (local_ranks <= 0  ? std::string("ranks on these CPUs unknown")
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
    // The variable counts the node's ranks (a launcher's local size); local_ranks counts those on
    // this rank's CPUs (ranks_sharing_cpus()).
    o.local_ranks = ranks_sharing_cpus(static_cast<int>(n));
  }
  if (const char* v = std::getenv("MYELIN_SPIN_US")) {
    MYELIN_ASSIGN_OR_RETURN(long long us, parse_env_integer("MYELIN_SPIN_US", v, 0, 1'000'000));
    o.spin_before_block = std::chrono::microseconds(us);
  }
  if (const char* v = std::getenv("MYELIN_TCP_LOCAL_SNDBUF")) {
    MYELIN_ASSIGN_OR_RETURN(long long bytes,
                            parse_env_integer("MYELIN_TCP_LOCAL_SNDBUF", v, 0,
                                              static_cast<long long>(kMaxTcpLocalSendBuffer)));
    o.tcp_local_send_buffer = static_cast<size_t>(bytes);
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
  if (tcp_local_send_buffer > kMaxTcpLocalSendBuffer) {
    return invalid_argument("tcp_local_send_buffer ", tcp_local_send_buffer, " exceeds ",
                            kMaxTcpLocalSendBuffer, " bytes");
  }
  if (eager_limit > max_message_size) {
    return invalid_argument("eager_limit ", eager_limit, " exceeds max_message_size ",
                            max_message_size);
  }
  return ok_status();
}

}  // namespace myelin::transport
