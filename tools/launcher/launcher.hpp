// tools/launcher/launcher.hpp — starts a group of local processes and supervises them.
//
// Each process gets its own environment additions, its stdout and stderr merged into one pipe
// whose lines are re-emitted with a "[label] " prefix (whole lines only, so ranks never interleave
// mid-line). SIGINT/SIGTERM/SIGHUP sent to the launcher are forwarded to every process group; when
// one process fails, the others get SIGTERM and, after a grace period, SIGKILL; a job timeout
// does the same. The result is the first failing process's exit status (128 + signal when killed),
// reported as "rank 1 was killed by signal 9 (SIGKILL)" or "rank 2 exited with status 2". A process
// killed by a signal makes its peers fail soon after with their own exit status; the launcher
// therefore waits a moment (kFailureSettle) after an exit-status failure, and names a process
// killed by a signal in that time instead. Timeouts of any size are fine: a huge one is no
// deadline. A launcher that is itself killed outright still stops its processes: each gets SIGTERM
// from the kernel when the launcher dies (PR_SET_PDEATHSIG).
//
// Thread safety: run() installs signal handlers and must be called from the main thread, once at a
// time.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin::tools {

struct ProcessSpec {
  std::vector<std::string> argv;                         // argv[0] is looked up in PATH
  std::vector<std::pair<std::string, std::string>> env;  // added to the inherited environment
  std::string label;                                     // output prefix; empty: no prefix
  bool inherit_output = false;  // write straight to the launcher's stdout/stderr (no prefix)
  std::string program;  // the file to execute instead of argv[0] (argv[0] is then only a name)
  std::string name;     // how the launcher's messages name it ("rank 3"); empty: label, or argv[0]
};

// How long an exit-status failure waits for a death by signal to be named instead.
inline constexpr std::chrono::milliseconds kFailureSettle{250};

struct LaunchOptions {
  std::chrono::duration<double> timeout{0};  // 0: none
  std::chrono::duration<double> grace{5};    // between SIGTERM and SIGKILL
  bool keep_going = false;                   // don't stop the others when one fails
  const char* name = "myelin-run";           // prefix of the launcher's own messages
};

// Runs every process to completion; returns the exit status described above.
Result<int> run_processes(const std::vector<ProcessSpec>& processes, const LaunchOptions& options);

// A fresh directory for a FileStore ("/tmp/<prefix>.XXXXXX"); removed by the returned guard.
class TempDir {
 public:
  static Result<TempDir> create(const std::string& prefix);
  TempDir(TempDir&& other) noexcept : path_(std::exchange(other.path_, {})) {}
  TempDir& operator=(TempDir&&) = delete;
  TempDir(const TempDir&) = delete;
  ~TempDir();
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

}  // namespace myelin::tools
