// myelin/bench/harness.hpp — the measurement core of myelin-bench (a library so the CLI stays thin
// and microbenchmarks share it).
//
// Point-to-point tests between two ranks over one Endpoint:
//   - latency: ping-pong; one-way latency = round trip / 2 (the perftest / ucx_perftest
//     convention); percentiles over `iters` samples after `warmup` untimed ones.
//   - bandwidth: the sender keeps `window` sends in flight; the receiver measures from the moment
//     it releases the sender to the arrival of the last message. GB = 10^9 bytes.
// Every received message is checked (a per-message stamp at both ends and, once per size, every
// byte); mismatches are counted in `wrong`, never hidden.
//
// Thread safety: none; run on the Context's thread. Blocking: every wait has a deadline
// (the Context's timeout); an error ends the run with its Status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <myelin/core/status.hpp>
#include <myelin/transport/context.hpp>

namespace myelin::bench {

struct LatencyResult {
  size_t size = 0;
  size_t iters = 0;
  double min_us = 0, avg_us = 0, p50_us = 0, p99_us = 0, p999_us = 0, max_us = 0;
  uint64_t wrong = 0;
};

struct BandwidthResult {
  size_t size = 0;
  size_t iters = 0;
  double seconds = 0;
  double gbps = 0;  // 10^9 bytes per second, at the receiver
  double msgs_per_s = 0;
  uint64_t wrong = 0;
};

struct RunConfig {
  size_t iters = 10000;
  size_t warmup = 1000;
  size_t window = 64;  // bandwidth: sends in flight
};

// initiator: rank 0 (pings and measures); the other rank echoes. Only the initiator's result is
// meaningful for latency; for bandwidth only the receiver's (rank 1).
Result<LatencyResult> run_latency(transport::Context& ctx, transport::Endpoint& ep, bool initiator,
                                  size_t size, const RunConfig& cfg);
Result<BandwidthResult> run_bandwidth(transport::Context& ctx, transport::Endpoint& ep, bool sender,
                                      size_t size, const RunConfig& cfg);

// "64", "4K", "1M", "1G" (binary multiples) -> bytes; invalid_argument otherwise.
Result<size_t> parse_size(const std::string& text);
// begin, begin*factor, ... up to end (inclusive); factor >= 2.
Result<std::vector<size_t>> size_sweep(size_t begin, size_t end, size_t factor);

// Percentile (0..100) of sorted samples, nearest-rank.
double percentile(const std::vector<double>& sorted, double pct);

std::string latency_json(const std::string& transport, const LatencyResult& r);
std::string bandwidth_json(const std::string& transport, const BandwidthResult& r);
std::string latency_header();
std::string latency_row(const LatencyResult& r);
std::string bandwidth_header();
std::string bandwidth_row(const BandwidthResult& r);

}  // namespace myelin::bench
