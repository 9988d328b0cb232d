// Node identity: processes in one network namespace share a node id; processes in different
// network namespaces of the same kernel (an emulated multi-node cluster) do not, and a Context
// never picks shm across them. Forks before any Context exists in the parent.
#include <gtest/gtest.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/transport/node.hpp>

#include "test_util.hpp"

namespace myelin::transport::testing {
namespace {

constexpr int64_t kChildTimeoutMs = 20000;

// What a child reports: its node id, whether it could enter a new netns, and its Context address.
struct ChildReport {
  bool unshared = false;
  int unshare_errno = 0;
  std::string node_id;
  std::vector<uint8_t> address;  // empty when the child could not open a Context
  std::string context_error;
};

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool write_field(int fd, const void* data, uint32_t n) {
  return write_all(fd, &n, sizeof(n)) && write_all(fd, data, n);
}

// Reads exactly n bytes or fails at EOF, error or the deadline.
bool read_all(int fd, void* data, size_t n, Deadline deadline) {
  auto* p = static_cast<uint8_t*>(data);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const int r = ::poll(&pfd, 1, deadline.remaining_ms_for_poll());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    const ssize_t got = ::read(fd, p, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

bool read_field(int fd, std::string& out, Deadline deadline) {
  uint32_t n = 0;
  if (!read_all(fd, &n, sizeof(n), deadline) || n > (1u << 20)) return false;
  out.resize(n);
  return read_all(fd, out.data(), n, deadline);
}

// A new network namespace starts with its loopback down; up, the child's TCP backend can listen.
void bring_loopback_up() {
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  if (::ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);
    (void)::ioctl(fd, SIOCSIFFLAGS, &ifr);
  }
  ::close(fd);
}

// Runs a child that optionally enters a new network namespace, then reports its node id and the
// address of a Context it opens with the automatic backend choice.
ChildReport run_child(bool new_netns) {
  ChildReport report;
  int fds[2];
  if (::pipe(fds) != 0) {
    ADD_FAILURE() << "pipe: " << std::strerror(errno);
    return report;
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    return report;
  }
  if (pid == 0) {
    ::close(fds[0]);
    int status[2] = {0, 0};
    if (new_netns) {
      status[0] = ::unshare(CLONE_NEWNET) == 0 ? 1 : 0;
      status[1] = status[0] != 0 ? 0 : errno;
      if (status[0] != 0) bring_loopback_up();
    }
    const std::string id = local_node_id();
    Options o;
    o.name = new_netns ? "child-netns" : "child";
    o.timeout = std::chrono::seconds(5);
    auto ctx = Context::create(o);
    std::string addr, err;
    if (ctx.ok()) {
      addr.assign((*ctx)->address().begin(), (*ctx)->address().end());
    } else {
      err = ctx.status().to_string();
    }
    const bool ok = write_all(fds[1], status, sizeof(status)) &&
                    write_field(fds[1], id.data(), static_cast<uint32_t>(id.size())) &&
                    write_field(fds[1], addr.data(), static_cast<uint32_t>(addr.size())) &&
                    write_field(fds[1], err.data(), static_cast<uint32_t>(err.size()));
    ::_exit(ok ? 0 : 3);
  }
  ::close(fds[1]);
  const Deadline deadline = Deadline::after_ms(kChildTimeoutMs);
  int status[2] = {0, 0};
  std::string addr;
  const bool ok = read_all(fds[0], status, sizeof(status), deadline) &&
                  read_field(fds[0], report.node_id, deadline) &&
                  read_field(fds[0], addr, deadline) &&
                  read_field(fds[0], report.context_error, deadline);
  ::close(fds[0]);
  if (!ok) ::kill(pid, SIGKILL);
  int wstatus = 0;
  (void)::waitpid(pid, &wstatus, 0);
  EXPECT_TRUE(ok) << "the child did not report within " << kChildTimeoutMs << " ms";
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "child wait status " << wstatus;
  report.unshared = status[0] != 0;
  report.unshare_errno = status[1];
  report.address.assign(addr.begin(), addr.end());
  return report;
}

TEST(NodeIdentity, StableAndNamesTheNetworkNamespace) {
  const std::string id = local_node_id();
  EXPECT_EQ(id, local_node_id());
  EXPECT_NE(id.find("/netns:"), std::string::npos) << id;
  EXPECT_EQ(id.find("netns:unknown"), std::string::npos) << "this host has /proc: " << id;
}

TEST(NodeIdentity, SameNetworkNamespaceIsTheSameNode) {
  const ChildReport child = run_child(false);
  EXPECT_EQ(child.node_id, local_node_id());
}

TEST(NodeIdentity, OtherNetworkNamespaceIsAnotherNode) {
  const ChildReport child = run_child(true);
  if (!child.unshared) {
    GTEST_SKIP() << "cannot create a network namespace here (unshare(CLONE_NEWNET): "
                 << std::strerror(child.unshare_errno) << "); needs root or CAP_SYS_ADMIN";
  }
  const std::string mine = local_node_id();
  EXPECT_NE(child.node_id, mine);
  // Hostname and boot id are shared by every namespace of the kernel; only the netns part differs.
  const auto cut = mine.find("/netns:");
  ASSERT_NE(cut, std::string::npos);
  EXPECT_EQ(child.node_id.substr(0, cut + 7), mine.substr(0, cut + 7));
}

// The Context's backend choice follows the node id: shm within a namespace, never across.
TEST(NodeIdentity, ContextPicksShmOnlyInsideOneNetworkNamespace) {
  const ChildReport same = run_child(false);
  const ChildReport other = run_child(true);
  if (!other.unshared) {
    GTEST_SKIP() << "cannot create a network namespace here (unshare(CLONE_NEWNET): "
                 << std::strerror(other.unshare_errno) << "); needs root or CAP_SYS_ADMIN";
  }
  Options o;
  o.name = "parent";
  auto ctx = Context::create(o);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  ASSERT_FALSE(same.address.empty()) << same.context_error;
  auto same_choice = (*ctx)->choice_for(same.address);
  ASSERT_TRUE(same_choice.ok()) << same_choice.status();
  const auto mine = (*ctx)->backends();
  const bool have_shm = std::find(mine.begin(), mine.end(), Backend::kShm) != mine.end();
  if (have_shm) {
    EXPECT_EQ(same_choice->backend, Backend::kShm) << same_choice->reason;
  }
  // The child in its own namespace has only loopback, possibly down: it may open no network
  // backend at all, which is fine; what matters is that shm is never chosen.
  if (other.address.empty()) {
    GTEST_SKIP() << "the child in a new network namespace opened no Context: "
                 << other.context_error;
  }
  auto other_choice = (*ctx)->choice_for(other.address);
  if (other_choice.ok()) {
    EXPECT_NE(other_choice->backend, Backend::kShm) << other_choice->reason;
    EXPECT_NE(other_choice->reason.find("different node"), std::string::npos)
        << other_choice->reason;
  } else {
    EXPECT_EQ(other_choice.status().code(), StatusCode::kUnavailable) << other_choice.status();
  }
  // With its loopback up the child listens on TCP, so both sides have a network backend.
  const bool have_tcp = std::find(mine.begin(), mine.end(), Backend::kTcp) != mine.end();
  if (have_tcp) {
    ASSERT_TRUE(other_choice.ok()) << other_choice.status();
    EXPECT_TRUE(other_choice->backend == Backend::kTcp || other_choice->backend == Backend::kUcx ||
                other_choice->backend == Backend::kVerbs)
        << other_choice->reason;
  }
  // Forcing shm across namespaces is refused with a reason, not attempted.
  Options forced = o;
  forced.backend = Backend::kShm;
  forced.name = "parent-shm";
  auto shm_ctx = Context::create(forced);
  if (shm_ctx.ok()) {
    auto forced_choice = (*shm_ctx)->choice_for(other.address);
    EXPECT_FALSE(forced_choice.ok());
  }
}

}  // namespace
}  // namespace myelin::transport::testing
