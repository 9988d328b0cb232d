// The broker daemon's event loop. One thread owns every socket; the Broker core it drives is
// uncontended here. See server.hpp for the contract and docs/broker.md for the protocol.
#include <myelin/broker/server.hpp>

#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <new>
#include <sstream>
#include <unordered_map>

#include <myelin/core/log.hpp>

#include "auth.hpp"
#include "option_range.hpp"
#include "wire.hpp"

#if __has_include(<myelin/core/topology.hpp>)
#include <myelin/core/topology.hpp>
#define MYELIN_BROKER_HAVE_TOPOLOGY 1
#endif

namespace myelin::broker {
using internal::Fd;
using internal::OutQueue;
using internal::RxBuffer;

// Step value of a kPsPush that creates the key with the payload as initial parameters.
inline constexpr uint64_t kPsInitStep = UINT64_MAX;

namespace {

constexpr size_t kHighWater = 1 << 20;  // stop pulling from lanes past this many unsent bytes
constexpr size_t kMaxPendingPulls = 1024;
// Bytes read from one connection per pass of the loop: a flooding publisher holds the loop for
// one such read (and its decoding) while a control frame waits on another connection.
constexpr size_t kReadPerPass = 64 * 1024;
// Bulk bytes started towards one connection per pump (one chunk at the default chunk size). A
// write into a loopback socket copies into the receiver's buffer in the writer's time: unbounded,
// one flush to a client that just drained its buffers moved several hundred KiB (100-200 us)
// while control frames waited on other connections. Bounded, the loop serves the control
// connections between such writes; a connection with more to send stays watched for writing.
constexpr size_t kWritePerPass = 64 * 1024;
constexpr int64_t kControlRecentNs = 100'000'000;
// epoll tags: a session's main connection is its id; its control connection the id with this bit.
constexpr uint64_t kCtrlTag = 1ull << 61;
// ctrl_epoll_'s tag for the control side's eventfd.
constexpr uint64_t kCtrlWakeTag = 1ull << 60;
// Control-side passes wait at most this long (heartbeats, silence).
constexpr int64_t kCtrlTickNs = 100'000'000;

// The Impl whose control side this thread runs at the moment: its control thread, or its loop
// inside service_control() when it has none.
thread_local const void* tl_ctrl_side = nullptr;

// Publish-to-deliver latency buckets, seconds.
constexpr std::array<double, 16> kLatencyBounds = {1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4,
                                                   5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 1e-1, 1.0,  10.0};
// The same bounds in nanoseconds, for the per-delivery bucket search (no conversion to double).
constexpr std::array<int64_t, kLatencyBounds.size()> kLatencyBoundsNs = [] {
  std::array<int64_t, kLatencyBounds.size()> ns{};
  for (size_t i = 0; i < ns.size(); ++i)
    ns[i] = static_cast<int64_t>(kLatencyBounds[i] * 1e9 + 0.5);
  return ns;
}();
static_assert(kLatencyBoundsNs[0] == 1'000 && kLatencyBoundsNs.back() == 10'000'000'000);

bool publish_like(FrameType t) {
  return t == FrameType::kPublish || t == FrameType::kRequest || t == FrameType::kPsPush ||
         t == FrameType::kPsPull;
}

std::span<const std::byte> as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Closes client sockets at the end of a drain without losing what they still carry. Closing a
// socket with unread bytes in its receive queue (a credit grant or heartbeat that came after the
// last read) makes the kernel reset the connection and throw away the send queue: the last
// deliveries a drain handed to the kernel would never reach a slow client. So each socket gets
// its FIN after the queued data (shutdown), what the client still sends is read and dropped, and
// it is closed once the kernel's send queue is empty (the client acknowledged every byte) or the
// client closed its side, or at `deadline` (never() is taken as 10 s: a stopped client must not
// hold a drain forever).
void close_after_delivery(std::vector<internal::Fd> fds, Deadline deadline) {
  deadline = deadline.min(Deadline::after_ms(10'000));
  for (auto& fd : fds) ::shutdown(fd.get(), SHUT_WR);
  std::vector<pollfd> waits;
  std::array<char, 16384> scratch;
  while (!fds.empty()) {
    std::erase_if(fds, [&](const internal::Fd& fd) {
      for (;;) {  // drop what the client sent; 0 or an error: it has closed or is gone
        const ssize_t n = ::recv(fd.get(), scratch.data(), scratch.size(), MSG_DONTWAIT);
        if (n > 0) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        return true;
      }
      int unsent = 0;
      return ::ioctl(fd.get(), SIOCOUTQ, &unsent) != 0 || unsent == 0;
    });
    if (fds.empty() || deadline.expired()) break;
    // Readable wakes this up; an emptying send queue does not, hence the 2 ms bound per pass.
    waits.clear();
    for (auto& fd : fds) waits.push_back({.fd = fd.get(), .events = POLLIN, .revents = 0});
    (void)::poll(waits.data(), waits.size(), std::min(2, deadline.remaining_ms_for_poll()));
  }
}

}  // namespace

class Server::Impl {
 public:
  struct Conn;
  struct Link;
  Impl(Server* owner, ServerOptions o) : owner_(owner), opt_(std::move(o)) {}
  ~Impl() { stop(); }

  Status init();
  Status start();
  void stop();
  Status drain(Deadline deadline);
  std::string metrics_text() const;
  ServerCounters counters() const;
  std::string placement() const {
    std::lock_guard<std::mutex> lock(snap_mu_);
    return placement_;
  }
  uint16_t port = 0, metrics_port = 0;

  // Wakes the loop thread.
  void wake() {
    const uint64_t one = 1;
    // A failed write means the counter is already non-zero: the loop is awake anyway.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
  }
  bool on_loop_thread() const { return std::this_thread::get_id() == loop_tid_; }
  // Asks the control side to pump `c`'s control connection (control lane, frames the loop
  // queued for it, publish credits to return). Any thread; cheap when it is already asked.
  void mark_ctrl_due(Conn& c);

 private:
  struct HttpConn {
    Fd fd;
    std::string head;
    int64_t deadline_ns;
  };
  struct PendingPull {
    uint64_t conn, req;
    std::string key;
    uint64_t min_version;
  };
  // Loop -> control side: a control connection to serve, or a session that ended.
  struct CtrlCmd {
    std::shared_ptr<Conn> conn;  // kAttach
    std::unique_ptr<Link> link;  // kAttach
    uint64_t session = 0;        // kEnd
  };
  // A publish, request or parameter-server operation from a client, waiting to be processed. Its
  // topic and payload are views into `owner`, which keeps them alive while it is parked or queued
  // for sessions: the receive block it was decoded from (`shared_block`: the block holds other
  // frames too, see PublishArgs::owner_shared), or the buffer it was reassembled into. No copy is
  // made on the way in.
  struct Work {
    FrameHeader header;
    std::string_view topic;
    std::span<const std::byte> payload;
    std::shared_ptr<const void> owner;
    bool shared_block = false;
    int64_t rx_ns = 0;  // when its bytes were read (monotonic_ns(); 0: not known)
  };
  // A frame decoded from a receive block, kept alive by `owner` (that block).
  static Work work_from(const FrameView& f, const std::shared_ptr<const void>& owner) {
    return Work{f.header, f.topic, f.payload, owner, /*shared_block=*/true};
  }
  // A reassembled message: its own topic and payload go along with it.
  static Work work_from(AssembledMessage&& m) {
    auto held = std::make_shared<AssembledMessage>(std::move(m));
    Work w{held->header, held->topic,
           std::span<const std::byte>(held->payload->data(), held->payload->size()), nullptr,
           /*shared_block=*/false};
    w.owner = std::move(held);
    return w;
  }
  // Control side -> loop: a control connection let go (with what it still held), a session to
  // close, or parameter-server work that arrived on a control connection.
  struct LoopCmd {
    enum class Kind : uint8_t { kDetached, kClose, kWork } kind;
    uint64_t session = 0;
    std::unique_ptr<Link> link;  // kDetached
    std::string why;             // kDetached, kClose
    Work work;                   // kWork
  };

  void loop();
  void place_thread(bool record);
  void accept_clients();
  void accept_http();
  void serve_http(int fd);
  void read_conn(Conn& c);
  // With the control thread: nothing (it serves the control connections). Without: one pass of
  // the control side, without waiting; the loop runs it before any bulk work of a pass and
  // again after every bulk read or write.
  void service_control();
  // Handles what the control side sent the loop.
  void run_loop_cmds();
  void post_loop(LoopCmd cmd);
  // Kind kAttach or kEnd (session set, no link).
  void post_ctrl(CtrlCmd cmd);
  // kAttach on a fresh connection: binds it to its session as the control connection.
  Status attach(Conn& c, const FrameView& f);
  Status handle_frame(Conn& c, const FrameView& f, const std::shared_ptr<const void>& owner);
  Status handle_active(Conn& c, const FrameView& f, const std::shared_ptr<const void>& owner);
  // A publish, request or parameter-server operation: takes its publish credit, then processes
  // it or parks it behind earlier ones.
  Status accept_work(Conn& c, Work m);
  // Routes a publish or request, or (loop only: `via` null) serves a parameter-server operation.
  // Errors go to the client on `via` (the control side) or through send_direct() (the loop).
  // Returns false when the frame must wait (blocked or rate limited).
  bool process_work(Conn& c, const Work& m, Link* via);
  void retry_parked(Conn& c);
  void pump(Conn& c);
  void queue_message(Conn& c, OutQueue& out, const MessagePtr& m, int64_t now);
  // Loop: queues a frame. Control-lane frames go to the control side when the session has a
  // control connection (unless `main_connection`), everything else on the main connection.
  void send_direct(Conn& c, FrameHeader h, std::string_view topic, std::span<const std::byte> p,
                   std::shared_ptr<const void> owner = nullptr, bool main_connection = false);
  // Either side: an error frame to the client, on `via` when the control side sends it; from
  // the loop on the main connection with `main_connection` (see send_direct()).
  void send_error(Conn& c, uint64_t id, const Status& s, Link* via = nullptr,
                  bool main_connection = false);
  // Confirms a (un)subscribe: an empty reply, or the error.
  void send_ack(Conn& c, uint64_t id, const Status& s, Link* via = nullptr,
                bool main_connection = false);
  void close_conn(uint64_t id, const char* why);
  void update_interest(Conn& c);
  // pump() on every connection, twice (deliveries freed by the first pass move in the second),
  // serving the control connections after every pump that wrote bulk bytes.
  void pump_all();
  void check_pulls();
  void tick(int64_t now);
  const AclEntry* acl_for(std::string_view identity) const;
  bool may_publish(const Conn& c, std::string_view topic) const;
  bool may_subscribe(const Conn& c, std::string_view pattern) const;
  void observe_latency(int64_t ns);
  // Publish credits go back in groups of half the window (see pump()).
  [[nodiscard]] uint64_t credit_group() const noexcept {
    return std::max<uint64_t>(1, opt_.publish_credits / 2);
  }

  // The control side: the control thread's body, or the loop's in-line passes without it. It
  // alone touches links_ and every Link.
  void control_loop();
  // epoll_wait for up to wait_ns, after a spin (spin_before_block_us) when the last pass with
  // events ended (last_event_ns, stamped by the caller) less than the spin period ago.
  int spin_then_wait(int epfd, epoll_event* evs, int max_events, int64_t now, int64_t wait_ns,
                     int64_t last_event_ns) const;
  // One pass: the commands from the loop, the `n` events of ctrl_epoll_, parked publishes, the
  // sessions asked for, heartbeats. Publishes busy_ctrl_.
  void ctrl_pass(const epoll_event* evs, int n);
  void ctrl_adopt(std::shared_ptr<Conn> conn, std::unique_ptr<Link> link);
  void read_ctrl(Link& l);
  // Decodes and handles what the control connection's buffer holds. False: the link is gone.
  bool decode_ctrl(Link& l);
  Status handle_ctrl(Link& l, const FrameView& f, const std::shared_ptr<const void>& owner);
  // A responder's kReply or kError, from either connection: routed to the requester.
  Status route_answer(const FrameView& f);
  // Moves the control lane and the loop's frames into the control connection and writes it.
  // False: the link is gone (detached).
  bool pump_control(Link& l);
  void update_ctrl_interest(Link& l);
  void ctrl_send(Link& l, FrameHeader h, std::string_view topic, std::span<const std::byte> p);
  // The control connection ended (closed or failed): the link goes back to the loop, where what
  // it still holds goes on the main connection, which alone decides the session's end. A
  // closing client's last bulk bytes on the main connection are still read and routed even when
  // the control connection's end of stream is seen first (two streams, no order between them).
  void detach_ctrl(Link& l, const Status& why);
  // Drops the link and asks the loop to close its session.
  void fail_ctrl(Link& l, std::string why);
  void ctrl_tick(int64_t now);
  // Writes what every control connection holds, once, at shutdown.
  void ctrl_final_flush();
  // Links with something left to send or route (control side only).
  [[nodiscard]] size_t ctrl_busy_count() const;
  // Loop, while draining and its own queues are empty: whether the control side is too.
  [[nodiscard]] bool ctrl_drained();
  [[nodiscard]] bool on_ctrl_side() const noexcept;

  Server* owner_;
  ServerOptions opt_;
  DecodeLimits limits_;
  Fd epoll_, listen_, http_listen_, wake_fd_;
  // The control connections' own epoll set, with ctrl_wake_. The control thread sleeps on it;
  // without that thread the loop's epoll_ watches it (readable when any of them is ready) and
  // the loop polls it without waiting.
  Fd ctrl_epoll_, ctrl_wake_;
  // pump_all()'s list of connections, storage kept between passes (loop thread only).
  std::vector<std::shared_ptr<Conn>> pump_list_;
  std::thread thread_, ctrl_thread_;
  std::thread::id loop_tid_;
  std::atomic<bool> stop_{false};       // pairs with the loop's acquire load each pass
  std::atomic<bool> ctrl_stop_{false};  // stop() -> control thread, same
  std::atomic<bool> draining_{false};   // same
  std::atomic<bool> drained_{false};    // loop -> drain(): set when every queue is empty
  // drain() -> both threads' last closes (close_after_delivery); stored before draining_.
  std::atomic<int64_t> drain_deadline_ns_{Deadline::never().at_ns()};
  // Control side only: control sockets of sessions a drain ended, closed last with the others.
  std::vector<Fd> ctrl_lingering_;
  // drain() sleeps on drain_cv_ until drained_ is set; the loop notifies under drain_mu_ so the
  // wake-up cannot slip between drain()'s predicate check and its wait.
  std::mutex drain_mu_;
  std::condition_variable drain_cv_;
  // Loop thread only.
  std::unordered_map<uint64_t, std::shared_ptr<Conn>> conns_;
  std::unordered_map<int, HttpConn> http_;
  std::deque<PendingPull> pulls_;
  uint64_t next_id_ = 1;
  int64_t last_tick_ns_ = 0;
  int64_t last_event_ns_ = INT64_MIN / 2;  // spin_before_block_us: end of the last busy pass

  // Hand-offs between the two sides; each mutex is held only to add or take entries (no system
  // call, no other lock under it). ctrl_cmds_: loop -> control side (wakes ctrl_wake_).
  // loop_cmds_: control side -> loop (wakes wake_fd_). due_: any thread -> control side, the
  // sessions whose Conn::ctrl_due went from false to true.
  std::mutex ctrl_cmd_mu_;
  std::vector<CtrlCmd> ctrl_cmds_;
  std::mutex loop_cmd_mu_;
  std::vector<LoopCmd> loop_cmds_;
  std::mutex due_mu_;
  std::vector<uint64_t> due_;

  // Control side only.
  std::unordered_map<uint64_t, std::unique_ptr<Link>> links_;  // by session id
  std::vector<uint64_t> ctrl_ids_;                             // scratch: ids to visit
  size_t ctrl_parked_links_ = 0;  // links with parked publishes (the wait is 1 ms then)
  int64_t ctrl_last_tick_ns_ = 0;
  int64_t ctrl_last_event_ns_ = INT64_MIN / 2;  // spin_before_block_us: end of the last busy pass
  // Control side -> loop, while draining: links whose connection, parked publishes or session's
  // control lane still held something at the end of control pass number ctrl_passes_ (both
  // stored at the end of the pass; ctrl_passes_ with release, read with acquire first).
  std::atomic<size_t> busy_ctrl_{0};
  std::atomic<uint64_t> ctrl_passes_{0};
  uint64_t drain_mark_ = 0;  // loop only: see ctrl_drained()

  // Counters (written by either side, read by metrics_text() from any thread): relaxed atomics,
  // no ordering needed between them.
  struct Atomics {
    std::atomic<uint64_t> accepted{0}, active{0}, auth_failures{0}, acl_denied{0},
        protocol_errors{0}, dead_clients{0}, rate_limited{0}, credit_stalls{0}, frames_in{0},
        frames_out{0}, bytes_in{0}, batches{0}, chunks{0}, ps_pushes{0}, ps_pulls{0},
        attach_refused{0}, version_refused{0}, ctrl_active{0};
    std::array<std::atomic<uint64_t>, kLatencyBounds.size() + 1> buckets{};
    std::atomic<uint64_t> lat_count{0}, lat_sum_ns{0};
  } c_;
  struct ClientSnap {
    uint64_t id;
    std::string identity;
    size_t depth;
    int64_t credits;
    size_t backlog;
  };
  mutable std::mutex snap_mu_;
  std::vector<ClientSnap> snap_;
  std::string placement_ = "not pinned";
};

// A control-lane frame the loop queued for a session's control connection (an error, an ack, a
// parameter-server reply, goaway), carried to the control side in Conn::outbox.
struct OutboxFrame {
  FrameHeader h;
  std::string topic;
  std::shared_ptr<const void> owner;
  std::span<const std::byte> payload;
};

// One client session (its main connection) and the routing core's view of it.
//
// Ownership: the loop thread owns the main connection and every field not listed below.
// `active`, `ident`, `acl`, `version` and `token` are set by the loop during the handshake and
// never change after it; the control side reads them only after the session's control
// connection was handed to it (through ctrl_cmd_mu_, which orders the two). Shared between the
// two sides: the atomics (each says what pairs with it) and what rate_mu / outbox_mu guard.
struct Server::Impl::Conn final : public Session {
  Conn(Impl* owner_impl, uint64_t id, Fd f, const ServerOptions& o, DecodeLimits lim)
      : Session(id, "", o.broker.lane_capacity),
        impl(owner_impl),
        fd(std::move(f)),
        rx(lim),
        out(internal::OutOptions{.chunk_size = o.chunk_bytes,
                                 .batch_bytes = o.batch_bytes,
                                 .batch_count = o.batch_count,
                                 .batch_window_ns = o.batch_window_us * 1000}),
        reasm(lim) {}
  void on_ready(Lane lane) override {
    // The control lane of a session with a control connection is the control side's to drain.
    // Pairs with the release stores in attach() and run_loop_cmds(); a stale answer is harmless:
    // the side that takes over the lane pumps it then (ctrl_adopt(), run_loop_cmds()).
    if (lane == Lane::kControl && ctrl_attached.load(std::memory_order_acquire)) {
      impl->mark_ctrl_due(*this);
      return;
    }
    // Pairs with the exchange(acquire) in pump().
    ready.store(true, std::memory_order_release);
    if (!impl->on_loop_thread()) impl->wake();
  }
  // Takes one delivery credit; false when there is none. Both sides take credits (bulk on the
  // loop, control on the control side) and the client grants one pool: a compare-and-swap, so
  // they never overdraw it together. Relaxed: the count orders nothing else.
  [[nodiscard]] bool take_credit() noexcept {
    int64_t v = deliver_credits.load(std::memory_order_relaxed);
    while (v > 0 && !deliver_credits.compare_exchange_weak(v, v - 1, std::memory_order_relaxed)) {
    }
    return v > 0;
  }
  void return_credit() noexcept { deliver_credits.fetch_add(1, std::memory_order_relaxed); }

  Impl* impl;
  Fd fd;
  RxBuffer rx;
  OutQueue out;
  Reassembler reasm;
  bool active = false, closing = false, want_out = false;
  // The last flush stopped at kWritePerPass with bulk left that the socket may take: keep
  // watching it for writing (unlike bulk held back by the in-flight window, which waits for the
  // client's report).
  bool pass_limited = false;
  std::string ident;
  const AclEntry* acl = nullptr;
  internal::Nonce nonce{};
  int64_t handshake_deadline_ns = 0, last_rx_ns = 0, last_tx_ns = 0;
  // Bytes written since auth_ok (out.bytes_written() - ack_base) minus those the client reported
  // read (bytes_acked): what sits in the kernel buffers between us, ahead of any new frame.
  uint64_t ack_base = 0, bytes_acked = 0;
  // When a control-lane message last left for this client: the in-flight bound applies only
  // while control traffic flows (within kControlRecentNs), so pure bulk keeps the full pipeline.
  int64_t last_control_ns = INT64_MIN / 2;
  // Publish-like frames on the main connection waiting for room or a rate-limit token, in order.
  std::deque<Work> parked;
  // Publishes the loop accepted whose credit goes back in its next credit frame, on the main
  // connection. (Those the control side accepts go back on the control connection, Link::
  // credits_to_return: each side returns its own, and neither wakes the other for it.)
  uint64_t credits_to_return = 0;
  // The topic the loop last routed a publish of this session's main connection on (the control
  // side keeps its own, Link::route).
  RouteCache route;
  size_t pulls = 0;
  // Protocol version agreed in the handshake; with 2, the token a control connection must prove
  // it knows (auth.hpp).
  uint32_t version = 1;
  internal::Token token{};
  // This connection was a control connection's handshake and now belongs to another session.
  bool moved = false;
  // The main connection ended (its socket closed and gone) while the control connection lived:
  // nothing more is sent here, and the session ends with the control connection.
  bool main_ended = false;

  // Shared (see the ownership note above).
  // Delivery credits the client granted and the broker has not used (take_credit()). Errors and
  // replies take one unconditionally, as the client credits them back too.
  std::atomic<int64_t> deliver_credits{0};
  // Publish-like frames received on either connection, not yet accepted: at most
  // publish_credits. Relaxed: a count, ordering nothing.
  std::atomic<uint64_t> publish_outstanding{0};
  // The loop should pump this connection; release by whoever asks, the exchange(acquire) in
  // pump() takes it.
  std::atomic<bool> ready{false};
  // The session has a control connection (written by the loop only: attach(), the detach and
  // close paths; read by on_ready() on any thread). Its Link, while it has one, is the control
  // side's, in links_.
  std::atomic<bool> ctrl_attached{false};
  // Asked to the control side (mark_ctrl_due()); cleared by the control side before it pumps.
  std::atomic<bool> ctrl_due{false};
  // When the control connection last heard from the client (written by the control side, read by
  // the loop's tick()): the session is alive while either connection hears from it. A client
  // whose I/O thread runs a long pass of handlers sends its credits on the control connection
  // and its main connection's heartbeat only after the pass. Relaxed: a timestamp, ordering
  // nothing.
  std::atomic<int64_t> ctrl_rx_ns{INT64_MIN / 2};
  // Rate-limit bucket, both sides take tokens.
  std::mutex rate_mu;
  double tokens = 0;      // under rate_mu
  int64_t tokens_ns = 0;  // under rate_mu
  // Control frames the loop made for the control connection, in order (loop -> control side).
  std::mutex outbox_mu;
  std::vector<OutboxFrame> outbox;  // under outbox_mu
};

// A session's control connection: read, decoded, routed and written by the control side only
// (the control thread, or the loop's in-line passes without it). Every control-lane frame to and
// from the client goes over it, so none waits behind bulk bytes in a socket buffer or behind a
// bulk read on the main connection. Silence past the heartbeat deadline or a protocol error on
// it closes the session; its end of stream (or a socket error) detaches it, and control frames
// fall back to the main connection, which alone ends the session (see detach_ctrl()). A client
// fails itself when either of its connections breaks, so this matters for the order in which a
// closing client's two streams are seen.
struct Server::Impl::Link {
  Link(std::shared_ptr<Conn> c, Fd f, RxBuffer r, OutQueue o)
      : conn(std::move(c)), fd(std::move(f)), rx(std::move(r)), out(std::move(o)) {}
  std::shared_ptr<Conn> conn;
  Fd fd;
  RxBuffer rx;
  OutQueue out;
  int64_t last_rx_ns = 0, last_tx_ns = 0;
  bool want_out = false;
  // Publishes and requests from this connection waiting for room or a rate-limit token, in order
  // (a topic is in one lane, so this keeps the order per topic and publisher).
  std::deque<Work> parked;
  // Publishes accepted here whose credit goes back in the next credit frame on this connection.
  uint64_t credits_to_return = 0;
  RouteCache route;  // the topic this connection published on last (Broker::publish)
};

const AclEntry* Server::Impl::acl_for(std::string_view identity) const {
  const AclEntry* star = nullptr;
  for (const AclEntry& e : opt_.acl) {
    if (e.identity == identity) return &e;
    if (e.identity == "*") star = &e;
  }
  return star;
}

bool Server::Impl::may_publish(const Conn& c, std::string_view topic) const {
  if (!topic.empty() && topic[0] == '$') return false;  // broker-owned topics
  if (opt_.acl.empty()) return true;
  if (!c.acl) return false;
  for (const std::string& p : c.acl->publish) {
    if (topic_matches(p, topic)) return true;
  }
  return false;
}

bool Server::Impl::may_subscribe(const Conn& c, std::string_view pattern) const {
  if (opt_.acl.empty()) return true;
  if (!c.acl) return false;
  for (const std::string& p : c.acl->subscribe) {
    if (pattern_covers(p, pattern)) return true;
  }
  return false;
}

Status Server::Impl::init() {
  if (opt_.secret.size() < 16) return invalid_argument("the job secret must be at least 16 bytes");
  for (size_t i = 0; i < opt_.acl.size(); ++i) {
    const AclEntry& e = opt_.acl[i];
    if (e.identity != "*" && !valid_identity(e.identity)) {
      return invalid_argument("bad ACL identity '", message_excerpt(e.identity), "'");
    }
    for (size_t j = 0; j < i; ++j) {
      if (opt_.acl[j].identity == e.identity) {
        return invalid_argument("ACL identity '", message_excerpt(e.identity), "' given twice");
      }
    }
    if (!std::isfinite(e.rate_limit_msgs_per_s) || e.rate_limit_msgs_per_s < 0 ||
        !std::isfinite(e.rate_limit_burst) || e.rate_limit_burst < 0) {
      return invalid_argument("ACL of ", message_excerpt(e.identity),
                              ": rate_limit_msgs and rate_limit_burst must be finite and >= 0");
    }
    for (const auto* list : {&e.publish, &e.subscribe}) {
      for (const std::string& p : *list) {
        // A named Status: the macro binds a reference, and with_context() && returns one into
        // its temporary.
        Status s = validate_pattern(p);
        if (!s.ok()) return std::move(s).with_context("ACL of " + e.identity);
      }
    }
  }
  if (opt_.listen.empty()) return invalid_argument("listen must not be empty (host:port)");
  using internal::check_range;
  MYELIN_RETURN_IF_ERROR(
      check_range("lane_capacity", opt_.broker.lane_capacity, kMinLaneCapacity, kMaxLaneCapacity));
  MYELIN_RETURN_IF_ERROR(check_range("max_delivery_attempts",
                                     opt_.broker.default_policy.max_delivery_attempts, 1,
                                     kMaxDeliveryAttemptsLimit));
  for (size_t i = 0; i < opt_.broker.policies.size(); ++i) {
    const TopicPolicy& p = opt_.broker.policies[i];
    Status s =
        check_range("max_delivery_attempts", p.max_delivery_attempts, 1, kMaxDeliveryAttemptsLimit);
    if (!s.ok())
      return std::move(s).with_context("topic policy '" + message_excerpt(p.pattern) + "'");
    for (size_t j = 0; j < i; ++j) {
      // The first matching policy wins: a second one for the same pattern would never apply.
      if (opt_.broker.policies[j].pattern == p.pattern) {
        return invalid_argument("topic policy pattern '", message_excerpt(p.pattern),
                                "' given twice");
      }
    }
  }
  MYELIN_RETURN_IF_ERROR(
      check_range("chunk_bytes", opt_.chunk_bytes, kMinChunkBytes, kMaxChunkBytes));
  MYELIN_RETURN_IF_ERROR(check_range("batch_bytes", opt_.batch_bytes, 0, kMaxBatchBytes));
  MYELIN_RETURN_IF_ERROR(check_range("batch_count", opt_.batch_count, 0, kMaxBatchCount));
  MYELIN_RETURN_IF_ERROR(
      check_range("batch_window_us", opt_.batch_window_us, 0, kMaxBatchWindowUs));
  MYELIN_RETURN_IF_ERROR(
      check_range("publish_credits", opt_.publish_credits, 1, kMaxPublishCredits));
  MYELIN_RETURN_IF_ERROR(
      check_range("socket_buffer_bytes", opt_.socket_buffer_bytes, 0, kMaxSocketBufferBytes));
  MYELIN_RETURN_IF_ERROR(check_range("bulk_socket_buffer_bytes", opt_.bulk_socket_buffer_bytes, 0,
                                     kMaxSocketBufferBytes));
  MYELIN_RETURN_IF_ERROR(
      check_range("bulk_inflight_bytes", opt_.bulk_inflight_bytes, 0, kMaxBulkInflightBytes));
  // Bounded so that every deadline computed from them (3 intervals in nanoseconds) fits int64_t.
  static_assert(kMaxHeartbeatMs * 3 * 1'000'000 < INT64_MAX / 2);
  static_assert(kMaxHandshakeTimeoutMs * 1'000'000 < INT64_MAX / 2);
  MYELIN_RETURN_IF_ERROR(
      check_range("heartbeat_ms", opt_.heartbeat_ms, kMinHeartbeatMs, kMaxHeartbeatMs));
  MYELIN_RETURN_IF_ERROR(
      check_range("handshake_timeout_ms", opt_.handshake_timeout_ms, 1, kMaxHandshakeTimeoutMs));
  MYELIN_RETURN_IF_ERROR(check_range("numa_node", opt_.numa_node, -1, kMaxNumaNode));
  if (opt_.numa_node >= 0 && !opt_.nic.empty()) {
    return invalid_argument("numa_node and nic are exclusive (nic '", message_excerpt(opt_.nic),
                            "' pins on its own node)");
  }
  if (opt_.enable_ps) {
    MYELIN_RETURN_IF_ERROR(check_range("ps workers", opt_.ps.num_workers, 1, kMaxPsWorkers));
  }
  if (opt_.loop_nice < 0 || opt_.loop_nice > 19) {
    return invalid_argument("loop_nice ", opt_.loop_nice, " outside 0 .. 19");
  }
  MYELIN_RETURN_IF_ERROR(validate_bulk_scheduling(opt_.loop_scheduling, "loop_scheduling"));
  MYELIN_RETURN_IF_ERROR(
      validate_control_scheduling(opt_.control_scheduling, "control_scheduling"));
  if (!opt_.control_cpus.empty() && !opt_.control_thread) {
    return invalid_argument("control_cpus needs the control thread (control_thread on)");
  }
  MYELIN_RETURN_IF_ERROR(
      validate_control_cpus(opt_.control_cpus, opt_.control_cpus_hold_ms, "control_cpus"));
  if (opt_.spin_before_block_us < 0 || opt_.spin_before_block_us > 100'000) {
    return invalid_argument("spin_before_block_us ", opt_.spin_before_block_us,
                            " outside 0 .. 100000");
  }
  limits_.max_frame_payload =
      std::max<uint32_t>(opt_.chunk_bytes, static_cast<uint32_t>(opt_.batch_bytes) + 64 * 1024);
  limits_.max_frame_payload = std::max<uint32_t>(limits_.max_frame_payload, 1u << 20);
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return errno_status("epoll_create1", errno);
  wake_fd_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_.valid()) return errno_status("eventfd", errno);
  MYELIN_ASSIGN_OR_RETURN(auto hp, internal::parse_host_port(opt_.listen));
  MYELIN_ASSIGN_OR_RETURN(listen_, internal::listen_tcp(hp));
  // On the listener too: accepted sockets inherit its receive buffer, and with it the window
  // scale announced in the handshake.
  internal::set_socket_buffers(listen_.get(), opt_.socket_buffer_bytes);
  MYELIN_ASSIGN_OR_RETURN(port, internal::local_port(listen_.get()));
  if (!opt_.metrics_listen.empty()) {
    MYELIN_ASSIGN_OR_RETURN(auto mh, internal::parse_host_port(opt_.metrics_listen));
    MYELIN_ASSIGN_OR_RETURN(http_listen_, internal::listen_tcp(mh));
    MYELIN_ASSIGN_OR_RETURN(metrics_port, internal::local_port(http_listen_.get()));
  }
  auto add = [&](int fd) -> Status {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = static_cast<uint64_t>(fd) | (1ull << 63);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      return errno_status("epoll_ctl", errno);
    return ok_status();
  };
  ctrl_epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!ctrl_epoll_.valid()) return errno_status("epoll_create1", errno);
  ctrl_wake_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!ctrl_wake_.valid()) return errno_status("eventfd", errno);
  {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kCtrlWakeTag;
    if (::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_ADD, ctrl_wake_.get(), &ev) != 0)
      return errno_status("epoll_ctl", errno);
  }
  MYELIN_RETURN_IF_ERROR(add(listen_.get()));
  MYELIN_RETURN_IF_ERROR(add(wake_fd_.get()));
  if (!opt_.control_thread) MYELIN_RETURN_IF_ERROR(add(ctrl_epoll_.get()));
  if (http_listen_.valid()) MYELIN_RETURN_IF_ERROR(add(http_listen_.get()));
  return ok_status();
}

