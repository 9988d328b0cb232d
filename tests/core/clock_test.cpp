#include <myelin/core/clock.hpp>

#include <gtest/gtest.h>

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
