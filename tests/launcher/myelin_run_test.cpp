// myelin-run as a user drives it: real processes, real signals, real exit codes.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <myelin/core/clock.hpp>

namespace {

// Pauses a polling loop for about ms milliseconds.
void pause_ms(int ms) {
  ::poll(nullptr, 0, ms);
}

struct Outcome {
  int rc = -1;
  std::string out;
};

Outcome run(const std::string& args) {
  const std::string cmd = std::string(MYELIN_RUN_PATH) + " " + args + " 2>&1";
  Outcome r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = ::pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

TEST(MyelinRun, SetsTheBootstrapEnvironmentAndPrefixesOutput) {
  Outcome r =
      run("-n 3 sh -c 'echo rank=$MYELIN_RANK size=$MYELIN_SIZE local=$MYELIN_LOCAL_RANK "
          "store=${MYELIN_STORE%%/myelin-run*}'");
  EXPECT_EQ(r.rc, 0) << r.out;
  for (int i = 0; i < 3; ++i) {
    const std::string line = "[" + std::to_string(i) + "] rank=" + std::to_string(i) +
                             " size=3 local=" + std::to_string(i) + " store=file:///tmp";
    EXPECT_NE(r.out.find(line), std::string::npos) << r.out;
  }
}

TEST(MyelinRun, ReturnsTheFirstFailingRanksCodeAndStopsTheOthers) {
  const int64_t t0 = myelin::monotonic_ns();
  Outcome r = run("-n 3 --grace 1 sh -c '[ $MYELIN_RANK = 2 ] && exit 7; exec sleep 30'");
  EXPECT_EQ(r.rc, 7) << r.out;
  EXPECT_NE(r.out.find("myelin-run: rank 2 exited with status 7"), std::string::npos) << r.out;
  EXPECT_LT(myelin::monotonic_ns() - t0, 20'000'000'000LL) << "the sleeping ranks were not stopped";
}

TEST(MyelinRun, NamesTheRankKilledBySignal) {
  Outcome r = run("-n 2 --grace 1 sh -c '[ $MYELIN_RANK = 1 ] && kill -9 $$; exec sleep 30'");
  EXPECT_EQ(r.rc, 128 + SIGKILL) << r.out;
  EXPECT_NE(r.out.find("myelin-run: rank 1 was killed by signal 9 (SIGKILL)"), std::string::npos)
      << r.out;
}

TEST(MyelinRun, AKilledRankIsNamedBeforeThePeerThatFailedBecauseOfIt) {
  // Rank 0 fails with its own status first; rank 1 is killed a moment later. A peer of a killed
  // rank typically exits like rank 0 here (its connection broke), and may be reaped first: the
  // rank killed by the signal is the failure to name.
  char dir_template[] = "/tmp/myelin-run-test.XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  Outcome r = run("-n 2 --grace 1 sh -c 'if [ $MYELIN_RANK = 0 ]; then touch " + dir +
                  "/failed; exit 3; fi; while [ ! -e " + dir +
                  "/failed ]; do sleep 0.01; done; kill -9 $$'");
  std::filesystem::remove_all(dir);
  EXPECT_EQ(r.rc, 128 + SIGKILL) << r.out;
  EXPECT_NE(r.out.find("rank 1 was killed by signal 9 (SIGKILL)"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("rank 0 exited"), std::string::npos) << r.out;
}

TEST(MyelinRun, TimeoutStopsEveryRank) {
  Outcome r = run("--timeout 0.5 --grace 0.5 -n 2 sleep 30");
  EXPECT_EQ(r.rc, 128 + SIGTERM) << r.out;
  EXPECT_NE(r.out.find("job timeout"), std::string::npos) << r.out;
}

TEST(MyelinRun, BadUsageExitsTwo) {
  EXPECT_EQ(run("--no-such-flag true").rc, 2);
  EXPECT_EQ(run("").rc, 2);
  EXPECT_EQ(run("-n 0 true").rc, 2);
  EXPECT_EQ(run("-n -1 true").rc, 2);
}

TEST(MyelinRun, TimeoutsAboveTheMaximumOrNotFiniteAreUsageErrors) {
  // Refused with readable bounds (never DBL_MAX written out), not turned into an immediate stop.
  for (const char* bad : {"--timeout 1e10", "--timeout 1e300", "--timeout inf", "--timeout nan",
                          "--timeout -1", "--grace 1e300", "--grace inf", "--grace -1"}) {
    Outcome r = run(std::string(bad) + " -n 1 true");
    EXPECT_EQ(r.rc, 2) << bad << ": " << r.out;
    EXPECT_NE(r.out.find("1e+07]"), std::string::npos) << bad << ": " << r.out;
    EXPECT_EQ(r.out.find("job timeout"), std::string::npos) << bad << ": " << r.out;
    EXPECT_EQ(r.out.find("17976931348623157"), std::string::npos) << bad << ": " << r.out;
  }
  // The maximum itself is a real (far) deadline.
  Outcome ok = run("--timeout 1e7 --grace 1e7 -n 2 true");
  EXPECT_EQ(ok.rc, 0) << ok.out;
}

TEST(MyelinRun, MissingProgramIsReported) {
  Outcome r = run("-n 1 /nonexistent/program");
  EXPECT_EQ(r.rc, 127);
  EXPECT_NE(r.out.find("cannot execute '/nonexistent/program'"), std::string::npos) << r.out;
}

TEST(MyelinRun, ForwardsSignalsToRanks) {
  char dir_template[] = "/tmp/myelin-run-test.XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string script =
      "trap 'exit 42' TERM; touch " + dir + "/ready.$MYELIN_RANK; while :; do sleep 0.05; done";
  // Start the launcher directly so the test can signal it.
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::execl(MYELIN_RUN_PATH, MYELIN_RUN_PATH, "-n", "2", "--grace", "5", "sh", "-c", script.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(126);
  }
  // Signal only once both ranks have installed their trap.
  const myelin::Deadline ready_by = myelin::Deadline::after_ms(10'000);
  while (
      !(std::filesystem::exists(dir + "/ready.0") && std::filesystem::exists(dir + "/ready.1")) &&
      !ready_by.expired()) {
    pause_ms(10);
  }
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  int status = 0;
  const myelin::Deadline deadline = myelin::Deadline::after_ms(10'000);
  pid_t got = 0;
  while ((got = ::waitpid(pid, &status, WNOHANG)) == 0 && !deadline.expired()) pause_ms(10);
  if (got == 0) ::kill(pid, SIGKILL);
  std::filesystem::remove_all(dir);
  ASSERT_EQ(got, pid) << "myelin-run did not exit after SIGTERM";
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 42) << "the ranks' own exit code should come back";
}

// Running, or a zombie nobody has reaped yet, counts as gone once it is a zombie.
bool process_running(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const size_t close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z';
}

TEST(MyelinRun, RanksStopWhenTheLauncherIsKilled) {
  char dir_template[] = "/tmp/myelin-run-test.XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  // Each rank records its pid, then becomes a long sleep (exec keeps the pid).
  const std::string script = "echo $$ > " + dir + "/pid.$MYELIN_RANK; exec sleep 60";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::execl(MYELIN_RUN_PATH, MYELIN_RUN_PATH, "-n", "2", "sh", "-c", script.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(126);
  }
  auto read_pid = [&](int rank) -> pid_t {
    std::ifstream in(dir + "/pid." + std::to_string(rank));
    pid_t p = 0;
    return (in >> p) ? p : 0;
  };
  const myelin::Deadline ready_by = myelin::Deadline::after_ms(10'000);
  while ((read_pid(0) == 0 || read_pid(1) == 0) && !ready_by.expired()) pause_ms(10);
  const pid_t rank0 = read_pid(0);
  const pid_t rank1 = read_pid(1);
  ASSERT_GT(rank0, 0);
  ASSERT_GT(rank1, 0);
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  const myelin::Deadline gone_by = myelin::Deadline::after_ms(10'000);
  while ((process_running(rank0) || process_running(rank1)) && !gone_by.expired()) pause_ms(10);
  const bool left0 = process_running(rank0);
  const bool left1 = process_running(rank1);
  if (left0) ::kill(rank0, SIGKILL);
  if (left1) ::kill(rank1, SIGKILL);
  std::filesystem::remove_all(dir);
  EXPECT_FALSE(left0) << "rank 0 outlived its killed launcher";
  EXPECT_FALSE(left1) << "rank 1 outlived its killed launcher";
}

}  // namespace
