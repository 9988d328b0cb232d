// Process supervision for the local launchers: fork/exec, prefixed output, signals, exit codes.
#include "launcher.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>

namespace myelin::tools {
namespace {

volatile sig_atomic_t g_signal = 0;  // written by the handler, read by the supervision loop
void on_signal(int sig) {
  g_signal = sig;
}

struct Child {
  const ProcessSpec* spec = nullptr;
  pid_t pid = -1;
  int out_fd = -1;      // the child's stdout and stderr, merged
  int pid_fd = -1;      // readable once the child has exited; -1 without pidfd_open (< 5.3)
  std::string pending;  // a partial line waiting for its newline
  bool exited = false;
  bool signaled = false;  // killed by a signal (not an exit status)
  int exit_code = 0;      // 128 + signal for a killed process, like a shell
};

// "rank 3" (the spec's name), its label, or the program.
std::string display_name(const ProcessSpec& spec) {
  if (!spec.name.empty()) return spec.name;
  if (!spec.label.empty()) return spec.label;
  return spec.argv[0];
}

// "was killed by signal 9 (SIGKILL)" or "exited with status 2".
std::string failure_text(const Child& c) {
  if (!c.signaled) return "exited with status " + std::to_string(c.exit_code);
  const int sig = c.exit_code - 128;
  const char* abbrev = ::sigabbrev_np(sig);
  return "was killed by signal " + std::to_string(sig) +
         (abbrev != nullptr ? std::string(" (SIG") + abbrev + ")" : std::string());
}

void write_all(int fd, const std::string& text) {
  size_t off = 0;
  while (off < text.size()) {
    const ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

// Emits complete lines with the child's prefix; `flush` emits the remainder too.
void emit_lines(Child& c, bool flush) {
  const std::string prefix = c.spec->label.empty() ? "" : "[" + c.spec->label + "] ";
  std::string out;
  size_t start = 0;
  for (size_t nl; (nl = c.pending.find('\n', start)) != std::string::npos; start = nl + 1) {
    out += prefix;
    out.append(c.pending, start, nl - start + 1);
  }
  c.pending.erase(0, start);
  if (flush && !c.pending.empty()) {
    out += prefix + c.pending + "\n";
    c.pending.clear();
  }
  if (!out.empty()) write_all(STDOUT_FILENO, out);
}

Status spawn(Child& c) {
  int fds[2] = {-1, -1};
  if (!c.spec->inherit_output && ::pipe2(fds, O_CLOEXEC) != 0) return errno_status("pipe2", errno);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    if (fds[0] >= 0) ::close(fds[0]);
    if (fds[1] >= 0) ::close(fds[1]);
    return errno_status("fork", err);
  }
  if (pid == 0) {
    ::setpgid(0, 0);  // own process group: signals reach the process's children too
    // A launcher killed outright (SIGKILL, OOM) cannot stop its processes: the kernel does, with
    // SIGTERM when the launcher dies (also if it died before this line).
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(128 + SIGTERM);
    if (fds[1] >= 0) {
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
    }
    for (const auto& [key, value] : c.spec->env) ::setenv(key.c_str(), value.c_str(), 1);
    std::vector<char*> args;
    for (const auto& a : c.spec->argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const char* file = c.spec->program.empty() ? args[0] : c.spec->program.c_str();
    ::execvp(file, args.data());
    std::fprintf(stderr, "cannot execute '%s': %s\n", file, std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also here, so the group exists before we might signal it
  if (fds[1] >= 0) ::close(fds[1]);
  c.pid = pid;
  c.out_fd = fds[0];
  c.pid_fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (c.pid_fd >= 0) ::fcntl(c.pid_fd, F_SETFD, FD_CLOEXEC);
  return ok_status();
}

void signal_all(std::vector<Child>& children, int sig) {
  for (auto& c : children) {
    if (!c.exited && c.pid > 0) ::kill(-c.pid, sig);
  }
}

void drain_output(Child& c) {
  if (c.out_fd < 0) return;
  char buf[65536];
  ssize_t got;
  while ((got = ::read(c.out_fd, buf, sizeof(buf))) > 0) c.pending.append(buf, size_t(got));
  emit_lines(c, true);
  ::close(c.out_fd);
  c.out_fd = -1;
}

}  // namespace

Result<int> run_processes(const std::vector<ProcessSpec>& processes, const LaunchOptions& options) {
  if (processes.empty()) return invalid_argument("no processes to launch");
  for (const auto& p : processes) {
    if (p.argv.empty()) return invalid_argument("a process has an empty command line");
  }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction saved[3];
  const int forwarded[3] = {SIGINT, SIGTERM, SIGHUP};
  for (int i = 0; i < 3; ++i) ::sigaction(forwarded[i], &sa, &saved[i]);
  g_signal = 0;

  std::vector<Child> children(processes.size());
  Status spawn_error;
  for (size_t i = 0; i < processes.size(); ++i) {
    children[i].spec = &processes[i];
    spawn_error = spawn(children[i]);
    if (!spawn_error.ok()) {
      spawn_error.with_context("starting " + processes[i].argv[0]);
      children.resize(i);
      break;
    }
  }

  // Deadline::after saturates: a timeout too large for the clock is no deadline at all (a cast to
  // nanoseconds first would overflow into the past and stop the job at once).
  const Deadline job_deadline =
      options.timeout.count() > 0 ? Deadline::after(options.timeout) : Deadline::never();
  const auto grace = options.grace;
  Deadline kill_deadline = Deadline::never();
  bool stopping = false;
  auto begin_stop = [&](const char* why) {
    if (stopping) return;
    stopping = true;
    if (why) std::fprintf(stderr, "%s: %s; stopping the other processes\n", options.name, why);
    signal_all(children, SIGTERM);
    kill_deadline = Deadline::after(grace);
  };
  if (!spawn_error.ok()) begin_stop(nullptr);

  int first_failure = -1;
  bool failure_reported = false;
  Deadline settle_deadline = Deadline::never();
  size_t running = children.size();
  while (running > 0) {
    if (g_signal != 0) {
      const int sig = g_signal;
      g_signal = 0;
      std::fprintf(stderr, "%s: got signal %d; forwarding it\n", options.name, sig);
      signal_all(children, sig);
      if (!stopping) {
        stopping = true;
        kill_deadline = Deadline::after(grace);
      }
    }
    if (!stopping && job_deadline.expired()) begin_stop("job timeout reached");
    if (stopping && kill_deadline.expired()) {
      signal_all(children, SIGKILL);
      kill_deadline = Deadline::never();
    }

    // Sleep until output arrives or a child exits (its pidfd turns readable); wake at least every
    // 100 ms to check the deadlines and to reap children that have no pidfd.
    std::vector<pollfd> pfds;
    std::vector<Child*> owners;
    for (auto& c : children) {
      if (c.out_fd >= 0) {
        pfds.push_back({c.out_fd, POLLIN, 0});
        owners.push_back(&c);
      }
    }
    const size_t outputs = pfds.size();
    for (auto& c : children) {
      if (!c.exited && c.pid_fd >= 0) pfds.push_back({c.pid_fd, POLLIN, 0});
    }
    ::poll(pfds.data(), pfds.size(), 100);
    for (size_t i = 0; i < outputs; ++i) {
      if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      const ssize_t got = ::read(pfds[i].fd, buf, sizeof(buf));
      if (got > 0) {
        owners[i]->pending.append(buf, static_cast<size_t>(got));
        emit_lines(*owners[i], false);
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        drain_output(*owners[i]);
      }
    }
    for (size_t i = 0; i < children.size(); ++i) {
      Child& c = children[i];
      if (c.exited) continue;
      int status = 0;
      if (::waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
      c.exited = true;
      --running;
      if (c.pid_fd >= 0) {
        ::close(c.pid_fd);
        c.pid_fd = -1;
      }
      c.signaled = WIFSIGNALED(status);
      c.exit_code = c.signaled ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
      if (c.exit_code == 0 || stopping || failure_reported) continue;
      // The first failure, unless a death by signal comes with or soon after it: the peers of a
      // killed process fail because of it, and may be reaped first.
      if (first_failure < 0) {
        first_failure = static_cast<int>(i);
        settle_deadline = Deadline::after(kFailureSettle);
      } else if (c.signaled && !children[static_cast<size_t>(first_failure)].signaled) {
        first_failure = static_cast<int>(i);
      }
    }
    if (first_failure >= 0 && !failure_reported) {
      const Child& f = children[static_cast<size_t>(first_failure)];
      if (f.signaled || stopping || running == 0 || settle_deadline.expired()) {
        failure_reported = true;
        std::fprintf(stderr, "%s: %s %s\n", options.name, display_name(*f.spec).c_str(),
                     failure_text(f).c_str());
        if (!options.keep_going) begin_stop(nullptr);
      }
    }
  }
  for (auto& c : children) drain_output(c);
  for (int i = 0; i < 3; ++i) ::sigaction(forwarded[i], &saved[i], nullptr);

  if (!spawn_error.ok()) return spawn_error;
  if (first_failure >= 0) return children[static_cast<size_t>(first_failure)].exit_code;
  for (const auto& c : children) {
    if (c.exit_code != 0) return c.exit_code;  // stopped by a signal or the timeout
  }
  return 0;
}

Result<TempDir> TempDir::create(const std::string& prefix) {
  std::string templ = "/tmp/" + prefix + ".XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) return errno_status("mkdtemp " + templ, errno);
  return TempDir(templ);
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace myelin::tools
