// Context: opens backends, builds the address, picks a backend per peer, owns endpoints and the
// registration cache, and drives progress (busy-poll, poll-and-yield, or spin-then-block over the
// backends' fds).
#include <myelin/transport/context.hpp>

#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <limits>
#include <map>
#include <tuple>

#include <myelin/core/log.hpp>
#include <myelin/transport/node.hpp>

#include "address.hpp"
#include "backend.hpp"
#include "cpu_contention.hpp"
#include "registry.hpp"

namespace myelin::transport {

namespace {
// CLOCK_MONOTONIC at tick resolution: the same clock as monotonic_ns(), behind it by at most a
// tick, read without the time-stamp counter (about 6 ns here against 25 for the precise clock,
// more when cold after a context switch). For what tolerates that: the default deadline of a wait
// (a tick earlier than Options::timeout at most), timeout messages, sleep lengths with a margin.
int64_t coarse_monotonic_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}
// How far the coarse clock may lag CLOCK_MONOTONIC: one tick (clock_getres of the coarse clock,
// 1-10 ms by the kernel's HZ), doubled for a margin; 20 ms when the kernel does not say.
int64_t coarse_lag_bound_ns() noexcept {
  static const int64_t bound = [] {
    timespec res{};
    if (clock_getres(CLOCK_MONOTONIC_COARSE, &res) != 0) return int64_t{20'000'000};
    return 2 * (static_cast<int64_t>(res.tv_sec) * 1'000'000'000 + res.tv_nsec);
  }();
  return bound;
}
// Whether `deadline` has passed, for polling loops: while the deadline is more than the coarse
// clock's lag ahead of the coarse clock, the coarse read alone (about 6 ns) says no; only near
// the deadline is the precise clock read (25-50 ns under KVM). Exact: never true early, and late
// only by the polls between two checks.
bool deadline_passed(Deadline deadline) noexcept {
  if (deadline.is_never()) return false;
  // Compared without subtracting from the deadline: one far in the past (Deadline::at_ns takes
  // any value) would overflow there and read as far ahead, and the wait would never end.
  if (deadline.at_ns() > coarse_monotonic_ns() + coarse_lag_bound_ns()) return false;
  return deadline.expired();
}
// A finished request's status by value: an OK one is built in place rather than copied (the copy
// constructor is out of line, a call on every completed wait of a ping-pong).
Status status_of(const Request& request) {
  const Status& s = request.status();
  return s.ok() ? Status() : s;
}
Deadline default_deadline(std::chrono::milliseconds timeout) noexcept {
  const int64_t now = coarse_monotonic_ns();
  if (timeout.count() >= (std::numeric_limits<int64_t>::max() - now) / 1'000'000) {
    return Deadline::after(timeout);  // saturates
  }
  return Deadline::at_ns(now + timeout.count() * 1'000'000);
}
}  // namespace

using internal::BackendContext;
using internal::ParsedAddress;

struct Context::Impl {
  Options options;
  // The mode waits run in (options.progress with kAuto resolved), and why.
  ProgressMode mode = ProgressMode::kBusyPoll;
  std::string mode_reason;
  int cpus = 1;
  internal::ContextInfo info;
  // Preference order: as compiled_backends() lists them (verbs, ucx, tcp, shm).
  std::vector<std::unique_ptr<BackendContext>> backends;
  // The backend of a Context that opened only one (one asked for by name): progress() polls it
  // without the loop over `backends`. Null with several.
  BackendContext* only_backend = nullptr;
  std::vector<uint8_t> address;
  std::map<std::vector<uint8_t>, std::unique_ptr<Endpoint>> endpoints;
  using CacheKey = std::tuple<uintptr_t, size_t, uint8_t>;
  std::map<CacheKey, std::shared_ptr<RegionState>> regions;
  uint64_t next_region_id = 1;
  int epoll_fd = -1;  // over the backends' wait_fd(); made on the first blocking wait
  // Poll-and-yield: a wait that has yielded for spin_before_block without news sleeps like
  // spin-then-block, when every backend can wake it (yield_may_sleep): TCP always (sockets), shm
  // when opened for sleeping (its peers ring its doorbell only then), which a Context does when
  // it is asked to yield or is in auto on a node known to be oversubscribed when it opens. Both
  // halves were measured on this 2-vCPU VM: on a quiet host yielding ranks catch their peer
  // within microseconds (4 shm ranks, 4 KiB allreduce: 21-30 us yielding against 93-117 us
  // blocking), under load (other sessions' builds) ranks that never sleep lose whole time slices
  // and starve loopback delivery in ksoftirqd (the same call: 2-3 ms yielding, 77-93 us blocking).
  // UCX opens no wake-up feature outside spin-then-block, so a Context with UCX never sleeps here.
  bool yield_may_sleep = false;
  bool tcp_only = false;  // every backend is TCP (kAuto then blocks rather than yields)
  // kAuto resolved to busy polling in a Context whose only backend is TCP: the waiting thread's
  // CPU contention is watched (cpu_contention.hpp), and while spinning costs it its CPU waits
  // block, as on an oversubscribed node. Null in every other case: shm ranks that spin on a
  // contended host lose no kernel work by it, and measured so they stayed ahead of yielding
  // (2 ranks, 4 KiB at load 12: 0.90 us busy, 3.5 us yielding).
  std::unique_ptr<internal::CpuContentionWatch> contention;
  static constexpr ProgressMode kLoadedMode = ProgressMode::kSpinThenBlock;
  std::string base_reason;  // mode_reason without the contention state
  uint32_t contention_changes = 0;
  // Spin-then-block: the current spin budget (see drive()) and a count of waits.
  static constexpr uint32_t kSpinProbeEvery = 256;
  int64_t spin_ns = 0;
  uint32_t waits = 0;

