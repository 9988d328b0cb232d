// Client implementation: one I/O thread, one mutex for the connection state. Senders push into
// the OutQueue under the mutex and flush right away; the I/O thread flushes what the socket did
// not take, reads, dispatches and keeps heartbeats going. An open batch's window is a timerfd in
// the I/O thread's epoll set, set by whoever opens the batch: the I/O thread wakes for it only when
// the batch did not fill and go out before its window ended.
#include <myelin/broker/client.hpp>
#include <myelin/broker/server.hpp>

#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <myelin/broker/sequence.hpp>
#include <myelin/core/log.hpp>

#include "auth.hpp"
#include "option_range.hpp"
#include "wire.hpp"

namespace myelin::broker {
using internal::Fd;

namespace {
constexpr uint64_t kPsInitStep = UINT64_MAX;
constexpr size_t kDedupEntries = 4096;
// Bytes of bulk read at a time by a reader that also holds the control connection's role: a
// control message that arrives meanwhile waits for at most this much bulk to be decoded.
constexpr size_t kBulkBlockWithControl = 64 * 1024;

// The socket holds bytes nobody has read yet (a failed query counts as none).
bool has_unread_input(int fd) noexcept {
  int n = 0;
  return ::ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

std::span<const std::byte> float_bytes(std::span<const float> v) {
  return {reinterpret_cast<const std::byte*>(v.data()), v.size() * sizeof(float)};
}

// The message a deliver or request frame carries; `owner` keeps the payload bytes alive.
ReceivedMessage received_message(const FrameView& f, const std::shared_ptr<const void>& owner) {
  const FrameHeader& h = f.header;
  ReceivedMessage m;
  m.topic = std::string(f.topic);
  m.seq = h.seq;
  m.id = h.id;
  m.publish_ts_ns = h.timestamp_ns;
  m.control = h.flags & kFlagControl;
  m.owner = owner;
  m.payload = f.payload;
  return m;
}
}  // namespace

class Client::Impl {
 public:
  struct Waiter {
    bool done = false;
    Status status;
    uint64_t seq = 0;
    std::shared_ptr<const void> owner;
    std::span<const std::byte> payload;
  };
  struct Sub {
    uint64_t id;
    std::string pattern;
    MessageHandler handler;
    RequestHandler responder;
  };
  // The connections: kMain always; kCtrl once attached (protocol 2, control_connection on). Each
  // has its own queue, receive buffer and reader role, so control frames never wait behind bulk
  // bytes in a socket buffer, nor behind a thread busy reading bulk.
  static constexpr int kMain = 0, kCtrl = 1;
  static internal::OutOptions out_options(const ClientOptions& o) {
    return {.chunk_size = o.chunk_bytes,
            .batch_bytes = o.batch_bytes,
            .batch_window_ns = o.batch_window_us * 1000};
  }
  struct Conn {
    explicit Conn(const ClientOptions& o) : out(out_options(o)), rx(DecodeLimits{}) {}
    Fd fd;
    internal::OutQueue out;  // under mu_
    internal::RxBuffer rx;   // the reader only
    GapDetector gaps;        // the reader only (a topic is in one lane, so on one connection)
    // The reader role (under mu_): one thread at a time reads this socket and dispatches what
    // arrives, owning rx and gaps (and, on kMain, reasm_ and the read reports): the I/O thread,
    // or a thread in poll() that found the inbox empty and reads for itself (saving the I/O
    // thread's wake-up and its hand-off per message).
    bool reading = false;
    // What the I/O thread planned when it last went to sleep (under mu_): whether it watches the
    // socket for writing; send_locked() wakes it only if that is not soon enough.
    bool watches_out = false;
    bool armed_in = true, armed_out = false;  // the socket's events in the I/O thread's set
    // Messages handed to handlers whose delivery credits are not yet counted (the reader only):
    // counted under mu_ with the next delivery's state update, or at the end of the read.
    uint64_t handled = 0;
    int64_t last_tx_ns = 0;  // under mu_
    // Written by the reader, read by the I/O thread's heartbeat check: relaxed, a stale value
    // only delays that check by one pass.
    std::atomic<int64_t> last_rx_ns{0};
  };

  explicit Impl(ClientOptions o) : opt_(std::move(o)), conns_{Conn(opt_), Conn(opt_)} {}
  ~Impl() { shutdown(); }

  Status handshake();
  Status attach_control(const AuthOk& ok, Deadline d);
  Status start();
  void shutdown();
  void io_loop();
  Status dispatch(int k, const FrameView& f, const std::shared_ptr<const void>& owner);
  void fail(Status s);
  [[nodiscard]] int nconns() const noexcept { return has_ctrl_ ? 2 : 1; }

