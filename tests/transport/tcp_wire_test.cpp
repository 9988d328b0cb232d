// TCP robustness: malformed frames and strangers close only their own connection, with a logged
// reason; the process and its other connections are unharmed. Also spin-then-block progress.
#include <arpa/inet.h>
#include <dirent.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include <myelin/transport/node.hpp>

#include "address.hpp"
#include "tcp/tcp_frame.hpp"
#include "test_util.hpp"

namespace myelin::transport::testing {
namespace {

using internal::tcp::FrameHeader;
using internal::tcp::FrameType;
using internal::tcp::kHeaderSize;
using internal::tcp::TcpAddress;

class TcpWire : public ::testing::Test {
 protected:
  void SetUp() override {
    auto p = Pair::make(Backend::kTcp);
    ASSERT_TRUE(p.ok()) << p.status();
    pair_ = std::move(p).value();
    auto parsed = internal::parse_address(pair_.b->address());
    ASSERT_TRUE(parsed.ok());
    target_bytes_ = *parsed->entry(Backend::kTcp);
    auto addr = TcpAddress::decode(target_bytes_);
    ASSERT_TRUE(addr.ok());
    target_ = *addr;
  }

  int dial() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(target_.port);
    sa.sin_addr.s_addr = target_.ipv4;
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    return fd;
  }
  static std::vector<uint8_t> frame(FrameHeader h, const std::vector<uint8_t>& payload = {}) {
    if (h.length == 0) h.length = payload.size();
    std::vector<uint8_t> out(kHeaderSize);
    internal::tcp::encode_header(h, out.data());
    out.insert(out.end(), payload.begin(), payload.end());
    return out;
  }
  std::vector<uint8_t> hello() {
    internal::tcp::Hello hl;
    hl.name = "impostor";
    hl.sender = TcpAddress{htonl(INADDR_LOOPBACK), 9, 12345}.encode();
    hl.target = target_bytes_;
    FrameHeader h;
    h.type = FrameType::kHello;
    return frame(h, hl.encode());
  }
  static void send_bytes(int fd, const std::vector<uint8_t>& b) {
    ASSERT_EQ(::send(fd, b.data(), b.size(), MSG_NOSIGNAL), static_cast<ssize_t>(b.size()));
  }
  // Progresses both Contexts until the victim closes `fd` (EOF or reset seen by us).
  bool closed_by_peer(int fd) {
    const Deadline deadline = Deadline::after_ms(10000);
    while (!deadline.expired()) {
      pair_.progress();
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 1) == 1) {
        uint8_t buf[4096];
        const ssize_t r = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (r <= 0) return true;  // EOF or ECONNRESET
      }
    }
    return false;
  }
  void expect_rejected(const std::vector<uint8_t>& bytes, const char* reason, bool half = false) {
    ::testing::internal::CaptureStderr();
    const int fd = dial();
    send_bytes(fd, bytes);
    if (half) ::shutdown(fd, SHUT_WR);
    const bool closed = closed_by_peer(fd);
    const std::string log = ::testing::internal::GetCapturedStderr();
    ::close(fd);
    EXPECT_TRUE(closed) << "connection not closed for: " << reason;
    EXPECT_NE(log.find(reason), std::string::npos) << "log lacks '" << reason << "': " << log;
    // Everything else still works.
    uint64_t out = 77, in = 0;
    Request r = pair_.ba->recv(0, &in, sizeof(in));
    ASSERT_TRUE(pair_.wait(pair_.ab->send(0, &out, sizeof(out))).ok());
    ASSERT_TRUE(pair_.wait(r).ok());
    EXPECT_EQ(in, 77u);
  }

  // Dials b as a peer named "impostor" that always dials (port 1 sorts first), completes the
  // hello and sets `ep` to b's endpoint to it; returns the socket (frames from seq 1 on).
  int impostor(Endpoint*& ep) {
    const int fd = dial();
    internal::tcp::Hello hl;
    hl.name = "impostor";
    hl.sender = TcpAddress{htonl(INADDR_LOOPBACK), 1, 777}.encode();
    hl.target = target_bytes_;
    FrameHeader h;
    h.type = FrameType::kHello;
    send_bytes(fd, frame(h, hl.encode()));
    // The hello reply: the connection is identified once it is out.
    std::vector<uint8_t> reply;
    if (!read_frame(fd, reply)) return fd;
    internal::ParsedAddress who{"impostor", "elsewhere/0", {{Backend::kTcp, hl.sender}}};
    auto r = pair_.b->connect(internal::encode_address(who));
    EXPECT_TRUE(r.ok()) << r.status();
    if (r.ok()) ep = *r;
    return fd;
  }
  // Reads one whole frame from `fd` while progressing both Contexts; false after 10 s.
  bool read_frame(int fd, std::vector<uint8_t>& out, FrameHeader* header = nullptr) {
    const Deadline deadline = Deadline::after_ms(10000);
    out.clear();
    size_t want = kHeaderSize;
    while (out.size() < want) {
      if (deadline.expired()) return false;
      pair_.progress();
      uint8_t buf[4096];
      const size_t room = std::min(sizeof(buf), want - out.size());
      const ssize_t r = ::recv(fd, buf, room, MSG_DONTWAIT);
      if (r > 0) out.insert(out.end(), buf, buf + r);
      if (out.size() == kHeaderSize && want == kHeaderSize) {
        FrameHeader h;
        if (!internal::tcp::decode_header(out.data(), uint64_t{1} << 40, h).ok()) return false;
        want += h.length;
        if (header != nullptr) *header = h;
      }
    }
    return true;
  }
  static std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 8));
    return v;
  }

  Pair pair_;
  std::vector<uint8_t> target_bytes_;
  TcpAddress target_;
};

