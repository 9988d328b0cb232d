// myelin-train end to end: real worker and server processes on this machine, compared with the
// serial reference the job itself replays (--verify), in both modes.
#include <signal.h>
#include <sys/wait.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include <myelin/core/clock.hpp>
#include <nlohmann/json.hpp>

namespace {

struct Outcome {
  int rc = -1;
  std::string out;
  nlohmann::json summary;
};

Outcome train_exactly(const std::string& args);

Outcome train(const std::string& args) {
  return train_exactly("--json --verify --params 20000 --steps 30 --timeout 30 --job-timeout 120 " +
                       args);
}

void expect_learned(const Outcome& o) {
  ASSERT_EQ(o.rc, 0) << o.out;
  ASSERT_TRUE(o.summary.is_object()) << o.out;
  EXPECT_LT(o.summary["final_loss"].get<double>(), o.summary["first_loss"].get<double>()) << o.out;
  EXPECT_TRUE(o.summary["workers_agree"].get<bool>()) << o.out;
  EXPECT_EQ(o.summary["steps"].get<int>(), 30);
}

TEST(TrainJob, AllreduceDeterministicIsBitExactWithTheSerialReference) {
  const Outcome o = train("--mode allreduce -n 4 --deterministic");
  expect_learned(o);
  EXPECT_TRUE(o.summary["verify_bit_exact"].get<bool>()) << o.out;
  EXPECT_EQ(o.summary["verify_max_abs_diff"].get<double>(), 0.0) << o.out;
  EXPECT_EQ(o.summary["algorithm"].get<std::string>().rfind("allgather/", 0), 0u) << o.out;
}

TEST(TrainJob, AllreduceRingStaysWithinToleranceOverTcp) {
  const Outcome o = train("--mode allreduce -n 3 --batch 63 --transport tcp --algo ring");
  expect_learned(o);
  EXPECT_LE(o.summary["verify_max_abs_diff"].get<double>(), 1e-4) << o.out;
  EXPECT_EQ(o.summary["algorithm"].get<std::string>(), "ring") << o.out;
  EXPECT_NE(o.summary["transport"].get<std::string>().find("tcp"), std::string::npos) << o.out;
}

TEST(TrainJob, ParameterServersMatchTheSerialReference) {
  const Outcome o = train("--mode ps -n 4 --servers 2");
  expect_learned(o);
  EXPECT_EQ(o.summary["servers"].get<int>(), 2);
  EXPECT_LE(o.summary["verify_max_abs_diff"].get<double>(), 1e-4) << o.out;
}

TEST(TrainJob, LearningRateScheduleTravelsOnTheControlTopic) {
  // A decay of 0.5 at every check point where the loss did not improve by 1 %: with a tiny learning
  // rate the loss barely moves, so every worker must apply the coordinator's decay.
  const Outcome o = train("--mode allreduce -n 2 --lr 0.0001 --check-every 5 --deterministic");
  ASSERT_EQ(o.rc, 0) << o.out;
  EXPECT_LT(o.summary["final_lr"].get<double>(), 0.0001 * 0.5) << o.out;
  EXPECT_TRUE(o.summary["verify_bit_exact"].get<bool>()) << o.out;
}

TEST(TrainJob, BadArgumentsExitTwo) {
  EXPECT_EQ(train("--batch 10 -n 4").rc, 2);
  EXPECT_EQ(train("--mode sideways").rc, 2);
}

// myelin-train with exactly these arguments, stdout and stderr together.
Outcome train_exactly(const std::string& args) {
  const std::string cmd = std::string(MYELIN_TRAIN_PATH) + " " + args + " 2>&1";
  Outcome o;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return o;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) o.out.append(buf.data(), n);
  const int status = ::pclose(p);
  o.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::istringstream lines(o.out);
  for (std::string line; std::getline(lines, line);) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.value("event", "") == "summary") o.summary = j;
  }
  return o;
}

