// myelin/bench/broker_bench.hpp — broker benchmarks: publish/subscribe latency through a broker
// (optionally while another topic is flooded with bulk messages) and parameter-server push/pull.
//
// Roles (every rank of the job constructs a BrokerBench with the same options and store):
//   - rank 0 runs an embedded broker Server (parameter server enabled, one worker per other rank)
//     and publishes its address and a fresh job secret in the store, unless `broker_address`
//     names a running broker (myelin-broker) that every rank dials with `secret`. In pubsub it
//     echoes every message of "ctrl/ping" back on "ctrl/pong" and subscribes to the flood topic.
//   - rank 1 measures pubsub: publishes a ping (control lane, unbatched), waits for its pong;
//     publish-to-deliver latency, one-way = round trip / 2 (two passes through the broker).
//     With flood_size > 0 a second client of rank 1 (its own thread and connection) and every
//     rank >= 2 publish flood_size-byte bulk messages on "grad/flood" for the whole timed phase;
//     the flood rate is reported (what rank 1 published). An external broker must put ctrl/#
//     on the control lane without batching and grad/# on the bulk lane (scripts/compare-broker.sh
//     writes such a config); the embedded one does.
//   - pubsub_throughput: rank 0 publishes warmup + iters messages on "tput/data" (bulk lane,
//     batchable) as fast as its credits allow; rank 1 subscribes with a handler (on the client's
//     I/O thread), checks each one and times the iters after the warmup: messages/s and GB/s
//     at the subscriber. The broker's credits hold the publisher back, so nothing is dropped.
//   - in ps, ranks 1..n-1 are workers: each step pushes a gradient (worker w sends w + 1 in every
//     element), then pulls the parameters of the next version; the server sums and applies
//     params -= sum, so after step s every element is -(s + 1) * W(W + 1) / 2 and every pulled
//     tensor is checked. Step latency is one push plus one pull, measured by every worker; rank 1
//     reports its own samples and the wrong elements of all workers.
// Results are meaningful on rank 1 only. At least two ranks.
//
// Thread safety: none; one thread per rank calls it. Blocking: every wait has a deadline
// (`timeout`); failures come back as Status.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <myelin/bench/harness.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/store.hpp>

namespace myelin::bench {

struct BrokerBenchOptions {
  int rank = 0;
  int size = 2;
  transport::Store* store = nullptr;         // borrowed; shared by the ranks
  std::string listen_host = "127.0.0.1";     // where rank 0's broker listens ("0.0.0.0": all)
  std::string advertise_host = "127.0.0.1";  // what the other ranks dial
  size_t flood_size = 0;                     // pubsub: bytes per flood message; 0: no flood
  std::string broker_address;                // "host:port" of a running broker; "": embedded
  std::string secret;                        // its job secret (with broker_address)
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
};

struct PubSubResult {
  LatencyResult latency;
  double flood_gbps = 0;  // what rank 1's flood client published (GB = 10^9 B); 0 without flood
  // What rank 0 (the echo, the flood's subscriber) received of it while it echoed: bytes over
  // its time from the first ping to the last pong (GB/s); 0 without flood.
  double flood_delivered_gbps = 0;
  // The round trip split where the echo publishes its pong (the pong's publish timestamp, read
  // on the echo's CLOCK_MONOTONIC): ping leg = ping publish -> pong publish (the broker's
  // forwarding of the ping, the echo's wake-up, poll() and turnaround); pong leg = pong publish
  // -> the pinger's poll() returning it. Each leg's full time in microseconds, not halved. Only
  // where both ranks read one clock (one host): `legs_valid` is false, and the legs empty, when any
  // sample's split falls outside its round trip.
  bool legs_valid = false;
  LatencyResult ping_leg, pong_leg;
};

struct ThroughputResult {
  size_t size = 0, iters = 0;
  double msgs_per_s = 0, gbps = 0;  // at the subscriber, GB = 10^9 B
  uint64_t wrong = 0;               // messages with a wrong index or content
};

struct PsResult {
  LatencyResult step;  // one push + one pull, microseconds
  double gbps = 0;     // (pushed + pulled bytes) / time, per worker
  size_t workers = 0;
};

class BrokerBench {
 public:
  static Result<std::unique_ptr<BrokerBench>> start(const BrokerBenchOptions& options);
  ~BrokerBench();
  BrokerBench(const BrokerBench&) = delete;
  BrokerBench& operator=(const BrokerBench&) = delete;

  // `size` bytes per ping; call on every rank with the same arguments, in the same order.
  Result<PubSubResult> pubsub(size_t size, const RunConfig& cfg);
  // `size` bytes per message, one publisher (rank 0) and one subscriber (rank 1).
  Result<ThroughputResult> pubsub_throughput(size_t size, const RunConfig& cfg);
  // `size` bytes of f32 per push (rounded down to whole floats, at least one).
  Result<PsResult> ps(size_t size, const RunConfig& cfg);

  class Impl;

 private:
  explicit BrokerBench(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Waits until `n` ranks called it with the same name (a counter in the store), or the deadline.
Status store_barrier(transport::Store& store, const std::string& name, int n, Deadline deadline);

}  // namespace myelin::bench
