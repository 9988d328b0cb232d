// The myelin-broker daemon against bad configuration: files that are not regular files, values
// out of range or in conflict, bad flags, bad secret files and a port file it cannot write. Each
// must stop it at start with a clear message and the documented exit code (2: usage or
// configuration, 1: failed at start), never run it on defaults or hang. Every run is bounded
// (`timeout`): a daemon that took the input would listen until killed.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include <myelin/broker/client.hpp>

#include "broker_daemon.hpp"

namespace myelin::broker {
namespace {

constexpr char kSecret[] = "0123456789abcdef0123";

// A fresh directory with a good secret file, removed with the object.
class Scratch {
 public:
  Scratch() {
    dir_ = std::filesystem::temp_directory_path() /
           ("myelin-daemon-config-" + std::to_string(::getpid()) + "-" + std::to_string(next_++));
    std::filesystem::create_directories(dir_);
    std::ofstream(dir_ / "secret") << kSecret << "\n";
  }
  ~Scratch() { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path(name), std::ios::binary) << text;
    return path(name);
  }

 private:
  static inline int next_ = 0;
  std::filesystem::path dir_;
};

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (const char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

struct DaemonRun {
  int code = -1;  // the daemon's exit code (0 when the time limit's SIGINT drained it)
  std::string output;
};

// Runs the daemon with `args` for at most `seconds` (SIGINT then; it drains and exits 0).
DaemonRun run_daemon(const std::vector<std::string>& args, int seconds = 10) {
  std::string cmd =
      "timeout --preserve-status -k 5 -s INT " + std::to_string(seconds) + " " + MYELIN_BROKER_BIN;
  for (const std::string& a : args) cmd += " " + quoted(a);
  cmd += " 2>&1";
  DaemonRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -2;
  return r;
}

// The daemon with `config` (after a listen key) must stop with exit code 2 and a message holding
// `says`.
void expect_config_refused(const Scratch& s, const std::string& config, const std::string& says) {
  SCOPED_TRACE(config);
  const std::string file = s.write("broker.toml", "[broker]\nlisten = \"127.0.0.1:0\"\n" + config);
  const DaemonRun r = run_daemon({"--config", file, "--secret-file", s.path("secret")});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
}

TEST(DaemonConfig, AConfigThatIsNoRegularFileOrTooLargeIsRefused) {
  Scratch s;
  const std::string fifo = s.path("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::string big = s.write("big.toml", "# " + std::string(2 << 20, 'x') + "\n");
  const std::string dir = s.path("");
  for (const auto& [path, says] :
       std::vector<std::pair<std::string, std::string>>{{dir, "is a directory"},
                                                        {"/dev/zero", "is not a regular file"},
                                                        {fifo, "is not a regular file"},
                                                        {big, "bytes, more than the"}}) {
    SCOPED_TRACE(path);
    const DaemonRun r = run_daemon(
        {"--listen", "127.0.0.1:0", "--secret-file", s.path("secret"), "--config", path});
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
  }
}

TEST(DaemonConfig, ValuesOutOfRangeAreRefusedNotTruncated) {
  Scratch s;
  expect_config_refused(s, "lane_capacity = 1000000000000000\n", "lane_capacity");
  expect_config_refused(s, "lane_capacity = 0\n", "lane_capacity");
  expect_config_refused(s, "heartbeat_ms = 9223372036854775807\n", "heartbeat_ms");
  expect_config_refused(s, "heartbeat_ms = 1\n", "heartbeat_ms");
  expect_config_refused(s, "chunk_bytes = 4294968320\n", "chunk_bytes");
  expect_config_refused(s, "publish_credits = 4294967296\n", "publish_credits");
  expect_config_refused(s, "socket_buffer_bytes = 9223372036854775807\n", "socket_buffer_bytes");
  expect_config_refused(s, "batch_window_us = 9223372036854775807\n", "batch_window_us");
  expect_config_refused(s, "bulk_inflight_bytes = 9223372036854775807\n", "bulk_inflight_bytes");
  expect_config_refused(s, "batch_bytes = 4294901760\n", "batch_bytes");
  expect_config_refused(s, "numa_node = 99999\n", "numa_node");
  expect_config_refused(s, "numa_node = -7\n", "numa_node");
  expect_config_refused(s, "[[topic]]\npattern = \"a/#\"\nmax_delivery_attempts = 4294967296\n",
                        "max_delivery_attempts");
  expect_config_refused(s, "[[topic]]\npattern = \"a/#\"\nmax_delivery_attempts = 0\n",
                        "max_delivery_attempts");
  expect_config_refused(s, "[ps]\nworkers = 0\n", "workers");
  expect_config_refused(s, "[ps]\nworkers = 4294967296\n", "workers");
  expect_config_refused(s, "[ps]\nlr = nan\n", "lr");
  expect_config_refused(s, "[ps]\nlr = -inf\n", "lr");
  expect_config_refused(s, "[ps]\nlr = 0.0\n", "lr");
}

TEST(DaemonConfig, MalformedTablesAndConflictsAreRefused) {
  Scratch s;
  // Not after [broker]: a top-level key there would belong to that table.
  const std::string secret = s.path("secret");
  for (const auto& [config, says] : std::vector<std::pair<std::string, std::string>>{
           {"ps = 5\n", "[ps] must be a table"},
           {"[[topic]]\nlane = \"control\"\n", "pattern"},
           {"[[topic]]\npattern = \"a/#\"\nlane = \"control\"\n[[topic]]\npattern = \"a/#\"\n",
            "given twice"},
           {"[[client]]\nidentity = \"w0\"\n[[client]]\nidentity = \"w0\"\n", "given twice"},
           {"[[client]]\npublish = [\"#\"]\n", "identity"},
           {"[broker]\nnic = \"eth0\"\nnuma_node = 0\n", "exclusive"}}) {
    SCOPED_TRACE(config);
    const std::string file = s.write("broker.toml", config);
    const DaemonRun r =
        run_daemon({"--listen", "127.0.0.1:0", "--config", file, "--secret-file", secret});
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
  }
}

// A huge key is named in the error, cut short: the message stays small.
TEST(DaemonConfig, AHugeKeyIsNotEchoedWhole) {
  Scratch s;
  const std::string file =
      s.write("broker.toml", "[broker]\n" + std::string(500'000, 'k') + " = 1\n");
  const DaemonRun r =
      run_daemon({"--listen", "127.0.0.1:0", "--secret-file", s.path("secret"), "--config", file});
  EXPECT_EQ(r.code, 2) << r.output.substr(0, 300);
  EXPECT_LT(r.output.size(), 1000u) << r.output.substr(0, 300);
  EXPECT_NE(r.output.find("500000 bytes"), std::string::npos) << r.output.substr(0, 300);
}

TEST(DaemonConfig, BadFlagsAreUsageErrorsWithExitCode2) {
  Scratch s;
  const std::string secret = s.path("secret");
  for (const std::vector<std::string>& flags :
       std::vector<std::vector<std::string>>{{"--drain-timeout-ms", "-5"},
                                             {"--drain-timeout-ms", "99999999999999999999"},
                                             {"--listen", ""},
                                             {"--nic", "eth0", "--numa-node", "0"},
                                             {"--numa-node", "-5"},
                                             {"--ps-workers", "0"},
                                             {"--loop-nice", "99"},
                                             {"--no-such-flag"},
                                             {"--log-level"}}) {
    std::vector<std::string> args = {"--secret-file", secret};
    if (flags[0] != "--listen") args.insert(args.end(), {"--listen", "127.0.0.1:0"});
    args.insert(args.end(), flags.begin(), flags.end());
    SCOPED_TRACE(flags[0] + (flags.size() > 1 ? " " + flags[1] : ""));
    const DaemonRun r = run_daemon(args);
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(flags[0]), std::string::npos) << r.output;
  }
  const DaemonRun help = run_daemon({"--help"});
  EXPECT_EQ(help.code, 0) << help.output;
}

TEST(DaemonConfig, BadSecretFilesAreRefusedClearly) {
  Scratch s;
  const std::string two = s.write("two", std::string(kSecret) + "\nsecond\n");
  const std::string shorter = s.write("short", "short\n");
  for (const auto& [path, says] :
       std::vector<std::pair<std::string, std::string>>{{s.path(""), "is a directory"},
                                                        {"/dev/zero", "is not a regular file"},
                                                        {two, "more than one line"},
                                                        {shorter, "at least 16"}}) {
    SCOPED_TRACE(path);
    const DaemonRun r = run_daemon({"--listen", "127.0.0.1:0", "--secret-file", path});
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
  }
}

// A secret file with a CRLF ending holds the same secret as its first line: a client given that
// line authenticates (every tool reads the file the same way, broker::read_secret_file).
TEST(DaemonConfig, ACrlfSecretFileAuthenticatesTheFirstLine) {
  Scratch s;
  const std::string crlf = s.write("crlf", std::string(kSecret) + "\r\n");
  test_support::BrokerDaemon d(test_support::DaemonConfig{
      .secret = "another secret of twenty bytes", .flags = {"--secret-file", crlf}});
  ASSERT_TRUE(d.up());
  ClientOptions o = d.client("crlf");
  o.secret = kSecret;
  auto c = Client::connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
}

TEST(DaemonConfig, AnUnwritablePortFileStopsTheDaemonAtStart) {
  Scratch s;
  for (const std::string& port_file : {std::string("/nonexistent/dir/port"), s.path("")}) {
    SCOPED_TRACE(port_file);
    const DaemonRun r = run_daemon(
        {"--listen", "127.0.0.1:0", "--secret-file", s.path("secret"), "--port-file", port_file});
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_NE(r.output.find("port file"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("listening"), std::string::npos) << r.output;
  }
}

// A NIC this host does not have: the broker runs unpinned and says so at the default log level.
TEST(DaemonConfig, AnUnknownNicIsAWarningAtTheDefaultLevel) {
  Scratch s;
  const DaemonRun r = run_daemon(
      {"--listen", "127.0.0.1:0", "--secret-file", s.path("secret"), "--nic", "nosuchnic0"}, 2);
  EXPECT_EQ(r.code, 0) << r.output;  // stopped by SIGINT, drained
  EXPECT_NE(r.output.find("not pinned"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace myelin::broker