// A blocking wait on `r`, which no message will complete, ends with a timeout at its 150 ms
// deadline: not before it, and not oversleeping it.
void expect_wait_times_out_at_150_ms(Context& ctx, const Request& r) {
  const int64_t t0 = monotonic_ns();
  Status s = ctx.wait(r, Deadline::after_ms(150));
  const int64_t waited_ms = (monotonic_ns() - t0) / 1'000'000;
  EXPECT_EQ(s.code(), StatusCode::kTimeout) << s;
  EXPECT_GE(waited_ms, 149);
  EXPECT_LT(waited_ms, 2000) << "the wait overslept its 150 ms deadline";
}

TEST_F(TcpWire, RandomBytesFromAStranger) {
  std::mt19937 rng(7);
  std::vector<uint8_t> junk(200);
  for (auto& b : junk) b = static_cast<uint8_t>(rng());
  expect_rejected(junk, "bad frame magic");
}

TEST_F(TcpWire, UnknownVersion) {
  auto f = hello();
  f[4] = 9;
  expect_rejected(f, "unknown frame version 9");
}

TEST_F(TcpWire, UnknownType) {
  auto f = hello();
  f[5] = 200;
  expect_rejected(f, "unknown frame type 200");
}

TEST_F(TcpWire, OversizeLength) {
  auto f = hello();
  FrameHeader h;
  h.type = FrameType::kEager;
  h.seq = 1;
  h.length = uint64_t{1} << 63;  // "negative"
  auto bad = frame(h);
  f.insert(f.end(), bad.begin(), bad.end());
  expect_rejected(f, "payload bytes (limit");
}

TEST_F(TcpWire, TruncatedFrame) {
  auto f = hello();
  FrameHeader h;
  h.type = FrameType::kEager;
  h.seq = 1;
  h.length = 1000;
  auto partial = frame(h, std::vector<uint8_t>(100, 1));
  f.insert(f.end(), partial.begin(), partial.end());
  expect_rejected(f, "truncated frame", /*half=*/true);
}

TEST_F(TcpWire, OutOfSequence) {
  auto f = hello();
  FrameHeader h;
  h.type = FrameType::kEager;
  h.seq = 5;
  auto bad = frame(h, {1, 2, 3});
  f.insert(f.end(), bad.begin(), bad.end());
  expect_rejected(f, "out-of-sequence frame: seq 5, expected 1");
}

TEST_F(TcpWire, FrameBeforeHello) {
  FrameHeader h;
  h.type = FrameType::kEager;
  expect_rejected(frame(h, {1}), "before the hello");
}

TEST_F(TcpWire, HelloForSomeoneElse) {
  internal::tcp::Hello hl;
  hl.name = "lost";
  hl.sender = TcpAddress{htonl(INADDR_LOOPBACK), 9, 1}.encode();
  hl.target = TcpAddress{htonl(INADDR_LOOPBACK), target_.port, target_.instance + 1}.encode();
  FrameHeader h;
  h.type = FrameType::kHello;
  expect_rejected(frame(h, hl.encode()), "meant for");
}

TEST_F(TcpWire, BadMagicAfterHandshakeAndUnknownCompletions) {
  auto f = hello();
  auto bad = f;  // a second copy of the hello header, with its magic broken, as frame 1
  bad.resize(kHeaderSize);
  bad[0] ^= 0xFF;
  f.insert(f.end(), bad.begin(), bad.end());
  expect_rejected(f, "bad frame magic");
  auto g = hello();
  FrameHeader cts;
  cts.type = FrameType::kCts;
  cts.seq = 1;
  cts.id = 999;
  auto c = frame(cts);
  g.insert(g.end(), c.begin(), c.end());
  expect_rejected(g, "clear-to-send for unknown send 999");
}

// A recv posted while an early message is still arriving must get that message, not the next.
TEST_F(TcpWire, RecvPostedWhileAnUnexpectedMessageArrives) {
  Endpoint* ep = nullptr;
  const int fd = impostor(ep);
  ASSERT_NE(ep, nullptr);

  std::vector<uint8_t> first(100, 0x11), second(100, 0x22);
  FrameHeader m;
  m.type = FrameType::kEager;
  m.seq = 1;
  auto f1 = frame(m, first);
  m.seq = 2;
  auto f2 = frame(m, second);
  send_bytes(fd, std::vector<uint8_t>(f1.begin(), f1.begin() + kHeaderSize + 40));
  for (int i = 0; i < 200; ++i) pair_.progress();
  std::vector<uint8_t> in1(100), in2(100);
  Request r1 = ep->recv(0, in1.data(), in1.size());
  Request r2 = ep->recv(0, in2.data(), in2.size());
  send_bytes(fd, std::vector<uint8_t>(f1.begin() + kHeaderSize + 40, f1.end()));
  send_bytes(fd, f2);
  std::vector<Request> both{r1, r2};
  ASSERT_TRUE(pair_.wait(both, 10000).ok());
  EXPECT_EQ(in1, first);
  EXPECT_EQ(in2, second);
  ::close(fd);
}

