// CpuContentionRule / CpuContentionWatch: the host-load half of ProgressMode::kAuto (see
// cpu_contention.hpp).
#include "cpu_contention.hpp"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <myelin/core/log.hpp>
#include <myelin/transport/options.hpp>

namespace myelin::transport::internal {

namespace {
// A run of decimal digits at text[i...] (at most 18 of them); -1 when there is none.
int64_t read_count(std::string_view text, size_t& i) noexcept {
  while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
  const size_t start = i;
  int64_t v = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    if (i - start >= 18) return -1;
    v = v * 10 + (text[i] - '0');
    ++i;
  }
  return i == start ? -1 : v;
}
}  // namespace

bool parse_schedstat(std::string_view text, SchedStat* out) noexcept {
  size_t i = 0;
  const int64_t on_cpu = read_count(text, i);
  if (on_cpu < 0 || i >= text.size() || (text[i] != ' ' && text[i] != '\t')) return false;
  const int64_t delay = read_count(text, i);
  if (delay < 0 || i >= text.size() || (text[i] != ' ' && text[i] != '\t')) return false;
  if (read_count(text, i) < 0) return false;  // time slices: present, not used
  if (i < text.size() && text[i] != '\n') return false;
  out->on_cpu_ns = on_cpu;
  out->run_delay_ns = delay;
  return true;
}

int parse_loadavg_running(std::string_view text) noexcept {
  size_t i = 0;
  for (int field = 0; field < 3; ++field) {  // the three averages
    while (i < text.size() && text[i] == ' ') ++i;
    const size_t start = i;
    while (i < text.size() && text[i] != ' ' && text[i] != '\n') ++i;
    if (i == start || i >= text.size() || text[i] != ' ') return -1;
  }
  const int64_t running = read_count(text, i);
  if (running < 0 || running > 1'000'000 || i >= text.size() || text[i] != '/') return -1;
  return static_cast<int>(running);
}

HostLoad host_load(int running, int online, int usable) noexcept {
  if (running < 0 || online <= 0 || usable < online) return HostLoad::kUnknown;
  return running < online    ? HostLoad::kIdleCpu
         : running == online ? HostLoad::kFull
                             : HostLoad::kBusy;
}

bool CpuContentionRule::add(int64_t now_ns, const SchedStat& counters, HostLoad host) noexcept {
  if (!started_) {
    started_ = true;
    start_ns_ = now_ns;
  }
  if (!have_prev_ || counters.on_cpu_ns < prev_.on_cpu_ns ||
      counters.run_delay_ns < prev_.run_delay_ns) {
    prev_ = counters;
    have_prev_ = true;
    contended_ = 0;  // a streak of another thread's samples says nothing about this one
    clear_ = 0;
    return spinning();
  }
  const int64_t ran = counters.on_cpu_ns - prev_.on_cpu_ns;
  const int64_t waited = counters.run_delay_ns - prev_.run_delay_ns;
  prev_ = counters;
  if (holding_) {
    // What a blocking thread waits for a CPU says little about spinning (a woken sleeper is
    // favoured by the scheduler); the hold decides, then a probe.
    if (now_ns >= hold_until_ns_) {
      holding_ = false;
      probing_ = true;
      contended_ = 0;
      clear_ = 0;
    }
    return spinning();
  }
  if (ran + waited < kMinSampleNs) return spinning();  // too little running to judge
  last_wait_percent_ = static_cast<int>(waited * 100 / (ran + waited));
  if (now_ns - start_ns_ < kStartupGraceNs) return spinning();  // ranks still settling
  if (waited * kContendedShare >= ran + waited) {
    ++contended_;
    clear_ = 0;
  } else {
    contended_ = 0;
    if (++clear_ >= kWindow && probing_) {
      probing_ = false;  // the host has room again
      hold_ns_ = kMinHoldNs;
    }
  }
  if (contended_ >= (probing_ ? kWindow : kFirstWindow)) {
    if (probing_) {
      hold_ns_ = std::min(hold_ns_ * kHoldGrowth, kMaxHoldNs);  // still loaded
    } else if (host == HostLoad::kBusy) {
      hold_ns_ = std::max(hold_ns_, kBusyHoldNs);  // other work keeps the CPUs: lasting load
    }
    probing_ = false;
    holding_ = true;
    hold_until_ns_ = now_ns + hold_ns_;
    contended_ = 0;
    clear_ = 0;
  }
  return spinning();
}

CpuContentionWatch::~CpuContentionWatch() {
  if (fd_ >= 0) ::close(fd_);
  if (loadavg_fd_ >= 0) ::close(loadavg_fd_);
}

bool CpuContentionWatch::give_up(const char* what, int err) {
  failed_ = true;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  MYELIN_LOG_INFO << "progress auto: " << what << " this thread's schedstat failed ("
                  << std::strerror(err) << "); CPU contention is no longer watched";
  return true;
}

HostLoad CpuContentionWatch::read_host_load() {
  if (loadavg_fd_ == -2) return HostLoad::kUnknown;
  if (loadavg_fd_ < 0) {
    online_cpus_ = static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN));
    usable_cpus_ = usable_cpus();
    // A thread confined to some of the CPUs learns nothing from the host's count.
    loadavg_fd_ = usable_cpus_ < online_cpus_ ? -1 : ::open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (loadavg_fd_ < 0 || online_cpus_ <= 0) {
      if (loadavg_fd_ >= 0) ::close(loadavg_fd_);
      loadavg_fd_ = -2;
      return HostLoad::kUnknown;
    }
  }
  char buf[128];
  ssize_t n;
  do {
    n = ::pread(loadavg_fd_, buf, sizeof(buf) - 1, 0);
  } while (n < 0 && errno == EINTR);
  const int running =
      n > 0 ? parse_loadavg_running(std::string_view(buf, static_cast<size_t>(n))) : -1;
  if (running < 0) {
    ::close(loadavg_fd_);
    loadavg_fd_ = -2;
    return HostLoad::kUnknown;
  }
  return host_load(running, online_cpus_, usable_cpus_);
}

bool CpuContentionWatch::sample(int64_t now_ns) {
  if (failed_) return true;
  if (now_ns < next_ns_) return rule_.spinning();
  next_ns_ = now_ns + kSamplePeriodNs;
  const auto tid = static_cast<pid_t>(::syscall(SYS_gettid));
  if (fd_ < 0 || tid != tid_) {
    if (fd_ >= 0) ::close(fd_);
    const std::string path = "/proc/self/task/" + std::to_string(tid) + "/schedstat";
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return give_up("opening", errno);
    tid_ = tid;
    rule_.rebase();
  }
  char buf[128];
  ssize_t n;
  do {
    n = ::pread(fd_, buf, sizeof(buf) - 1, 0);  // regenerated for every read from offset 0
  } while (n < 0 && errno == EINTR);
  if (n < 0) return give_up("reading", errno);
  SchedStat counters;
  if (!parse_schedstat(std::string_view(buf, static_cast<size_t>(n)), &counters)) {
    return give_up("parsing", EINVAL);
  }
  const HostLoad host = read_host_load();
  return rule_.add(now_ns, counters, host);
}

std::string CpuContentionWatch::describe() const {
  const int pct = rule_.last_wait_percent();
  return "this thread waited for a CPU " + (pct < 0 ? std::string("?") : std::to_string(pct)) +
         "% of its runnable time";
}

}  // namespace myelin::transport::internal