TEST(TrainJob, BadNumbersAreUsageErrorsBeforeAnyWorkerStarts) {
  // Non-finite floats, timeouts above the maximum, and a transport or algorithm that does not
  // exist: usage errors (2) from the launcher itself, with readable bounds.
  for (const char* bad :
       {"--lr nan", "--lr inf", "--lr -1", "--lr-decay nan", "--lr-decay 2", "--target-loss nan",
        "--target-loss inf", "--target-loss -1", "--timeout nan", "--timeout 0", "--timeout 1e300",
        "--job-timeout 1e12", "--job-timeout nan", "--job-timeout -1", "--transport rdma",
        "--algo nosuch", "--steps -1", "--params -1"}) {
    const Outcome o = train_exactly(std::string("-n 2 --params 1000 --steps 5 --batch 8 ") + bad);
    EXPECT_EQ(o.rc, 2) << bad << ": " << o.out;
    EXPECT_EQ(o.out.find("myelin-train: worker"), std::string::npos) << bad << ": " << o.out;
    EXPECT_EQ(o.out.find("17976931348623157"), std::string::npos) << bad << ": " << o.out;
  }
}

TEST(TrainJob, ARunWithOneCheckPointSucceeds) {
  // --steps <= --check-every: one check point, no loss trend to check; not an internal error.
  const Outcome o =
      train_exactly("--json -n 2 --params 1000 --steps 5 --batch 8 --timeout 30 --job-timeout 120");
  ASSERT_EQ(o.rc, 0) << o.out;
  ASSERT_TRUE(o.summary.is_object()) << o.out;
  EXPECT_FALSE(o.summary["loss_checked"].get<bool>()) << o.out;
  EXPECT_EQ(o.summary["steps"].get<int>(), 5);
}

TEST(TrainJob, ABadTransportFailsTheJobQuickly) {
  const std::string cmd = std::string("MYELIN_TRANSPORT=bogus ") + MYELIN_TRAIN_PATH +
                          " --params 5000 --steps 5 --timeout 5 --job-timeout 60 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = ::pclose(p);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("unknown transport 'bogus'"), std::string::npos) << out;
}

TEST(TrainJob, AKilledWorkerFailsTheJobWithinItsTimeout) {
  // The launcher's pid comes first (exec keeps it); then the JSON step lines.
  const std::string cmd = std::string("echo $$; exec ") + MYELIN_TRAIN_PATH +
                          " --json -n 2 --params 20000 --steps 100000 --check-every 5 --timeout 5"
                          " --job-timeout 120 2>&1";
  const int64_t t0 = myelin::monotonic_ns();
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char line[4096];
  ASSERT_NE(std::fgets(line, sizeof(line), p), nullptr);
  const int launcher = std::atoi(line);
  ASSERT_GT(launcher, 0);
  // Wait for training to be under way, then SIGKILL the last worker.
  bool killed = false;
  while (std::fgets(line, sizeof(line), p) != nullptr) {
    out += line;
    if (!killed && std::string(line).find("\"event\":\"step\"") != std::string::npos) {
      std::ifstream children("/proc/" + std::to_string(launcher) + "/task/" +
                             std::to_string(launcher) + "/children");
      int pid = 0, last = 0;
      while (children >> pid) last = pid;
      ASSERT_GT(last, 0) << "no worker processes under the launcher";
      ASSERT_EQ(::kill(last, SIGKILL), 0);
      killed = true;
    }
  }
  const int status = ::pclose(p);
  const double seconds = double(myelin::monotonic_ns() - t0) / 1e9;
  ASSERT_TRUE(killed) << out;
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0) << out;
  // The survivor turns the death into peer_failed and may exit first; the launcher still names
  // the killed worker and returns its status.
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGKILL) << out;
  EXPECT_NE(out.find("myelin-train: worker 1 was killed by signal 9 (SIGKILL)"), std::string::npos)
      << out;
  EXPECT_LT(seconds, 60.0) << "the survivors did not stop within their timeout\n" << out;
}

}  // namespace
