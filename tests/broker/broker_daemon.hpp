// tests/broker/broker_daemon.hpp — the real myelin-broker daemon as a child process, for the
// broker's multi-process tests: its config and secret in a fresh temporary directory, the ports
// read back from --port-file, signals (SIGKILL, SIGSTOP/SIGCONT, SIGTERM with a deadline), and
// /metrics scraped with curl. The directory goes and the process is killed with the object.
//
// Thread safety: one thread drives a BrokerDaemon; the helpers are free functions.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <myelin/broker/client.hpp>
#include <myelin/core/clock.hpp>

#include "thread_ids.hpp"

namespace myelin::broker::test_support {

// Waits until `fd` is readable or the deadline passes; false on timeout.
inline bool wait_readable(int fd, Deadline deadline) {
  pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
  for (;;) {
    const int n = ::poll(&p, 1, deadline.remaining_ms_for_poll());
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

// Reaps `pid` once it exits, sleeping on its pidfd; false (child left running) when the deadline
// passes first. Without pidfd_open (kernel < 5.3) there is no fd to wait on, so it falls back to
// a bounded 5 ms poll of waitpid.
inline bool wait_exit(pid_t pid, Deadline deadline, int* status) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  bool reaped = false;
  for (;;) {
    if (::waitpid(pid, status, WNOHANG) == pid) {
      reaped = true;
      break;
    }
    if (deadline.expired()) break;
    if (pidfd >= 0) {
      (void)wait_readable(pidfd, deadline);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  if (pidfd >= 0) ::close(pidfd);
  return reaped;
}

inline bool have_curl() {
  return std::system("curl --version > /dev/null 2>&1") == 0;
}

struct DaemonConfig {
  std::string secret;                // the job secret, written to the daemon's secret file
  std::string extra_config;          // TOML after the [broker] keys: more keys, [[topic]], ...
  std::vector<std::string> flags;    // more command-line flags
  int heartbeat_ms = 0;              // broker and clients; 0: the defaults
  bool metrics = true;               // serve /metrics on an ephemeral port (else off)
  std::string name = "broker-test";  // the temporary directory's prefix
};

class BrokerDaemon {
 public:
  // Starts the daemon and waits (10 s at most) for its port file; up() says whether it came.
  explicit BrokerDaemon(DaemonConfig config) : cfg_(std::move(config)) {
    dir_ = std::filesystem::temp_directory_path() /
           ("myelin-" + cfg_.name + "-" + std::to_string(::getpid()) + "-" +
            std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
    std::ofstream(dir_ / "secret") << cfg_.secret << "\n";
    {
      std::ofstream conf(dir_ / "broker.toml");
      conf << "[broker]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \""
           << (cfg_.metrics ? "127.0.0.1:0" : "") << "\"\n"
           << "secret_file = \"" << (dir_ / "secret").string() << "\"\n";
      if (cfg_.heartbeat_ms > 0) conf << "heartbeat_ms = " << cfg_.heartbeat_ms << "\n";
      conf << cfg_.extra_config;
    }
    const std::string port_file = (dir_ / "port").string();
    std::vector<std::string> args = {MYELIN_BROKER_BIN, "--config", (dir_ / "broker.toml").string(),
                                     "--port-file", port_file};
    args.insert(args.end(), cfg_.flags.begin(), cfg_.flags.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    // A bounded poll: the port file has no fd to wait on until it exists.
    const Deadline d = Deadline::after_ms(10000);
    while (!d.expired()) {
      std::ifstream in(port_file);
      int port = 0, metrics_port = 0;
      if ((in >> port) && (!cfg_.metrics || (in >> metrics_port))) {
        port_ = port;
        metrics_port_ = metrics_port;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ~BrokerDaemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    std::filesystem::remove_all(dir_);
  }
  BrokerDaemon(const BrokerDaemon&) = delete;
  BrokerDaemon& operator=(const BrokerDaemon&) = delete;

  [[nodiscard]] bool up() const { return port_ != 0; }
  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Options of a client of this daemon (its secret and heartbeat).
  [[nodiscard]] ClientOptions client(const std::string& identity) const {
    ClientOptions o{.address = address(), .identity = identity, .secret = cfg_.secret};
    if (cfg_.heartbeat_ms > 0) o.heartbeat_ms = cfg_.heartbeat_ms;
    return o;
  }
  // Stops the broker process (SIGSTOP; true once it has stopped) or lets it go on (SIGCONT).
  bool stop_process() {
    int st = 0;
    return ::kill(pid_, SIGSTOP) == 0 && ::waitpid(pid_, &st, WUNTRACED) == pid_ && WIFSTOPPED(st);
  }
  void continue_process() { ::kill(pid_, SIGCONT); }
  void kill9() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  // SIGTERM; the exit code, or -1 when it did not exit in time (-2: ended by a signal).
  int terminate(int64_t timeout_ms) {
    ::kill(pid_, SIGTERM);
    int st = 0;
    if (!wait_exit(pid_, Deadline::after_ms(timeout_ms), &st)) return -1;
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -2;
  }
  // Scrapes /metrics with curl: "name{labels}" -> value (empty when unreachable).
  [[nodiscard]] std::map<std::string, double> metrics() const {
    std::map<std::string, double> out;
    const std::string cmd =
        "curl -s --max-time 5 http://127.0.0.1:" + std::to_string(metrics_port_) + "/metrics";
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return out;
    char line[1024];
    while (std::fgets(line, sizeof(line), p)) {
      const std::string l(line);
      if (l.empty() || l[0] == '#') continue;
      const size_t sp = l.rfind(' ');
      if (sp == std::string::npos) continue;
      out[l.substr(0, sp)] = std::stod(l.substr(sp + 1));
    }
    ::pclose(p);
    return out;
  }
  // One sample of one series ("name" or "name{labels}"); -1 when absent.
  [[nodiscard]] double metric(const std::string& name) const {
    const auto all = metrics();
    const auto it = all.find(name);
    return it == all.end() ? -1 : it->second;
  }
  // Waits (a bounded poll: /metrics has no fd to wait on) until `name` reads `value`; returns the
  // last reading.
  double metric_reaches(const std::string& name, double value, int64_t timeout_ms = 10000) const {
    const Deadline dl = Deadline::after_ms(timeout_ms);
    double v = metric(name);
    while (v != value && !dl.expired()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      v = metric(name);
    }
    return v;
  }
  // The HTTP status code of GET `path` on the metrics port, as curl prints it.
  [[nodiscard]] std::string http_status(const std::string& path) const {
    const std::string cmd =
        "curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:" +
        std::to_string(metrics_port_) + path;
    FILE* p = ::popen(cmd.c_str(), "r");
    char buf[16] = {0};
    if (p) {
      (void)std::fgets(buf, sizeof(buf), p);
      ::pclose(p);
    }
    return buf;
  }

 private:
  static inline int counter_ = 0;
  DaemonConfig cfg_;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
  int port_ = 0, metrics_port_ = 0;
};

// Field `field` (numbered as in proc(5): 19 is the nice value, 41 the scheduling policy) of
// /proc/<pid>/task/<tid>/stat for each thread of `pid` (0: this process) named `name` (empty:
// every thread).
inline std::vector<int> thread_stat_field(pid_t pid, int field, const std::string& name = "") {
  std::vector<int> out;
  const std::string tasks =
      "/proc/" + (pid == 0 ? std::string("self") : std::to_string(pid)) + "/task/";
  for (const pid_t tid : thread_ids(pid, name)) {
    std::ifstream in(tasks + std::to_string(tid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t close = stat.rfind(')');  // the command name may hold spaces
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    std::string value;
    for (int i = 3; i <= field && rest >> value; ++i) {
      if (i == field) out.push_back(std::stoi(value));
    }
  }
  return out;
}

}  // namespace myelin::broker::test_support
