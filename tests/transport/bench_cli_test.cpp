// myelin-bench lat/bw -n 2 --transport tcp at tiny sizes: the JSON lines have the documented shape,
// the data checks pass; plus the harness helpers.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include <myelin/bench/harness.hpp>

namespace {

std::vector<nlohmann::json> run_json(const std::string& args, int& exit_code) {
  const std::string cmd = std::string(MYELIN_BENCH_PATH) + " " + args + " 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n = 0;
  while (p != nullptr && (n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = p != nullptr ? ::pclose(p) : -1;
  exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::vector<nlohmann::json> lines;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << line;
    lines.push_back(j);
  }
  return lines;
}

TEST(BenchCli, LatencyJson) {
  int rc = -1;
  auto lines = run_json("lat -n 2 --transport tcp -s 0 -s 64 --iters 200 --warmup 20 --json", rc);
  ASSERT_EQ(rc, 0);
  ASSERT_EQ(lines.size(), 2u);
  size_t expect_size[] = {0, 64};
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& j = lines[i];
    EXPECT_EQ(j["bench"], "lat");
    EXPECT_EQ(j["transport"], "tcp");
    EXPECT_EQ(j["size"], expect_size[i]);
    EXPECT_EQ(j["iters"], 200);
    EXPECT_EQ(j["wrong"], 0);
    for (const char* k : {"p50_us", "p99_us", "p999_us", "max_us"}) {
      ASSERT_TRUE(j[k].is_number()) << k;
      EXPECT_GT(j[k].get<double>(), 0) << k;
    }
    EXPECT_LE(j["p50_us"].get<double>(), j["p99_us"].get<double>());
    EXPECT_LE(j["p99_us"].get<double>(), j["p999_us"].get<double>());
    EXPECT_LE(j["p999_us"].get<double>(), j["max_us"].get<double>());
  }
}

TEST(BenchCli, BandwidthJsonSweep) {
  int rc = -1;
  auto lines = run_json("bw -n 2 --transport tcp -b 1K -e 128K -f 8 --iters 100 --json", rc);
  ASSERT_EQ(rc, 0);
  ASSERT_EQ(lines.size(), 3u);  // 1K, 8K, 64K
  size_t expect_size[] = {1024, 8192, 65536};
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& j = lines[i];
    EXPECT_EQ(j["bench"], "bw");
    EXPECT_EQ(j["transport"], "tcp");
    EXPECT_EQ(j["size"], expect_size[i]);
    EXPECT_EQ(j["iters"], 100);
    EXPECT_EQ(j["wrong"], 0);
    EXPECT_GT(j["GBps"].get<double>(), 0);
    EXPECT_GT(j["msgs_per_s"].get<double>(), 0);
  }
}

TEST(BenchCli, HumanTableAndBadArguments) {
  const std::string cmd =
      std::string(MYELIN_BENCH_PATH) + " lat -n 2 --transport tcp -s 8 --iters 50 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  ASSERT_EQ(::pclose(p), 0);
  EXPECT_EQ(out.rfind("# myelin-bench lat", 0), 0u) << out;
  EXPECT_NE(out.find("#wrong"), std::string::npos);
  int rc = 0;
  (void)run_json("lat -n 3 --transport tcp", rc);
  EXPECT_NE(rc, 0);
  (void)run_json("lat -n 2 --transport tcp -s 12Q", rc);
  EXPECT_NE(rc, 0);
}

TEST(BenchHarness, SizesAndPercentiles) {
  using myelin::bench::parse_size;
  EXPECT_EQ(*parse_size("64"), 64u);
  EXPECT_EQ(*parse_size("4K"), 4096u);
  EXPECT_EQ(*parse_size("1M"), size_t{1} << 20);
  EXPECT_EQ(*parse_size("2GB"), size_t{2} << 30);
  EXPECT_FALSE(parse_size("").ok());
  EXPECT_FALSE(parse_size("x").ok());
  EXPECT_FALSE(parse_size("1T").ok());
  EXPECT_FALSE(parse_size("4KK").ok());
  // Negative sizes say so (they used to wrap around into "too large"); an overflowing number is
  // too large, not "not a number".
  for (const char* negative : {"-1", "-1K", "-0"}) {
    auto r = parse_size(negative);
    ASSERT_FALSE(r.ok()) << negative;
    EXPECT_NE(r.status().to_string().find("negative"), std::string::npos) << r.status();
  }
  auto huge = parse_size("99999999999999999999");
  ASSERT_FALSE(huge.ok());
  EXPECT_NE(huge.status().to_string().find("too large"), std::string::npos) << huge.status();
  EXPECT_FALSE(parse_size(" 64").ok());
  EXPECT_FALSE(parse_size("+64").ok());
  EXPECT_EQ(*myelin::bench::size_sweep(8, 64, 2), (std::vector<size_t>{8, 16, 32, 64}));
  EXPECT_EQ(*myelin::bench::size_sweep(0, 4, 2), (std::vector<size_t>{0, 1, 2, 4}));
  EXPECT_FALSE(myelin::bench::size_sweep(8, 4, 2).ok());
  EXPECT_FALSE(myelin::bench::size_sweep(1, 4, 1).ok());
  std::vector<double> v;
  for (int i = 1; i <= 1000; ++i) v.push_back(i);
  EXPECT_EQ(myelin::bench::percentile(v, 50), 500);
  EXPECT_EQ(myelin::bench::percentile(v, 99), 990);
  EXPECT_EQ(myelin::bench::percentile(v, 99.9), 999);
  EXPECT_EQ(myelin::bench::percentile(v, 100), 1000);
}

}  // namespace
