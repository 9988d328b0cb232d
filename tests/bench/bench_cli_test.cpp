// myelin-bench run as a child process: every sub-command at tiny sizes on every backend that opens
// here, checking the JSON lines (keys, types, sizes, #wrong = 0), the human table and CSV
// layouts, the exit code on wrong data (through the hidden --inject-wrong fault injection) and
// the refusal of bad arguments.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/transport/context.hpp>

#include "../transport/silent_listener.hpp"

namespace {

struct Outcome {
  bool started = false;  // popen succeeded
  int rc = -1;
  std::string out;
  std::vector<nlohmann::json> json;  // parsed lines (with --json)
};

// Runs a shell command line and collects its standard output and exit code.
Outcome shell(const std::string& cmd) {
  Outcome r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  r.started = true;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = ::pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

Outcome run(const std::string& args) {
  Outcome r = shell(std::string(MYELIN_BENCH_PATH) + " " + args + " --timeout 30 2>&1");
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] != '{') continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded()) r.json.push_back(j);
  }
  return r;
}

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  std::string line;
  while (std::getline(in, line)) out.push_back(line);
  return out;
}

// Whitespace-separated fields.
size_t fields(const std::string& line) {
  std::istringstream in(line);
  std::string f;
  size_t n = 0;
  while (in >> f) ++n;
  return n;
}

void expect_keys(const nlohmann::json& j, std::initializer_list<const char*> keys) {
  for (const char* k : keys) EXPECT_TRUE(j.contains(k)) << "missing " << k << " in " << j.dump();
}

void expect_latency_shape(const nlohmann::json& j) {
  expect_keys(j, {"bench", "transport", "size", "iters", "p50_us", "p90_us", "p99_us", "p999_us",
                  "max_us", "wrong"});
  EXPECT_EQ(j["wrong"], 0) << j.dump();
  EXPECT_GT(j["p50_us"].get<double>(), 0) << j.dump();
  EXPECT_LE(j["p50_us"].get<double>(), j["p90_us"].get<double>());
  EXPECT_LE(j["p90_us"].get<double>(), j["p99_us"].get<double>());
  EXPECT_LE(j["p99_us"].get<double>(), j["p999_us"].get<double>());
  EXPECT_LE(j["p999_us"].get<double>(), j["max_us"].get<double>());
}

void expect_bandwidth_shape(const nlohmann::json& j) {
  expect_keys(j, {"bench", "transport", "size", "iters", "window", "GBps", "msgs_per_s", "wrong"});
  EXPECT_EQ(j["wrong"], 0) << j.dump();
  EXPECT_GT(j["GBps"].get<double>(), 0) << j.dump();
  EXPECT_GT(j["msgs_per_s"].get<double>(), 0) << j.dump();
}

class BenchBackend : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto b = myelin::transport::parse_backend(GetParam());
    ASSERT_TRUE(b.ok());
    auto ctx = myelin::transport::Context::create({.backend = *b});
    if (!ctx.ok()) GTEST_SKIP() << GetParam() << " does not open here: " << ctx.status();
  }
  std::string t() const { return " -n 2 --transport " + GetParam() + " --json"; }
};

TEST_P(BenchBackend, Latency) {
  Outcome r = run("lat -s 0 -s 64 -s 8K --iters 100 --warmup 10" + t());
  ASSERT_EQ(r.rc, 0) << r.out;
  ASSERT_EQ(r.json.size(), 3u) << r.out;
  const size_t sizes[] = {0, 64, 8192};
  for (size_t i = 0; i < 3; ++i) {
    expect_latency_shape(r.json[i]);
    EXPECT_EQ(r.json[i]["bench"], "lat");
    EXPECT_EQ(r.json[i]["transport"], GetParam());
    EXPECT_EQ(r.json[i]["size"], sizes[i]);
    EXPECT_EQ(r.json[i]["iters"], 100);
  }
}