  // Sends one frame under mu_ (held by the caller): control-lane frames on the control
  // connection when there is one (unless `main_connection`), the rest on the main connection.
  // `now_ns`: the caller's reading of monotonic_ns() (negative: read here).
  Status send_locked(FrameHeader h, std::string_view topic, std::span<const std::byte> payload,
                     bool batchable, std::shared_ptr<const void> owner = nullptr,
                     bool main_connection = false, int64_t now_ns = -1) {
    if (!status_.ok()) return status_;
    Conn& c = conns_[has_ctrl_ && !main_connection && (h.flags & kFlagControl) ? kCtrl : kMain];
    auto r = c.out.push_and_flush(c.fd.get(), h, topic, payload, std::move(owner), batchable,
                                  now_ns >= 0 ? now_ns : monotonic_ns());
    if (!r.ok()) {
      // A message the queue refuses (invalid_argument) fails that call, not the connection.
      if (r.status().code() == StatusCode::kInvalidArgument) return r.status();
      fail(std::move(r).status());
      return status_;
    }
    // Wake the I/O thread only when it must act sooner than it planned to: bytes left for a
    // socket it does not watch for writing. Then no further wake-up until it has looked again (a
    // write to the eventfd per message costs a syscall and a context switch per message). A batch
    // this opened gets its window on the timer instead (no wake-up now; one at the window's end
    // only if the batch is still open then).
    if (!*r && !c.watches_out) {
      c.watches_out = true;
      io_wakes_at_ns_ = INT64_MIN;
      wake();
    }
    // Only a batch opened here moves the timer: one that closed full leaves it set for its
    // window (a stream's next batch moves it on; once the stream stops it fires once for nothing).
    const int64_t bd = c.out.next_batch_deadline();
    if (bd != INT64_MAX && bd != batch_timer_at_ns_) arm_batch_timer_locked();
    return ok_status();
  }
  // The earliest window end of the open batches (INT64_MAX: none). mu_ held.
  [[nodiscard]] int64_t next_batch_deadline_locked() const {
    int64_t d = INT64_MAX;
    for (int k = 0; k < nconns(); ++k) d = std::min(d, conns_[k].out.next_batch_deadline());
    return d;
  }
  // Sets the batch timer to the earliest open batch's window end, or disarms it when no batch is
  // open (mu_ held). A batch that fills goes out with the publish that filled it, and the publish
  // that opens the next one moves the timer on (one timerfd_settime() per batch): under a steady
  // stream the timer never fires, and the I/O thread sleeps through it. Should the timer refuse the
  // setting, the I/O thread keeps the window with its own epoll timeout (it compares
  // batch_timer_at_ns_).
  void arm_batch_timer_locked() {
    const int64_t d = next_batch_deadline_locked();
    if (d == batch_timer_at_ns_) return;
    itimerspec its{};
    if (d != INT64_MAX) {
      // A zero it_value would disarm: a window that already ended fires a nanosecond on.
      const int64_t at = std::max<int64_t>(d, 1);
      its.it_value =
          timespec{static_cast<time_t>(at / 1'000'000'000), static_cast<long>(at % 1'000'000'000)};
    }
    if (::timerfd_settime(batch_timer_.get(), TFD_TIMER_ABSTIME, &its, nullptr) == 0) {
      batch_timer_at_ns_ = d;
    } else {
      batch_timer_at_ns_ = INT64_MIN;  // unknown: the I/O thread keeps the window itself
      if (d != INT64_MAX && d < io_wakes_at_ns_) {
        io_wakes_at_ns_ = INT64_MIN;
        wake();
      }
    }
  }
  // Takes one publish credit, waiting until the deadline. mu_ held through `lock`: only holders
  // of mu_ take credits, so one that saw a credit keeps it; the reader adds them without mu_
  // (add_publish_credits()).
  Status take_credit(std::unique_lock<std::mutex>& lock, Deadline d) {
    if (pub_credits_.load(std::memory_order_relaxed) == 0) {
      stats_.publish_stalls++;
      // seq_cst, paired with add_publish_credits(): either the adder sees this waiter (and
      // notifies under mu_, which this thread holds until it waits) or this thread sees its
      // credits below.
      credit_waiters_.fetch_add(1, std::memory_order_seq_cst);
      Status s;
      while (pub_credits_.load(std::memory_order_seq_cst) == 0) {
        if (!status_.ok()) {
          s = status_;
          break;
        }
        if (d.expired()) {
          s = timeout_error(
              "no publish credit from the broker in time: it is holding back this "
              "producer (full subscriber under the block policy, or a rate limit)");
          break;
        }
        cv_.wait_for(lock,
                     std::chrono::nanoseconds(std::min<int64_t>(d.remaining_ns(), 100'000'000)));
      }
      credit_waiters_.fetch_sub(1, std::memory_order_relaxed);  // under mu_, as the increment
      MYELIN_RETURN_IF_ERROR(s);
    }
    if (!status_.ok()) return status_;
    pub_credits_.fetch_sub(1, std::memory_order_relaxed);  // a count; ordering nothing
    return ok_status();
  }
  // A credit grant from the broker, on the reader's thread, without mu_: a publisher holds mu_
  // through every publish (and its sendmsg), so taking it here for each grant made the I/O
  // thread sleep on the mutex and the publisher wake it, a futex call and two thread switches a
  // grant. mu_ is taken only when a publisher waits for credits.
  void add_publish_credits(uint64_t n) {
    pub_credits_.fetch_add(n, std::memory_order_seq_cst);  // see take_credit()
    if (credit_waiters_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }
  // Gives back a credit taken for a frame the send queue refused (mu_ held): that frame never
  // reaches the broker, so no grant will return it. A publisher waiting for credits is in
  // cv_.wait (it holds mu_ otherwise), so this notification reaches it.
  void give_back_credit_locked() {
    pub_credits_.fetch_add(1, std::memory_order_relaxed);  // waiters re-read it under mu_
    if (credit_waiters_.load(std::memory_order_relaxed) > 0) cv_.notify_all();  // under mu_
  }
  // Sends a heartbeat on every connection that has sent none for heartbeat_ms and records when the
  // next one falls due. mu_ held. Called by the I/O thread once a pass, and by a reader between
  // deliveries, so a long pass of slow handlers does not leave the session silent.
  void send_due_heartbeats_locked(int64_t now) {
    const int64_t period = opt_.heartbeat_ms * 1'000'000;
    int64_t due = INT64_MAX;
    for (int k = 0; k < nconns(); ++k) {
      Conn& c = conns_[k];
      if (now - c.last_tx_ns > period) {
        FrameHeader h;
        h.type = FrameType::kHeartbeat;
        h.flags = kFlagControl;
        (void)send_locked(h, {}, {}, false, nullptr, /*main_connection=*/k == kMain, now);
        c.last_tx_ns = now;
      }
      due = std::min(due, c.last_tx_ns + period);
    }
    heartbeat_due_ns_ = due;
  }
  // A reader's check between deliveries, with mu_ held: heartbeats that fell due while handlers
  // ran (a batch frame's messages are one read, and their handlers may take long). The clock is
  // read every fourth delivery, so a heartbeat is at most four handlers late.
  void heartbeat_between_deliveries_locked() {
    if ((++deliveries_ & 3) != 0) return;
    const int64_t now = monotonic_ns();
    if (now > heartbeat_due_ns_) send_due_heartbeats_locked(now);
  }
  // `n` messages were handed over: their delivery credits go back to the broker an eighth of the
  // window at a time. mu_ held.
  void consumed_locked(uint64_t n = 1) {
    credits_owed_ += n;
    if (credits_owed_ >= std::max<uint32_t>(1, opt_.receive_window / 8)) {
      FrameHeader h;
      h.type = FrameType::kCredit;
      h.flags = kFlagControl;
      h.id = credits_owed_;
      credits_owed_ = 0;
      (void)send_locked(h, {}, {}, false);
    }
  }
  Result<Waiter> wait_for(std::unique_lock<std::mutex>& lock, uint64_t id, Deadline d) {
    while (true) {
      auto it = waiters_.find(id);
      if (it != waiters_.end() && it->second.done) {
        Waiter w = std::move(it->second);
        waiters_.erase(it);
        return w;
      }
      if (!status_.ok()) {
        waiters_.erase(id);
        return status_;
      }
      if (d.expired()) {
        waiters_.erase(id);
        return timeout_error("no answer from the broker for operation ", id);
      }
      cv_.wait_for(lock,
                   std::chrono::nanoseconds(std::min<int64_t>(d.remaining_ns(), 100'000'000)));
    }
  }
  // Puts the sockets' events in the I/O thread's epoll set in line with the state (mu_ held).
  void set_interest_locked(int64_t now) {
    const bool polled =
        poll_readers_ == 0 && now - poll_read_end_ns_ >= opt_.poll_read_grace_us * 1000;
    const bool control_only = poll_control_only();
    for (int k = 0; k < nconns(); ++k) {
      Conn& c = conns_[k];
      // The bulk connection of a client whose poll() callers read only control is always this
      // thread's to read.
      const bool in = polled || (control_only && k == kMain);
      const bool out = c.watches_out;
      if (in == c.armed_in && out == c.armed_out) continue;
      epoll_event ev{};
      ev.events =
          (in ? static_cast<uint32_t>(EPOLLIN) : 0u) | (out ? static_cast<uint32_t>(EPOLLOUT) : 0u);
      ev.data.u64 = tag_of(k);
      if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd.get(), &ev) == 0) {
        c.armed_in = in;
        c.armed_out = out;
      }
    }
  }
  // epoll tags: the connections 1 and 3, the wake-up eventfd 2, the batch timer 4.
  static uint64_t tag_of(int k) { return k == kMain ? 1 : 3; }
  static constexpr uint64_t kWakeTag = 2, kTimerTag = 4;
  // Connection k's reader role held: reads (while `readable`, at most `rounds` reads of at most
  // `max_bytes`) and dispatches every complete frame, including those already buffered. Adds the
  // frames dispatched to *frames.
  Status read_socket(int k, bool readable, int rounds, size_t max_bytes, int* frames);
  // Whether a poll() caller can read for itself now (some reader role free). mu_ held.
  [[nodiscard]] bool can_read_for_poll() const {
    if (poll_control_only()) return !conns_[kCtrl].reading;
    return !conns_[kMain].reading || (has_ctrl_ && !conns_[kCtrl].reading);
  }
  // poll() with an empty inbox and a reader role free: takes the free roles, dispatches what
  // their buffers hold, and if that was nothing waits for the sockets until `d` (at most 20 ms,
  // so a failure the I/O thread found is seen) and reads: the control socket first, then one
  // bounded block of the main one. mu_ held through `lock` on entry and return, released
  // meanwhile.
  void read_for_poll(std::unique_lock<std::mutex>& lock, Deadline d);
  template <typename Fn>
  void edit_subs_locked(Fn&& fn) {
    auto next = std::make_shared<std::vector<Sub>>(*subs_);
    fn(*next);
    subs_ = std::move(next);
  }
  uint64_t new_id_locked() { return (client_id_ << 40) | (++counter_ & ((1ull << 40) - 1)); }
  void wake() {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
  }

