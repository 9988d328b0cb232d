// myelin-run: a local launcher. Starts N ranks of a program on this machine with the bootstrap
// environment set, prefixes their output by rank, forwards SIGINT/SIGTERM/SIGHUP, and exits with
// the first failing rank's status (a rank killed by a signal: 128 + signal). Usage errors exit 2;
// the launcher's own errors (no temporary directory) exit 1.
//
//   myelin-run -n 4 myelin-bench allreduce -b 1K -e 1M
//
// Each rank gets MYELIN_RANK, MYELIN_SIZE, MYELIN_LOCAL_RANK, MYELIN_LOCAL_SIZE, MYELIN_NODE_ID=0
// and MYELIN_STORE=file://<dir>, a FileStore directory this launcher creates and removes.
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_checks.hpp"
#include "launcher.hpp"

int main(int argc, char** argv) {
  CLI::App app{"myelin-run: start N local ranks with the myelin bootstrap environment"};
  app.footer("usage: myelin-run [options] program [args...]");
  int n = 2;
  double timeout_s = 0;
  double grace_s = 5;
  bool no_prefix = false;
  bool keep_going = false;
  using myelin::tools::kMaxTimeoutSeconds;
  app.add_option("-n,--np", n, "number of ranks")->check(myelin::tools::integer_in(1, 1024));
  app.add_option("--timeout", timeout_s, "stop every rank after this many seconds (0 = none)")
      ->check(myelin::tools::finite_number(0, kMaxTimeoutSeconds));
  app.add_option("--grace", grace_s, "seconds between SIGTERM and SIGKILL when stopping ranks")
      ->check(myelin::tools::finite_number(0, kMaxTimeoutSeconds));
  app.add_flag("--no-prefix", no_prefix, "do not prefix output lines with [rank]");
  app.add_flag("--keep-going", keep_going, "let the other ranks run when one fails");
  // Everything from the first positional argument on is the program and its own arguments.
  app.prefix_command();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  std::vector<std::string> command = app.remaining();
  if (!command.empty() && command.front() == "--") {
    command.erase(command.begin());
  } else if (!command.empty() && command.front().starts_with("-")) {
    std::fprintf(stderr, "myelin-run: unknown option '%s'\n%s", command.front().c_str(),
                 app.help().c_str());
    return 2;
  }
  if (command.empty()) {
    std::fprintf(stderr, "myelin-run: no program given\n%s", app.help().c_str());
    return 2;
  }

  auto dir = myelin::tools::TempDir::create("myelin-run");
  if (!dir.ok()) {
    std::fprintf(stderr, "myelin-run: %s\n", dir.status().to_string().c_str());
    return 1;
  }
  std::vector<myelin::tools::ProcessSpec> ranks;
  for (int i = 0; i < n; ++i) {
    const std::string r = std::to_string(i), size = std::to_string(n);
    ranks.push_back({command,
                     {{"MYELIN_RANK", r},
                      {"MYELIN_SIZE", size},
                      {"MYELIN_LOCAL_RANK", r},
                      {"MYELIN_LOCAL_SIZE", size},
                      {"MYELIN_NODE_ID", "0"},
                      {"MYELIN_STORE", "file://" + dir->path()}},
                     no_prefix ? std::string() : r,
                     /*inherit_output=*/false,
                     /*program=*/{},
                     "rank " + r});
  }
  auto rc =
      myelin::tools::run_processes(ranks, {.timeout = std::chrono::duration<double>(timeout_s),
                                           .grace = std::chrono::duration<double>(grace_s),
                                           .keep_going = keep_going,
                                           .name = "myelin-run"});
  if (!rc.ok()) {
    std::fprintf(stderr, "myelin-run: %s\n", rc.status().to_string().c_str());
    return 1;
  }
  return *rc;
}
