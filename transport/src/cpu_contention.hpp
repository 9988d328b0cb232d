// transport/src/cpu_contention.hpp — whether busy polling is costing this thread its CPU, for
// ProgressMode::kAuto (not public API).
//
// kAuto busy-polls when this node's ranks do not outnumber its CPUs. That count alone ignores
// other work on the host: with the CPUs shared by other runnable processes a busy-polling rank
// spins out time slices that its peer needs, and a call that takes microseconds on a quiet host
// takes milliseconds (measured on a 2-vCPU VM with three busy processes beside two TCP ranks:
// 1 MiB allreduce 20-23 ms busy polling against 0.9-1.4 ms blocking: the kernel's loopback
// delivery needs CPU time too). So a Context whose only backend is TCP and whose kAuto resolved
// to busy polling watches what the kernel says about its own waiting thread
// (/proc/self/task/<tid>/schedstat: time on a CPU, time runnable but waiting for one) and blocks,
// as on an oversubscribed node, while that wait is large:
//
//   contended sample  an interval of at least kMinSampleNs in which the thread was runnable
//                     (on a CPU or waiting for one) and waited for a CPU in at least
//                     1/kContendedShare of that time;
//   stop spinning     after kFirstWindow contended samples in a row, for a hold time (first
//                     kMinHoldNs, or kBusyHoldNs when the host has more runnable threads than
//                     CPUs at the last of them: /proc/loadavg); samples within kStartupGraceNs
//                     of the first one never count as contended;
//   spin again        when the hold has passed: a probe. kWindow uncontended samples in a row
//                     confirm it (the hold goes back to kMinHoldNs); kWindow contended ones end it
//                     and the next hold is kHoldGrowth times as long, up to kMaxHoldNs.
//
// So a host whose other work runs at a lower priority (it barely delays this thread) keeps busy
// polling, one whose other work takes a fair share of the CPUs stops it within a few samples, and
// a host that quietens down gets it back within kMaxHoldNs; under lasting load the probes cost a
// few contended samples per hold. The samples are taken at most once per kSamplePeriodNs, at
// the start of a wait and every few polls of a spinning one: a pread of about 1-2 us.
//
// Why the first decision waits longer and holds briefly: ranks that have just started often run
// on one CPU together (a forked process starts beside its parent), each spinning through the
// other's time slices and so "contended" by half, until the scheduler's load balancing parts
// them: in 20-40 ms as traced on a 2-vCPU VM at load 7, longer while other work keeps the other
// CPUs busy. Spinning is what parts them (two always-runnable threads on one CPU are what the
// balancer moves); blocking keeps them together, since a loopback wake-up is a synchronous one
// and the woken rank is placed beside its waker. A hold decided then (the first was 100 ms after
// three samples) kept whole short runs blocking (4 KiB allreduce 17.7 us against 7.8 us busy).
// So the first kStartupGraceNs of samples say nothing, contention must last kFirstWindow samples
// to start a hold, and the first hold is short; lasting load is held off by holds that grow
// kHoldGrowth-fold per failed probe (kMaxHoldNs after four of them; doubling from 100 ms took
// five). The price: under lasting load, busy polling goes on for about the grace and the first
// window (150 ms) once per Context, and for the first window after each probe that found room.
// Where the window ends with other work runnable beside the ranks (the host's runnable count,
// this thread included, above its CPUs), the first hold is kBusyHoldNs, where two failed probes
// would have taken it: in a short run (2 ranks, 1 MiB, 110 calls, one busy process beside them)
// holds of 20 and 80 ms otherwise alternated with probes that spun about 40 ms each (traced: 81
// of the 188 ms after the first hold spun). Nothing ends a hold early: an idle CPU in kWindow
// samples in a row did, and under a normal-priority build beside the ranks (compilers that start
// and exit) it ended the long holds in the gaps between compilers, each time for a probe's
// window of spinning (in-place calls 2.1 ms against 1.3 ms without the long hold).
//
// The grace ignores the runnable count: on a host loaded by low-priority work (builds at nice
// 19) the count is always above the CPUs, so it does not tell ranks that share a CPU with each
// other from other work; counting contended samples there when the count was high held short
// runs that spinning would have won.
//
// Limits: it sees only this thread's waiting for a CPU; the runnable count is the host's, so it
// is used only where the thread may run on every online CPU (not in a cpuset or affinity mask
// that holds some of them), as that was at the watch's first sample: a mask set later is not
// seen. A busy-polling peer that starves a kernel thread (softirq work, on a
// loopback connection) is not seen; the hypervisor's steal time is not seen. Without the
// schedstat file (a kernel without CONFIG_SCHED_INFO) it never stops spinning (the rule before
// it).
//
// Thread safety: none; a Context's waits run on one thread at a time.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <sys/types.h>