Status Server::Impl::start() {
  // The threads started here inherit the caller's CPUs: not the narrowed set of a bulk thread.
  restore_this_thread_cpus(/*even_library_bulk_thread=*/true);
  MYELIN_RETURN_IF_ERROR(reserve_control_cpus(opt_.control_cpus, opt_.control_cpus_hold_ms));
  if (thread_.joinable()) return failed_precondition("server already started");
  if (opt_.control_thread) ctrl_thread_ = std::thread([this] { control_loop(); });
  thread_ = std::thread([this] { loop(); });
  return ok_status();
}

void Server::Impl::stop() {
  // Pairs with the acquire load in loop().
  stop_.store(true, std::memory_order_release);
  if (thread_.joinable()) {
    wake();
    thread_.join();
  }
  // After the loop: its last frames (goaway, errors) reach the control side first, which then
  // writes what every control connection holds once before it ends. Pairs with the acquire load
  // in control_loop().
  ctrl_stop_.store(true, std::memory_order_release);
  if (ctrl_thread_.joinable()) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(ctrl_wake_.get(), &one, sizeof(one));
    ctrl_thread_.join();
  }
}

Status Server::Impl::drain(Deadline deadline) {
  // Relaxed: the release store of draining_ below publishes it to both threads.
  drain_deadline_ns_.store(deadline.at_ns(), std::memory_order_relaxed);
  // Pairs with the acquire load in loop().
  draining_.store(true, std::memory_order_release);
  wake();
  if (thread_.joinable()) {
    // Pairs with the release store in loop() (made under drain_mu_).
    auto is_drained = [this] { return drained_.load(std::memory_order_acquire); };
    std::unique_lock<std::mutex> lock(drain_mu_);
    if (deadline.is_never())
      drain_cv_.wait(lock, is_drained);
    else
      drain_cv_.wait_for(lock, std::chrono::nanoseconds(deadline.remaining_ns()), is_drained);
  }
  const bool done = drained_.load(std::memory_order_acquire);  // pairs with the loop's release
  stop();
  if (!done) return timeout_error("drain deadline passed with messages still queued");
  return ok_status();
}

