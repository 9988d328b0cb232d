// The UCX backend's same-node cma path (large messages the receiver reads from the sender's
// memory with process_vm_readv) between two backends of one process, under each UCX_TLS setting:
// sizes around the threshold and the read piece, 64 MiB, order mixed with small messages on one
// channel, too-small recv buffers, a sender that disconnects before its message was read, a
// sender whose endpoint fails while the receiver reads, withdraws of messages already read, and
// MYELIN_UCX_CMA (off, a threshold, garbage).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "ucx/ucx_endpoint.hpp"
#include "ucx/ucx_worker.hpp"
#include "ucx_test_util.hpp"

namespace myelin::transport::ucx_test {
namespace {

using internal::ucx::kCmaPiece;
using internal::ucx::kDefaultCmaThreshold;
using internal::ucx::UcxEndpoint;

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 131 + (i >> 12));
  return v;
}

// Sets MYELIN_UCX_CMA for the backends created in its scope.
class ScopedCmaEnv {
 public:
  explicit ScopedCmaEnv(const char* value) {
    if (value != nullptr) {
      setenv("MYELIN_UCX_CMA", value, 1);
    } else {
      unsetenv("MYELIN_UCX_CMA");
    }
  }
  ScopedCmaEnv(const ScopedCmaEnv&) = delete;
  ScopedCmaEnv& operator=(const ScopedCmaEnv&) = delete;
  ~ScopedCmaEnv() { unsetenv("MYELIN_UCX_CMA"); }
};

class UcxCma : public testing::TestWithParam<TlsSetting> {
 protected:
  void SetUp() override { apply_tls(GetParam()); }
  void TearDown() override {
    ab_.reset();
    ba_.reset();
    a_.reset();
    b_.reset();
  }

  // Opens and connects the pair; with `expect_cma`, waits until both ends send by cma.
  void connect_pair(bool expect_cma) {
    a_ = open_backend(test_options(), "ctx-a");
    b_ = open_backend(test_options(), "ctx-b");
    ASSERT_TRUE(a_ && b_);
    auto ab = a_->connect(b_->local_address(), "ctx-b", Deadline::after_ms(5000));
    ASSERT_TRUE(ab.ok()) << ab.status();
    auto ba = b_->connect(a_->local_address(), "ctx-a", Deadline::after_ms(5000));
    ASSERT_TRUE(ba.ok()) << ba.status();
    ab_ = std::move(ab).value();
    ba_ = std::move(ba).value();
    // The hellos travel like any message; give them time to arrive either way.
    const Deadline deadline = Deadline::after(expect_cma ? std::chrono::milliseconds(5000)
                                                         : std::chrono::milliseconds(200));
    while (!deadline.expired() && !(ucx(*ab_).sends_by_cma() && ucx(*ba_).sends_by_cma())) {
      a_->progress();
      b_->progress();
    }
    EXPECT_EQ(ucx(*ab_).sends_by_cma(), expect_cma);
    EXPECT_EQ(ucx(*ba_).sends_by_cma(), expect_cma);
  }
  static const UcxEndpoint& ucx(const Endpoint& ep) { return static_cast<const UcxEndpoint&>(ep); }
  Status drive2(const Request& r) { return drive(r, {a_.get(), b_.get()}); }

  // Sends `out` from a to b (recv posted first or after the message arrived) and checks it.
  void round_trip(const std::vector<uint8_t>& out, bool recv_first) {
    std::vector<uint8_t> in(out.size() + 7, 0xee);
    Request r, s;
    if (recv_first) {
      r = ba_->recv(5, in.data(), in.size());
      s = ab_->send(5, out.data(), out.size());
    } else {
      s = ab_->send(5, out.data(), out.size());
      for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();
      r = ba_->recv(5, in.data(), in.size());
    }
    ASSERT_TRUE(drive2(r).ok()) << r.status();
    ASSERT_TRUE(drive2(s).ok()) << s.status();
    EXPECT_EQ(s.bytes(), out.size());
    ASSERT_EQ(r.bytes(), out.size());
    EXPECT_TRUE(std::equal(out.begin(), out.end(), in.begin()));
    EXPECT_EQ(in[out.size()], 0xee) << "recv wrote past the message";
  }