  ~Impl() {
    // Endpoints first (they point into their backends), then registrations, then backends.
    endpoints.clear();
    for (auto& [key, state] : regions) {
      state->valid = false;
      state->registrations.clear();
    }
    regions.clear();
    backends.clear();
    if (epoll_fd >= 0) ::close(epoll_fd);
  }

  BackendContext* find(Backend b) const {
    for (const auto& be : backends) {
      if (be->kind() == b) return be.get();
    }
    return nullptr;
  }

  Result<BackendChoice> choose(const ParsedAddress& peer) const {
    auto has_local = [&](Backend b) { return find(b) != nullptr; };
    auto has_peer = [&](Backend b) { return peer.entry(b) != nullptr; };
    const bool same_node = peer.node_id == info.node_id;
    if (options.backend != Backend::kAuto) {
      const Backend b = options.backend;
      if (!has_peer(b)) {
        return unavailable("peer ", peer.name, " did not open the ", backend_name(b),
                           " backend this Context requires");
      }
      if (b == Backend::kShm && !same_node) {
        return unavailable("shm requested but peer ", peer.name, " is on node ", peer.node_id,
                           ", not ", info.node_id);
      }
      return BackendChoice{
          b, std::string("requested by options (") + std::string(backend_name(b)) + ")"};
    }
    if (same_node && has_local(Backend::kShm) && has_peer(Backend::kShm)) {
      return BackendChoice{
          Backend::kShm,
          "same node (hostname, boot id and network namespace match), both have shm"};
    }
    std::string why = same_node ? "same node but shm not open on both sides; "
                                : "different node (" + peer.node_id + "); ";
    for (Backend b : {Backend::kVerbs, Backend::kUcx, Backend::kTcp}) {
      if (has_local(b) && has_peer(b)) {
        return BackendChoice{b, why + std::string(backend_name(b)) +
                                    " is the best network backend both sides opened"};
      }
    }
    std::string mine, theirs;
    for (const auto& be : backends) mine += std::string(backend_name(be->kind())) + " ";
    for (const auto& [b, bytes] : peer.entries) theirs += std::string(backend_name(b)) + " ";
    return unavailable("no backend in common with ", peer.name, " (local: ", mine,
                       "; peer: ", theirs, ")");
  }

