// Publisher-side coalescing and the buffers behind it: a batch is built in place in a buffer that
// is reused once it went out, and a lone message never waits for a batch. Checked at the queue
// (socket pairs, explicit clocks: no timing) and end to end through the real myelin-broker daemon
// with the publisher in another process (order, message boundaries, contents and credits).
#include <gtest/gtest.h>

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include <myelin/broker/client.hpp>
#include <myelin/broker/frame.hpp>

#include "broker_daemon.hpp"
#include "wire.hpp"

namespace myelin::broker {
namespace {

constexpr const char* kSecret = "client-batching-secret-0123456789";

// Message k's payload: its index in the first 8 bytes (when it has room), then a pattern of k.
std::vector<std::byte> message(uint64_t k, size_t size) {
  std::vector<std::byte> v(size);
  for (size_t i = 0; i < size; ++i) v[i] = static_cast<std::byte>((i * 31 + k * 7) & 0xFF);
  if (size > 0) std::memcpy(v.data(), &k, std::min<size_t>(8, size));
  return v;
}
bool is_message(uint64_t k, size_t size, std::span<const std::byte> got) {
  const auto want = message(k, size);
  return got.size() == size && (size == 0 || std::memcmp(got.data(), want.data(), size) == 0);
}
// Sizes cycle through these: empty, tiny, around the batching limit (4 KiB), one chunk and
// beyond (chunked, never batched).
constexpr size_t kSizes[] = {0, 1, 100, 1023, 1024, 4095, 4096, 4097, 65536, 70000};
size_t size_of(uint64_t k) {
  return kSizes[k % std::size(kSizes)];
}

struct Pair {
  internal::Fd a, b;
};
Pair socket_pair(int sndbuf) {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  Pair p{internal::Fd(sv[0]), internal::Fd(sv[1])};
  EXPECT_TRUE(internal::set_nonblocking(p.a.get()).ok());
  EXPECT_TRUE(internal::set_nonblocking(p.b.get()).ok());
  if (sndbuf > 0) ::setsockopt(p.a.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
  return p;
}

// Reads what `fd` holds and appends every message it decodes (batches unpacked, chunks put back
// together) to `out` as (id, payload).
struct Reader {
  internal::RxBuffer rx{DecodeLimits{}};
  Reassembler reasm;
  std::vector<std::pair<uint64_t, std::vector<std::byte>>> got;
  Status add(const FrameView& f) {
    if (f.header.flags & (kFlagMore | kFlagContinuation)) {
      AssembledMessage m;
      MYELIN_ASSIGN_OR_RETURN(bool done, reasm.add(f, &m));
      if (done) got.emplace_back(m.header.id, *m.payload);
      return ok_status();
    }
    if (f.header.type == FrameType::kBatch) {
      return for_each_in_batch(f.payload, DecodeLimits{}, [&](const FrameView& in) {
        got.emplace_back(in.header.id,
                         std::vector<std::byte>(in.payload.begin(), in.payload.end()));
        return ok_status();
      });
    }
    got.emplace_back(f.header.id, std::vector<std::byte>(f.payload.begin(), f.payload.end()));
    return ok_status();
  }
  Status drain(int fd) {
    while (true) {
      MYELIN_ASSIGN_OR_RETURN(size_t n, rx.read_from(fd));
      while (true) {
        FrameView f;
        MYELIN_ASSIGN_OR_RETURN(bool more, rx.next(&f));
        if (!more) break;
        MYELIN_RETURN_IF_ERROR(add(f));
      }
      if (n == 0) return ok_status();
    }
  }
};

FrameHeader publish_header(uint64_t k) {
  return FrameHeader{.type = FrameType::kPublish, .id = k};
}

TEST(OutQueueBatching, ReusedBatchBuffersKeepEveryBoundaryAndByteInOrder) {
  // Small socket buffers: batches go out in pieces, so a batch buffer is still queued (partly
  // written) while the next batches fill; reusing one too early would corrupt what follows.
  Pair p = socket_pair(4096);
  internal::OutQueue q(internal::OutOptions{.batch_bytes = 16 * 1024, .batch_count = 64});
  Reader r;
  constexpr uint64_t kMessages = 6000;
  int64_t now = 1'000'000'000;
  for (uint64_t k = 0; k < kMessages; ++k) {
    now += 1000;  // 1 us apart: close succession, so batchable messages are coalesced
    const auto payload = message(k, size_of(k));
    // Pushed without an owner from a buffer that dies right after the push: the queue copies
    // what it keeps.
    ASSERT_TRUE(q.push(publish_header(k), "tput/data", payload, nullptr, true, now).ok());
    if (k % 7 == 0) {
      ASSERT_TRUE(q.flush(p.a.get()).ok());
      ASSERT_TRUE(r.drain(p.b.get()).ok());
    }
  }
  q.close_due_batches(now, /*force=*/true);
  for (int spins = 0; spins < 100000; ++spins) {
    auto done = q.flush(p.a.get());
    ASSERT_TRUE(done.ok()) << done.status();
    ASSERT_TRUE(r.drain(p.b.get()).ok());
    if (*done && q.empty()) break;
  }
  ASSERT_TRUE(r.drain(p.b.get()).ok());
  EXPECT_GT(q.batches_sent(), 50u);  // coalescing did happen
  ASSERT_EQ(r.got.size(), kMessages);
  for (uint64_t k = 0; k < kMessages; ++k) {
    ASSERT_EQ(r.got[k].first, k) << "message " << k << " out of order";
    ASSERT_TRUE(is_message(k, size_of(k), r.got[k].second))
        << "message " << k << " of " << size_of(k) << " bytes arrived as " << r.got[k].second.size()
        << " bytes or altered";
  }
}

TEST(OutQueueBatching, ALoneMessageGoesAtOnceAndOnlyCloseSuccessionIsCoalesced) {
  Pair p = socket_pair(0);
  const int64_t window = 200'000;
  internal::OutQueue q(internal::OutOptions{.batch_window_ns = window});
  Reader r;
  const int64_t t0 = 5'000'000'000;
  const auto m0 = message(0, 1024);
  // Nothing before it: written by this call, readable on the other side at once.
  auto w = q.push_and_flush(p.a.get(), publish_header(0), "tput/data", m0, nullptr, true, t0);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(*w);
  ASSERT_TRUE(r.drain(p.b.get()).ok());
  ASSERT_EQ(r.got.size(), 1u);
  // Within the window of the previous one: coalesced, nothing on the wire until the batch closes.
  for (uint64_t k = 1; k <= 3; ++k) {
    w = q.push_and_flush(p.a.get(), publish_header(k), "tput/data", message(k, 1024), nullptr, true,
                         t0 + static_cast<int64_t>(k) * 1000);
    ASSERT_TRUE(w.ok()) << w.status();
  }
  ASSERT_TRUE(r.drain(p.b.get()).ok());
  EXPECT_EQ(r.got.size(), 1u);
  EXPECT_EQ(q.next_batch_deadline(), t0 + 1000 + window);
  q.close_due_batches(t0 + 1000 + window);
  w = q.flush(p.a.get());
  ASSERT_TRUE(w.ok() && *w);
  ASSERT_TRUE(r.drain(p.b.get()).ok());
  ASSERT_EQ(r.got.size(), 4u);
  EXPECT_EQ(q.batches_sent(), 1u);
  // A window after the last batchable message: lone again, written by the call (the recycled
  // buffer of the batch above is not involved in a lone write).
  const int64_t later = t0 + 3000 + window;
  w = q.push_and_flush(p.a.get(), publish_header(4), "tput/data", message(4, 1024), nullptr, true,
                       later);
  ASSERT_TRUE(w.ok() && *w);
  ASSERT_TRUE(r.drain(p.b.get()).ok());
  ASSERT_EQ(r.got.size(), 5u);
  for (uint64_t k = 0; k < 5; ++k) {
    EXPECT_EQ(r.got[k].first, k);
    EXPECT_TRUE(is_message(k, 1024, r.got[k].second)) << k;
  }
  // A batch of one goes out as the plain frame, without a batch header.
  w = q.push_and_flush(p.a.get(), publish_header(5), "tput/data", message(5, 10), nullptr, true,
                       later + 10);
  ASSERT_TRUE(w.ok());
  q.close_due_batches(later + 10, /*force=*/true);
  w = q.flush(p.a.get());
  ASSERT_TRUE(w.ok() && *w);
  EXPECT_EQ(q.batches_sent(), 1u);
  ASSERT_TRUE(r.drain(p.b.get()).ok());
  ASSERT_EQ(r.got.size(), 6u);
  EXPECT_TRUE(is_message(5, 10, r.got[5].second));
}

// The topic syntax (docs/broker.md, "Topics"), written out plainly: levels of 1-64 bytes of
// [A-Za-z0-9_.-], at most 255 bytes in all; the first level may start with '$' (then at least one
// more byte).
bool reference_topic_ok(std::string_view t) {
  if (t.empty() || t.size() > 255) return false;
  size_t start = 0;
  for (int level = 0;; ++level) {
    const size_t slash = t.find('/', start);
    const std::string_view l =
        t.substr(start, slash == std::string_view::npos ? t.npos : slash - start);
    if (l.empty() || l.size() > 64) return false;
    for (size_t i = 0; i < l.size(); ++i) {
      const char c = l[i];
      const bool plain =
          std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
      if (!plain && !(level == 0 && i == 0 && c == '$' && l.size() > 1)) return false;
    }
    if (slash == std::string_view::npos) return true;
    start = slash + 1;
  }
}

TEST(TopicSyntax, EveryPublishCheckAgreesWithTheWrittenRules) {
  const std::string edges[] = {"a",
                               "$",
                               "$a",
                               "$$a",
                               "a/$b",
                               "a//b",
                               "/a",
                               "a/",
                               "a b",
                               "a/*",
                               "a/#",
                               "grad/layer3/shard0",
                               "ctrl/step",
                               std::string(64, 'x'),
                               std::string(65, 'x'),
                               "a/" + std::string(64, 'y'),
                               std::string(255, 'z'),
                               std::string(256, 'z'),
                               "x/" + std::string(253, 'q'),
                               std::string("a\0b", 3),
                               "\xc3\xa9"};
  for (const std::string& t : edges) {
    EXPECT_EQ(validate_topic(t).ok(), reference_topic_ok(t)) << "'" << t << "'";
  }
  // Random strings over an alphabet with every character class that matters.
  const char alphabet[] = {'a', 'Z', '7', '_', '-', '.', '/', '$', '*', '#', ' ', '\0', '\xff'};
  uint64_t x = 0x9E3779B97F4A7C15ull;
  auto rnd = [&] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  for (int n = 0; n < 200000; ++n) {
    std::string t(1 + rnd() % 12, 'a');
    for (char& c : t) c = alphabet[rnd() % std::size(alphabet)];
    ASSERT_EQ(validate_topic(t).ok(), reference_topic_ok(t)) << "'" << t << "'";
  }
  // Long levels around the 64-byte limit, with and without a leading '$'.
  for (size_t len = 60; len <= 68; ++len) {
    for (const char* prefix : {"", "$"}) {
      const std::string t = prefix + std::string(len, 'k') + "/tail";
      EXPECT_EQ(validate_topic(t).ok(), reference_topic_ok(t)) << t.size();
    }
  }
}

// ---- end to end, with the myelin-broker daemon ------------------------------------------------

constexpr const char* kTputTopics =
    "[[topic]]\npattern = \"tput/#\"\nlane = \"bulk\"\nbatching = true\n";

class Daemon : public test_support::BrokerDaemon {
 public:
  // `broker_keys`: more [broker] keys (TOML lines); `heartbeat_ms`: broker and clients (0: the
  // defaults).
  explicit Daemon(const std::string& broker_keys = "", int heartbeat_ms = 0)
      : BrokerDaemon({.secret = kSecret,
                      .extra_config = broker_keys + kTputTopics,
                      .heartbeat_ms = heartbeat_ms,
                      .metrics = false,
                      .name = "client-batching"}) {}
};

// Reaps `pid` within the deadline; kills it otherwise. True when it exited 0.
bool child_ok(pid_t pid, Deadline d) {
  int st = 0;
  if (test_support::wait_exit(pid, d, &st)) return WIFEXITED(st) && WEXITSTATUS(st) == 0;
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return false;
}

TEST(ClientBatching, BurstFromAnotherProcessArrivesInOrderWholeAndALoneMessageFollows) {
  Daemon d;
  ASSERT_TRUE(d.up());
  // parent -> child, one byte each: "subscribed: publish the burst", "publish the lone message";
  // then end of file: "close". The child is forked before this process starts any thread.
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  constexpr uint64_t kBurst = 20000;
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(go[1]);
    auto next = [&](int want) {
      pollfd pf{.fd = go[0], .events = POLLIN, .revents = 0};
      char c;
      return ::poll(&pf, 1, 30000) == 1 && ::read(go[0], &c, 1) == want;
    };
    if (!next(1)) ::_exit(2);
    auto pub = Client::connect(d.client("pub"));
    if (!pub.ok()) ::_exit(3);
    const PublishOptions po{.lane = Lane::kBulk, .batch = true, .timeout_ms = 20000};
    for (uint64_t k = 0; k < kBurst; ++k) {
      if (!(*pub)->publish("tput/burst", message(k, size_of(k)), po).ok()) ::_exit(4);
    }
    if (!next(1)) ::_exit(5);
    if (!(*pub)->publish("tput/lone", message(kBurst, 512), po).ok()) ::_exit(6);
    // Stays open and idle until the parent has the lone message: it must arrive without the
    // closing flush pushing it out.
    if (!next(0)) ::_exit(7);
    ::_exit(0);
  }
  ::close(go[0]);
  ClientOptions so = d.client("sub");
  so.receive_window = 16;  // delivery credits go back and forth many times
  auto sub = Client::connect(so);
  ASSERT_TRUE(sub.ok()) << sub.status();
  ASSERT_TRUE((*sub)->subscribe("tput/#").ok());
  ASSERT_EQ(::write(go[1], "b", 1), 1);
  const Deadline burst_deadline = Deadline::after_ms(60000);
  for (uint64_t k = 0; k < kBurst; ++k) {
    auto m = (*sub)->poll(burst_deadline);
    ASSERT_TRUE(m.ok()) << "message " << k << ": " << m.status();
    ASSERT_EQ(m->topic, "tput/burst");
    EXPECT_EQ(m->missed_before, 0u) << k;
    ASSERT_TRUE(is_message(k, size_of(k), m->payload))
        << "message " << k << " (" << size_of(k) << " bytes) arrived as " << m->payload.size()
        << " bytes, out of order or altered";
  }
  ASSERT_EQ(::write(go[1], "l", 1), 1);
  // The lone message is not held for a batch that nothing else would fill: it arrives while the
  // publisher is still open and idle (a generous deadline: this asserts arrival, not timing).
  auto lone = (*sub)->poll(Deadline::after_ms(10000));
  ASSERT_TRUE(lone.ok()) << lone.status();
  EXPECT_EQ(lone->topic, "tput/lone");
  EXPECT_TRUE(is_message(kBurst, 512, lone->payload));
  ::close(go[1]);
  EXPECT_TRUE(child_ok(pid, Deadline::after_ms(30000)));
  EXPECT_EQ((*sub)->stats().gaps_missed, 0u);
}

// A batch that does not fill goes out when its window ends, also when the publisher then falls
// idle: the window is a timer that the publish opening the batch sets, which a batch closing full
// moves on to the next one and which the I/O thread, woken by it, sets again for what is still
// open. Round after round the publisher (another process) sends a short burst and then waits,
// idle, until the subscriber has all of it: 2, 42 or 82 messages of 1 KiB, so the burst ends in
// an open batch after no batch, one lone message, or a batch that filled and went out by size.
TEST(ClientBatching, AnOpenBatchGoesOutWhenItsWindowEndsRoundAfterRound) {
  Daemon d;
  ASSERT_TRUE(d.up());
  // parent -> child, one byte per round: "publish the next burst"; end of file: "close".
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  constexpr int kRounds = 60;
  constexpr size_t kSize = 1024;
  auto burst = [](int round) -> uint64_t { return 2 + static_cast<uint64_t>(round % 3) * 40; };
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(go[1]);
    auto next = [&] {
      pollfd pf{.fd = go[0], .events = POLLIN, .revents = 0};
      char c;
      return ::poll(&pf, 1, 30000) == 1 && ::read(go[0], &c, 1) == 1;
    };
    auto pub = Client::connect(d.client("pub"));
    if (!pub.ok()) ::_exit(3);
    const PublishOptions po{.lane = Lane::kBulk, .batch = true, .timeout_ms = 20000};
    uint64_t k = 0;
    for (int round = 0; round < kRounds; ++round) {
      if (!next()) ::_exit(4);
      for (uint64_t i = 0; i < burst(round); ++i, ++k) {
        if (!(*pub)->publish("tput/window", message(k, kSize), po).ok()) ::_exit(5);
      }
    }
    // Every round's burst ended in an open batch, which the batch timer sent (the I/O thread's
    // idle wake-ups, at most 50 ms apart, would send it too, so arrival alone does not show the
    // timer; a tick may also come first now and then, hence half).
    if ((*pub)->stats().timer_flushes < kRounds / 2) ::_exit(7);
    // Open and idle until the parent closes the pipe: nothing left for the closing flush.
    char c;
    pollfd pf{.fd = go[0], .events = POLLIN, .revents = 0};
    if (::poll(&pf, 1, 30000) != 1 || ::read(go[0], &c, 1) != 0) ::_exit(6);
    ::_exit(0);
  }
  ::close(go[0]);
  auto sub = Client::connect(d.client("sub"));
  ASSERT_TRUE(sub.ok()) << sub.status();
  ASSERT_TRUE((*sub)->subscribe("tput/#").ok());
  uint64_t k = 0;
  for (int round = 0; round < kRounds; ++round) {
    ASSERT_EQ(::write(go[1], "r", 1), 1);
    // A generous deadline: this asserts that the tail arrives while the publisher is idle, not
    // how soon.
    const Deadline round_deadline = Deadline::after_ms(10000);
    for (uint64_t i = 0; i < burst(round); ++i, ++k) {
      auto m = (*sub)->poll(round_deadline);
      ASSERT_TRUE(m.ok()) << "round " << round << ", message " << i << " of " << burst(round)
                          << ": " << m.status();
      ASSERT_EQ(m->topic, "tput/window");
      EXPECT_EQ(m->missed_before, 0u) << k;
      ASSERT_TRUE(is_message(k, kSize, m->payload))
          << "message " << k << " out of order or altered";
    }
  }
  ::close(go[1]);
  EXPECT_TRUE(child_ok(pid, Deadline::after_ms(30000)));
  EXPECT_EQ((*sub)->stats().gaps_missed, 0u);
}

// Handlers on the I/O thread behind a small delivery window (the credits of what they were handed
// go back with the next delivery's update or at the end of each read), fed by a publisher in
// another process held to a small publish window (credits back half a window at a time, added
// without the client's mutex while it publishes): every message arrives once, in order, whole.
// A credit left uncounted at the end of a read, or a publisher that misses a grant, stalls the
// stream and fails the deadline.
TEST(ClientBatching, HandlersAndSmallCreditWindowsKeepEveryMessageFlowing) {
  // Default heartbeats: a pass of handlers longer than three of them (TSan on a loaded machine)
  // keeps the session, since its credits reach the control connection meanwhile
  // (SlowHandlersKeepTheirSession... below checks that on purpose).
  Daemon d("publish_credits = 16\n");
  ASSERT_TRUE(d.up());
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  constexpr uint64_t kN = 3000;
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(go[1]);
    pollfd pf{.fd = go[0], .events = POLLIN, .revents = 0};
    char c;
    if (::poll(&pf, 1, 30000) != 1 || ::read(go[0], &c, 1) != 1) ::_exit(2);
    auto pub = Client::connect(d.client("pub"));
    if (!pub.ok()) ::_exit(3);
    const PublishOptions po{.lane = Lane::kBulk, .batch = true, .timeout_ms = 20000};
    for (uint64_t k = 0; k < kN; ++k) {
      if (!(*pub)->publish("tput/credits", message(k, size_of(k)), po).ok()) ::_exit(4);
    }
    // A window of 16 for 3000 messages: the publisher waited for grants.
    if ((*pub)->stats().publish_stalls == 0) ::_exit(5);
    // Open until the parent has everything (end of file on the pipe).
    if (::poll(&pf, 1, 60000) != 1 || ::read(go[0], &c, 1) != 0) ::_exit(6);
    ::_exit(0);
  }
  ::close(go[0]);
  ClientOptions so = d.client("sub");
  so.receive_window = 64;  // a credit frame every 8 messages
  auto sub = Client::connect(so);
  ASSERT_TRUE(sub.ok()) << sub.status();
  std::mutex mu;
  std::condition_variable cv;
  uint64_t next = 0, bad = 0, first_bad = UINT64_MAX;
  ASSERT_TRUE((*sub)
                  ->subscribe("tput/credits",
                              [&](const ReceivedMessage& m) {
                                std::lock_guard<std::mutex> lock(mu);
                                if (!is_message(next, size_of(next), m.payload) ||
                                    m.missed_before != 0) {
                                  if (bad++ == 0) first_bad = next;
                                }
                                if (++next == kN) cv.notify_all();
                              })
                  .ok());
  ASSERT_EQ(::write(go[1], "b", 1), 1);
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return next == kN; }))
        << next << " of " << kN << " messages arrived";
    EXPECT_EQ(bad, 0u) << "first out of order, altered or after a gap: message " << first_bad;
  }
  ::close(go[1]);
  EXPECT_TRUE(child_ok(pid, Deadline::after_ms(30000)));
  EXPECT_EQ((*sub)->stats().gaps_missed, 0u);
  EXPECT_EQ((*sub)->stats().received, kN);
}