  // A 64 MiB message from a to b on `channel` that b's own thread is reading (b_ and `r` belong
  // to that thread until reuse_and_finish() joins it; a_ and `s` to the caller).
  struct ReadInFlight {
    std::vector<uint8_t> out, expected, in;
    Request r, s;
    std::atomic<bool> stop{false};
    std::thread receiver;
    ~ReadInFlight() {  // a test that failed half-way still ends the thread
      stop.store(true, std::memory_order_release);
      if (receiver.joinable()) receiver.join();
    }
  };
  void start_read_in_flight(ReadInFlight& f, uint64_t channel, uint8_t seed) {
    f.out = pattern(size_t{64} << 20, seed);
    f.expected = f.out;
    f.in.assign(f.out.size(), 0);
    f.r = ba_->recv(channel, f.in.data(), f.in.size());
    f.s = ab_->send(channel, f.out.data(), f.out.size());
    f.receiver = std::thread([this, &f] {
      const Deadline limit = Deadline::after(std::chrono::seconds(20));
      while (!f.stop.load(std::memory_order_acquire) && !limit.expired()) b_->progress();
    });
    for (int i = 0; i < 200; ++i) a_->progress();  // the header arrives, the read gets going
  }
  // The caller reuses its buffer once the send is done (the tail first, where a read in progress
  // is headed); then b's thread is joined and b drives the recv to its end.
  void reuse_and_finish(ReadInFlight& f) {
    std::fill(f.out.begin() + f.out.size() / 2, f.out.end(), 0);
    std::fill(f.out.begin(), f.out.begin() + f.out.size() / 2, 0);
    f.stop.store(true, std::memory_order_release);  // pairs with the receiver thread's load
    f.receiver.join();
    const Deadline deadline = Deadline::after(std::chrono::seconds(10));
    while (!f.r.done() && !deadline.expired()) b_->progress();
  }

  std::unique_ptr<BackendContext> a_, b_;
  std::unique_ptr<Endpoint> ab_, ba_;
};

TEST_P(UcxCma, SizesAroundTheThresholdAndThePieceArriveIntact) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  const size_t t = kDefaultCmaThreshold;
  uint8_t seed = 3;
  for (size_t size :
       {t - 1, t, t + 1, kCmaPiece - 1, kCmaPiece, kCmaPiece + 1, 3 * kCmaPiece + 5}) {
    for (bool recv_first : {true, false}) {
      SCOPED_TRACE(testing::Message() << "size " << size << (recv_first ? " recv first" : ""));
      round_trip(pattern(size, seed++), recv_first);
    }
  }
}

TEST_P(UcxCma, SixtyFourMebibytesArriveIntact) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  const auto out = pattern(size_t{64} << 20, 17);
  round_trip(out, true);
  round_trip(out, false);
}

TEST_P(UcxCma, OrderHoldsAcrossCmaAndSmallMessagesOnAChannel) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  constexpr int kCount = 200;
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<Request> sends;
  for (int i = 0; i < kCount; ++i) {
    // Every third message goes by cma; the others are eager or UCX rendezvous (just below the
    // cma threshold), so small ones may overtake large ones on the wire.
    const size_t size = i % 3 == 0   ? kDefaultCmaThreshold + static_cast<size_t>(i) * 1000
                        : i % 3 == 1 ? 8 + static_cast<size_t>(i)
                                     : kDefaultCmaThreshold - 1;
    std::vector<uint8_t> p = pattern(size, static_cast<uint8_t>(i));
    std::memcpy(p.data(), &i, sizeof i);
    payloads.push_back(std::move(p));
    sends.push_back(ab_->send(9, payloads.back().data(), size));
  }
  std::vector<uint8_t> in(kDefaultCmaThreshold + kCount * 1000);
  for (int i = 0; i < kCount; ++i) {
    Request r = ba_->recv(9, in.data(), in.size());
    ASSERT_TRUE(drive2(r).ok()) << r.status();
    ASSERT_EQ(r.bytes(), payloads[static_cast<size_t>(i)].size()) << "message " << i;
    ASSERT_TRUE(std::equal(payloads[static_cast<size_t>(i)].begin(),
                           payloads[static_cast<size_t>(i)].end(), in.begin()))
        << "message " << i;
  }
  for (const Request& s : sends) EXPECT_TRUE(drive2(s).ok()) << s.status();
}