void Server::Impl::place_thread(bool record) {
  std::string where = "not pinned";
#ifdef MYELIN_BROKER_HAVE_TOPOLOGY
  int node = opt_.numa_node;
  if (!opt_.nic.empty() || node >= 0) {
    auto topo = Topology::discover();
    if (!topo.ok()) {
      where = "not pinned: " + topo.status().to_string();
    } else {
      if (!opt_.nic.empty()) {
        auto n = topo->numa_node_of_device(opt_.nic);
        if (n.ok())
          node = *n;
        else
          where = "not pinned: " + n.status().to_string();
      }
      if (node >= 0) {
        Status s = topo->pin_current_thread_to_numa_node(node);
        where = s.ok() ? "numa node " + std::to_string(node) : "not pinned: " + s.to_string();
      }
    }
  }
#else
  if (!opt_.nic.empty() || opt_.numa_node >= 0) where = "not pinned: built without core topology";
#endif
  if (!record) return;  // the control thread goes where the loop goes; the loop says where
  // A node or NIC asked for and not found is a warning, not an error: one configuration may
  // serve hosts that differ, and the broker works unpinned.
  if (where.starts_with("not pinned: ")) {
    MYELIN_LOG_WARN << "broker I/O thread placement: " << where;
  } else if (where != "not pinned") {
    MYELIN_LOG_INFO << "broker I/O thread placement: " << where;
  }
  std::lock_guard<std::mutex> lock(snap_mu_);
  placement_ = where;
}

void Server::Impl::observe_latency(int64_t ns) {
  size_t b = 0;
  while (b < kLatencyBoundsNs.size() && ns > kLatencyBoundsNs[b]) ++b;
  c_.buckets[b].fetch_add(1, std::memory_order_relaxed);
  c_.lat_count.fetch_add(1, std::memory_order_relaxed);
  c_.lat_sum_ns.fetch_add(static_cast<uint64_t>(std::max<int64_t>(ns, 0)),
                          std::memory_order_relaxed);
}

void Server::Impl::update_interest(Conn& c) {
  // Bulk held back by the in-flight window waits for the client's report, not for the socket.
  const bool want = c.out.has_unsent() && (!c.out.window_limited() || c.pass_limited);
  if (want == c.want_out) return;
  epoll_event ev{};
  ev.events = want ? static_cast<uint32_t>(EPOLLIN | EPOLLOUT) : static_cast<uint32_t>(EPOLLIN);
  ev.data.u64 = c.id();
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd.get(), &ev) == 0) c.want_out = want;
}

void Server::Impl::send_direct(Conn& c, FrameHeader h, std::string_view topic,
                               std::span<const std::byte> p, std::shared_ptr<const void> owner,
                               bool main_connection) {
  // The client credits every error and reply back, like deliveries.
  if (h.type == FrameType::kError || h.type == FrameType::kReply)
    c.deliver_credits.fetch_sub(1, std::memory_order_relaxed);
  c_.frames_out.fetch_add(1, std::memory_order_relaxed);
  if (c.ctrl_attached.load(std::memory_order_relaxed) && !main_connection &&
      (h.flags & kFlagControl)) {
    // The control connection is the control side's: hand the frame over, in order.
    if (!owner && !p.empty()) {
      auto copy = std::make_shared<std::vector<std::byte>>(p.begin(), p.end());
      p = std::span<const std::byte>(copy->data(), copy->size());
      owner = std::move(copy);
    }
    {
      std::lock_guard<std::mutex> lock(c.outbox_mu);
      c.outbox.push_back(OutboxFrame{h, std::string(topic), std::move(owner), p});
    }
    mark_ctrl_due(c);
    return;
  }
  Status s = c.out.push(h, topic, p, std::move(owner), false, monotonic_ns());
  if (!s.ok()) MYELIN_LOG_WARN << "dropping a frame to client " << c.id() << ": " << s;
}

void Server::Impl::ctrl_send(Link& l, FrameHeader h, std::string_view topic,
                             std::span<const std::byte> p) {
  if (h.type == FrameType::kError || h.type == FrameType::kReply)
    l.conn->deliver_credits.fetch_sub(1, std::memory_order_relaxed);
  c_.frames_out.fetch_add(1, std::memory_order_relaxed);
  Status s = l.out.push(h, topic, p, nullptr, false, monotonic_ns());
  if (!s.ok()) MYELIN_LOG_WARN << "dropping a frame to client " << l.conn->id() << ": " << s;
}

void Server::Impl::send_error(Conn& c, uint64_t id, const Status& s, Link* via,
                              bool main_connection) {
  FrameHeader h;
  h.type = FrameType::kError;
  h.flags = kFlagControl;
  h.seq = static_cast<uint64_t>(s.code());
  h.id = id;
  std::string text(s.message().substr(0, 4000));
  if (via)
    ctrl_send(*via, h, {}, as_bytes(text));
  else
    send_direct(c, h, {}, as_bytes(text), nullptr, main_connection);
}

