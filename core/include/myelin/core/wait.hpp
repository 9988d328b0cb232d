// myelin/core/wait.hpp
//
// Waiting for a ring without burning a syscall per message.
//
// A consumer that finds its ring empty either busy-polls (WaitMode::kBusyPoll, the default and
// the lowest latency) or spins for a while and then sleeps (kSpinThenFutex, kSpinThenEventFd)
// until a producer notifies it, the deadline passes, or the liveness check reports a dead peer.
//
// The protocol lives in a WaitWord: one cache line inside the ring's (possibly shared) header.
//   consumer:  sleepers += 1 (seq_cst) ; epoch0 = epoch ; if ready() -> done ; sleep while
//              epoch == epoch0 ; sleepers -= 1
//   producer:  publish the data (release) ; fence (seq_cst) ; if sleepers != 0 -> epoch += 1, wake
// Either the producer sees the sleeper, or the consumer's re-check sees the data (the two seq_cst
// operations cannot both miss each other), so no wake-up is lost. When nobody sleeps, notify()
// costs one fence and one load of a line that stays shared in both caches: no syscall and no
// write, so a spinning consumer is not disturbed.
//
// A futex on a word in a MAP_SHARED mapping works across processes (no FUTEX_PRIVATE_FLAG). The
// eventfd mode is for consumers that also wait in epoll: the fd must be shared by the two sides
// (inherited across fork, or passed over a Unix socket).
//
//   Waiter waiter(&ring.consumer_wait_word(), {.mode = WaitMode::kSpinThenFutex});
//   waiter.set_liveness_check([&] { return segment.check_peers(); });
//   Status s = waiter.wait([&] { return ring.try_pop(item); }, Deadline::after_ms(100));
//   // producer, after try_push() or commit():  waiter.notify();
//
// Thread safety: notify() may be called from any number of threads at once; wait() from one
// thread per Waiter (several Waiters may wait on one WaitWord). A Waiter is move-only.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <utility>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin {

// Lives in shared memory: plain atomics, no pointers, one cache line.
struct alignas(kCacheLine) WaitWord {
  std::atomic<uint32_t> epoch{0};     // the futex word; bumped by a notify that found sleepers
  std::atomic<uint32_t> sleepers{0};  // consumers between "announce" and "woken"
};
static_assert(sizeof(WaitWord) == kCacheLine);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

enum class WaitMode : uint8_t {
  kBusyPoll,         // spin until ready or the deadline; never sleeps
  kSpinThenFutex,    // spin for spin_ns, then sleep on the WaitWord's futex
  kSpinThenEventFd,  // spin for spin_ns, then sleep in poll() on an eventfd
};

struct WaitOptions {
  WaitMode mode = WaitMode::kBusyPoll;
  int64_t spin_ns = 20'000;                // how long to spin before the first sleep
  int64_t liveness_check_ns = 10'000'000;  // how often the liveness check runs while waiting
};

// An eventfd (non-blocking, close-on-exec), owned.
class EventFd {
 public:
  static Result<EventFd> create();
  EventFd() noexcept = default;
  EventFd(EventFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  EventFd& operator=(EventFd&& o) noexcept;
  EventFd(const EventFd&) = delete;
  EventFd& operator=(const EventFd&) = delete;
  ~EventFd();
  // A second owner of the same eventfd (dup), e.g. for the producer side in the same process.
  Result<EventFd> duplicate() const;
  [[nodiscard]] int fd() const noexcept { return fd_; }
  // Adds one to the counter (wakes a poller).
  void signal() const noexcept;
  // Clears the counter without blocking.
  void drain() const noexcept;

 private:
  explicit EventFd(int fd) noexcept : fd_(fd) {}
  int fd_ = -1;
};

class Waiter {
 public:
  // `word` must outlive the Waiter. For kSpinThenEventFd use the constructor taking an EventFd.
  explicit Waiter(WaitWord* word, WaitOptions options = {}) noexcept
      : word_(word), options_(options) {}
  Waiter(WaitWord* word, WaitOptions options, EventFd eventfd) noexcept
      : word_(word), options_(options), eventfd_(std::move(eventfd)) {}

