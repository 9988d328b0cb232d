// transport/src/tcp/tcp_backend.hpp — the TCP backend (not public API).
//
// One listening socket and one epoll set per Context. A Connection is one TCP socket to one peer
// Context, carrying the frames of tcp_frame.hpp; it is fully functional before any Endpoint claims
// it (messages that arrive early are buffered, one-sided operations are served), so the first of
// two peers to call connect() never waits for the other.
//
// Connection rule: of two peers, the one whose address entry is lexicographically smaller dials;
// the larger one claims the accepted connection once its hello arrives (connect() returns at once
// with an Endpoint whose operations queue until then, and fail if the peer does not dial within
// the connect deadline).
//
// Thread safety: none; everything runs on the owning Context's thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <myelin/transport/request.hpp>

#include "backend.hpp"
#include "tcp/tcp_frame.hpp"

namespace myelin::transport::internal::tcp {

class TcpBackend;

// Registered regions by id; shared with the registrations so deregistration removes the entry.
struct RegionTable {
  std::unordered_map<uint64_t, const RegionState*> regions;
};

class Connection {
 public:
  enum class State : uint8_t { kAwaiting, kOpen, kFailed };

  Connection(TcpBackend& backend, int fd, State state);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  // Endpoint operations.
  Request send(uint32_t channel, const void* data, size_t size);
  Request recv(uint32_t channel, void* data, size_t capacity);
  Request put(const void* local, size_t size, const RemoteKey& remote, uint64_t offset,
              bool with_immediate, uint32_t immediate);
  Request get(void* local, size_t size, const RemoteKey& remote, uint64_t offset);
  bool try_pop_immediate(uint32_t& value);
  [[nodiscard]] Status status() const { return state_ == State::kFailed ? status_ : ok_status(); }

  // Progress engine.
  // Reads and handles what the socket has; returns the bytes read (0: nothing there, or the
  // connection ended). With block_ms > 0 the first read sleeps up to block_ms for data (the
  // socket is in blocking mode; every other call passes MSG_DONTWAIT).
  size_t on_readable(int block_ms = 0);
  void flush();
  // Ends the connection: closes the socket and completes every pending operation with `why`.
  void fail(Status why, bool warn);
  // Moves the socket and unread bytes of an accepted connection into this awaiting one.
  void adopt(Connection& accepted);
  void queue_hello(bool reply);

  [[nodiscard]] int fd() const noexcept { return fd_; }
  [[nodiscard]] bool has_output() const noexcept { return !out_.empty(); }
  // A large payload is half-way: the rest of one still to read, or one queued to write.
  [[nodiscard]] bool bulk_pending() const noexcept;
  [[nodiscard]] State state() const noexcept { return state_; }
  [[nodiscard]] const std::string& peer_name() const noexcept { return *peer_name_; }
  void set_peer(std::vector<uint8_t> address, std::string name);
  [[nodiscard]] const std::vector<uint8_t>& peer_address() const noexcept { return peer_bytes_; }

  // Sleeps in poll on this socket alone (readable, or writable while output is queued) for up to
  // max_ms, then reads and flushes what it can; returns the bytes read.
  size_t wait_and_serve(int max_ms);

  bool claimed = false;     // an Endpoint owns it
  bool dialer = false;      // we dialed: the first frame we read must be a hello reply
  int64_t deadline_ns = 0;  // awaiting / hello deadline (0: none)
  bool want_write = false;  // EPOLLOUT registered

 private:
  // A queued frame. Its sequence number is assigned, and its header encoded, when it is first
  // handed to sendmsg (encoded == true), so that control frames may overtake rendezvous payloads
  // still waiting in the queue (see enqueue()).
  struct OutFrame {
    FrameHeader h;
    bool encoded = false;
    uint8_t header[kHeaderSize];
    const uint8_t* payload = nullptr;
    size_t payload_len = 0;
    size_t sent = 0;
    RequestStateRef done;
    size_t done_bytes = 0;
    std::vector<uint8_t> owned;
  };
  struct PostedRecv {
    uint8_t* data;
    size_t capacity;
    RequestStateRef state;
  };
  struct Unexpected {
    bool rts = false;
    uint64_t send_id = 0;       // rts
    uint64_t size = 0;          // rts
    std::vector<uint8_t> data;  // eager
  };
  struct PendingSend {
    const uint8_t* data;
    size_t size;
    uint32_t channel;
    RequestStateRef state;
  };
  struct AwaitingData {
    uint8_t* data;
    size_t size;
    RequestStateRef state;
  };
  struct RemoteOp {
    bool is_get;
    uint8_t* local;  // get destination
    size_t size;
    uint64_t region;
    uint64_t offset;
    RequestStateRef state;
  };
  enum class Sink : uint8_t {
    kNone,
    kHello,
    kEagerToRecv,
    kEagerTooSmall,
    kEagerUnexpected,
    kData,
    kPut,
    kGetResp
  };

