// tests/verbs/verbs_multiprocess_test.cpp — a real second process as the peer (verbs_peer), in
// both connection modes: connection set-up between processes (also with a peer that calls
// connect() late, so our first set-up datagrams find nobody listening), the peer SIGKILLed in the
// middle of a transfer, and a silent dead peer found by the keepalive while we block on the
// backend's wait fd with no sleep cap of our own.
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
  bool start(std::string& error, int connect_delay_ms = 0) {
    int in[2], out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) return error = "pipe failed", false;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    const std::string bin = peer_binary();
    std::string delay = std::to_string(connect_delay_ms);
    char* argv[] = {const_cast<char*>(bin.c_str()), delay.data(), nullptr};
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

std::string to_hex(const std::vector<uint8_t>& bytes) {
  std::string out;
  char b[3];
  for (uint8_t x : bytes) {
    std::snprintf(b, sizeof b, "%02x", x);
    out += b;
  }
  return out;
}

std::vector<uint8_t> from_hex(const std::string& hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

// Waits the way a blocking Context does, minus its own sleep cap: progress(), then arm_wait()
// and poll(wait_fd) until the deadline. Only the backend's own wake-ups (completions, events,
// its timer) end a sleep early, so timer-driven work (handshake retransmission, keepalive) is
// proven to run while the caller sleeps.
template <typename Done>
bool block_until(BackendContext& b, Done done, Deadline deadline) {
  for (;;) {
    b.progress();
    if (done()) return true;
    if (deadline.expired()) return false;
    if (!b.arm_wait()) continue;
    pollfd p{b.wait_fd(), POLLIN, 0};
    (void)::poll(&p, 1, deadline.remaining_ms_for_poll());
  }
}

Status block_on(const Request& r, BackendContext& b, std::chrono::milliseconds timeout) {
  if (!block_until(
          b, [&] { return r.done(); }, Deadline::after(timeout))) {
    return timeout_error("request not done after ", timeout.count(), " ms of blocking waits");
  }
  return r.status();
}

class VerbsMultiProcess : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    ::setenv("MYELIN_VERBS_CM", GetParam(), 1);
    auto me = make_backend("test");
    if (!me.ok()) GTEST_SKIP() << "no usable verbs device: " << me.status();
    me_ = std::move(*me);
  }
  void TearDown() override { ::unsetenv("MYELIN_VERBS_CM"); }

  // Starts verbs_peer, swaps addresses over its pipes and connects to it.
  void start_and_connect(int peer_connect_delay_ms = 0) {
    std::string error, hex;
    ASSERT_TRUE(child_.start(error, peer_connect_delay_ms)) << error;
    ASSERT_TRUE(child_.read_line(hex, 60000)) << "verbs_peer printed no address";
    child_.write_line(to_hex(me_->local_address()));
    auto ep = me_->connect(from_hex(hex), "verbs_peer", Deadline::after(std::chrono::seconds(30)));
    ASSERT_TRUE(ep.ok()) << ep.status();
    ep_ = std::move(*ep);
  }

  // Asks the peer for an n-byte message on channel 1 and checks it arrives.
  void round_trip(uint64_t n, bool blocking) {
    std::vector<uint8_t> got(n + 1, 0);
    Request r = ep_->recv(1, got.data(), got.size(), nullptr);
    Request s = ep_->send(0, &n, sizeof n, nullptr);
    const auto timeout = std::chrono::seconds(30);
    const Status ss =
        blocking ? block_on(s, *me_, timeout) : wait_request(s, *me_, nullptr, timeout);
    ASSERT_TRUE(ss.ok()) << ss;
    const Status rs =
        blocking ? block_on(r, *me_, timeout) : wait_request(r, *me_, nullptr, timeout);
    ASSERT_TRUE(rs.ok()) << rs;
    ASSERT_EQ(r.bytes(), n);
    EXPECT_EQ(got[0], 0x5c);
    EXPECT_EQ(got[n - 1], 0x5c);
  }

  std::unique_ptr<BackendContext> me_;
  Child child_;
  std::unique_ptr<Endpoint> ep_;
};

TEST_P(VerbsMultiProcess, PendingOperationsFailWithPeerFailedNoHang) {
  ASSERT_NO_FATAL_FAILURE(start_and_connect());
  // A round trip proves the connection; then ask for 64 MiB (rendezvous: we RDMA READ from the
  // child) and kill the child while that runs.
  ASSERT_NO_FATAL_FAILURE(round_trip(100, false));
  uint64_t n = 64 << 20;
  std::vector<uint8_t> got(n);
  Request big = ep_->recv(1, got.data(), got.size(), nullptr);
  Request ask = ep_->send(0, &n, sizeof n, nullptr);
  (void)pump(
      *me_, nullptr, [] { return false; }, Deadline::after_ms(300));
  child_.kill_now();
  Status st = wait_request(big, *me_, nullptr, std::chrono::seconds(60));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  EXPECT_NE(st.to_string().find("verbs_peer"), std::string::npos) << st;
  EXPECT_FALSE(ep_->status().ok());
}

TEST_P(VerbsMultiProcess, PeerThatConnectsLateStillConnects) {
  // The peer reads our address, then neither connects nor progresses for 3 s: our first set-up
  // datagrams (exchange mode) wait unread or are dropped, our connect request (rdmacm mode) is
  // answered by its listener only. Retransmission must bring both sides up once it catches up.
  ASSERT_NO_FATAL_FAILURE(start_and_connect(3000));
  ASSERT_NO_FATAL_FAILURE(round_trip(100, false));
  ASSERT_NO_FATAL_FAILURE(round_trip(20000, false));  // a rendezvous too
}

TEST_P(VerbsMultiProcess, SilentDeadPeerIsFoundWhileBlocked) {
  // Everything here waits by sleeping on wait_fd: the connection (handshake retransmission),
  // a round trip, then a recv nobody will ever answer while the peer is SIGKILLed. Only the
  // backend's keepalive, woken by its own timer, can turn that into peer_failed.
  ASSERT_NO_FATAL_FAILURE(start_and_connect());
  ASSERT_NO_FATAL_FAILURE(round_trip(100, true));
  uint64_t v = 0;
  Request r = ep_->recv(1, &v, sizeof v, nullptr);
  ASSERT_FALSE(r.done());
  child_.kill_now();
  const Status st = block_on(r, *me_, std::chrono::seconds(30));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  EXPECT_NE(st.to_string().find("verbs_peer"), std::string::npos) << st;
}

INSTANTIATE_TEST_SUITE_P(Modes, VerbsMultiProcess, ::testing::Values("exchange", "rdmacm"),
                         [](const auto& p) { return std::string(p.param); });

}  // namespace
}  // namespace myelin::transport::verbs_test
