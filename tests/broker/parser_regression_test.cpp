// Runs the fuzz targets (tests/fuzz/fuzz_targets.hpp) on the seed corpus, on mutations of it and
// on random bytes, so every peer parser is exercised by the g++ build and its sanitizers.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "fuzz_targets.hpp"

namespace myelin::broker {
namespace {

std::vector<std::vector<uint8_t>> corpus() {
  std::vector<std::vector<uint8_t>> out;
  for (const auto& e : std::filesystem::directory_iterator(MYELIN_FUZZ_CORPUS)) {
    std::ifstream in(e.path(), std::ios::binary);
    out.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

TEST(ParserRegression, CorpusMutationsAndRandomBytes) {
  const auto seeds = corpus();
  ASSERT_GE(seeds.size(), 5u) << "seed corpus missing at " << MYELIN_FUZZ_CORPUS;
  std::mt19937_64 rng(20261126);
  size_t runs = 0;
  auto all = [&](const std::vector<uint8_t>& d) {
    fuzz::fuzz_frames(d.data(), d.size());
    fuzz::fuzz_batch(d.data(), d.size());
    fuzz::fuzz_handshake(d.data(), d.size());
    fuzz::fuzz_http(d.data(), d.size());
    runs++;
  };
  for (const auto& s : seeds) all(s);
  for (int i = 0; i < 20000; ++i) {
    std::vector<uint8_t> d = seeds[rng() % seeds.size()];
    const int flips = 1 + static_cast<int>(rng() % 8);
    for (int k = 0; k < flips && !d.empty(); ++k) d[rng() % d.size()] = static_cast<uint8_t>(rng());
    if (rng() % 4 == 0) d.resize(rng() % (d.size() + 1));
    if (rng() % 4 == 0) {
      const auto& other = seeds[rng() % seeds.size()];
      d.insert(d.end(), other.begin(), other.end());
    }
    all(d);
  }
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> d(rng() % 512);
    for (auto& b : d) b = static_cast<uint8_t>(rng());
    all(d);
  }
  EXPECT_EQ(runs, seeds.size() + 22000);
}

TEST(ParserRegression, HttpHeads) {
  std::string path;
  auto r = parse_http_get("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", &path);
  ASSERT_TRUE(r.ok() && *r);
  EXPECT_EQ(path, "/metrics");
  r = parse_http_get("GET /metrics HTTP/1.1\r\n", &path);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  EXPECT_EQ(parse_http_get("POST / HTTP/1.1\r\n\r\n", &path).status().code(),
            StatusCode::kUnsupported);
  EXPECT_FALSE(parse_http_get("GET / HTTP/9\r\n\r\n", &path).ok());
  EXPECT_FALSE(parse_http_get(std::string(9000, 'a'), &path).ok());
}

}  // namespace
}  // namespace myelin::broker