  ClientOptions opt_;
  Fd wake_fd_, epoll_;
  // Written when the I/O thread queues a bulk-connection message for poll() while a caller
  // waits in read_for_poll() on the control connection alone (poll_control_only()): that caller
  // waits on this too, not only on the condition variable it is not in.
  Fd poll_wake_;
  // CLOCK_MONOTONIC timerfd in the I/O thread's epoll set: the end of the earliest open batch's
  // window. batch_timer_at_ns_ (under mu_) is what it is set to: INT64_MAX disarmed (or fired and
  // read), INT64_MIN unknown (a setting failed; the I/O thread then keeps the window itself).
  Fd batch_timer_;
  int64_t batch_timer_at_ns_ = INT64_MAX;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Conn conns_[2];
  bool has_ctrl_ = false;  // set by the handshake, before any other thread exists
  uint32_t version_ = 1;   // protocol version agreed with the broker
  // Read reports (see ServerOptions::bulk_inflight_bytes): every rx_ack_every_ bytes read from
  // the main connection (set by the handshake; 0: none), its reader sends a credit frame with
  // the bytes in seq.
  uint64_t rx_ack_every_ = 0;
  uint64_t rx_unacked_ = 0;  // the main connection's reader only
  Reassembler reasm_;        // the main connection's reader only (bulk is chunked, never control)
  // Handlers run one at a time although each connection has its own reader: held around every
  // handler call (recursive: a handler may publish, request or poll, and reach another).
  std::recursive_mutex handler_mu_;
  Status status_;
  uint64_t client_id_ = 0, counter_ = 0;
  uint64_t credits_owed_ = 0;
  // Publish credits left: taken under mu_ (take_credit()), added by a reader without it
  // (add_publish_credits()); credit_waiters_ counts the publishers waiting for them (changed under
  // mu_, read by the adder without it).
  std::atomic<uint64_t> pub_credits_{0};
  std::atomic<int> credit_waiters_{0};
  // When the I/O thread's epoll wait ends (under mu_); see send_locked().
  int64_t io_wakes_at_ns_ = INT64_MIN;
  // When the next heartbeat falls due on some connection, and deliveries counted for the
  // readers' heartbeat check (both under mu_).
  int64_t heartbeat_due_ns_ = INT64_MAX;
  uint64_t deliveries_ = 0;
  // While poll() callers read, and for poll_read_grace_us after the last one, the I/O thread
  // does not watch the sockets for input (it would only wake to find the roles taken).
  int poll_readers_ = 0;
  // With a control connection while this process keeps control CPUs (control_cpus.hpp): poll()
  // callers, control threads, leave the bulk connection to the I/O thread, which then always
  // watches and reads it. Asked each time: a reservation may come after this client connected.
  [[nodiscard]] bool poll_control_only() const noexcept {
    return has_ctrl_ && control_cpus_reserved();
  }
  int64_t poll_read_end_ns_ = INT64_MIN / 2;
  bool draining_ = false;
  // Copy-on-write (under mu_): a delivery takes a reference to the current list and runs its
  // handlers without copying them; (un)subscribing installs a new list.
  std::shared_ptr<const std::vector<Sub>> subs_ = std::make_shared<const std::vector<Sub>>();
  std::unordered_map<uint64_t, Waiter> waiters_;
  std::deque<ReceivedMessage> inbox_;
  std::unordered_map<uint64_t, std::vector<std::byte>> replies_;  // responder de-dup cache
  std::deque<uint64_t> replies_fifo_;
  std::unordered_set<uint64_t> in_flight_;
  ClientStats stats_;
  std::atomic<bool> stop_{false};  // pairs with the I/O thread's acquire load
  std::thread thread_;
};

void Client::Impl::fail(Status s) {
  if (status_.ok()) {
    status_ = std::move(s);
    MYELIN_LOG_INFO << "broker connection lost: " << status_;
  }
  cv_.notify_all();
}

namespace {
// Reads the next frame of a handshake from `fd` into `rx` until `d`.
Status read_handshake_frame(int fd, internal::RxBuffer& rx, Deadline d, const std::string& where,
                            FrameView* f) {
  while (true) {
    MYELIN_ASSIGN_OR_RETURN(bool got, rx.next(f));
    if (got) return ok_status();
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, d.remaining_ms_for_poll()) == 0)
      return timeout_error("handshake with ", where);
    MYELIN_ASSIGN_OR_RETURN(size_t n, rx.read_from(fd));
    (void)n;
  }
}

// An error frame's status (code checked), as the handshake reports it.
Status error_frame_status(const FrameView& f) {
  return Status(f.header.seq >= 1 && f.header.seq <= static_cast<uint64_t>(StatusCode::kInternal)
                    ? static_cast<StatusCode>(f.header.seq)
                    : StatusCode::kPermissionDenied,
                std::string(reinterpret_cast<const char*>(f.payload.data()), f.payload.size()));
}
}  // namespace

Status Client::Impl::handshake() {
  MYELIN_ASSIGN_OR_RETURN(auto hp, internal::parse_host_port(opt_.address));
  if (!valid_identity(opt_.identity))
    return invalid_argument("bad client identity '", opt_.identity, "'");
  const Deadline d = Deadline::after_ms(opt_.connect_timeout_ms);
  Conn& m = conns_[kMain];
  MYELIN_ASSIGN_OR_RETURN(m.fd, internal::connect_tcp(hp, d, opt_.socket_buffer_bytes));
  FrameView f;
  MYELIN_RETURN_IF_ERROR(read_handshake_frame(m.fd.get(), m.rx, d, opt_.address, &f));
  MYELIN_ASSIGN_OR_RETURN(auto server_nonce, parse_hello(f));
  MYELIN_ASSIGN_OR_RETURN(VersionRange theirs, decode_versions(f.header.seq));
  MYELIN_ASSIGN_OR_RETURN(
      version_, negotiate_version(VersionRange{}, theirs, "the broker at " + opt_.address));
  MYELIN_ASSIGN_OR_RETURN(auto client_nonce, internal::random_nonce());
  const auto mac = internal::client_mac(opt_.secret, server_nonce, client_nonce, opt_.identity);
  std::vector<std::byte> payload(client_nonce.begin(), client_nonce.end());
  payload.insert(payload.end(), mac.begin(), mac.end());
  FrameHeader h;
  h.type = FrameType::kAuth;
  h.flags = kFlagControl;
  h.seq = encode_versions(VersionRange{});
  MYELIN_RETURN_IF_ERROR(m.out.push(h, opt_.identity, payload, nullptr, false, monotonic_ns()));
  MYELIN_ASSIGN_OR_RETURN(bool flushed, m.out.flush(m.fd.get()));
  if (!flushed) return unavailable("could not send the handshake");
  MYELIN_RETURN_IF_ERROR(read_handshake_frame(m.fd.get(), m.rx, d, opt_.address, &f));
  if (f.header.type == FrameType::kError) return error_frame_status(f);
  MYELIN_ASSIGN_OR_RETURN(AuthOk ok, parse_auth_ok(f));
  if (version_ >= 2 && !ok.has_token) {
    return protocol_error("the broker at ", opt_.address, " speaks protocol ", version_,
                          " but sent no session token");
  }
  // Protocol 3: the proof covers the session token and id as well, so neither can be swapped on
  // the way (auth.hpp); 1 and 2 leave them out.
  const bool bound = version_ >= 3;
  if (!internal::mac_equal(
          ok.proof, internal::server_proof(opt_.secret, server_nonce, client_nonce, opt_.identity,
                                           bound ? &ok.token : nullptr, bound ? f.header.id : 0))) {
    return permission_denied("the broker at ", opt_.address,
                             " did not prove its answer: it does not know the job secret, or "
                             "the answer was altered on the way");
  }
  client_id_ = f.header.id;
  pub_credits_.store(f.header.seq, std::memory_order_relaxed);  // no other thread yet
  if (f.header.timestamp_ns > (1ull << 30))
    return protocol_error("auth_ok asks for a read report every ", f.header.timestamp_ns, " bytes");
  rx_ack_every_ = f.header.timestamp_ns;
  rx_unacked_ = m.rx.buffered();  // the broker counts from auth_ok on
  FrameHeader c;
  c.type = FrameType::kCredit;
  c.flags = kFlagControl;
  c.id = opt_.receive_window;
  MYELIN_RETURN_IF_ERROR(m.out.push(c, {}, {}, nullptr, false, monotonic_ns()));
  MYELIN_ASSIGN_OR_RETURN(flushed, m.out.flush(m.fd.get()));
  if (version_ >= 2 && opt_.control_connection) {
    Status s = attach_control(ok, d);
    if (!s.ok()) {
      // The session is authenticated on the main connection: it carries the control lane as
      // well (behind bulk bytes in the socket buffers). Should the broker have bound the control
      // connection before the failure, closing it hands the lane back there too, with whatever
      // was queued on it.
      MYELIN_LOG_WARN << "broker " << opt_.address << ": no control connection (" << s
                      << "); the control lane shares the main connection";
      Conn& ctrl = conns_[kCtrl];
      ctrl.fd.reset();
      ctrl.rx = internal::RxBuffer(DecodeLimits{});
      ctrl.out = internal::OutQueue(out_options(opt_));
      has_ctrl_ = false;
    }
  }
  // The broker uses read reports only for a session without a control connection (they bound
  // bulk ahead of control frames on one connection); with one they would be a frame on the
  // control connection every quarter window of bulk.
  if (has_ctrl_) rx_ack_every_ = 0;
  const int64_t now = monotonic_ns();
  for (Conn& k : conns_) {
    k.last_tx_ns = now;
    k.last_rx_ns.store(now, std::memory_order_relaxed);
  }
  heartbeat_due_ns_ = now + opt_.heartbeat_ms * 1'000'000;
  // Frames that arrived right behind auth_ok stay in the receive buffers; the first reader of
  // each connection dispatches them before it waits for the socket.
  return ok_status();
}