void Server::Impl::send_ack(Conn& c, uint64_t id, const Status& s, Link* via,
                            bool main_connection) {
  if (!s.ok()) {
    send_error(c, id, s, via, main_connection);
    return;
  }
  FrameHeader h;
  h.type = FrameType::kReply;
  h.flags = kFlagControl;
  h.id = id;
  if (via)
    ctrl_send(*via, h, {}, {});
  else
    send_direct(c, h, {}, {}, nullptr, main_connection);
}

void Server::Impl::close_conn(uint64_t id, const char* why) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = *it->second;
  MYELIN_LOG_INFO << "closing client " << id << " (" << c.ident << "): " << why;
  owner_->broker_->remove_session(id);
  std::erase_if(pulls_, [&](const PendingPull& p) { return p.conn == id; });
  if (c.fd.valid()) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
  if (c.ctrl_attached.load(std::memory_order_relaxed)) {
    // Pairs with the acquire load in on_ready().
    c.ctrl_attached.store(false, std::memory_order_release);
    post_ctrl(CtrlCmd{.session = id});
  }
  if (c.active) c_.active.fetch_sub(1, std::memory_order_relaxed);
  conns_.erase(it);
}

void Server::Impl::mark_ctrl_due(Conn& c) {
  // Pairs with the store(false) in ctrl_pass(), made before it pumps: a request that comes
  // after it is seen again.
  if (c.ctrl_due.exchange(true, std::memory_order_acq_rel)) return;
  {
    std::lock_guard<std::mutex> lock(due_mu_);
    due_.push_back(c.id());
  }
  // The control side looks at due_ again before it sleeps.
  if (on_ctrl_side()) return;
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(ctrl_wake_.get(), &one, sizeof(one));
}

bool Server::Impl::on_ctrl_side() const noexcept {
  return tl_ctrl_side == this;
}

void Server::Impl::post_ctrl(CtrlCmd cmd) {
  {
    std::lock_guard<std::mutex> lock(ctrl_cmd_mu_);
    ctrl_cmds_.push_back(std::move(cmd));
  }
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(ctrl_wake_.get(), &one, sizeof(one));
}

void Server::Impl::post_loop(LoopCmd cmd) {
  {
    std::lock_guard<std::mutex> lock(loop_cmd_mu_);
    loop_cmds_.push_back(std::move(cmd));
  }
  if (!on_loop_thread()) wake();
}

void Server::Impl::accept_clients() {
  while (true) {
    Fd fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd.valid()) return;
    if (draining_.load(std::memory_order_acquire)) continue;  // pairs with drain(); closes it
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    internal::set_socket_buffers(fd.get(), opt_.socket_buffer_bytes);
    const uint64_t id = next_id_++;
    std::shared_ptr<Conn> c;
    try {
      c = std::make_shared<Conn>(this, id, std::move(fd), opt_, limits_);
    } catch (const std::bad_alloc&) {
      // The session's lanes and buffers did not fit in memory: refuse this client (its socket
      // closes here), keep serving the others.
      MYELIN_LOG_WARN << "refusing client connection " << id
                      << ": out of memory for its session (lane_capacity "
                      << opt_.broker.lane_capacity << ")";
      continue;
    }
    auto nonce = internal::random_nonce();
    if (!nonce.ok()) {
      MYELIN_LOG_ERROR << nonce.status();
      continue;
    }
    c->nonce = *nonce;
    const int64_t now = monotonic_ns();
    c->handshake_deadline_ns = now + opt_.handshake_timeout_ms * 1'000'000;
    c->last_rx_ns = c->last_tx_ns = now;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = id;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, c->fd.get(), &ev) != 0) continue;
    FrameHeader h;
    h.type = FrameType::kHello;
    h.flags = kFlagControl;
    h.seq = encode_versions(VersionRange{});
    send_direct(*c, h, {}, std::span<const std::byte>(c->nonce.data(), c->nonce.size()));
    c_.accepted.fetch_add(1, std::memory_order_relaxed);
    conns_[id] = std::move(c);
  }
}

void Server::Impl::accept_http() {
  while (true) {
    Fd fd(::accept4(http_listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd.valid()) return;
    if (http_.size() >= 64) continue;  // bounded: scrapers are few
    const int raw = fd.get();
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = static_cast<uint64_t>(raw) | (1ull << 62);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, raw, &ev) != 0) continue;
    http_[raw] = HttpConn{std::move(fd), {}, monotonic_ns() + 5'000'000'000};
  }
}

void Server::Impl::serve_http(int raw) {
  auto it = http_.find(raw);
  if (it == http_.end()) return;
  char buf[2048];
  const ssize_t n = ::read(raw, buf, sizeof(buf));
  if (n <= 0) {
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, raw, nullptr);
    http_.erase(it);
    return;
  }
  it->second.head.append(buf, static_cast<size_t>(n));
  std::string path;
  auto r = parse_http_get(it->second.head, &path);
  if (r.ok() && !*r) return;
  std::string status_line, body, type = "text/plain; charset=utf-8";
  if (!r.ok()) {
    status_line = r.status().code() == StatusCode::kUnsupported ? "405 Method Not Allowed"
                                                                : "400 Bad Request";
    body = r.status().to_string() + "\n";
  } else if (path == "/metrics") {
    status_line = "200 OK";
    body = metrics_text();
    type = "text/plain; version=0.0.4; charset=utf-8";
  } else if (path == "/healthz") {
    const bool draining = draining_.load(std::memory_order_acquire);  // pairs with drain()
    status_line = draining ? "503 Service Unavailable" : "200 OK";
    body = draining ? "draining\n" : "ok\n";
  } else {
    status_line = "404 Not Found";
    body = "not found\n";
  }
  std::string resp = "HTTP/1.1 " + status_line + "\r\nContent-Type: " + type +
                     "\r\nContent-Length: " + std::to_string(body.size()) +
                     "\r\nConnection: close\r\n\r\n" + body;
  // Small responses to a local scraper: write with a bounded number of retries, then close.
  size_t off = 0;
  const Deadline d = Deadline::after_ms(1000);
  while (off < resp.size() && !d.expired()) {
    const ssize_t w = ::send(raw, resp.data() + off, resp.size() - off, MSG_NOSIGNAL);
    if (w > 0)
      off += static_cast<size_t>(w);
    else if (w < 0 && errno != EAGAIN && errno != EINTR)
      break;
  }
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, raw, nullptr);
  http_.erase(it);
}

void Server::Impl::read_conn(Conn& c) {
  const uint64_t id = c.id();
  // One read (at most kReadPerPass) per wake-up: a connection flooding bulk data cannot hold the
  // loop while a control message waits on another connection; epoll is level-triggered, so what
  // is left is reported again on the next pass.
  auto n = c.rx.read_from(c.fd.get(), kReadPerPass);
  if (!n.ok()) {
    if (c.ctrl_attached.load(std::memory_order_relaxed) && c.active) {
      // A closing client's two streams end in no particular order: control frames it sent
      // before it closed may still be on their way on the control connection. The session ends
      // with that connection (its end, or the main connection's silence past the heartbeat
      // deadline in tick()).
      MYELIN_LOG_INFO << "client " << id << " (" << c.ident << "): main connection ended ("
                      << n.status() << "); the session ends with its control connection";
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
      c.fd.reset();
      c.main_ended = true;
      return;
    }
    close_conn(id, n.status().to_string().c_str());
    return;
  }
  if (*n == 0) return;
  c_.bytes_in.fetch_add(*n, std::memory_order_relaxed);
  c.last_rx_ns = monotonic_ns();
  while (true) {
    FrameView f;
    auto got = c.rx.next(&f);
    if (!got.ok()) {
      c_.protocol_errors.fetch_add(1, std::memory_order_relaxed);
      send_error(c, 0, got.status());
      (void)c.out.flush(c.fd.get());
      close_conn(id, got.status().to_string().c_str());
      return;
    }
    if (!*got) break;
    c_.frames_in.fetch_add(1, std::memory_order_relaxed);
    Status s = handle_frame(c, f, c.rx.owner());
    if (!s.ok()) {
      if (s.code() == StatusCode::kProtocolError)
        c_.protocol_errors.fetch_add(1, std::memory_order_relaxed);
      send_error(c, 0, s);
      (void)c.out.flush(c.fd.get());
      close_conn(id, s.to_string().c_str());
      return;
    }
    if (c.closing) {
      (void)c.out.flush(c.fd.get());
      close_conn(id, "refused");
      return;
    }
    if (c.moved) {
      // Now the control connection of another session; its buffer went with it.
      conns_.erase(id);
      return;
    }
  }
}

void Server::Impl::service_control() {
  if (opt_.control_thread) return;  // the control thread serves them
  bool work = !links_.empty();
  if (!work) {
    // Nothing attached: only an attach or requests may be waiting.
    std::lock_guard<std::mutex> lock(ctrl_cmd_mu_);
    work = !ctrl_cmds_.empty();
  }
  if (!work) {
    std::lock_guard<std::mutex> lock(due_mu_);
    work = !due_.empty();
  }
  if (!work) return;
  std::array<epoll_event, 64> evs;
  const int n = ::epoll_wait(ctrl_epoll_.get(), evs.data(), static_cast<int>(evs.size()), 0);
  tl_ctrl_side = this;
  ctrl_pass(evs.data(), std::max(n, 0));
  tl_ctrl_side = nullptr;
  run_loop_cmds();
}

int Server::Impl::spin_then_wait(int epfd, epoll_event* evs, int max_events, int64_t now,
                                 int64_t wait_ns, int64_t last_event_ns) const {
  const int64_t spin_ns = opt_.spin_before_block_us * 1000;
  int n = 0;
  if (spin_ns > 0 && wait_ns > 0 && now - last_event_ns < spin_ns) {
    // The spin runs up to spin_ns past the last pass that had something to do, and never past
    // this wait's own end.
    const int64_t until = std::min(last_event_ns + spin_ns, now + wait_ns);
    n = internal::spin_until([&] { return ::epoll_wait(epfd, evs, max_events, 0); }, until);
    if (n == 0) wait_ns = std::max<int64_t>(0, now + wait_ns - monotonic_ns());
  }
  if (n == 0) n = internal::epoll_wait_ns(epfd, evs, max_events, wait_ns);
  return n;
}

void Server::Impl::control_loop() {
  tl_ctrl_side = this;
  ::pthread_setname_np(::pthread_self(), "myelin-brk-ctrl");
  place_thread(/*record=*/false);
  bool realtime = false;
  if (opt_.control_scheduling != ControlScheduling::kNormal) {
    Status s = apply_control_scheduling_to_this_thread(opt_.control_scheduling);
    if (s.ok())
      realtime = true;
    else
      MYELIN_LOG_WARN << "control thread keeps its scheduling: " << s;
  }
  std::array<epoll_event, 64> evs;
  // Pairs with the release store in stop().
  while (!ctrl_stop_.load(std::memory_order_acquire)) {
    const int64_t now = monotonic_ns();
    int64_t wait_ns = std::max<int64_t>(0, ctrl_last_tick_ns_ + kCtrlTickNs - now);
    if (ctrl_parked_links_ > 0) wait_ns = std::min<int64_t>(wait_ns, 1'000'000);
    const int n = spin_then_wait(ctrl_epoll_.get(), evs.data(), static_cast<int>(evs.size()), now,
                                 wait_ns, ctrl_last_event_ns_);
    ctrl_pass(evs.data(), std::max(n, 0));
    // The spin period counts from the end of a pass that had events. A real-time thread does not
    // spin: its wake-up runs it at once, and its yields would let no fair-class thread run.
    if (n > 0 && opt_.spin_before_block_us > 0 && !realtime) ctrl_last_event_ns_ = monotonic_ns();
  }
  ctrl_final_flush();
  tl_ctrl_side = nullptr;
}