// Subscribes with handlers of `handler_ms` each and a delivery window of `window`, publishes `n`
// 1 KiB messages on `topic` through a daemon with 100 ms heartbeats (a session silent for 300 ms
// is dropped), and expects every message in order and the subscriber's session alive.
void expect_slow_handlers_keep_their_session(const std::string& topic, uint32_t window, uint64_t n,
                                             int handler_ms) {
  Daemon d("", 100);
  ASSERT_TRUE(d.up());
  ClientOptions so = d.client("sub");
  so.receive_window = window;
  auto sub = Client::connect(so);
  ASSERT_TRUE(sub.ok()) << sub.status();
  std::mutex mu;
  std::condition_variable cv;
  uint64_t next = 0, bad = 0;
  ASSERT_TRUE((*sub)
                  ->subscribe(topic,
                              [&](const ReceivedMessage& m) {
                                std::this_thread::sleep_for(std::chrono::milliseconds(handler_ms));
                                std::lock_guard<std::mutex> lock(mu);
                                if (!is_message(next, 1024, m.payload) || m.missed_before != 0)
                                  ++bad;
                                if (++next == n) cv.notify_all();
                              })
                  .ok());
  auto pub = Client::connect(d.client("pub"));
  ASSERT_TRUE(pub.ok()) << pub.status();
  const PublishOptions po{.lane = Lane::kBulk, .batch = true, .timeout_ms = 20000};
  for (uint64_t k = 0; k < n; ++k)
    ASSERT_TRUE((*pub)->publish(topic, message(k, 1024), po).ok()) << "message " << k;
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return next == n; }))
        << next << " of " << n << " messages arrived; subscriber: " << (*sub)->status();
    EXPECT_EQ(bad, 0u);
  }
  EXPECT_TRUE((*sub)->status().ok()) << (*sub)->status();
}

TEST(ClientBatching, SlowHandlersKeepTheirSessionWhileTheControlConnectionHearsFromThem) {
  // Handlers of 10 ms and a delivery window of 64: one pass of handlers lasts up to 640 ms with
  // nothing sent on the subscriber's main connection, while its delivery credits go out on the
  // control connection every 8 messages. The broker dropped such a session as silent.
  expect_slow_handlers_keep_their_session("tput/slow", 64, 150, 10);
}

TEST(ClientBatching, SlowHandlersSendHeartbeatsBetweenDeliveries) {
  // The window of 512 holds all 48 messages, so the subscriber owes no delivery credit until the
  // end of its read, and one read dispatches them all: 48 handlers of 25 ms, 1.2 s with nothing
  // else to send. The reader sends the heartbeats that fall due meanwhile (at most four
  // handlers, 100 ms, late); without them the broker closed the session.
  expect_slow_handlers_keep_their_session("tput/slower", 512, 48, 25);
}

}  // namespace
}  // namespace myelin::broker
