// tests/verbs/verbs_backend_test.cpp — the verbs backend on a real device (rxe0 in the guest),
// in both connection modes: two backends in one process connected over the device's loopback.
// Without a verbs device every test is skipped with the reason the backend gave.
#include <gtest/gtest.h>
#include <poll.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "verbs_test_util.hpp"

namespace myelin::transport::verbs_test {
namespace {

class VerbsBackendTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    ::setenv("MYELIN_VERBS_CM", GetParam(), 1);
    auto a = make_backend("A");
    if (!a.ok()) {
      if (a.status().code() == StatusCode::kUnavailable ||
          a.status().code() == StatusCode::kNotFound) {
        GTEST_SKIP() << "no usable verbs device: " << a.status();
      }
      FAIL() << a.status();
    }
    a_ = std::move(*a);
    auto b = make_backend("B");
    ASSERT_TRUE(b.ok()) << b.status();
    b_ = std::move(*b);
  }
  void TearDown() override { ::unsetenv("MYELIN_VERBS_CM"); }

  void connect_pair() {
    const Deadline d = Deadline::after(std::chrono::seconds(20));
    auto ea = a_->connect(b_->local_address(), "B", d);
    ASSERT_TRUE(ea.ok()) << ea.status();
    ea_ = std::move(*ea);
    // B's side: the incoming connection may already be accepted by its progress engine.
    for (int i = 0; i < 10; ++i) {
      a_->progress();
      b_->progress();
    }
    auto eb = b_->connect(a_->local_address(), "A", d);
    ASSERT_TRUE(eb.ok()) << eb.status();
    eb_ = std::move(*eb);
    // A first message in each direction proves both QPs reached RTS.
    uint8_t x = 1, y = 0;
    Request r = eb_->recv(0, &y, 1, nullptr);
    ASSERT_TRUE(wait_request(ea_->send(0, &x, 1, nullptr), *a_, b_.get()).ok());
    ASSERT_TRUE(wait_request(r, *a_, b_.get()).ok()) << r.status();
    ASSERT_EQ(y, 1);
  }

  std::unique_ptr<BackendContext> a_, b_;
  std::unique_ptr<Endpoint> ea_, eb_;
};

TEST_P(VerbsBackendTest, EagerMessagesInOrderPerChannel) {
  connect_pair();
  const size_t limit = a_->limits().eager_limit;
  ASSERT_GT(limit, 1000u);
  const std::vector<size_t> sizes = {0, 1, 8, 64, 1000, limit - 1, limit};
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto msg = pattern(sizes[i], static_cast<uint8_t>(i));
    std::vector<uint8_t> got(limit, 0xee);
    Request r = eb_->recv(static_cast<uint32_t>(i % 3), got.data(), got.size(), nullptr);
    Request s = ea_->send(static_cast<uint32_t>(i % 3), msg.data(), msg.size(), nullptr);
    ASSERT_TRUE(wait_request(s, *a_, b_.get()).ok()) << s.status();
    ASSERT_TRUE(wait_request(r, *a_, b_.get()).ok()) << r.status();
    ASSERT_EQ(r.bytes(), sizes[i]);
    EXPECT_EQ(0, std::memcmp(got.data(), msg.data(), sizes[i])) << "size " << sizes[i];
  }
}

TEST_P(VerbsBackendTest, MoreMessagesThanRingSlotsWaitForCredits) {
  connect_pair();
  constexpr int kCount = 300;  // several times the ring: exercises credit return
  std::vector<Request> sends;
  for (int i = 0; i < kCount; ++i) {
    uint32_t v = static_cast<uint32_t>(i);
    sends.push_back(ea_->send(7, &v, sizeof v, nullptr));
    a_->progress();
    b_->progress();  // B has no recv posted: messages queue as unexpected, credit flows back
  }
  for (int i = 0; i < kCount; ++i) {
    uint32_t v = 0xffffffff;
    Request r = eb_->recv(7, &v, sizeof v, nullptr);
    ASSERT_TRUE(wait_request(r, *a_, b_.get()).ok()) << r.status();
    ASSERT_EQ(v, static_cast<uint32_t>(i)) << "out of order";
  }
  for (auto& s : sends) ASSERT_TRUE(wait_request(s, *a_, b_.get()).ok()) << s.status();
}