Status Client::Impl::attach_control(const AuthOk& ok, Deadline d) {
  MYELIN_ASSIGN_OR_RETURN(auto hp, internal::parse_host_port(opt_.address));
  Conn& c = conns_[kCtrl];
  MYELIN_ASSIGN_OR_RETURN(c.fd, internal::connect_tcp(hp, d, opt_.socket_buffer_bytes));
  FrameView f;
  MYELIN_RETURN_IF_ERROR(read_handshake_frame(c.fd.get(), c.rx, d, opt_.address, &f));
  MYELIN_ASSIGN_OR_RETURN(auto server_nonce, parse_hello(f));
  MYELIN_ASSIGN_OR_RETURN(auto client_nonce, internal::random_nonce());
  const auto mac = internal::attach_mac(opt_.secret, server_nonce, client_nonce, ok.token,
                                        client_id_, opt_.identity);
  std::vector<std::byte> payload(client_nonce.begin(), client_nonce.end());
  payload.insert(payload.end(), mac.begin(), mac.end());
  FrameHeader h;
  h.type = FrameType::kAttach;
  h.flags = kFlagControl;
  h.id = client_id_;
  h.seq = encode_versions(VersionRange{});
  MYELIN_RETURN_IF_ERROR(c.out.push(h, opt_.identity, payload, nullptr, false, monotonic_ns()));
  MYELIN_ASSIGN_OR_RETURN(bool flushed, c.out.flush(c.fd.get()));
  if (!flushed) return unavailable("could not send the attach");
  MYELIN_RETURN_IF_ERROR(read_handshake_frame(c.fd.get(), c.rx, d, opt_.address, &f));
  if (f.header.type == FrameType::kError) return error_frame_status(f);
  MYELIN_ASSIGN_OR_RETURN(AuthOk proof, parse_auth_ok(f));
  if (proof.has_token || f.header.id != client_id_ ||
      !internal::mac_equal(proof.proof,
                           internal::attach_proof(opt_.secret, server_nonce, client_nonce, ok.token,
                                                  client_id_, opt_.identity))) {
    return permission_denied("the broker at ", opt_.address,
                             " did not prove the control connection's session");
  }
  has_ctrl_ = true;
  return ok_status();
}

Status Client::Impl::start() {
  wake_fd_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  poll_wake_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!poll_wake_.valid()) return errno_status("eventfd", errno);
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  batch_timer_ = Fd(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!wake_fd_.valid() || !epoll_.valid() || !batch_timer_.valid())
    return errno_status("eventfd/epoll/timerfd", errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  for (int k = 0; k < nconns(); ++k) {
    ev.data.u64 = tag_of(k);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, conns_[k].fd.get(), &ev) != 0)
      return errno_status("epoll_ctl", errno);
  }
  ev.data.u64 = kWakeTag;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &ev) != 0)
    return errno_status("epoll_ctl", errno);
  ev.data.u64 = kTimerTag;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, batch_timer_.get(), &ev) != 0)
    return errno_status("epoll_ctl", errno);
  thread_ = std::thread([this] { io_loop(); });
  // Named for top, perf and the scheduler's traces (at most 15 characters); here rather than in
  // the thread, so the name is there once connect() returns.
  ::pthread_setname_np(thread_.native_handle(), "myelin-cli-io");
  return ok_status();
}

