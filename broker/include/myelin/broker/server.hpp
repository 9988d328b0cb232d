// myelin/broker/server.hpp
//
// Server: the broker's network front. One event-loop thread (epoll) accepts clients on TCP,
// authenticates each one (challenge-response on the shared job secret, see docs/broker.md),
// enforces per-identity publish/subscribe ACLs and rate limits, moves messages between clients
// through a Broker core, serves parameter-server push/pull when configured, sends and checks
// heartbeats, and serves Prometheus /metrics and /healthz over HTTP on a second port.
// `myelin-broker` is a thin main() around it; a process can embed a Server the same way (for
// example a parameter-server rank).
//
// Control connections (protocol 2): a client may attach a second connection to its session
// (authenticated with a per-session token and the job secret); control-lane frames to and from
// that client then travel on it, bulk on the first. With `control_thread` (the default) a thread
// of its own serves every control connection end to end: it reads and routes what clients send
// there and writes the sessions' control lanes to them, so a control frame never waits for the
// loop thread, its CPU time slice or the bulk bytes it is copying. Mostly asleep in epoll, that
// thread is a woken sleeper when a control frame arrives, which the kernel's scheduler lets run
// ahead of busy bulk threads even when they outnumber the CPUs. Without it the loop serves
// control connections before bulk work in every pass and again after every bulk read or write,
// so a control frame waits for at most one of those.
//
// Flow control: each client grants delivery credits; the server never sends deliveries past
// them. The server grants each client publish credits and returns them only as publishes are
// accepted, so a producer whose topic is full (block policy) or who is over its rate limit stops
// at its credit window: no loss, the stall is counted.
//
// Threads: the loop thread and, with `control_thread`, the control thread; both are started by
// start() and joined by drain()/stop(). Thread safety: start()/drain()/stop() from one
// controlling thread; metrics_text() and counters from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <myelin/broker/broker.hpp>
#include <myelin/broker/control_cpus.hpp>
#include <myelin/broker/param_server.hpp>
#include <myelin/broker/scheduling.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker {

struct AclEntry {
  std::string identity;                // exact identity, or "*" for every client without an entry
  std::vector<std::string> publish;    // patterns it may publish/request/push to
  std::vector<std::string> subscribe;  // patterns it may subscribe/serve/pull under
  double rate_limit_msgs_per_s = 0;    // 0: unlimited
  double rate_limit_burst = 0;         // bucket size; 0: one second's worth
};

// Bounds of ServerOptions' sizes and intervals, checked by Server::create() (invalid_argument
// naming the option) and by the daemon's configuration; docs/broker.md lists them.
inline constexpr uint32_t kMinChunkBytes = 1024;
inline constexpr uint32_t kMaxChunkBytes = uint32_t{1} << 20;
inline constexpr size_t kMaxBatchBytes = size_t{16} << 20;
inline constexpr uint32_t kMaxBatchCount = 65536;
inline constexpr int64_t kMaxBatchWindowUs = 1'000'000;
inline constexpr uint32_t kMaxPublishCredits = uint32_t{1} << 20;
inline constexpr int kMaxSocketBufferBytes = 256 << 20;
inline constexpr uint32_t kMaxBulkInflightBytes = uint32_t{256} << 20;
inline constexpr int64_t kMinHeartbeatMs = 10;
inline constexpr int64_t kMaxHeartbeatMs = 3'600'000;
inline constexpr int64_t kMaxHandshakeTimeoutMs = 3'600'000;
inline constexpr int kMaxNumaNode = 4095;
inline constexpr uint32_t kMaxPsWorkers = 65536;

