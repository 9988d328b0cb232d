// The UCX backend's same-node cma path across processes: a sender killed while the receiver
// reads its message turns the recv into peer_failed naming the peer within the timeout; a
// receiver that may not read the sender's memory (another user) makes the sender fall back to
// UCX rendezvous, while the other direction still goes by cma. The tcp cases run first (see
// ucx_fork_test.cpp: a tcp case forked after a posix case in one process misses its child's
// first message under UCX 1.13).
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include <myelin/transport/memory.hpp>

#include "ucx/ucx_endpoint.hpp"
#include "ucx/ucx_worker.hpp"
#include "ucx_test_util.hpp"

// See ucx_fork_test.cpp: UCX 1.13 keeps a few bytes of its own after force-closing an endpoint
// towards a killed peer.
extern "C" const char* __lsan_default_suppressions() {  // NOLINT: sanitizer hook
  return "leak:ucs_malloc\nleak:ucs_calloc\n";
}

namespace myelin::transport::ucx_test {
namespace {

using internal::ucx::UcxEndpoint;

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 11));
  return v;
}

const UcxEndpoint& ucx(const Endpoint& ep) {
  return static_cast<const UcxEndpoint&>(ep);
}

// Progress until the endpoint's hello state settles (it sends by cma) or `ms` pass.
void settle(BackendContext& backend, const Endpoint& ep, int ms) {
  const Deadline deadline = Deadline::after_ms(ms);
  while (!ucx(ep).sends_by_cma() && !deadline.expired()) backend.progress();
}

// A forked peer with pipes both ways; killed and reaped when the test ends.
class ForkedPeer {
 public:
  // Runs `child(to_parent, from_parent)` in a child process (which must not return).
  template <typename Child>
  bool start(Child child) {
    if (pipe(up_) != 0 || pipe(down_) != 0) return false;
    pid_ = fork();
    if (pid_ < 0) return false;
    if (pid_ == 0) {
      close(up_[0]);
      close(down_[1]);
      child(up_[1], down_[0]);
      _exit(99);
    }
    close(up_[1]);
    close(down_[0]);
    return true;
  }
  ForkedPeer() = default;
  ForkedPeer(const ForkedPeer&) = delete;
  ForkedPeer& operator=(const ForkedPeer&) = delete;
  ~ForkedPeer() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (pid_ >= 0) {
      close(up_[0]);
      close(down_[1]);
    }
  }
  [[nodiscard]] int from_child() const { return up_[0]; }
  [[nodiscard]] int to_child() const { return down_[1]; }
  // SIGKILL and reap; true when it was running.
  bool kill_and_reap() {
    if (pid_ <= 0) return false;
    const bool ok = kill(pid_, SIGKILL) == 0 && waitpid(pid_, nullptr, 0) == pid_;
    pid_ = 0;
    return ok;
  }
  // The child's exit status (waits at most `ms`); -1 when it did not exit normally in time.
  int exit_status(int ms) {
    const Deadline deadline = Deadline::after_ms(ms);
    while (!deadline.expired()) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = 0;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      usleep(1000);
    }
    return -1;
  }

 private:
  pid_t pid_ = -1;
  int up_[2] = {-1, -1};
  int down_[2] = {-1, -1};
};