  void enqueue(const FrameHeader& h, const void* payload, size_t len, RequestStateRef done,
               size_t done_bytes);
  FrameHeader next_header(FrameType type);
  Request post_send_fast(FrameHeader& h, const void* data, size_t size);
  bool parse_buffered();
  void read_failed(ssize_t r, int err);
  // Whether any operation of this connection is still waiting (a clean close with nothing
  // pending is the normal end of a job, not worth a warning).
  [[nodiscard]] bool has_pending() const noexcept;
  Status begin_frame(const FrameHeader& h);
  Status finish_payload();
  void answer_rts(uint32_t channel, uint64_t send_id, uint64_t size, PostedRecv recv);
  void reply(FrameType type, uint64_t id, uint64_t code, uint64_t reason, const void* payload,
             size_t len);
  Status check_key(const RemoteKey& remote, uint64_t offset, size_t size, const char* op) const;
  Status frame_error(const Status& s) const;

  TcpBackend& backend_;
  // Sets SO_RCVTIMEO for a blocking read, skipping the call when it is already set.
  bool set_receive_timeout(int ms);
  // on_readable() without the watermark update.
  size_t read_available(int block_ms);
  // Sets SO_RCVLOWAT for what the connection waits for next: most of a large payload's remainder
  // while one is being read and the Context sleeps on the epoll set (kernel wake-ups of a sleeper
  // come per that many bytes, not per arriving segment), 1 byte otherwise. Skips the call when
  // the value is already set.
  void update_receive_watermark();

  int fd_;
  int rcvtimeo_ms_ = 0;  // SO_RCVTIMEO on fd_ (0: none)
  int rcvlowat_ = 1;     // SO_RCVLOWAT on fd_ (1: the kernel's default)
  State state_;
  Status status_;
  std::shared_ptr<const std::string> peer_name_;
  std::vector<uint8_t> peer_bytes_;
  uint64_t peer_instance_ = 0;
  bool got_hello_ = false;

  // Writing.
  std::deque<OutFrame> out_;
  uint32_t wseq_ = 0;
  uint64_t next_op_ = 1;

  // Reading: a staging buffer for headers and small payloads; large payloads go straight to
  // their destination.
  std::vector<uint8_t> rbuf_;
  size_t rpos_ = 0, rlen_ = 0;
  uint32_t rseq_ = 0;
  bool in_payload_ = false;
  FrameHeader cur_;
  Sink sink_ = Sink::kNone;
  uint8_t* sink_ptr_ = nullptr;  // null: discard
  uint64_t pay_done_ = 0;
  RequestStateRef sink_state_;
  std::vector<uint8_t> sink_buf_;
  size_t sink_capacity_ = 0;
  RemoteError put_error_ = RemoteError::kNone;
  // The last frame was large: the next is likely another large one, so read its header alone
  // rather than pull its payload through the staging buffer.
  bool header_only_read_ = false;

  // Matching: per channel, posted receives and messages that arrived before theirs. Entries are
  // never erased (a node-based map keeps references stable), so the last channel used is cached:
  // a ping-pong on one channel looks it up without hashing.
  struct ChannelQueues {
    std::deque<PostedRecv> posted;
    std::deque<Unexpected> unexpected;
  };
  ChannelQueues& queues(uint32_t channel) {
    if (last_queues_ == nullptr || channel != last_channel_) {
      last_queues_ = &channels_[channel];
      last_channel_ = channel;
    }
    return *last_queues_;
  }
  std::unordered_map<uint32_t, ChannelQueues> channels_;
  ChannelQueues* last_queues_ = nullptr;
  uint32_t last_channel_ = 0;
  std::unordered_map<uint64_t, PendingSend> rts_sent_;   // by send id, waiting for CTS
  std::unordered_map<uint64_t, AwaitingData> awaiting_;  // by receive token
  std::unordered_map<uint64_t, RemoteOp> remote_ops_;    // put/get by op id
  std::deque<uint32_t> immediates_;
};

class TcpBackend final : public BackendContext {
 public:
  static Result<std::unique_ptr<BackendContext>> create(const Options& options,
                                                        const ContextInfo& info);
  ~TcpBackend() override;

