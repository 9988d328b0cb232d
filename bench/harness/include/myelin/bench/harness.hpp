// myelin/bench/harness.hpp — the measurement core of myelin-bench (a library so the CLI stays thin
// and microbenchmarks share it).
//
// Point-to-point tests between two ranks over one Endpoint:
//   - latency: ping-pong; one-way latency = round trip / 2 (the perftest / ucx_perftest
//     convention); percentiles over `iters` samples after `warmup` untimed ones.
//   - bandwidth: the sender keeps `window` sends in flight; the receiver measures from the moment
//     it releases the sender to the arrival of the last message. GB = 10^9 bytes. Message rate is
//     the same engine with small messages and a deep window (myelin-bench rate).
//   - bidirectional bandwidth: both ranks send and receive at once; each measures what it
//     received and the result is the sum of the two directions (perftest -b convention).
//   - put / get: one-sided operations on the peer's registered region, `window` in flight,
//     measured at the initiator (rank 0) from the first post to the last completion (a put
//     completes once its bytes are in the target's memory). The target (rank 1) only serves.
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
  double min_us = 0, avg_us = 0, p50_us = 0, p90_us = 0, p99_us = 0, p999_us = 0, max_us = 0;
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
  size_t window = 64;  // bandwidth, rate, put, get: operations in flight
  // Distinct buffers per side (bandwidth, rate, bidirectional: send and receive buffers; put/get:
  // local slots and target offsets), used round robin. 0: one per operation in flight (`window`),
  // so no two pending operations share memory and every copy streams memory the other messages
  // did not just warm. 1: ucx_perftest's shape (tag_bw and ucp_put_bw reuse one send and one
  // receive buffer for every message in flight, all hot in cache). With fewer buffers than the
  // window, pending receives share a buffer: the stamp check then accepts any index still in
  // flight, and the full-byte check looks at the pattern only.
  size_t buffers = 0;
  // Fault injection for the tool's own tests: the receiving side flips one byte of the timed
  // message with this index before checking it (latency: the echo side corrupts its echo; put:
  // the initiator corrupts the phase's last put, which nothing overwrites before the check), so
  // `wrong` must come out non-zero. SIZE_MAX: never.
  size_t corrupt_at = SIZE_MAX;
};

// initiator: rank 0 (pings and measures); the other rank echoes. Only the initiator's result is
// meaningful for latency; for bandwidth only the receiver's (rank 1).
Result<LatencyResult> run_latency(transport::Context& ctx, transport::Endpoint& ep, bool initiator,
                                  size_t size, const RunConfig& cfg);
Result<BandwidthResult> run_bandwidth(transport::Context& ctx, transport::Endpoint& ep, bool sender,
                                      size_t size, const RunConfig& cfg);
// Both ranks call it; both get the total (sum of the two directions' receive rates).
Result<BandwidthResult> run_bidirectional(transport::Context& ctx, transport::Endpoint& ep,
                                          size_t size, const RunConfig& cfg);
// initiator: rank 0, which measures; the target serves until the initiator is done. `wrong`
// (put: checked by the target after each phase; get: checked by the initiator) reaches both.
enum class OneSided : uint8_t { kPut, kGet };
Result<BandwidthResult> run_one_sided(transport::Context& ctx, transport::Endpoint& ep, OneSided op,
                                      bool initiator, size_t size, const RunConfig& cfg);
// Sorts `samples` (microseconds) and fills min/avg/percentiles/max of `out`.
void summarize(std::vector<double>& samples, LatencyResult& out);

// "64", "4K", "1M", "1G" (binary multiples) -> bytes, at most 2^40; invalid_argument otherwise
// (saying whether the text is negative, too large or not a number).
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
