// Server::create() refuses options out of range or in conflict with invalid_argument naming the
// option, before it binds anything: what the daemon's configuration checks, for every embedder.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <myelin/broker/server.hpp>

namespace myelin::broker {
namespace {

ServerOptions good_options() {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.metrics_listen = "";
  o.secret = "0123456789abcdef0123";
  return o;
}

struct BadCase {
  const char* name;  // what the error must name
  std::function<void(ServerOptions&)> change;
};

TEST(ServerOptionsValidation, RefusesValuesOutOfRangeOrInConflictByName) {
  const std::vector<BadCase> cases = {
      {"lane_capacity", [](ServerOptions& o) { o.broker.lane_capacity = 1'000'000'000'000'000; }},
      {"lane_capacity", [](ServerOptions& o) { o.broker.lane_capacity = 0; }},
      {"lane_capacity", [](ServerOptions& o) { o.broker.lane_capacity = kMaxLaneCapacity + 1; }},
      {"heartbeat_ms", [](ServerOptions& o) { o.heartbeat_ms = INT64_MAX; }},
      {"heartbeat_ms", [](ServerOptions& o) { o.heartbeat_ms = 1; }},
      {"heartbeat_ms", [](ServerOptions& o) { o.heartbeat_ms = 0; }},
      {"handshake_timeout_ms", [](ServerOptions& o) { o.handshake_timeout_ms = INT64_MAX; }},
      {"chunk_bytes", [](ServerOptions& o) { o.chunk_bytes = 512; }},
      {"batch_bytes", [](ServerOptions& o) { o.batch_bytes = 4294901760u; }},
      {"batch_count", [](ServerOptions& o) { o.batch_count = kMaxBatchCount + 1; }},
      {"batch_window_us", [](ServerOptions& o) { o.batch_window_us = INT64_MAX; }},
      {"batch_window_us", [](ServerOptions& o) { o.batch_window_us = -1; }},
      {"publish_credits", [](ServerOptions& o) { o.publish_credits = 0; }},
      {"publish_credits", [](ServerOptions& o) { o.publish_credits = UINT32_MAX; }},
      {"socket_buffer_bytes", [](ServerOptions& o) { o.socket_buffer_bytes = -1; }},
      {"bulk_socket_buffer_bytes",
       [](ServerOptions& o) { o.bulk_socket_buffer_bytes = INT32_MAX; }},
      {"bulk_inflight_bytes", [](ServerOptions& o) { o.bulk_inflight_bytes = UINT32_MAX; }},
      {"max_delivery_attempts",
       [](ServerOptions& o) {
         o.broker.policies.push_back({.pattern = "a/#", .max_delivery_attempts = 0});
       }},
      {"max_delivery_attempts",
       [](ServerOptions& o) { o.broker.default_policy.max_delivery_attempts = UINT32_MAX; }},
      {"given twice",
       [](ServerOptions& o) {
         o.broker.policies.push_back({.pattern = "a/#", .lane = Lane::kControl});
         o.broker.policies.push_back({.pattern = "a/#", .lane = Lane::kBulk});
       }},
      {"given twice",
       [](ServerOptions& o) {
         o.acl.push_back({.identity = "w0", .publish = {"#"}});
         o.acl.push_back({.identity = "w0", .subscribe = {"#"}});
       }},
      {"rate_limit",
       [](ServerOptions& o) { o.acl.push_back({.identity = "w0", .rate_limit_msgs_per_s = -1}); }},
      {"exclusive",
       [](ServerOptions& o) {
         o.numa_node = 0;
         o.nic = "eth0";
       }},
      {"numa_node", [](ServerOptions& o) { o.numa_node = -7; }},
      {"listen", [](ServerOptions& o) { o.listen = ""; }},
      {"ps workers",
       [](ServerOptions& o) {
         o.enable_ps = true;
         o.ps.num_workers = 0;
       }},
  };
  for (const BadCase& c : cases) {
    ServerOptions o = good_options();
    c.change(o);
    auto s = Server::create(o);
    ASSERT_FALSE(s.ok()) << c.name;
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument) << c.name << ": " << s.status();
    EXPECT_NE(s.status().to_string().find(c.name), std::string::npos) << s.status();
  }
}

TEST(ServerOptionsValidation, AcceptsTheBoundsThemselves) {
  ServerOptions o = good_options();
  o.broker.lane_capacity = kMinLaneCapacity;
  o.heartbeat_ms = kMaxHeartbeatMs;
  o.chunk_bytes = kMaxChunkBytes;
  o.batch_bytes = kMaxBatchBytes;
  o.publish_credits = kMaxPublishCredits;
  o.broker.policies.push_back({.pattern = "a/#", .max_delivery_attempts = 1});
  o.broker.policies.push_back(
      {.pattern = "b/#", .max_delivery_attempts = kMaxDeliveryAttemptsLimit});
  auto s = Server::create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  ServerOptions low = good_options();
  low.heartbeat_ms = kMinHeartbeatMs;
  low.broker.lane_capacity = kMaxLaneCapacity;
  auto t = Server::create(low);
  ASSERT_TRUE(t.ok()) << t.status();
}

}  // namespace
}  // namespace myelin::broker
