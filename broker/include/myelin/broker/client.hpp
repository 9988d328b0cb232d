// myelin/broker/client.hpp
//
// Client: what training code links to talk to a myelin broker (myelin-broker or an embedded
// Server). connect() authenticates (challenge-response on the job secret; the broker proves it
// knows the secret too), agrees on a protocol version, and, with a broker that speaks protocol 2,
// attaches a second connection to the session for the control lane (authenticated with a
// per-session token): control-lane frames to and from the broker then never wait behind bulk
// bytes in a socket. It starts one I/O thread that reads, sends heartbeats and flushes. A thread
// in poll() that finds nothing queued reads the sockets itself meanwhile (one reader per
// connection at a time, the control connection first), so a polled message reaches its caller
// without a hand-off from the I/O thread.
//
//  - publish(): at-most-once, fire and forget. Blocks only while the broker holds back this
//    producer (no publish credits left: a subscriber is full under the block policy, or a rate
//    limit applies), until the deadline; the stall is counted.
//  - subscribe(pattern, handler): handlers run on the thread that reads the socket (the I/O
//    thread, or a thread blocked in poll()), one at a time (also across the two connections),
//    and must not block for long. Without a
//    handler, messages go to poll(). Either way a delivery credit goes back to the broker once the
//    message was handed over, so a slow consumer slows the broker's sending to it, never loses
//    messages silently (see the topic's overflow policy).
//  - Received payloads are not copied: ReceivedMessage::payload points into the receive buffer,
//    kept alive by ReceivedMessage::owner.
//  - request(): at-least-once with retries, exponential back-off and de-duplication by message id
//    on the responder (serve()) side.
//  - ps_push()/ps_pull(): parameter-server operations against the broker's shard.
//
// Thread safety: every method may be called from any thread. Errors after the connection broke:
// the connection's status (peer_failed ...) from every call; nothing waits past its deadline.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <myelin/broker/broker.hpp>
#include <myelin/broker/control_cpus.hpp>
#include <myelin/broker/scheduling.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker {

// Longest connect timeout Client::connect() accepts (~116 days).
inline constexpr int64_t kMaxConnectTimeoutMs = 10'000'000'000;

// Client::connect() refuses values outside the ranges noted (invalid_argument naming the option);
// the bounds are the server's (server.hpp).
struct ClientOptions {
  std::string address = "127.0.0.1:7400";
  std::string identity = "client";
  std::string secret;
  int64_t connect_timeout_ms = 5000;  // 1 .. kMaxConnectTimeoutMs
  uint32_t receive_window = 1024;     // delivery credits granted to the broker; > 0
  // The broker is declared dead after 3x this of silence; kMinHeartbeatMs .. kMaxHeartbeatMs.
  int64_t heartbeat_ms = 1000;
  uint32_t chunk_bytes = 64 * 1024;  // kMinChunkBytes .. kMaxChunkBytes
  size_t batch_bytes = 64 * 1024;    // 0 (no batching) .. kMaxBatchBytes
  int64_t batch_window_us = 200;     // 0 .. kMaxBatchWindowUs
  uint32_t ps_worker = 0;            // this worker's index for parameter-server pushes
  // Kernel send/receive buffer of the connection (0: the kernel's autotuning); see
  // ServerOptions::socket_buffer_bytes.
  int socket_buffer_bytes = 256 * 1024;
  // poll() with nothing queued reads the socket itself instead of sleeping until the I/O thread
  // read the message and woke it (a thread wake-up, 5-20 us on a busy machine, per message).
  // Meanwhile, and for poll_read_grace_us after the last poll() read, the I/O thread does not
  // watch the socket for input: messages for handlers wait at most that long when nothing polls.
  bool poll_reads_socket = true;
  int64_t poll_read_grace_us = 2000;  // 0 .. kMaxBatchWindowUs
  // Attach a control connection when the broker speaks protocol 2 (a broker of protocol 1 gets
  // one connection either way). Off: control frames share the one connection with bulk, behind
  // whatever bulk bytes the socket buffers hold. The two connections live and die together: a
  // failure or silence of either fails the client (peer_failed).
  bool control_connection = true;
  // Lowers the I/O thread's CPU priority by this much (nice, 0..19; 0: as the creating thread).
  // With a control connection and a thread in poll(), the I/O thread is the one that reads bulk:
  // on a node with more runnable threads than CPUs, the control path (the polling thread, the
  // broker) then gets the CPU first. Messages for handlers, which run on the I/O thread, wait
  // longer under load in exchange. Lowering needs no privilege.
  int io_thread_nice = 0;
  // How the I/O thread is scheduled (scheduling.hpp). kIdle (SCHED_IDLE): a woken thread of this
  // process group (the one in poll(), a publisher) preempts it at once. It reads what no poll()
  // caller reads: bulk, and control too while no thread polls, and runs the handlers; all of
  // that then gets next to no CPU while other work keeps every CPU busy. Meant for a client whose
  // control messages go through poll() on a control connection. io_thread_nice has no effect
  // with kIdle. Default kNormal (docs/performance.md, "Broker").
  BulkScheduling io_thread_scheduling = BulkScheduling::kNormal;
  // Spin-then-block for a poll() caller that reads the sockets itself: before it sleeps in
  // ppoll, it looks at them without blocking, yielding the CPU between looks, for up to this
  // long, so a reply that comes within it finds the thread running and its CPU awake (no wake-up
  // of a halted CPU). The yields give way only within the caller's own scheduling group
  // (autogroup or cgroup): a thread of another group (a broker on this host) that needs the CPU
  // waits up to the spin period; a yield that kept the caller off the CPU for over 50 us ends
  // the spin. It costs CPU: a thread waiting in poll() spins this long per wait (every 20 ms while
  // nothing comes). 0: sleep at once. At most 100 000. The I/O thread never spins. 50 us, as the
  // broker's and the transport's spin_before_block.
  int64_t spin_before_block_us = 50;
  // CPUs kept free of bulk work while control traffic flows (control_cpus.hpp): this client's
  // I/O thread, and every other bulk thread of this process (a thread that publishes on the bulk
  // lane included), leaves them while a control message was handled within
  // control_cpus_hold_ms; with a control connection, a poll() caller then reads only the control
  // connection. Reserved for the process at connect(), for the process's lifetime (one set per
  // process; a failed connect() does not undo it). Empty: none (the default). Errors at
  // connect(): invalid_argument for a CPU this process may not run on, every allowed CPU
  // reserved or a hold outside 1..3 600 000 ms; failed_precondition when another client or an
  // embedded broker reserved other CPUs.
  std::vector<int> control_cpus;
  int64_t control_cpus_hold_ms = kDefaultControlHoldMs;
  // Closing (the destructor) sends what is still queued for the broker, waiting at most this
  // long for the sockets to take it; what is left after that (a broker that stopped reading) is
  // dropped with a warning that says how much.
  int64_t close_flush_ms = 2000;
};