TEST_P(VerbsBackendTest, RendezvousWithAndWithoutRegions) {
  connect_pair();
  const size_t n = (size_t{1} << 20) + 123;
  auto msg = pattern(n, 3);
  // Unregistered buffers on both sides (transient registrations).
  std::vector<uint8_t> got(n + 10, 0);
  Request r = eb_->recv(1, got.data(), got.size(), nullptr);
  Request s = ea_->send(1, msg.data(), n, nullptr);
  ASSERT_TRUE(wait_request(r, *a_, b_.get()).ok()) << r.status();
  ASSERT_TRUE(wait_request(s, *a_, b_.get()).ok()) << s.status();
  EXPECT_EQ(r.bytes(), n);
  EXPECT_EQ(0, std::memcmp(got.data(), msg.data(), n));
  // Registered regions, and the send posted before the recv (RTS waits as unexpected).
  auto src = register_buffer(*a_, n, 11);
  auto dst = register_buffer(*b_, n, 12);
  ASSERT_TRUE(src.ok() && dst.ok());
  std::memcpy((*src)->bytes.data(), msg.data(), n);
  Request s2 = ea_->send(2, (*src)->bytes.data(), n, &(*src)->region);
  for (int i = 0; i < 50; ++i) {
    a_->progress();
    b_->progress();
  }
  Request r2 = eb_->recv(2, (*dst)->bytes.data(), n, &(*dst)->region);
  ASSERT_TRUE(wait_request(r2, *a_, b_.get()).ok()) << r2.status();
  ASSERT_TRUE(wait_request(s2, *a_, b_.get()).ok()) << s2.status();
  EXPECT_EQ((*dst)->bytes, msg);
  // Too small a buffer: out_of_range, message consumed, endpoint healthy.
  std::vector<uint8_t> small(1000);
  Request r3 = eb_->recv(3, small.data(), small.size(), nullptr);
  Request s3 = ea_->send(3, msg.data(), n, nullptr);
  EXPECT_EQ(wait_request(r3, *a_, b_.get()).code(), StatusCode::kOutOfRange);
  EXPECT_TRUE(wait_request(s3, *a_, b_.get()).ok());
  EXPECT_TRUE(ea_->status().ok());
  EXPECT_TRUE(eb_->status().ok());
}

