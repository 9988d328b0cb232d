// Private: the byte-stream side of the broker protocol shared by the server and the client.
//  - Fd: RAII file descriptor.
//  - TCP helpers: listen, connect with a deadline, address parsing.
//  - OutQueue: two outgoing lanes per connection. Control frames always go first; bulk messages
//    are cut into chunks and the writer re-checks the control lane after every chunk, so a control
//    frame waits for at most one chunk. Small batchable messages are coalesced per lane into batch
//    frames, bounded by bytes, count and a time window.
//  - RxBuffer: reads into reference-counted blocks so decoded payloads can be handed out without a
//    copy (zero-copy receive); a frame split across blocks is moved once into a fresh block. A
//    block whose last reference is dropped (on whichever thread) goes back to its buffer's pool and
//    is reused uncleared, so a busy connection does not allocate, zero and fault in a block per
//    block's worth of bytes.
// Thread safety: none; each object belongs to one connection, used under its owner's lock/thread.
#pragma once

#include <sched.h>
#include <sys/epoll.h>
#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include <myelin/broker/frame.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker::internal {

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
  int release() noexcept {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

struct HostPort {
  std::string host;
  uint16_t port = 0;
};
// "host:port", "[v6]:port" or ":port" (all interfaces). Errors: invalid_argument.
Result<HostPort> parse_host_port(std::string_view text);
// A non-blocking listening socket (SO_REUSEADDR). Port 0 picks a free port.
Result<Fd> listen_tcp(const HostPort& where, int backlog = 128);
// The port a listening socket is bound to.
Result<uint16_t> local_port(int fd);
// A non-blocking connected socket with TCP_NODELAY; waits for the connection until `deadline`.
// buffer_bytes > 0 caps the kernel's send and receive buffers (set before connecting, so the
// window scale fits), see set_socket_buffers().
Result<Fd> connect_tcp(const HostPort& where, Deadline deadline, int buffer_bytes = 0);
// Caps a socket's kernel send and receive buffers at `bytes` (the kernel doubles the figure for
// its bookkeeping). Without a cap Linux grows them to several MiB per connection, and a control
// frame written after a bulk flood waits until the peer has read every byte queued ahead of it
// there: the lanes order frames only up to the socket. 0: leave the kernel's autotuning.
void set_socket_buffers(int fd, int bytes);
Status set_nonblocking(int fd);
// epoll_wait with a nanosecond timeout (epoll_pwait2; rounded up to milliseconds where the kernel
// lacks it), so a 200 us batch window is not stretched to a whole millisecond. Negative: forever.
int epoll_wait_ns(int epfd, epoll_event* events, int max_events, int64_t timeout_ns);

// Spin-then-block waits (ServerOptions / ClientOptions::spin_before_block_us): calls `poll_once`
// (a look that does not block; > 0: something is there) until it finds something or the clock
// passes `spin_until_ns`, and yields between looks (sched_yield): a runnable thread of the
// spinner's own scheduling group (autogroup or cgroup) on its CPU runs at once, while one of
// another group waits until the spin ends, up to the spin period. A yield that kept this thread
// off the CPU for longer than kSpinGiveUpNs says the CPU is wanted by other work: the spin ends
// there (the caller blocks). Returns the last look's result: > 0 found, 0 spin over, < 0 error
// (errno set). `give_up_ns`: for tests (INT64_MAX: never give up).
inline constexpr int64_t kSpinGiveUpNs = 50'000;
template <class PollOnce>
int spin_until(PollOnce&& poll_once, int64_t spin_until_ns, int64_t give_up_ns = kSpinGiveUpNs) {
  while (true) {
    const int r = poll_once();
    if (r != 0) return r;
    const int64_t before = monotonic_ns();
    if (before >= spin_until_ns) return 0;
    ::sched_yield();
    if (monotonic_ns() - before > give_up_ns) return 0;
  }
}

struct OutOptions {
  uint32_t chunk_size = 64 * 1024;
  size_t batch_bytes = 64 * 1024;  // 0 disables batching
  uint32_t batch_count = 256;
  int64_t batch_window_ns = 200'000;
  size_t batch_max_message = 4096;  // larger messages are never batched
};

// Batching never delays a lone message: a batchable message that finds no batch open and follows
// the previous batchable message of its lane by at least the batch window goes out at once; only
// messages that come in close succession are coalesced (up to bytes, count or window).

class OutQueue {
 public:
  explicit OutQueue(OutOptions o = {}) : opt_(o) {}
  // Queues one message; the lane is h.flags & kFlagControl. Payload stays referenced through
  // `owner` (null: copied). Errors: invalid_argument for a control message over one chunk.
  Status push(FrameHeader h, std::string_view topic, std::span<const std::byte> payload,
              std::shared_ptr<const void> owner, bool batchable, int64_t now_ns);
  // Writes what the socket accepts. Returns true when everything queued went out. Errors:
  // peer_failed when the peer closed, io_error otherwise. `bulk_budget` bounds the bulk-lane
  // bytes this call starts (a chunk already started is finished; control frames are never held):
  // bulk left for want of budget stays queued, where later control frames overtake it, and
  // window_limited() says so.
  Result<bool> flush(int fd, size_t bulk_budget = SIZE_MAX);
  // The last flush() stopped because of its bulk budget, not because the socket was full.
  [[nodiscard]] bool window_limited() const noexcept { return window_limited_; }
  // Bytes written to the socket so far.
  [[nodiscard]] uint64_t bytes_written() const noexcept { return bytes_written_; }
  // push() then flush(), except that a message that would go out alone anyway (nothing queued
  // or batched ahead of it, at most one chunk, not coalesced) is written straight from the
  // caller's buffers; only what the socket does not take is copied and queued. Same results as
  // flush(). While the socket is full (its last write was refused) and bytes are still queued,
  // it only queues and returns false: the caller must have the socket watched for room whenever
  // this returns false, and flush() there.
  Result<bool> push_and_flush(int fd, FrameHeader h, std::string_view topic,
                              std::span<const std::byte> payload, std::shared_ptr<const void> owner,
                              bool batchable, int64_t now_ns);
  // Takes every control-lane frame `from` has not completely written (open batches closed
  // first) and queues it here, ahead of this queue's control frames not yet started, in its
  // order. A frame `from` had partly written goes here whole: the peer never decoded it from a
  // connection that ended. For a connection that ends while its frames must still reach the
  // peer another way (a control connection's lane falling back to the main connection). The
  // bulk lane of `from` must be empty (bulk never travels where this applies). Returns the
  // frames moved.
  size_t adopt_control_frames(OutQueue& from);
  // Closes batches whose window has passed (or all, with force).
  void close_due_batches(int64_t now_ns, bool force = false);
  [[nodiscard]] int64_t next_batch_deadline() const noexcept;
  [[nodiscard]] size_t backlog_bytes() const noexcept { return backlog_; }
  // Frames (pieces: a batch, a message, a chunk) waiting for the socket; open batches not counted.
  [[nodiscard]] size_t queued_frames() const noexcept {
    return lanes_[0].size() + lanes_[1].size();
  }
  [[nodiscard]] bool empty() const noexcept;
  // Bytes wait for the socket (an open batch alone does not count: it waits for its window).
  [[nodiscard]] bool has_unsent() const noexcept {
    return !lanes_[0].empty() || !lanes_[1].empty();
  }
  [[nodiscard]] uint64_t batches_sent() const noexcept { return batches_sent_; }
  [[nodiscard]] uint64_t chunks_sent() const noexcept { return chunks_sent_; }

 private:
  struct Piece {
    std::vector<std::byte> head;  // header (+ topic), or a whole small frame
    std::shared_ptr<const void> owner;
    std::span<const std::byte> body;
    size_t sent = 0;
    [[nodiscard]] size_t size() const noexcept { return head.size() + body.size(); }
  };
  // An open batch: its frames follow kFrameHeaderSize bytes kept for the batch header, so
  // closing it encodes the header in place and hands the buffer on without copying it.
  struct Batch {
    std::vector<std::byte> frames;
    uint32_t count = 0;
    int64_t opened_ns = 0;
  };
  // Buffers of batches that went out are kept (at most kMaxSpares, each at least kMinRecycled
  // bytes) and reused by the next batches: no allocation, page faults or heap trimming per batch.
  // One is enough for a steady stream: one batch fills while the one before it is written.
  static constexpr size_t kMaxSpares = 1;
  static constexpr size_t kMinRecycled = 16 * 1024;
  // A batch reserves room for batch_bytes and one more message, up to this much.
  static constexpr size_t kMaxBatchReserve = 1024 * 1024;
  void open_batch(int lane, int64_t now_ns);
  void close_batch(int lane);
  void recycle(std::vector<std::byte>&& buffer);
  // Applies the lone-message rule: whether a batchable message of `size` bytes is coalesced.
  bool coalesce(int lane, bool batchable, size_t size, int64_t now_ns);
  void add_piece(int lane, Piece p);

  OutOptions opt_;
  std::deque<Piece> lanes_[2];  // 0 control, 1 bulk
  Batch batch_[2];
  std::vector<std::vector<std::byte>> spares_;
  int64_t last_batchable_ns_[2] = {INT64_MIN / 2, INT64_MIN / 2};
  size_t backlog_ = 0;
  uint64_t batches_sent_ = 0, chunks_sent_ = 0;
  uint64_t bytes_written_ = 0;
  bool window_limited_ = false;
  // The socket refused a write and bytes have waited since (cleared by a flush that empties the
  // lanes); see push_and_flush().
  bool socket_full_ = false;
};

class RxBuffer {
 public:
  explicit RxBuffer(DecodeLimits limits, size_t block = 256 * 1024);
  // Reads once from a non-blocking fd, at most `max_bytes`. Returns bytes read (0: would block).
  // Errors: peer_failed on end of stream or reset, io_error otherwise.
  Result<size_t> read_from(int fd, size_t max_bytes = SIZE_MAX);
  // The last read_from() got less than it asked for: the socket had nothing more (a level-
  // triggered epoll reports it again if more arrives), so another read now would only say EAGAIN.
  [[nodiscard]] bool drained() const noexcept { return drained_; }
  // Appends bytes (for tests and fuzzers).
  void append(std::span<const std::byte> bytes);
  // The next complete frame, if any. Its views stay valid as long as owner() is held.
  Result<bool> next(FrameView* out);
  [[nodiscard]] std::shared_ptr<const void> owner() const { return block_; }
  // Bytes read and not yet decoded (a partial frame, or frames next() has not returned).
  [[nodiscard]] size_t buffered() const noexcept { return end_ - start_; }

 private:
  // Blocks of the standard size that nobody references any more, kept for reuse (at most
  // kMaxFree). Shared with the blocks' deleters, which may run on any thread (a message handed
  // to the application holds its block): the mutex orders their last reads of a block before its
  // reuse.
  class Pool {
   public:
    explicit Pool(size_t block) : block_(block) {}
    // A block of `size` bytes (contents undefined) that returns to `self` when released.
    static std::shared_ptr<std::byte> take(const std::shared_ptr<Pool>& self, size_t size);

   private:
    static constexpr size_t kMaxFree = 1;
    void give_back(std::byte* p, size_t size) noexcept;
    const size_t block_;
    std::mutex mu_;
    std::vector<std::unique_ptr<std::byte[]>> free_;  // under mu_
  };
  void make_room(size_t want);
  DecodeLimits limits_;
  size_t block_size_;
  std::shared_ptr<Pool> pool_;
  std::shared_ptr<std::byte> block_;
  size_t block_len_ = 0;  // bytes in block_
  size_t start_ = 0, end_ = 0;
  bool drained_ = false;
};

}  // namespace myelin::broker::internal
