// ProgressMode::kAuto on a host shared with other work: the rule that turns busy polling into
// blocking while spinning costs the thread its CPU (transport/src/cpu_contention.hpp), fed with
// made-up counters, and two TCP ranks that must notice a host loaded by busy processes this test
// starts, and finish their allreduces there. And the yielding wait of small collectives on an
// oversubscribed node (collectives/src/yield_wait.hpp): its hold rule on made-up yield lengths,
// ranks that share a CPU yielding to each other, and busy processes on that CPU stopping it.
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cpu_contention.hpp"
#include "exchange.hpp"
#include "multiproc.hpp"
#include "yield_wait.hpp"

namespace myelin::collectives::testing {
namespace {

using internal::YieldGuard;
using transport::internal::CpuContentionRule;
using transport::internal::parse_loadavg_running;
using transport::internal::parse_schedstat;
using transport::internal::SchedStat;

TEST(CpuContentionParse, ReadsTheSchedstatCounters) {
  SchedStat st;
  ASSERT_TRUE(parse_schedstat("1456186711 57838366 104\n", &st));
  EXPECT_EQ(st.on_cpu_ns, 1456186711);
  EXPECT_EQ(st.run_delay_ns, 57838366);
  ASSERT_TRUE(parse_schedstat("0 0 0", &st));
  EXPECT_EQ(st.on_cpu_ns, 0);
  EXPECT_EQ(st.run_delay_ns, 0);
}

TEST(CpuContentionParse, RejectsOtherShapes) {
  SchedStat st{7, 9};
  for (const char* bad : {"", "\n", "12", "12 34", "12 34 ", "12 x 5", "-1 2 3", "1 2 3 junk",
                          "1234567890123456789 2 3", "1\n2 3"}) {
    EXPECT_FALSE(parse_schedstat(bad, &st)) << "'" << bad << "'";
  }
  EXPECT_EQ(st.on_cpu_ns, 7);  // untouched by a failed parse
  EXPECT_EQ(st.run_delay_ns, 9);
}

TEST(CpuContentionParse, ReadsTheRunnableCountOfLoadavg) {
  EXPECT_EQ(parse_loadavg_running("0.52 0.58 0.59 3/467 12345\n"), 3);
  EXPECT_EQ(parse_loadavg_running("10.68 5.72 2.36 13/142 11221\n"), 13);
  for (const char* bad : {"", "\n", "0.52 0.58 0.59", "0.52 0.58 0.59 ", "0.52 0.58 0.59 x/4 1",
                          "0.52 0.58 0.59 3 467", "0.52 0.58 3/467 12", "1 2 3 99999999999/4 5"}) {
    EXPECT_EQ(parse_loadavg_running(bad), -1) << "'" << bad << "'";
  }
}

// Drives a rule with samples 10 ms apart in which the thread ran `ran_ms` and waited `waited_ms`.
// Starts past the start-up grace: a baseline, then one idle interval as long as the grace.
struct Feeder {
  Feeder() {
    step(0, 0);
    step(0, 0, CpuContentionRule::kStartupGraceNs / 1'000'000);
  }
  CpuContentionRule rule;
  int64_t now = 0;
  SchedStat st{};
  bool step(int64_t ran_ms, int64_t waited_ms, int64_t interval_ms = 10) {
    now += interval_ms * 1'000'000;
    st.on_cpu_ns += ran_ms * 1'000'000;
    st.run_delay_ns += waited_ms * 1'000'000;
    return rule.add(now, st);
  }
  // One 10 ms sample read with the host's runnable count saying `load`.
  bool step_on(transport::internal::HostLoad load, int64_t ran_ms, int64_t waited_ms) {
    now += 10'000'000;
    st.on_cpu_ns += ran_ms * 1'000'000;
    st.run_delay_ns += waited_ms * 1'000'000;
    return rule.add(now, st, load);
  }
  bool steps(int n, int64_t ran_ms, int64_t waited_ms) {
    bool spinning = rule.spinning();
    for (int i = 0; i < n; ++i) spinning = step(ran_ms, waited_ms);
    return spinning;
  }
};

TEST(CpuContentionRule, AThreadThatKeepsItsCpuSpins) {
  Feeder f;
  EXPECT_TRUE(f.rule.spinning());  // before any sample: busy polling, as before the rule
  EXPECT_TRUE(f.steps(100, 10, 0));
  EXPECT_TRUE(f.steps(100, 9, 1));  // 10 % waiting: lower-priority work beside it
  EXPECT_EQ(f.rule.last_wait_percent(), 10);
}

TEST(CpuContentionRule, AWindowOfContendedSamplesStopsSpinning) {
  Feeder f;
  f.step(10, 0);  // baseline and one clear sample
  // Three busy processes beside two ranks on two CPUs: each runs 40 % of the time.
  EXPECT_TRUE(f.steps(CpuContentionRule::kFirstWindow - 1, 4, 6));
  EXPECT_FALSE(f.step(4, 6));
  EXPECT_EQ(f.rule.last_wait_percent(), 60);
  // Exactly a quarter counts as contended.
  Feeder q;
  q.step(8, 0);
  EXPECT_FALSE(q.steps(CpuContentionRule::kFirstWindow, 6, 2));
}

// Two ranks that start on one CPU spin through each other's time slices (each waits about half
// its runnable time) until the scheduler parts them, 20-40 ms later as traced: that must not
// start a hold, which would keep a short run blocking on a quiet host.
TEST(CpuContentionRule, RanksThatStartOnOneCpuKeepSpinning) {
  CpuContentionRule rule;
  SchedStat st{};
  int64_t now = 0;
  ASSERT_TRUE(rule.add(now, st));  // the first sample: the grace starts
  static_assert(CpuContentionRule::kStartupGraceNs / 10'000'000 > CpuContentionRule::kFirstWindow);
  while (now + 10'000'000 < CpuContentionRule::kStartupGraceNs) {  // more than a first window
    now += 10'000'000;
    st.on_cpu_ns += 5'000'000;
    st.run_delay_ns += 5'000'000;
    EXPECT_TRUE(rule.add(now, st)) << "at " << now / 1'000'000 << " ms";
  }
  EXPECT_EQ(rule.last_wait_percent(), 50);
  // After the grace, a stretch shorter than the first window does not hold either.
  Feeder f;
  EXPECT_TRUE(f.steps(CpuContentionRule::kFirstWindow - 1, 5, 5));
  EXPECT_TRUE(f.steps(100, 10, 0));  // parted: each has a CPU
  EXPECT_EQ(f.rule.last_wait_percent(), 0);
  // Longer than the first window it does hold, and briefly: a probe spins kMinHoldNs later.
  EXPECT_FALSE(f.steps(CpuContentionRule::kFirstWindow, 5, 5));
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kMinHoldNs);
  const int hold_samples = static_cast<int>(CpuContentionRule::kMinHoldNs / 10'000'000);
  EXPECT_FALSE(f.steps(hold_samples - 1, 2, 0));
  EXPECT_TRUE(f.step(2, 0));
  EXPECT_TRUE(f.steps(100, 10, 0));
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kMinHoldNs);
}

