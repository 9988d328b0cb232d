// CPUs kept free of bulk work while control messages flow (see control_cpus.hpp).
#include <myelin/broker/control_cpus.hpp>

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <mutex>
#include <string>

#include <myelin/core/clock.hpp>
#include <myelin/core/log.hpp>
#include <myelin/core/topology.hpp>

namespace myelin::broker {
namespace {

constexpr int64_t kMaxHoldMs = 3'600'000;

// The process's reservation: written once under g_mu before `g_reserved` is published (release),
// read after an acquire load of it, never changed afterwards.
struct Reservation {
  std::vector<int> cpus;
  cpu_set_t set;
};
std::mutex g_mu;
Reservation g_reservation;
std::atomic<bool> g_reserved{false};
// The hold in ns. Relaxed: a setting read at every checkpoint; one that reads a stale value (a
// longer hold set meanwhile) acts on the new one at its next pass.
std::atomic<int64_t> g_hold_ns{0};
// When control traffic was last noted (monotonic ns). Relaxed: a hint that needs no ordering
// with anything else; a checkpoint that reads a stale value acts one pass later.
std::atomic<int64_t> g_last_control_ns{INT64_MIN / 2};

enum class ThreadCpus : uint8_t {
  kOwn,         // the CPUs it had
  kOffControl,  // kept off the reservation; `own` holds its CPUs
  kLeftAlone,   // cannot be moved: left as it is, not tried again
};
struct ThreadState {
  ThreadCpus state = ThreadCpus::kOwn;
  cpu_set_t own;
};
thread_local ThreadState tl_state;
thread_local bool tl_library_bulk = false;

Result<cpu_set_t> this_thread_set() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int rc = ::pthread_getaffinity_np(::pthread_self(), sizeof(set), &set);
  if (rc != 0) return errno_status("pthread_getaffinity_np", rc);
  return set;
}

std::vector<int> cpus_of(const cpu_set_t& set) {
  std::vector<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) out.push_back(c);
  }
  return out;
}

std::vector<int> sorted_unique(std::vector<int> cpus) {
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

}  // namespace

Result<std::vector<int>> parse_control_cpu_list(std::string_view text) {
  std::vector<int> out;
  if (text.empty() || text == "none") return out;
  auto number = [&](std::string_view s) -> Result<int> {
    int v = -1;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || s.empty() || v < 0 || v >= CPU_SETSIZE) {
      return invalid_argument("CPU list '", text, "': '", s, "' is not a CPU number in [0, ",
                              CPU_SETSIZE, ")");
    }
    return v;
  };
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t end = std::min(text.find(',', pos), text.size());
    std::string_view item = text.substr(pos, end - pos);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    const size_t dash = item.find('-');
    MYELIN_ASSIGN_OR_RETURN(int lo, number(item.substr(0, dash)));
    int hi = lo;
    if (dash != std::string_view::npos) {
      MYELIN_ASSIGN_OR_RETURN(hi, number(item.substr(dash + 1)));
      if (hi < lo) return invalid_argument("CPU list '", text, "': range '", item, "' is reversed");
    }
    for (int c = lo; c <= hi; ++c) out.push_back(c);
    pos = end + 1;
  }
  return sorted_unique(std::move(out));
}

Status validate_control_cpus(const std::vector<int>& cpus, int64_t hold_ms, std::string_view what) {
  if (cpus.empty()) return ok_status();
  if (hold_ms < 1 || hold_ms > kMaxHoldMs) {
    return invalid_argument(what, ": the hold ", hold_ms, " ms is outside [1, ", kMaxHoldMs, "]");
  }
  // A thread kept off the reservation is judged by its own CPUs.
  cpu_set_t allowed = tl_state.own;
  if (tl_state.state != ThreadCpus::kOffControl) {
    MYELIN_ASSIGN_OR_RETURN(allowed, this_thread_set());
  }
  const std::vector<int> sorted = sorted_unique(cpus);
  for (int c : sorted) {
    if (c < 0 || c >= CPU_SETSIZE || !CPU_ISSET(c, &allowed)) {
      return invalid_argument(what, ": CPU ", c, " is not one this thread may run on (",
                              format_cpu_list(cpus_of(allowed)), ")");
    }
    CPU_CLR(c, &allowed);
  }
  if (CPU_COUNT(&allowed) == 0) {
    return invalid_argument(what, ": CPUs ", format_cpu_list(sorted),
                            " are every CPU this thread may run on; bulk needs at least one more");
  }
  return ok_status();
}