TEST_P(BenchBackend, BandwidthBothWays) {
  for (const char* mode : {"", " --bidir"}) {
    Outcome r = run(std::string("bw -b 1K -e 256K -f 16 --iters 50") + mode + t());
    ASSERT_EQ(r.rc, 0) << r.out;
    ASSERT_EQ(r.json.size(), 3u) << r.out;  // 1K, 16K, 256K (above tcp's eager limit)
    for (const auto& j : r.json) {
      expect_bandwidth_shape(j);
      EXPECT_EQ(j["bench"], "bw");
      EXPECT_EQ(j["direction"], *mode ? "bidir" : "uni");
    }
    EXPECT_EQ(r.json[2]["size"], 262144);
  }
}

TEST_P(BenchBackend, MessageRate) {
  Outcome r = run("rate -s 8 --iters 2000 --window 128" + t());
  ASSERT_EQ(r.rc, 0) << r.out;
  ASSERT_EQ(r.json.size(), 1u) << r.out;
  expect_bandwidth_shape(r.json[0]);
  EXPECT_EQ(r.json[0]["bench"], "rate");
  EXPECT_EQ(r.json[0]["window"], 128);
}

TEST_P(BenchBackend, PutAndGet) {
  for (const char* op : {"put", "get"}) {
    Outcome r = run(std::string(op) + " -s 8 -s 4K -s 128K --iters 50 --window 16" + t());
    ASSERT_EQ(r.rc, 0) << op << ": " << r.out;
    ASSERT_EQ(r.json.size(), 3u) << r.out;
    for (const auto& j : r.json) {
      expect_bandwidth_shape(j);
      EXPECT_EQ(j["bench"], op);
    }
  }
}