void Client::Impl::shutdown() {
  stop_.store(true, std::memory_order_release);  // pairs with io_loop's acquire load
  if (thread_.joinable()) {
    wake();
    thread_.join();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (status_.ok()) {
    // Everything queued goes out, waiting for the sockets to take it up to close_flush_ms: a
    // burst published just before closing is not dropped.
    const Deadline d = Deadline::after_ms(std::max<int64_t>(0, opt_.close_flush_ms));
    for (int k = 0; k < nconns(); ++k) conns_[k].out.close_due_batches(0, true);
    size_t unsent = 0;
    bool failed_conn[2] = {false, false};
    for (;;) {
      pollfd fds[2];
      nfds_t n = 0;
      unsent = 0;
      for (int k = 0; k < nconns(); ++k) {
        if (failed_conn[k]) continue;
        auto flushed = conns_[k].out.flush(conns_[k].fd.get());
        if (!flushed.ok()) {  // the connection failed: nothing more goes out on it
          failed_conn[k] = true;
          Status failed = std::move(flushed).status();
          failed.with_context("broker " + opt_.address);
          MYELIN_LOG_WARN << "client '" << opt_.identity << "' closing: " << failed << " ("
                          << conns_[k].out.backlog_bytes() << " bytes unsent)";
          continue;
        }
        if (*flushed) continue;
        unsent += conns_[k].out.backlog_bytes();
        fds[n++] = pollfd{.fd = conns_[k].fd.get(), .events = POLLOUT, .revents = 0};
      }
      if (n == 0 || d.expired()) break;
      (void)::poll(fds, n, std::max(1, d.remaining_ms_for_poll()));
    }
    if (unsent > 0) {
      MYELIN_LOG_WARN << "client '" << opt_.identity << "' closed with " << unsent
                      << " bytes for the broker at " << opt_.address << " unsent after "
                      << opt_.close_flush_ms << " ms (close_flush_ms): they are dropped";
    }
    fail(cancelled("client closed"));
  }
}

Status Client::Impl::read_socket(int k, bool readable, int rounds, size_t max_bytes, int* frames) {
  Conn& c = conns_[k];
  const std::string_view which = k == kMain ? "" : " (control connection)";
  for (int round = 0; round < rounds; ++round) {
    if (readable) {
      auto got = c.rx.read_from(c.fd.get(), max_bytes);
      if (!got.ok()) {
        return std::move(got).status().with_context("broker " + opt_.address + std::string(which));
      }
      if (*got > 0) c.last_rx_ns.store(monotonic_ns(), std::memory_order_relaxed);
      if (k == kMain) rx_unacked_ += *got;
      if (k == kMain && rx_ack_every_ > 0 && rx_unacked_ >= rx_ack_every_) {
        // Tell the broker these bytes left the kernel, so it may send more bulk.
        FrameHeader h;
        h.type = FrameType::kCredit;
        h.flags = kFlagControl;
        h.seq = rx_unacked_;
        rx_unacked_ = 0;
        std::lock_guard<std::mutex> lock(mu_);
        MYELIN_RETURN_IF_ERROR(send_locked(h, {}, {}, false));
      }
      // A short read emptied the socket: skip the read that would only say EAGAIN.
      if (*got == 0 || c.rx.drained()) readable = false;
    }
    while (true) {
      FrameView f;
      auto r = c.rx.next(&f);
      Status s = r.ok() ? ok_status() : r.status();
      if (s.ok() && !*r) break;
      if (s.ok() && k == kCtrl && (f.header.flags & (kFlagMore | kFlagContinuation)))
        s = protocol_error("a chunked frame on the control connection");
      if (s.ok()) s = dispatch(k, f, c.rx.owner());
      if (!s.ok())
        return std::move(s).with_context("from broker " + opt_.address + std::string(which));
      ++*frames;
    }
    if (c.handled > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      consumed_locked(std::exchange(c.handled, 0));
    }
    if (!readable) break;
  }
  return ok_status();
}

void Client::Impl::read_for_poll(std::unique_lock<std::mutex>& lock, Deadline d) {
  bool mine[2] = {false, false};
  const bool control_only = poll_control_only();
  for (int k = 0; k < nconns(); ++k) {
    mine[k] = !conns_[k].reading && !(control_only && k == kMain);
    conns_[k].reading = conns_[k].reading || mine[k];
  }
  poll_readers_++;
  set_interest_locked(monotonic_ns());
  lock.unlock();
  // With a control connection in hand, bulk is read a bounded block at a time, so a control
  // message that arrives meanwhile waits for at most that block.
  const size_t main_block = mine[kCtrl] ? kBulkBlockWithControl : SIZE_MAX;
  Status s;
  int frames = 0;
  for (int k = kCtrl; k >= kMain && s.ok(); --k) {
    if (mine[k]) s = read_socket(k, false, 1, SIZE_MAX, &frames);
  }
  if (s.ok() && frames == 0) {
    const int64_t slice =
        d.is_never() ? 20'000'000 : std::clamp<int64_t>(d.remaining_ns(), 0, 20'000'000);
    timespec ts{static_cast<time_t>(slice / 1'000'000'000),
                static_cast<long>(slice % 1'000'000'000)};
    pollfd p[3];
    int np = 0, which[3];
    for (int k = kCtrl; k >= kMain; --k) {
      if (!mine[k]) continue;
      which[np] = k;
      p[np++] = pollfd{conns_[k].fd.get(), POLLIN, 0};
    }
    if (control_only) {
      // The bulk connection is the I/O thread's: what it queues for poll() arrives here.
      which[np] = -1;
      p[np++] = pollfd{poll_wake_.get(), POLLIN, 0};
    }
    int n = 0;
    // A caller under a real-time policy does not spin: its wake-up runs it at once, and its
    // yields would let no fair-class thread (bulk, this client's I/O thread) run meanwhile.
    if (opt_.spin_before_block_us > 0 && slice > 0 && !this_thread_is_realtime()) {
      const timespec zero{0, 0};
      const int64_t now = monotonic_ns();
      n = internal::spin_until([&] { return ::ppoll(p, static_cast<nfds_t>(np), &zero, nullptr); },
                               now + std::min<int64_t>(opt_.spin_before_block_us * 1000, slice));
      if (n == 0) {
        // The rest of the slice, asleep.
        const int64_t left = std::max<int64_t>(0, now + slice - monotonic_ns());
        ts = timespec{static_cast<time_t>(left / 1'000'000'000),
                      static_cast<long>(left % 1'000'000'000)};
      }
    }
    if (n == 0) n = ::ppoll(p, static_cast<nfds_t>(np), &ts, nullptr);
    if (n > 0) {
      for (int i = 0; i < np && s.ok(); ++i) {
        if (p[i].revents == 0) continue;
        const int k = which[i];
        if (k < 0) {
          uint64_t v;
          [[maybe_unused]] ssize_t r = ::read(poll_wake_.get(), &v, sizeof(v));
          continue;  // the inbox has something: poll() takes it
        }
        s = read_socket(k, true, 1, k == kMain ? main_block : SIZE_MAX, &frames);
      }
    } else if (n < 0 && errno != EINTR) {
      s = errno_status("ppoll on the broker connection", errno);
    }
  }
  lock.lock();
  for (int k = 0; k < 2; ++k) {
    if (mine[k]) conns_[k].reading = false;
  }
  poll_readers_--;
  poll_read_end_ns_ = monotonic_ns();
  // The I/O thread may sleep on a timeout it chose while it still watched the sockets (up to
  // 50 ms): wake it so that it watches again when the grace ends, not at that timeout.
  // One eventfd write until it has looked again (as in send_locked()).
  if (io_wakes_at_ns_ > poll_read_end_ns_ + opt_.poll_read_grace_us * 1000) {
    io_wakes_at_ns_ = INT64_MIN;
    wake();
  }
  if (!s.ok()) fail(std::move(s));
  cv_.notify_all();  // other poll() callers may take the roles now
}

void Client::Impl::io_loop() {
  mark_this_thread_bulk();
  if (opt_.io_thread_nice > 0) {
    // Per thread on Linux: PRIO_PROCESS with a thread id.
    const id_t tid = static_cast<id_t>(::gettid());
    errno = 0;
    const int now = ::getpriority(PRIO_PROCESS, tid);
    if (errno != 0 ||
        ::setpriority(PRIO_PROCESS, tid, std::min(19, now + opt_.io_thread_nice)) != 0) {
      MYELIN_LOG_WARN << "cannot lower the broker client's I/O thread priority: "
                      << errno_status("setpriority", errno);
    }
  }
  if (opt_.io_thread_scheduling != BulkScheduling::kNormal) {
    Status s = apply_bulk_scheduling_to_this_thread(opt_.io_thread_scheduling);
    if (!s.ok()) MYELIN_LOG_WARN << "the broker client's I/O thread keeps its scheduling: " << s;
  }
  bool first[2] = {true, true};  // frames may already sit in the buffers from the handshake
  // mu_ is taken once a pass when nothing was read, twice when something was: the publishing
  // thread holds it through every publish, so each extra taking is a chance to sleep on it (a
  // futex call and two thread switches when that happens).
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_.load(std::memory_order_acquire)) {
    if (!status_.ok()) return;
    int64_t timeout_ns = std::min<int64_t>(opt_.heartbeat_ms / 2, 50) * 1'000'000;
    {
      const int64_t now = monotonic_ns();
      for (int k = 0; k < nconns(); ++k) conns_[k].watches_out = conns_[k].out.has_unsent();
      // Open batches' windows are on the timer; only if it could not be set does this wait end
      // at the earliest of them.
      arm_batch_timer_locked();
      const int64_t bd = next_batch_deadline_locked();
      if (bd != INT64_MAX && batch_timer_at_ns_ != bd)
        timeout_ns = std::min<int64_t>(timeout_ns, std::max<int64_t>(0, bd - now));
      set_interest_locked(now);
      // Not watching for input (poll() callers read): look again when their grace ends.
      if (!conns_[kMain].armed_in || (has_ctrl_ && !conns_[kCtrl].armed_in)) {
        timeout_ns = std::min<int64_t>(timeout_ns,
                                       std::max<int64_t>(opt_.poll_read_grace_us * 1000, 100'000));
      }
      io_wakes_at_ns_ = now + timeout_ns;
    }
    lock.unlock();
    keep_bulk_off_control_cpus();  // a bulk thread (control_cpus.hpp); outside mu_
    epoll_event evs[4];
    const int n = internal::epoll_wait_ns(epoll_.get(), evs, 4, timeout_ns);
    bool readable[2] = {false, false};
    bool timer_fired = false;
    for (int i = 0; i < n; ++i) {
      if (evs[i].data.u64 == kWakeTag) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = ::read(wake_fd_.get(), &v, sizeof(v));
      } else if (evs[i].data.u64 == kTimerTag) {
        // Nothing to read (EAGAIN) when a sender set the timer anew since it fired: it is then
        // armed for that sender's batch and stays so.
        uint64_t v;
        timer_fired = ::read(batch_timer_.get(), &v, sizeof(v)) == sizeof(v);
      } else if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        readable[evs[i].data.u64 == tag_of(kCtrl) ? kCtrl : kMain] = true;
      }
    }
    lock.lock();
    // A timer that fired is disarmed; whatever it was set to (this read and a sender's new setting
    // may have crossed), the next pass sets it from the batches then open.
    if (timer_fired) batch_timer_at_ns_ = INT64_MAX;
    bool mine[2] = {false, false};
    const bool control_only = poll_control_only();
    for (int k = 0; k < nconns(); ++k) {
      mine[k] = (readable[k] || first[k]) && !conns_[k].reading &&
                (poll_readers_ == 0 || (control_only && k == kMain));
      if (mine[k]) conns_[k].reading = true;
    }
    if (mine[kMain] || mine[kCtrl]) {
      lock.unlock();
      Status s;
      int frames = 0;
      if (mine[kCtrl]) {
        first[kCtrl] = false;
        s = read_socket(kCtrl, readable[kCtrl], 4, SIZE_MAX, &frames);
      }
      if (mine[kMain]) {
        first[kMain] = false;
        // With the control role in hand too, bulk goes a bounded block at a time and the control
        // socket is looked at between blocks (a read that mostly finds it empty).
        const size_t block = mine[kCtrl] ? kBulkBlockWithControl : SIZE_MAX;
        const int rounds = mine[kCtrl] ? 64 : 16;
        bool more = readable[kMain];
        for (int r = 0; r < rounds && s.ok(); ++r) {
          s = read_socket(kMain, more, 1, block, &frames);
          more = more && !conns_[kMain].rx.drained();
          if (s.ok() && mine[kCtrl]) s = read_socket(kCtrl, true, 1, SIZE_MAX, &frames);
          if (!more) break;
        }
      }
      lock.lock();
      for (int k = 0; k < 2; ++k) {
        if (mine[k]) conns_[k].reading = false;
      }
      if (!s.ok()) {
        fail(std::move(s));
        return;
      }
      cv_.notify_all();  // a poll() caller may wait for a role
    }
    if (!status_.ok()) return;
    const int64_t now = monotonic_ns();
    send_due_heartbeats_locked(now);
    for (int k = 0; k < nconns(); ++k) {
      Conn& c = conns_[k];
      // Silence is a socket with nothing to read: after a long pass of handlers the broker's
      // heartbeats wait in it, unread only because this thread was busy.
      if (now - c.last_rx_ns.load(std::memory_order_relaxed) > 3 * opt_.heartbeat_ms * 1'000'000 &&
          !has_unread_input(c.fd.get())) {
        fail(peer_failed("broker ", opt_.address, k == kCtrl ? " (control connection)" : "",
                         " silent for ", 3 * opt_.heartbeat_ms, " ms"));
        return;
      }
      if (timer_fired && c.out.next_batch_deadline() <= now) stats_.timer_flushes++;
      c.out.close_due_batches(now);
      auto fl = c.out.flush(c.fd.get());
      if (!fl.ok()) {
        fail(std::move(fl).status());
        return;
      }
    }
  }
}

Status Client::Impl::dispatch(int k, const FrameView& f, const std::shared_ptr<const void>& owner) {
  const FrameHeader& h = f.header;
  if (h.flags & (kFlagMore | kFlagContinuation)) {
    AssembledMessage m;
    MYELIN_ASSIGN_OR_RETURN(bool done, reasm_.add(f, &m));
    if (!done) return ok_status();
    FrameView whole;
    whole.header = m.header;
    whole.topic = m.topic;
    whole.payload = std::span<const std::byte>(m.payload->data(), m.payload->size());
    return dispatch(k, whole, m.payload);
  }
  // Control traffic for the reservation (control_cpus.hpp): messages from others. Replies are
  // not: those to this client's requests were counted when it sent them, and the broker's
  // acknowledgements of subscriptions are set-up, not traffic.
  if ((h.flags & kFlagControl) && (h.type == FrameType::kDeliver || h.type == FrameType::kRequest))
    note_control_traffic();
  switch (h.type) {
    case FrameType::kBatch:
      return for_each_in_batch(f.payload, DecodeLimits{},
                               [&](const FrameView& in) { return dispatch(k, in, owner); });
    case FrameType::kHeartbeat:
      return ok_status();
    case FrameType::kGoAway: {
      std::lock_guard<std::mutex> lock(mu_);
      draining_ = true;
      cv_.notify_all();
      return ok_status();
    }
    case FrameType::kCredit:
      add_publish_credits(h.id);
      return ok_status();
    case FrameType::kReply:
    case FrameType::kError:
    case FrameType::kPsReply: {
      std::lock_guard<std::mutex> lock(mu_);
      if (h.type != FrameType::kPsReply) consumed_locked();
      auto it = waiters_.find(h.id);
      if (it == waiters_.end()) {
        if (h.type == FrameType::kError) {
          const std::string text(reinterpret_cast<const char*>(f.payload.data()), f.payload.size());
          if (h.id == 0) {
            fail(Status(h.seq >= 1 && h.seq <= static_cast<uint64_t>(StatusCode::kInternal)
                            ? static_cast<StatusCode>(h.seq)
                            : StatusCode::kProtocolError,
                        text));
          } else {
            MYELIN_LOG_WARN << "broker refused operation " << h.id << ": " << text;
          }
        }
        return ok_status();  // late or duplicate answer
      }
      Waiter& w = it->second;
      w.done = true;
      w.seq = h.seq;
      if (h.type == FrameType::kError) {
        const auto code = h.seq >= 1 && h.seq <= static_cast<uint64_t>(StatusCode::kInternal)
                              ? static_cast<StatusCode>(h.seq)
                              : StatusCode::kInternal;
        w.status = Status(
            code, std::string(reinterpret_cast<const char*>(f.payload.data()), f.payload.size()));
      }
      w.owner = owner;
      w.payload = f.payload;
      cv_.notify_all();
      return ok_status();
    }
    case FrameType::kDeliver: {
      ReceivedMessage m = received_message(f, owner);
      const SeqEvent ev = conns_[k].gaps.observe(m.topic, m.seq);
      m.missed_before = ev.missed;
      std::shared_ptr<const std::vector<Sub>> subs;
      bool to_inbox = false, to_handler = false, wake_poller = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (conns_[k].handled > 0) consumed_locked(std::exchange(conns_[k].handled, 0));
        heartbeat_between_deliveries_locked();
        stats_.gaps_missed += ev.missed;
        stats_.received++;
        subs = subs_;
        for (const Sub& s : *subs) {
          if (s.responder || !topic_matches(s.pattern, m.topic)) continue;
          if (s.handler)
            to_handler = true;
          else
            to_inbox = true;
        }
        if (to_inbox) {
          inbox_.push_back(m);
          cv_.notify_all();
          wake_poller = k == kMain && poll_readers_ > 0 && poll_control_only();
        }
      }
      if (wake_poller) {
        const uint64_t one = 1;
        [[maybe_unused]] ssize_t r = ::write(poll_wake_.get(), &one, sizeof(one));
      }
      if (to_handler) {
        std::lock_guard<std::recursive_mutex> one_at_a_time(handler_mu_);
        for (const Sub& s : *subs) {
          if (s.handler && !s.responder && topic_matches(s.pattern, m.topic)) s.handler(m);
        }
      }
      // poll() credits inbox messages when it hands them out; these are counted with the next
      // delivery's update or at the end of this read (read_socket()), one taking of mu_ less.
      if (!to_inbox) ++conns_[k].handled;
      return ok_status();
    }
    case FrameType::kRequest: {
      ReceivedMessage m = received_message(f, owner);
      RequestHandler fn;
      {
        std::lock_guard<std::mutex> lock(mu_);
        consumed_locked();
        heartbeat_between_deliveries_locked();
        auto cached = replies_.find(h.id);
        if (cached != replies_.end()) {
          stats_.duplicate_requests++;
          FrameHeader r;
          r.type = FrameType::kReply;
          r.flags = h.flags & kFlagControl;
          r.id = h.id;
          return send_locked(r, {}, cached->second, false);
        }
        if (in_flight_.count(h.id)) {
          stats_.duplicate_requests++;
          return ok_status();
        }
        for (const Sub& s : *subs_) {
          if (s.responder && topic_matches(s.pattern, m.topic)) {
            fn = s.responder;
            break;
          }
        }
        if (!fn) return ok_status();
        in_flight_.insert(h.id);
        stats_.handler_calls++;
      }
      Result<std::vector<std::byte>> answer = [&] {
        std::lock_guard<std::recursive_mutex> one_at_a_time(handler_mu_);
        return fn(m);
      }();
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_.erase(h.id);
      FrameHeader r;
      r.id = h.id;
      if (!answer.ok()) {
        r.type = FrameType::kError;
        r.flags = kFlagControl;
        r.seq = static_cast<uint64_t>(answer.status().code());
        const std::string text(answer.status().message());
        return send_locked(r, {},
                           std::span<const std::byte>(
                               reinterpret_cast<const std::byte*>(text.data()), text.size()),
                           false);
      }
      r.type = FrameType::kReply;
      r.flags = (h.flags & kFlagControl) && answer->size() <= opt_.chunk_bytes ? kFlagControl : 0;
      replies_[h.id] = *answer;
      replies_fifo_.push_back(h.id);
      if (replies_fifo_.size() > kDedupEntries) {
        replies_.erase(replies_fifo_.front());
        replies_fifo_.pop_front();
      }
      return send_locked(r, {}, replies_[h.id], false);
    }
    default:
      return protocol_error("unexpected ", frame_type_name(h.type), " frame from the broker");
  }
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

Result<std::unique_ptr<Client>> Client::connect(ClientOptions options) {
  if (options.secret.empty()) return invalid_argument("the job secret is empty");
  if (options.receive_window == 0) return invalid_argument("receive_window must be positive");
  // The same bounds as the server's: every deadline computed from them fits int64_t nanoseconds.
  using internal::check_range;
  MYELIN_RETURN_IF_ERROR(
      check_range("connect_timeout_ms", options.connect_timeout_ms, 1, kMaxConnectTimeoutMs));
  MYELIN_RETURN_IF_ERROR(
      check_range("heartbeat_ms", options.heartbeat_ms, kMinHeartbeatMs, kMaxHeartbeatMs));
  MYELIN_RETURN_IF_ERROR(
      check_range("chunk_bytes", options.chunk_bytes, kMinChunkBytes, kMaxChunkBytes));
  MYELIN_RETURN_IF_ERROR(check_range("batch_bytes", options.batch_bytes, 0, kMaxBatchBytes));
  MYELIN_RETURN_IF_ERROR(
      check_range("batch_window_us", options.batch_window_us, 0, kMaxBatchWindowUs));
  MYELIN_RETURN_IF_ERROR(
      check_range("socket_buffer_bytes", options.socket_buffer_bytes, 0, kMaxSocketBufferBytes));
  MYELIN_RETURN_IF_ERROR(
      check_range("poll_read_grace_us", options.poll_read_grace_us, 0, kMaxBatchWindowUs));
  if (options.io_thread_nice < 0 || options.io_thread_nice > 19)
    return invalid_argument("io_thread_nice ", options.io_thread_nice, " outside 0..19");
  if (options.spin_before_block_us < 0 || options.spin_before_block_us > 100'000) {
    return invalid_argument("spin_before_block_us ", options.spin_before_block_us,
                            " outside 0..100000");
  }
  MYELIN_RETURN_IF_ERROR(
      validate_bulk_scheduling(options.io_thread_scheduling, "io_thread_scheduling"));
  // The I/O thread inherits the caller's CPUs: not the narrowed set of a bulk thread.
  restore_this_thread_cpus(/*even_library_bulk_thread=*/true);
  MYELIN_RETURN_IF_ERROR(reserve_control_cpus(options.control_cpus, options.control_cpus_hold_ms));
  auto impl = std::make_unique<Impl>(std::move(options));
  const std::string where = impl->opt_.address;
  Status s = impl->handshake();
  if (!s.ok()) return std::move(s).with_context("connecting to broker " + where);
  MYELIN_RETURN_IF_ERROR(impl->start());
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Status Client::publish(std::string_view topic, std::span<const std::byte> payload,
                       PublishOptions o) {
  // A stream repeats its topic: the topic this thread validated last is compared, not validated
  // again (validation depends on the bytes only). Outside the lock: a thread that alternates
  // topics pays a validation and a copy per call, never while holding mu_.
  thread_local std::string valid_topic;  // empty: none (never a valid topic)
  if (topic.empty() || topic != valid_topic) {
    MYELIN_RETURN_IF_ERROR(validate_topic(topic));
    valid_topic.assign(topic);
  }
  // The calling thread writes the frame itself (control_cpus.hpp): off the control CPUs for
  // bulk, back on its own CPUs for control.
  if (o.lane == Lane::kControl) {
    note_control_traffic();
    restore_this_thread_cpus();
  } else {
    keep_bulk_off_control_cpus();
  }
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.mu_);
  if (im.draining_) return unavailable("broker ", im.opt_.address, " is draining");
  MYELIN_RETURN_IF_ERROR(im.take_credit(lock, Deadline::after_ms(o.timeout_ms)));
  FrameHeader h;
  h.type = FrameType::kPublish;
  h.flags = o.lane == Lane::kControl ? kFlagControl : 0;
  h.id = im.new_id_locked();
  const int64_t now = monotonic_ns();  // one clock read for the timestamp and the batching rule
  h.timestamp_ns = static_cast<uint64_t>(now);
  Status s = im.send_locked(h, topic, payload, o.batch, nullptr, false, now);
  // Refused by the queue (the connection still up): not sent, so its credit stays here.
  if (!s.ok() && im.status_.ok()) im.give_back_credit_locked();
  return s;
}

Result<uint64_t> Client::subscribe(std::string_view pattern, MessageHandler handler,
                                   int64_t timeout_ms) {
  MYELIN_RETURN_IF_ERROR(validate_pattern(pattern));
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.mu_);
  const uint64_t id = im.new_id_locked();
  im.edit_subs_locked([&](std::vector<Impl::Sub>& v) {
    v.push_back(Impl::Sub{id, std::string(pattern), std::move(handler), {}});
  });
  im.waiters_[id];
  FrameHeader h;
  h.type = FrameType::kSubscribe;
  h.flags = kFlagControl;
  h.id = id;
  Status s = im.send_locked(h, pattern, {}, false);
  auto w = s.ok() ? im.wait_for(lock, id, Deadline::after_ms(timeout_ms)) : Result<Impl::Waiter>(s);
  if (!w.ok() || !w->status.ok()) {
    im.edit_subs_locked([&](std::vector<Impl::Sub>& v) {
      std::erase_if(v, [&](const Impl::Sub& x) { return x.id == id; });
    });
    return (w.ok() ? w->status : w.status())
        .with_context("subscribing to '" + std::string(pattern) + "'");
  }
  return id;
}

Status Client::serve(std::string_view pattern, RequestHandler handler, int64_t timeout_ms) {
  MYELIN_RETURN_IF_ERROR(validate_pattern(pattern));
  if (!handler) return invalid_argument("serve() needs a handler");
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.mu_);
  const uint64_t id = im.new_id_locked();
  im.edit_subs_locked([&](std::vector<Impl::Sub>& v) {
    v.push_back(Impl::Sub{id, std::string(pattern), {}, std::move(handler)});
  });
  im.waiters_[id];
  FrameHeader h;
  h.type = FrameType::kSubscribe;
  h.flags = kFlagControl;
  h.id = id;
  h.seq = 1;  // responder
  Status s = im.send_locked(h, pattern, {}, false);
  auto w = s.ok() ? im.wait_for(lock, id, Deadline::after_ms(timeout_ms)) : Result<Impl::Waiter>(s);
  if (!w.ok() || !w->status.ok()) {
    im.edit_subs_locked([&](std::vector<Impl::Sub>& v) {
      std::erase_if(v, [&](const Impl::Sub& x) { return x.id == id; });
    });
    return (w.ok() ? w->status : w.status()).with_context("serving '" + std::string(pattern) + "'");
  }
  return ok_status();
}

Status Client::unsubscribe(uint64_t subscription, int64_t timeout_ms) {
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.mu_);
  im.edit_subs_locked([&](std::vector<Impl::Sub>& v) {
    std::erase_if(v, [&](const Impl::Sub& x) { return x.id == subscription; });
  });
  const uint64_t op = subscription;
  im.waiters_[op];
  FrameHeader h;
  h.type = FrameType::kUnsubscribe;
  h.flags = kFlagControl;
  h.id = subscription;
  MYELIN_RETURN_IF_ERROR(im.send_locked(h, {}, {}, false));
  MYELIN_ASSIGN_OR_RETURN(auto w, im.wait_for(lock, op, Deadline::after_ms(timeout_ms)));
  return w.status;
}

Result<ReceivedMessage> Client::poll(Deadline deadline) {
  restore_this_thread_cpus();  // a control thread (control_cpus.hpp)
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.mu_);
  while (im.inbox_.empty()) {
    if (!im.status_.ok()) return im.status_;
    if (deadline.expired()) return timeout_error("no message");
    if (im.opt_.poll_reads_socket && im.can_read_for_poll()) {
      im.read_for_poll(lock, deadline);
      continue;
    }
    im.cv_.wait_for(
        lock, std::chrono::nanoseconds(std::min<int64_t>(deadline.remaining_ns(), 100'000'000)));
  }
  ReceivedMessage m = std::move(im.inbox_.front());
  im.inbox_.pop_front();
  im.consumed_locked();
  return m;
}

Result<Reply> Client::request(std::string_view topic, std::span<const std::byte> payload,
                              RequestOptions o) {
  MYELIN_RETURN_IF_ERROR(validate_topic(topic));
  if (o.max_attempts == 0) return invalid_argument("max_attempts must be positive");
  if (o.lane == Lane::kControl) {
    note_control_traffic();
    restore_this_thread_cpus();
  } else {
    keep_bulk_off_control_cpus();
  }
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.mu_);
  const uint64_t id = im.new_id_locked();
  int64_t backoff = o.backoff_ms;
  Status last;
  for (uint32_t attempt = 1; attempt <= o.max_attempts; ++attempt) {
    const Deadline d = Deadline::after_ms(o.attempt_timeout_ms);
    MYELIN_RETURN_IF_ERROR(im.take_credit(lock, d));
    im.waiters_[id] = Impl::Waiter{};
    FrameHeader h;
    h.type = FrameType::kRequest;
    h.flags = o.lane == Lane::kControl && payload.size() <= im.opt_.chunk_bytes ? kFlagControl : 0;
    h.id = id;
    h.seq = attempt;
    h.timestamp_ns = static_cast<uint64_t>(monotonic_ns());
    MYELIN_RETURN_IF_ERROR(im.send_locked(h, topic, payload, false));
    auto w = im.wait_for(lock, id, d);
    if (w.ok() && w->status.ok()) {
      Reply r;
      r.payload.assign(w->payload.begin(), w->payload.end());
      r.attempts = attempt;
      return r;
    }
    last = w.ok() ? w->status : w.status();
    // Retry what may succeed later: no answer in time, or no responder yet.
    if (last.code() != StatusCode::kTimeout && last.code() != StatusCode::kUnavailable) return last;
    if (!im.status_.ok()) return im.status_;
    const Deadline pause = Deadline::after_ms(backoff);
    while (!pause.expired() && im.status_.ok()) {
      im.cv_.wait_for(lock, std::chrono::nanoseconds(pause.remaining_ns()));
    }
    backoff = std::min<int64_t>(
        o.max_backoff_ms, static_cast<int64_t>(static_cast<double>(backoff) * o.backoff_factor));
  }
  return std::move(last).with_context("request on '" + std::string(topic) + "' after " +
                                      std::to_string(o.max_attempts) + " attempts");
}

namespace {
Status ps_send(Client::Impl& im, std::unique_lock<std::mutex>& lock, FrameType type,
               std::string_view key, uint64_t step, std::span<const float> data, Deadline d,
               Client::Impl::Waiter* out);
}

Status Client::ps_init(std::string_view key, std::span<const float> initial, int64_t timeout_ms) {
  keep_bulk_off_control_cpus();  // a bulk transfer from this thread (control_cpus.hpp)
  std::unique_lock<std::mutex> lock(impl_->mu_);
  Impl::Waiter w;
  return ps_send(*impl_, lock, FrameType::kPsPush, key, kPsInitStep, initial,
                 Deadline::after_ms(timeout_ms), &w);
}

Status Client::ps_push(std::string_view key, std::span<const float> grad, uint64_t step,
                       int64_t timeout_ms) {
  if (step == kPsInitStep) return invalid_argument("step ", step, " is reserved");
  keep_bulk_off_control_cpus();  // a bulk transfer from this thread (control_cpus.hpp)
  std::unique_lock<std::mutex> lock(impl_->mu_);
  Impl::Waiter w;
  return ps_send(*impl_, lock, FrameType::kPsPush, key, step, grad, Deadline::after_ms(timeout_ms),
                 &w);
}

Result<uint64_t> Client::ps_pull(std::string_view key, uint64_t min_version, std::span<float> out,
                                 int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(impl_->mu_);
  Impl::Waiter w;
  MYELIN_RETURN_IF_ERROR(ps_send(*impl_, lock, FrameType::kPsPull, key, min_version, {},
                                 Deadline::after_ms(timeout_ms), &w));
  if (w.payload.size() != out.size() * sizeof(float)) {
    return invalid_argument("pulled '", key, "' has ", w.payload.size() / sizeof(float),
                            " elements, the buffer ", out.size());
  }
  if (!out.empty()) std::memcpy(out.data(), w.payload.data(), w.payload.size());
  return w.seq;
}

namespace {
Status ps_send(Client::Impl& im, std::unique_lock<std::mutex>& lock, FrameType type,
               std::string_view key, uint64_t step, std::span<const float> data, Deadline d,
               Client::Impl::Waiter* out) {
  MYELIN_RETURN_IF_ERROR(validate_topic(key));
  MYELIN_RETURN_IF_ERROR(im.take_credit(lock, d));
  const uint64_t id = im.new_id_locked();
  im.waiters_[id];
  FrameHeader h;
  h.type = type;
  h.id = id;
  h.seq = step;
  if (type == FrameType::kPsPull) {
    h.flags = kFlagControl;
    MYELIN_RETURN_IF_ERROR(im.send_locked(h, key, {}, false));
  } else {
    auto buf = std::make_shared<std::vector<std::byte>>(4 + data.size() * sizeof(float));
    std::memcpy(buf->data(), &im.opt_.ps_worker, 4);
    const auto fb = float_bytes(data);
    if (!fb.empty()) std::memcpy(buf->data() + 4, fb.data(), fb.size());
    MYELIN_RETURN_IF_ERROR(im.send_locked(h, key, *buf, false, buf));
  }
  MYELIN_ASSIGN_OR_RETURN(*out, im.wait_for(lock, id, d));
  return out->status;
}
}  // namespace

Status Client::status() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->status_;
}
ClientStats Client::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->stats_;
}
uint64_t Client::client_id() const noexcept {
  return impl_->client_id_;
}

}  // namespace myelin::broker
