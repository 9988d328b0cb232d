// The report library: one row rendered as a table, JSON lines and CSV; busbw factors.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>

#include <myelin/bench/collectives_bench.hpp>
#include <myelin/bench/report.hpp>

namespace {

using namespace myelin::bench;

std::vector<Column> cols() {
  return {{"bench", "", 0, 0},
          {"size", "size(B)", 8, 0},
          {"p50_us", "p50(us)", 9, 2},
          {"note", "note", 6, 0}};
}

TEST(Report, Table) {
  std::ostringstream os;
  Report r(os, Format::kTable, cols());
  r.comment("hello");
  r.begin();
  r.row({std::string("lat"), uint64_t{64}, 1.5, std::string("ok")});
  EXPECT_EQ(os.str(), "# hello\n#size(B)   p50(us)   note\n      64      1.50     ok\n");
}

TEST(Report, JsonLinesEscapeAndKeepOrder) {
  std::ostringstream os;
  Report r(os, Format::kJson, cols());
  r.comment("not in json");
  r.begin();
  r.row({std::string("lat"), uint64_t{64}, 1.23456, std::string("a\"b\n")});
  const std::string line = os.str();
  EXPECT_EQ(line,
            "{\"bench\":\"lat\",\"size\":64,\"p50_us\":1.23456,\"note\":\"a\\\"b\\u000a\"}\n");
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["note"], "a\"b\n");
  std::ostringstream nan;
  Report n(nan, Format::kJson, cols());
  n.row({std::string("x"), uint64_t{0}, 0.0 / 0.0, std::string()});
  EXPECT_TRUE(nlohmann::json::parse(nan.str())["p50_us"].is_null());
}

TEST(Report, Csv) {
  std::ostringstream os;
  Report r(os, Format::kCsv, cols());
  r.comment("not in csv");
  r.begin();
  r.row({std::string("lat"), uint64_t{64}, 2.0, std::string("x,y")});
  EXPECT_EQ(os.str(), "bench,size,p50_us,note\nlat,64,2,\"x,y\"\n");
}

TEST(Report, RowOfTheWrongLengthAborts) {
  std::ostringstream os;
  Report r(os, Format::kCsv, cols());
  EXPECT_DEATH(r.row({uint64_t{1}}), "report row");
}

TEST(CollectiveReport, BusBandwidthFactors) {
  using myelin::collectives::Collective;
  EXPECT_DOUBLE_EQ(busbw_factor(Collective::kAllreduce, 4), 1.5);
  EXPECT_DOUBLE_EQ(busbw_factor(Collective::kAllgather, 4), 0.75);
  EXPECT_DOUBLE_EQ(busbw_factor(Collective::kReduceScatter, 2), 0.5);
  EXPECT_DOUBLE_EQ(busbw_factor(Collective::kBroadcast, 8), 1.0);
  EXPECT_EQ(collective_columns().size(), 16u);
}

}  // namespace