void Server::Impl::ctrl_pass(const epoll_event* evs, int n) {
  std::vector<CtrlCmd> cmds;
  {
    std::lock_guard<std::mutex> lock(ctrl_cmd_mu_);
    cmds.swap(ctrl_cmds_);
  }
  for (CtrlCmd& cmd : cmds) {
    if (cmd.link) {
      ctrl_adopt(std::move(cmd.conn), std::move(cmd.link));
      continue;
    }
    // The loop closed the session: write what its control connection holds once, then let go.
    auto it = links_.find(cmd.session);
    if (it == links_.end()) continue;
    if (!pump_control(*it->second)) continue;  // that write failed: detached, gone
    Link& l = *it->second;
    ::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_DEL, l.fd.get(), nullptr);
    // A drain's socket is closed only once the client has what it was sent (ctrl_final_flush).
    if (draining_.load(std::memory_order_acquire)) ctrl_lingering_.push_back(std::move(l.fd));
    if (!l.parked.empty()) --ctrl_parked_links_;
    c_.ctrl_active.fetch_sub(1, std::memory_order_relaxed);
    links_.erase(it);
  }
  for (int i = 0; i < n; ++i) {
    const uint64_t tag = evs[i].data.u64;
    if (tag == kCtrlWakeTag) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = ::read(ctrl_wake_.get(), &v, sizeof(v));
      continue;
    }
    auto it = links_.find(tag & ~kCtrlTag);
    if (it == links_.end()) continue;  // handed over, its command not taken yet: seen next pass
    Link& l = *it->second;
    if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
      read_ctrl(l);  // may let go of the link
      continue;
    }
    (void)pump_control(l);  // writable
  }
  // Publishes that waited for room or a token, in order per connection.
  if (ctrl_parked_links_ > 0) {
    ctrl_ids_.clear();
    for (auto& [id, l] : links_) {
      if (!l->parked.empty()) ctrl_ids_.push_back(id);
    }
    for (uint64_t id : ctrl_ids_) {
      auto it = links_.find(id);
      if (it == links_.end()) continue;
      Link& l = *it->second;
      while (!l.parked.empty() && process_work(*l.conn, l.parked.front(), &l)) l.parked.pop_front();
      if (l.parked.empty()) --ctrl_parked_links_;
      (void)pump_control(l);  // errors, acks and credits these made
    }
  }
  // Sessions asked for (control deliveries queued, frames from the loop, credits to return),
  // until none is left: pumping one may route to another.
  while (true) {
    ctrl_ids_.clear();
    {
      std::lock_guard<std::mutex> lock(due_mu_);
      ctrl_ids_.swap(due_);
    }
    if (ctrl_ids_.empty()) break;
    for (uint64_t id : ctrl_ids_) {
      auto it = links_.find(id);
      // Not (or no longer) attached here: the loop drains its lane now, and ctrl_adopt()
      // clears the flag of a link it takes on before it pumps it.
      if (it == links_.end()) continue;
      // Pairs with the exchange in mark_ctrl_due(): cleared before the pump, so what is queued
      // after it asks again. A read-modify-write, not a store: a request whose exchange came
      // before this one in the flag's order released its push to this acquire, so the pump below
      // sees what it queued (a plain store would let the pump's reads pass it).
      (void)it->second->conn->ctrl_due.exchange(false, std::memory_order_acq_rel);
      (void)pump_control(*it->second);
    }
  }
  const int64_t now = monotonic_ns();
  if (now - ctrl_last_tick_ns_ >= kCtrlTickNs) {
    ctrl_tick(now);
    ctrl_last_tick_ns_ = now;
  }
  // Only a drain asks what is left (a walk over every link).
  if (opt_.control_thread && draining_.load(std::memory_order_acquire)) {  // pairs with drain()
    busy_ctrl_.store(ctrl_busy_count(), std::memory_order_relaxed);
    // Pairs with the acquire load in ctrl_drained(): publishes busy_ctrl_ with the count.
    ctrl_passes_.fetch_add(1, std::memory_order_release);
  }
}

size_t Server::Impl::ctrl_busy_count() const {
  size_t busy = 0;
  for (auto& [id, l] : links_) {
    if (!l->out.empty() || !l->parked.empty() || l->conn->lane(Lane::kControl).size() > 0) ++busy;
  }
  return busy;
}

bool Server::Impl::ctrl_drained() {
  {
    std::lock_guard<std::mutex> lock(due_mu_);
    if (!due_.empty()) return false;
  }
  {
    std::lock_guard<std::mutex> lock(ctrl_cmd_mu_);
    if (!ctrl_cmds_.empty()) return false;
  }
  {
    std::lock_guard<std::mutex> lock(loop_cmd_mu_);
    if (!loop_cmds_.empty()) return false;
  }
  // Without the control thread this thread is the control side: it can look itself.
  if (!opt_.control_thread) return ctrl_busy_count() == 0;
  // With it: a count from a pass that began after this side was found empty (the pass that ends
  // at drain_mark_ + 1 may have begun before), so that pass saw everything this side had handed
  // over by then.
  const uint64_t passes = ctrl_passes_.load(std::memory_order_acquire);
  if (drain_mark_ == 0) {
    drain_mark_ = passes + 1;  // + 1: zero means unset
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(ctrl_wake_.get(), &one, sizeof(one));
    return false;
  }
  if (passes + 1 < drain_mark_ + 2) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(ctrl_wake_.get(), &one, sizeof(one));
    return false;
  }
  return busy_ctrl_.load(std::memory_order_relaxed) == 0;
}

void Server::Impl::ctrl_adopt(std::shared_ptr<Conn> conn, std::unique_ptr<Link> link) {
  const uint64_t id = conn->id();
  const int64_t now = monotonic_ns();
  link->last_rx_ns = link->last_tx_ns = now;
  Link& l = *link;
  links_[id] = std::move(link);
  (void)conn->ctrl_due.exchange(false, std::memory_order_acq_rel);  // pumped below (see ctrl_pass)
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = id | kCtrlTag;
  if (::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_ADD, l.fd.get(), &ev) != 0) {
    fail_ctrl(l, errno_status("epoll_ctl for a control connection", errno).to_string());
    return;
  }
  // Frames the client sent right behind its attach are in the buffer that came along.
  if (decode_ctrl(l)) (void)pump_control(l);
}

void Server::Impl::read_ctrl(Link& l) {
  auto n = l.rx.read_from(l.fd.get(), kReadPerPass);
  if (!n.ok()) {
    detach_ctrl(l, n.status());
    return;
  }
  if (*n == 0) return;
  c_.bytes_in.fetch_add(*n, std::memory_order_relaxed);
  l.last_rx_ns = monotonic_ns();
  l.conn->ctrl_rx_ns.store(l.last_rx_ns, std::memory_order_relaxed);
  if (decode_ctrl(l)) (void)pump_control(l);
}

bool Server::Impl::decode_ctrl(Link& l) {
  while (true) {
    FrameView f;
    auto got = l.rx.next(&f);
    Status s = got.ok() ? ok_status() : got.status();
    if (s.ok() && !*got) return true;
    if (s.ok()) {
      c_.frames_in.fetch_add(1, std::memory_order_relaxed);
      // Chunks belong to bulk messages, which travel on the main connection (one reassembly
      // per session).
      s = (f.header.flags & (kFlagMore | kFlagContinuation))
              ? protocol_error("a chunked frame on the control connection")
              : handle_ctrl(l, f, l.rx.owner());
    }
    if (!s.ok()) {
      if (s.code() == StatusCode::kProtocolError)
        c_.protocol_errors.fetch_add(1, std::memory_order_relaxed);
      send_error(*l.conn, 0, s, &l);
      (void)l.out.flush(l.fd.get());
      fail_ctrl(l, "control connection: " + s.to_string());
      return false;
    }
  }
}

Status Server::Impl::route_answer(const FrameView& f) {
  const FrameHeader& h = f.header;
  if (h.type == FrameType::kError) {
    if (h.seq == 0 || h.seq > static_cast<uint64_t>(StatusCode::kInternal)) {
      return protocol_error("error frame with status code ", h.seq);
    }
    const std::string text(reinterpret_cast<const char*>(f.payload.data()), f.payload.size());
    owner_->broker_->reply(h.id, {}, nullptr, Status(static_cast<StatusCode>(h.seq), text));
    return ok_status();
  }
  // f.payload lives in the receive (or reassembly) buffer only for this call: the reply carries a
  // view of its own copy, which keeps it alive until it is sent.
  auto copy = std::make_shared<std::vector<std::byte>>(f.payload.begin(), f.payload.end());
  owner_->broker_->reply(h.id, std::span<const std::byte>(copy->data(), copy->size()), copy);
  return ok_status();
}

Status Server::Impl::handle_ctrl(Link& l, const FrameView& f,
                                 const std::shared_ptr<const void>& owner) {
  Conn& c = *l.conn;
  const FrameHeader& h = f.header;
  switch (h.type) {
    case FrameType::kBatch:
      return for_each_in_batch(
          f.payload, limits_, [&](const FrameView& inner) { return handle_ctrl(l, inner, owner); });
    case FrameType::kPublish:
    case FrameType::kRequest:
    case FrameType::kPsPush:
    case FrameType::kPsPull: {
      // Control traffic for the reservation (control_cpus.hpp): messages, not parameter-server
      // operations, whose small ones also come this way.
      if (h.type == FrameType::kPublish || h.type == FrameType::kRequest) note_control_traffic();
      // One window for both connections. Relaxed: a count (see Conn).
      if (c.publish_outstanding.fetch_add(1, std::memory_order_relaxed) + 1 >
          opt_.publish_credits) {
        return protocol_error("client sent more than its ", opt_.publish_credits,
                              " publish credits");
      }
      // No copy: the message keeps its receive block while parked or queued.
      Work m = work_from(f, owner);
      m.rx_ns = l.last_rx_ns;
      if (h.type == FrameType::kPsPush || h.type == FrameType::kPsPull) {
        // The parameter server and its pending pulls are the loop's.
        post_loop(LoopCmd{.kind = LoopCmd::Kind::kWork, .session = c.id(), .work = std::move(m)});
        return ok_status();
      }
      if (l.parked.empty() && process_work(c, m, &l)) return ok_status();
      if (l.parked.empty()) ++ctrl_parked_links_;
      l.parked.push_back(std::move(m));  // bounded by the publish credit window
      return ok_status();
    }
    case FrameType::kSubscribe: {
      if (!may_subscribe(c, f.topic)) {
        c_.acl_denied.fetch_add(1, std::memory_order_relaxed);
        send_error(c, h.id,
                   permission_denied("'", c.ident, "' may not subscribe to '", f.topic, "'"), &l);
        return ok_status();
      }
      send_ack(c, h.id, owner_->broker_->subscribe(c.id(), h.id, f.topic, h.seq == 1), &l);
      return ok_status();
    }
    case FrameType::kUnsubscribe:
      send_ack(c, h.id, owner_->broker_->unsubscribe(c.id(), h.id), &l);
      return ok_status();
    case FrameType::kCredit:
      if (h.id > (1ull << 32)) return protocol_error("credit grant of ", h.id);
      // A read report (h.seq) bounds bulk ahead of control frames on one connection; with a
      // control connection the bound does not apply (clients send none then), so one is
      // ignored here.
      c.deliver_credits.fetch_add(static_cast<int64_t>(h.id), std::memory_order_relaxed);
      if (h.id > 0 && c.lane(Lane::kBulk).size() > 0) {
        // Bulk waiting for these credits: the loop's. Pairs with the exchange in pump().
        c.ready.store(true, std::memory_order_release);
        wake();
      }
      return ok_status();
    case FrameType::kReply:
    case FrameType::kError:
      return route_answer(f);
    case FrameType::kHeartbeat:
      return ok_status();
    default:
      return protocol_error("unexpected ", frame_type_name(h.type),
                            " frame on a control connection");
  }
}

bool Server::Impl::pump_control(Link& l) {
  Conn& c = *l.conn;
  const int64_t now = monotonic_ns();
  // Frames the loop made for this connection first: they were made before anything popped now.
  std::vector<OutboxFrame> frames;
  {
    std::lock_guard<std::mutex> lock(c.outbox_mu);
    frames.swap(c.outbox);
  }
  for (OutboxFrame& f : frames) {
    Status s = l.out.push(f.h, f.topic, f.payload, std::move(f.owner), false, now);
    if (!s.ok()) MYELIN_LOG_WARN << "dropping a frame to client " << c.id() << ": " << s;
  }
  BoundedQueue<MessagePtr>& lane = c.lane(Lane::kControl);
  MessagePtr m;
  while (lane.size() > 0 && c.take_credit()) {
    if (!lane.try_pop(m)) {
      // A drop-oldest eviction emptied it meanwhile. The credit goes back; the loop may have
      // seen the pool short for a moment, so it looks again.
      c.return_credit();
      c.ready.store(true, std::memory_order_release);  // pairs with the exchange in pump()
      wake();
      break;
    }
    queue_message(c, l.out, m, now);
  }
  if (lane.size() > 0 && c.deliver_credits.load(std::memory_order_relaxed) <= 0)
    c_.credit_stalls.fetch_add(1, std::memory_order_relaxed);
  // Publish credits go back in groups of half the window (see pump()).
  if (l.credits_to_return >= credit_group()) {
    FrameHeader h;
    h.type = FrameType::kCredit;
    h.flags = kFlagControl;
    h.id = l.credits_to_return;
    l.credits_to_return = 0;
    ctrl_send(l, h, {}, {});
  }
  l.out.close_due_batches(now, true);
  if (l.out.has_unsent()) {
    auto r = l.out.flush(l.fd.get());
    if (!r.ok()) {
      detach_ctrl(l, r.status());
      return false;
    }
    l.last_tx_ns = now;
  }
  update_ctrl_interest(l);
  return true;
}

void Server::Impl::update_ctrl_interest(Link& l) {
  const bool want = l.out.has_unsent();
  if (want == l.want_out) return;
  epoll_event ev{};
  ev.events = want ? static_cast<uint32_t>(EPOLLIN | EPOLLOUT) : static_cast<uint32_t>(EPOLLIN);
  ev.data.u64 = l.conn->id() | kCtrlTag;
  if (::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_MOD, l.fd.get(), &ev) == 0) l.want_out = want;
}

void Server::Impl::detach_ctrl(Link& l, const Status& why) {
  const uint64_t id = l.conn->id();
  ::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_DEL, l.fd.get(), nullptr);
  // What the loop handed over and this side has not taken yet goes back with the link, behind
  // what the link holds.
  {
    std::lock_guard<std::mutex> lock(l.conn->outbox_mu);
    for (OutboxFrame& f : l.conn->outbox) {
      Status s = l.out.push(f.h, f.topic, f.payload, std::move(f.owner), false, monotonic_ns());
      if (!s.ok()) MYELIN_LOG_WARN << "dropping a frame to client " << id << ": " << s;
    }
    l.conn->outbox.clear();
  }
  if (!l.parked.empty()) --ctrl_parked_links_;
  c_.ctrl_active.fetch_sub(1, std::memory_order_relaxed);
  auto it = links_.find(id);
  post_loop(LoopCmd{.kind = LoopCmd::Kind::kDetached,
                    .session = id,
                    .link = std::move(it->second),
                    .why = why.to_string()});
  links_.erase(it);
}

