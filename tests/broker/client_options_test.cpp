// Client::connect() refuses options out of range with invalid_argument naming the option, before
// it dials: the same bounds as the server's (a heartbeat of INT64_MAX ms used to overflow the
// silence deadline, and a negative one to declare the broker dead at once).
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <myelin/broker/client.hpp>
#include <myelin/broker/server.hpp>

namespace myelin::broker {
namespace {

ClientOptions good_options() {
  ClientOptions o;
  o.address = "127.0.0.1:1";  // nothing listens: a valid set of options fails to connect instead
  o.secret = "0123456789abcdef0123";
  o.connect_timeout_ms = 200;
  o.control_connection = false;
  return o;
}

TEST(ClientOptionsValidation, RefusesValuesOutOfRangeByName) {
  struct BadCase {
    const char* name;
    std::function<void(ClientOptions&)> change;
  };
  const std::vector<BadCase> cases = {
      {"connect_timeout_ms", [](ClientOptions& o) { o.connect_timeout_ms = 0; }},
      {"connect_timeout_ms", [](ClientOptions& o) { o.connect_timeout_ms = INT64_MAX; }},
      {"heartbeat_ms", [](ClientOptions& o) { o.heartbeat_ms = INT64_MAX; }},
      {"heartbeat_ms", [](ClientOptions& o) { o.heartbeat_ms = -5; }},
      {"heartbeat_ms", [](ClientOptions& o) { o.heartbeat_ms = kMinHeartbeatMs - 1; }},
      {"chunk_bytes", [](ClientOptions& o) { o.chunk_bytes = kMinChunkBytes - 1; }},
      {"chunk_bytes", [](ClientOptions& o) { o.chunk_bytes = UINT32_MAX; }},
      {"batch_bytes", [](ClientOptions& o) { o.batch_bytes = kMaxBatchBytes + 1; }},
      {"batch_window_us", [](ClientOptions& o) { o.batch_window_us = -1; }},
      {"batch_window_us", [](ClientOptions& o) { o.batch_window_us = INT64_MAX; }},
      {"socket_buffer_bytes", [](ClientOptions& o) { o.socket_buffer_bytes = -1; }},
      {"poll_read_grace_us", [](ClientOptions& o) { o.poll_read_grace_us = -1; }},
      {"receive_window", [](ClientOptions& o) { o.receive_window = 0; }},
  };
  for (const BadCase& c : cases) {
    ClientOptions o = good_options();
    c.change(o);
    auto client = Client::connect(o);
    ASSERT_FALSE(client.ok()) << c.name;
    EXPECT_EQ(client.status().code(), StatusCode::kInvalidArgument)
        << c.name << ": " << client.status();
    EXPECT_NE(client.status().to_string().find(c.name), std::string::npos) << client.status();
  }
}

TEST(ClientOptionsValidation, TheBoundsThemselvesGetAsFarAsDialing) {
  ClientOptions high = good_options();  // every upper bound at once (connect_timeout_ms: 200)
  high.heartbeat_ms = kMaxHeartbeatMs;
  high.chunk_bytes = kMaxChunkBytes;
  high.batch_bytes = kMaxBatchBytes;
  high.batch_window_us = kMaxBatchWindowUs;
  high.socket_buffer_bytes = kMaxSocketBufferBytes;
  high.poll_read_grace_us = kMaxBatchWindowUs;
  ClientOptions low = good_options();  // and every lower one
  low.connect_timeout_ms = 1;
  low.heartbeat_ms = kMinHeartbeatMs;
  low.chunk_bytes = kMinChunkBytes;
  low.batch_bytes = 0;
  low.batch_window_us = 0;
  low.socket_buffer_bytes = 0;
  low.poll_read_grace_us = 0;
  for (const ClientOptions& o : {high, low}) {
    auto client = Client::connect(o);
    ASSERT_FALSE(client.ok());  // nothing listens on port 1
    EXPECT_NE(client.status().code(), StatusCode::kInvalidArgument) << client.status();
  }
}

}  // namespace
}  // namespace myelin::broker
