#include <myelin/core/log.hpp>

#include <gtest/gtest.h>

namespace myelin {
namespace {

TEST(Log, ParsesLevels) {
  EXPECT_EQ(parse_log_level("TRACE"), LogLevel::kTrace);
  EXPECT_EQ(parse_log_level("warning"), LogLevel::kWarn);
  EXPECT_EQ(parse_log_level("off"), LogLevel::kOff);
  EXPECT_FALSE(parse_log_level("loud").has_value());
  EXPECT_EQ(log_level_name(LogLevel::kError), "error");
}

TEST(Log, LevelFiltersLines) {
  const LogLevel saved = log_level();
  set_log_level(LogLevel::kError);
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  MYELIN_LOG_INFO << "not printed " << count();
  EXPECT_EQ(evaluated, 0) << "a disabled level must not evaluate its arguments";
  testing::internal::CaptureStderr();
  set_log_tag("rank 3");
  MYELIN_LOG_ERROR << "printed " << count();
  const std::string out = testing::internal::GetCapturedStderr();
  EXPECT_EQ(evaluated, 1);
  EXPECT_NE(out.find(" E myelin["), std::string::npos) << out;
  EXPECT_NE(out.find("rank 3 log_test.cpp:"), std::string::npos) << out;
  EXPECT_NE(out.find("] printed 1\n"), std::string::npos) << out;
  set_log_tag("");
  set_log_level(saved);
}

}  // namespace
}  // namespace myelin