struct ReceivedMessage {
  std::string topic;
  uint64_t seq = 0;            // the topic's sequence number
  uint64_t id = 0;             // message id
  uint64_t publish_ts_ns = 0;  // publisher's CLOCK_MONOTONIC (comparable on one host)
  uint64_t missed_before = 0;  // messages of this topic skipped before this one (gap)
  bool control = false;
  std::shared_ptr<const void> owner;
  std::span<const std::byte> payload;
  [[nodiscard]] std::string_view text() const {
    return {reinterpret_cast<const char*>(payload.data()), payload.size()};
  }
};

struct PublishOptions {
  Lane lane = Lane::kBulk;
  bool batch = true;  // may be coalesced (off: sent at once)
  int64_t timeout_ms = 10000;
};

struct RequestOptions {
  int64_t attempt_timeout_ms = 1000;
  uint32_t max_attempts = 8;
  int64_t backoff_ms = 10;
  double backoff_factor = 2.0;
  int64_t max_backoff_ms = 1000;
  Lane lane = Lane::kControl;
};

struct Reply {
  std::vector<std::byte> payload;
  uint32_t attempts = 0;
};

struct ClientStats {
  uint64_t gaps_missed = 0;         // messages known missing from sequence gaps
  uint64_t publish_stalls = 0;      // publishes that waited for credits
  uint64_t duplicate_requests = 0;  // requests answered from the de-duplication cache / dropped
  uint64_t handler_calls = 0;       // request handler invocations
  uint64_t received = 0;
  // Open batches the I/O thread sent when the batch timer fired at the end of their window (the
  // publisher fell idle before they filled).
  uint64_t timer_flushes = 0;
};

using MessageHandler = std::function<void(const ReceivedMessage&)>;
using RequestHandler = std::function<Result<std::vector<std::byte>>(const ReceivedMessage&)>;

class Client {
 public:
  static Result<std::unique_ptr<Client>> connect(ClientOptions options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  Status publish(std::string_view topic, std::span<const std::byte> payload, PublishOptions o = {});
  Status publish(std::string_view topic, std::string_view text, PublishOptions o = {}) {
    return publish(
        topic,
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(text.data()), text.size()),
        o);
  }
  // Returns the subscription id once the broker confirmed it (errors: permission_denied, ...).
  Result<uint64_t> subscribe(std::string_view pattern, MessageHandler handler = {},
                             int64_t timeout_ms = 5000);
  Status unsubscribe(uint64_t subscription, int64_t timeout_ms = 5000);
  // The next message for handler-less subscriptions; timeout_error when none arrives in time.
  Result<ReceivedMessage> poll(Deadline deadline);
  // Answers requests on topics matching `pattern`.
  Status serve(std::string_view pattern, RequestHandler handler, int64_t timeout_ms = 5000);
  Result<Reply> request(std::string_view topic, std::span<const std::byte> payload,
                        RequestOptions o = {});

  Status ps_init(std::string_view key, std::span<const float> initial, int64_t timeout_ms = 5000);
  Status ps_push(std::string_view key, std::span<const float> grad, uint64_t step,
                 int64_t timeout_ms = 10000);
  // Lands the parameters in `out` (the key's size); returns the version.
  Result<uint64_t> ps_pull(std::string_view key, uint64_t min_version, std::span<float> out,
                           int64_t timeout_ms = 10000);

  [[nodiscard]] Status status() const;
  [[nodiscard]] ClientStats stats() const;
  [[nodiscard]] uint64_t client_id() const noexcept;

  class Impl;

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace myelin::broker