namespace myelin::transport::internal {

struct SchedStat {
  int64_t on_cpu_ns = 0;     // time the thread ran
  int64_t run_delay_ns = 0;  // time it was runnable but waited for a CPU
};

// Parses /proc/<pid>/task/<tid>/schedstat text ("1456186711 57838366 104\n"); false when the
// text does not have that shape.
bool parse_schedstat(std::string_view text, SchedStat* out) noexcept;

// The runnable-thread count of /proc/loadavg text ("0.52 0.58 0.59 3/467 12345\n": 3); -1 when
// the text does not have that shape.
int parse_loadavg_running(std::string_view text) noexcept;

// The host's runnable threads (/proc/loadavg, this one included) against its online CPUs.
enum class HostLoad {
  kUnknown,  // not read
  kIdleCpu,  // fewer runnable threads than CPUs: a CPU has nothing to run
  kFull,     // as many as CPUs
  kBusy,     // more: other work waits for a CPU beside this thread's peers
};
// What /proc/loadavg's runnable count says on a host with `online` CPUs, for a thread that may
// run on `usable` of them (its affinity mask and cpuset: usable_cpus()). The count is host-wide,
// so it says nothing of a subset's load (a Slurm job's cpuset, taskset): kUnknown unless the
// thread may use every online CPU.
HostLoad host_load(int running, int online, int usable) noexcept;

// The decision, from cumulative counters the caller feeds (no I/O): see the file comment.
class CpuContentionRule {
 public:
  static constexpr int kFirstWindow = 5;  // contended samples that stop spinning (no hold before)
  static constexpr int kWindow = 3;       // samples that end or confirm a probe
  static constexpr int kContendedShare = 4;                // waited >= 1/4 of the runnable time
  static constexpr int64_t kMinSampleNs = 2'000'000;       // runnable time a sample needs to count
  static constexpr int64_t kStartupGraceNs = 100'000'000;  // from the first sample
  static constexpr int64_t kMinHoldNs = 20'000'000;        // first hold: 20 ms
  static constexpr int64_t kHoldGrowth = 4;                // per probe that finds the CPU contended
  static constexpr int64_t kMaxHoldNs = 2'000'000'000;     // longest hold: 2 s
  // First hold when the window that starts it ends on a busy host (HostLoad::kBusy): lasting
  // load, not ranks settling, so it starts where two failed probes would have taken it.
  static constexpr int64_t kBusyHoldNs = kMinHoldNs * kHoldGrowth * kHoldGrowth;
  static_assert(kFirstWindow >= kWindow, "a first hold needs at least a probe's evidence");
  static_assert(kMinHoldNs * kHoldGrowth * kHoldGrowth * kHoldGrowth < kMaxHoldNs &&
                    kMinHoldNs * kHoldGrowth * kHoldGrowth * kHoldGrowth * kHoldGrowth >=
                        kMaxHoldNs,
                "four failed probes reach the longest hold");

  // Records the counters of the watched thread at `now_ns` (any monotonic clock, the same
  // throughout). Counters that went back (another thread's) restart the comparison. `host`: the
  // host's runnable threads at the sample against its CPUs (HostLoad). Returns spinning() after
  // it.
  bool add(int64_t now_ns, const SchedStat& counters, HostLoad host = HostLoad::kUnknown) noexcept;
  // Forgets the previous counters: the next add() is a new baseline (a different thread), and the
  // streaks of contended or clear samples start again.
  void rebase() noexcept { have_prev_ = false; }
  // Whether busy polling goes on (true until the first contended window).
  [[nodiscard]] bool spinning() const noexcept { return !holding_; }
  [[nodiscard]] int64_t hold_ns() const noexcept { return hold_ns_; }
  // The share of the last counted sample's runnable time spent waiting, in percent (-1: none).
  [[nodiscard]] int last_wait_percent() const noexcept { return last_wait_percent_; }

 private:
  SchedStat prev_{};
  bool have_prev_ = false;
  bool started_ = false;  // start_ns_ is set
  int64_t start_ns_ = 0;  // the first add(): the grace runs from here
  bool holding_ = false;  // not spinning until hold_until_ns_
  bool probing_ = false;  // spinning again after a hold, not confirmed yet
  int contended_ = 0;     // contended samples in a row
  int clear_ = 0;         // uncontended samples in a row
  int64_t hold_ns_ = kMinHoldNs;
  int64_t hold_until_ns_ = 0;
  int last_wait_percent_ = -1;
};

// CpuContentionRule fed from the calling thread's schedstat at most once per kSamplePeriodNs.
// Owns the file's fd (reopened when a different thread samples).
class CpuContentionWatch {
 public:
  static constexpr int64_t kSamplePeriodNs = 10'000'000;

  CpuContentionWatch() = default;
  ~CpuContentionWatch();
  CpuContentionWatch(const CpuContentionWatch&) = delete;
  CpuContentionWatch& operator=(const CpuContentionWatch&) = delete;

  // Whether a sample is due at `now_ns`.
  [[nodiscard]] bool due(int64_t now_ns) const noexcept { return now_ns >= next_ns_; }
  // Takes a sample when one is due; returns spinning() after it. A read that fails stops the
  // sampling for good (logged once), spinning.
  bool sample(int64_t now_ns);
  [[nodiscard]] bool spinning() const noexcept { return failed_ || rule_.spinning(); }
  // "waited for a CPU 61% of its runnable time" for logs and Context::progress_reason().
  [[nodiscard]] std::string describe() const;

 private:
  bool give_up(const char* what, int err);
  // The host's runnable threads against its CPUs from /proc/loadavg; kUnknown when it cannot be
  // read (then never tried again).
  HostLoad read_host_load();

  CpuContentionRule rule_;
  int fd_ = -1;
  pid_t tid_ = 0;  // the thread fd_ reads
  bool failed_ = false;
  int64_t next_ns_ = 0;
  // /proc/loadavg, read with every sample (-1: not opened; -2: unreadable or not used, not tried
  // again), and the host's online CPUs it is compared with.
  int loadavg_fd_ = -1;
  int online_cpus_ = 0;
  int usable_cpus_ = 0;  // usable_cpus(): the count is read only when it equals online_cpus_
};

}  // namespace myelin::transport::internal