TEST_P(VerbsBackendTest, PutGetAndImmediates) {
  connect_pair();
  auto target = register_buffer(*b_, 1 << 16, 21);
  ASSERT_TRUE(target.ok()) << target.status();
  auto data = pattern(5000, 9);
  Request p = ea_->put(data.data(), data.size(), (*target)->key, 100, nullptr);
  ASSERT_TRUE(wait_request(p, *a_, b_.get()).ok()) << p.status();
  EXPECT_EQ(0, std::memcmp((*target)->bytes.data() + 100, data.data(), data.size()));
  // Small put: inline when the device grants inline data.
  uint64_t word = 0x1122334455667788ull;
  Request p2 = ea_->put_with_immediate(&word, sizeof word, (*target)->key, 8, 0xabcdef, nullptr);
  ASSERT_TRUE(wait_request(p2, *a_, b_.get()).ok()) << p2.status();
  uint32_t imm = 0;
  ASSERT_TRUE(pump(
      *a_, b_.get(), [&] { return eb_->try_pop_immediate(imm); },
      Deadline::after(std::chrono::seconds(10))));
  EXPECT_EQ(imm, 0xabcdefu);
  uint64_t landed = 0;
  std::memcpy(&landed, (*target)->bytes.data() + 8, sizeof landed);
  EXPECT_EQ(landed, word);
  // get back into a registered local region.
  auto local = register_buffer(*a_, 5000, 22);
  ASSERT_TRUE(local.ok());
  Request g = ea_->get((*local)->bytes.data(), 5000, (*target)->key, 100, &(*local)->region);
  ASSERT_TRUE(wait_request(g, *a_, b_.get()).ok()) << g.status();
  EXPECT_EQ((*local)->bytes, data);
  // Bounds are checked against the key before anything is posted: endpoint stays usable.
  Request oob = ea_->put(data.data(), 10, (*target)->key, (1 << 16) - 5, nullptr);
  EXPECT_EQ(wait_request(oob, *a_, b_.get()).code(), StatusCode::kOutOfRange);
  auto ro = register_buffer(*b_, 4096, 23, Access::kRemoteRead);
  ASSERT_TRUE(ro.ok());
  Request denied = ea_->put(data.data(), 10, (*ro)->key, 0, nullptr);
  EXPECT_EQ(wait_request(denied, *a_, b_.get()).code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(ea_->status().ok());
}

TEST_P(VerbsBackendTest, BlockingModeWakesOnCompletionChannel) {
  connect_pair();
  const int fd = b_->wait_fd();
  ASSERT_GE(fd, 0);
  uint32_t v = 0;
  Request r = eb_->recv(4, &v, sizeof v, nullptr);
  // Settle: nothing pending on B, so arming must allow sleeping.
  ASSERT_TRUE(pump(
      *b_, nullptr, [&] { return b_->arm_wait(); }, Deadline::after_ms(5000)));
  uint32_t x = 42;
  Request s = ea_->send(4, &x, sizeof x, nullptr);
  pollfd pfd{fd, POLLIN, 0};
  bool woke = false;
  for (Deadline d = Deadline::after_ms(10000); !d.expired() && !woke;) {
    a_->progress();
    woke = ::poll(&pfd, 1, 10) == 1;
  }
  ASSERT_TRUE(woke) << "wait_fd never became readable";
  ASSERT_TRUE(wait_request(r, *b_, a_.get()).ok()) << r.status();
  EXPECT_EQ(v, 42u);
  EXPECT_TRUE(wait_request(s, *a_, b_.get()).ok());
}

// ---- faults rxe really produces ---------------------------------------------------------------

TEST_P(VerbsBackendTest, BadRkeyIsARemoteAccessErrorThatKillsTheEndpoint) {
  connect_pair();
  auto target = register_buffer(*b_, 4096, 31);
  ASSERT_TRUE(target.ok());
  RemoteKey forged(reinterpret_cast<uintptr_t>((*target)->bytes.data()), 4096, 31,
                   Access::kRemoteReadWrite, MemoryKind::kHost);
  const uint32_t real = [&] {
    auto blob = (*target)->key.backend_blob(Backend::kVerbs);
    uint32_t k;
    std::memcpy(&k, blob.data() + 1, 4);
    return k;
  }();
  const uint32_t bad = real ^ 0x5a5a00;
  std::vector<uint8_t> blob(5);
  blob[0] = 1;
  std::memcpy(blob.data() + 1, &bad, sizeof bad);
  forged.add_backend_blob(Backend::kVerbs, blob);
  std::vector<uint8_t> data(256, 1);
  // Queue a recv too: it must complete with the same error (flushed), not hang.
  uint8_t sink[8];
  Request pending = ea_->recv(9, sink, sizeof sink, nullptr);
  Request p = ea_->put(data.data(), data.size(), forged, 0, nullptr);
  Status st = wait_request(p, *a_, b_.get());
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  EXPECT_NE(st.to_string().find("remote access error"), std::string::npos) << st;
  EXPECT_NE(st.to_string().find("put"), std::string::npos) << st;
  EXPECT_NE(st.to_string().find("B"), std::string::npos) << st;
  EXPECT_EQ(wait_request(pending, *a_, b_.get()).code(), StatusCode::kPeerFailed);
  EXPECT_FALSE(ea_->status().ok());
  Request later = ea_->send(0, data.data(), 8, nullptr);
  EXPECT_EQ(later.status().code(), StatusCode::kPeerFailed);
}

TEST_P(VerbsBackendTest, OutOfBoundsPutBeyondTheRealRegionIsARemoteAccessError) {
  connect_pair();
  auto target = register_buffer(*b_, 4096, 41);
  ASSERT_TRUE(target.ok());
  // A key that claims more than was registered: only the responder's MR check can catch it.
  RemoteKey lying((*target)->key.address(), 1 << 20, 41, Access::kRemoteReadWrite,
                  MemoryKind::kHost);
  auto blob = (*target)->key.backend_blob(Backend::kVerbs);
  lying.add_backend_blob(Backend::kVerbs, std::vector<uint8_t>(blob.begin(), blob.end()));
  std::vector<uint8_t> data(8192, 2);
  Request p = ea_->put(data.data(), data.size(), lying, 0, nullptr);
  Request after = ea_->put(data.data(), 16, (*target)->key, 0, nullptr);  // flushed
  Status st = wait_request(p, *a_, b_.get());
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  EXPECT_NE(st.to_string().find("remote access error"), std::string::npos) << st;
  EXPECT_EQ(wait_request(after, *a_, b_.get()).code(), StatusCode::kPeerFailed);
}

TEST_P(VerbsBackendTest, DestroyedPeerQpEndsInRetryExceeded) {
  connect_pair();
  eb_.reset();  // B's QP is gone; A's next write finds nobody
  std::vector<uint8_t> data(100, 3);
  Request s = ea_->send(0, data.data(), data.size(), nullptr);
  uint8_t sink[4];
  Request r = ea_->recv(0, sink, sizeof sink, nullptr);
  Status st = wait_request(r, *a_, b_.get(), std::chrono::seconds(60));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
  // rdmacm mode may learn it first from the CM (DREQ/DISCONNECTED); exchange mode from the QP.
  if (std::string(GetParam()) == "exchange") {
    EXPECT_NE(st.to_string().find("retry counter exceeded"), std::string::npos) << st;
  }
}

TEST_P(VerbsBackendTest, WaitingRecvNoticesAQuietDeadPeerThroughKeepalive) {
  connect_pair();
  eb_.reset();
  uint8_t sink[4];
  Request r = ea_->recv(5, sink, sizeof sink, nullptr);  // nothing sent: only the probe can tell
  Status st = wait_request(r, *a_, b_.get(), std::chrono::seconds(60));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
}

TEST_P(VerbsBackendTest, ConnectingToAnAddressNobodyAnswersFailsByTheDeadline) {
  auto addr = b_->local_address();
  b_.reset();  // the address now names a closed backend
  auto ep = a_->connect(addr, "gone", Deadline::after(std::chrono::seconds(3)));
  if (!ep.ok()) {
    SUCCEED() << "refused at once: " << ep.status();
    return;
  }
  uint8_t x = 0;
  Request r = (*ep)->recv(0, &x, 1, nullptr);
  Status st = wait_request(r, *a_, nullptr, std::chrono::seconds(30));
  EXPECT_EQ(st.code(), StatusCode::kPeerFailed) << st;
}

TEST_P(VerbsBackendTest, MalformedPeerAddressIsAProtocolError) {
  std::vector<uint8_t> junk = {1, 2, 3};
  auto ep = a_->connect(junk, "junk", Deadline::after_ms(100));
  EXPECT_EQ(ep.status().code(), StatusCode::kProtocolError);
  auto mine = a_->local_address();
  auto self = a_->connect(mine, "self", Deadline::after_ms(100));
  EXPECT_EQ(self.status().code(), StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Modes, VerbsBackendTest, ::testing::Values("exchange", "rdmacm"),
                         [](const auto& p) { return std::string(p.param); });

}  // namespace
}  // namespace myelin::transport::verbs_test