struct ServerOptions {
  std::string listen = "127.0.0.1:7400";       // port 0 picks one (see port()); not empty
  std::string metrics_listen = "127.0.0.1:0";  // "" disables HTTP
  std::string secret;                          // required, at least 16 bytes
  std::vector<AclEntry> acl;                   // empty: everyone may do everything
  BrokerOptions broker;
  uint32_t chunk_bytes = 64 * 1024;
  size_t batch_bytes = 64 * 1024;  // 0 .. kMaxBatchBytes; 0 disables batching
  uint32_t batch_count = 256;      // 0 .. kMaxBatchCount; 0 or 1: one message per batch
  int64_t batch_window_us = 200;
  // Per client window: messages a client may have published that the broker has not accepted
  // yet (parked, waiting for room in a full topic under the block policy); returned half a
  // window at a time.
  uint32_t publish_credits = 512;
  // Kernel send/receive buffer per client socket (0: the kernel's autotuning, up to several MiB).
  // It bounds how much bulk data can sit in the kernel ahead of a control frame: the lanes order
  // frames only until they are written to the socket. 64 KiB: with cores to spare, 256 KiB let
  // a 1 MiB flood hold a control frame ~0.55 ms (p99) in the kernel, 64 KiB ~0.13 ms, and the
  // flood itself moved faster (docs/performance.md, "Broker").
  int socket_buffer_bytes = 64 * 1024;
  // The kernel buffers of a session's main connection once its control connection attached
  // (the main connection then carries bulk, credits and read reports, never a control frame):
  // bigger writes, fewer wake-ups per message (docs/performance.md, "Broker"). Capped by
  // net.core.wmem_max / rmem_max; the receive side may not grow past the window scale agreed
  // when the connection opened. At most socket_buffer_bytes (or 0): unchanged.
  int bulk_socket_buffer_bytes = 512 * 1024;
  // Bulk-lane bytes the broker lets sit unread in the kernel buffers towards one client (the
  // client reports what it reads every quarter of this). Past it, bulk waits in the broker's own
  // queue, where control frames overtake it: a control frame then waits behind at most this
  // much bulk plus one chunk instead of both socket buffers full. It applies to a client only
  // while control messages flow to it (one in the last 100 ms): the reports and the smaller
  // pipeline cost bulk throughput. 0: no limit but the buffers.
  uint32_t bulk_inflight_bytes = 128 * 1024;
  int64_t heartbeat_ms = 1000;          // clients silent for 3x this are dropped (10 .. 3 600 000)
  int64_t handshake_timeout_ms = 5000;  // 1 .. 3 600 000
  // A thread of its own for control connections (see above). Off: the loop thread serves them
  // between bulk steps (one thread in all; on a host with fewer CPUs than busy threads a control
  // frame then waits for the loop's turn on a CPU).
  bool control_thread = true;
  // With the control thread: the nice value (0..19) the loop thread gives itself, so the bulk it
  // moves yields the CPU to the control thread (and to the clients' threads at the default
  // priority) when a host has fewer CPUs than busy threads. Lowering one's own priority needs no
  // privilege. The loop still gets its share whenever nothing of higher priority is runnable.
  // 0: unchanged; ignored without the control thread (the loop serves control then).
  int loop_nice = 0;
  // With the control thread: how the loop thread is scheduled (scheduling.hpp). kIdle
  // (SCHED_IDLE): a woken control thread, or a client thread of this process group, preempts the
  // loop at once instead of waiting out its time slice; the loop gets next to no CPU while other
  // work keeps every CPU busy, so bulk then slows to a crawl. loop_nice has no effect with kIdle.
  // Ignored without the control thread. Default kNormal (docs/performance.md, "Broker": what it
  // buys on a 2-vCPU host and what it costs bulk).
  BulkScheduling loop_scheduling = BulkScheduling::kNormal;
  // With the control thread: how it is scheduled (scheduling.hpp). kRealtime ("rr"): SCHED_RR
  // at priority 1, so that a control frame's wake-up runs it at once even while bulk keeps every
  // CPU busy; it does not spin (spin_before_block_us), since a real-time spinner keeps
  // fair-class threads off its CPU. Needs CAP_SYS_NICE or RLIMIT_RTPRIO >= 1; without them the
  // thread logs a warning and keeps the default policy.
  // Ignored without the control thread. Default kNormal (docs/broker.md, "Control threads under
  // SCHED_RR"; what it buys and costs on a 2-vCPU host: docs/performance.md, "Broker").
  ControlScheduling control_scheduling = ControlScheduling::kNormal;
  // With the control thread: CPUs kept free of bulk work while control traffic flows
  // (control_cpus.hpp): the loop thread, and every other bulk thread of this process, leaves
  // them while a control message was handled within control_cpus_hold_ms, so a woken control
  // thread finds one of them free even when bulk keeps every other CPU inside system calls.
  // Reserved for the process at start() (one set per process, for its lifetime). Empty: none
  // (the default). The control thread itself is not pinned. With `nic` or `numa_node`, reserve
  // CPUs of that node (the control thread runs there). Errors: at create(), invalid_argument for
  // a CPU this process may not run on, every allowed CPU reserved, a hold outside
  // 1..3 600 000 ms, or a reservation without the control thread; at start(),
  // failed_precondition when the process already keeps other CPUs.
  std::vector<int> control_cpus;
  int64_t control_cpus_hold_ms = kDefaultControlHoldMs;
  // Spin-then-block, as the transport's ProgressMode::kSpinThenBlock: after a pass that found
  // something to do, the control thread and the loop thread look at their sockets again without
  // blocking, yielding the CPU between looks, for up to this long before they sleep in epoll. A
  // frame that comes soon after the last one (the other half of a round trip) then finds the
  // thread running and its CPU awake instead of waking a halted CPU (on a VM, an interrupt to an
  // idle vCPU, ~10 us). The yields give way only within the spinner's own scheduling group
  // (autogroup or cgroup); a thread of another group that needs the CPU waits up to the spin
  // period (a yield that kept the spinner off the CPU for over 50 us ends the spin). It costs
  // CPU: a thread that gets a frame every few spin periods stays busy. 0: sleep at once. At
  // most 100 000. 50 us, as the transport's spin_before_block: on the 2-vCPU VM (with the
  // clients' spin) the 1 KiB p50 of a round trip was 0.41-0.90x HEAD's in direct A/Bs, with no
  // loss of throughput resolvable (docs/performance.md, "Broker").
  int64_t spin_before_block_us = 50;
  // Pin the loop (and control) thread on NUMA node `numa_node` (-1: don't; at most kMaxNumaNode),
  // or on the node of NIC `nic` ("mlx5_0", "eth0"); not both. A node or NIC this host does not
  // have is logged as a warning and the threads run unpinned (one configuration may serve hosts
  // that differ), see placement().
  int numa_node = -1;
  std::string nic;
  bool enable_ps = false;
  ParameterServerOptions ps;
};

