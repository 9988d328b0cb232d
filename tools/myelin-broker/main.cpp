// myelin-broker: runs a broker Server until SIGTERM/SIGINT, then drains gracefully.
//
// Exit codes: 0 drained (or --help), 1 the broker failed at or after start (an address in use, a
// port file it cannot write, a drain that timed out), 2 a usage or configuration error (a flag,
// the config file, the secret, an option Server::create() refuses as invalid_argument).
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include <CLI/CLI.hpp>

#include <myelin/broker/secret.hpp>
#include <myelin/broker/server.hpp>
#include <myelin/core/log.hpp>

#include "cli_checks.hpp"
#include "config.hpp"

using namespace myelin;
using namespace myelin::broker;

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

// Writes "<port> <metrics port>\n" to `path` through a temporary file and a rename, so a reader
// never sees half of it.
Status write_port_file(const std::string& path, uint16_t port, uint16_t metrics_port) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f) return errno_status("writing port file '" + tmp + "'", errno);
  const bool written = std::fprintf(f, "%u %u\n", port, metrics_port) > 0;
  const int err = errno;
  if (std::fclose(f) != 0 || !written) {
    ::unlink(tmp.c_str());
    return errno_status("writing port file '" + tmp + "'", written ? errno : err);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int rename_err = errno;
    ::unlink(tmp.c_str());
    return errno_status("renaming '" + tmp + "' to port file '" + path + "'", rename_err);
  }
  return ok_status();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"myelin-broker: message broker and parameter-server shard for ML clusters"};
  std::string config, listen, metrics_listen, secret_file, nic, log_level, port_file;
  int numa_node = -1;
  int64_t drain_ms = 5000;
  bool ps = false;
  std::string control_thread;
  int loop_nice = -1;
  std::string loop_scheduling, control_scheduling, control_cpus;
  int64_t control_cpus_hold_ms = 0;
  int64_t spin_before_block_us = -1;
  uint32_t ps_workers = 0;
  app.add_option("-c,--config", config, "TOML configuration file");
  app.add_option("--listen", listen, "client address host:port (port 0: any free port)")
      ->check(tools::non_empty());
  app.add_option("--metrics-listen", metrics_listen,
                 "HTTP /metrics and /healthz address ('' disables)");
  app.add_option("--secret-file", secret_file,
                 "file holding the job secret (else $MYELIN_BROKER_SECRET)");
  auto* numa_opt = app.add_option("--numa-node", numa_node, "pin the I/O thread on this NUMA node")
                       ->check(CLI::Range(-1, kMaxNumaNode));
  app.add_option("--nic", nic, "pin the I/O thread on the NUMA node of this NIC")
      ->excludes(numa_opt);
  app.add_option("--drain-timeout-ms", drain_ms,
                 "0..3600000: how long SIGTERM waits for queues to empty (default 5000)")
      ->check(CLI::Range(int64_t{0}, int64_t{3'600'000}));
  app.add_option("--control-thread", control_thread,
                 "on|off: serve control connections on a thread of their own (default on)")
      ->check(CLI::IsMember({"on", "off"}));
  app.add_option("--loop-nice", loop_nice,
                 "0..19: with the control thread, the bulk loop thread's nice value (default 0)")
      ->check(CLI::Range(0, 19));
  app.add_option("--loop-scheduling", loop_scheduling,
                 "normal|idle: with the control thread, how the bulk loop thread is scheduled "
                 "(idle: SCHED_IDLE; default normal)")
      ->check(CLI::IsMember({"normal", "idle"}));
  app.add_option("--control-scheduling", control_scheduling,
                 "normal|rr: how the control thread is scheduled (rr: SCHED_RR priority 1, needs "
                 "CAP_SYS_NICE or RLIMIT_RTPRIO; default normal)")
      ->check(CLI::IsMember({"normal", "rr"}));
  app.add_option("--control-cpus", control_cpus,
                 "CPU list (\"0\", \"0-1,4\"; \"none\"): keep bulk threads off these CPUs while "
                 "control traffic flows (default none)");
  app.add_option("--control-cpus-hold-ms", control_cpus_hold_ms,
                 "1..3600000: how long the last control message keeps --control-cpus in force "
                 "(default 200)")
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}));
  app.add_option("--spin-before-block-us", spin_before_block_us,
                 "0..100000: the control and loop threads look again without blocking for up to "
                 "this long after work before they sleep (default 50)")
      ->check(CLI::Range(int64_t{0}, int64_t{100'000}));
  app.add_flag("--ps", ps, "serve a parameter-server shard");
  app.add_option("--ps-workers", ps_workers, "workers per parameter-server step")
      ->check(CLI::Range(uint32_t{1}, kMaxPsWorkers));
  app.add_option("--port-file", port_file, "write '<port> <metrics port>' here once listening");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's own codes (104..114) are not documented: every usage error exits 2.
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }

  if (!log_level.empty()) {
    auto lvl = parse_log_level(log_level);
    if (!lvl) {
      std::cerr << "myelin-broker: bad --log-level '" << log_level << "'\n";
      return kExitUsage;
    }
    set_log_level(*lvl);
  }
  ServerOptions opts;
  if (!config.empty()) {
    Status s = tool::load_config_file(config, &opts);
    if (!s.ok()) {
      std::cerr << "myelin-broker: " << s << "\n";
      return kExitUsage;
    }
  }
  if (app.count("--listen")) opts.listen = listen;
  if (app.count("--metrics-listen")) opts.metrics_listen = metrics_listen;
  // A flag replaces the file's placement, whichever of the two exclusive keys the file used.
  if (app.count("--numa-node")) {
    opts.numa_node = numa_node;
    opts.nic.clear();
  }
  if (app.count("--nic")) {
    opts.nic = nic;
    opts.numa_node = -1;
  }
  if (!control_thread.empty()) opts.control_thread = control_thread == "on";
  if (loop_nice >= 0) opts.loop_nice = loop_nice;
  if (spin_before_block_us >= 0) opts.spin_before_block_us = spin_before_block_us;
  // A scheduling or CPU flag given: parsed into `out`; false (reported) when its value is refused.
  auto set_parsed = [](const std::string& flag, const std::string& text, auto parse, auto* out) {
    if (text.empty()) return true;
    auto parsed = parse(text);
    if (!parsed.ok()) {
      std::cerr << "myelin-broker: " << flag << ": " << parsed.status() << "\n";
      return false;
    }
    *out = *parsed;
    return true;
  };
  if (!set_parsed("--loop-scheduling", loop_scheduling, parse_bulk_scheduling,
                  &opts.loop_scheduling) ||
      !set_parsed("--control-scheduling", control_scheduling, parse_control_scheduling,
                  &opts.control_scheduling) ||
      !set_parsed("--control-cpus", control_cpus, parse_control_cpu_list, &opts.control_cpus)) {
    return kExitUsage;
  }
  if (control_cpus_hold_ms > 0) opts.control_cpus_hold_ms = control_cpus_hold_ms;
  if (ps) opts.enable_ps = true;
  if (ps_workers) opts.ps.num_workers = ps_workers;
  if (!secret_file.empty()) {
    auto s = read_secret_file(secret_file);
    if (!s.ok()) {
      std::cerr << "myelin-broker: " << s.status() << "\n";
      return kExitUsage;
    }
    opts.secret = *s;
  } else if (opts.secret.empty()) {
    if (const char* env = std::getenv("MYELIN_BROKER_SECRET")) opts.secret = env;
  }

  // Block the stop signals before any thread starts so only sigtimedwait below sees them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto server = Server::create(opts);
  if (!server.ok()) {
    std::cerr << "myelin-broker: " << server.status() << "\n";
    // An option refused (a range, a conflict) is a configuration error like the file's own.
    return server.status().code() == StatusCode::kInvalidArgument ? kExitUsage : kExitFailed;
  }
  Status s = (*server)->start();
  if (!s.ok()) {
    std::cerr << "myelin-broker: " << s << "\n";
    return kExitFailed;
  }
  if (!port_file.empty()) {
    // A supervisor waits for this file: one that cannot be written stops the broker at once.
    s = write_port_file(port_file, (*server)->port(), (*server)->metrics_port());
    if (!s.ok()) {
      std::cerr << "myelin-broker: " << s << "\n";
      (*server)->stop();
      return kExitFailed;
    }
  }
  std::printf("myelin-broker listening on port %u, metrics on %u\n", (*server)->port(),
              (*server)->metrics_port());
  std::fflush(stdout);
  while (true) {
    timespec ts{1, 0};
    const int sig = sigtimedwait(&set, nullptr, &ts);
    if (sig == SIGTERM || sig == SIGINT) break;
  }
  std::fprintf(stderr, "myelin-broker: draining\n");
  s = (*server)->drain(Deadline::after_ms(drain_ms));
  if (!s.ok()) {
    std::fprintf(stderr, "myelin-broker: %s\n", s.to_string().c_str());
    return kExitFailed;
  }
  return 0;
}
