// collectives/src/yield_wait.hpp — how a small collective waits on a node whose ranks outnumber its
// CPUs over TCP (not public API).
//
// There ProgressMode::kAuto resolves to spin-then-block: every wait that a short spin does not end
// sleeps in the kernel and needs a wake-up. Traced on a 2-vCPU VM (4 TCP ranks, 4 KiB allreduce,
// perf sched): the blocking ranks ran 81 % of their time on one vCPU (a loopback wake-up is a
// synchronous one and places the woken rank beside its waker; sleeping ranks give the load
// balancer nothing to move), the other vCPU ran other work or idled, and a woken rank waited for
// its CPU 43 us on average. OpenMPI's TCP transport polls and yields instead and never sleeps: its
// ranks stay runnable, stay spread (48 / 52 %) and hand the CPU to each other without a wake-up.
//
// So a small operation first polls the Context and yields the CPU between polls that find nothing,
// for at most a budget (yield_budget_ns(), kYieldBudgetNs unless MYELIN_COLL_YIELD_US says
// otherwise; 0 turns this off), and only then waits as the Context's mode says. On such a node
// the rank a wait needs is usually the one that runs next on this CPU. The budget is long against
// a small call (tens of microseconds) on purpose: every wait that outlasts it sleeps, and the
// wake-ups that follow gather the ranks on one CPU again (traced with a 1 ms budget at load 14:
// 89 % of the ranks' time on one vCPU; with 20 ms, 44 / 56 %). A rank that waits longer than that
// for a peer (one that computes, or is stopped) burns at most the budget per wait in polls and
// yields, and each yield hands the CPU to whoever else can use it.
//
// What yielding must not do is what busy polling did on a shared host: hand the CPU to other work
// of the same weight for a whole time slice per yield (2 busy loops beside 4 ranks: a 4 KiB call
// 2 ms yielding against 0.2 ms blocking). A yield that lasts kLongYieldNs or more ran someone
// else's time slice (the ranks' own turns between polls are tens of microseconds), and stops the
// yielding for a hold (kMinHoldNs, growing kHoldGrowth-fold per probe that meets another long
// yield, up to kMaxHoldNs), in which waits go straight to the Context's wait. A probe is simply
// yielding again once the hold has passed; kClearYields short yields in a row confirm it and the
// next hold is short again. One long yield is enough evidence: a hold costs only the Context's
// own waits for its length, while every long yield costs a time slice of the whole collective.
//
// Thread safety: none; a Communicator is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>

#include <myelin/core/clock.hpp>
#include <myelin/transport/context.hpp>
#include <myelin/transport/request.hpp>

namespace myelin::collectives::internal {

// The hold decision, from the lengths of yields the caller measured (no I/O, no clock).
class YieldGuard {
 public:
  static constexpr int64_t kLongYieldNs = 250'000;      // a yield this long ran other work
  static constexpr int kClearYields = 64;               // short ones in a row that end a probe
  static constexpr int64_t kMinHoldNs = 50'000'000;     // first hold: 50 ms
  static constexpr int64_t kHoldGrowth = 4;             // per probe that meets a long yield
  static constexpr int64_t kMaxHoldNs = 2'000'000'000;  // longest hold: 2 s
  static_assert(kClearYields >= 1, "a probe needs evidence to end");
  static_assert(kMinHoldNs > 0 && kMinHoldNs <= kMaxHoldNs, "holds grow from the first");

  // Whether waits may yield at `now_ns` (any monotonic clock, the same throughout): false during
  // a hold.
  [[nodiscard]] bool may_yield(int64_t now_ns) const noexcept { return now_ns >= hold_until_ns_; }
  // Records one yield that ended at `now_ns` and took `yield_ns`.
  void add(int64_t now_ns, int64_t yield_ns) noexcept;
  [[nodiscard]] int64_t hold_ns() const noexcept { return hold_ns_; }
  [[nodiscard]] int64_t hold_until_ns() const noexcept { return hold_until_ns_; }
  // Yields recorded, and holds started, since construction.
  [[nodiscard]] uint64_t yields() const noexcept { return yields_; }
  [[nodiscard]] uint64_t holds() const noexcept { return holds_; }

 private:
  uint64_t yields_ = 0;
  uint64_t holds_ = 0;
  int clear_ = 0;         // short yields in a row since the last hold
  bool probing_ = false;  // yielding again after a hold, not confirmed yet
  int64_t hold_ns_ = kMinHoldNs;
  int64_t hold_until_ns_ = 0;
};

// Budget of one yielding wait: kYieldBudgetNs, or MYELIN_COLL_YIELD_US (microseconds, 0 = off;
// read once; an invalid value is logged and ignored).
constexpr int64_t kYieldBudgetNs = 20'000'000;
[[nodiscard]] int64_t yield_budget_ns() noexcept;

// Largest operation a wait yields for: the messages of small collectives (a recursive doubling's
// data with its call descriptor stays far below it). Larger transfers wait as the Context says.
constexpr size_t kYieldWaitMaxBytes = 64 * 1024;

// Whether waits of a Communicator over `context` yield first: kAuto resolved to spin-then-block
// (ranks outnumber the CPUs, TCP only) and a budget is set.
[[nodiscard]] bool yield_first(const transport::Context& context) noexcept;

// Polls `context` until `request` is done, yielding the CPU after every poll that leaves it
// pending, for at most `budget_ns`, until `deadline`, or until `guard` starts a hold. True when
// the request is done; false leaves the rest of the wait (and any error) to Context::wait.
bool yield_until_done(transport::Context& context, const transport::Request& request,
                      Deadline deadline, int64_t budget_ns, YieldGuard& guard);

}  // namespace myelin::collectives::internal