  Status ensure_epoll() {
    if (epoll_fd >= 0) return ok_status();
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) return errno_status("epoll_create1 for Context waits", errno);
    for (const auto& be : backends) {
      const int fd = be->wait_fd();
      if (fd < 0) continue;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        return errno_status("epoll_ctl adding a backend's wait fd", errno);
      }
    }
    return ok_status();
  }

  // The mode the next wait runs in: `mode`, or kLoadedMode while the watch says spinning costs
  // this thread its CPU.
  ProgressMode current_mode() const noexcept {
    return contention && !contention->spinning() ? kLoadedMode : mode;
  }
  // current_mode() after a sample of the thread's CPU contention, when one is due (one coarse
  // clock read otherwise).
  ProgressMode sampled_mode() {
    if (!contention) return mode;
    const int64_t now = coarse_monotonic_ns();
    if (!contention->due(now)) return current_mode();
    const bool before = contention->spinning();
    if (contention->sample(now) != before) note_contention_change();
    return current_mode();
  }
  void note_contention_change() {
    mode_reason = contention->spinning()
                      ? base_reason + "; spinning again after a hold: busy now"
                      : base_reason + "; CPU contended (" + contention->describe() +
                            "): " + std::string(progress_mode_name(kLoadedMode)) + " now";
    // The first changes at info, then debug: a host whose load comes and goes would flood the log.
    if (++contention_changes <= 2) {
      MYELIN_LOG_INFO << info.name << ": progress " << mode_reason;
    } else {
      MYELIN_LOG_DEBUG << info.name << ": progress " << mode_reason;
    }
  }
  // After `mode` was resolved: watches CPU contention when kAuto resolved to busy polling with TCP
  // alone.
  void watch_contention() {
    base_reason = mode_reason;
    if (options.progress != ProgressMode::kAuto || mode != ProgressMode::kBusyPoll || !tcp_only) {
      contention.reset();
      return;
    }
    if (!contention) contention = std::make_unique<internal::CpuContentionWatch>();
    mode_reason += std::string(", ") + std::string(progress_mode_name(kLoadedMode)) +
                   " while spinning waits for a CPU";
    base_reason = mode_reason;
    if (!contention->spinning()) {
      mode_reason += "; CPU contended (" + contention->describe() +
                     "): " + std::string(progress_mode_name(kLoadedMode)) + " now";
    }
  }

  size_t progress() {
    if (only_backend != nullptr) return only_backend->progress();
    size_t n = 0;
    for (const auto& be : backends) n += be->progress();
    return n;
  }

  // Busy-poll mode: polls up to kPollsBeforeClock times before a wait reads the clock (to make its
  // deadline or to time itself). A wait that ends within them, such as a completed send or most
  // waits of a ping-pong, then costs no clock read at all (30-50 ns each under KVM, as much as a
  // shared-memory poll); one that does not is bounded by the deadline as before, a few
  // microseconds of polls later at most. True when done.
  static constexpr int kPollsBeforeClock = 64;
  // After those, every wait mode reads a clock for its deadline (and spin budget) once per this
  // many polls, not after every poll: a poll that finds nothing costs about as much as a read.
  static constexpr uint32_t kPollsPerDeadlineCheck = 16;
  template <typename Done>
  bool done_within_first_polls(Done&& done) {
    if (done()) return true;
    if (current_mode() != ProgressMode::kBusyPoll) return false;
    // With one backend the loop is its poll and the check alone: how long an idle pass takes
    // bounds how late an arrived message is seen.
    if (BackendContext* be = only_backend) {
      for (int i = 0; i < kPollsBeforeClock; ++i) {
        be->progress();
        if (done()) return true;
      }
      return false;
    }
    for (int i = 0; i < kPollsBeforeClock; ++i) {
      progress();
      if (done()) return true;
    }
    return false;
  }
  // The first of those polls, for Context::wait's inline part: in a ping-pong most waits that
  // are not done at once end with them. The first poll alone (a request that one poll completes
  // costs no more); then, with one backend, the others in the backend's own loop
  // (poll_until_done: no virtual call per poll, and a completion returns from there straight to
  // Context::wait). With several backends, the first poll only.
  bool done_after_first_polls(const Request& request) {
    if (current_mode() != ProgressMode::kBusyPoll) return false;
    progress();
    if (request.done()) return true;
    BackendContext* be = only_backend;
    return be != nullptr && be->poll_until_done(request, kPollsBeforeClock - 1);
  }
  // The rest of a wait that one poll did not end: the polls before the first clock read, then
  // drive() until the deadline (`deadline`, or options.timeout from now when null). Out of line,
  // so that the part of Context::wait() that usually ends it stays a short function.
  [[gnu::noinline]] Status wait_rest(const Request& request, const Deadline* deadline) {
    // (One backend in busy mode: done_after_first_polls() ran them all.)
    const bool polled = only_backend != nullptr && current_mode() == ProgressMode::kBusyPoll;
    if (!polled && done_within_first_polls([&] { return request.done(); })) {
      return status_of(request);
    }
    return wait_until(request, deadline != nullptr ? *deadline : default_deadline(options.timeout));
  }

  Status wait_until(const Request& request, Deadline deadline) {
    const int64_t start = coarse_monotonic_ns();  // only for the message
    if (!drive([&] { return request.done(); }, deadline)) {
      return timeout_error(info.name, ": timed out after ", (monotonic_ns() - start) / 1'000'000,
                           " ms waiting for ", request.description());
    }
    return status_of(request);
  }

  // Sleeps on the backends' fds until one is readable or the deadline; false when it cannot
  // sleep (a backend without wait_fd, or work already pending).
  bool block_once(Deadline deadline) {
    for (const auto& be : backends) {
      if (be->wait_fd() < 0 || !be->arm_wait()) return false;
    }
    epoll_event ev[8];
    // Wake at least every 100 ms so a missed edge costs latency, never a hang.
    const int ms = std::min(
        deadline.remaining_ms_for_poll() < 0 ? 100 : deadline.remaining_ms_for_poll(), 100);
    // One backend: sleep on its fd itself, one wakeup hop fewer than through the Context's set.
    if (backends.size() == 1) {
      pollfd p{backends.front()->wait_fd(), POLLIN, 0};
      (void)::poll(&p, 1, ms);
      return true;
    }
    if (!ensure_epoll().ok()) return false;
    (void)epoll_wait(epoll_fd, ev, 8, ms);
    return true;
  }

  // How long one blocking step may sleep: at most 100 ms (so a missed edge costs latency, never a
  // hang), never past the deadline; 0 once it has passed. While the deadline is far the coarse
  // clock decides (it reads no time-stamp counter, a few ns against 30-90 under KVM, and lags the
  // precise clock by at most a tick, which the margin covers).
  static int block_step_ms(Deadline deadline) {
    if (deadline.is_never()) return 100;
    if (deadline.at_ns() > coarse_monotonic_ns() + 200'000'000) return 100;  // no overflow
    return std::min(deadline.remaining_ms_for_poll(), 100);
  }

  // Drives progress until done() or the deadline; returns false on timeout.
  template <typename Done>
  bool drive(Done&& done, Deadline deadline) {
    if (done()) return true;
    ProgressMode m = sampled_mode();
    if (m == ProgressMode::kBusyPoll) {
      BackendContext* const be = only_backend;  // the one backend, polled without the loop
      for (uint32_t i = 1;; ++i) {
        if (be != nullptr) {
          be->progress();
        } else {
          progress();
        }
        if (done()) return true;
        if (i % kPollsPerDeadlineCheck != 0) continue;
        if (deadline_passed(deadline)) return false;
        // A thread whose CPU turned contended ends the spin; the wait goes on below (block).
        if (contention && (m = sampled_mode()) != ProgressMode::kBusyPoll) break;
      }
    }
    if (m == ProgressMode::kPollYield) {
      // A short spin catches a peer that is running right now on another CPU; after it, every
      // poll that finds nothing hands the CPU to another runnable process (on an oversubscribed
      // node, most likely the very rank this wait needs) instead of spinning out the time slice,
      // and no kernel wake-up is needed to come back: the scheduler returns to this process once
      // the others have had their turn. The deadline is read after every yield (a yield can
      // last a time slice; a clock read is small against the system call).
      for (int i = 0; i < kYieldSpinPolls; ++i) {
        progress();
        if (done()) return true;
      }
      const int64_t start = monotonic_ns();
      bool may_sleep = yield_may_sleep;
      for (uint32_t i = 1;; ++i) {
        const size_t events = progress();
        if (done()) return true;
        // Polls that found work go straight on, reading the clock every few polls only.
        if (events != 0 && i % kPollsPerDeadlineCheck != 0) continue;
        const int64_t now = monotonic_ns();
        if (!deadline.is_never() && now >= deadline.at_ns()) return false;
        if (events != 0) continue;
        if (may_sleep && now - start >= options.spin_before_block.count()) {
          // Sleeps until a socket is readable (or at most 100 ms, or the deadline); false when
          // work is pending, and then the loop simply goes on.
          if (block_once(deadline)) continue;
          may_sleep = false;
        }
        sched_yield();
      }
    }
    // Adaptive spin: spin_ns is the current budget, at most spin_before_block. A wait that the
    // spin satisfies sets it to four times what that spin took (plus 2 us), so the budget follows
    // what spinning needs on this host rather than the maximum; one that has to sleep anyway, or
    // that the spin satisfies only late, cuts it to a quarter, so a host where spinning does not
    // pay (the peer or the kernel's network softirq needs this CPU: on a loopback ping-pong a
    // spinner can hold back the very packet it waits for, and then "succeeds" after tens of
    // microseconds) stops spinning after a few waits. A wait whose first poll finds its
    // completion says nothing about spinning and leaves the budget alone. Every
    // kSpinProbeEvery-th wait spins the full budget again, so a host that quietens down gets
    // spinning back.
    const int64_t max_spin = options.spin_before_block.count();
    const bool probe = ++waits % kSpinProbeEvery == 0;
    const int64_t budget = probe ? max_spin : spin_ns;
    if (budget > 0) {  // no clock reads at all once the budget has decayed to nothing
      // The clock is read once per kPollsPerDeadlineCheck polls (for the budget and the
      // deadline), and once more when a later poll succeeds (to size the next budget).
      const int64_t start = monotonic_ns();
      const int64_t spin_until = start + budget;
      for (uint32_t i = 1;; ++i) {
        progress();
        if (done()) {
          if (i > 1) {
            const int64_t took = monotonic_ns() - start;
            spin_ns = took * 4 <= max_spin ? std::min(max_spin, took * 4 + 2000) : budget / 4;
          }
          return true;
        }
        if (i % kPollsPerDeadlineCheck != 0) continue;
        const int64_t now = monotonic_ns();
        if (!deadline.is_never() && now >= deadline.at_ns()) return false;
        if (now >= spin_until) break;
      }
      spin_ns = budget / 4;
    }
    for (;;) {
      // One backend that can sleep in its own receive: the wakeup is the receive itself.
      if (backends.size() == 1) {
        const int step = block_step_ms(deadline);
        size_t handled = 0;
        if (step != 0 && backends.front()->progress_blocking(step, handled)) {
          if (done()) return true;
          if (deadline.expired()) return false;
          continue;
        }
      }
      // Sleeps only when nothing is pending (block_once returns at once otherwise).
      block_once(deadline);
      progress();
      if (done()) return true;
      if (deadline.expired()) return false;
    }
  }
};

