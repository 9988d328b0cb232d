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
// 2 ms yielding against 0.2 ms blocking; OpenMPI, which yields on regardless, 6 ms). A YieldGuard
// watches how long each sched_yield() takes (the call alone, not the poll beside it) and stops
// the yielding for a hold (kMinHoldNs, growing kHoldGrowth-fold per probe that meets other work
// again, up to kMaxHoldNs), in which waits go straight to the Context's wait.
//
// The evidence is kLongYields yields of kLongYieldNs or more among the last kWindowYields. Traced
// on the 2-vCPU VM (4 ranks, 500 calls of 4 KiB): beside 2 busy loops every second yield lasted
// 1.4-4 ms (a busy loop's time slice) from the first call on; without them yields of 0.25-1.5 ms
// came alone and rarely (a rank's first yield while its peers still set up their connections,
// a peer's page faults or wake-ups), a few per 1000-8000 yields, and none of 1 ms or more within
// 8 yields of another. One such yield was enough to hold before (250 us, one yield): the first
// yields of a run held it off for 50 ms, most of a short run, which then waited like `block`
// (4 KiB: 73 us against 58 us without the guard, OpenMPI 61 us). Two long yields cost the
// collective two time slices per hold under lasting load.
//
// A probe is simply yielding again once a hold has passed. kClearYields short yields in a row
// confirm it (the next hold is short again); one long yield ends it with a longer hold (the hold
// before it followed other work that lasted; a second long yield per probe cost the hogged runs
// a time slice more per probe than the first rule). A probe that meets no evidence within
// kProbeSpanNs after its hold is over (calls that did not need to yield) is over as well: a long
// yield much later is new evidence, not a failed probe.
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
  static constexpr int64_t kLongYieldNs = 1'000'000;    // a yield this long ran other work
  static constexpr int kWindowYields = 8;               // the yields the evidence is taken from
  static constexpr int kLongYields = 2;                 // long ones among them that start a hold
  static constexpr int kClearYields = 64;               // short ones in a row that end a probe
  static constexpr int64_t kMinHoldNs = 50'000'000;     // first hold: 50 ms
  static constexpr int64_t kHoldGrowth = 4;             // per probe that meets other work
  static constexpr int64_t kMaxHoldNs = 2'000'000'000;  // longest hold: 2 s
  static constexpr int64_t kProbeSpanNs = 100'000'000;  // a probe's evidence, after its hold
  static_assert(kWindowYields >= 1 && kWindowYields <= 32, "the window is a 32-bit history");
  static_assert(kLongYields >= 1 && kLongYields <= kWindowYields, "evidence fits the window");
  static_assert(kClearYields >= 1, "a probe needs evidence to end");
  static_assert(kMinHoldNs > 0 && kMinHoldNs <= kMaxHoldNs, "holds grow from the first");

  // Whether waits may yield at `now_ns` (any monotonic clock, the same throughout): false during
  // a hold.
  [[nodiscard]] bool may_yield(int64_t now_ns) const noexcept { return now_ns >= hold_until_ns_; }
  // Records one yield that ended at `now_ns` and took `yield_ns`.
  void add(int64_t now_ns, int64_t yield_ns) noexcept;
  [[nodiscard]] int64_t hold_ns() const noexcept { return hold_ns_; }
  [[nodiscard]] int64_t hold_until_ns() const noexcept { return hold_until_ns_; }
  // Whether the last hold's probe is still open (neither confirmed nor over).
  [[nodiscard]] bool probing() const noexcept { return probing_; }
  // Yields recorded, of them long ones, and holds started, since construction.
  [[nodiscard]] uint64_t yields() const noexcept { return yields_; }
  [[nodiscard]] uint64_t long_yields() const noexcept { return long_yields_; }
  [[nodiscard]] uint64_t holds() const noexcept { return holds_; }

 private:
  uint64_t yields_ = 0;
  uint64_t long_yields_ = 0;
  uint64_t holds_ = 0;
  uint32_t recent_ = 0;   // the last kWindowYields yields, newest in bit 0: 1 = long
  int clear_ = 0;         // short yields in a row since the last hold
  bool probing_ = false;  // yielding again after a hold, not confirmed yet
  int64_t hold_ns_ = kMinHoldNs;
  int64_t hold_until_ns_ = 0;
};

// Budget of one yielding wait: kYieldBudgetNs, or MYELIN_COLL_YIELD_US (microseconds, 0 = off;
// read once; an invalid value is logged and ignored).
constexpr int64_t kYieldBudgetNs = 20'000'000;
[[nodiscard]] int64_t yield_budget_ns() noexcept;

// Largest collective (bytes of one rank's data) whose waits yield: small collectives (a recursive
// doubling's data with its call descriptor stays far below it). The bound is the call's, not a
// message's: the small segments of a large collective wait as the Context says, like the rest of
// its transfers.
constexpr size_t kYieldWaitMaxBytes = 64 * 1024;

// Whether waits of a Communicator over `context` yield first: kAuto resolved to spin-then-block
// (ranks outnumber the CPUs, TCP only) and a budget is set.
[[nodiscard]] bool yield_first(const transport::Context& context) noexcept;

// Polls `context` until `request` is done, yielding the CPU after every poll that leaves it
// pending (and telling `guard` how long each yield took), for at most `budget_ns`, until
// `deadline`, or until `guard` starts a hold. True when the request is done; false leaves the rest
// of the wait (and any error) to Context::wait.
bool yield_until_done(transport::Context& context, const transport::Request& request,
                      Deadline deadline, int64_t budget_ns, YieldGuard& guard);

}  // namespace myelin::collectives::internal