// Rendezvous on the wire: the CTS answers the RTS once a receive is posted (before or after the
// request arrives), names the receive token, and the DATA frame lands in the receive buffer; a
// receive too small for the message is refused with the discard flag.
TEST_F(TcpWire, RendezvousGrantedWhenTheReceiveIsPosted) {
  Endpoint* ep = nullptr;
  const int fd = impostor(ep);
  ASSERT_NE(ep, nullptr);
  constexpr size_t kTotal = 200'000;
  uint32_t seq = 1;
  for (int when = 0; when < 2; ++when) {  // recv posted: before, after the request
    SCOPED_TRACE(when);
    const std::vector<uint8_t> msg = pattern(kTotal, static_cast<uint8_t>(when * 31));
    FrameHeader rts;
    rts.type = FrameType::kRts;
    rts.channel = 5;
    rts.seq = seq++;
    rts.id = 40 + static_cast<uint64_t>(when);
    rts.a0 = kTotal;
    std::vector<uint8_t> in(kTotal + 10, 0xEE);
    Request r;
    if (when == 0) r = ep->recv(5, in.data(), in.size());
    send_bytes(fd, frame(rts));
    if (when == 1) {
      for (int i = 0; i < 200; ++i) pair_.progress();
      r = ep->recv(5, in.data(), in.size());
    }
    std::vector<uint8_t> cts_bytes;
    FrameHeader cts;
    ASSERT_TRUE(read_frame(fd, cts_bytes, &cts));
    ASSERT_EQ(cts.type, FrameType::kCts);
    EXPECT_EQ(cts.id, rts.id);
    EXPECT_EQ(cts.flags, 0);
    EXPECT_FALSE(r.done());
    FrameHeader data;
    data.type = FrameType::kData;
    data.seq = seq++;
    data.id = cts.a0;
    send_bytes(fd, frame(data, msg));
    ASSERT_TRUE(pair_.wait({r}).ok()) << r.status();
    EXPECT_EQ(r.bytes(), kTotal);
    EXPECT_TRUE(std::equal(msg.begin(), msg.end(), in.begin()));
    EXPECT_EQ(in[kTotal], 0xEE);
  }
  FrameHeader rts;
  rts.type = FrameType::kRts;
  rts.channel = 6;
  rts.seq = seq++;
  rts.id = 50;
  rts.a0 = kTotal;
  std::vector<uint8_t> small(1000, 0xEE);
  Request r = ep->recv(6, small.data(), small.size());
  send_bytes(fd, frame(rts));
  std::vector<uint8_t> cts_bytes;
  FrameHeader cts;
  ASSERT_TRUE(read_frame(fd, cts_bytes, &cts));
  EXPECT_EQ(cts.type, FrameType::kCts);
  EXPECT_NE(cts.flags & internal::tcp::kFlagDiscard, 0);
  ASSERT_TRUE(r.done());
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange) << r.status();
  EXPECT_EQ(small, std::vector<uint8_t>(1000, 0xEE));
  ::close(fd);
}

TEST_F(TcpWire, RendezvousFramesOfTheWrongSize) {
  auto f = hello();
  FrameHeader rts;
  rts.type = FrameType::kRts;
  rts.seq = 1;
  rts.a0 = 100;
  auto bad = frame(rts, std::vector<uint8_t>(100, 1));  // a request carries no payload
  f.insert(f.end(), bad.begin(), bad.end());
  expect_rejected(f, "claims 100 payload bytes (limit 0)");

  // DATA must bring exactly the announced size.
  Endpoint* ep = nullptr;
  ::testing::internal::CaptureStderr();
  const int fd = impostor(ep);
  ASSERT_NE(ep, nullptr);
  std::vector<uint8_t> in(300);
  Request r = ep->recv(0, in.data(), in.size());
  rts.a0 = 200;
  send_bytes(fd, frame(rts));
  std::vector<uint8_t> cts_bytes;
  FrameHeader cts;
  ASSERT_TRUE(read_frame(fd, cts_bytes, &cts));
  FrameHeader data;
  data.type = FrameType::kData;
  data.seq = 2;
  data.id = cts.a0;
  send_bytes(fd, frame(data, std::vector<uint8_t>(300, 2)));
  const bool closed = closed_by_peer(fd);
  const std::string log = ::testing::internal::GetCapturedStderr();
  ::close(fd);
  EXPECT_TRUE(closed);
  EXPECT_NE(log.find("data of 300 bytes for a 200-byte rendezvous"), std::string::npos) << log;
  ASSERT_TRUE(r.done());
  EXPECT_FALSE(r.status().ok());
}

TEST(TcpBlocking, SpinThenBlockAcrossThreads) {
  Options o;
  o.progress = ProgressMode::kSpinThenBlock;
  o.spin_before_block = std::chrono::microseconds(10);
  o.backend = Backend::kTcp;
  o.name = "sleeper-a";
  auto a = Context::create(o);
  o.name = "sleeper-b";
  auto b = Context::create(o);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<uint8_t> addr_a = (*a)->address(), addr_b = (*b)->address();
  constexpr int kRounds = 200;
  std::thread peer([&] {
    auto ep = (*b)->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    for (int i = 0; i < kRounds; ++i) {
      uint64_t v = 0;
      ASSERT_TRUE((*b)->wait((*ep)->recv(0, &v, 8), Deadline::after_ms(20000)).ok());
      ++v;
      ASSERT_TRUE((*b)->wait((*ep)->send(0, &v, 8), Deadline::after_ms(20000)).ok());
    }
  });
  auto ep = (*a)->connect(addr_b);
  ASSERT_TRUE(ep.ok());
  for (uint64_t i = 0; i < kRounds; ++i) {
    uint64_t v = i * 2, back = 0;
    Request r = (*ep)->recv(0, &back, 8);
    ASSERT_TRUE((*a)->wait((*ep)->send(0, &v, 8), Deadline::after_ms(20000)).ok());
    ASSERT_TRUE((*a)->wait(r, Deadline::after_ms(20000)).ok());
    ASSERT_EQ(back, v + 1);
  }
  peer.join();
}

// Two blocking Contexts on their own threads, connected, with a first exchange done (so each
// has exactly one open connection and sleeps in that socket's recv).
struct BlockingPair {
  std::unique_ptr<Context> a, b;
  Endpoint* ab = nullptr;  // a's endpoint to b
  Endpoint* ba = nullptr;  // b's endpoint to a (touched only by b's thread)

