// Multi-process harness of the collectives tests: forks N ranks, each with its own transport
// Context and a Communicator bootstrapped through a directory store in a fresh temp directory;
// collects each rank's outcome. Ranks report through files and exit codes (a child cannot use
// gtest assertions: it has its own copy of the test state).
#pragma once

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <myelin/collectives/collectives.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/transport/context.hpp>
#include <myelin/transport/store.hpp>

namespace myelin::collectives::testing {

namespace fs = std::filesystem;

// A Store over a local directory: one file per key, written by rename so readers never see half a
// value. (The tests' own bootstrap; the transport's stores are tested with the transport.)
class DirStore final : public transport::Store {
 public:
  explicit DirStore(std::string dir) : dir_(std::move(dir)) { fs::create_directories(dir_); }
  using transport::Store::set;
  Status set(std::string_view key, std::span<const uint8_t> value) override {
    const std::string tmp = path(key) + ".tmp." + std::to_string(getpid());
    {
      std::ofstream out(tmp, std::ios::binary);
      out.write(reinterpret_cast<const char*>(value.data()),
                static_cast<std::streamsize>(value.size()));
      if (!out) return io_error("writing ", tmp);
    }
    if (std::rename(tmp.c_str(), path(key).c_str()) != 0) return errno_status("rename", errno);
    return ok_status();
  }
  Result<std::vector<uint8_t>> get(std::string_view key, Deadline deadline) override {
    for (;;) {
      std::ifstream in(path(key), std::ios::binary);
      if (in) return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
      if (deadline.expired()) return timeout_error("store key '", key, "' never appeared");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling a file, bounded
    }
  }
  Result<int64_t> add(std::string_view key, int64_t delta) override {
    const std::string lock = path(key) + ".lock";
    const int fd = ::open(lock.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) return errno_status("open lock", errno);
    ::flock(fd, LOCK_EX);
    int64_t v = 0;
    {
      std::ifstream in(path(key));
      in >> v;
    }
    v += delta;
    const std::string text = std::to_string(v);
    Status s = set(key, std::string_view(text));
    ::flock(fd, LOCK_UN);
    ::close(fd);
    if (!s.ok()) return s;
    return v;
  }
  Result<bool> contains(std::string_view key) override { return fs::exists(path(key)); }

 private:
  std::string path(std::string_view key) const {
    std::string k(key);
    for (char& c : k) {
      if (c == '/') c = '_';
    }
    return dir_ + "/" + k;
  }
  std::string dir_;
};

struct WorldSpec {
  int ranks = 2;
  transport::Backend backend = transport::Backend::kTcp;
  // Per rank, when not empty (a group that mixes shm and TCP): overrides `backend`.
  std::vector<transport::Backend> backend_of_rank;
  // > 0: pretend ranks r / ranks_per_node share a node (exercises the hierarchical algorithm).
  int ranks_per_node = 0;
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
  // Spin-then-block by default: 2 cores shared by up to 8 ranks and other tests.
  transport::ProgressMode progress = transport::ProgressMode::kSpinThenBlock;
  // Per rank, when not empty: the one CPU the rank binds itself to before it opens its Context.
  std::vector<int> cpu_of_rank;
};

struct RankCtx {
  int rank = 0;
  int size = 0;
  std::string dir;  // shared temp directory, for the test's own files
  Communicator* comm = nullptr;
};

struct Outcome {
  std::vector<int> exit_codes;        // 0 = the rank's body returned OK; -1 = killed by harness
  std::vector<std::string> messages;  // each rank's final status text
  std::string dir;
  [[nodiscard]] bool all_ok() const {
    for (int c : exit_codes) {
      if (c != 0) return false;
    }
    return true;
  }
  [[nodiscard]] std::string summary() const {
    std::ostringstream os;
    for (size_t i = 0; i < exit_codes.size(); ++i) {
      os << "\n  rank " << i << " exit " << exit_codes[i] << ": " << messages[i];
    }
    return os.str();
  }
};

inline std::string read_file(const std::string& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
inline void write_file(const std::string& p, const std::string& text) {
  std::ofstream(p) << text;
}

inline std::string make_temp_dir() {
  std::string tmpl = (fs::temp_directory_path() / "myelin-coll-XXXXXX").string();
  const char* d = mkdtemp(tmpl.data());
  return d ? std::string(d) : std::string();
}

using RankBody = std::function<Status(RankCtx&)>;
// Called in the parent once every rank is forked (fault injection).
using ParentAction = std::function<void(const std::vector<pid_t>&, const std::string& dir)>;

inline Outcome run_world(const WorldSpec& spec, const RankBody& body,
                         const ParentAction& parent = {},
                         std::chrono::seconds limit = std::chrono::seconds(240)) {
  Outcome out;
  out.dir = make_temp_dir();
  std::vector<pid_t> pids;
  for (int r = 0; r < spec.ranks; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      Status s = [&]() -> Status {
        if (!spec.cpu_of_rank.empty()) {
          cpu_set_t one;
          CPU_ZERO(&one);
          CPU_SET(spec.cpu_of_rank[static_cast<size_t>(r)], &one);
          if (sched_setaffinity(0, sizeof(one), &one) != 0) {
            return errno_status(
                "binding to CPU " + std::to_string(spec.cpu_of_rank[static_cast<size_t>(r)]),
                errno);
          }
        }
        DirStore store(out.dir + "/store");
        transport::Options o;
        o.backend = spec.backend_of_rank.empty() ? spec.backend
                                                 : spec.backend_of_rank[static_cast<size_t>(r)];
        o.listen_address = "127.0.0.1";
        o.progress = spec.progress;
        o.timeout = spec.timeout;
        o.name = "rank " + std::to_string(r);
        MYELIN_ASSIGN_OR_RETURN(auto ctx, transport::Context::create(o));
        CommunicatorOptions co;
        co.rank = r;
        co.size = spec.ranks;
        co.context = ctx.get();
        co.store = &store;
        co.timeout = spec.timeout;
        if (spec.ranks_per_node > 0) co.node_id = "node" + std::to_string(r / spec.ranks_per_node);
        MYELIN_ASSIGN_OR_RETURN(auto comm, Communicator::create(co));
        RankCtx rc{r, spec.ranks, out.dir, comm.get()};
        return body(rc);
      }();
      write_file(out.dir + "/result." + std::to_string(r), s.to_string());
      std::fflush(nullptr);
      _exit(s.ok() ? 0 : 1);
    }
    pids.push_back(pid);
  }
  if (parent) parent(pids, out.dir);
  out.exit_codes.assign(pids.size(), -1);
  const Deadline deadline = Deadline::after(limit);
  size_t left = pids.size();
  while (left > 0 && !deadline.expired()) {
    int status = 0;
    const pid_t done = waitpid(-1, &status, WNOHANG);
    if (done <= 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling children, bounded
      continue;
    }
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] == done) {
        out.exit_codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        --left;
      }
    }
  }
  for (size_t i = 0; i < pids.size(); ++i) {  // hung ranks: the test fails, nothing leaks
    if (out.exit_codes[i] == -1) {
      kill(pids[i], SIGKILL);
      kill(pids[i], SIGCONT);
      waitpid(pids[i], nullptr, 0);
    }
    out.messages.push_back(read_file(out.dir + "/result." + std::to_string(i)));
  }
  return out;
}

}  // namespace myelin::collectives::testing
