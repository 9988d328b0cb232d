// myelin-bench run as a child process: every sub-command at tiny sizes on every backend that opens
// here, checking the JSON lines (keys, types, sizes, #wrong = 0), the human table and CSV
// layouts, the exit code on wrong data (through the hidden --inject-wrong fault injection) and
// the refusal of bad arguments.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <myelin/transport/context.hpp>

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