  // A TCP Context that spins 10 us, then sleeps; null (and a test failure) when it cannot open.
  static std::unique_ptr<Context> context(const char* name) {
    Options o;
    o.progress = ProgressMode::kSpinThenBlock;
    o.spin_before_block = std::chrono::microseconds(10);
    o.backend = Backend::kTcp;
    o.name = name;
    auto made = Context::create(o);
    EXPECT_TRUE(made.ok()) << made.status();
    return made.ok() ? std::move(made).value() : nullptr;
  }
  static BlockingPair make() {
    BlockingPair p;
    p.a = context("block-a");
    p.b = context("block-b");
    return p;
  }
};

// Rendezvous-sized messages both ways: the waits sleep in recv while idle and in poll on the
// socket while a payload is queued for sending.
TEST(TcpBlocking, LargeMessagesBothWaysAcrossThreads) {
  BlockingPair p = BlockingPair::make();
  constexpr size_t kSize = (size_t{4} << 20) + 3;
  constexpr int kRounds = 6;
  std::vector<uint8_t> addr_a = p.a->address(), addr_b = p.b->address();
  std::thread peer([&] {
    auto ep = p.b->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    std::vector<uint8_t> buf(kSize);
    for (int i = 0; i < kRounds; ++i) {
      ASSERT_TRUE(
          p.b->wait((*ep)->recv(0, buf.data(), buf.size()), Deadline::after_ms(20000)).ok());
      for (auto& x : buf) x = static_cast<uint8_t>(x + 1);
      ASSERT_TRUE(
          p.b->wait((*ep)->send(0, buf.data(), buf.size()), Deadline::after_ms(20000)).ok());
    }
  });
  auto ep = p.a->connect(addr_b);
  ASSERT_TRUE(ep.ok());
  std::vector<uint8_t> out(kSize), in(kSize);
  for (int i = 0; i < kRounds; ++i) {
    for (size_t k = 0; k < kSize; ++k)
      out[k] = static_cast<uint8_t>(k * 7 + static_cast<size_t>(i));
    Request r = (*ep)->recv(0, in.data(), in.size());
    ASSERT_TRUE(p.a->wait((*ep)->send(0, out.data(), out.size()), Deadline::after_ms(20000)).ok());
    ASSERT_TRUE(p.a->wait(r, Deadline::after_ms(20000)).ok());
    ASSERT_EQ(r.bytes(), kSize);
    for (size_t k = 0; k < kSize; k += 4099)
      ASSERT_EQ(in[k], static_cast<uint8_t>(out[k] + 1)) << k;
    ASSERT_EQ(in[kSize - 1], static_cast<uint8_t>(out[kSize - 1] + 1));
  }
  peer.join();
}

// Frames of every kind interleaved, both ways at once: rendezvous payloads (above the eager
// limit), large eager frames, small and empty ones, each received into a receive posted before
// it arrives or only after. The reader switches between reading a header alone (after a large
// frame, and while a cleared rendezvous payload is due) and filling its staging buffer; every
// byte must still land in its own receive.
TEST(TcpBlocking, MixedFrameSizesBothWaysLandIntact) {
  const std::vector<size_t> sizes = {256 << 10, 0,         100 << 10, 3,         (256 << 10) + 5,
                                     70000,     4096,      1 << 20,   17,        100 << 10,
                                     100 << 10, 256 << 10, 1,         128 << 10, 65535};
  constexpr int kRounds = 4;
  const auto context = [](const char* name) -> std::unique_ptr<Context> {
    Options o;
    o.progress = ProgressMode::kSpinThenBlock;
    o.spin_before_block = std::chrono::microseconds(10);
    o.backend = Backend::kTcp;
    o.name = name;
    o.eager_limit = 128 << 10;  // 70000 and 100 KiB go eager, 256 KiB and up by rendezvous
    auto made = Context::create(o);
    EXPECT_TRUE(made.ok()) << made.status();
    return made.ok() ? std::move(made).value() : nullptr;
  };
  const auto pattern = [](int side, int round, size_t index, size_t k) {
    return static_cast<uint8_t>(k * 31 + index * 7 + static_cast<size_t>(round) * 13 +
                                static_cast<size_t>(side));
  };
  // One side: in every round, receives for the even messages are posted before anything is sent,
  // those for the odd ones only after this side's sends (their frames may be in by then). Each
  // message has its own channel, so the order of posting does not decide the matching.
  const auto run_side = [&](Context& ctx, Endpoint& ep, int side) {
    std::vector<std::vector<uint8_t>> out(sizes.size()), in(sizes.size());
    for (int round = 0; round < kRounds; ++round) {
      SCOPED_TRACE("side " + std::to_string(side) + " round " + std::to_string(round));
      std::vector<Request> recvs(sizes.size()), sends;
      for (size_t i = 0; i < sizes.size(); ++i) {
        out[i].resize(sizes[i]);
        for (size_t k = 0; k < sizes[i]; ++k) out[i][k] = pattern(side, round, i, k);
        in[i].assign(sizes[i] + 1, 0xEE);  // one spare byte: nothing may land past the message
      }
      const auto post_recv = [&](size_t i) {
        recvs[i] = ep.recv(static_cast<uint32_t>(i), in[i].data(), in[i].size());
      };
      for (size_t i = 0; i < sizes.size(); i += 2) post_recv(i);
      for (size_t i = 0; i < sizes.size(); ++i) {
        sends.push_back(ep.send(static_cast<uint32_t>(i), out[i].data(), out[i].size()));
      }
      for (size_t i = 1; i < sizes.size(); i += 2) post_recv(i);
      for (Request& r : sends) ASSERT_TRUE(ctx.wait(r, Deadline::after_ms(20000)).ok());
      for (size_t i = 0; i < sizes.size(); ++i) {
        ASSERT_TRUE(ctx.wait(recvs[i], Deadline::after_ms(20000)).ok()) << i << recvs[i].status();
        ASSERT_EQ(recvs[i].bytes(), sizes[i]) << i;
        for (size_t k = 0; k < sizes[i]; ++k) {
          ASSERT_EQ(in[i][k], pattern(1 - side, round, i, k)) << "message " << i << " byte " << k;
        }
        ASSERT_EQ(in[i][sizes[i]], 0xEE) << i;
      }
    }
  };
  std::unique_ptr<Context> a = context("mixed-a"), b = context("mixed-b");
  ASSERT_TRUE(a && b);
  std::vector<uint8_t> addr_a = a->address(), addr_b = b->address();
  std::thread peer([&] {
    auto ep = b->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    run_side(*b, **ep, 1);
  });
  auto ep = a->connect(addr_b);
  ASSERT_TRUE(ep.ok());
  run_side(*a, **ep, 0);
  peer.join();
}

