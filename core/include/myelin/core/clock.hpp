// myelin/core/clock.hpp
//
// Clocks and deadlines.
//   - monotonic_ns(): CLOCK_MONOTONIC in nanoseconds; the clock every timeout in myelin uses.
//   - Deadline: an absolute point on that clock; every blocking call in myelin takes one (or a
//     timeout turned into one) so no wait is unbounded.
//   - CycleTimer: the time-stamp counter for benchmarks, calibrated once against monotonic_ns().
//     Falls back to monotonic_ns() where the TSC is not invariant or not available.
//
// Thread safety: all functions are thread-safe. Deadline is a value type.
#pragma once

#include <chrono>
#include <cstdint>
#include <ctime>
#include <limits>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

namespace myelin {

inline int64_t monotonic_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Wall-clock time in nanoseconds since the Unix epoch (for logs and reports, never for timeouts).
inline int64_t realtime_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

class Deadline {
 public:
  // A deadline that never expires; use only where an outer deadline bounds the wait.
  static constexpr Deadline never() noexcept { return Deadline(kNever); }
  // Compared in the caller's own units so that huge timeouts (integer or floating point, up to
  // infinity) saturate to never() instead of overflowing on the way to nanoseconds. A zero,
  // negative or NaN timeout is already expired.
  template <typename Rep, typename Period>
  static Deadline after(std::chrono::duration<Rep, Period> timeout) noexcept {
    const int64_t now = monotonic_ns();
    if (!(timeout > timeout.zero())) return Deadline(now);
    const auto left = std::chrono::duration_cast<std::chrono::duration<Rep, Period>>(
        std::chrono::nanoseconds(kNever - now));
    if (timeout >= left) return never();
    return Deadline(now + std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count());
  }
  static Deadline after_ms(int64_t ms) noexcept { return after(std::chrono::milliseconds(ms)); }
  static constexpr Deadline at_ns(int64_t monotonic) noexcept { return Deadline(monotonic); }

  [[nodiscard]] bool is_never() const noexcept { return at_ns_ == kNever; }
  [[nodiscard]] bool expired() const noexcept { return !is_never() && monotonic_ns() >= at_ns_; }
  // Nanoseconds left, 0 when expired, INT64_MAX for never().
  [[nodiscard]] int64_t remaining_ns() const noexcept {
    if (is_never()) return kNever;
    const int64_t left = at_ns_ - monotonic_ns();
    return left > 0 ? left : 0;
  }
  // Milliseconds left rounded up, clamped to int for poll(2)/epoll_wait(2); -1 for never().
  [[nodiscard]] int remaining_ms_for_poll() const noexcept {
    if (is_never()) return -1;
    const int64_t ms = (remaining_ns() + 999'999) / 1'000'000;
    return ms > std::numeric_limits<int>::max() ? std::numeric_limits<int>::max()
                                                : static_cast<int>(ms);
  }
  [[nodiscard]] int64_t at_ns() const noexcept { return at_ns_; }
  // The earlier of two deadlines.
  [[nodiscard]] Deadline min(Deadline other) const noexcept {
    return at_ns_ <= other.at_ns_ ? *this : other;
  }

 private:
  static constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  constexpr explicit Deadline(int64_t at) noexcept : at_ns_(at) {}
  int64_t at_ns_;
};

// Cycle-accurate timestamps for benchmarks.
class CycleTimer {
 public:
  // Raw counter; not serialising (use for intervals of many operations).
  static uint64_t now() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    if (uses_tsc()) return __rdtsc();
#endif
    return static_cast<uint64_t>(monotonic_ns());
  }
  // Waits for earlier instructions to complete before reading (rdtscp).
  static uint64_t now_ordered() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    if (uses_tsc()) {
      unsigned aux;
      return __rdtscp(&aux);
    }
#endif
    return static_cast<uint64_t>(monotonic_ns());
  }
  // Counter ticks per nanosecond (1.0 on the monotonic fallback). Calibrated on first call
  // (about 20 ms), then cached.
  static double ticks_per_ns() noexcept;
  static double to_ns(uint64_t ticks) noexcept {
    return static_cast<double>(ticks) / ticks_per_ns();
  }
  // True when the counter is an invariant TSC.
  static bool uses_tsc() noexcept;
};

}  // namespace myelin