TEST(CpuContentionRule, HostLoadFromTheRunnableCount) {
  using transport::internal::host_load;
  using transport::internal::HostLoad;
  EXPECT_EQ(host_load(1, 2, 2), HostLoad::kIdleCpu);
  EXPECT_EQ(host_load(2, 2, 2), HostLoad::kFull);
  EXPECT_EQ(host_load(3, 2, 2), HostLoad::kBusy);
  EXPECT_EQ(host_load(-1, 2, 2), HostLoad::kUnknown);
  EXPECT_EQ(host_load(3, 0, 0), HostLoad::kUnknown);
  // Confined to some of the host's CPUs (a job's cpuset, an affinity mask): the host-wide count
  // says nothing of them, idle or busy.
  EXPECT_EQ(host_load(1, 16, 2), HostLoad::kUnknown);
  EXPECT_EQ(host_load(40, 16, 2), HostLoad::kUnknown);
}

// A first window that ends with more runnable threads than CPUs on the host (other work beside
// the ranks) starts a long hold (kBusyHoldNs): lasting load, whose short holds each cost a
// probe's window of spinning. Without that (or not known) the first hold stays short. Within the
// start-up grace the host's count changes nothing.
TEST(CpuContentionRule, AWindowOnABusyHostHoldsLong) {
  using transport::internal::HostLoad;
  Feeder f;
  f.step(10, 0);
  EXPECT_TRUE(f.steps(CpuContentionRule::kFirstWindow - 1, 4, 6));
  EXPECT_FALSE(f.step_on(HostLoad::kBusy, 4, 6));
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kBusyHoldNs);
  EXPECT_GT(CpuContentionRule::kBusyHoldNs, CpuContentionRule::kMinHoldNs);
  // The hold lasts while no CPU is idle.
  const int hold_samples = static_cast<int>(CpuContentionRule::kBusyHoldNs / 10'000'000);
  for (int i = 0; i < hold_samples - 1; ++i) {
    f.now += 10'000'000;
    f.st.on_cpu_ns += 2'000'000;
    ASSERT_FALSE(f.rule.add(f.now, f.st, i % 2 == 0 ? HostLoad::kBusy : HostLoad::kFull))
        << "sample " << i;
  }
  EXPECT_TRUE(f.step(2, 0));  // passed: a probe
  // A failed probe grows it from there.
  EXPECT_FALSE(f.steps(CpuContentionRule::kWindow, 4, 6));
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kBusyHoldNs * CpuContentionRule::kHoldGrowth);

  Feeder g;  // a full host (as many runnable threads as CPUs): the ranks themselves
  g.step(10, 0);
  EXPECT_TRUE(g.steps(CpuContentionRule::kFirstWindow - 1, 4, 6));
  EXPECT_FALSE(g.step_on(HostLoad::kFull, 4, 6));
  EXPECT_EQ(g.rule.hold_ns(), CpuContentionRule::kMinHoldNs);

  // Within the grace a busy host does not make samples count.
  CpuContentionRule rule;
  SchedStat st{};
  int64_t now = 0;
  ASSERT_TRUE(rule.add(now, st, HostLoad::kBusy));
  while (now + 10'000'000 < CpuContentionRule::kStartupGraceNs) {
    now += 10'000'000;
    st.on_cpu_ns += 4'000'000;
    st.run_delay_ns += 6'000'000;
    EXPECT_TRUE(rule.add(now, st, HostLoad::kBusy)) << "at " << now / 1'000'000 << " ms";
  }
}