// Exchanges addresses with the child and connects; the parent side.
std::unique_ptr<Endpoint> connect_to_child(BackendContext& backend, ForkedPeer& peer) {
  std::vector<uint8_t> child_address;
  EXPECT_TRUE(read_blob(peer.from_child(), child_address, 20'000)) << "no address from the child";
  EXPECT_TRUE(write_blob(peer.to_child(), backend.local_address()));
  auto ep = backend.connect(child_address, "child", Deadline::after_ms(5000));
  EXPECT_TRUE(ep.ok()) << ep.status();
  return ep.ok() ? std::move(ep).value() : nullptr;
}

constexpr size_t kBig = size_t{64} << 20;

class UcxCmaFork : public testing::TestWithParam<TlsSetting> {};

TEST_P(UcxCmaFork, SenderKilledMidCopyFailsTheRecvNamingThePeer) {
  apply_tls(GetParam());
  unsetenv("MYELIN_UCX_CMA");
  ForkedPeer peer;
  ASSERT_TRUE(peer.start([](int to_parent, int from_parent) {
    ChildLink link = connect_child_to_parent(to_parent, from_parent);
    auto& backend = link.backend;
    auto& ep = link.ep;
    settle(*backend, *ep, 5000);
    if (!ucx(*ep).sends_by_cma()) _exit(5);
    static const std::vector<uint8_t> big = pattern(kBig, 1);
    Request s = ep->send(1, big.data(), big.size());
    for (int i = 0; i < 1000; ++i) backend->progress();
    const char sent = 's';
    if (write(to_parent, &sent, 1) != 1) _exit(6);
    const Deadline deadline = Deadline::after(std::chrono::seconds(60));  // killed before
    while (!deadline.expired()) backend->progress();
    _exit(7);
  }));
  const auto timeout = std::chrono::seconds(5);
  auto backend = open_backend(test_options(timeout), "parent");
  ASSERT_TRUE(backend);
  auto ep = connect_to_child(*backend, peer);
  ASSERT_TRUE(ep);
  // Progress (so the hellos and the child's cma header get through) until the child has sent.
  char sent = 0;
  const Deadline until_sent = Deadline::after(std::chrono::seconds(20));
  while (!until_sent.expired()) {
    backend->progress();
    pollfd pfd{peer.from_child(), POLLIN, 0};
    if (poll(&pfd, 1, 0) == 1) break;
  }
  ASSERT_TRUE(read_exact(peer.from_child(), &sent, 1, 0)) << "the child did not send (or exited)";
  for (int i = 0; i < 1000; ++i) backend->progress();

  std::vector<uint8_t> in(kBig);
  Request r = ep->recv(1, in.data(), in.size());
  backend->progress();  // a piece or two is read while the child lives
  ASSERT_TRUE(peer.kill_and_reap());
  const int64_t killed_at = monotonic_ns();
  const Status st = drive(r, {backend.get()}, Deadline::after(timeout * 3));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  EXPECT_NE(st.message().find("child"), std::string_view::npos) << st;
  RecordProperty("detect_seconds",
                 std::to_string(static_cast<double>(monotonic_ns() - killed_at) / 1e9));
  // The watch fails the endpoint too: later operations fail at once.
  const Deadline later = Deadline::after(timeout * 3);
  while (ep->status().ok() && !later.expired()) backend->progress();
  EXPECT_EQ(ep->status().code(), StatusCode::kPeerFailed) << ep->status();
  Status after =
      drive(ep->recv(1, in.data(), in.size()), {backend.get()}, Deadline::after_ms(1000));
  EXPECT_EQ(after.code(), StatusCode::kPeerFailed) << after;
}

// The child becomes another user: it may not read this (root) process, while this one (with
// CAP_SYS_PTRACE) may read it. Sends towards the child fall back to UCX rendezvous; the child's
// sends go by cma.
// Over tcp only: another user's posix shared memory is not attachable. (A plain TEST, so it runs
// before the parameterised posix cases.)
TEST(UcxCmaForkTcp, ReceiverThatMayNotReadTheSenderGetsRendezvous) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root, to fork a child of another user";
  apply_tls(kTlsSettings[0]);
  unsetenv("MYELIN_UCX_CMA");
  ForkedPeer peer;
  ASSERT_TRUE(peer.start([](int to_parent, int from_parent) {
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(10);
    ChildLink link = connect_child_to_parent(to_parent, from_parent);
    auto& backend = link.backend;
    auto& ep = link.ep;
    settle(*backend, *ep, 5000);
    // Our hello (sent from the progress above) goes ahead of this on the endpoint: once the
    // parent has it, the parent knows we cannot read it.
    static const uint8_t kReady = 1;
    Request ready = ep->send(4, &kReady, 1);
    if (!drive(ready, {backend.get()}).ok()) _exit(19);
    const std::vector<uint8_t> out = pattern(size_t{1} << 20, 2);
    std::vector<uint8_t> in(size_t{1} << 20);
    Request r = ep->recv(2, in.data(), in.size());
    Request s = ep->send(1, out.data(), out.size());
    if (!drive(s, {backend.get()}).ok()) _exit(20);
    if (!drive(r, {backend.get()}).ok()) _exit(21);
    // 0: all well; 30 + what went wrong otherwise.
    uint8_t verdict = in == pattern(size_t{1} << 20, 3) ? 0 : 31;
    if (verdict == 0 && !ucx(*ep).sends_by_cma()) verdict = 32;
    Request v = ep->send(3, &verdict, 1);
    if (!drive(v, {backend.get()}).ok()) _exit(22);
    // Stay until the parent has the verdict.
    char done = 0;
    (void)read_exact(from_parent, &done, 1, 20'000);
    _exit(0);
  }));
  auto backend = open_backend(test_options(std::chrono::seconds(5)), "parent");
  ASSERT_TRUE(backend);
  auto ep = connect_to_child(*backend, peer);
  ASSERT_TRUE(ep);
  const std::vector<uint8_t> out = pattern(size_t{1} << 20, 3);
  std::vector<uint8_t> in(size_t{1} << 20);
  uint8_t verdict = 0xff, ready = 0;
  Request rr = ep->recv(4, &ready, 1);
  ASSERT_TRUE(drive(rr, {backend.get()}).ok()) << rr.status();
  EXPECT_FALSE(ucx(*ep).sends_by_cma()) << "the child cannot read this process";
  Request r = ep->recv(1, in.data(), in.size());
  Request s = ep->send(2, out.data(), out.size());
  Request v = ep->recv(3, &verdict, 1);
  ASSERT_TRUE(drive(r, {backend.get()}).ok()) << r.status();
  ASSERT_TRUE(drive(s, {backend.get()}).ok()) << s.status();
  ASSERT_TRUE(drive(v, {backend.get()}).ok()) << v.status();
  EXPECT_EQ(in, pattern(size_t{1} << 20, 2));
  EXPECT_EQ(verdict, 0) << "31: the child's 1 MiB arrived damaged; 32: the child did not send "
                           "by cma although this process reads it";
  EXPECT_FALSE(ucx(*ep).sends_by_cma()) << "the child cannot read this process";
  const char done = 'd';
  ASSERT_EQ(write(peer.to_child(), &done, 1), 1);
  EXPECT_EQ(peer.exit_status(20'000), 0);
}

// Gets in flight when the peer dies: each completes (ok or peer_failed, never hangs), and once a
// get reported its outcome, nothing writes into its buffer any more. Over tcp (a plain TEST, so it
// runs before the parameterised posix cases).
TEST(UcxGetForkTcp, GetsOfAKilledPeerAreDoneWithTheirBuffersWhenTheyComplete) {
  apply_tls(kTlsSettings[0]);
  constexpr size_t kPiece = size_t{4} << 20, kPieces = 8;
  ForkedPeer peer;
  ASSERT_TRUE(peer.start([](int to_parent, int from_parent) {
    ChildLink link = connect_child_to_parent(to_parent, from_parent);
    auto& backend = link.backend;
    auto& ep = link.ep;
    static std::vector<uint8_t> source(kPiece * kPieces, 0x5a);
    RegionState region;
    region.data = source.data();
    region.size = source.size();
    region.access = Access::kRemoteRead;
    region.id = 1;
    auto registration = backend->register_memory(region);
    if (!registration.ok()) _exit(6);
    RemoteKey key(reinterpret_cast<uint64_t>(source.data()), source.size(), 1, Access::kRemoteRead,
                  MemoryKind::kHost);
    key.add_backend_blob(Backend::kUcx, (*registration)->remote_key_blob());
    static const std::vector<uint8_t> key_bytes = key.serialize();
    Request k = ep->send(2, key_bytes.data(), key_bytes.size());
    const Deadline deadline = Deadline::after(std::chrono::seconds(60));  // killed before
    while (!deadline.expired()) backend->progress();
    _exit(7);
  }));
  const auto timeout = std::chrono::seconds(2);
  auto backend = open_backend(test_options(timeout), "parent");
  ASSERT_TRUE(backend);
  auto ep = connect_to_child(*backend, peer);
  ASSERT_TRUE(ep);
  std::vector<uint8_t> key_bytes(64 * 1024);
  Request kr = ep->recv(2, key_bytes.data(), key_bytes.size());
  ASSERT_TRUE(drive(kr, {backend.get()}).ok()) << kr.status();
  key_bytes.resize(kr.bytes());
  auto key = RemoteKey::deserialize(key_bytes);
  ASSERT_TRUE(key.ok()) << key.status();

  std::vector<std::vector<uint8_t>> buffers(kPieces, std::vector<uint8_t>(kPiece, 0));
  std::vector<Request> gets;
  for (size_t i = 0; i < kPieces; ++i) {
    gets.push_back(ep->get(buffers[i].data(), kPiece, *key, i * kPiece));
  }
  for (int i = 0; i < 20; ++i) backend->progress();
  ASSERT_TRUE(peer.kill_and_reap());
  // As each get completes, remember its buffer; none may change afterwards.
  std::vector<std::vector<uint8_t>> at_completion(kPieces);
  const Deadline deadline = Deadline::after(timeout * 4);
  size_t done = 0;
  while (done < kPieces && !deadline.expired()) {
    backend->progress();
    for (size_t i = 0; i < kPieces; ++i) {
      if (gets[i].done() && at_completion[i].empty()) {
        at_completion[i] = buffers[i];
        ++done;
      }
    }
  }
  ASSERT_EQ(done, kPieces) << "every get completes within the timeout";
  const Deadline settle_until = Deadline::after_ms(300);
  while (!settle_until.expired()) backend->progress();
  for (size_t i = 0; i < kPieces; ++i) {
    const Status& st = gets[i].status();
    EXPECT_TRUE(st.ok() || st.code() == StatusCode::kPeerFailed) << st;
    if (st.ok()) {
      EXPECT_EQ(buffers[i], std::vector<uint8_t>(kPiece, 0x5a)) << "get " << i;
    }
    EXPECT_TRUE(buffers[i] == at_completion[i]) << "get " << i << " changed after completing";
  }
}

INSTANTIATE_TEST_SUITE_P(Tls, UcxCmaFork, testing::ValuesIn(kTlsSettings), tls_test_name);

}  // namespace
}  // namespace myelin::transport::ucx_test