Context::Context(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Context::~Context() = default;

Result<std::unique_ptr<Context>> Context::create(const Options& options) {
  MYELIN_RETURN_IF_ERROR(options.validate());
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->spin_ns = options.spin_before_block.count();
  char host[256] = {};
  (void)gethostname(host, sizeof(host) - 1);
  impl->info.name = options.name.empty()
                        ? "pid " + std::to_string(getpid()) + "@" + std::string(host)
                        : options.name;
  impl->cpus = usable_cpus();
  impl->info.node_id = local_node_id();

  // A Context that will yield opens shm and TCP as for spin-then-block, so its waits can sleep
  // once yielding has not helped (see yield_may_sleep).
  const bool sleepy_yield =
      options.progress == ProgressMode::kPollYield ||
      (options.progress == ProgressMode::kAuto && options.local_ranks > impl->cpus);
  Options sleep_capable = impl->options;
  sleep_capable.progress = ProgressMode::kSpinThenBlock;
  std::string skipped;
  bool compiled = options.backend == Backend::kAuto;
  for (const auto& factory : internal::compiled_backends()) {
    if (options.backend != Backend::kAuto && options.backend != factory.kind) continue;
    compiled = true;
    auto backend = factory.create(
        sleepy_yield && (factory.kind == Backend::kShm || factory.kind == Backend::kTcp)
            ? sleep_capable
            : impl->options,
        impl->info);
    if (!backend.ok()) {
      if (options.backend != Backend::kAuto) {
        return std::move(backend).status().with_context(
            std::string("opening the ") + std::string(backend_name(factory.kind)) + " backend");
      }
      MYELIN_LOG_INFO << "auto: " << backend_name(factory.kind)
                      << " not available: " << backend.status();
      skipped +=
          std::string(backend_name(factory.kind)) + ": " + backend.status().to_string() + "; ";
      continue;
    }
    impl->backends.push_back(std::move(backend).value());
  }
  if (!compiled) {
    return unsupported("the ", backend_name(options.backend),
                       " backend is not compiled into this build of myelin");
  }
  if (impl->backends.empty()) return unavailable("no transport backend could be opened: ", skipped);
  if (impl->backends.size() == 1) impl->only_backend = impl->backends.front().get();
  impl->tcp_only = std::all_of(impl->backends.begin(), impl->backends.end(),
                               [](const auto& be) { return be->kind() == Backend::kTcp; });
  impl->yield_may_sleep =
      std::all_of(impl->backends.begin(), impl->backends.end(), [&](const auto& be) {
        return be->kind() == Backend::kTcp || (be->kind() == Backend::kShm && sleepy_yield);
      });
  impl->mode = resolve_progress_mode(options.progress, options.local_ranks, impl->cpus,
                                     &impl->mode_reason, impl->tcp_only);
  impl->watch_contention();
  if (impl->mode != ProgressMode::kBusyPoll && options.progress == ProgressMode::kAuto) {
    MYELIN_LOG_INFO << impl->info.name << ": progress " << impl->mode_reason;
  }

  ParsedAddress self{impl->info.name, impl->info.node_id, {}};
  for (const auto& be : impl->backends) {
    auto bytes = be->local_address();
    MYELIN_CHECK(!bytes.empty() && bytes.size() <= internal::kMaxAddressEntry)
        << backend_name(be->kind()) << " address of " << bytes.size() << " bytes";
    self.entries.emplace_back(be->kind(), std::move(bytes));
  }
  if (self.name.size() > internal::kMaxAddressName) self.name.resize(internal::kMaxAddressName);
  impl->address = internal::encode_address(self);
  return std::unique_ptr<Context>(new Context(std::move(impl)));
}

const Options& Context::options() const noexcept {
  return impl_->options;
}

ProgressMode Context::progress_mode() const noexcept {
  return impl_->mode;
}

const std::string& Context::progress_reason() const noexcept {
  return impl_->mode_reason;
}

ProgressMode Context::set_local_ranks(int local_ranks) {
  if (local_ranks < 0) local_ranks = 0;
  impl_->options.local_ranks = local_ranks;
  // kAuto resolves to busy or yield, or to block only in a Context whose backends are all TCP,
  // whose sockets wake a sleeper in any mode; so nothing relies on a wake-up that a backend set up
  // (or not) for the requested mode when it opened (shm's doorbells, UCX's wake-up feature).
  const ProgressMode before = impl_->mode;
  impl_->mode = resolve_progress_mode(impl_->options.progress, local_ranks, impl_->cpus,
                                      &impl_->mode_reason, impl_->tcp_only);
  impl_->watch_contention();
  if (impl_->mode != before) {
    MYELIN_LOG_INFO << impl_->info.name << ": progress " << impl_->mode_reason;
  }
  return impl_->mode;
}

std::vector<Backend> Context::backends() const {
  std::vector<Backend> out;
  for (const auto& be : impl_->backends) out.push_back(be->kind());
  return out;
}

Result<Limits> Context::limits(Backend backend) const {
  if (const auto* be = impl_->find(backend)) return be->limits();
  return invalid_argument("the ", backend_name(backend), " backend is not open in this Context");
}

const std::vector<uint8_t>& Context::address() const noexcept {
  return impl_->address;
}

Result<BackendChoice> Context::choice_for(std::span<const uint8_t> peer_address) const {
  MYELIN_ASSIGN_OR_RETURN(ParsedAddress peer, internal::parse_address(peer_address));
  return impl_->choose(peer);
}

Result<Endpoint*> Context::connect(std::span<const uint8_t> peer_address) {
  return connect(peer_address, Deadline::after(impl_->options.timeout));
}

Result<Endpoint*> Context::connect(std::span<const uint8_t> peer_address, Deadline deadline) {
  std::vector<uint8_t> key(peer_address.begin(), peer_address.end());
  if (auto it = impl_->endpoints.find(key); it != impl_->endpoints.end()) return it->second.get();
  MYELIN_ASSIGN_OR_RETURN(ParsedAddress peer, internal::parse_address(peer_address));
  if (key == impl_->address) {
    return invalid_argument("connect(): the address is this Context's own (", impl_->info.name,
                            "); loop back locally instead");
  }
  MYELIN_ASSIGN_OR_RETURN(BackendChoice choice, impl_->choose(peer));
  BackendContext* be = impl_->find(choice.backend);
  if (be == nullptr) {
    return unavailable("the ", backend_name(choice.backend), " backend is not open in ",
                       impl_->info.name);
  }
  MYELIN_LOG_INFO << impl_->info.name << " -> " << peer.name << ": " << backend_name(choice.backend)
                  << " (" << choice.reason << ")";
  auto ep = be->connect(*peer.entry(choice.backend), peer.name, deadline);
  if (!ep.ok()) {
    return std::move(ep).status().with_context("connecting " + impl_->info.name + " to " +
                                               peer.name + " over " +
                                               std::string(backend_name(choice.backend)));
  }
  Endpoint* raw = ep.value().get();
  impl_->endpoints.emplace(std::move(key), std::move(ep).value());
  return raw;
}

void Context::disconnect(Endpoint* endpoint) {
  for (auto it = impl_->endpoints.begin(); it != impl_->endpoints.end(); ++it) {
    if (it->second.get() == endpoint) {
      impl_->endpoints.erase(it);
      return;
    }
  }
}

namespace {
Result<std::shared_ptr<RegionState>> register_with_all(
    const std::vector<std::unique_ptr<BackendContext>>& backends, std::shared_ptr<RegionState> st) {
  for (const auto& be : backends) {
    auto reg = be->register_memory(*st);
    if (!reg.ok()) {
      return std::move(reg).status().with_context(std::string("registering ") +
                                                  std::to_string(st->size) + " bytes with " +
                                                  std::string(backend_name(be->kind())));
    }
    st->registrations.push_back(std::move(reg).value());
  }
  return st;
}
}  // namespace

Result<MemoryRegion> Context::register_memory(void* data, size_t size, Access access,
                                              MemoryKind kind) {
  if (data == nullptr || size == 0) {
    return invalid_argument("register_memory(", data == nullptr ? "null" : "non-null", ", ", size,
                            "): need a non-null buffer of at least one byte");
  }
  if (kind != MemoryKind::kHost) return unsupported("only host memory can be registered today");
  const Impl::CacheKey key{reinterpret_cast<uintptr_t>(data), size, static_cast<uint8_t>(access)};
  if (auto it = impl_->regions.find(key); it != impl_->regions.end() && it->second->valid) {
    return MemoryRegion(it->second);
  }
  auto st = std::make_shared<RegionState>();
  st->data = data;
  st->size = size;
  st->access = access;
  st->kind = kind;
  st->id = impl_->next_region_id++;
  MYELIN_ASSIGN_OR_RETURN(st, register_with_all(impl_->backends, std::move(st)));
  impl_->regions[key] = st;
  return MemoryRegion(std::move(st));
}

Result<MemoryRegion> Context::allocate(size_t size, Access access) {
  if (size == 0) return invalid_argument("allocate(0): need at least one byte");
  std::shared_ptr<void> mem;
  // shm first: its segments are what same-node shm peers map. Without shm, UCX allocates (over
  // posix its memory is a shared segment the peer's puts copy into directly, where memory UCX did
  // not allocate gets emulated puts). With both open, shm's memory is registered with UCX as
  // ordinary memory.
  if (BackendContext* shm = impl_->find(Backend::kShm)) {
    MYELIN_ASSIGN_OR_RETURN(mem, shm->allocate_shared(size));
  } else if (BackendContext* ucx = impl_->find(Backend::kUcx)) {
    MYELIN_ASSIGN_OR_RETURN(mem, ucx->allocate_shared(size));
  } else {
    // Page-aligned anonymous memory; its pages land on the NUMA node of the first thread to
    // touch them, the Context's progress thread in the usual case.
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return errno_status("mmap of " + std::to_string(size) + " bytes", errno,
                          StatusCode::kResourceExhausted);
    }
    mem = std::shared_ptr<void>(p, [size](void* q) { munmap(q, size); });
  }
  auto st = std::make_shared<RegionState>();
  st->data = mem.get();
  st->size = size;
  st->access = access;
  st->id = impl_->next_region_id++;
  st->owned_allocation = true;
  st->allocation = std::move(mem);
  MYELIN_ASSIGN_OR_RETURN(st, register_with_all(impl_->backends, std::move(st)));
  impl_->regions[{reinterpret_cast<uintptr_t>(st->data), size, static_cast<uint8_t>(access)}] = st;
  return MemoryRegion(std::move(st));
}