TEST_P(UcxCma, TooSmallRecvIsOutOfRangeAndTheSendStillCompletes) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  const auto big = pattern(size_t{1} << 20, 5);
  const auto next = pattern(kDefaultCmaThreshold * 2, 6);
  for (bool recv_first : {true, false}) {
    std::vector<uint8_t> small(100), in(next.size());
    Request r;
    if (recv_first) r = ba_->recv(0, small.data(), small.size());
    Request s1 = ab_->send(0, big.data(), big.size());
    Request s2 = ab_->send(0, next.data(), next.size());
    if (!recv_first) {
      for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();
      r = ba_->recv(0, small.data(), small.size());
    }
    Status st = drive2(r);
    EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st;
    EXPECT_TRUE(drive2(s1).ok()) << s1.status();
    Request r2 = ba_->recv(0, in.data(), in.size());
    ASSERT_TRUE(drive2(r2).ok()) << r2.status();
    EXPECT_EQ(in, next);
    EXPECT_TRUE(drive2(s2).ok()) << s2.status();
  }
}

TEST_P(UcxCma, MessageOfADisconnectedSenderFailsInsteadOfBeingRead) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  auto out = pattern(size_t{1} << 20, 8);
  Request s = ab_->send(4, out.data(), out.size());
  for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();  // the header arrives
  {
    // The receiver confirms the withdraw from its own progress; b_ belongs to this thread until
    // it is joined.
    std::atomic<bool> stop{false};
    std::thread receiver([&] {
      const Deadline limit = Deadline::after(std::chrono::seconds(20));
      while (!stop.load(std::memory_order_acquire) && !limit.expired()) b_->progress();
    });
    ab_.reset();  // the send is withdrawn: its buffer may be reused from here on
    stop.store(true, std::memory_order_release);  // pairs with the receiver thread's load
    receiver.join();
  }
  EXPECT_EQ(s.status().code(), StatusCode::kCancelled) << s.status();
  EXPECT_NE(s.status().message().find("withdrawn"), std::string_view::npos) << s.status();
  std::fill(out.begin(), out.end(), 0);
  for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();
  std::vector<uint8_t> in(out.size());
  Request r = ba_->recv(4, in.data(), in.size());
  const Status st = drive(r, {a_.get(), b_.get()}, Deadline::after(std::chrono::seconds(5)));
  EXPECT_EQ(st.code(), StatusCode::kCancelled) << st;
  EXPECT_NE(st.message().find("ctx-a"), std::string_view::npos) << st;
  EXPECT_EQ(ucx(*ba_).withdrawn_held(), 0u) << "the withdrawn cookie outlived its message";
}

// The sender withdrew a message still queued here, and then its endpoint fails here too (a forced
// close reaches this side as a peer error, in either order with the recv): the recv that comes to
// the message fails `cancelled` as a withdrawn message, and its cookie leaves the withdrawn list
// with it rather than stay until the endpoint goes.
TEST_P(UcxCma, WithdrawnMessageOfAPeerThatThenFailedLeavesNoCookieBehind) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  auto out = pattern(size_t{1} << 20, 9);
  Request s = ab_->send(6, out.data(), out.size());
  for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();  // the header arrives
  {
    std::atomic<bool> stop{false};
    std::thread receiver([&] {
      const Deadline limit = Deadline::after(std::chrono::seconds(20));
      while (!stop.load(std::memory_order_acquire) && !limit.expired()) b_->progress();
    });
    ab_.reset();                                  // withdraws the send
    stop.store(true, std::memory_order_release);  // pairs with the receiver thread's load
    receiver.join();
  }
  ASSERT_TRUE(s.done());
  const Deadline recorded = Deadline::after(std::chrono::seconds(5));
  while (ucx(*ba_).withdrawn_held() == 0 && !recorded.expired()) b_->progress();
  if (ucx(*ba_).withdrawn_held() != 1) {
    GTEST_SKIP() << "the withdraw did not find the message queued here (held "
                 << ucx(*ba_).withdrawn_held() << ")";
  }
  static_cast<UcxEndpoint&>(*ba_).fail(peer_failed("peer ctx-a (ucx): a peer error in the test"));
  std::vector<uint8_t> in(out.size());
  Request r = ba_->recv(6, in.data(), in.size());
  const Status st = drive(r, {a_.get(), b_.get()}, Deadline::after(std::chrono::seconds(5)));
  EXPECT_EQ(st.code(), StatusCode::kCancelled) << st;
  EXPECT_NE(st.message().find("disconnected before"), std::string_view::npos) << st;
  EXPECT_EQ(ucx(*ba_).withdrawn_held(), 0u) << "the withdrawn cookie outlived its message";
}

