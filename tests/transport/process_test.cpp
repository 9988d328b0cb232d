// Multi-process failure tests: a real peer process is SIGKILLed; every pending operation on the
// survivor must complete with an error naming the peer, within the timeout. Runs for every backend
// usable here. A separate binary so that fork() happens in a process with no other Context.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "test_util.hpp"

namespace myelin::transport::testing {
namespace {

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}
bool read_all(int fd, void* data, size_t n) {
  auto* p = static_cast<uint8_t*>(data);
  while (n > 0) {
    const ssize_t r = ::read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}
bool send_blob(int fd, const std::vector<uint8_t>& b) {
  const uint32_t n = static_cast<uint32_t>(b.size());
  return write_all(fd, &n, sizeof(n)) && write_all(fd, b.data(), b.size());
}
bool recv_blob(int fd, std::vector<uint8_t>& b) {
  uint32_t n = 0;
  if (!read_all(fd, &n, sizeof(n)) || n > (1u << 20)) return false;
  b.resize(n);
  return read_all(fd, b.data(), n);
}

// The peer that will be killed: connects, says "ready", then keeps progressing.
[[noreturn]] void run_doomed_peer(Backend backend, int to_parent, int from_parent) {
  auto ctx = Context::create(options_for(backend, "doomed-peer"));
  if (!ctx.ok() || !send_blob(to_parent, (*ctx)->address())) _exit(2);
  std::vector<uint8_t> parent;
  if (!recv_blob(from_parent, parent)) _exit(3);
  auto ep = (*ctx)->connect(parent);
  if (!ep.ok()) _exit(4);
  uint64_t ready = 42;
  if (!(*ctx)->wait((*ep)->send(0, &ready, sizeof(ready))).ok()) _exit(5);
  const Deadline give_up = Deadline::after_ms(60000);
  while (!give_up.expired()) (*ctx)->progress();
  _exit(6);
}

class PeerDeath : public ::testing::TestWithParam<Backend> {};

TEST_P(PeerDeath, PendingOperationsFailNamingThePeer) {
  const std::string why = unusable_reason(GetParam());
  if (!why.empty()) GTEST_SKIP() << backend_name(GetParam()) << " unusable here: " << why;
  int up[2], down[2];
  ASSERT_EQ(pipe(up), 0);
  ASSERT_EQ(pipe(down), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(up[0]);
    close(down[1]);
    run_doomed_peer(GetParam(), up[1], down[0]);
  }
  close(up[1]);
  close(down[0]);
  auto ctx = Context::create(options_for(GetParam(), "survivor"));
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  std::vector<uint8_t> peer;
  ASSERT_TRUE(recv_blob(up[0], peer));
  ASSERT_TRUE(send_blob(down[1], (*ctx)->address()));
  auto ep = (*ctx)->connect(peer);
  ASSERT_TRUE(ep.ok()) << ep.status();
  uint64_t ready = 0;
  ASSERT_TRUE((*ctx)->wait((*ep)->recv(0, &ready, sizeof(ready)), Deadline::after_ms(20000)).ok());
  ASSERT_EQ(ready, 42u);

  // Pending: receives on several channels and a rendezvous-sized send nobody will receive.
  std::vector<uint64_t> slots(3);
  std::vector<uint8_t> big(4 << 20, 1);
  std::vector<Request> pending;
  for (uint32_t c = 1; c <= 3; ++c) pending.push_back((*ep)->recv(c, &slots[c - 1], 8));
  pending.push_back((*ep)->send(4, big.data(), big.size()));
  for (int i = 0; i < 100; ++i) (*ctx)->progress();

  ASSERT_EQ(kill(child, SIGKILL), 0);
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFSIGNALED(wstatus)) << "the peer exited by itself with " << WEXITSTATUS(wstatus);

  const Status all = (*ctx)->wait_all(pending, Deadline::after_ms(25000));
  EXPECT_NE(all.code(), StatusCode::kTimeout) << all;
  for (const auto& r : pending) {
    ASSERT_TRUE(r.done());
    EXPECT_FALSE(r.status().ok());
    EXPECT_NE(r.status().message().find("doomed-peer"), std::string_view::npos) << r.status();
  }
  EXPECT_FALSE((*ep)->status().ok());
  // Later operations fail at once, never hang.
  uint64_t v = 0;
  Request late = (*ep)->send(1, &v, sizeof(v));
  EXPECT_FALSE((*ctx)->wait(late, Deadline::after_ms(25000)).ok());
  close(up[0]);
  close(down[1]);
}

INSTANTIATE_TEST_SUITE_P(Backends, PeerDeath,
                         ::testing::Values(Backend::kShm, Backend::kTcp, Backend::kUcx,
                                           Backend::kVerbs),
                         param_name);

}  // namespace
}  // namespace myelin::transport::testing