void Context::deregister(MemoryRegion& region) {
  const auto& st = region.state();
  if (!st) return;
  for (auto it = impl_->regions.begin(); it != impl_->regions.end();) {
    it = it->second == st ? impl_->regions.erase(it) : std::next(it);
  }
  st->valid = false;
  st->registrations.clear();
  st->allocation.reset();
}

size_t Context::progress() {
  return impl_->progress();
}

Status Context::wait(const Request& request) {
  // No clock read for a finished request, nor for one the first poll finishes.
  if (request.done() || impl_->done_after_first_polls(request)) return status_of(request);
  return impl_->wait_rest(request, nullptr);
}

Status Context::wait(const Request& request, Deadline deadline) {
  if (request.done() || impl_->done_after_first_polls(request)) return status_of(request);
  return impl_->wait_rest(request, &deadline);
}

Status Context::wait_all(std::span<const Request> requests, Deadline deadline) {
  const int64_t start = monotonic_ns();
  size_t first_pending = 0;
  auto all_done = [&] {
    while (first_pending < requests.size() && requests[first_pending].done()) ++first_pending;
    return first_pending == requests.size();
  };
  if (!impl_->drive(all_done, deadline)) {
    size_t pending = 0;
    for (const auto& r : requests) pending += r.done() ? 0 : 1;
    return timeout_error(impl_->info.name, ": timed out after ",
                         (monotonic_ns() - start) / 1'000'000, " ms waiting for ", pending, " of ",
                         requests.size(),
                         " requests (first pending: ", requests[first_pending].description(), ")");
  }
  for (const auto& r : requests) {
    if (!r.status().ok()) return r.status();
  }
  return ok_status();
}

}  // namespace myelin::transport