TEST_P(BenchBackend, WrongDataMakesTheExitCodeNonZero) {
  for (const char* c : {"lat", "bw", "bw --bidir", "rate", "put", "get"}) {
    Outcome r = run(std::string(c) + " -s 256 --iters 40 --window 8 --inject-wrong 3" + t());
    EXPECT_EQ(r.rc, 3) << c << ": " << r.out;
    ASSERT_EQ(r.json.size(), 1u) << c << ": " << r.out;
    EXPECT_GE(r.json[0]["wrong"].get<int>(), 1) << c;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, BenchBackend, ::testing::Values("tcp", "shm", "ucx"),
                         [](const auto& param_info) { return param_info.param; });

TEST(BenchCollectives, EverySubCommandJson) {
  for (const char* c :
       {"allreduce", "reduce_scatter", "allgather", "broadcast", "reduce", "barrier", "alltoall"}) {
    Outcome r = run(std::string(c) +
                    " -n 3 --transport tcp -b 64 -e 4K -f 64 --iters 3 --warmup 1 "
                    "--json");
    ASSERT_EQ(r.rc, 0) << c << ": " << r.out;
    const size_t rows = std::string(c) == "barrier" ? 1 : 2;
    ASSERT_EQ(r.json.size(), rows) << c << ": " << r.out;
    for (const auto& j : r.json) {
      expect_keys(j, {"bench", "ranks", "transport", "size", "dtype", "op", "algo", "time_us",
                      "algbw_GBps", "busbw_GBps", "wrong"});
      EXPECT_EQ(j["bench"], c);
      EXPECT_EQ(j["ranks"], 3);
      EXPECT_EQ(j["transport"], "tcp");
      EXPECT_EQ(j["dtype"], "f32");
      EXPECT_EQ(j["op"], "sum");
      EXPECT_EQ(j["wrong"], 0);
      EXPECT_EQ(j["ip_wrong"], 0);
      EXPECT_GT(j["time_us"].get<double>(), 0);
      EXPECT_NE(j["algo"], "auto");
    }
  }
}

TEST(BenchCollectives, OptionsTableAndWrongData) {
  Outcome r =
      run("allreduce -n 2 --transport auto -s 1K -s 64K --iters 3 --dtype bf16 --op max "
          "--algo ring");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto lines = lines_of(r.out);
  ASSERT_GE(lines.size(), 7u) << r.out;
  EXPECT_EQ(lines[0].rfind("# myelin-bench allreduce: transport shm", 0), 0u) << r.out;
  size_t heading = 0, rows = 0;
  for (const auto& l : lines) {
    if (l.find("#wrong") != std::string::npos) heading = fields(l);
    if (!l.empty() && l[0] != '#') {
      ++rows;
      EXPECT_EQ(fields(l), 13u) << l;  // size count type redop algo + 2 x 4 figures
      EXPECT_NE(l.find(" bf16 "), std::string::npos) << l;
      EXPECT_NE(l.find(" ring "), std::string::npos) << l;
    }
  }
  EXPECT_EQ(heading, 14u) << r.out;  // "#" and 13 titles
  EXPECT_EQ(rows, 2u);
  Outcome bad = run("allreduce -n 2 --transport tcp -s 1K --iters 2 --json --inject-wrong 0");
  EXPECT_EQ(bad.rc, 3) << bad.out;
  ASSERT_EQ(bad.json.size(), 1u);
  EXPECT_GE(bad.json[0]["wrong"].get<int>(), 1);
}

TEST(BenchBroker, PubSubWithFloodAndParameterServer) {
  Outcome r = run("pubsub -n 3 -s 64 -s 4K --iters 100 --flood 64K --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  ASSERT_EQ(r.json.size(), 2u) << r.out;
  for (const auto& j : r.json) {
    expect_latency_shape(j);
    EXPECT_EQ(j["bench"], "pubsub");
    EXPECT_EQ(j["flood_size"], 65536);
    EXPECT_GT(j["flood_GBps"].get<double>(), 0);
    // One host, one clock: the round trip splits into two legs (-1 if any sample's split fell
    // outside it). Only same-clock properties: the legs come from monotonic_ns(), the latency
    // keys from CycleTimer, whose calibration a preemption can skew on a loaded host.
    const double p50a = j["ping_leg_p50_us"].get<double>(),
                 p50b = j["pong_leg_p50_us"].get<double>();
    const double p99a = j["ping_leg_p99_us"].get<double>(),
                 p99b = j["pong_leg_p99_us"].get<double>();
    EXPECT_GT(p50a, 0) << j.dump();
    EXPECT_GT(p50b, 0) << j.dump();
    EXPECT_LE(p50a, p99a) << j.dump();
    EXPECT_LE(p50b, p99b) << j.dump();
  }
  Outcome ps = run("ps -n 3 -s 16 -s 64K --iters 20 --json");
  ASSERT_EQ(ps.rc, 0) << ps.out;
  ASSERT_EQ(ps.json.size(), 2u) << ps.out;
  for (const auto& j : ps.json) {
    expect_latency_shape(j);
    EXPECT_EQ(j["bench"], "ps");
    EXPECT_EQ(j["workers"], 2);
    EXPECT_GT(j["GBps"].get<double>(), 0);
  }
  for (const char* c : {"pubsub", "ps"}) {
    Outcome bad = run(std::string(c) + " -n 2 -s 64 --iters 20 --json --inject-wrong 2");
    EXPECT_EQ(bad.rc, 3) << c << ": " << bad.out;
    ASSERT_EQ(bad.json.size(), 1u) << bad.out;
    EXPECT_GE(bad.json[0]["wrong"].get<int>(), 1);
  }
}

TEST(BenchBroker, PubSubThroughput) {
  Outcome r = run("pubsub -n 2 -s 1K -s 64K --throughput --iters 2000 --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  ASSERT_EQ(r.json.size(), 2u) << r.out;
  for (const auto& j : r.json) {
    EXPECT_EQ(j["bench"], "pubsub");
    EXPECT_EQ(j["mode"], "throughput");
    EXPECT_EQ(j["iters"], 2000);
    EXPECT_GT(j["msgs_per_s"].get<double>(), 0);
    EXPECT_GT(j["GBps"].get<double>(), 0);
    EXPECT_EQ(j["wrong"], 0);
  }
  Outcome bad = run("pubsub -n 2 -s 1K --throughput --iters 200 --json --inject-wrong 5");
  EXPECT_EQ(bad.rc, 3) << bad.out;
  ASSERT_EQ(bad.json.size(), 1u) << bad.out;
  EXPECT_EQ(bad.json[0]["wrong"], 1);
  Outcome both = run("pubsub -n 2 -s 1K --throughput --flood 1M --iters 10 --json");
  EXPECT_NE(both.rc, 0) << both.out;
}

TEST(BenchCli, TableCsvAndHeader) {
  Outcome r = run("lat -n 2 --transport tcp -s 8 -s 16 --iters 50");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto lines = lines_of(r.out);
  ASSERT_EQ(lines.size(), 8u) << r.out;  // 4 header lines, heading, 2 rows, footer
  EXPECT_EQ(lines[0].rfind("# myelin-bench lat: transport tcp", 0), 0u);
  EXPECT_NE(lines[1].find("ranks"), std::string::npos);
  EXPECT_NE(lines[1].find("NUMA node"), std::string::npos);
  EXPECT_NE(lines[2].find("# command: "), std::string::npos);
  EXPECT_NE(lines[4].find("p99.9(us)"), std::string::npos);
  EXPECT_EQ(fields(lines[5]), 10u);
  EXPECT_EQ(lines[7].rfind("# done: 2 sizes", 0), 0u);

  Outcome csv = run("bw -n 2 --transport tcp -s 1K -s 2K --iters 20 --csv");
  ASSERT_EQ(csv.rc, 0) << csv.out;
  auto cl = lines_of(csv.out);
  ASSERT_EQ(cl.size(), 3u) << csv.out;
  EXPECT_EQ(cl[0], "bench,transport,direction,size,iters,window,GBps,msgs_per_s,wrong");
  EXPECT_EQ(cl[1].rfind("bw,tcp,uni,1024,20,64,", 0), 0u) << cl[1];
}

TEST(BenchCli, DurationDecidesTheIterations) {
  Outcome r = run("lat -n 2 --transport tcp -s 64 --duration 0.2 --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  ASSERT_EQ(r.json.size(), 1u) << r.out;
  EXPECT_GE(r.json[0]["iters"].get<int>(), 10);
}

TEST(BenchCli, BadArgumentsAreRefused) {
  // Usage errors, whether caught by the option parser or by the checks after it, exit 1.
  EXPECT_EQ(run("lat -n 3 --transport tcp").rc, 1);
  EXPECT_EQ(run("pubsub -n 1").rc, 1);
  EXPECT_EQ(run("lat -n 2 --json --csv").rc, 1);
  EXPECT_EQ(run("lat -n 2 --transport nope").rc, 1);
  EXPECT_EQ(run("allreduce -n 2 --dtype f8").rc, 1);
  EXPECT_EQ(run("lat -n 2 --no-such-flag").rc, 1);
  EXPECT_EQ(run("--help").rc, 0);
  EXPECT_NE(run("lat -n 2 --transport tcp -s 12Q").rc, 0);
  EXPECT_NE(run("lat --connect nohost").rc, 0);
  Outcome none = run("lat");
  EXPECT_EQ(none.rc, 1);
  EXPECT_NE(none.out.find("give -n N"), std::string::npos) << none.out;
}

// myelin-bench with exactly these arguments (no --timeout added), stdout and stderr together.
Outcome run_exactly(const std::string& args) {
  return shell(std::string(MYELIN_BENCH_PATH) + " " + args + " 2>&1");
}

TEST(BenchCli, BadNumbersAreUsageErrorsBeforeAnyRankStarts) {
  // Each is refused by the parent with exit 1 (usage), before a rank starts: no rank's message,
  // no abort from a wrapped-around count, no bound written as DBL_MAX's 309 digits.
  for (const char* args : {
           "lat -n 2 -t tcp --iters -1",
           "lat -n 2 -t tcp --iters 0",
           "lat -n 2 -t tcp --iters 100000000000",
           "lat -n 2 -t tcp --iters 99999999999999999999",
           "lat -n 2 -t tcp --warmup -1",
           "lat -n 2 -t tcp --warmup 0",
           "lat -n 2 -t tcp --warmup 100000000000",
           "bw -n 2 -t tcp -s 64 --window 1000000000000000 --buffers 1 --iters 10",
           "bw -n 2 -t tcp -s 64 --window -1 --iters 10",
           "bw -n 2 -t tcp -s 64 --window 0 --iters 10",
           "put -n 2 -t tcp -s 64 --buffers 0 --iters 10",
           "put -n 2 -t tcp -s 64 --buffers -1 --iters 10",
           "put -n 2 -t tcp -s 64 --buffers 1000000000 --iters 10",
           "allreduce -n 2 -t tcp -b 8 -e 64 -f -2",
           "allreduce -n 2 -t tcp -b 8 -e 64 -f 0",
           "allreduce -n 2 -t tcp -b 8 -e 64 -f 1",
           "lat -n 2 -t tcp --timeout 0",
           "lat -n 2 -t tcp --timeout -1",
           "lat -n 2 -t tcp --timeout 500000000",
           "lat -n 2 -t tcp --duration 0",
           "lat -n 2 -t tcp --duration nan",
           "lat -n 2 -t tcp --duration inf",
           "lat -n 2 -t tcp --duration 1e300",
           "lat -n 2 -t tcp -s -1K",
           "lat -n 2 -t tcp -s 12Q",
           "lat -n 2 -t tcp -b 1K -e 64",
           "allreduce -n 2 -t tcp --algo nosuch",
           "pubsub -n 2 --flood 1Q",
           "pubsub -n 2 --broker ''",
           "lat --connect ''",
       }) {
    const Outcome r = run_exactly(args);
    EXPECT_EQ(r.rc, 1) << args << ": " << r.out;
    EXPECT_EQ(r.out.find("myelin-bench rank"), std::string::npos) << args << ": " << r.out;
    EXPECT_EQ(r.out.find("terminate"), std::string::npos) << args << ": " << r.out;
    EXPECT_EQ(r.out.find("17976931348623157"), std::string::npos) << args << ": " << r.out;
  }
  // The messages say what is wrong.
  EXPECT_NE(run_exactly("lat -n 2 -t tcp -s -1K").out.find("'-1K' is negative"), std::string::npos);
  EXPECT_NE(run_exactly("lat -n 2 -t tcp -s 99999999999999999999").out.find("too large"),
            std::string::npos);
  EXPECT_NE(run_exactly("lat -n 2 -t tcp --iters -1").out.find("[1, 100000000]"),
            std::string::npos);
  EXPECT_NE(run_exactly("allreduce -n 2 -t tcp --algo nosuch").out.find("nosuch"),
            std::string::npos);
  const Outcome sub = run_exactly("nosuch -n 2");
  EXPECT_EQ(sub.rc, 1) << sub.out;
  EXPECT_NE(sub.out.find("unknown sub-command 'nosuch'"), std::string::npos) << sub.out;
}

TEST(BenchCli, LargestValuesRunAndTimeoutsAreNoImmediateStop) {
  // The largest --timeout is a far deadline for the job (20 x --timeout), not an overflow into an
  // immediate stop.
  const Outcome r = run_exactly("lat -n 2 -t tcp -s 64 -i 20 --timeout 10000000 --json");
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out.find("job timeout"), std::string::npos) << r.out;
}

TEST(BenchCli, SilentStoreFailsWithinTheTimeout) {
  // --connect to a store that accepts but never answers: an error after about --timeout seconds.
  const myelin::test_support::SilentListener silent;
  ASSERT_TRUE(silent.ok());
  const int64_t t0 = myelin::monotonic_ns();
  const Outcome r = run_exactly("lat -t tcp --connect 127.0.0.1:" + std::to_string(silent.port()) +
                                " --timeout 2");
  const int64_t took = myelin::monotonic_ns() - t0;
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("did not answer in time"), std::string::npos) << r.out;
  EXPECT_LT(took, 10'000'000'000) << "a 2 s --timeout took " << took / 1'000'000 << " ms";
}

TEST(BenchCli, VerbsWithoutRdmaSaysWhy) {
  const Outcome r = run_exactly("lat -n 2 -t verbs -s 64 -i 10 --timeout 10");
  if (r.rc == 0) GTEST_SKIP() << "verbs runs here (an RDMA device opens)";
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("--transport verbs: "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("myelin-bench rank"), std::string::npos) << r.out;
}

// The ranks (children) of the launcher `parent` with their MYELIN_RANK, read from /proc.
std::map<int, pid_t> ranks_of(pid_t parent) {
  std::map<int, pid_t> out;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    const size_t close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != parent) continue;
    std::ifstream env(entry.path() / "environ");
    std::string var;
    while (std::getline(env, var, '\0')) {
      if (var.rfind("MYELIN_RANK=", 0) == 0) out[std::stoi(var.substr(12))] = std::stoi(name);
    }
  }
  return out;
}

TEST(BenchCli, KilledRankIsNamed) {
  // A real run of three ranks; rank 1 is killed mid-run. The survivors fail too (their connection
  // to rank 1 broke), but the launcher names the killed rank and returns its status.
  char out_template[] = "/tmp/myelin-bench-test.XXXXXX";
  const int out_fd = ::mkstemp(out_template);
  ASSERT_GE(out_fd, 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::dup2(out_fd, STDOUT_FILENO);
    ::dup2(out_fd, STDERR_FILENO);
    ::execl(MYELIN_BENCH_PATH, MYELIN_BENCH_PATH, "allreduce", "-n", "3", "-t", "tcp", "-s", "64K",
            "-i", "100000000", "--timeout", "10", static_cast<char*>(nullptr));
    ::_exit(126);
  }
  ::close(out_fd);
  // Wait for the three ranks, and for their first rows (the run is under way).
  const myelin::Deadline started_by = myelin::Deadline::after_ms(30'000);
  std::map<int, pid_t> ranks;
  while (!started_by.expired()) {
    ranks = ranks_of(pid);
    if (ranks.size() == 3) break;
    ::poll(nullptr, 0, 20);
  }
  ::poll(nullptr, 0, 1500);
  ASSERT_EQ(ranks.count(1), 1u);
  ASSERT_EQ(::kill(ranks[1], SIGKILL), 0);
  int status = 0;
  pid_t got = 0;
  const myelin::Deadline done_by = myelin::Deadline::after_ms(60'000);
  while ((got = ::waitpid(pid, &status, WNOHANG)) == 0 && !done_by.expired()) {
    ::poll(nullptr, 0, 20);
  }
  if (got == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  std::ifstream in(out_template);
  const std::string out((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ::unlink(out_template);
  ASSERT_EQ(got, pid) << "the run did not end after a rank was killed: " << out;
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGKILL) << out;
  EXPECT_NE(out.find("myelin-bench: rank 1 was killed by signal 9 (SIGKILL)"), std::string::npos)
      << out;
}

TEST(BenchCli, ConcurrentRunsOnOneHostDoNotMeet) {
  // Two `-n 2` runs at once: each serves its own store on a port of its own.
  {
    const std::string cmd = std::string("(") + MYELIN_BENCH_PATH +
                            " lat -n 2 -t tcp -s 64 -i 200 --timeout 30 >/dev/null 2>&1; "
                            "echo \"rc-a $?\") & (" +
                            MYELIN_BENCH_PATH +
                            " lat -n 2 -t tcp -s 64 -i 200 --timeout 30 >/dev/null 2>&1; "
                            "echo \"rc-b $?\") & wait";
    const Outcome r = shell(cmd);
    ASSERT_TRUE(r.started);
    EXPECT_NE(r.out.find("rc-a 0"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("rc-b 0"), std::string::npos) << r.out;
  }
  // Two Slurm jobs (or two steps of one job) whose first node is this host, without
  // MYELIN_STORE or --port: they must not both pick the same store port, where the second job's
  // rank 0 cannot bind and its other ranks would join the first job's store.
  std::string cmd;
  for (const char* job : {"4242", "4243"}) {
    for (int rank = 0; rank < 2; ++rank) {
      cmd += std::string("(env -u MYELIN_STORE -u MYELIN_RANK -u MYELIN_SIZE SLURM_JOB_ID=") + job +
             " SLURM_STEP_ID=0 SLURM_PROCID=" + std::to_string(rank) +
             " SLURM_LOCALID=" + std::to_string(rank) +
             " SLURM_NTASKS=2 SLURM_NODEID=0 SLURM_JOB_NODELIST=localhost"
             " SLURM_TASKS_PER_NODE=2 " +
             MYELIN_BENCH_PATH +
             " lat -t tcp -s 64 -i 200 --timeout 30 >/dev/null 2>&1; echo \"rc-" + job + "-" +
             std::to_string(rank) + " $?\") & ";
    }
  }
  cmd += "wait";
  const Outcome steps = shell(cmd);
  ASSERT_TRUE(steps.started);
  const std::string& out = steps.out;
  for (const char* job : {"4242", "4243"}) {
    for (int rank = 0; rank < 2; ++rank) {
      const std::string want = std::string("rc-") + job + "-" + std::to_string(rank) + " 0";
      EXPECT_NE(out.find(want), std::string::npos) << out;
    }
  }
}

}  // namespace