// The receiver read (and acked) the whole message, but the sender disconnects before it handled
// the ack, so its withdraw reaches the receiver after the read: nothing is left to withdraw, and
// the receiver keeps no record of it (one per such disconnect would pile up for good).
TEST_P(UcxCma, WithdrawOfAMessageAlreadyReadLeavesNothingBehind) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  const auto out = pattern(size_t{1} << 20, 12);
  std::vector<uint8_t> in(out.size(), 0);
  Request r = ba_->recv(3, in.data(), in.size());
  Request s = ab_->send(3, out.data(), out.size());
  // Only the receiver makes progress: it reads the message and acks it; the sender has not seen
  // the ack when it disconnects.
  const Deadline deadline = Deadline::after(std::chrono::seconds(10));
  while (!r.done() && !deadline.expired()) b_->progress();
  ASSERT_TRUE(r.done());
  ASSERT_TRUE(r.status().ok()) << r.status();
  EXPECT_TRUE(in == out);
  ASSERT_FALSE(s.done()) << "the send completed without the sender making progress";
  ab_.reset();  // withdraws the send, then takes the ack (sent before the withdraw's answer)
  ASSERT_TRUE(s.done());
  EXPECT_TRUE(s.status().ok()) << s.status();
  for (int i = 0; i < 200; ++i) b_->progress(), a_->progress();  // the withdraw arrives at b
  EXPECT_EQ(ucx(*ba_).withdrawn_held(), 0u);
}

// UCX reports a peer error (the sender's endpoint fails) while the peer's process lives on and
// its thread is reading a 64 MiB message: the send completes at once with the failure, and the
// caller may reuse the buffer from there. The receiver must then not deliver what it reads: either
// its read was through before the failure (the whole message, intact) or its recv fails
// `cancelled`, never a message of old and new bytes.
TEST_P(UcxCma, FailedSenderEndpointNeverLetsTheReceiverDeliverAReusedBuffer) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  ReadInFlight f;
  start_read_in_flight(f, 7, 33);
  static_cast<UcxEndpoint&>(*ab_).fail(peer_failed("peer ctx-b (ucx): a peer error in the test"));
  ASSERT_TRUE(f.s.done()) << "a failed endpoint's cma send still pending";
  EXPECT_EQ(f.s.status().code(), StatusCode::kPeerFailed) << f.s.status();
  reuse_and_finish(f);
  ASSERT_TRUE(f.r.done()) << "the recv neither finished nor failed";
  RecordProperty("outcome", f.r.status().ok() ? "read before the failure" : "dropped");
  if (f.r.status().ok()) {
    EXPECT_TRUE(f.in == f.expected) << "a completed recv holds other bytes than were sent";
  } else {
    EXPECT_EQ(f.r.status().code(), StatusCode::kCancelled) << f.r.status();
    EXPECT_NE(f.r.status().message().find("gave its"), std::string_view::npos) << f.r.status();
  }
}

// The sender disconnects while the receiver (its own thread) is reading a 64 MiB message: the
// disconnect returns only once the receiver confirmed the withdraw or finished the read, so the
// buffer the sender then overwrites is never read half old, half new. Either the send and the
// recv both completed with the whole message, or both failed `cancelled`.
TEST_P(UcxCma, DisconnectWaitsForTheReceiverBeforeTheBufferIsReused) {
  ScopedCmaEnv env(nullptr);
  connect_pair(true);
  ReadInFlight f;
  start_read_in_flight(f, 6, 21);
  ab_.reset();  // withdraws mid-read
  ASSERT_TRUE(f.s.done());
  reuse_and_finish(f);
  ASSERT_TRUE(f.r.done()) << "the recv neither finished nor failed";
  RecordProperty("outcome", f.s.status().ok() ? "read before the withdraw" : "withdrawn");
  if (f.s.status().ok()) {
    ASSERT_TRUE(f.r.status().ok()) << f.r.status();
    EXPECT_TRUE(f.in == f.expected) << "a completed recv holds other bytes than were sent";
  } else {
    EXPECT_EQ(f.s.status().code(), StatusCode::kCancelled) << f.s.status();
    // Completed by the receiver's confirmation, not by giving up on it.
    EXPECT_NE(f.s.status().message().find("withdrawn"), std::string_view::npos) << f.s.status();
    EXPECT_EQ(f.r.status().code(), StatusCode::kCancelled)
        << "the recv completed after its sender withdrew: " << f.r.status();
  }
}

