// myelin-run: a local launcher. Starts N ranks of a program on this machine with the bootstrap
// environment set, prefixes their output by rank, forwards SIGINT/SIGTERM/SIGHUP, and exits with
// the first failing rank's status.
//
//   myelin-run -n 4 myelin-bench allreduce -b 1K -e 1M
//
// Each rank gets MYELIN_RANK, MYELIN_SIZE, MYELIN_LOCAL_RANK, MYELIN_LOCAL_SIZE, MYELIN_NODE_ID=0
// and MYELIN_STORE=file://<dir>, a FileStore directory this launcher creates and removes.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace {

volatile sig_atomic_t g_signal = 0;  // written by the handler, read by the main loop
void on_signal(int sig) {
  g_signal = sig;
}

struct Rank {
  int index = 0;
  pid_t pid = -1;
  int out_fd = -1;      // the child's stdout and stderr, merged
  std::string pending;  // a partial line waiting for its newline
  bool exited = false;
  int exit_code = 0;  // 128 + signal for a killed rank, like a shell
};

void write_all(int fd, const std::string& text) {
  size_t off = 0;
  while (off < text.size()) {
    const ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

// Emits complete lines from the rank's buffer with a "[rank] " prefix; `flush` emits the remainder.
void emit_lines(Rank& r, bool prefix, bool flush) {
  std::string out;
  size_t start = 0;
  for (size_t nl; (nl = r.pending.find('\n', start)) != std::string::npos; start = nl + 1) {
    if (prefix) out += "[" + std::to_string(r.index) + "] ";
    out.append(r.pending, start, nl - start + 1);
  }
  r.pending.erase(0, start);
  if (flush && !r.pending.empty()) {
    if (prefix) out += "[" + std::to_string(r.index) + "] ";
    out += r.pending + "\n";
    r.pending.clear();
  }
  if (!out.empty()) write_all(STDOUT_FILENO, out);
}

myelin::Result<pid_t> spawn(Rank& r, int size, const std::string& store,
                            const std::vector<std::string>& argv) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return myelin::errno_status("pipe2", errno);
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return myelin::errno_status("fork", err);
  }
  if (pid == 0) {
    ::setpgid(0, 0);  // own process group: signals reach the rank's children too
    ::dup2(fds[1], STDOUT_FILENO);
    ::dup2(fds[1], STDERR_FILENO);
    const std::string rank = std::to_string(r.index), n = std::to_string(size);
    ::setenv("MYELIN_RANK", rank.c_str(), 1);
    ::setenv("MYELIN_SIZE", n.c_str(), 1);
    ::setenv("MYELIN_LOCAL_RANK", rank.c_str(), 1);
    ::setenv("MYELIN_LOCAL_SIZE", n.c_str(), 1);
    ::setenv("MYELIN_NODE_ID", "0", 1);
    ::setenv("MYELIN_STORE", store.c_str(), 1);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "myelin-run: cannot execute '%s': %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also here, so the group exists before we might signal it
  ::close(fds[1]);
  r.pid = pid;
  r.out_fd = fds[0];
  return pid;
}

void signal_all(std::vector<Rank>& ranks, int sig) {
  for (auto& r : ranks) {
    if (!r.exited && r.pid > 0) ::kill(-r.pid, sig);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"myelin-run: start N local ranks with the myelin bootstrap environment"};
  int n = 2;
  double timeout_s = 0;
  double grace_s = 5;
  bool no_prefix = false;
  bool keep_going = false;
  std::vector<std::string> command;
  app.add_option("-n,--np", n, "number of ranks")->check(CLI::Range(1, 1024));
  app.add_option("--timeout", timeout_s, "kill every rank after this many seconds (0 = none)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--grace", grace_s, "seconds between SIGTERM and SIGKILL when stopping ranks")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--no-prefix", no_prefix, "do not prefix output lines with [rank]");
  app.add_flag("--keep-going", keep_going, "let the other ranks run when one fails");
  // Everything from the first positional argument on is the program and its own arguments.
  app.prefix_command();
  app.footer("usage: myelin-run [options] program [args...]");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return e.get_exit_code() == 0 ? 0 : (rc == 0 ? 0 : 2);
  }
  command = app.remaining();
  if (!command.empty() && command.front() == "--")
    command.erase(command.begin());
  else if (!command.empty() && command.front().starts_with("-")) {
    std::fprintf(stderr, "myelin-run: unknown option '%s'\n%s", command.front().c_str(),
                 app.help().c_str());
    return 2;
  }
  if (command.empty()) {
    std::fprintf(stderr, "myelin-run: no program given\n%s", app.help().c_str());
    return 2;
  }

  char dir_template[] = "/tmp/myelin-run.XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) {
    std::perror("myelin-run: mkdtemp");
    return 1;
  }
  const std::string store_dir = dir_template;
  const std::string store = "file://" + store_dir;

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);

  std::vector<Rank> ranks(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    ranks[static_cast<size_t>(i)].index = i;
    auto pid = spawn(ranks[static_cast<size_t>(i)], n, store, command);
    if (!pid.ok()) {
      std::fprintf(stderr, "myelin-run: rank %d: %s\n", i, pid.status().to_string().c_str());
      signal_all(ranks, SIGKILL);
      n = i;
      ranks.resize(static_cast<size_t>(i));
      break;
    }
  }

  const myelin::Deadline job_deadline =
      timeout_s > 0 ? myelin::Deadline::after(std::chrono::duration<double>(timeout_s))
                    : myelin::Deadline::never();
  myelin::Deadline kill_deadline = myelin::Deadline::never();
  int first_failure = -1;  // rank index
  bool stopping = false;
  auto begin_stop = [&](const char* why) {
    if (stopping) return;
    stopping = true;
    if (why) std::fprintf(stderr, "myelin-run: %s; stopping the other ranks\n", why);
    signal_all(ranks, SIGTERM);
    kill_deadline = myelin::Deadline::after(std::chrono::duration<double>(grace_s));
  };

  size_t running = ranks.size();
  while (running > 0) {
    if (g_signal != 0) {
      const int sig = g_signal;
      g_signal = 0;
      std::fprintf(stderr, "myelin-run: got signal %d; forwarding to every rank\n", sig);
      signal_all(ranks, sig);
      if (!stopping) {
        stopping = true;
        kill_deadline = myelin::Deadline::after(std::chrono::duration<double>(grace_s));
      }
    }
    if (!stopping && job_deadline.expired()) begin_stop("job timeout reached");
    if (stopping && kill_deadline.expired()) {
      signal_all(ranks, SIGKILL);
      kill_deadline = myelin::Deadline::never();
    }

    std::vector<pollfd> pfds;
    std::vector<Rank*> owners;
    for (auto& r : ranks) {
      if (r.out_fd >= 0) {
        pfds.push_back({r.out_fd, POLLIN, 0});
        owners.push_back(&r);
      }
    }
    // Wake at least every 100 ms to reap exits and check deadlines.
    ::poll(pfds.data(), pfds.size(), 100);
    for (size_t i = 0; i < pfds.size(); ++i) {
      if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      const ssize_t got = ::read(pfds[i].fd, buf, sizeof(buf));
      if (got > 0) {
        owners[i]->pending.append(buf, static_cast<size_t>(got));
        emit_lines(*owners[i], !no_prefix, false);
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        emit_lines(*owners[i], !no_prefix, true);
        ::close(owners[i]->out_fd);
        owners[i]->out_fd = -1;
      }
    }
    for (auto& r : ranks) {
      if (r.exited) continue;
      int status = 0;
      const pid_t got = ::waitpid(r.pid, &status, WNOHANG);
      if (got != r.pid) continue;
      r.exited = true;
      --running;
      r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (r.exit_code != 0 && first_failure < 0 && !stopping) {
        first_failure = r.index;
        std::fprintf(stderr, "myelin-run: rank %d exited with status %d\n", r.index, r.exit_code);
        if (!keep_going) begin_stop(nullptr);
      }
    }
  }
  for (auto& r : ranks) {
    if (r.out_fd >= 0) {
      char buf[65536];
      ssize_t got;
      while ((got = ::read(r.out_fd, buf, sizeof(buf))) > 0) r.pending.append(buf, size_t(got));
      emit_lines(r, !no_prefix, true);
      ::close(r.out_fd);
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(store_dir, ec);

  if (first_failure >= 0) return ranks[static_cast<size_t>(first_failure)].exit_code;
  for (const auto& r : ranks) {
    if (r.exit_code != 0) return r.exit_code;  // stopped by a signal or the timeout
  }
  return 0;
}
