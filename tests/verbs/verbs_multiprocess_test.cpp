// tests/verbs/verbs_multiprocess_test.cpp — a real second process as the peer (verbs_peer),
// killed with SIGKILL in the middle of a transfer: every pending operation must end in
// peer_failed within the deadline, in both connection modes.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "verbs_test_util.hpp"

extern char** environ;

namespace myelin::transport::verbs_test {
namespace {

std::string peer_binary() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "verbs_peer";
  std::string self(buf, static_cast<size_t>(n));
  return self.substr(0, self.rfind('/') + 1) + "verbs_peer";
}

class Child {
 public:
  bool start(std::string& error) {
    int in[2], out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) return error = "pipe failed", false;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    const std::string bin = peer_binary();
    char* argv[] = {const_cast<char*>(bin.c_str()), nullptr};
    const int rc = ::posix_spawn(&pid_, bin.c_str(), &fa, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    to_ = in[1];
    from_ = out[0];
    if (rc != 0) return error = "posix_spawn " + bin + ": " + std::strerror(rc), false;
    return true;
  }
  // One line from the child, waiting at most `ms`.
  bool read_line(std::string& line, int ms) {
    const Deadline d = Deadline::after_ms(ms);
    char c;
    while (!d.expired()) {
      pollfd p{from_, POLLIN, 0};
      if (::poll(&p, 1, d.remaining_ms_for_poll()) != 1) continue;
      if (::read(from_, &c, 1) != 1) return false;
      if (c == '\n') return true;
      line.push_back(c);
    }
    return false;
  }
  void write_line(const std::string& s) {
    const std::string l = s + "\n";
    (void)!::write(to_, l.data(), l.size());
  }
  void kill_now() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int st;
      ::waitpid(pid_, &st, 0);
      pid_ = -1;
    }
  }
  ~Child() {
    kill_now();
    if (to_ >= 0) ::close(to_);
    if (from_ >= 0) ::close(from_);
  }

 private:
  pid_t pid_ = -1;
  int to_ = -1, from_ = -1;
};

class VerbsPeerKilled : public ::testing::TestWithParam<const char*> {};

TEST_P(VerbsPeerKilled, PendingOperationsFailWithPeerFailedNoHang) {
  ::setenv("MYELIN_VERBS_CM", GetParam(), 1);
  auto me = make_backend("test");
  if (!me.ok()) GTEST_SKIP() << "no usable verbs device: " << me.status();
  Child child;
  std::string error, hex;
  ASSERT_TRUE(child.start(error)) << error;
  ASSERT_TRUE(child.read_line(hex, 60000)) << "verbs_peer printed no address";
  std::vector<uint8_t> peer;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    peer.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  std::string mine;
  char b[3];
  for (uint8_t x : (*me)->local_address()) {
    std::snprintf(b, sizeof b, "%02x", x);
    mine += b;
  }
  child.write_line(mine);
  auto ep = (*me)->connect(peer, "verbs_peer", Deadline::after(std::chrono::seconds(30)));
  ASSERT_TRUE(ep.ok()) << ep.status();
  // A round trip proves the connection; then ask for 64 MiB (rendezvous: we RDMA READ from the
  // child) and kill the child while that runs.
  uint64_t n = 100;
  std::vector<uint8_t> got(64 << 20);
  Request r1 = (*ep)->recv(1, got.data(), got.size(), nullptr);
  ASSERT_TRUE(wait_request((*ep)->send(0, &n, sizeof n, nullptr), **me, nullptr).ok());
  ASSERT_TRUE(wait_request(r1, **me, nullptr, std::chrono::seconds(30)).ok()) << r1.status();
  ASSERT_EQ(r1.bytes(), 100u);
  n = got.size();
  Request big = (*ep)->recv(1, got.data(), got.size(), nullptr);
  Request ask = (*ep)->send(0, &n, sizeof n, nullptr);
  (void)pump(
      **me, nullptr, [] { return false; }, Deadline::after_ms(300));
  child.kill_now();
  Status st = wait_request(big, **me, nullptr, std::chrono::seconds(60));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  EXPECT_NE(st.to_string().find("verbs_peer"), std::string::npos) << st;
  EXPECT_FALSE((*ep)->status().ok());
  ::unsetenv("MYELIN_VERBS_CM");
}

INSTANTIATE_TEST_SUITE_P(Modes, VerbsPeerKilled, ::testing::Values("exchange", "rdmacm"),
                         [](const auto& p) { return std::string(p.param); });

}  // namespace
}  // namespace myelin::transport::verbs_test
