// Progress modes: names and parsing, the environment overlay, how kAuto resolves (by itself and
// through Context::set_local_ranks), every mode keeping a wait's deadline, and the poll-and-yield
// mode carrying a token around a ring of more processes than this machine has CPUs.
#include <gtest/gtest.h>

#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/context.hpp>

#include "test_util.hpp"

namespace myelin::transport::testing {
namespace {

constexpr ProgressMode kAllModes[] = {ProgressMode::kBusyPoll, ProgressMode::kSpinThenBlock,
                                      ProgressMode::kPollYield, ProgressMode::kAuto};

TEST(ProgressMode, NamesParseBack) {
  for (ProgressMode m : kAllModes) {
    auto parsed = parse_progress_mode(progress_mode_name(m));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, m);
  }
  EXPECT_EQ(progress_mode_name(ProgressMode::kPollYield), "yield");
  EXPECT_EQ(progress_mode_name(ProgressMode::kAuto), "auto");
  auto bad = parse_progress_mode("sleepy");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().to_string().find("yield"), std::string::npos) << bad.status();
}

TEST(ProgressMode, ValidateRejectsUnknownValuesAndNegativeRankCounts) {
  Options o;
  o.progress = static_cast<ProgressMode>(17);
  EXPECT_EQ(o.validate().code(), StatusCode::kInvalidArgument);
  o.progress = ProgressMode::kAuto;
  o.local_ranks = -1;
  EXPECT_EQ(o.validate().code(), StatusCode::kInvalidArgument);
  o.local_ranks = 0;
  EXPECT_TRUE(o.validate().ok());
}

TEST(ProgressMode, EnvironmentOverlay) {
  {
    ScopedEnv p("MYELIN_PROGRESS", "yield");
    ScopedEnv l("MYELIN_LOCAL_SIZE", "6");
    auto o = Options{}.with_env_overlay();
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->progress, ProgressMode::kPollYield);
    EXPECT_EQ(o->local_ranks, 6);
    Options given;
    given.local_ranks = 3;  // set by the program: the environment does not override it
    auto g = given.with_env_overlay();
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(g->local_ranks, 3);
  }
  {
    ScopedEnv l("MYELIN_LOCAL_SIZE", "many");
    EXPECT_EQ(Options{}.with_env_overlay().status().code(), StatusCode::kInvalidArgument);
  }
  {
    ScopedEnv p("MYELIN_PROGRESS", "auto");
    auto o = Options{}.with_env_overlay();
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->progress, ProgressMode::kAuto);
  }
}

TEST(ProgressMode, AutoYieldsOnlyWhenRanksOutnumberCpus) {
  std::string why;
  EXPECT_EQ(resolve_progress_mode(ProgressMode::kAuto, 0, 2, &why), ProgressMode::kBusyPoll);
  EXPECT_NE(why.find("unknown"), std::string::npos) << why;
  EXPECT_EQ(resolve_progress_mode(ProgressMode::kAuto, 2, 2, &why), ProgressMode::kBusyPoll);
  EXPECT_EQ(resolve_progress_mode(ProgressMode::kAuto, 3, 2, &why), ProgressMode::kPollYield);
  EXPECT_NE(why.find("3 ranks"), std::string::npos) << why;
  EXPECT_NE(why.find("2 CPUs"), std::string::npos) << why;
  EXPECT_EQ(resolve_progress_mode(ProgressMode::kAuto, 64, 64, nullptr), ProgressMode::kBusyPoll);
  // A Context with TCP alone blocks instead: its sockets wake it whatever the mode.
  EXPECT_EQ(resolve_progress_mode(ProgressMode::kAuto, 3, 2, &why, /*tcp_only=*/true),
            ProgressMode::kSpinThenBlock);
  EXPECT_NE(why.find("TCP only"), std::string::npos) << why;
  EXPECT_EQ(resolve_progress_mode(ProgressMode::kAuto, 2, 2, &why, true), ProgressMode::kBusyPoll);
  // Requested modes are never changed.
  for (ProgressMode m :
       {ProgressMode::kBusyPoll, ProgressMode::kSpinThenBlock, ProgressMode::kPollYield}) {
    EXPECT_EQ(resolve_progress_mode(m, 100, 2, &why), m);
    EXPECT_EQ(resolve_progress_mode(m, 1, 2, &why), m);
  }
  EXPECT_GE(usable_cpus(), 1);
}