void Server::Impl::fail_ctrl(Link& l, std::string why) {
  const uint64_t id = l.conn->id();
  ::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_DEL, l.fd.get(), nullptr);
  if (!l.parked.empty()) --ctrl_parked_links_;
  c_.ctrl_active.fetch_sub(1, std::memory_order_relaxed);
  links_.erase(id);
  post_loop(LoopCmd{.kind = LoopCmd::Kind::kClose, .session = id, .why = std::move(why)});
}

void Server::Impl::ctrl_tick(int64_t now) {
  const int64_t silent = 3 * opt_.heartbeat_ms * 1'000'000;
  ctrl_ids_.clear();
  for (auto& [id, l] : links_) ctrl_ids_.push_back(id);
  for (uint64_t id : ctrl_ids_) {
    auto it = links_.find(id);
    if (it == links_.end()) continue;
    Link& l = *it->second;
    if (now - l.last_rx_ns > silent) {
      c_.dead_clients.fetch_add(1, std::memory_order_relaxed);
      fail_ctrl(l, "control connection silent past the heartbeat deadline");
      continue;
    }
    if (now - l.last_tx_ns > opt_.heartbeat_ms * 1'000'000) {
      FrameHeader h;
      h.type = FrameType::kHeartbeat;
      h.flags = kFlagControl;
      ctrl_send(l, h, {}, {});
      l.last_tx_ns = now;
      (void)pump_control(l);
    }
  }
}

void Server::Impl::ctrl_final_flush() {
  ctrl_ids_.clear();
  for (auto& [id, l] : links_) ctrl_ids_.push_back(id);
  for (uint64_t id : ctrl_ids_) {
    auto it = links_.find(id);
    if (it != links_.end()) (void)pump_control(*it->second);
  }
  const bool draining = draining_.load(std::memory_order_acquire);  // pairs with drain()
  for (auto& [id, l] : links_) {
    ::epoll_ctl(ctrl_epoll_.get(), EPOLL_CTL_DEL, l->fd.get(), nullptr);
    if (draining) ctrl_lingering_.push_back(std::move(l->fd));
  }
  c_.ctrl_active.fetch_sub(links_.size(), std::memory_order_relaxed);
  links_.clear();
  if (draining) {
    close_after_delivery(std::move(ctrl_lingering_),
                         Deadline::at_ns(drain_deadline_ns_.load(std::memory_order_relaxed)));
    ctrl_lingering_.clear();
  }
}

void Server::Impl::run_loop_cmds() {
  std::vector<LoopCmd> cmds;
  {
    std::lock_guard<std::mutex> lock(loop_cmd_mu_);
    if (loop_cmds_.empty()) return;
    cmds.swap(loop_cmds_);
  }
  for (LoopCmd& cmd : cmds) {
    auto it = conns_.find(cmd.session);
    if (it == conns_.end()) continue;  // closed meanwhile; a link closes with the command
    auto keep = it->second;
    Conn& c = *keep;
    switch (cmd.kind) {
      case LoopCmd::Kind::kClose:
        close_conn(cmd.session, cmd.why.c_str());
        break;
      case LoopCmd::Kind::kWork:
        if (!(c.parked.empty() && process_work(c, cmd.work, nullptr)))
          c.parked.push_back(std::move(cmd.work));
        break;
      case LoopCmd::Kind::kDetached: {
        // Pairs with the acquire load in on_ready(): control deliveries come to the loop now.
        c.ctrl_attached.store(false, std::memory_order_release);
        if (c.main_ended) {
          close_conn(cmd.session,
                     ("both connections ended, the control connection: " + cmd.why).c_str());
          break;
        }
        // Frames queued for the control connection (deliveries that took a delivery credit,
        // replies, errors, acks) go on the main connection instead, in their order and ahead of
        // later control frames; one the ended socket took only part of goes again whole. Then
        // what the loop handed over after the control side let go.
        size_t moved = c.out.adopt_control_frames(cmd.link->out);
        std::vector<OutboxFrame> frames;
        {
          std::lock_guard<std::mutex> lock(c.outbox_mu);
          frames.swap(c.outbox);
        }
        const int64_t now = monotonic_ns();
        for (OutboxFrame& f : frames) {
          Status s = c.out.push(f.h, f.topic, f.payload, std::move(f.owner), false, now);
          if (!s.ok()) MYELIN_LOG_WARN << "dropping a frame to client " << c.id() << ": " << s;
          ++moved;
        }
        // Publishes that waited there wait here now (a topic is in one lane: no order across),
        // and credits it had not returned go back from here.
        for (Work& m : cmd.link->parked) c.parked.push_back(std::move(m));
        c.credits_to_return += cmd.link->credits_to_return;
        MYELIN_LOG_INFO << "client " << c.id() << " (" << c.ident << "): control connection ended ("
                        << cmd.why << "); its control lane falls back to the main connection, with "
                        << "the " << moved << " frames queued on it";
        c.ready.store(true, std::memory_order_relaxed);  // this thread pumps it
        break;
      }
    }
  }
}

Status Server::Impl::attach(Conn& c, const FrameView& f) {
  MYELIN_ASSIGN_OR_RETURN(AttachRequest req, parse_attach(f));
  auto it = conns_.find(req.session);
  Conn* s = it != conns_.end() && it->second.get() != &c ? it->second.get() : nullptr;
  // Refused alike, so that an unauthenticated peer learns nothing about sessions: no such
  // session, one that is not authenticated or speaks protocol 1, already has a control
  // connection or belongs to another identity, and a MAC that does not check out (no secret, a
  // replay made for another server nonce, or another session's token).
  const bool fits = s && s->active && !s->closing && s->version >= 2 &&
                    !s->ctrl_attached.load(std::memory_order_relaxed) && s->ident == req.identity;
  // The MAC is computed whether or not the session fits (over an all-zero token then), so the
  // time the answer takes does not tell a missing session from a bad MAC either.
  static const internal::Token kNoToken{};
  const bool mac_ok = internal::mac_equal(
      internal::attach_mac(opt_.secret, c.nonce, req.client_nonce, fits ? s->token : kNoToken,
                           fits ? s->id() : req.session, req.identity),
      req.mac);
  if (!fits || !mac_ok) {
    c_.auth_failures.fetch_add(1, std::memory_order_relaxed);
    c_.attach_refused.fetch_add(1, std::memory_order_relaxed);
    MYELIN_LOG_WARN << "control connection refused: '" << req.identity << "' for session "
                    << req.session
                    << (fits ? " (bad MAC)" : " (no such session, or it cannot take one)");
    send_error(c, 0, permission_denied("control connection for session ", req.session, " refused"));
    c.closing = true;
    return ok_status();
  }
  const internal::Mac proof = internal::attach_proof(opt_.secret, c.nonce, req.client_nonce,
                                                     s->token, s->id(), req.identity);
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
  std::shared_ptr<Conn> session = conns_.at(s->id());
  auto link = std::make_unique<Link>(session, std::move(c.fd), std::move(c.rx), std::move(c.out));
  FrameHeader h;
  h.type = FrameType::kAuthOk;
  h.flags = kFlagControl;
  h.id = s->id();
  Status pushed = link->out.push(h, {}, std::span<const std::byte>(proof.data(), proof.size()),
                                 nullptr, false, monotonic_ns());
  c.moved = true;  // the socket went with `link` and closes with it
  MYELIN_RETURN_IF_ERROR(pushed);
  // From here control deliveries are the control side's to drain. Pairs with the acquire load
  // in on_ready().
  s->ctrl_attached.store(true, std::memory_order_release);
  // The main connection carries bulk only from now on: no control frame waits behind what its
  // buffers hold, so they may take more per write and wake-up (ServerOptions).
  if (s->fd.valid() && opt_.bulk_socket_buffer_bytes > opt_.socket_buffer_bytes)
    internal::set_socket_buffers(s->fd.get(), opt_.bulk_socket_buffer_bytes);
  c_.ctrl_active.fetch_add(1, std::memory_order_relaxed);
  c_.frames_out.fetch_add(1, std::memory_order_relaxed);
  MYELIN_LOG_INFO << "client " << s->id() << " (" << s->ident << "): control connection attached";
  post_ctrl(CtrlCmd{.conn = std::move(session), .link = std::move(link)});
  return ok_status();
}

Status Server::Impl::handle_frame(Conn& c, const FrameView& f,
                                  const std::shared_ptr<const void>& owner) {
  if (!c.active) {
    if (f.header.type == FrameType::kAttach) return attach(c, f);
    auto req = parse_auth(f);
    if (!req.ok()) return std::move(req).status();
    auto version =
        negotiate_version(VersionRange{}, req->versions, "client '" + req->identity + "'");
    if (!version.ok()) {
      c_.version_refused.fetch_add(1, std::memory_order_relaxed);
      MYELIN_LOG_WARN << version.status();
      send_error(c, 0, version.status());
      c.closing = true;
      return ok_status();
    }
    const internal::Mac expect =
        internal::client_mac(opt_.secret, c.nonce, req->client_nonce, req->identity);
    const AclEntry* acl = acl_for(req->identity);
    if (!internal::mac_equal(expect, req->mac) || (!opt_.acl.empty() && !acl)) {
      c_.auth_failures.fetch_add(1, std::memory_order_relaxed);
      MYELIN_LOG_WARN << "authentication failed for '" << req->identity << "'";
      send_error(c, 0, permission_denied("authentication failed for '", req->identity, "'"));
      c.closing = true;
      return ok_status();
    }
    c.active = true;
    c.ident = req->identity;
    c.acl = acl;
    c.version = *version;
    if (c.version >= 2) {
      MYELIN_ASSIGN_OR_RETURN(c.token, internal::random_token());
    }
    // Protocol 3: the proof covers the session token and id too (auth.hpp); 1 and 2 leave them out.
    const bool bound = c.version >= 3;
    const internal::Mac proof =
        internal::server_proof(opt_.secret, c.nonce, req->client_nonce, req->identity,
                               bound ? &c.token : nullptr, bound ? c.id() : 0);
    std::vector<std::byte> ok_payload(proof.begin(), proof.end());
    if (c.version >= 2) ok_payload.insert(ok_payload.end(), c.token.begin(), c.token.end());
    FrameHeader h;
    h.type = FrameType::kAuthOk;
    h.flags = kFlagControl;
    h.id = c.id();
    h.seq = opt_.publish_credits;
    // The client reports the bytes it reads every quarter window (0: it need not). At least every
    // byte: a bound below 4 bytes must still be reported against, or bulk stops while control
    // messages flow to this client.
    h.timestamp_ns =
        opt_.bulk_inflight_bytes == 0 ? 0 : std::max<uint64_t>(1, opt_.bulk_inflight_bytes / 4);
    send_direct(c, h, {}, ok_payload);
    c.ack_base = c.out.bytes_written() + c.out.backlog_bytes();
    c.tokens =
        acl && acl->rate_limit_msgs_per_s > 0
            ? (acl->rate_limit_burst > 0 ? acl->rate_limit_burst : acl->rate_limit_msgs_per_s)
            : 0;
    c.tokens_ns = monotonic_ns();
    owner_->broker_->add_session(conns_.at(c.id()));
    c_.active.fetch_add(1, std::memory_order_relaxed);
    return ok_status();
  }
  return handle_active(c, f, owner);
}

Status Server::Impl::accept_work(Conn& c, Work m) {
  if (m.rx_ns == 0) m.rx_ns = c.last_rx_ns;
  // One window for both connections. Relaxed: a count (see Conn).
  if (c.publish_outstanding.fetch_add(1, std::memory_order_relaxed) + 1 > opt_.publish_credits) {
    return protocol_error("client sent more than its ", opt_.publish_credits, " publish credits");
  }
  if (c.parked.empty() && process_work(c, m, nullptr)) return ok_status();
  c.parked.push_back(std::move(m));  // bounded by the publish credit window
  return ok_status();
}

Status Server::Impl::handle_active(Conn& c, const FrameView& f,
                                   const std::shared_ptr<const void>& owner) {
  const FrameHeader& h = f.header;
  if (h.flags & (kFlagMore | kFlagContinuation)) {
    AssembledMessage m;
    MYELIN_ASSIGN_OR_RETURN(bool done, c.reasm.add(f, &m));
    if (!done) return ok_status();
    FrameView whole;
    whole.header = m.header;
    whole.topic = m.topic;
    whole.payload = std::span<const std::byte>(m.payload->data(), m.payload->size());
    // A reassembled publish already has a buffer of its own: no second copy.
    if (publish_like(m.header.type)) return accept_work(c, work_from(std::move(m)));
    std::shared_ptr<const void> own = m.payload;
    return handle_active(c, whole, own);
  }
  switch (h.type) {
    case FrameType::kBatch:
      return for_each_in_batch(f.payload, limits_, [&](const FrameView& inner) {
        return handle_active(c, inner, owner);
      });
    case FrameType::kPublish:
    case FrameType::kRequest:
    case FrameType::kPsPush:
    case FrameType::kPsPull: {
      // No copy: the message keeps its receive block while parked or queued.
      return accept_work(c, work_from(f, owner));
    }
    // Answered on the main connection, where they came: a client sends them there when it
    // has no control connection, or gave one up that the broker bound (its attach timed out,
    // or the answer was altered on the way) and that the broker may not have seen end yet.
    case FrameType::kSubscribe: {
      if (!may_subscribe(c, f.topic)) {
        c_.acl_denied.fetch_add(1, std::memory_order_relaxed);
        send_error(c, h.id,
                   permission_denied("'", c.ident, "' may not subscribe to '", f.topic, "'"),
                   nullptr, /*main_connection=*/true);
        return ok_status();
      }
      Status s = owner_->broker_->subscribe(c.id(), h.id, f.topic, h.seq == 1);
      send_ack(c, h.id, s, nullptr, /*main_connection=*/true);
      return ok_status();
    }
    case FrameType::kUnsubscribe: {
      Status s = owner_->broker_->unsubscribe(c.id(), h.id);
      send_ack(c, h.id, s, nullptr, /*main_connection=*/true);
      return ok_status();
    }
    case FrameType::kCredit:
      if (h.id > (1ull << 32)) return protocol_error("credit grant of ", h.id);
      if (h.seq > 0) {
        // Bytes read: never more than were written.
        if (opt_.bulk_inflight_bytes == 0 ||
            h.seq > c.out.bytes_written() - c.ack_base - c.bytes_acked) {
          return protocol_error("client reports ", h.seq, " bytes read, more than were sent");
        }
        c.bytes_acked += h.seq;
      }
      c.deliver_credits.fetch_add(static_cast<int64_t>(h.id), std::memory_order_relaxed);
      c.ready.store(true, std::memory_order_relaxed);  // this thread pumps it
      // Control deliveries waiting for these credits are the control side's.
      if (h.id > 0 && c.ctrl_attached.load(std::memory_order_relaxed)) mark_ctrl_due(c);
      return ok_status();
    case FrameType::kReply:
    case FrameType::kError:
      return route_answer(f);
    case FrameType::kHeartbeat:
      return ok_status();
    default:
      return protocol_error("unexpected ", frame_type_name(h.type), " frame from a client");
  }
}

