// Runs the myelin-info executable and checks its report, its JSON and its exit codes.

#include <myelin/config.hpp>
#include <myelin/core/clock.hpp>

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace {

using nlohmann::json;

struct RunResult {
  int exit_code = -1;  // -1 when killed or not started
  std::string out;
  std::string err;
};

// Runs myelin-info with `args`, collecting stdout and stderr, and kills it if it outlives
// `timeout_ms`.
RunResult run_info(const std::vector<std::string>& args, int64_t timeout_ms = 20000) {
  RunResult result;
  int out_pipe[2];
  int err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << errno;
    return result;
  }
  std::vector<std::string> argv_storage = {MYELIN_INFO_PATH};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);

  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out_pipe[1], STDOUT_FILENO);
    dup2(err_pipe[1], STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << errno;
    close(out_pipe[0]);
    close(err_pipe[0]);
    return result;
  }

  const myelin::Deadline deadline = myelin::Deadline::after_ms(timeout_ms);
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_fds = 2;
  while (open_fds > 0 && !deadline.expired()) {
    const int n = poll(fds, 2, deadline.remaining_ms_for_poll());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[4096];
      const ssize_t got = read(fds[i].fd, buf, sizeof(buf));
      if (got > 0) {
        sinks[i]->append(buf, static_cast<size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (pollfd& p : fds) {
    if (p.fd >= 0) close(p.fd);
  }
  if (open_fds > 0) {
    ADD_FAILURE() << "myelin-info did not finish within " << timeout_ms << " ms; killing it";
    kill(pid, SIGKILL);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  return result;
}

json run_json(const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  const RunResult r = run_info(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "not JSON:\n" << r.out;
  return j;
}

bool contains(const json& array, const std::string& value) {
  return std::find(array.begin(), array.end(), value) != array.end();
}

TEST(MyelinInfo, HumanReportHasEverySection) {
  const RunResult r = run_info({});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* section :
       {"Topology (discovered", "NUMA node 0: CPUs", "RDMA devices", "Backend `auto` would pick",
        "same-node peer: shm — ", "remote peer:    "}) {
    EXPECT_NE(r.out.find(section), std::string::npos) << section << " missing in:\n" << r.out;
  }
}

TEST(MyelinInfo, JsonHasTheFourParts) {
  const json j = run_json();
  ASSERT_TRUE(j.is_object());
  for (const char* key : {"topology", "rdma", "ucx", "backend"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_FALSE(j["topology"]["numa_nodes"].empty());
  EXPECT_FALSE(j["topology"]["cpus"].empty());
  EXPECT_EQ(j["rdma"]["compiled_in"], MYELIN_HAVE_VERBS != 0);
  EXPECT_EQ(j["ucx"]["compiled_in"], MYELIN_HAVE_UCX != 0);
  EXPECT_EQ(j["backend"]["same_node"]["backend"], "shm");
  EXPECT_FALSE(j["backend"]["remote"]["reason"].get<std::string>().empty());
}

TEST(MyelinInfo, RemoteChoiceFollowsTheRule) {
  const json j = run_json();
  std::string expected = "tcp";
  if (j["rdma"]["has_active_port"].get<bool>()) {
    expected = "verbs";
  } else if (j["ucx"]["compiled_in"].get<bool>() && j["ucx"]["has_network_transport"].get<bool>()) {
    expected = "ucx";
  }
  EXPECT_EQ(j["backend"]["remote"]["backend"], expected) << j["backend"].dump(2);
}

TEST(MyelinInfo, RdmaDevicesOrWhyNone) {
  const json j = run_json();
  const RunResult human = run_info({});
  ASSERT_EQ(human.exit_code, 0);
  if (j["rdma"]["devices"].empty()) {
    const std::string reason = j["rdma"]["absent_reason"].get<std::string>();
    EXPECT_FALSE(reason.empty());
    const auto at = human.out.find("no RDMA devices: ");
    ASSERT_NE(at, std::string::npos) << human.out;
    EXPECT_NE(human.out.find(reason, at), std::string::npos) << human.out;
    // The reason names what was looked at.
    EXPECT_NE(reason.find("ibv_get_device_list"), std::string::npos) << reason;
    EXPECT_NE(reason.find("/sys/class/infiniband"), std::string::npos) << reason;
  } else {
    EXPECT_TRUE(j["rdma"]["absent_reason"].is_null());
    for (const json& dev : j["rdma"]["devices"]) {
      EXPECT_NE(human.out.find(dev["name"].get<std::string>()), std::string::npos);
      EXPECT_FALSE(dev["ports"].empty()) << dev.dump(2);
    }
  }
}

TEST(MyelinInfo, UcxTransports) {
  const json j = run_json();
  const json& ucx = j["ucx"];
  if (!MYELIN_HAVE_UCX) {
    EXPECT_FALSE(ucx["error"].get<std::string>().empty());
    GTEST_SKIP() << "UCX is not compiled in";
  }
  EXPECT_FALSE(ucx["version"].get<std::string>().empty());
  for (const char* tl : {"tcp", "posix", "self"}) {
    EXPECT_TRUE(contains(ucx["transports"], tl)) << tl << " missing: " << ucx.dump(2);
  }
  for (const json& r : ucx["resources"]) {
    EXPECT_TRUE(contains(json{"net", "shm", "acc", "self"}, r["type"].get<std::string>()))
        << r.dump();
  }
}

TEST(MyelinInfo, TopologyFromFixture) {
  const json j = run_json(
      {"--topology-xml", std::string(MYELIN_TOPOLOGY_FIXTURE_DIR) + "/two_socket_gpu_server.xml"});
  const json& t = j["topology"];
  EXPECT_EQ(t["host"], "gpu-node-07");
  ASSERT_EQ(t["numa_nodes"].size(), 2u);
  EXPECT_EQ(t["numa_nodes"][1]["cpu_list"], "4-7,12-15");
  int seen = 0;
  for (const json& d : t["pci_devices"]) {
    if (d["bus_id"] == "0000:17:00.0") {
      EXPECT_EQ(d["kind"], "nic");
      EXPECT_EQ(d["numa_node"], 0);
      EXPECT_EQ(d["vendor_id"], "0x15b3");
      ++seen;
    } else if (d["bus_id"] == "0000:82:00.0") {
      EXPECT_EQ(d["kind"], "gpu");
      EXPECT_EQ(d["numa_node"], 1);
      ++seen;
    } else if (d["bus_id"] == "0000:c1:00.0") {
      EXPECT_TRUE(d["numa_node"].is_null());
      ++seen;
    }
  }
  EXPECT_EQ(seen, 3) << t.dump(2);
}

TEST(MyelinInfo, UsageErrorsExitTwo) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--no-such-flag"},
        {"stray-positional"},
        {"--topology-xml", "a.xml", "--synthetic", "pack:1 pu:1"},
        {"--topology-xml"},
        // An empty file or description would quietly describe this machine instead.
        {"--topology-xml", ""},
        {"--synthetic", ""}}) {
    const RunResult r = run_info(args);
    EXPECT_EQ(r.exit_code, 2) << args[0];
    EXPECT_NE(r.err.find("Usage:"), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
  const RunResult help = run_info({"--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--json"), std::string::npos);
}

TEST(MyelinInfo, UnreadableTopologyExitsOne) {
  const RunResult r = run_info({"--topology-xml", "/nonexistent/topo.xml"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("/nonexistent/topo.xml"), std::string::npos) << r.err;
  const RunResult bad = run_info({"--synthetic", "pack:banana", "--json"});
  EXPECT_EQ(bad.exit_code, 1);
  const json j = json::parse(bad.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << bad.out;
  EXPECT_TRUE(j["topology"].contains("error"));
}

}  // namespace