// A thread bound to one CPU may use one: two ranks bound to the same CPU must not count the node's
// CPUs as theirs (a collectives Communicator tells ranks bound to a core each from ranks bound to
// one CPU together by the other ranks' masks: tests/collectives/auto_progress_test.cpp).
// Runs `body` in a child process bound to one CPU; its exit code (3: the binding failed), or -1
// when the child did not exit normally.
int exit_code_on_one_cpu(const std::function<int()>& body) {
  const pid_t child = fork();
  if (child < 0) return -1;
  if (child == 0) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu() >= 0 ? sched_getcpu() : 0, &one);
    if (sched_setaffinity(0, sizeof(one), &one) != 0) _exit(3);
    _exit(body());
  }
  int status = 0;
  if (waitpid(child, &status, 0) != child || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

TEST(ProgressMode, UsableCpusFollowsThisThreadsAffinity) {
  const int before = usable_cpus();
  if (before < 2) GTEST_SKIP() << "needs 2 or more CPUs for this process's cgroup, has " << before;
  EXPECT_EQ(exit_code_on_one_cpu([] { return usable_cpus() == 1 ? 0 : 1; }), 0)
      << "1: usable_cpus() ignored the child's one-CPU affinity; 3: sched_setaffinity failed";
}

// MYELIN_LOCAL_SIZE counts the node's ranks; a rank bound to one of the node's CPUs shares it
// with that many ranks spread evenly: 1 of a node with as many ranks as CPUs (so auto busy-polls
// ranks pinned to a CPU each), 2 of a node with twice as many; an unbound rank shares with all.
TEST(ProgressMode, NodeLocalSizeCountsTheRanksOnThisRanksCpus) {
  const int cpus = usable_cpus();
  if (cpus < 2) GTEST_SKIP() << "needs 2 or more CPUs for this process's cgroup, has " << cpus;
  const int code = exit_code_on_one_cpu([cpus] {
    const auto ranks = [](int node_ranks) {
      ::setenv("MYELIN_LOCAL_SIZE", std::to_string(node_ranks).c_str(), 1);
      auto o = Options{}.with_env_overlay();
      return o.ok() ? o->local_ranks : -1;
    };
    if (ranks(cpus) != 1) return 1;
    if (ranks(2 * cpus) != 2) return 2;
    return 0;
  });
  EXPECT_EQ(code, 0) << "1: one rank per CPU not counted 1; 2: two per CPU not counted 2; "
                        "3: sched_setaffinity failed";
  EXPECT_EQ(ranks_sharing_cpus(cpus + 1), cpus + 1);  // this process may use every CPU
}

TEST(ProgressMode, ContextResolvesAutoAndFollowsSetLocalRanks) {
  const int cpus = usable_cpus();
  // Over shared memory (where it opens): yield when oversubscribed.
  if (unusable_reason(Backend::kShm).empty()) {
    Options shm = options_for(Backend::kShm, "auto-shm");
    shm.progress = ProgressMode::kAuto;
    shm.local_ranks = cpus + 1;
    auto ctx = Context::create(shm);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    EXPECT_EQ((*ctx)->progress_mode(), ProgressMode::kPollYield) << (*ctx)->progress_reason();
    EXPECT_EQ((*ctx)->options().progress, ProgressMode::kAuto);
    EXPECT_EQ((*ctx)->set_local_ranks(1), ProgressMode::kBusyPoll);
    EXPECT_EQ((*ctx)->progress_mode(), ProgressMode::kBusyPoll);
    EXPECT_EQ((*ctx)->set_local_ranks(cpus * 2 + 1), ProgressMode::kPollYield);
    EXPECT_NE((*ctx)->progress_reason().find("yield"), std::string::npos);
  }
  // Over TCP alone: block when oversubscribed.
  Options o = options_for(Backend::kTcp, "auto-ctx");
  o.progress = ProgressMode::kAuto;
  o.local_ranks = cpus + 1;
  auto ctx = Context::create(o);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  EXPECT_EQ((*ctx)->progress_mode(), ProgressMode::kSpinThenBlock) << (*ctx)->progress_reason();
  EXPECT_EQ((*ctx)->set_local_ranks(1), ProgressMode::kBusyPoll);
  EXPECT_EQ((*ctx)->set_local_ranks(cpus * 2 + 1), ProgressMode::kSpinThenBlock);

  o.progress = ProgressMode::kSpinThenBlock;
  auto blocking = Context::create(o);
  ASSERT_TRUE(blocking.ok()) << blocking.status();
  EXPECT_EQ((*blocking)->progress_mode(), ProgressMode::kSpinThenBlock);
  EXPECT_EQ((*blocking)->set_local_ranks(cpus * 4), ProgressMode::kSpinThenBlock);
}

// A receive nobody answers times out at its deadline, not before and not long after, in every
// mode (yield: the deadline is read after each sched_yield).
class ProgressDeadline : public ::testing::TestWithParam<ProgressMode> {};

TEST_P(ProgressDeadline, UnansweredReceiveTimesOutAtTheDeadline) {
  Options base;
  base.progress = GetParam();
  base.local_ranks = usable_cpus() + 1;  // auto: yield
  base.timeout = std::chrono::seconds(20);
  auto pair = Pair::make(Backend::kTcp, base);
  ASSERT_TRUE(pair.ok()) << pair.status();
  char buf[64];
  Request r = pair->ab->recv(7, buf, sizeof(buf));
  const int64_t start = monotonic_ns();
  const Status s = pair->a->wait(r, Deadline::after(std::chrono::milliseconds(300)));
  const double ms = static_cast<double>(monotonic_ns() - start) / 1e6;
  EXPECT_EQ(s.code(), StatusCode::kTimeout) << s;
  EXPECT_GE(ms, 299.0);
  EXPECT_LT(ms, 300.0 + 1000.0);  // slack for a loaded 2-core machine
  // wait_all keeps it too.
  std::vector<Request> rs;
  rs.push_back(pair->ab->recv(8, buf, sizeof(buf)));
  const int64_t start_all = monotonic_ns();
  const Status sa = pair->a->wait_all(rs, Deadline::after(std::chrono::milliseconds(200)));
  const double ms_all = static_cast<double>(monotonic_ns() - start_all) / 1e6;
  EXPECT_EQ(sa.code(), StatusCode::kTimeout) << sa;
  EXPECT_GE(ms_all, 199.0);
  EXPECT_LT(ms_all, 200.0 + 1000.0);
}

// A deadline long past (Deadline::at_ns takes any time, the earliest included) ends a wait that
// nothing answers with a timeout at once in every mode. The wait runs in a child that an alarm
// ends should it never return (a check that subtracted from the deadline overflowed there and
// took it for one far ahead: busy-poll waits went on for good).
TEST_P(ProgressDeadline, DeadlineAtTheEarliestTimeEndsTheWait) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::alarm(20);
    Options base;
    base.progress = GetParam();
    base.local_ranks = usable_cpus() + 1;  // auto: yield
    base.timeout = std::chrono::seconds(20);
    auto pair = Pair::make(Backend::kTcp, base);
    if (!pair.ok()) ::_exit(2);
    char buf[64];
    Request r = pair->ab->recv(7, buf, sizeof(buf));
    const Status s = pair->a->wait(r, Deadline::at_ns(std::numeric_limits<int64_t>::min()));
    ::_exit(s.code() == StatusCode::kTimeout ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_FALSE(WIFSIGNALED(status)) << "the wait did not end (signal " << WTERMSIG(status) << ")";
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "2: no pair, 3: the wait ended without a timeout";
}

INSTANTIATE_TEST_SUITE_P(Modes, ProgressDeadline, ::testing::ValuesIn(kAllModes),
                         [](const auto& p) { return std::string(progress_mode_name(p.param)); });

// A token goes around a ring of 2 x CPUs + 1 processes 300 times, each rank waiting in the
// poll-and-yield mode, over TCP and over shared memory (where available). With more ranks than
// CPUs a rank that spun without yielding would hold the CPU its predecessor needs.
Status ring_rank(int rank, int n, Backend backend, const std::string& dir) {
  MYELIN_ASSIGN_OR_RETURN(auto store, FileStore::open(dir));
  Options o;
  o.backend = backend;
  o.listen_address = "127.0.0.1";
  o.progress = ProgressMode::kPollYield;
  o.timeout = std::chrono::seconds(30);
  o.name = "rank " + std::to_string(rank);
  MYELIN_ASSIGN_OR_RETURN(auto ctx, Context::create(o));
  MYELIN_RETURN_IF_ERROR(store->set("addr/" + std::to_string(rank), ctx->address()));
  const Deadline d = Deadline::after(std::chrono::seconds(30));
  MYELIN_ASSIGN_OR_RETURN(auto next_addr, store->get("addr/" + std::to_string((rank + 1) % n), d));
  MYELIN_ASSIGN_OR_RETURN(auto prev_addr,
                          store->get("addr/" + std::to_string((rank + n - 1) % n), d));
  MYELIN_ASSIGN_OR_RETURN(Endpoint * next, ctx->connect(next_addr, d));
  MYELIN_ASSIGN_OR_RETURN(Endpoint * prev, ctx->connect(prev_addr, d));
  uint64_t token = 0;
  for (uint64_t round = 0; round < 300; ++round) {
    if (rank != 0 || round > 0) {
      uint64_t got = 0;
      Request r = prev->recv(1, &got, sizeof(got));
      MYELIN_RETURN_IF_ERROR(ctx->wait(r, d));
      const uint64_t want = rank == 0 ? round * static_cast<uint64_t>(n) - 1
                                      : round * static_cast<uint64_t>(n) + rank - 1;
      if (got != want) return internal_error("rank ", rank, " got token ", got, ", want ", want);
      token = got + 1;
    }
    Request s = next->send(1, &token, sizeof(token));
    MYELIN_RETURN_IF_ERROR(ctx->wait(s, d));
  }
  if (rank == 0) {  // the last lap
    uint64_t got = 0;
    Request r = prev->recv(1, &got, sizeof(got));
    MYELIN_RETURN_IF_ERROR(ctx->wait(r, d));
    if (got != 300 * static_cast<uint64_t>(n) - 1) return internal_error("last token ", got);
  }
  // Let the last send leave before the Context goes (a peer may still be reading).
  MYELIN_RETURN_IF_ERROR(store->set("done/" + std::to_string(rank), std::string("1")));
  for (int r = 0; r < n; ++r) {
    MYELIN_RETURN_IF_ERROR(store->get("done/" + std::to_string(r), d).status());
  }
  return ok_status();
}

class YieldRing : public ::testing::TestWithParam<Backend> {};

TEST_P(YieldRing, TokenGoesAroundMoreRanksThanCpus) {
  if (const std::string why = unusable_reason(GetParam()); !why.empty()) {
    GTEST_SKIP() << backend_name(GetParam()) << " is not usable here: " << why;
  }
  const int n = 2 * usable_cpus() + 1;
  char tmpl[] = "/tmp/myelin-yield-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      const Status s = ring_rank(r, n, GetParam(), dir);
      if (!s.ok()) std::fprintf(stderr, "rank %d: %s\n", r, s.to_string().c_str());
      _exit(s.ok() ? 0 : 1);
    }
    ASSERT_GT(pid, 0);
    pids.push_back(pid);
  }
  const Deadline deadline = Deadline::after(std::chrono::seconds(90));
  std::vector<int> codes(pids.size(), -1);
  size_t left = pids.size();
  while (left > 0 && !deadline.expired()) {
    int status = 0;
    const pid_t done = waitpid(-1, &status, WNOHANG);
    if (done <= 0) {
      usleep(5000);  // polling children, bounded by the deadline
      continue;
    }
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] == done) {
        codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        --left;
      }
    }
  }
  for (size_t i = 0; i < pids.size(); ++i) {
    if (codes[i] == -1) {
      kill(pids[i], SIGKILL);
      waitpid(pids[i], nullptr, 0);
    }
    EXPECT_EQ(codes[i], 0) << "rank " << i;
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Backends, YieldRing, ::testing::Values(Backend::kTcp, Backend::kShm),
                         param_name);

}  // namespace
}  // namespace myelin::transport::testing
