// The launcher library (tools/launcher) on its own: timeouts of any size are no immediate stop.
#include <signal.h>

#include <gtest/gtest.h>

#include <chrono>
#include <limits>
#include <vector>

#include <myelin/core/clock.hpp>

#include "launcher.hpp"

namespace {

using myelin::tools::LaunchOptions;
using myelin::tools::ProcessSpec;
using std::chrono::duration;

TEST(Launcher, HugeJobTimeoutIsNoDeadline) {
  const std::vector<ProcessSpec> procs = {{.argv = {"sh", "-c", "sleep 0.2"}, .name = "rank 0"}};
  for (double s : {1e10, 1e300, std::numeric_limits<double>::infinity()}) {
    auto rc = myelin::tools::run_processes(
        procs, LaunchOptions{.timeout = duration<double>(s), .name = "launcher-test"});
    ASSERT_TRUE(rc.ok()) << rc.status();
    EXPECT_EQ(*rc, 0) << "timeout " << s << " stopped the job";
  }
}

TEST(Launcher, HugeGraceIsNoImmediateKill) {
  // The process ignores SIGTERM: after the job timeout it gets the grace period, not SIGKILL at
  // once, and finishes on its own.
  const std::vector<ProcessSpec> procs = {
      {.argv = {"sh", "-c", "trap '' TERM; sleep 0.6; exit 5"}, .name = "rank 0"}};
  const int64_t t0 = myelin::monotonic_ns();
  auto rc = myelin::tools::run_processes(procs, LaunchOptions{.timeout = duration<double>(0.1),
                                                              .grace = duration<double>(1e300),
                                                              .name = "launcher-test"});
  ASSERT_TRUE(rc.ok()) << rc.status();
  EXPECT_EQ(*rc, 5) << "killed instead of given its grace period";
  EXPECT_GE(myelin::monotonic_ns() - t0, 500'000'000);
}

}  // namespace
