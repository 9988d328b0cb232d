// TcpStoreServer under load: client threads (each with its own connection, and several sharing
// one client object) and client processes hammer one server at once with sets, gets, adds and
// contains; every reply is checked and the counters must add up exactly. The concurrency label
// makes CI's TSan stage run it. Children are forked before the server thread exists and learn the
// port through a pipe, so no lock can be inherited mid-use.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <string>
#include <thread>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/transport/bootstrap.hpp>

namespace myelin::transport {
namespace {

constexpr int kThreads = 4;
constexpr int kSharedThreads = 3;  // threads sharing one TcpStore object
constexpr int kProcesses = 3;
constexpr int kRounds = 300;
constexpr int64_t kTimeoutMs = 60000;

// One client's workload: its own keys (set, read back, contains), a shared counter, a value
// larger than one socket read, and a key published by a peer (waited for with get()).
// Returns an empty string on success, else what went wrong.
std::string hammer(Store& store, const std::string& who, const std::string& peer) {
  const Deadline deadline = Deadline::after_ms(kTimeoutMs);
  std::string big(200 * 1024, '\0');
  for (size_t i = 0; i < big.size(); ++i)
    big[i] = static_cast<char>('a' + (i * 7 + who.size()) % 26);
  if (Status s = store.set(who + "/big", big); !s.ok()) return "set big: " + s.to_string();
  if (Status s = store.set("ready/" + who, "1"); !s.ok()) return "set ready: " + s.to_string();
  for (int i = 0; i < kRounds; ++i) {
    const std::string key = who + "/k" + std::to_string(i % 17);
    const std::string value = who + ":" + std::to_string(i);
    if (Status s = store.set(key, value); !s.ok()) return "set: " + s.to_string();
    auto got = store.get(key, deadline);
    if (!got.ok()) return "get: " + got.status().to_string();
    // Keys are private to this client, so the last set is what comes back.
    if (std::string(got->begin(), got->end()) != value) return "get returned another value";
    auto n = store.add("counter", 1);
    if (!n.ok()) return "add: " + n.status().to_string();
    if (*n < 1) return "add returned " + std::to_string(*n);
    auto has = store.contains(key);
    if (!has.ok() || !*has) return "contains lost " + key;
    auto none = store.contains(who + "/never");
    if (!none.ok() || *none) return "contains invented a key";
  }
  auto peer_big = store.get(peer + "/big", deadline);
  if (!peer_big.ok()) return "get peer big: " + peer_big.status().to_string();
  if (peer_big->size() != big.size()) return "peer's big value has the wrong size";
  return {};
}

bool read_exact(int fd, void* p, size_t n, Deadline deadline) {
  auto* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const int r = ::poll(&pfd, 1, deadline.remaining_ms_for_poll());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    const ssize_t got = ::read(fd, b, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    b += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

TEST(TcpStoreStress, ThreadsAndProcessesHammerOneServer) {
  // Children first (no server thread yet), each waiting for the port.
  std::vector<pid_t> children;
  std::vector<int> port_pipes;
  for (int p = 0; p < kProcesses; ++p) {
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(fds[1]);
      uint16_t port = 0;
      if (!read_exact(fds[0], &port, sizeof(port), Deadline::after_ms(kTimeoutMs))) ::_exit(2);
      auto store = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(kTimeoutMs));
      if (!store.ok()) ::_exit(3);
      const std::string who = "proc" + std::to_string(p);
      const std::string peer = "proc" + std::to_string((p + 1) % kProcesses);
      const std::string err = hammer(**store, who, peer);
      if (!err.empty()) {
        (void)!::write(2, err.data(), err.size());
        ::_exit(4);
      }
      ::_exit(0);
    }
    ::close(fds[0]);
    children.push_back(pid);
    port_pipes.push_back(fds[1]);
  }
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const uint16_t port = (*server)->port();
  for (int fd : port_pipes) {
    EXPECT_EQ(::write(fd, &port, sizeof(port)), static_cast<ssize_t>(sizeof(port)));
    ::close(fd);
  }

  auto shared = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(kTimeoutMs));
  ASSERT_TRUE(shared.ok()) << shared.status();
  std::vector<std::string> errors(kThreads + kSharedThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto own = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(kTimeoutMs));
      if (!own.ok()) {
        errors[t] = "connect: " + own.status().to_string();
        return;
      }
      errors[t] = hammer(**own, "thread" + std::to_string(t),
                         "thread" + std::to_string((t + 1) % kThreads));
    });
  }
  for (int t = 0; t < kSharedThreads; ++t) {
    threads.emplace_back([&, t] {
      errors[kThreads + t] = hammer(**shared, "shared" + std::to_string(t),
                                    "shared" + std::to_string((t + 1) % kSharedThreads));
    });
  }
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < errors.size(); ++i) EXPECT_EQ(errors[i], "") << "client " << i;

  const Deadline deadline = Deadline::after_ms(kTimeoutMs);
  for (size_t i = 0; i < children.size(); ++i) {
    int status = 0;
    pid_t r = 0;
    while ((r = ::waitpid(children[i], &status, WNOHANG)) == 0 && !deadline.expired()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // no child-exit fd to wait on
    }
    if (r == 0) {
      ::kill(children[i], SIGKILL);
      (void)::waitpid(children[i], &status, 0);
      ADD_FAILURE() << "child " << i << " did not finish by the deadline";
      continue;
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "child " << i << " wait status " << status;
  }
  const int64_t clients = kThreads + kSharedThreads + kProcesses;
  auto total = (*shared)->add("counter", 0);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_EQ(*total, clients * kRounds);
  for (int p = 0; p < kProcesses; ++p) {
    auto ready = (*shared)->contains("ready/proc" + std::to_string(p));
    ASSERT_TRUE(ready.ok());
    EXPECT_TRUE(*ready) << "process " << p;
  }
}

// Clients that connect, send half a request and vanish, interleaved with good clients: the
// server thread survives, drops only the broken ones, and keeps serving.
TEST(TcpStoreStress, ClientsVanishingMidRequest) {
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const uint16_t port = (*server)->port();
  std::atomic<int> good{0};  // relaxed: read after join()
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 40; ++i) {
        if ((i + t) % 2 == 0) {
          auto c = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(kTimeoutMs));
          if (c.ok() && (*c)->add("alive", 1).ok()) good.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        // A raw client: the length prefix of a 100-byte request and 3 of its bytes, then gone.
        const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        sockaddr_in sa{};
        sa.sin_family = AF_INET;
        sa.sin_port = htons(port);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0) {
          const uint8_t partial[7] = {100, 0, 0, 0, 1, 4, 0};
          (void)!::send(fd, partial, sizeof(partial), MSG_NOSIGNAL);
        }
        ::close(fd);
      }
    });
  }
  for (auto& th : threads) th.join();
  auto c = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(kTimeoutMs));
  ASSERT_TRUE(c.ok());
  auto n = (*c)->add("alive", 0);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, good.load(std::memory_order_relaxed));
  EXPECT_EQ(good.load(std::memory_order_relaxed), 80);
}

}  // namespace
}  // namespace myelin::transport