// A long hold lasts its time whatever the host's count says meanwhile: samples that find a CPU
// with nothing to run are an instant's view, and load that comes and goes (a build's compilers)
// shows them between its bursts.
TEST(CpuContentionRule, ALongHoldLastsThroughIdleCpuSamples) {
  using transport::internal::HostLoad;
  Feeder f;
  f.step(10, 0);
  for (int i = 0; i < CpuContentionRule::kFirstWindow; ++i) {
    f.now += 10'000'000;
    f.st.on_cpu_ns += 4'000'000;
    f.st.run_delay_ns += 6'000'000;
    f.rule.add(f.now, f.st, HostLoad::kBusy);
  }
  ASSERT_FALSE(f.rule.spinning());
  ASSERT_EQ(f.rule.hold_ns(), CpuContentionRule::kBusyHoldNs);
  const int hold_samples = static_cast<int>(CpuContentionRule::kBusyHoldNs / 10'000'000);
  for (int i = 0; i < hold_samples - 1; ++i) {
    f.now += 10'000'000;
    f.st.on_cpu_ns += 2'000'000;
    ASSERT_FALSE(f.rule.add(f.now, f.st, HostLoad::kIdleCpu)) << "sample " << i;
  }
  EXPECT_TRUE(f.step(2, 0));  // the hold has passed: a probe
}

TEST(CpuContentionRule, ABurstDoesNotStopSpinning) {
  Feeder f;
  for (int i = 0; i < 60; ++i) {
    const bool contended = i % CpuContentionRule::kWindow != 0;  // never kWindow in a row
    EXPECT_TRUE(f.step(contended ? 4 : 10, contended ? 6 : 0)) << "sample " << i;
  }
}

TEST(CpuContentionRule, IdleIntervalsSayNothing) {
  Feeder f;
  // A thread that slept (waited in the kernel, not for a CPU) most of each interval: less than
  // kMinSampleNs runnable, however much of it was waiting.
  EXPECT_TRUE(f.steps(20, 0, 1));
  EXPECT_EQ(f.rule.last_wait_percent(), -1);
}

TEST(CpuContentionRule, HoldsThenProbesAndDoublesTheHoldWhileLoaded) {
  Feeder f;
  f.step(10, 0);
  ASSERT_FALSE(f.steps(CpuContentionRule::kFirstWindow, 4, 6));
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kMinHoldNs);
  // While holding, even clear samples keep it blocking until the hold has passed.
  const int hold_samples = static_cast<int>(CpuContentionRule::kMinHoldNs / 10'000'000);
  EXPECT_FALSE(f.steps(hold_samples - 1, 2, 0));
  EXPECT_TRUE(f.step(2, 0));  // the hold has passed: a probe spins again
  // Still loaded: a probe's window ends it, the next hold is kHoldGrowth times as long.
  EXPECT_TRUE(f.steps(CpuContentionRule::kWindow - 1, 4, 6));
  EXPECT_FALSE(f.step(4, 6));
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kHoldGrowth * CpuContentionRule::kMinHoldNs);
  // Holds grow to kMaxHoldNs and no further.
  for (int round = 0; round < 12; ++round) {
    while (!f.rule.spinning()) f.step(2, 0);
    ASSERT_FALSE(f.steps(CpuContentionRule::kWindow, 4, 6));
  }
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kMaxHoldNs);
}

TEST(CpuContentionRule, AProbeThatFindsRoomKeepsSpinningAndResetsTheHold) {
  Feeder f;
  f.step(10, 0);
  ASSERT_FALSE(f.steps(CpuContentionRule::kFirstWindow, 4, 6));
  while (!f.rule.spinning()) f.step(2, 0);
  for (int round = 0; round < 2; ++round) {  // failed probes: the hold grows twice
    ASSERT_FALSE(f.steps(CpuContentionRule::kWindow, 4, 6));
    while (!f.rule.spinning()) f.step(2, 0);
  }
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kHoldGrowth * CpuContentionRule::kHoldGrowth *
                                  CpuContentionRule::kMinHoldNs);
  EXPECT_TRUE(f.steps(CpuContentionRule::kWindow, 10, 0));  // the load went away
  EXPECT_EQ(f.rule.hold_ns(), CpuContentionRule::kMinHoldNs);
  EXPECT_TRUE(f.steps(50, 10, 1));
}