bool Server::Impl::process_work(Conn& c, const Work& m, Link* via) {
  // Rate limit: a token per message; without one the frame waits (the producer stalls). Both
  // sides take from one bucket: the token is taken now and given back if the frame must wait.
  const bool limited = c.acl && c.acl->rate_limit_msgs_per_s > 0;
  const double burst = !limited                      ? 0
                       : c.acl->rate_limit_burst > 0 ? c.acl->rate_limit_burst
                                                     : c.acl->rate_limit_msgs_per_s;
  if (limited) {
    const int64_t now = monotonic_ns();
    std::lock_guard<std::mutex> lock(c.rate_mu);
    c.tokens = std::min(burst, c.tokens + static_cast<double>(now - c.tokens_ns) * 1e-9 *
                                              c.acl->rate_limit_msgs_per_s);
    c.tokens_ns = now;
    if (c.tokens < 1.0) {
      c_.rate_limited.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    c.tokens -= 1.0;
  }
  const FrameHeader& h = m.header;
  const std::span<const std::byte> payload = m.payload;
  bool done = true;
  switch (h.type) {
    case FrameType::kPublish:
    case FrameType::kRequest: {
      // A request routes like a publish; it carries its attempt number in seq.
      const bool request = h.type == FrameType::kRequest;
      if (!may_publish(c, m.topic)) {
        c_.acl_denied.fetch_add(1, std::memory_order_relaxed);
        send_error(c, h.id,
                   permission_denied("'", c.ident, "' may not ",
                                     request ? "request on" : "publish to", " '", m.topic, "'"),
                   via);
        break;
      }
      PublishArgs a{.topic = m.topic,
                    .payload = payload,
                    .owner = m.owner,
                    .owner_shared = m.shared_block,
                    .id = h.id,
                    .publish_ts_ns = h.timestamp_ns,
                    .attempt = request ? h.seq : 1,
                    .from_session = c.id(),
                    .route = via ? &via->route : &c.route,
                    .received_ns = m.rx_ns};
      auto r = request ? owner_->broker_->request(a) : owner_->broker_->publish(a);
      if (!r.ok())
        send_error(c, h.id, r.status(), via);
      else if (*r == PublishOutcome::kBlocked)
        done = false;
      break;
    }
    case FrameType::kPsPush: {
      // The control side hands parameter-server work to the loop (handle_ctrl()).
      MYELIN_CHECK(via == nullptr);
      c_.ps_pushes.fetch_add(1, std::memory_order_relaxed);
      ParameterServer* ps = owner_->ps_.get();
      Status s;
      if (!ps)
        s = unsupported("this broker serves no parameter-server shard");
      else if (!may_publish(c, m.topic)) {
        c_.acl_denied.fetch_add(1, std::memory_order_relaxed);
        s = permission_denied("'", c.ident, "' may not push to '", m.topic, "'");
      } else if (payload.size() < 4 || (payload.size() - 4) % sizeof(float) != 0) {
        s = invalid_argument("ps push payload of ", payload.size(), " bytes is not u32 + f32[]");
      } else {
        uint32_t worker;
        std::memcpy(&worker, payload.data(), 4);
        std::vector<float> v((payload.size() - 4) / sizeof(float));
        if (!v.empty()) std::memcpy(v.data(), payload.data() + 4, v.size() * sizeof(float));
        s = h.seq == kPsInitStep ? ps->init_key(m.topic, std::move(v))
                                 : ps->push(worker, m.topic, v, h.seq);
      }
      if (!s.ok()) {
        send_error(c, h.id, s);
      } else {
        FrameHeader r;
        r.type = FrameType::kPsReply;
        r.flags = kFlagControl;
        r.id = h.id;
        send_direct(c, r, {}, {});
        check_pulls();
      }
      break;
    }
    case FrameType::kPsPull: {
      MYELIN_CHECK(via == nullptr);
      c_.ps_pulls.fetch_add(1, std::memory_order_relaxed);
      if (!owner_->ps_) {
        send_error(c, h.id, unsupported("this broker serves no parameter-server shard"));
      } else if (!may_subscribe(c, m.topic)) {
        c_.acl_denied.fetch_add(1, std::memory_order_relaxed);
        send_error(c, h.id, permission_denied("'", c.ident, "' may not pull '", m.topic, "'"));
      } else if (c.pulls >= kMaxPendingPulls) {
        send_error(c, h.id, resource_exhausted("more than ", kMaxPendingPulls, " pulls pending"));
      } else {
        c.pulls++;
        pulls_.push_back(PendingPull{c.id(), h.id, std::string(m.topic), h.seq});
        check_pulls();
      }
      break;
    }
    default:
      break;
  }
  if (!done) {
    if (limited) {
      std::lock_guard<std::mutex> lock(c.rate_mu);
      c.tokens = std::min(burst, c.tokens + 1.0);
    }
    return false;
  }
  c.publish_outstanding.fetch_sub(1, std::memory_order_relaxed);  // relaxed: a count (see Conn)
  if (via)
    via->credits_to_return++;
  else
    c.credits_to_return++;
  return true;
}

void Server::Impl::check_pulls() {
  ParameterServer* ps = owner_->ps_.get();
  if (!ps) return;
  for (auto it = pulls_.begin(); it != pulls_.end();) {
    auto cit = conns_.find(it->conn);
    if (cit == conns_.end()) {
      it = pulls_.erase(it);
      continue;
    }
    Conn& c = *cit->second;
    auto vals = std::make_shared<std::vector<float>>();
    uint64_t version = 0;
    auto r = ps->try_pull(it->key, it->min_version, vals.get(), &version);
    if (r.ok() && !*r) {
      ++it;
      continue;
    }
    if (!r.ok()) {
      send_error(c, it->req, r.status());
    } else {
      FrameHeader h;
      h.type = FrameType::kPsReply;
      h.id = it->req;
      h.seq = version;
      // Bulk lane, chunked: a large tensor never delays control frames by more than one chunk.
      send_direct(c, h, {},
                  std::span<const std::byte>(reinterpret_cast<const std::byte*>(vals->data()),
                                             vals->size() * sizeof(float)),
                  vals);
    }
    c.pulls--;
    it = pulls_.erase(it);
  }
}

void Server::Impl::retry_parked(Conn& c) {
  while (!c.parked.empty()) {
    if (!process_work(c, c.parked.front(), nullptr)) return;
    c.parked.pop_front();
  }
}

void Server::Impl::queue_message(Conn& c, OutQueue& out, const MessagePtr& m, int64_t now) {
  // The caller took the delivery credit.
  FrameHeader h;
  h.type = m->type;
  h.flags = m->lane == Lane::kControl ? kFlagControl : 0;
  h.seq = m->seq;
  h.id = m->id;
  h.timestamp_ns = m->publish_ts_ns;
  // A payload that shares its receive block with other frames is copied once this queue already
  // holds kMaxSharedOwnerDepth frames (a coalesced one is copied into its batch anyway): like a
  // lane, a slow reader's send queue keeps only that many blocks alive, not one per message.
  const bool copy = m->owner_shared && out.queued_frames() >= Broker::kMaxSharedOwnerDepth;
  Status s = out.push(h, m->topic, m->payload, copy ? nullptr : m->owner, m->batchable, now);
  if (!s.ok()) MYELIN_LOG_WARN << "cannot send to client " << c.id() << ": " << s;
  if (m->type == FrameType::kDeliver) observe_latency(now - m->broker_rx_ns);
  c_.frames_out.fetch_add(1, std::memory_order_relaxed);
}

void Server::Impl::pump(Conn& c) {
  // Pairs with the release store in on_ready().
  c.ready.exchange(false, std::memory_order_acquire);
  // With a control connection the control lane is the control side's; the loop moves bulk only.
  const bool has_ctrl = c.ctrl_attached.load(std::memory_order_relaxed);
  const int64_t now = monotonic_ns();
  size_t moved = 0;
  while (c.active) {
    // Past the high-water mark of unsent bytes only control messages move on: they go out ahead
    // of the queued bulk, so they must not wait in the ring until the bulk has drained.
    BoundedQueue<MessagePtr>& control = c.lane(Lane::kControl);
    BoundedQueue<MessagePtr>& bulk = c.lane(Lane::kBulk);
    BoundedQueue<MessagePtr>* from = nullptr;
    if (!has_ctrl && control.size() > 0)
      from = &control;
    else if (c.out.backlog_bytes() < kHighWater && bulk.size() > 0)
      from = &bulk;
    if (!from || !c.take_credit()) break;
    MessagePtr m;
    if (!from->try_pop(m)) {
      // A drop-oldest eviction emptied it meanwhile. The credit goes back; the control side may
      // have seen the pool short for a moment, so it looks again.
      c.return_credit();
      if (has_ctrl) mark_ctrl_due(c);
      break;
    }
    const bool control_msg = m->lane == Lane::kControl;
    queue_message(c, c.out, m, now);
    if (control_msg) c.last_control_ns = now;
    ++moved;
  }
  if (c.deliver_credits.load(std::memory_order_relaxed) <= 0 &&
      (has_ctrl ? c.lane(Lane::kBulk).size() : c.depth()) > 0)
    c_.credit_stalls.fetch_add(1, std::memory_order_relaxed);
  // Publish credits go back in groups of half the window (one frame, one wake-up of the client's
  // I/O thread and one write here per group instead of per message). The client keeps at least
  // half its window meanwhile, and a producer that used it all up has at least half outstanding
  // here, so its credits come back as soon as those are accepted: no stall from the grouping.
  // (At a quarter window, 256 credits, the grants were most of the broker's writes and of the
  // publisher's I/O thread wake-ups in a 1 KiB stream; docs/performance.md, "Broker".)
  // With a control connection they still go on the main connection: waking the control side
  // for them cost a thread switch per group while bulk flowed.
  if (c.credits_to_return > 0 && (c.credits_to_return >= credit_group() || c.closing)) {
    FrameHeader h;
    h.type = FrameType::kCredit;
    h.flags = kFlagControl;
    h.id = c.credits_to_return;
    c.credits_to_return = 0;
    send_direct(c, h, {}, {}, nullptr, /*main_connection=*/true);
  }
  // Everything deliverable now was queued above: send the open batches at once instead of
  // waiting for their window. Batches still fill up with what one read brought in (a publisher's
  // batch, a burst), and no message waits for later traffic that may never come.
  c.out.close_due_batches(now, true);
  if (c.main_ended) return;
  // With a control connection nothing but bulk travels here: the whole pipeline stays open.
  size_t window_budget = SIZE_MAX;
  if (opt_.bulk_inflight_bytes > 0 && c.active && !has_ctrl &&
      now - c.last_control_ns < kControlRecentNs) {
    const uint64_t inflight = c.out.bytes_written() - c.ack_base - c.bytes_acked;
    window_budget = inflight >= opt_.bulk_inflight_bytes ? 0 : opt_.bulk_inflight_bytes - inflight;
  }
  auto r = c.out.flush(c.fd.get(), std::min(window_budget, kWritePerPass));
  if (!r.ok()) {
    close_conn(c.id(), r.status().to_string().c_str());
    return;
  }
  c.pass_limited = c.out.window_limited() && window_budget > kWritePerPass;
  c.last_tx_ns = (moved || !c.out.empty()) ? now : c.last_tx_ns;
  update_interest(c);
}

void Server::Impl::pump_all() {
  // Every connection: deliveries move, credits flow back, blocked publishers retry. Taken out of
  // the member while in use (close paths never touch it, but a nested use could not clear it).
  std::vector<std::shared_ptr<Conn>> all = std::move(pump_list_);
  all.clear();
  for (auto& [id, c] : conns_) all.push_back(c);
  for (int pass = 0; pass < 2; ++pass) {
    for (auto& c : all) {
      if (!conns_.count(c->id())) continue;
      retry_parked(*c);
      const uint64_t before = c->out.bytes_written();
      pump(*c);
      // A bulk write may have taken a while: control frames that came meanwhile go first.
      if (c->out.bytes_written() != before) service_control();
    }
  }
  all.clear();  // holds no connection past this call
  pump_list_ = std::move(all);
}

void Server::Impl::tick(int64_t now) {
  std::vector<uint64_t> dead;
  for (auto& [id, c] : conns_) {
    if (!c->active) {
      if (now > c->handshake_deadline_ns) dead.push_back(id);
      continue;
    }
    // The control connection's silence and heartbeats are the control side's (ctrl_tick()).
    const int64_t silent = 3 * opt_.heartbeat_ms * 1'000'000;
    const int64_t heard = std::max(c->last_rx_ns, c->ctrl_rx_ns.load(std::memory_order_relaxed));
    if (now - heard > silent) {
      c_.dead_clients.fetch_add(1, std::memory_order_relaxed);
      dead.push_back(id);
      continue;
    }
    FrameHeader h;
    h.type = FrameType::kHeartbeat;
    h.flags = kFlagControl;
    if (now - c->last_tx_ns > opt_.heartbeat_ms * 1'000'000) {
      send_direct(*c, h, {}, {}, nullptr, /*main_connection=*/true);
      c->last_tx_ns = now;
      c->ready.store(true, std::memory_order_relaxed);
    }
  }
  for (uint64_t id : dead) close_conn(id, "silent past the heartbeat deadline");
  for (auto it = http_.begin(); it != http_.end();) {
    if (now > it->second.deadline_ns) {
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->first, nullptr);
      it = http_.erase(it);
    } else {
      ++it;
    }
  }
  std::vector<ClientSnap> snap;
  for (auto& [id, c] : conns_) {
    if (c->active)
      snap.push_back({id, c->ident, c->depth(), c->deliver_credits.load(std::memory_order_relaxed),
                      c->out.backlog_bytes()});
  }
  std::lock_guard<std::mutex> lock(snap_mu_);
  snap_ = std::move(snap);
}