// A cma read still filling its recv is work pending: a blocking wait must not arm the worker's
// wakeup and sleep (up to 100 ms per 1 MiB piece, as no UCX event comes for the next piece).
TEST_P(UcxCma, PendingCmaReadKeepsTheWorkerFromSleeping) {
  ScopedCmaEnv env(nullptr);
  Options o = test_options();
  o.progress = ProgressMode::kSpinThenBlock;
  a_ = open_backend(o, "ctx-a");
  b_ = open_backend(o, "ctx-b");
  ASSERT_TRUE(a_ && b_);
  ASSERT_GE(b_->wait_fd(), 0);
  auto ab = a_->connect(b_->local_address(), "ctx-b", Deadline::after_ms(5000));
  auto ba = b_->connect(a_->local_address(), "ctx-a", Deadline::after_ms(5000));
  ASSERT_TRUE(ab.ok() && ba.ok());
  ab_ = std::move(ab).value();
  ba_ = std::move(ba).value();
  const Deadline hello = Deadline::after_ms(5000);
  while (!hello.expired() && !ucx(*ab_).sends_by_cma()) a_->progress(), b_->progress();
  ASSERT_TRUE(ucx(*ab_).sends_by_cma());
  const auto out = pattern(8 * kCmaPiece, 11);
  std::vector<uint8_t> in(out.size());
  Request s = ab_->send(6, out.data(), out.size());
  for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();  // the header arrives
  // Idle, the receiver may sleep (what it has to do is done).
  const Deadline idle = Deadline::after_ms(5000);
  while (!idle.expired() && !b_->arm_wait()) b_->progress();
  ASSERT_FALSE(idle.expired()) << "the receiver never became idle";
  Request r = ba_->recv(6, in.data(), in.size());  // starts the read: one piece at most
  ASSERT_FALSE(r.done()) << r.status();
  EXPECT_FALSE(b_->arm_wait()) << "armed to sleep with a cma read in progress";
  ASSERT_TRUE(drive2(r).ok()) << r.status();
  ASSERT_TRUE(drive2(s).ok()) << s.status();
  EXPECT_TRUE(in == out);
}

TEST_P(UcxCma, OffInTheEnvironmentKeepsUcxRendezvous) {
  ScopedCmaEnv env("off");
  connect_pair(false);
  round_trip(pattern(size_t{1} << 20, 4), true);
  round_trip(pattern(size_t{1} << 20, 5), false);
}

TEST_P(UcxCma, OffOnOneSideOnlyStopsSendsTowardsIt) {
  std::unique_ptr<BackendContext> on, off;
  {
    ScopedCmaEnv env(nullptr);
    on = open_backend(test_options(), "on");
  }
  {
    ScopedCmaEnv env("off");
    off = open_backend(test_options(), "off");
  }
  ASSERT_TRUE(on && off);
  auto to_off = on->connect(off->local_address(), "off", Deadline::after_ms(5000));
  auto to_on = off->connect(on->local_address(), "on", Deadline::after_ms(5000));
  ASSERT_TRUE(to_off.ok() && to_on.ok());
  const auto out = pattern(size_t{1} << 20, 9);
  for (auto [from, to, ep_out, ep_in] :
       {std::tuple{on.get(), off.get(), to_off->get(), to_on->get()},
        std::tuple{off.get(), on.get(), to_on->get(), to_off->get()}}) {
    std::vector<uint8_t> in(out.size());
    Request r = ep_in->recv(1, in.data(), in.size());
    Request s = ep_out->send(1, out.data(), out.size());
    ASSERT_TRUE(drive(r, {from, to}).ok()) << r.status();
    ASSERT_TRUE(drive(s, {from, to}).ok()) << s.status();
    EXPECT_EQ(in, out);
  }
  // "off" answered the hello with "cannot read", and never sends by cma itself.
  EXPECT_FALSE(ucx(**to_off).sends_by_cma());
  EXPECT_FALSE(ucx(**to_on).sends_by_cma());
  to_off->reset();
  to_on->reset();
}

TEST_P(UcxCma, ThresholdFromTheEnvironment) {
  ScopedCmaEnv env("1000000");
  connect_pair(true);
  round_trip(pattern(999'999, 1), true);
  round_trip(pattern(1'000'000, 2), true);
}

TEST(UcxCmaConfig, GarbageInTheEnvironmentIsAnError) {
  apply_tls(kTlsSettings[0]);
  for (const char* bad : {"on", "0", "12k", "-5"}) {
    ScopedCmaEnv env(bad);
    auto r = internal::create_ucx_backend(test_options(), internal::ContextInfo{"x", "test-node"});
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("MYELIN_UCX_CMA"), std::string_view::npos) << r.status();
  }
}

INSTANTIATE_TEST_SUITE_P(Tls, UcxCma, testing::ValuesIn(kTlsSettings), tls_test_name);

}  // namespace
}  // namespace myelin::transport::ucx_test
