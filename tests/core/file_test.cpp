// read_regular_file: a regular file is read whole; a directory, a device, a FIFO, a file over the
// limit or a missing one is an error that says which, and nothing blocks or reads without bound.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>

#include <myelin/core/file.hpp>

namespace myelin {
namespace {

class ReadRegularFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        std::filesystem::temp_directory_path() / ("myelin-file-test-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  std::filesystem::path dir_;
};

TEST_F(ReadRegularFile, ReadsARegularFileWhole) {
  const std::string text("a\0b\nc", 5);
  auto r = read_regular_file(write("f", text), 5, "test file");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, text);
  auto empty = read_regular_file(write("e", ""), 5, "test file");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(*empty, "");
}

TEST_F(ReadRegularFile, RefusesAFileOverTheLimit) {
  auto r = read_regular_file(write("big", std::string(6, 'x')), 5, "test file");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("more than the 5"), std::string::npos) << r.status();
}

TEST_F(ReadRegularFile, SaysWhatIsWrongWithAPathThatIsNoRegularFile) {
  auto dir = read_regular_file(dir_.string(), 4096, "test file");
  ASSERT_FALSE(dir.ok());
  EXPECT_EQ(dir.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(dir.status().message().find("is a directory"), std::string::npos) << dir.status();

  auto dev = read_regular_file("/dev/zero", 4096, "test file");
  ASSERT_FALSE(dev.ok());
  EXPECT_NE(dev.status().message().find("is not a regular file"), std::string::npos)
      << dev.status();

  auto missing = read_regular_file((dir_ / "nothing").string(), 4096, "test file");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("test file"), std::string::npos) << missing.status();
}

// A FIFO without a writer: opening it must not wait for one.
TEST_F(ReadRegularFile, RefusesAFifoWithoutWaitingForAWriter) {
  const std::string fifo = (dir_ / "fifo").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = read_regular_file(fifo, 4096, "test file");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("is not a regular file"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace myelin