  [[nodiscard]] Backend kind() const noexcept override { return Backend::kTcp; }
  [[nodiscard]] Limits limits() const noexcept override { return limits_; }
  [[nodiscard]] std::vector<uint8_t> local_address() const override { return self_bytes_; }
  Result<std::unique_ptr<Endpoint>> connect(std::span<const uint8_t> peer_address,
                                            const std::string& peer_name,
                                            Deadline deadline) override;
  Result<std::unique_ptr<BackendRegistration>> register_memory(const RegionState& region) override;
  size_t progress() override;
  [[nodiscard]] int wait_fd() const noexcept override { return epoll_fd_; }
  bool arm_wait() override;
  // With one connection and nothing else due, sleeps in that socket's recv (or poll, while output
  // is queued) instead of the epoll set, and takes that socket out of the set meanwhile; every
  // kBlockingEpollEvery-th call declines, so the Context's wait on the epoll set still sees the
  // listener. With several connections (or none) it sleeps in epoll_wait on the set itself and
  // serves what the set reports.
  bool progress_blocking(int max_ms, size_t& handled) override;

  // For connections.
  Status on_hello(Connection& conn, const Hello& hello, bool reply);
  void on_failed(Connection& conn);
  void update_events(Connection& conn);
  [[nodiscard]] const RegionState* find_region(uint64_t id) const;
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  [[nodiscard]] const ContextInfo& info() const noexcept { return info_; }
  [[nodiscard]] const std::vector<uint8_t>& self_bytes() const noexcept { return self_bytes_; }
  [[nodiscard]] uint64_t instance() const noexcept { return self_.instance; }
  // Whether the last wait of this Context that slept, slept on the epoll set (arm_wait(), or
  // progress_blocking() with several connections): only then do connections raise their receive
  // watermark. A busy poll reads what is there; a lone connection sleeps in its own recv with
  // MSG_WAITALL, which needs no watermark, and with a raised one there the peer's bytes stalled
  // until a 100 ms sleep step ran out (2 ranks, 1 MiB allreduce: docs/performance.md,
  // Collectives).
  [[nodiscard]] bool sleeps_on_set() const noexcept { return sleeps_on_set_; }
  void release(Connection& conn);  // the Endpoint is gone

 private:
  TcpBackend(const Options& options, const ContextInfo& info);
  Status open_listener();
  void accept_all();
  void check_timers();
  Status watch(Connection& conn);
  // Serves connections whose bytes may already be buffered, checks timers, frees dead
  // connections.
  void finish_progress(size_t& handled);
  void yield_if_bulk_stalled();
  // One epoll_wait on the set (up to timeout_ms) and the service of every socket it reports:
  // accepts, reads (the connection that delivered becomes the hot one), flushes. Returns the
  // number of events.
  size_t serve_set(int timeout_ms);

  Options options_;
  ContextInfo info_;
  Limits limits_;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  TcpAddress self_;
  std::vector<uint8_t> self_bytes_;
  std::shared_ptr<RegionTable> regions_ = std::make_shared<RegionTable>();
  // Every live connection (owning), and identified ones by the peer's address entry.
  std::unordered_map<Connection*, std::shared_ptr<Connection>> live_;
  std::map<std::vector<uint8_t>, std::shared_ptr<Connection>> by_peer_;
  std::vector<std::shared_ptr<Connection>> graveyard_;  // destroyed at the end of progress()
  std::vector<std::shared_ptr<Connection>> pending_reads_;
  int64_t next_timer_check_ns_ = 0;
  // Some live connection may have a deadline_ns (set wherever one is given; cleared by
  // check_timers once a scan finds none).
  bool timers_armed_ = false;
  // The connection that last delivered bytes. progress() reads it directly (one recv, no
  // epoll_wait) while it keeps delivering; epoll_wait still runs every kEpollEvery calls and
  // whenever the hot connection is quiet, so no other socket waits long. Cleared when it fails,
  // and, with several connections, when a direct read finds it quiet (see progress()).
  Connection* hot_ = nullptr;
  // The hot connection while it is out of the epoll set (see progress_blocking()); put back by
  // reattach() as soon as anything needs the set to report it: output queued (EPOLLOUT), the
  // Context sleeping on the set (arm_wait()), another connection becoming the hot one.
  Connection* detached_ = nullptr;
  bool quiet_sleep_ = false;    // the last progress_blocking() sleep brought nothing
  bool sleeps_on_set_ = false;  // see sleeps_on_set()
  // arm_wait() let the Context sleep on the epoll set: the next progress() asks the set first.
  bool slept_on_set_ = false;
  void reattach();
  uint32_t polls_ = 0;
};

}  // namespace myelin::transport::internal::tcp