  // Called while waiting, at most every options.liveness_check_ns; a non-OK Status ends the wait
  // with that Status (typically peer_failed from ShmSegment::check_peers()).
  void set_liveness_check(std::function<Status()> check) { liveness_ = std::move(check); }

  // Producer side: wakes sleeping consumers after data was published. Cheap when none sleeps.
  void notify() noexcept {
    // Pairs with the seq_cst fetch_add on `sleepers` in sleep_phase(): either this load sees the
    // sleeper, or the sleeper's re-check sees what was published before this fence.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (word_->sleepers.load(std::memory_order_relaxed) != 0) wake();
  }

  // Consumer side: returns OK once ready() returned true (ready() may have side effects such as
  // popping an item: it is called until it succeeds once), timeout_error when the deadline
  // passed, or the liveness check's error.
  template <typename Ready>
  Status wait(Ready&& ready, Deadline deadline) {
    if (ready()) return ok_status();
    int64_t now = monotonic_ns();
    int64_t next_check = now + options_.liveness_check_ns;
    const int64_t spin_until =
        options_.mode == WaitMode::kBusyPoll ? INT64_MAX : now + options_.spin_ns;
    // Spin phase: the clock is read every 256 probes only.
    for (uint32_t i = 1;; ++i) {
      if (ready()) return ok_status();
      cpu_relax();
      if ((i & 255) != 0) continue;
      now = monotonic_ns();
      if (!deadline.is_never() && now >= deadline.at_ns()) {
        return ready() ? ok_status() : deadline_error();
      }
      if (now >= next_check) {
        MYELIN_RETURN_IF_ERROR(check_liveness());
        next_check = now + options_.liveness_check_ns;
      }
      if (now >= spin_until) break;
    }
    // Sleep phase.
    for (;;) {
      const uint32_t epoch = announce_sleep();
      if (ready()) {
        retract_sleep();
        return ok_status();
      }
      now = monotonic_ns();
      const int64_t until = deadline.at_ns() < next_check ? deadline.at_ns() : next_check;
      sleep_until(epoch, until, now);
      retract_sleep();
      if (ready()) return ok_status();
      now = monotonic_ns();
      if (!deadline.is_never() && now >= deadline.at_ns()) return deadline_error();
      if (now >= next_check) {
        MYELIN_RETURN_IF_ERROR(check_liveness());
        next_check = now + options_.liveness_check_ns;
      }
    }
  }

  [[nodiscard]] const WaitOptions& options() const noexcept { return options_; }
  [[nodiscard]] const EventFd& eventfd() const noexcept { return eventfd_; }

 private:
  uint32_t announce_sleep() noexcept {
    // Pairs with the fence in notify(); seq_cst so the re-check of ready() cannot move above it.
    word_->sleepers.fetch_add(1, std::memory_order_seq_cst);
    // Pairs with the release increment in wake(): a newer epoch means a wake we must not sleep
    // through.
    return word_->epoch.load(std::memory_order_acquire);
  }
  void retract_sleep() noexcept {
    // Pairs with nothing that needs ordering: only the count matters to notify().
    word_->sleepers.fetch_sub(1, std::memory_order_relaxed);
  }
  Status check_liveness() const { return liveness_ ? liveness_() : ok_status(); }
  static Status deadline_error();
  void wake() noexcept;
  // Sleeps until woken, the epoch changed, or `until_ns` (monotonic) passed.
  void sleep_until(uint32_t epoch, int64_t until_ns, int64_t now_ns) noexcept;

  WaitWord* word_;
  WaitOptions options_;
  EventFd eventfd_;
  std::function<Status()> liveness_;
};

}  // namespace myelin