TEST(CpuContentionRule, CountersThatGoBackStartAgain) {
  Feeder f;
  f.step(10, 0);
  EXPECT_TRUE(f.steps(CpuContentionRule::kFirstWindow - 1, 4, 6));
  // Another thread's counters (lower): a new baseline, not a sample, and not a huge negative one.
  f.st = SchedStat{1'000, 1'000};
  EXPECT_TRUE(f.step(0, 0));
  EXPECT_TRUE(f.rule.spinning());
  EXPECT_TRUE(f.steps(CpuContentionRule::kFirstWindow - 1, 4, 6));
  EXPECT_FALSE(f.step(4, 6));
}

// Busy processes that keep every CPU of the host runnable-contended while they live; killed (and
// reaped) when this goes out of scope, and by the kernel should the test process die first.
class BusyHogs {
 public:
  explicit BusyHogs(int n) {
    const pid_t parent = getpid();
    for (int i = 0; i < n; ++i) {
      const pid_t pid = fork();
      if (pid == 0) {
        (void)prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(0);
        // Bounded even if nobody kills it: 300 s of spinning at most. Longer than the world's
        // limit (run_world reaps any child that exits, and ~BusyHogs must never signal a pid
        // that was reaped and may belong to another process by then).
        const Deadline end = Deadline::after(std::chrono::seconds(300));
        volatile uint64_t x = 0;
        while (!end.expired()) {
          for (int k = 0; k < 100000; ++k) x = x + 1;
        }
        _exit(0);
      }
      if (pid > 0) pids_.push_back(pid);
    }
  }
  ~BusyHogs() {
    for (pid_t p : pids_) ::kill(p, SIGKILL);
    for (pid_t p : pids_) (void)::waitpid(p, nullptr, 0);
  }
  BusyHogs(const BusyHogs&) = delete;
  BusyHogs& operator=(const BusyHogs&) = delete;
  [[nodiscard]] size_t count() const { return pids_.size(); }

 private:
  std::vector<pid_t> pids_;
};

// Pins this process (and so what it forks) to the first `n` CPUs of its affinity mask while in
// scope; restores the mask after. pinned() is how many it got.
class PinnedCpus {
 public:
  explicit PinnedCpus(int n) {
    if (sched_getaffinity(0, sizeof(saved_), &saved_) != 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c = 0; c < CPU_SETSIZE && pinned_ < n; ++c) {
      if (CPU_ISSET(c, &saved_)) {
        CPU_SET(c, &set);
        ++pinned_;
      }
    }
    if (sched_setaffinity(0, sizeof(set), &set) != 0) pinned_ = 0;
  }
  ~PinnedCpus() {
    if (pinned_ > 0) (void)sched_setaffinity(0, sizeof(saved_), &saved_);
  }
  PinnedCpus(const PinnedCpus&) = delete;
  PinnedCpus& operator=(const PinnedCpus&) = delete;
  [[nodiscard]] int pinned() const { return pinned_; }

 private:
  cpu_set_t saved_{};
  int pinned_ = 0;
};

