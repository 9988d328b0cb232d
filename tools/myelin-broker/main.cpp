// myelin-broker: runs a broker Server until SIGTERM/SIGINT, then drains gracefully.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>

#include <CLI/CLI.hpp>

#include <myelin/broker/server.hpp>
#include <myelin/core/log.hpp>

#include "config.hpp"

using namespace myelin;
using namespace myelin::broker;

int main(int argc, char** argv) {
  CLI::App app{"myelin-broker: message broker and parameter-server shard for ML clusters"};
  std::string config, listen, metrics_listen, secret_file, nic, log_level, port_file;
  int numa_node = -2;
  int64_t drain_ms = 5000;
  bool ps = false;
  std::string control_thread;
  int loop_nice = -1;
  std::string loop_scheduling, control_scheduling, control_cpus;
  int64_t control_cpus_hold_ms = 0;
  int64_t spin_before_block_us = -1;
  uint32_t ps_workers = 0;
  app.add_option("-c,--config", config, "TOML configuration file");
  app.add_option("--listen", listen, "client address host:port (port 0: any free port)");
  app.add_option("--metrics-listen", metrics_listen,
                 "HTTP /metrics and /healthz address ('' disables)");
  app.add_option("--secret-file", secret_file,
                 "file holding the job secret (else $MYELIN_BROKER_SECRET)");
  app.add_option("--numa-node", numa_node, "pin the I/O thread on this NUMA node");
  app.add_option("--nic", nic, "pin the I/O thread on the NUMA node of this NIC");
  app.add_option("--drain-timeout-ms", drain_ms, "how long SIGTERM waits for queues to empty");
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
  app.add_option("--ps-workers", ps_workers, "workers per parameter-server step");
  app.add_option("--port-file", port_file, "write '<port> <metrics port>' here once listening");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off");
  CLI11_PARSE(app, argc, argv);

  if (!log_level.empty()) {
    auto lvl = parse_log_level(log_level);
    if (!lvl) {
      std::cerr << "myelin-broker: bad --log-level '" << log_level << "'\n";
      return 2;
    }
    set_log_level(*lvl);
  }
  ServerOptions opts;
  if (!config.empty()) {
    Status s = tool::load_config_file(config, &opts);
    if (!s.ok()) {
      std::cerr << "myelin-broker: " << s << "\n";
      return 2;
    }
  }
  if (!listen.empty()) opts.listen = listen;
  if (app.count("--metrics-listen")) opts.metrics_listen = metrics_listen;
  if (numa_node != -2) opts.numa_node = numa_node;
  if (!nic.empty()) opts.nic = nic;
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
    return 2;
  }
  if (control_cpus_hold_ms > 0) opts.control_cpus_hold_ms = control_cpus_hold_ms;
  if (ps) opts.enable_ps = true;
  if (ps_workers) opts.ps.num_workers = ps_workers;
  if (!secret_file.empty()) {
    auto s = tool::read_secret_file(secret_file);
    if (!s.ok()) {
      std::cerr << "myelin-broker: " << s.status() << "\n";
      return 2;
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
    return 1;
  }
  Status s = (*server)->start();
  if (!s.ok()) {
    std::cerr << "myelin-broker: " << s << "\n";
    return 1;
  }
  std::printf("myelin-broker listening on port %u, metrics on %u\n", (*server)->port(),
              (*server)->metrics_port());
  std::fflush(stdout);
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    if (FILE* f = std::fopen(tmp.c_str(), "w")) {
      std::fprintf(f, "%u %u\n", (*server)->port(), (*server)->metrics_port());
      std::fclose(f);
      std::rename(tmp.c_str(), port_file.c_str());
    }
  }
  while (true) {
    timespec ts{1, 0};
    const int sig = sigtimedwait(&set, nullptr, &ts);
    if (sig == SIGTERM || sig == SIGINT) break;
  }
  std::fprintf(stderr, "myelin-broker: draining\n");
  s = (*server)->drain(Deadline::after_ms(drain_ms));
  if (!s.ok()) {
    std::fprintf(stderr, "myelin-broker: %s\n", s.to_string().c_str());
    return 1;
  }
  return 0;
}
