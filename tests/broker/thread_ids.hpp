// The thread ids of a process's threads with a given name, read from /proc/<pid>/task/*/comm,
// for tests that check what the broker's and the client's named threads were given (scheduling
// policy, nice value, CPU set).
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

namespace myelin::broker::test_support {

// The ids of the threads of `pid` (0: this process) named `name` (empty: every thread); an
// unreadable process gives none.
inline std::vector<pid_t> thread_ids(pid_t pid, const std::string& name = "") {
  std::vector<pid_t> out;
  const std::filesystem::path tasks =
      "/proc/" + (pid == 0 ? std::string("self") : std::to_string(pid)) + "/task";
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(tasks, ec)) {
    if (!name.empty()) {
      std::ifstream comm(e.path() / "comm");
      std::string got;
      if (!std::getline(comm, got) || got != name) continue;
    }
    out.push_back(static_cast<pid_t>(std::stoi(e.path().filename().string())));
  }
  return out;
}

}  // namespace myelin::broker::test_support