// Two ranks over TCP in auto (busy polling: 2 ranks do not outnumber the node's CPUs) pinned to
// two CPUs with four busy processes of their own priority. The ranks must see their CPU contended
// (their Context says so) and every allreduce must finish with the right sum well within the
// deadline. (Pinning makes the contention the same on any host: both ranks share the two CPUs,
// so auto still resolves to busy polling.)
TEST(CollectivesAutoLoaded, TwoTcpRanksBlockWhileTheirCpusAreContended) {
  if (2 > transport::usable_cpus()) GTEST_SKIP() << "needs 2 usable CPUs for busy polling";
  if (!std::ifstream("/proc/self/task/" + std::to_string(gettid()) + "/schedstat")) {
    GTEST_SKIP() << "no schedstat (kernel without CONFIG_SCHED_INFO): contention is not watched";
  }
  PinnedCpus pin(2);
  if (pin.pinned() < 2) {
    GTEST_SKIP() << "needs 2 CPUs in this process's affinity mask, has " << pin.pinned();
  }
  BusyHogs hogs(4);
  ASSERT_EQ(hogs.count(), 4u);

  WorldSpec s;
  s.ranks = 2;
  s.backend = transport::Backend::kTcp;
  s.progress = transport::ProgressMode::kAuto;
  s.timeout = std::chrono::seconds(60);
  const auto out = run_world(
      s,
      [](RankCtx& rc) -> Status {
        transport::Context& ctx = rc.comm->context();
        if (ctx.progress_mode() != transport::ProgressMode::kBusyPoll) {
          return internal_error("expected auto to resolve to busy: ", ctx.progress_reason());
        }
        // Calls go on until both ranks have seen their CPU contended, for at least 200 ms
        // (so that the watch has taken its samples) and at most 30 s (then the test fails).
        const int64_t start = monotonic_ns();
        bool seen = false;  // a probe after a hold spins again, and says so
        std::vector<float> v(1024), r(1024);
        for (int call = 0;; ++call) {
          for (size_t i = 0; i < v.size(); ++i) {
            v[i] = static_cast<float>((rc.rank + 1) * (call % 7 + 1)) + static_cast<float>(i % 5);
          }
          MYELIN_RETURN_IF_ERROR(
              allreduce(*rc.comm, v.data(), r.data(), v.size(), DataType::kF32, ReduceOp::kSum)
                  .status());
          for (size_t i = 0; i < r.size(); ++i) {
            const float want =
                static_cast<float>(3 * (call % 7 + 1)) + 2 * static_cast<float>(i % 5);
            if (r[i] != want) {
              return internal_error("call ", call, " element ", i, ": ", r[i], ", want ", want);
            }
          }
          const int64_t elapsed = monotonic_ns() - start;
          seen = seen || ctx.progress_reason().find("CPU contended") != std::string::npos;
          int32_t stop = (seen && elapsed >= 200'000'000) || elapsed >= 30'000'000'000 ? 1 : 0;
          int32_t all_stop = 0;
          MYELIN_RETURN_IF_ERROR(
              allreduce(*rc.comm, &stop, &all_stop, 1, DataType::kI32, ReduceOp::kMin).status());
          if (all_stop == 0) continue;
          if (!seen) {
            return internal_error(
                "after ", call + 1, " calls in ", elapsed / 1'000'000,
                " ms the CPU never counted as contended: ", ctx.progress_reason());
          }
          return ok_status();
        }
      },
      {}, std::chrono::seconds(120));
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

// The CPUs in this process's affinity mask, at most `n`.
std::vector<int> first_cpus(int n) {
  std::vector<int> out;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE && static_cast<int>(out.size()) < n; ++c) {
    if (CPU_ISSET(c, &set)) out.push_back(c);
  }
  return out;
}

// Each rank checks the mode its Context resolved auto to, then runs one allreduce.
RankBody expect_mode(transport::ProgressMode want, const char* counts) {
  return [want, counts](RankCtx& rc) -> Status {
    const transport::Context& ctx = rc.comm->context();
    if (ctx.progress_mode() != want || ctx.progress_reason().find(counts) == std::string::npos) {
      return internal_error("expected ", transport::progress_mode_name(want), " (", counts,
                            "), got ", ctx.progress_reason());
    }
    int32_t v = rc.rank + 1;
    int32_t sum = 0;
    MYELIN_RETURN_IF_ERROR(
        allreduce(*rc.comm, &v, &sum, 1, DataType::kI32, ReduceOp::kSum).status());
    if (sum != 3) return internal_error("sum ", sum, ", want 3");
    return ok_status();
  };
}

// Two ranks bound to one CPU (taskset on the launcher) compete for it: auto must not busy-poll
// there (each spinning rank would hold the CPU the other needs for a whole time slice).
TEST(CollectivesAutoPinned, TwoRanksBoundToOneCpuDoNotBusyPoll) {
  const std::vector<int> cpus = first_cpus(1);
  ASSERT_EQ(cpus.size(), 1u);
  for (const transport::Backend b : {transport::Backend::kTcp, transport::Backend::kShm}) {
    WorldSpec s;
    s.ranks = 2;
    s.backend = b;
    s.progress = transport::ProgressMode::kAuto;
    s.cpu_of_rank = {cpus[0], cpus[0]};
    const auto want = b == transport::Backend::kTcp ? transport::ProgressMode::kSpinThenBlock
                                                    : transport::ProgressMode::kPollYield;
    const auto out = run_world(s, expect_mode(want, "2 ranks on 1 CPUs"));
    EXPECT_TRUE(out.all_ok()) << transport::backend_name(b) << ":" << out.summary();
  }
}

// Two ranks bound to a CPU each (srun --cpu-bind, mpirun's binding) do not compete: each sees one
// CPU and itself alone on it, and busy-polls.
TEST(CollectivesAutoPinned, RanksBoundToCpusOfTheirOwnBusyPoll) {
  const std::vector<int> cpus = first_cpus(2);
  if (cpus.size() < 2) {
    GTEST_SKIP() << "needs 2 CPUs in this process's affinity mask, has " << cpus.size();
  }
  for (const transport::Backend b : {transport::Backend::kTcp, transport::Backend::kShm}) {
    WorldSpec s;
    s.ranks = 2;
    s.backend = b;
    s.progress = transport::ProgressMode::kAuto;
    s.cpu_of_rank = {cpus[0], cpus[1]};
    const auto out =
        run_world(s, expect_mode(transport::ProgressMode::kBusyPoll, "1 ranks on 1 CPUs"));
    EXPECT_TRUE(out.all_ok()) << transport::backend_name(b) << ":" << out.summary();
  }
}

