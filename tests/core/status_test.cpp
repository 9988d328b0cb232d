#include <myelin/core/status.hpp>

#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

namespace myelin {
namespace {

Status connect_rank(int rank) {
  if (rank < 0) return invalid_argument("rank ", rank, " is negative");
  return ok_status();
}

Result<int> parse_port(std::string_view text) {
  if (text.empty()) return invalid_argument("empty port");
  int v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return invalid_argument("port '", text, "' is not a number");
    v = v * 10 + (c - '0');
  }
  if (v > 65535) return out_of_range("port ", v, " > 65535");
  return v;
}

Status setup(std::string_view port_text, int rank) {
  MYELIN_RETURN_IF_ERROR(connect_rank(rank));
  MYELIN_ASSIGN_OR_RETURN(int port, parse_port(port_text));
  if (port == 0) return unavailable("port 0");
  return ok_status();
}

TEST(Status, OkIsCheapAndPrints) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.to_string(), "ok");
  EXPECT_TRUE(s.message().empty());
  EXPECT_EQ(sizeof(Status), sizeof(void*));
}

TEST(Status, ErrorCarriesCodeAndMessage) {
  Status s = timeout_error("no answer after ", 5000, " ms");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kTimeout);
  EXPECT_EQ(s.to_string(), "timeout: no answer after 5000 ms");
}

TEST(Status, ContextGathersOutermostFirst) {
  Status s = peer_failed("connection reset");
  s.with_context("while sending to rank 5");
  s.with_context("allreduce");
  EXPECT_EQ(s.to_string(), "peer_failed: allreduce: while sending to rank 5: connection reset");
  EXPECT_TRUE(s.is_fatal_for_endpoint());
  Status ok;
  ok.with_context("ignored");
  EXPECT_TRUE(ok.ok());
}

TEST(Status, CopyAndMoveKeepTheError) {
  Status a = io_error("disk");
  Status b = a;
  EXPECT_EQ(a, b);
  Status c = std::move(a);
  EXPECT_EQ(c.to_string(), "io_error: disk");
}

TEST(Status, ErrnoStatusNamesTheCall) {
  Status s = errno_status("connect(10.0.0.1:5000)", ECONNREFUSED, StatusCode::kUnavailable);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.to_string().find("connect(10.0.0.1:5000): Connection refused (errno 111)"),
            std::string::npos);
}

TEST(Result, ValueAndError) {
  Result<int> r = parse_port("8080");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 8080);
  Result<int> e = parse_port("80x");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e.value_or(7), 7);
}

TEST(Result, MoveOnlyValue) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(42);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  EXPECT_EQ(*p, 42);
}

TEST(Result, MacrosPropagate) {
  EXPECT_TRUE(setup("80", 1).ok());
  EXPECT_EQ(setup("80", -1).to_string(), "invalid_argument: rank -1 is negative");
  EXPECT_EQ(setup("99999", 1).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(setup("0", 1).code(), StatusCode::kUnavailable);
}

TEST(ResultDeathTest, ValueOfErrorAbortsWithTheError) {
  Result<int> e = parse_port("");
  EXPECT_DEATH({ (void)e.value(); }, "empty port");
}

TEST(CheckDeathTest, PrintsBothOperands) {
  int a = 3, b = 4;
  EXPECT_DEATH({ MYELIN_CHECK_EQ(a, b) << "ring size"; }, "a == b \\(3 vs. 4\\) ring size");
  EXPECT_DEATH({ MYELIN_CHECK(a > b) << "extra"; }, "a > b extra");
}

TEST(Check, PassingChecksEvaluateOnce) {
  int calls = 0;
  auto f = [&] { return ++calls; };
  MYELIN_CHECK_EQ(f(), 1);
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace myelin

namespace myelin {
namespace {

Result<int> failing() {
  return not_found("key 'x'");
}

// Context added to temporaries must survive MYELIN_RETURN_IF_ERROR / MYELIN_ASSIGN_OR_RETURN,
// which bind the expression to a reference (a dangling one if with_context returned T&&).
Status uses_temporaries() {
  MYELIN_RETURN_IF_ERROR(failing().status().with_context("reading the store"));
  return ok_status();
}
Status assigns_from_temporary() {
  MYELIN_ASSIGN_OR_RETURN(int v, failing().with_context("looking up"));
  return v == 0 ? ok_status() : internal_error("unreachable");
}

TEST(Status, ContextOnTemporariesSurvivesTheMacros) {
  EXPECT_EQ(uses_temporaries().to_string(), "not_found: reading the store: key 'x'");
  EXPECT_EQ(assigns_from_temporary().to_string(), "not_found: looking up: key 'x'");
}

}  // namespace
}  // namespace myelin