struct ServerCounters {
  uint64_t connections_accepted = 0, connections_active = 0;
  uint64_t auth_failures = 0, acl_denied = 0, protocol_errors = 0;
  uint64_t dead_clients = 0, rate_limited = 0, credit_stalls = 0;
  uint64_t frames_in = 0, frames_out = 0, bytes_in = 0;
  uint64_t attach_refused = 0;       // control connections refused (also in auth_failures)
  uint64_t version_refused = 0;      // clients without a common protocol version
  uint64_t control_connections = 0;  // sessions with a control connection now
};

class Server {
 public:
  static Result<std::unique_ptr<Server>> create(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Starts the loop thread.
  Status start();
  // Stops accepting, tells clients (goaway), keeps delivering until every queue is empty or the
  // deadline passes, then closes everything. Returns kTimeout if work was left.
  Status drain(Deadline deadline);
  // Closes at once.
  void stop();

  [[nodiscard]] uint16_t port() const noexcept { return port_; }
  [[nodiscard]] uint16_t metrics_port() const noexcept { return metrics_port_; }
  [[nodiscard]] Broker& broker() noexcept { return *broker_; }
  [[nodiscard]] ParameterServer* parameter_server() noexcept { return ps_.get(); }
  [[nodiscard]] ServerCounters counters() const;
  // Prometheus text exposition of every counter, gauge and histogram.
  [[nodiscard]] std::string metrics_text() const;
  // Where the loop thread was placed ("numa node 0", "not pinned: ...").
  [[nodiscard]] std::string placement() const;

  class Impl;

 private:
  explicit Server(ServerOptions o);
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<Broker> broker_;
  std::unique_ptr<ParameterServer> ps_;
  uint16_t port_ = 0, metrics_port_ = 0;
};

// Parses an HTTP/1.x request head (what /metrics and /healthz read from a peer). Returns the
// path of a GET, kNeedMore-style false while the head is incomplete. Errors: protocol_error for
// anything malformed, unsupported for other methods. Exposed for tests and fuzzing.
Result<bool> parse_http_get(std::string_view head, std::string* path);

}  // namespace myelin::broker
