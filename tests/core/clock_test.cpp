#include <myelin/core/clock.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <limits>

namespace myelin {
namespace {

TEST(Clock, MonotonicAdvances) {
  const int64_t a = monotonic_ns();
  const int64_t b = monotonic_ns();
  EXPECT_LE(a, b);
  EXPECT_GT(realtime_ns(), 1'600'000'000LL * 1'000'000'000LL);
}

TEST(Deadline, ExpiresAndReportsRemaining) {
  Deadline past = Deadline::after_ms(0);
  EXPECT_TRUE(past.expired());
  EXPECT_EQ(past.remaining_ns(), 0);
  EXPECT_EQ(past.remaining_ms_for_poll(), 0);
  Deadline soon = Deadline::after_ms(10'000);
  EXPECT_FALSE(soon.expired());
  EXPECT_GT(soon.remaining_ns(), 9'000'000'000LL);
  EXPECT_EQ(soon.min(past).at_ns(), past.at_ns());
  Deadline never = Deadline::never();
  EXPECT_TRUE(never.is_never());
  EXPECT_FALSE(never.expired());
  EXPECT_EQ(never.remaining_ms_for_poll(), -1);
  EXPECT_TRUE(Deadline::after(std::chrono::hours(24 * 365 * 1000)).is_never());
  EXPECT_TRUE(Deadline::after(std::chrono::milliseconds(-5)).expired());
}

TEST(Deadline, HugeAndNonFiniteTimeoutsSaturate) {
  using std::chrono::duration;
  // Too far for int64 nanoseconds, in integer and floating-point units: never, not an overflow
  // into the past.
  EXPECT_TRUE(
      Deadline::after(std::chrono::seconds(std::numeric_limits<int64_t>::max())).is_never());
  EXPECT_TRUE(Deadline::after(duration<double>(1e10)).is_never());
  EXPECT_TRUE(Deadline::after(duration<double>(1e300)).is_never());
  EXPECT_TRUE(
      Deadline::after(duration<double>(std::numeric_limits<double>::infinity())).is_never());
  EXPECT_TRUE(Deadline::after_ms(std::numeric_limits<int64_t>::max()).is_never());
  // Below the limit: a real deadline.
  const Deadline half = Deadline::after(duration<double>(0.5));
  EXPECT_FALSE(half.is_never());
  EXPECT_GT(half.remaining_ns(), 0);
  EXPECT_LE(half.remaining_ns(), 500'000'000);
  // Zero, negative, -inf and NaN: already expired, at "now" (not somewhere near INT64_MIN).
  const int64_t before = monotonic_ns();
  for (double s : {0.0, -1.0, -std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::quiet_NaN()}) {
    const Deadline d = Deadline::after(duration<double>(s));
    EXPECT_TRUE(d.expired()) << s;
    EXPECT_GE(d.at_ns(), before) << s;
    EXPECT_LE(d.at_ns(), monotonic_ns()) << s;
  }
}

TEST(CycleTimer, CalibratedAgainstMonotonic) {
  const double tpn = CycleTimer::ticks_per_ns();
  EXPECT_GT(tpn, 0.0);
  const uint64_t c0 = CycleTimer::now_ordered();
  const int64_t t0 = monotonic_ns();
  while (monotonic_ns() - t0 < 5'000'000) {
  }
  const double elapsed = CycleTimer::to_ns(CycleTimer::now_ordered() - c0);
  // A loose bound: this VM is noisy, but the conversion must be in the right unit.
  EXPECT_GT(elapsed, 2'000'000.0);
  EXPECT_LT(elapsed, 500'000'000.0);
}

}  // namespace
}  // namespace myelin
