// CycleTimer calibration: the TSC is used only where the CPU says it is invariant.
#include <myelin/core/clock.hpp>

#include <atomic>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace myelin {
namespace {

bool detect_invariant_tsc() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0x80000000, nullptr) < 0x80000007) return false;
  __cpuid(0x80000007, eax, ebx, ecx, edx);
  return (edx & (1u << 8)) != 0;  // CPUID.80000007H:EDX[8] = invariant TSC
#else
  return false;
#endif
}

double calibrate() noexcept {
  if (!CycleTimer::uses_tsc()) return 1.0;
  // Two short windows; keep the later one (the first warms caches and the clock source).
  double ratio = 1.0;
  for (int round = 0; round < 2; ++round) {
    const int64_t t0 = monotonic_ns();
    const uint64_t c0 = CycleTimer::now_ordered();
    while (monotonic_ns() - t0 < 10'000'000) {
    }
    const int64_t t1 = monotonic_ns();
    const uint64_t c1 = CycleTimer::now_ordered();
    ratio = static_cast<double>(c1 - c0) / static_cast<double>(t1 - t0);
  }
  return ratio > 0 ? ratio : 1.0;
}

}  // namespace

bool CycleTimer::uses_tsc() noexcept {
  static const bool invariant = detect_invariant_tsc();
  return invariant;
}

double CycleTimer::ticks_per_ns() noexcept {
  static const double ratio = calibrate();
  return ratio;
}

}  // namespace myelin