// A large payload raises the socket's receive watermark (SO_RCVLOWAT) while it is read; once it
// is in, a small message sent only later must still wake a receiver asleep on the epoll set (two
// connections) rather than wait for a watermark's worth of bytes that never come.
TEST(TcpBlocking, SmallMessageAfterALargeOneWakesASleeperWithSeveralConnections) {
  BlockingPair p = BlockingPair::make();
  std::unique_ptr<Context> c = BlockingPair::context("block-c");
  ASSERT_TRUE(p.a && p.b && c);
  std::vector<uint8_t> addr_a = p.a->address(), addr_b = p.b->address(), addr_c = c->address();
  constexpr size_t kLarge = (size_t{3} << 20) + 5;
  constexpr int kRounds = 4;
  std::atomic<bool> a_done{false};  // release: a has all it waits for; acquire in c's thread
  std::thread peer_c([&] {
    auto ep = c->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    uint64_t v = 7;
    ASSERT_TRUE(c->wait((*ep)->send(1, &v, 8), Deadline::after_ms(20000)).ok());
    const Deadline limit = Deadline::after_ms(60000);
    while (!a_done.load(std::memory_order_acquire) && !limit.expired()) {
      c->progress();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  std::thread peer_b([&] {
    auto ep = p.b->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    std::vector<uint8_t> big(kLarge);
    for (int i = 0; i < kRounds; ++i) {
      for (size_t k = 0; k < kLarge; ++k) big[k] = static_cast<uint8_t>(k * 13 + i);
      ASSERT_TRUE(
          p.b->wait((*ep)->send(0, big.data(), big.size()), Deadline::after_ms(20000)).ok());
      uint64_t ack = 0;
      ASSERT_TRUE(p.b->wait((*ep)->recv(0, &ack, 8), Deadline::after_ms(20000)).ok());
      ASSERT_EQ(ack, static_cast<uint64_t>(i));
      const uint64_t small = 1000 + static_cast<uint64_t>(i);
      ASSERT_TRUE(p.b->wait((*ep)->send(0, &small, 8), Deadline::after_ms(20000)).ok());
    }
  });
  auto to_c = p.a->connect(addr_c);
  auto to_b = p.a->connect(addr_b);
  ASSERT_TRUE(to_c.ok() && to_b.ok());
  uint64_t v = 0;
  ASSERT_TRUE(p.a->wait((*to_c)->recv(1, &v, 8), Deadline::after_ms(20000)).ok());
  EXPECT_EQ(v, 7u);
  std::vector<uint8_t> in(kLarge);
  for (int i = 0; i < kRounds; ++i) {
    SCOPED_TRACE(i);
    Request big = (*to_b)->recv(0, in.data(), in.size());
    ASSERT_TRUE(p.a->wait(big, Deadline::after_ms(20000)).ok()) << big.status();
    ASSERT_EQ(big.bytes(), kLarge);
    for (size_t k = 0; k < kLarge; k += 4093) ASSERT_EQ(in[k], static_cast<uint8_t>(k * 13 + i));
    // Posted before the ack goes out, so a sleeps for it with nothing else on the way.
    uint64_t small = 0;
    Request r = (*to_b)->recv(0, &small, 8);
    const uint64_t ack = static_cast<uint64_t>(i);
    ASSERT_TRUE(p.a->wait((*to_b)->send(0, &ack, 8), Deadline::after_ms(20000)).ok());
    ASSERT_TRUE(p.a->wait(r, Deadline::after_ms(20000)).ok()) << r.status();
    EXPECT_EQ(small, 1000 + static_cast<uint64_t>(i));
  }
  a_done.store(true, std::memory_order_release);
  peer_b.join();
  peer_c.join();
}

// A wait asleep in recv on a quiet connection still ends at its deadline, and a peer that goes
// away wakes it with an error naming that peer.
TEST(TcpBlocking, BlockedWaitEndsAtItsDeadlineAndOnPeerDeath) {
  BlockingPair p = BlockingPair::make();
  std::vector<uint8_t> addr_a = p.a->address(), addr_b = p.b->address();
  std::atomic<bool> a_done{false};  // release: a finished its timed wait; acquire in the peer
  std::thread peer([&] {
    auto ep = p.b->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    uint64_t v = 7;
    ASSERT_TRUE(p.b->wait((*ep)->send(0, &v, 8), Deadline::after_ms(20000)).ok());
    // Keep the connection open and quiet until a has timed out once, then go away.
    const Deadline limit = Deadline::after_ms(20000);
    while (!a_done.load(std::memory_order_acquire) && !limit.expired()) {
      p.b->progress();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    p.b.reset();
  });
  auto ep = p.a->connect(addr_b);
  ASSERT_TRUE(ep.ok());
  uint64_t v = 0;
  ASSERT_TRUE(p.a->wait((*ep)->recv(0, &v, 8), Deadline::after_ms(20000)).ok());
  ASSERT_EQ(v, 7u);
  Request r = (*ep)->recv(0, &v, 8);
  expect_wait_times_out_at_150_ms(*p.a, r);
  a_done.store(true, std::memory_order_release);
  const int64_t t1 = monotonic_ns();
  Status s = p.a->wait(r, Deadline::after_ms(20000));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("block-b"), std::string_view::npos) << s;
  EXPECT_LT((monotonic_ns() - t1) / 1'000'000, 10000) << "the peer's death did not wake the wait";
  peer.join();
}

// With two connections the wait sleeps in epoll_wait on the set itself: it still ends at its
// deadline while both are quiet, a message on the other connection wakes it, and the waited
// peer's death wakes it with an error naming that peer.
TEST(TcpBlocking, WaitWithSeveralConnectionsEndsAtItsDeadlineOnTheOtherPeerAndOnDeath) {
  BlockingPair p = BlockingPair::make();
  std::unique_ptr<Context> c = BlockingPair::context("block-c");
  ASSERT_TRUE(p.a && p.b && c);
  std::vector<uint8_t> addr_a = p.a->address(), addr_b = p.b->address(), addr_c = c->address();
  // release: a is done with the step named; acquire in the peers' threads
  std::atomic<int> a_step{0};
  auto quiet_until = [&](Context& ctx, int step) {
    const Deadline limit = Deadline::after_ms(20000);
    while (a_step.load(std::memory_order_acquire) < step && !limit.expired()) {
      ctx.progress();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  std::thread peer_b([&] {
    auto ep = p.b->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    uint64_t v = 1;
    ASSERT_TRUE(p.b->wait((*ep)->send(0, &v, 8), Deadline::after_ms(20000)).ok());
    quiet_until(*p.b, 2);  // until a has its message from c
    p.b.reset();
  });
  std::thread peer_c([&] {
    auto ep = c->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    uint64_t v = 2;
    ASSERT_TRUE(c->wait((*ep)->send(0, &v, 8), Deadline::after_ms(20000)).ok());
    quiet_until(*c, 1);  // until a's wait on b has timed out
    v = 3;
    ASSERT_TRUE(c->wait((*ep)->send(0, &v, 8), Deadline::after_ms(20000)).ok());
    quiet_until(*c, 3);  // c stays until a has seen b go away
  });
  auto to_b = p.a->connect(addr_b);
  auto to_c = p.a->connect(addr_c);
  ASSERT_TRUE(to_b.ok() && to_c.ok());
  uint64_t from_b = 0, from_c = 0;
  ASSERT_TRUE(p.a->wait((*to_b)->recv(0, &from_b, 8), Deadline::after_ms(20000)).ok());
  ASSERT_TRUE(p.a->wait((*to_c)->recv(0, &from_c, 8), Deadline::after_ms(20000)).ok());
  ASSERT_EQ(from_b, 1u);
  ASSERT_EQ(from_c, 2u);

  Request rb = (*to_b)->recv(0, &from_b, 8);
  Request rc = (*to_c)->recv(0, &from_c, 8);
  expect_wait_times_out_at_150_ms(*p.a, rb);
  a_step.store(1, std::memory_order_release);
  Status s = p.a->wait(rc, Deadline::after_ms(20000));
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(from_c, 3u);
  a_step.store(2, std::memory_order_release);
  const int64_t t1 = monotonic_ns();
  s = p.a->wait(rb, Deadline::after_ms(20000));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("block-b"), std::string_view::npos) << s;
  EXPECT_LT((monotonic_ns() - t1) / 1'000'000, 10000) << "the peer's death did not wake the wait";
  a_step.store(3, std::memory_order_release);
  peer_b.join();
  peer_c.join();
}

// A peer that connects while a Context sleeps in its only connection's recv (that socket out of
// the epoll set) is served within a sleep or two: its put is acknowledged by the sleeper's
// progress engine long before the sleeper's own message arrives.
TEST(TcpBlocking, NewPeerIsServedWhileTheOnlyConnectionSleeps) {
  BlockingPair p = BlockingPair::make();
  std::vector<uint8_t> addr_a = p.a->address(), addr_b = p.b->address();
  auto tcp_entry = [](const std::vector<uint8_t>& address) {
    auto parsed = internal::parse_address(address);
    EXPECT_TRUE(parsed.ok());
    return *parsed->entry(Backend::kTcp);
  };
  // The newcomer must be the one that dials (the smaller address), so that a's application,
  // busy waiting on b, need not call connect() for it.
  Options o;
  o.progress = ProgressMode::kSpinThenBlock;
  o.backend = Backend::kTcp;
  o.name = "block-c";
  std::unique_ptr<Context> c;
  for (int i = 0; i < 200 && c == nullptr; ++i) {
    auto made = Context::create(o);
    ASSERT_TRUE(made.ok());
    if (tcp_entry((*made)->address()) < tcp_entry(addr_a)) c = std::move(made).value();
  }
  if (c == nullptr) GTEST_SKIP() << "no Context with an address below a's in 200 tries";
  std::vector<uint8_t> addr_c = c->address();
  std::vector<uint8_t> target(8, 0);
  auto region = p.a->register_memory(target.data(), target.size(), Access::kRemoteWrite);
  ASSERT_TRUE(region.ok());
  const RemoteKey key = region->remote_key();

  std::atomic<bool> put_done{false};  // release: c's put was acknowledged; acquire in b's thread
  std::atomic<int64_t> put_ms{-1};
  std::thread newcomer([&] {
    // Let a fall asleep on its connection to b first (its only one then).
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    const int64_t t0 = monotonic_ns();
    auto ep = c->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    uint64_t v = 0x1234;
    Status s = c->wait((*ep)->put(&v, 8, key, 0), Deadline::after_ms(10000));
    EXPECT_TRUE(s.ok()) << s;
    put_ms.store((monotonic_ns() - t0) / 1'000'000, std::memory_order_relaxed);
    put_done.store(true, std::memory_order_release);
  });
  std::thread peer([&] {
    auto ep = p.b->connect(addr_a);
    ASSERT_TRUE(ep.ok());
    uint64_t v = 1;
    ASSERT_TRUE(p.b->wait((*ep)->send(0, &v, 8), Deadline::after_ms(10000)).ok());
    const Deadline limit = Deadline::after_ms(10000);
    while (!put_done.load(std::memory_order_acquire) && !limit.expired()) {
      p.b->progress();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    v = 2;
    ASSERT_TRUE(p.b->wait((*ep)->send(0, &v, 8), Deadline::after_ms(10000)).ok());
  });
  auto ep = p.a->connect(addr_b);
  ASSERT_TRUE(ep.ok());
  uint64_t v = 0;
  ASSERT_TRUE(p.a->wait((*ep)->recv(0, &v, 8), Deadline::after_ms(10000)).ok());
  ASSERT_TRUE(p.a->wait((*ep)->recv(0, &v, 8), Deadline::after_ms(15000)).ok());
  EXPECT_EQ(v, 2u);
  newcomer.join();
  peer.join();
  uint64_t landed = 0;
  std::memcpy(&landed, target.data(), 8);
  EXPECT_EQ(landed, 0x1234u);
  EXPECT_GE(put_ms.load(std::memory_order_relaxed), 0);
  EXPECT_LT(put_ms.load(std::memory_order_relaxed), 3000)
      << "the sleeper left a new connection waiting for seconds";
}

// Waits (up to 10 s) until one of this process's sockets has bytes to read; false if none does.
// Tells a test that a message sent over loopback has reached its receiver's socket.
bool some_socket_readable() {
  std::vector<pollfd> fds;
  for (int fd = 0; fd < 1024; ++fd) {
    struct stat st {};
    if (::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) fds.push_back(pollfd{fd, POLLIN, 0});
  }
  return ::poll(fds.data(), fds.size(), 10000) > 0;
}

// With several connections, a poll that finds the connection which delivered last quiet asks the
// epoll set in that same poll: a message already waiting on another connection is delivered by
// one progress() call, every time. (A poll-and-yield wait hands the CPU on after each empty
// poll, so every extra poll there costs a turn of whatever else runs on this CPU.)
TEST(TcpProgress, QuietHotConnectionLetsTheSameProgressServeAnother) {
  Options o;
  o.progress = ProgressMode::kBusyPoll;
  o.backend = Backend::kTcp;
  o.name = "hot-a";
  auto a = Context::create(o);
  o.name = "hot-b";
  auto b = Context::create(o);
  o.name = "hot-c";
  auto c = Context::create(o);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  auto ab = (*a)->connect((*b)->address());
  auto ba = (*b)->connect((*a)->address());
  auto ac = (*a)->connect((*c)->address());
  auto ca = (*c)->connect((*a)->address());
  ASSERT_TRUE(ab.ok() && ba.ok() && ac.ok() && ca.ok());
  // Progresses all three until every request is done (each is checked before the next poll).
  auto settle = [&](std::initializer_list<const Request*> rs) {
    const Deadline limit = Deadline::after_ms(10000);
    for (;;) {
      bool all = true;
      for (const Request* r : rs) all = all && r->done();
      if (all || limit.expired()) return all;
      (*a)->progress();
      (*b)->progress();
      (*c)->progress();
    }
  };
  {  // Both connections open (hellos done) before a stops polling while c sends.
    uint64_t v = 7, from_b = 0, from_c = 0;
    Request rb = (*ab)->recv(1, &from_b, 8), rc = (*ac)->recv(1, &from_c, 8);
    Request sb = (*ba)->send(1, &v, 8), sc = (*ca)->send(1, &v, 8);
    ASSERT_TRUE(settle({&rb, &rc, &sb, &sc}));
    ASSERT_TRUE(rb.status().ok() && rc.status().ok()) << rb.status() << " " << rc.status();
  }
  for (uint64_t round = 0; round < 16; ++round) {
    uint64_t vb = round, vc = 1000 + round, from_b = ~0ull, from_c = ~0ull;
    // b's connection delivers last: it is a's hot connection.
    Request rb = (*ab)->recv(0, &from_b, 8);
    Request sb = (*ba)->send(0, &vb, 8);
    ASSERT_TRUE(settle({&rb, &sb})) << "round " << round;
    ASSERT_TRUE(rb.status().ok() && sb.status().ok()) << rb.status() << " " << sb.status();
    ASSERT_EQ(from_b, vb);
    // c's message reaches a's socket while a does not poll.
    Request sc = (*ca)->send(0, &vc, 8);
    const Deadline limit = Deadline::after_ms(10000);
    while (!sc.done() && !limit.expired()) (*c)->progress();
    ASSERT_TRUE(sc.done() && sc.status().ok()) << sc.status();
    ASSERT_TRUE(some_socket_readable()) << "round " << round;
    Request rc = (*ac)->recv(0, &from_c, 8);
    (*a)->progress();
    EXPECT_TRUE(rc.done()) << "round " << round << ": one poll read only the quiet connection to b";
    ASSERT_TRUE(settle({&rc})) << "round " << round;
    ASSERT_TRUE(rc.status().ok()) << rc.status();
    EXPECT_EQ(from_c, vc);
  }
}

TEST(TcpAddressing, AddressEncodingRoundTripsAndRejectsGarbage) {
  auto ctx = Context::create(options_for(Backend::kTcp, "addr"));
  ASSERT_TRUE(ctx.ok());
  const auto& bytes = (*ctx)->address();
  auto parsed = internal::parse_address(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->name, "addr");
  EXPECT_EQ(parsed->node_id, local_node_id());
  EXPECT_EQ(internal::encode_address(*parsed), bytes);
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    EXPECT_FALSE(internal::parse_address(std::span(bytes.data(), cut)).ok()) << cut;
  }
  auto extra = bytes;
  extra.push_back(0);
  EXPECT_FALSE(internal::parse_address(extra).ok());
  auto version = bytes;
  version[4] = 2;
  EXPECT_EQ(internal::parse_address(version).status().code(), StatusCode::kInvalidArgument);
  // Fuzz: random mutations never crash and usually fail.
  std::mt19937 rng(1);
  for (int i = 0; i < 2000; ++i) {
    auto m = bytes;
    m[rng() % m.size()] = static_cast<uint8_t>(rng());
    (void)internal::parse_address(m);
    (void)(*ctx)->choice_for(m);
  }
}

TEST(TcpAddressing, NamedBackendOpensOnlyThatOne) {
  auto ctx = Context::create(options_for(Backend::kTcp, "only-tcp"));
  ASSERT_TRUE(ctx.ok());
  EXPECT_EQ((*ctx)->backends(), std::vector<Backend>{Backend::kTcp});
  auto limits = (*ctx)->limits(Backend::kTcp);
  ASSERT_TRUE(limits.ok());
  EXPECT_GT(limits->eager_limit, 0u);
  EXPECT_FALSE((*ctx)->limits(Backend::kVerbs).ok());
  Options bad;
  bad.listen_address = "not-an-ip";
  bad.backend = Backend::kTcp;
  EXPECT_EQ(Context::create(bad).status().code(), StatusCode::kInvalidArgument);
}

// The SO_SNDBUF of every connected TCP socket of this process with `port` at one end.
std::vector<int> send_buffers_of_connections_to(uint16_t port) {
  std::vector<int> found;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return found;
  while (dirent* e = ::readdir(dir)) {
    const int fd = std::atoi(e->d_name);
    if (e->d_name[0] < '0' || e->d_name[0] > '9' || fd == ::dirfd(dir)) continue;
    sockaddr_in local{};
    sockaddr_in peer{};
    socklen_t ll = sizeof(local);
    socklen_t pl = sizeof(peer);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) != 0 ||
        ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0 ||
        local.sin_family != AF_INET) {
      continue;  // not a connected IPv4 socket (listeners have no peer)
    }
    if (ntohs(local.sin_port) != port && ntohs(peer.sin_port) != port) continue;
    int v = 0;
    socklen_t vl = sizeof(v);
    if (::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, &vl) == 0) found.push_back(v);
  }
  ::closedir(dir);
  return found;
}

// The send buffers of both ends of a same-host connection after a message each way.
std::vector<int> send_buffers_after_exchange(Options base) {
  auto p = Pair::make(Backend::kTcp, std::move(base));
  EXPECT_TRUE(p.ok()) << p.status();
  if (!p.ok()) return {};
  std::vector<uint8_t> out(1 << 20, 7);
  std::vector<uint8_t> in(out.size());
  std::vector<Request> reqs;
  reqs.push_back(p->ba->recv(1, in.data(), in.size()));
  reqs.push_back(p->ab->send(1, out.data(), out.size()));
  EXPECT_TRUE(p->wait(std::move(reqs)).ok());
  EXPECT_EQ(in, out);
  // The Context with the smaller address dials, so the connection has one listener's port at one
  // end.
  std::vector<int> found;
  for (const Context* c : {p->a.get(), p->b.get()}) {
    auto parsed = internal::parse_address(c->address());
    EXPECT_TRUE(parsed.ok());
    if (!parsed.ok()) return {};
    auto addr = TcpAddress::decode(*parsed->entry(Backend::kTcp));
    EXPECT_TRUE(addr.ok());
    if (!addr.ok()) return {};
    for (int v : send_buffers_of_connections_to(addr->port)) found.push_back(v);
  }
  return found;
}

TEST(TcpSendBuffer, SameHostConnectionsGetTheConfiguredSendBuffer) {
  // Linux reports twice the size asked for (its bookkeeping overhead).
  const auto by_default = send_buffers_after_exchange({});
  ASSERT_EQ(by_default.size(), 2u) << "both ends of the one connection between the Contexts";
  for (int v : by_default) EXPECT_EQ(v, 2 * static_cast<int>(Options{}.tcp_local_send_buffer));

  Options small;
  small.tcp_local_send_buffer = 100000;
  const auto set = send_buffers_after_exchange(small);
  ASSERT_EQ(set.size(), 2u);
  for (int v : set) EXPECT_EQ(v, 200000);

  Options kernel;
  kernel.tcp_local_send_buffer = 0;  // the kernel's autotuning: neither size above
  const auto autotuned = send_buffers_after_exchange(kernel);
  ASSERT_EQ(autotuned.size(), 2u);
  for (int v : autotuned) {
    EXPECT_NE(v, 200000);
    EXPECT_NE(v, 2 * static_cast<int>(Options{}.tcp_local_send_buffer));
  }
}

TEST(TcpSendBuffer, OptionAndEnvironmentAreChecked) {
  Options o;
  o.tcp_local_send_buffer = kMaxTcpLocalSendBuffer + 1;
  EXPECT_EQ(o.validate().code(), StatusCode::kInvalidArgument);
  o.tcp_local_send_buffer = kMaxTcpLocalSendBuffer;
  EXPECT_TRUE(o.validate().ok());
  {
    ScopedEnv env("MYELIN_TCP_LOCAL_SNDBUF", "1048576");
    auto overlaid = Options{}.with_env_overlay();
    ASSERT_TRUE(overlaid.ok()) << overlaid.status();
    EXPECT_EQ(overlaid->tcp_local_send_buffer, size_t{1} << 20);
  }
  for (const char* bad : {"lots", "-1", "68719476736"}) {
    ScopedEnv env("MYELIN_TCP_LOCAL_SNDBUF", bad);
    EXPECT_EQ(Options{}.with_env_overlay().status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace myelin::transport::testing
