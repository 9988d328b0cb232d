// The rings across real processes: forked producers write into a shared segment, the parent
// consumes and verifies every sequence number and a checksum; a producer killed mid-stream is
// reported as peer_failed instead of a hang. Labelled `integration`.
#include <myelin/core/duplex_ring.hpp>
#include <myelin/core/mpsc_ring.hpp>
#include <myelin/core/record_ring.hpp>
#include <myelin/core/shm_segment.hpp>
#include <myelin/core/spsc_ring.hpp>
#include <myelin/core/wait.hpp>

#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace myelin {
namespace {

constexpr uint64_t kNearWrap = std::numeric_limits<uint64_t>::max() - 500;
const WaitOptions kWait{
    .mode = WaitMode::kSpinThenFutex, .spin_ns = 5'000, .liveness_check_ns = 5'000'000};

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Item {
  uint64_t seq;
  uint64_t payload;
};

// Runs `body` in a child process that maps the segment afresh and joins it as `role`; the child's
// exit code is body's (0 = success).
pid_t spawn(const ShmSegment& parent_view, const char* role,
            const std::function<int(ShmSegment&)>& body) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  auto seg = ShmSegment::open_fd(parent_view.fd());
  if (!seg.ok() || !seg->join(role).ok()) _exit(90);
  const int rc = body(*seg);
  seg->leave();
  _exit(rc);
}

int wait_exit_code(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Waits for space on the producer side: back-pressure, bounded by a deadline.
template <typename TryPush>
bool push_with_deadline(TryPush&& try_push, Deadline deadline) {
  for (unsigned spins = 0; !try_push(); ++spins) {
    if ((spins & 1023) == 0 && deadline.expired()) return false;
    cpu_relax();
  }
  return true;
}

TEST(ShmFork, SpscAcrossProcesses) {
  constexpr uint64_t kItems = 300'000;
  using Ring = SpscRing<Item>;
  auto seg = ShmSegment::create_memfd("spsc-fork", Ring::bytes_for(256));
  ASSERT_TRUE(seg.ok()) << seg.status();
  auto ring = Ring::format(seg->data(), seg->data_size(), 256, kNearWrap);
  ASSERT_TRUE(ring.ok()) << ring.status();
  ASSERT_TRUE(seg->join("consumer").ok());

  const pid_t child = spawn(*seg, "producer", [](ShmSegment& s) {
    auto r = Ring::attach(s.data(), s.data_size());
    if (!r.ok()) return 91;
    Waiter notifier(&r->consumer_wait_word(), kWait);
    const Deadline deadline = Deadline::after_ms(60'000);
    for (uint64_t i = 0; i < kItems; ++i) {
      if (!push_with_deadline([&] { return r->try_push(Item{i, mix(i)}); }, deadline)) return 92;
      notifier.notify();
    }
    return 0;
  });
  ASSERT_GT(child, 0);

  Waiter waiter(&ring->consumer_wait_word(), kWait);
  waiter.set_liveness_check([&] { return seg->check_peers(); });
  uint64_t sum = 0, expected_sum = 0;
  bool in_order = true;
  for (uint64_t i = 0; i < kItems; ++i) {
    Item it{};
    const Status s = waiter.wait([&] { return ring->try_pop(it); }, Deadline::after_ms(30'000));
    ASSERT_TRUE(s.ok()) << s << " at item " << i;
    in_order &= it.seq == i && it.payload == mix(i);
    sum += it.payload;
    expected_sum += mix(i);
  }
  EXPECT_TRUE(in_order);
  EXPECT_EQ(sum, expected_sum);
  EXPECT_EQ(wait_exit_code(child), 0);
}

// A request/response exchange through a DuplexRing in a shared segment: the child answers each
// request with a reply derived from it; both sides sleep on their own wait word.
TEST(ShmFork, DuplexRequestResponseAcrossProcesses) {
  constexpr uint64_t kRequests = 100'000;
  using Ring = DuplexRing<Item, Item>;
  auto seg = ShmSegment::create_memfd("duplex-fork", Ring::bytes_for(64));
  ASSERT_TRUE(seg.ok()) << seg.status();
  auto ring = Ring::format(seg->data(), seg->data_size(), 64, kNearWrap);
  ASSERT_TRUE(ring.ok()) << ring.status();
  ASSERT_TRUE(seg->join("initiator").ok());

  const pid_t child = spawn(*seg, "responder", [](ShmSegment& s) {
    auto r = Ring::attach(s.data(), s.data_size());
    if (!r.ok()) return 91;
    Waiter requests(&r->forward_wait_word(), kWait);
    requests.set_liveness_check([&] { return s.check_peers(); });
    Waiter replies(&r->backward_wait_word(), kWait);
    const Deadline deadline = Deadline::after_ms(60'000);
    for (uint64_t i = 0; i < kRequests; ++i) {
      Item req{};
      if (!requests.wait([&] { return r->forward().try_pop(req); }, deadline).ok()) return 92;
      if (req.seq != i || req.payload != mix(i)) return 93;
      const Item reply{i, mix(i) ^ 0xffff};
      if (!push_with_deadline([&] { return r->backward().try_push(reply); }, deadline)) return 94;
      replies.notify();
    }
    return 0;
  });
  ASSERT_GT(child, 0);

  Waiter replies(&ring->backward_wait_word(), kWait);
  replies.set_liveness_check([&] { return seg->check_peers(); });
  Waiter requests(&ring->forward_wait_word(), kWait);
  bool in_order = true;
  // Keep up to 8 requests in flight so both directions wrap and run out of step.
  uint64_t sent = 0;
  for (uint64_t i = 0; i < kRequests; ++i) {
    while (sent < kRequests && sent < i + 8 && ring->forward().try_push(Item{sent, mix(sent)})) {
      ++sent;
      requests.notify();
    }
    Item reply{};
    const Status s =
        replies.wait([&] { return ring->backward().try_pop(reply); }, Deadline::after_ms(30'000));
    ASSERT_TRUE(s.ok()) << s << " at reply " << i;
    in_order &= reply.seq == i && reply.payload == (mix(i) ^ 0xffff);
  }
  EXPECT_TRUE(in_order);
  EXPECT_EQ(wait_exit_code(child), 0);
}

TEST(ShmFork, RecordRingAcrossProcesses) {
  constexpr uint64_t kRecords = 100'000;
  auto seg = ShmSegment::create_memfd("record-fork", RecordRing::bytes_for(1 << 14));
  ASSERT_TRUE(seg.ok());
  auto ring = RecordRing::format(seg->data(), seg->data_size(), 1 << 14, kNearWrap & ~15ULL);
  ASSERT_TRUE(ring.ok()) << ring.status();
  ASSERT_TRUE(seg->join("consumer").ok());
  // Records 64k..64k+7 go as one same-size batch (BatchClaim): one length and one type (64k).
  auto in_batch = [](uint64_t i) { return i % 64 < 8; };
  auto len_of = [&](uint64_t i) {
    return static_cast<uint32_t>(mix(in_batch(i) ? i - i % 64 : i) % 600);
  };
  auto type_of = [&](uint64_t i) { return static_cast<uint32_t>(in_batch(i) ? i - i % 64 : i); };

  const pid_t child = spawn(*seg, "producer", [&](ShmSegment& s) {
    auto r = RecordRing::attach(s.data(), s.data_size());
    if (!r.ok()) return 91;
    Waiter notifier(&r->consumer_wait_word(), kWait);
    const Deadline deadline = Deadline::after_ms(60'000);
    for (uint64_t i = 0; i < kRecords; ++i) {
      if (i % 64 == 0) {
        RecordRing::BatchClaim b;
        const uint32_t len = len_of(i);
        if (!push_with_deadline([&] { return r->try_claim_batch(8, len, b, type_of(i)); },
                                deadline)) {
          return 93;
        }
        for (uint32_t k = 0; k < 8; ++k) {
          for (uint32_t j = 0; j < len; ++j) b.data(k)[j] = static_cast<std::byte>(i + k + j);
        }
        r->commit(b);
        notifier.notify();
        i += 7;
        continue;
      }
      RecordRing::Claim c;
      const uint32_t len = len_of(i);
      if (!push_with_deadline([&] { return r->try_claim(len, c, static_cast<uint32_t>(i)); },
                              deadline)) {
        return 92;
      }
      for (uint32_t j = 0; j < len; ++j) c.data[j] = static_cast<std::byte>(i + j);
      r->commit(c);
      notifier.notify();
    }
    return 0;
  });
  ASSERT_GT(child, 0);

  Waiter waiter(&ring->consumer_wait_word(), kWait);
  waiter.set_liveness_check([&] { return seg->check_peers(); });
  uint64_t next = 0, checksum = 0, expected = 0;
  bool ok = true;
  while (next < kRecords) {
    std::size_t got = 0;
    Status consume_error;
    const Status s = waiter.wait(
        [&] {
          auto n = ring->consume([&](const RecordRing::Record& r) {
            ok &= r.type == type_of(next) && r.data.size() == len_of(next);
            for (std::size_t j = 0; ok && j < r.data.size(); ++j) {
              ok &= r.data[j] == static_cast<std::byte>(next + j);
              checksum += static_cast<uint64_t>(r.data[j]);
            }
            ++next;
          });
          if (!n.ok()) consume_error = n.status();
          got = n.ok() ? *n : 0;
          return got != 0 || !consume_error.ok();
        },
        Deadline::after_ms(30'000));
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_TRUE(consume_error.ok()) << consume_error;
  }
  for (uint64_t i = 0; i < kRecords; ++i) {
    for (uint32_t j = 0; j < len_of(i); ++j) expected += static_cast<uint8_t>(i + j);
  }
  EXPECT_TRUE(ok) << "record " << next << " arrived corrupted or out of order";
  EXPECT_EQ(checksum, expected);
  EXPECT_EQ(wait_exit_code(child), 0);
}

TEST(ShmFork, MpscFromThreeProcesses) {
  constexpr int kProducers = 3;
  constexpr uint64_t kPer = 100'000;
  using Ring = MpscRing<Item>;
  auto seg = ShmSegment::create_memfd("mpsc-fork", Ring::bytes_for(512));
  ASSERT_TRUE(seg.ok());
  auto ring = Ring::format(seg->data(), seg->data_size(), 512, kNearWrap);
  ASSERT_TRUE(ring.ok());
  ASSERT_TRUE(seg->join("consumer").ok());
  std::vector<pid_t> children;
  for (int p = 0; p < kProducers; ++p) {
    const std::string role = "producer " + std::to_string(p);
    children.push_back(spawn(*seg, role.c_str(), [p](ShmSegment& s) {
      auto r = Ring::attach(s.data(), s.data_size());
      if (!r.ok()) return 91;
      Waiter notifier(&r->consumer_wait_word(), kWait);
      const Deadline deadline = Deadline::after_ms(60'000);
      for (uint64_t i = 0; i < kPer; ++i) {
        const uint64_t seq = (static_cast<uint64_t>(p) << 56) | i;
        if (!push_with_deadline([&] { return r->try_push(Item{seq, mix(seq)}); }, deadline)) {
          return 92;
        }
        notifier.notify();
      }
      return 0;
    }));
    ASSERT_GT(children.back(), 0);
  }
  Waiter waiter(&ring->consumer_wait_word(), kWait);
  waiter.set_liveness_check([&] { return seg->check_peers(); });
  uint64_t next[kProducers] = {};
  uint64_t sum = 0, expected = 0;
  bool ok = true;
  for (uint64_t i = 0; i < kPer * kProducers; ++i) {
    Item it{};
    const Status s = waiter.wait([&] { return ring->try_pop(it); }, Deadline::after_ms(30'000));
    ASSERT_TRUE(s.ok()) << s;
    const auto p = static_cast<std::size_t>(it.seq >> 56);
    ok &= p < kProducers && (it.seq & 0xffffffffffffffULL) == next[p] && it.payload == mix(it.seq);
    if (p < kProducers) ++next[p];
    sum += it.payload;
  }
  for (int p = 0; p < kProducers; ++p) {
    for (uint64_t i = 0; i < kPer; ++i) expected += mix((static_cast<uint64_t>(p) << 56) | i);
  }
  EXPECT_TRUE(ok);
  EXPECT_EQ(sum, expected);
  for (pid_t c : children) EXPECT_EQ(wait_exit_code(c), 0);
}

// The producer is SIGKILLed after it sent some items; the consumer, waiting with a long deadline,
// must get peer_failed naming the producer's pid within a few liveness periods.
TEST(ShmFork, KilledProducerIsDetectedByTheConsumer) {
  using Ring = SpscRing<uint64_t>;
  auto seg = ShmSegment::create_memfd("kill-fork", Ring::bytes_for(64));
  ASSERT_TRUE(seg.ok());
  auto ring = Ring::format(seg->data(), seg->data_size(), 64);
  ASSERT_TRUE(ring.ok());
  ASSERT_TRUE(seg->join("consumer").ok());
  const pid_t child = spawn(*seg, "producer", [](ShmSegment& s) {
    auto r = Ring::attach(s.data(), s.data_size());
    if (!r.ok()) return 91;
    Waiter notifier(&r->consumer_wait_word(), kWait);
    for (uint64_t i = 0; i < 10; ++i) {
      while (!r->try_push(i)) cpu_relax();
      notifier.notify();
    }
    raise(SIGKILL);  // dies without leaving the segment, like a crash
    return 93;
  });
  ASSERT_GT(child, 0);
  Waiter waiter(&ring->consumer_wait_word(), kWait);
  waiter.set_liveness_check([&] { return seg->check_peers(); });
  for (uint64_t i = 0; i < 10; ++i) {
    uint64_t v = 0;
    ASSERT_TRUE(waiter.wait([&] { return ring->try_pop(v); }, Deadline::after_ms(30'000)).ok());
    EXPECT_EQ(v, i);
  }
  const int64_t start = monotonic_ns();
  uint64_t v = 0;
  const Status s = waiter.wait([&] { return ring->try_pop(v); }, Deadline::after_ms(60'000));
  const int64_t waited_ms = (monotonic_ns() - start) / 1'000'000;
  EXPECT_EQ(s.code(), StatusCode::kPeerFailed) << s;
  EXPECT_NE(s.message().find("producer pid " + std::to_string(child) + " is gone"),
            std::string::npos)
      << s;
  EXPECT_LT(waited_ms, 10'000) << "detection must not wait for the deadline";
  EXPECT_EQ(wait_exit_code(child), 128 + SIGKILL);
}

// A producer whose consumer was killed gets the same answer while it waits for space.
TEST(ShmFork, KilledConsumerIsDetectedByTheProducer) {
  using Ring = SpscRing<uint64_t>;
  auto seg = ShmSegment::create_memfd("kill-consumer", Ring::bytes_for(8));
  ASSERT_TRUE(seg.ok());
  auto ring = Ring::format(seg->data(), seg->data_size(), 8);
  ASSERT_TRUE(ring.ok());
  ASSERT_TRUE(seg->join("producer").ok());
  const pid_t child = spawn(*seg, "consumer", [](ShmSegment& s) {
    auto r = Ring::attach(s.data(), s.data_size());
    if (!r.ok()) return 91;
    uint64_t v;
    while (!r->try_pop(v)) cpu_relax();  // take one item, then crash
    raise(SIGKILL);
    return 93;
  });
  ASSERT_GT(child, 0);
  Waiter space(&ring->consumer_wait_word(),
               {.mode = WaitMode::kBusyPoll, .liveness_check_ns = 5'000'000});
  space.set_liveness_check([&] { return seg->check_peers(); });
  Status s;
  for (uint64_t i = 0; i < 100 && s.ok(); ++i) {
    s = space.wait([&] { return ring->try_push(i); }, Deadline::after_ms(30'000));
  }
  EXPECT_EQ(s.code(), StatusCode::kPeerFailed) << s;
  EXPECT_NE(s.message().find("consumer pid " + std::to_string(child)), std::string::npos) << s;
  EXPECT_EQ(wait_exit_code(child), 128 + SIGKILL);
}

}  // namespace
}  // namespace myelin