// A peer's node entry that is not "<node id>\n<CPU list>" fails create() with a clear error that
// names the rank, whatever the list's defect.
TEST(CollectivesAutoPinned, AMalformedCpuListFailsCreation) {
  const std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  int i = 0;
  for (const char* bad : {"host-b", "host-b\n0-x", "host-b\n3-1", "host-b\n0,", "host-b\n,0",
                          "host-b\n99999999", "host-b\n0;1"}) {
    DirStore store(dir + "/store" + std::to_string(i++));
    ASSERT_TRUE(store.set("myelin/node/1", std::string_view(bad)).ok());
    transport::Options o;
    o.backend = transport::Backend::kTcp;
    o.listen_address = "127.0.0.1";
    auto ctx = transport::Context::create(o);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    CommunicatorOptions co;
    co.rank = 0;
    co.size = 2;
    co.context = ctx->get();
    co.store = &store;
    co.timeout = std::chrono::seconds(5);
    auto comm = Communicator::create(co);
    ASSERT_FALSE(comm.ok()) << "'" << bad << "' was accepted";
    EXPECT_EQ(comm.status().code(), StatusCode::kInvalidArgument) << comm.status();
    EXPECT_NE(comm.status().to_string().find("rank 1"), std::string::npos) << comm.status();
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

// ---- the yielding wait of small collectives (collectives/src/yield_wait.hpp) ----

// Feeds a guard yields of given lengths back to back and reports may_yield() after them.
struct YieldFeeder {
  YieldGuard guard;
  int64_t now = 0;
  bool yield(int64_t ns) {
    now += ns;
    guard.add(now, ns);
    return guard.may_yield(now);
  }
  bool shorts(int n) {
    bool may = guard.may_yield(now);
    for (int i = 0; i < n; ++i) may = yield(10'000);
    return may;
  }
  // Lets time pass without yields (waits that went straight to the Context).
  bool pass(int64_t ns) {
    now += ns;
    return guard.may_yield(now);
  }
  // Long yields that start a first hold, then two probes that each fail on a long yield and are
  // held in turn, until each hold ends.
  void hold_and_fail_two_probes() {
    EXPECT_TRUE(yield(2'000'000));
    for (int i = 0; i < 3; ++i) {
      EXPECT_FALSE(yield(2'000'000));
      pass(guard.hold_until_ns() - now);
    }
  }
};

TEST(YieldGuard, RanksThatYieldToEachOtherKeepYielding) {
  YieldFeeder f;
  EXPECT_TRUE(f.guard.may_yield(0));
  EXPECT_TRUE(f.shorts(10000));
  EXPECT_TRUE(f.yield(YieldGuard::kLongYieldNs - 1));  // just short of long
  EXPECT_TRUE(f.yield(YieldGuard::kLongYieldNs - 1));
  EXPECT_TRUE(f.shorts(10000));
  EXPECT_EQ(f.guard.holds(), 0u);
  EXPECT_EQ(f.guard.long_yields(), 0u);
  EXPECT_EQ(f.guard.yields(), 20002u);
  EXPECT_EQ(f.guard.hold_until_ns(), 0);
}

TEST(YieldGuard, LongYieldsFarApartDoNotHold) {
  // A rank's first yield while its peers set up, a peer's page faults: one long yield now and
  // then, with a window's worth of short ones between.
  YieldFeeder f;
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(f.yield(YieldGuard::kLongYieldNs * 3)) << "long yield " << i;
    ASSERT_TRUE(f.shorts(YieldGuard::kWindowYields - 1)) << "after long yield " << i;
  }
  EXPECT_EQ(f.guard.long_yields(), 100u);
  EXPECT_EQ(f.guard.holds(), 0u);
}

TEST(YieldGuard, LongYieldsWithinAWindowHold) {
  YieldFeeder f;
  f.shorts(5);
  EXPECT_TRUE(f.yield(YieldGuard::kLongYieldNs));  // exactly the threshold counts as long
  EXPECT_TRUE(f.shorts(YieldGuard::kWindowYields - YieldGuard::kLongYields));
  EXPECT_FALSE(f.yield(YieldGuard::kLongYieldNs));  // the second within the window
  EXPECT_EQ(f.guard.holds(), 1u);
  EXPECT_EQ(f.guard.long_yields(), 2u);
  EXPECT_EQ(f.guard.hold_ns(), YieldGuard::kMinHoldNs);
  EXPECT_EQ(f.guard.hold_until_ns(), f.now + YieldGuard::kMinHoldNs);
  EXPECT_FALSE(f.pass(YieldGuard::kMinHoldNs - 1));
  EXPECT_TRUE(f.pass(1));  // the hold has passed: a probe yields again
  EXPECT_TRUE(f.guard.probing());
  // The probe follows lasting other work: one long yield ends it.
  EXPECT_FALSE(f.yield(YieldGuard::kLongYieldNs));
  EXPECT_EQ(f.guard.holds(), 2u);
  EXPECT_EQ(f.guard.hold_ns(), YieldGuard::kMinHoldNs * YieldGuard::kHoldGrowth);
}

TEST(YieldGuard, ProbesThatMeetOtherWorkHoldLongerUpToTheMaximum) {
  YieldFeeder f;
  ASSERT_TRUE(f.yield(3'000'000));  // time slices of other work
  ASSERT_FALSE(f.yield(3'000'000));
  int64_t want = YieldGuard::kMinHoldNs;
  for (int probe = 0; probe < 12; ++probe) {
    EXPECT_EQ(f.guard.hold_ns(), want) << "probe " << probe;
    f.pass(f.guard.hold_until_ns() - f.now);
    ASSERT_TRUE(f.guard.may_yield(f.now));
    // Short yields fewer than a probe's window, then a long one: the probe failed.
    EXPECT_TRUE(f.shorts(YieldGuard::kClearYields - 1));
    ASSERT_FALSE(f.yield(2'000'000));
    want = std::min(YieldGuard::kMaxHoldNs, want * YieldGuard::kHoldGrowth);
  }
  EXPECT_EQ(f.guard.hold_ns(), YieldGuard::kMaxHoldNs);
  EXPECT_EQ(f.guard.holds(), 13u);
}

TEST(YieldGuard, AProbeThatFindsTheCpuToTheRanksMakesTheNextHoldShort) {
  YieldFeeder f;
  f.hold_and_fail_two_probes();
  ASSERT_EQ(f.guard.hold_ns(),
            YieldGuard::kHoldGrowth * YieldGuard::kHoldGrowth * YieldGuard::kMinHoldNs);
  EXPECT_TRUE(f.shorts(YieldGuard::kClearYields));  // confirmed
  EXPECT_FALSE(f.guard.probing());
  EXPECT_TRUE(f.yield(2'000'000));
  EXPECT_FALSE(f.yield(2'000'000));
  EXPECT_EQ(f.guard.hold_ns(), YieldGuard::kMinHoldNs);
}

TEST(YieldGuard, AProbeWithoutYieldsEndsAfterItsSpan) {
  // After a long hold, calls that need no yield for a while: later long yields are new evidence,
  // and the hold they start is the first, shortest one.
  YieldFeeder f;
  f.hold_and_fail_two_probes();
  ASSERT_TRUE(f.guard.probing());
  ASSERT_GT(f.guard.hold_ns(), YieldGuard::kMinHoldNs);
  f.pass(YieldGuard::kProbeSpanNs + 1);
  EXPECT_TRUE(f.yield(2'000'000));
  EXPECT_FALSE(f.guard.probing());
  EXPECT_FALSE(f.yield(2'000'000));
  EXPECT_EQ(f.guard.hold_ns(), YieldGuard::kMinHoldNs);
  EXPECT_EQ(f.guard.holds(), 4u);
}

// Runs 4 KiB f32 allreduces checked against the sum until `enough(guard, elapsed)` holds on every
// rank (or 30 s pass: an error naming what the guard saw).
Status yielding_calls(RankCtx& rc, const std::function<bool(const YieldGuard&, int64_t)>& enough,
                      const char* want) {
  transport::Context& ctx = rc.comm->context();
  if (!internal::yield_first(ctx)) {
    return internal_error("expected small waits to yield first: ", ctx.progress_reason());
  }
  const YieldGuard& guard = rc.comm->pending_pool().yield_guard;
  const int64_t start = monotonic_ns();
  std::vector<float> v(1024), r(1024);
  for (int call = 0;; ++call) {
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = static_cast<float>((rc.rank + 1) * (call % 5 + 1)) + static_cast<float>(i % 3);
    }
    MYELIN_RETURN_IF_ERROR(
        allreduce(*rc.comm, v.data(), r.data(), v.size(), DataType::kF32, ReduceOp::kSum).status());
    for (size_t i = 0; i < r.size(); ++i) {
      const float want_sum = static_cast<float>(3 * (call % 5 + 1)) + 2 * static_cast<float>(i % 3);
      if (r[i] != want_sum) {
        return internal_error("call ", call, " element ", i, ": ", r[i], ", want ", want_sum);
      }
    }
    const int64_t elapsed = monotonic_ns() - start;
    int32_t stop = enough(guard, elapsed) || elapsed >= 30'000'000'000 ? 1 : 0;
    int32_t all_stop = 0;
    MYELIN_RETURN_IF_ERROR(
        allreduce(*rc.comm, &stop, &all_stop, 1, DataType::kI32, ReduceOp::kMin).status());
    if (all_stop == 0) continue;
    if (!enough(guard, elapsed)) {
      return internal_error("after ", call + 1, " calls in ", elapsed / 1'000'000,
                            " ms: ", guard.yields(), " yields, ", guard.holds(),
                            " holds; expected ", want);
    }
    return ok_status();
  }
}

// Two ranks in `auto` progress mode, both bound to the first CPU this process may run on.
WorldSpec two_auto_ranks_on_one_cpu() {
  const std::vector<int> cpus = first_cpus(1);
  EXPECT_EQ(cpus.size(), 1u);
  const int cpu = cpus.empty() ? 0 : cpus[0];
  WorldSpec s;
  s.ranks = 2;
  s.progress = transport::ProgressMode::kAuto;
  s.cpu_of_rank = {cpu, cpu};
  return s;
}

// Two TCP ranks bound to one CPU: auto resolves to spin-then-block, and a small collective's waits
// yield the CPU to the other rank before they sleep.
TEST(CollectivesAutoYield, TwoTcpRanksOnOneCpuYieldToEachOther) {
  if (internal::yield_budget_ns() == 0) GTEST_SKIP() << "MYELIN_COLL_YIELD_US=0 turns it off";
  WorldSpec s = two_auto_ranks_on_one_cpu();
  const auto out = run_world(s, [](RankCtx& rc) {
    return yielding_calls(
        rc,
        [](const YieldGuard& g, int64_t elapsed) {
          return g.yields() > 0 && elapsed >= 100'000'000;
        },
        "some yields");
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

// The same two ranks with two busy processes of their own priority on their CPU: a yield hands the
// CPU to one of them for a time slice, and the ranks must stop yielding (start a hold), still
// computing every sum right.
TEST(CollectivesAutoYield, BusyProcessesOnTheirCpuStopTheYielding) {
  if (internal::yield_budget_ns() == 0) GTEST_SKIP() << "MYELIN_COLL_YIELD_US=0 turns it off";
  std::optional<BusyHogs> hogs;
  {
    PinnedCpus pin(1);  // the hogs inherit the mask: they share the ranks' CPU
    ASSERT_EQ(pin.pinned(), 1);
    hogs.emplace(2);
  }
  ASSERT_EQ(hogs->count(), 2u);
  WorldSpec s = two_auto_ranks_on_one_cpu();
  s.timeout = std::chrono::seconds(60);
  const auto out = run_world(
      s,
      [](RankCtx& rc) {
        return yielding_calls(
            rc, [](const YieldGuard& g, int64_t) { return g.holds() > 0; }, "a hold");
      },
      {}, std::chrono::seconds(120));
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

// The bound of the yielding wait is the call's size: a large allreduce cut in small segments waits
// as the Context says (here: spin, then sleep), not by yielding, on the same two ranks.
TEST(CollectivesAutoYield, SmallSegmentsOfALargeCallDoNotYield) {
  if (internal::yield_budget_ns() == 0) GTEST_SKIP() << "MYELIN_COLL_YIELD_US=0 turns it off";
  WorldSpec s = two_auto_ranks_on_one_cpu();
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    transport::Context& ctx = rc.comm->context();
    if (!internal::yield_first(ctx)) {
      return internal_error("expected small waits to yield first: ", ctx.progress_reason());
    }
    const size_t count = 4 * internal::kYieldWaitMaxBytes / sizeof(float);  // 256 KiB
    std::vector<float> v(count), r(count);
    Options o;
    o.algorithm = Algorithm::kRing;
    o.segment_size = 4096;  // every message far below the bound
    for (int call = 0; call < 20; ++call) {
      for (size_t i = 0; i < count; ++i) {
        v[i] = static_cast<float>((rc.rank + 1) * (call + 1)) + static_cast<float>(i % 7);
      }
      MYELIN_RETURN_IF_ERROR(
          allreduce(*rc.comm, v.data(), r.data(), count, DataType::kF32, ReduceOp::kSum, o)
              .status());
      for (size_t i = 0; i < count; ++i) {
        const float want = static_cast<float>(3 * (call + 1)) + 2 * static_cast<float>(i % 7);
        if (r[i] != want) return internal_error("call ", call, " element ", i, ": ", r[i]);
      }
    }
    const YieldGuard& guard = rc.comm->pending_pool().yield_guard;
    if (guard.yields() != 0) {
      return internal_error(guard.yields(), " yields in waits of a 256 KiB allreduce");
    }
    // Small calls on the same Communicator still yield (the bound is not the mode). Both ranks
    // make the same number of calls.
    int32_t one = 1, sum = 0;
    for (int call = 0; call < 200; ++call) {
      MYELIN_RETURN_IF_ERROR(
          allreduce(*rc.comm, &one, &sum, 1, DataType::kI32, ReduceOp::kSum).status());
      if (sum != 2) return internal_error("small call ", call, ": sum ", sum);
    }
    if (guard.yields() == 0) return internal_error("200 small calls never yielded");
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

}  // namespace
}  // namespace myelin::collectives::testing
