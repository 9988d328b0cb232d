// The job secret file as every tool reads it: the first line, its line ending stripped; empty
// lines may follow, nothing else; a regular file of bounded size; at least 16 bytes.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <myelin/broker/secret.hpp>

namespace myelin::broker {
namespace {

constexpr char kSecret[] = "0123456789abcdef0123";

TEST(SecretText, TheFirstLineWithoutItsLineEnding) {
  for (const std::string& text :
       {std::string(kSecret), std::string(kSecret) + "\n", std::string(kSecret) + "\r\n",
        std::string(kSecret) + "\n\n", std::string(kSecret) + "\r\n\r\n\n"}) {
    SCOPED_TRACE(text);
    auto r = parse_secret_text(text, "f");
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(*r, kSecret);
  }
}

TEST(SecretText, RefusesASecondLineAndAShortSecret) {
  auto two = parse_secret_text(std::string(kSecret) + "\nmore\n", "f");
  ASSERT_FALSE(two.ok());
  EXPECT_EQ(two.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(two.status().message().find("more than one line"), std::string::npos) << two.status();
  for (const char* text : {"", "\n", "short\n", "0123456789abcde\r\n"}) {
    SCOPED_TRACE(text);
    auto r = parse_secret_text(text, "f");
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("at least 16"), std::string::npos) << r.status();
  }
  // Sixteen bytes are enough; a carriage return inside the line is part of the secret.
  auto sixteen = parse_secret_text("0123456789abcdef\n", "f");
  ASSERT_TRUE(sixteen.ok()) << sixteen.status();
  auto inner = parse_secret_text("0123456789\rabcdef\n", "f");
  ASSERT_TRUE(inner.ok()) << inner.status();
  EXPECT_EQ(*inner, "0123456789\rabcdef");
}

TEST(SecretFile, ReadsRegularFilesOnlyAndBoundsTheRead) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("myelin-secret-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string crlf = (dir / "crlf").string();
  std::ofstream(crlf, std::ios::binary) << kSecret << "\r\n";
  auto r = read_secret_file(crlf);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, kSecret);

  auto d = read_secret_file(dir.string());
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("is a directory"), std::string::npos) << d.status();
  auto z = read_secret_file("/dev/zero");
  ASSERT_FALSE(z.ok());
  EXPECT_NE(z.status().message().find("is not a regular file"), std::string::npos) << z.status();
  const std::string big = (dir / "big").string();
  std::ofstream(big, std::ios::binary) << std::string(kMaxSecretFileBytes + 1, 'x');
  auto b = read_secret_file(big);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument);
  auto m = read_secret_file((dir / "missing").string());
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace myelin::broker