void Server::Impl::loop() {
  loop_tid_ = std::this_thread::get_id();
  // Named for top, perf and the scheduler's traces (at most 15 characters).
  ::pthread_setname_np(::pthread_self(), "myelin-brk-loop");
  place_thread(/*record=*/true);
  if (opt_.control_thread) mark_this_thread_bulk();
  if (opt_.control_thread && opt_.loop_nice > 0) {
    // This thread only (a Linux thread's nice value is its own).
    if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), opt_.loop_nice) != 0) {
      MYELIN_LOG_WARN << "loop thread keeps its priority: " << errno_status("setpriority", errno);
    }
  }
  if (opt_.control_thread && opt_.loop_scheduling != BulkScheduling::kNormal) {
    Status s = apply_bulk_scheduling_to_this_thread(opt_.loop_scheduling);
    if (!s.ok()) MYELIN_LOG_WARN << "loop thread keeps its scheduling: " << s;
  }
  bool goaway_sent = false;
  std::array<epoll_event, 64> evs;
  // Pairs with the release stores in stop().
  while (!stop_.load(std::memory_order_acquire)) {
    int64_t now = monotonic_ns();
    int64_t wait_ns = 50'000'000;
    bool parked = false;
    for (auto& [id, c] : conns_) {
      wait_ns = std::min(wait_ns, std::max<int64_t>(0, c->out.next_batch_deadline() - now));
      if (!c->parked.empty()) parked = true;
    }
    if (parked) wait_ns = std::min<int64_t>(wait_ns, 1'000'000);
    const int n = spin_then_wait(epoll_.get(), evs.data(), static_cast<int>(evs.size()), now,
                                 wait_ns, last_event_ns_);
    if (opt_.control_thread) keep_bulk_off_control_cpus();
    run_loop_cmds();
    service_control();
    for (int i = 0; i < n; ++i) {
      const uint64_t tag = evs[i].data.u64;
      if (tag & (1ull << 63)) {
        const int fd = static_cast<int>(tag & 0xFFFFFFFF);
        if (fd == listen_.get())
          accept_clients();
        else if (fd == http_listen_.get())
          accept_http();
        else if (fd == ctrl_epoll_.get())
          continue;  // service_control() below and between bulk reads
        else {
          uint64_t v;
          [[maybe_unused]] ssize_t r = ::read(wake_fd_.get(), &v, sizeof(v));
        }
      } else if (tag & (1ull << 62)) {
        serve_http(static_cast<int>(tag & 0xFFFFFFFF));
      } else {
        auto it = conns_.find(tag);
        if (it == conns_.end()) continue;
        auto keep = it->second;
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
          read_conn(*keep);
          service_control();
        } else
          keep->ready.store(true, std::memory_order_relaxed);  // writable: flush in pump
      }
    }
    pump_all();
    now = monotonic_ns();
    if (n > 0) last_event_ns_ = now;  // the spin period counts from the end of this pass
    if (now - last_tick_ns_ > 100'000'000) {
      tick(now);
      last_tick_ns_ = now;
    }
    if (draining_.load(std::memory_order_acquire)) {  // pairs with drain()
      if (!goaway_sent) {
        goaway_sent = true;
        if (listen_.valid()) {
          ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, listen_.get(), nullptr);
          listen_.reset();
        }
        for (auto& [id, c] : conns_) {
          if (!c->active) continue;
          FrameHeader h;
          h.type = FrameType::kGoAway;
          h.flags = kFlagControl;
          send_direct(*c, h, {}, {});
          c->ready.store(true, std::memory_order_relaxed);
        }
      }
      bool empty = true;
      for (auto& [id, c] : conns_) {
        if (!empty) break;
        if (c->depth() > 0 || !c->out.empty() || !c->parked.empty()) empty = false;
        std::lock_guard<std::mutex> lock(c->outbox_mu);
        if (!c->outbox.empty()) empty = false;
      }
      if (!empty)
        drain_mark_ = 0;  // the control side is asked afresh once this side is empty
      else
        empty = ctrl_drained();
      // Pairs with the acquire loads in drain().
      if (empty && !drained_.load(std::memory_order_relaxed)) {
        std::lock_guard<std::mutex> lock(drain_mu_);
        drained_.store(true, std::memory_order_release);
        drain_cv_.notify_all();
      }
    }
  }
  // Without a control thread the loop runs the control side's last flush too.
  if (!opt_.control_thread) {
    tl_ctrl_side = this;
    ctrl_final_flush();
    tl_ctrl_side = nullptr;
  }
  const bool draining = draining_.load(std::memory_order_acquire);  // pairs with drain()
  std::vector<Fd> lingering;
  for (auto& [id, c] : conns_) {
    if (!c->fd.valid()) continue;
    (void)c->out.flush(c->fd.get());
    if (draining) {
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c->fd.get(), nullptr);
      lingering.push_back(std::move(c->fd));
    }
  }
  std::vector<uint64_t> ids;
  for (auto& [id, c] : conns_) ids.push_back(id);
  for (uint64_t id : ids) close_conn(id, "broker stopping");
  if (draining) {
    close_after_delivery(std::move(lingering),
                         Deadline::at_ns(drain_deadline_ns_.load(std::memory_order_relaxed)));
  }
}

ServerCounters Server::Impl::counters() const {
  ServerCounters s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.connections_accepted = ld(c_.accepted);
  s.connections_active = ld(c_.active);
  s.auth_failures = ld(c_.auth_failures);
  s.acl_denied = ld(c_.acl_denied);
  s.protocol_errors = ld(c_.protocol_errors);
  s.dead_clients = ld(c_.dead_clients);
  s.rate_limited = ld(c_.rate_limited);
  s.credit_stalls = ld(c_.credit_stalls);
  s.frames_in = ld(c_.frames_in);
  s.frames_out = ld(c_.frames_out);
  s.bytes_in = ld(c_.bytes_in);
  s.attach_refused = ld(c_.attach_refused);
  s.version_refused = ld(c_.version_refused);
  s.control_connections = ld(c_.ctrl_active);
  return s;
}

std::string Server::Impl::metrics_text() const {
  std::ostringstream o;
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << " counter\n"
      << name << ' ' << v << '\n';
  };
  const ServerCounters s = counters();
  counter("myelin_broker_connections_accepted_total", "Client connections accepted.",
          s.connections_accepted);
  o << "# HELP myelin_broker_connections_active Authenticated clients connected.\n"
       "# TYPE myelin_broker_connections_active gauge\nmyelin_broker_connections_active "
    << s.connections_active << '\n';
  counter("myelin_broker_auth_failures_total", "Clients refused by authentication.",
          s.auth_failures);
  counter("myelin_broker_attach_refused_total",
          "Control connections refused at attach (also counted as auth failures).",
          s.attach_refused);
  counter("myelin_broker_version_refused_total",
          "Clients refused for want of a common protocol version.", s.version_refused);
  o << "# HELP myelin_broker_control_connections_active Sessions with a control connection.\n"
       "# TYPE myelin_broker_control_connections_active gauge\n"
       "myelin_broker_control_connections_active "
    << s.control_connections << '\n';
  counter("myelin_broker_acl_denied_total", "Operations refused by ACLs.", s.acl_denied);
  counter("myelin_broker_protocol_errors_total", "Connections closed for malformed frames.",
          s.protocol_errors);
  counter("myelin_broker_dead_clients_total", "Clients dropped after missing heartbeats.",
          s.dead_clients);
  counter("myelin_broker_rate_limited_total", "Publishes delayed by a rate limit.", s.rate_limited);
  counter("myelin_broker_credit_stalls_total", "Pump passes that found a client out of credits.",
          s.credit_stalls);
  counter("myelin_broker_frames_in_total", "Frames received.", s.frames_in);
  counter("myelin_broker_frames_out_total", "Frames queued to clients.", s.frames_out);
  counter("myelin_broker_bytes_in_total", "Bytes received from clients.", s.bytes_in);
  counter("myelin_broker_replies_dropped_total", "Replies lost to a full requester lane (retried).",
          owner_->broker_->replies_dropped());
  const auto stats = owner_->broker_->topic_stats();
  auto per_topic = [&](const char* name, const char* help, const char* type, auto field) {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
    for (const auto& [topic, st] : stats)
      o << name << "{topic=\"" << topic << "\"} " << field(st) << '\n';
  };
  per_topic("myelin_broker_topic_messages_total", "Messages published per topic.", "counter",
            [](const TopicStats& t) { return t.messages_in; });
  per_topic("myelin_broker_topic_bytes_total", "Payload bytes published per topic.", "counter",
            [](const TopicStats& t) { return t.bytes_in; });
  per_topic("myelin_broker_topic_deliveries_total", "Copies queued for subscribers per topic.",
            "counter", [](const TopicStats& t) { return t.deliveries; });
  per_topic("myelin_broker_topic_drops_total", "Messages evicted by drop_oldest per topic.",
            "counter", [](const TopicStats& t) { return t.drops; });
  per_topic("myelin_broker_topic_stalls_total", "Publishes held back by a full subscriber (block).",
            "counter", [](const TopicStats& t) { return t.stalls; });
  per_topic("myelin_broker_topic_dead_letters_total", "Requests moved to the dead-letter topic.",
            "counter", [](const TopicStats& t) { return t.dead_letters; });
  {
    std::lock_guard<std::mutex> lock(snap_mu_);
    o << "# HELP myelin_broker_queue_depth Messages queued for a client.\n# TYPE "
         "myelin_broker_queue_depth gauge\n";
    for (const auto& c : snap_)
      o << "myelin_broker_queue_depth{client=\"" << c.identity << "\",id=\"" << c.id << "\"} "
        << c.depth << '\n';
    o << "# HELP myelin_broker_credits Delivery credits a client has granted and not used.\n# TYPE "
         "myelin_broker_credits gauge\n";
    for (const auto& c : snap_)
      o << "myelin_broker_credits{client=\"" << c.identity << "\",id=\"" << c.id << "\"} "
        << c.credits << '\n';
  }
  o << "# HELP myelin_broker_publish_to_deliver_seconds Broker receipt to hand-off to the client's "
       "socket.\n"
       "# TYPE myelin_broker_publish_to_deliver_seconds histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < kLatencyBounds.size(); ++i) {
    cum += c_.buckets[i].load(std::memory_order_relaxed);
    o << "myelin_broker_publish_to_deliver_seconds_bucket{le=\"" << kLatencyBounds[i] << "\"} "
      << cum << '\n';
  }
  cum += c_.buckets[kLatencyBounds.size()].load(std::memory_order_relaxed);
  o << "myelin_broker_publish_to_deliver_seconds_bucket{le=\"+Inf\"} " << cum << '\n'
    << "myelin_broker_publish_to_deliver_seconds_sum "
    << static_cast<double>(c_.lat_sum_ns.load(std::memory_order_relaxed)) / 1e9 << '\n'
    << "myelin_broker_publish_to_deliver_seconds_count "
    << c_.lat_count.load(std::memory_order_relaxed) << '\n';
  return o.str();
}

Server::Server(ServerOptions o) {
  BrokerOptions bo = o.broker;
  bo.max_control_payload = o.chunk_bytes;  // control frames are never chunked (wire.hpp)
  broker_ = std::make_unique<Broker>(std::move(bo));
  if (o.enable_ps) ps_ = std::make_unique<ParameterServer>(o.ps);
  impl_ = std::make_unique<Impl>(this, std::move(o));
}

Server::~Server() {
  stop();
}

Result<std::unique_ptr<Server>> Server::create(ServerOptions options) {
  std::unique_ptr<Server> s(new Server(std::move(options)));
  Status st = s->impl_->init();
  if (!st.ok()) return std::move(st).with_context("starting the broker");
  s->port_ = s->impl_->port;
  s->metrics_port_ = s->impl_->metrics_port;
  return s;
}

Status Server::start() {
  return impl_->start();
}
Status Server::drain(Deadline d) {
  return impl_->drain(d);
}
void Server::stop() {
  if (impl_) impl_->stop();
}
ServerCounters Server::counters() const {
  return impl_->counters();
}
std::string Server::metrics_text() const {
  return impl_->metrics_text();
}
std::string Server::placement() const {
  return impl_->placement();
}

}  // namespace myelin::broker