Status reserve_control_cpus(const std::vector<int>& cpus, int64_t hold_ms) {
  if (cpus.empty()) return ok_status();
  const std::vector<int> sorted = sorted_unique(cpus);
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_reserved.load(std::memory_order_relaxed)) {
    if (g_reservation.cpus != sorted) {
      return failed_precondition("control_cpus ", format_cpu_list(sorted),
                                 ": this process already keeps CPUs ",
                                 format_cpu_list(g_reservation.cpus), " for control");
    }
    if (hold_ms < 1 || hold_ms > kMaxHoldMs) {
      return invalid_argument("control_cpus: the hold ", hold_ms, " ms is outside [1, ", kMaxHoldMs,
                              "]");
    }
    const int64_t hold = hold_ms * 1'000'000;
    if (hold > g_hold_ns.load(std::memory_order_relaxed))
      g_hold_ns.store(hold, std::memory_order_relaxed);
    return ok_status();
  }
  MYELIN_RETURN_IF_ERROR(validate_control_cpus(sorted, hold_ms, "control_cpus"));
  g_reservation.cpus = sorted;
  CPU_ZERO(&g_reservation.set);
  for (int c : sorted) CPU_SET(c, &g_reservation.set);
  g_hold_ns.store(hold_ms * 1'000'000, std::memory_order_relaxed);
  g_reserved.store(true, std::memory_order_release);  // pairs with the checkpoints' acquire loads
  MYELIN_LOG_INFO << "CPUs " << format_cpu_list(sorted)
                  << " kept free of bulk threads while control traffic flows (hold " << hold_ms
                  << " ms)";
  return ok_status();
}

std::vector<int> reserved_control_cpus() {
  if (!g_reserved.load(std::memory_order_acquire)) return {};
  return g_reservation.cpus;
}

bool control_cpus_reserved() noexcept {
  return g_reserved.load(std::memory_order_acquire);
}

void note_control_traffic() noexcept {
  if (!g_reserved.load(std::memory_order_relaxed)) return;
  g_last_control_ns.store(monotonic_ns(), std::memory_order_relaxed);
}

void mark_this_thread_bulk() noexcept {
  tl_library_bulk = true;
}

void restore_this_thread_cpus(bool even_library_bulk_thread) {
  ThreadState& t = tl_state;
  if (t.state != ThreadCpus::kOffControl) return;
  if (tl_library_bulk && !even_library_bulk_thread) return;
  const int rc = ::pthread_setaffinity_np(::pthread_self(), sizeof(t.own), &t.own);
  if (rc != 0) {
    MYELIN_LOG_WARN << "a thread stays off the control CPUs: "
                    << errno_status("pthread_setaffinity_np", rc);
    t.state = ThreadCpus::kLeftAlone;
    return;
  }
  t.state = ThreadCpus::kOwn;
  MYELIN_LOG_DEBUG << "a thread is back on its own CPUs " << format_cpu_list(cpus_of(t.own));
}

void keep_bulk_off_control_cpus() {
  if (!g_reserved.load(std::memory_order_acquire)) return;
  ThreadState& t = tl_state;
  if (t.state == ThreadCpus::kLeftAlone) return;
  const bool live = monotonic_ns() - g_last_control_ns.load(std::memory_order_relaxed) <
                    g_hold_ns.load(std::memory_order_relaxed);
  if (live == (t.state == ThreadCpus::kOffControl)) return;
  if (!live) {
    restore_this_thread_cpus(/*even_library_bulk_thread=*/true);
    return;
  }
  auto own = this_thread_set();
  int rc = own.ok() ? 0 : EINVAL;
  if (own.ok()) {
    cpu_set_t bulk;
    CPU_XOR(&bulk, &*own, &g_reservation.set);
    CPU_AND(&bulk, &bulk, &*own);  // its CPUs outside the reservation
    if (CPU_COUNT(&bulk) == 0) {
      MYELIN_LOG_WARN << "a bulk thread runs only on control CPUs "
                      << format_cpu_list(cpus_of(*own)) << "; it is left there";
      t.state = ThreadCpus::kLeftAlone;
      return;
    }
    rc = ::pthread_setaffinity_np(::pthread_self(), sizeof(bulk), &bulk);
  }
  if (rc != 0) {
    MYELIN_LOG_WARN << "a bulk thread cannot leave the control CPUs: "
                    << (own.ok() ? errno_status("pthread_setaffinity_np", rc) : own.status());
    t.state = ThreadCpus::kLeftAlone;
    return;
  }
  t.own = *own;
  t.state = ThreadCpus::kOffControl;
  MYELIN_LOG_DEBUG << "a bulk thread leaves the control CPUs "
                   << format_cpu_list(g_reservation.cpus) << " while control traffic flows";
}

bool this_thread_kept_off_control_cpus() noexcept {
  return tl_state.state == ThreadCpus::kOffControl;
}

}  // namespace myelin::broker
