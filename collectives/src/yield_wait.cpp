// collectives/src/yield_wait.cpp
#include "yield_wait.hpp"

#include <sched.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdlib>
#include <limits>

#include <myelin/core/log.hpp>
#include <myelin/transport/options.hpp>

namespace myelin::collectives::internal {

void YieldGuard::add(int64_t now_ns, int64_t yield_ns) noexcept {
  ++yields_;
  // A probe that met no evidence while it could (calls that went without yielding) is over.
  if (probing_ && now_ns - hold_until_ns_ > kProbeSpanNs) {
    probing_ = false;
    hold_ns_ = kMinHoldNs;
  }
  constexpr uint32_t kWindowMask =
      kWindowYields == 32 ? ~uint32_t{0} : (uint32_t{1} << kWindowYields) - 1;
  const bool is_long = yield_ns >= kLongYieldNs;
  recent_ = ((recent_ << 1) | (is_long ? 1u : 0u)) & kWindowMask;
  if (!is_long) {
    if (probing_ && ++clear_ >= kClearYields) {  // the probe found the CPU to the ranks
      probing_ = false;
      hold_ns_ = kMinHoldNs;
    }
    return;
  }
  ++long_yields_;
  // A probe follows other work that lasted: one long yield is enough to end it.
  if (!probing_ && std::popcount(recent_) < kLongYields) return;
  // A probe that meets other work again makes the next hold longer; the first hold is the
  // shortest.
  if (probing_) hold_ns_ = std::min(kMaxHoldNs, hold_ns_ * kHoldGrowth);
  probing_ = true;
  clear_ = 0;
  recent_ = 0;  // the evidence is spent; a probe gathers its own
  hold_until_ns_ = now_ns + hold_ns_;
  ++holds_;
}

int64_t yield_budget_ns() noexcept {
  static const int64_t budget = [] {
    const char* v = std::getenv("MYELIN_COLL_YIELD_US");
    if (v == nullptr) return kYieldBudgetNs;
    errno = 0;
    char* end = nullptr;
    const long long us = std::strtoll(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || us < 0 || us > 1'000'000) {
      MYELIN_LOG_WARN << "MYELIN_COLL_YIELD_US='" << v
                      << "' is not an integer in [0, 1000000]; using " << kYieldBudgetNs / 1000
                      << " us";
      return kYieldBudgetNs;
    }
    return static_cast<int64_t>(us) * 1000;
  }();
  return budget;
}

bool yield_first(const transport::Context& context) noexcept {
  return context.options().progress == transport::ProgressMode::kAuto &&
         context.progress_mode() == transport::ProgressMode::kSpinThenBlock &&
         yield_budget_ns() > 0;
}

bool yield_until_done(transport::Context& context, const transport::Request& request,
                      Deadline deadline, int64_t budget_ns, YieldGuard& guard) {
  int64_t now = monotonic_ns();
  if (!guard.may_yield(now)) return false;
  const int64_t until = now + budget_ns;
  const int64_t end = deadline.is_never() ? std::numeric_limits<int64_t>::max() : deadline.at_ns();
  for (;;) {
    context.progress();
    if (request.done()) return true;
    // The guard is told the length of the yield alone: a poll that handled a message is not
    // someone else's time slice.
    const int64_t before = monotonic_ns();
    if (before >= until || before >= end) return false;
    sched_yield();
    now = monotonic_ns();
    guard.add(now, now - before);
    if (!guard.may_yield(now)) return false;
  }
}

}  // namespace myelin::collectives::internal
