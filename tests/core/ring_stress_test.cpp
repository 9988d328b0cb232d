// Threads racing on the rings and the waiter, with every element's sequence number and a checksum
// verified. Labelled `concurrency`: CI runs these under ThreadSanitizer.
#include <myelin/core/duplex_ring.hpp>
#include <myelin/core/mpsc_ring.hpp>
#include <myelin/core/record_ring.hpp>
#include <myelin/core/spsc_ring.hpp>
#include <myelin/core/wait.hpp>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace myelin {
namespace {

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr uint64_t kScale = 4;  // sanitizers are ~10x slower; keep the suite within its timeout
#else
constexpr uint64_t kScale = 1;
#endif
constexpr uint64_t kNearWrap = std::numeric_limits<uint64_t>::max() - 1000;

// Spins, then yields: the machine may have fewer cores than the test has threads.
struct Backoff {
  unsigned spins = 0;
  void pause() {
    if (++spins < 64) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
  void reset() { spins = 0; }
};

uint64_t mix(uint64_t x) {  // splitmix64 finaliser: values that differ in every bit
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Item {
  uint64_t seq;
  uint64_t payload;  // mix(seq): a torn or stale read shows as a mismatch
};

TEST(RingStress, SpscSequenceAndChecksum) {
  const uint64_t n = 2'000'000 / kScale;
  auto ring = SpscRing<Item>::create(64, {.initial_position = kNearWrap});
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t sent_sum = 0;
  std::thread producer([&] {
    Backoff b;
    std::array<Item, 8> batch;
    for (uint64_t i = 0; i < n;) {
      if (i % 3 == 0 && i + batch.size() <= n) {  // mix single and batch pushes
        for (uint64_t k = 0; k < batch.size(); ++k) batch[k] = {i + k, mix(i + k)};
        const std::size_t pushed = ring->try_push_n(batch.data(), batch.size());
        for (std::size_t k = 0; k < pushed; ++k) sent_sum += batch[k].payload;
        i += pushed;
        if (pushed == 0) b.pause();
        continue;
      }
      const Item it{i, mix(i)};
      if (ring->try_push(it)) {
        sent_sum += it.payload;
        ++i;
        b.reset();
      } else {
        b.pause();
      }
    }
  });
  uint64_t expect = 0, got_sum = 0;
  bool in_order = true;
  Backoff b;
  std::array<Item, 5> out;
  while (expect < n) {
    const std::size_t k = (expect % 2) ? ring->try_pop_n(out.data(), out.size())
                                       : static_cast<std::size_t>(ring->try_pop(out[0]));
    if (k == 0) {
      b.pause();
      continue;
    }
    for (std::size_t j = 0; j < k; ++j) {
      in_order &= out[j].seq == expect && out[j].payload == mix(expect);
      got_sum += out[j].payload;
      ++expect;
    }
  }
  producer.join();
  EXPECT_TRUE(in_order);
  EXPECT_EQ(got_sum, sent_sum);
  Item extra;
  EXPECT_FALSE(ring->try_pop(extra));
}

// Both directions of a DuplexRing stream at once, out of step with each other (they share cache
// lines, never slots): each side pushes its own sequence while popping the other's.
TEST(RingStress, DuplexBothDirectionsAtOnce) {
  const uint64_t n = 1'000'000 / kScale;
  auto ring = DuplexRing<Item>::create(32, {.initial_position = kNearWrap});
  ASSERT_TRUE(ring.ok()) << ring.status();
  // One side's loop: pushes n items into `out` while popping n from `in`.
  auto side = [n](auto& out, auto& in, uint64_t& got_sum, bool& in_order) {
    uint64_t sent = 0, got = 0;
    Backoff b;
    std::array<Item, 4> batch;
    while (sent < n || got < n) {
      bool progress = false;
      if (sent < n) {
        if (sent % 5 == 0 && sent + batch.size() <= n) {
          for (uint64_t k = 0; k < batch.size(); ++k) batch[k] = {sent + k, mix(sent + k)};
          const std::size_t pushed = out.try_push_n(batch.data(), batch.size());
          sent += pushed;
          progress |= pushed != 0;
        } else if (out.try_push(Item{sent, mix(sent)})) {
          ++sent;
          progress = true;
        }
      }
      Item it{};
      if (got < n && in.try_pop(it)) {
        in_order &= it.seq == got && it.payload == mix(got);
        got_sum += it.payload;
        ++got;
        progress = true;
      }
      if (progress) {
        b.reset();
      } else {
        b.pause();
      }
    }
  };
  uint64_t a_sum = 0, b_sum = 0;
  bool a_order = true, b_order = true;
  std::thread side_b([&] { side(ring->backward(), ring->forward(), b_sum, b_order); });
  side(ring->forward(), ring->backward(), a_sum, a_order);
  side_b.join();
  uint64_t expected = 0;
  for (uint64_t i = 0; i < n; ++i) expected += mix(i);
  EXPECT_TRUE(a_order);
  EXPECT_TRUE(b_order);
  EXPECT_EQ(a_sum, expected);
  EXPECT_EQ(b_sum, expected);
  Item extra;
  EXPECT_FALSE(ring->forward().try_pop(extra));
  EXPECT_FALSE(ring->backward().try_pop(extra));
}

// The pattern the duplex layout is for: each request answered before the next is sent, the reply
// written into the line the request arrived in.
TEST(RingStress, DuplexRequestResponse) {
  const uint64_t n = 500'000 / kScale;
  auto ring = DuplexRing<Item, uint64_t>::create(4, {.initial_position = kNearWrap});
  ASSERT_TRUE(ring.ok()) << ring.status();
  std::thread responder([&] {
    Backoff b;
    for (uint64_t i = 0; i < n; ++i) {
      Item req{};
      while (!ring->forward().try_pop(req)) b.pause();
      b.reset();
      // A torn or stale request shows in the reply, which the initiator checks.
      const uint64_t reply = req.payload == mix(req.seq) ? req.seq + 1 : 0;
      while (!ring->backward().try_push(reply)) b.pause();
      b.reset();
    }
  });
  bool ok = true;
  Backoff b;
  for (uint64_t i = 0; i < n; ++i) {
    while (!ring->forward().try_push(Item{i, mix(i)})) b.pause();
    b.reset();
    uint64_t reply = 0;
    while (!ring->backward().try_pop(reply)) b.pause();
    b.reset();
    ok &= reply == i + 1;
  }
  responder.join();
  EXPECT_TRUE(ok);
}

TEST(RingStress, MpscPerProducerOrderAndChecksum) {
  constexpr int kProducers = 4;
  const uint64_t per = 500'000 / kScale;
  auto ring = MpscRing<Item>::create(128, {.initial_position = kNearWrap});
  ASSERT_TRUE(ring.ok()) << ring.status();
  std::array<uint64_t, kProducers> sent_sum{};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      Backoff b;
      for (uint64_t i = 0; i < per;) {
        const uint64_t seq = (static_cast<uint64_t>(p) << 56) | i;
        if (ring->try_push(Item{seq, mix(seq)})) {
          sent_sum[p] += mix(seq);
          ++i;
          b.reset();
        } else {
          b.pause();
        }
      }
    });
  }
  std::array<uint64_t, kProducers> next{};
  uint64_t got_sum = 0, received = 0;
  bool ok = true;
  Backoff b;
  while (received < per * kProducers) {
    Item it{};
    if (!ring->try_pop(it)) {
      b.pause();
      continue;
    }
    b.reset();
    const auto p = static_cast<std::size_t>(it.seq >> 56);
    ok &= p < kProducers && (it.seq & ((uint64_t{1} << 56) - 1)) == next[p] &&
          it.payload == mix(it.seq);
    if (p < kProducers) ++next[p];
    got_sum += it.payload;
    ++received;
  }
  for (auto& t : producers) t.join();
  EXPECT_TRUE(ok) << "an element arrived out of its producer's order or corrupted";
  uint64_t total = 0;
  for (uint64_t s : sent_sum) total += s;
  EXPECT_EQ(got_sum, total);
  for (uint64_t c : next) EXPECT_EQ(c, per);
}

// The payload of record i: length and bytes both derived from i.
uint32_t record_len(uint64_t i, std::size_t max) {
  return static_cast<uint32_t>(mix(i) % (max + 1));
}
std::byte record_byte(uint64_t i, std::size_t k) {
  return static_cast<std::byte>((i * 31 + k) & 0xff);
}

// Index i is written in a block of five: i % 5 in 0..3 as one batch claim whose second record is
// aborted (type = the block's first index), i % 5 == 4 as a single claim (type = i).
bool in_batch(uint64_t i, uint64_t n) {
  return i % 5 < 4 && i - i % 5 + 4 <= n;
}
bool aborted(uint64_t i, uint64_t n) {
  return in_batch(i, n) && i % 5 == 1;
}

TEST(RingStress, RecordRingClaimCommitAbortBatches) {
  const uint64_t n = 400'000 / kScale;
  auto ring = RecordRing::create(4096, {.initial_position = kNearWrap & ~uint64_t{15}});
  ASSERT_TRUE(ring.ok()) << ring.status();
  const std::size_t max = 300;
  uint64_t sent_sum = 0;
  std::thread producer([&] {
    Backoff b;
    for (uint64_t i = 0; i < n;) {
      if (in_batch(i, n)) {
        std::array<uint32_t, 4> sizes;
        for (uint64_t k = 0; k < 4; ++k) sizes[k] = record_len(i + k, max);
        std::array<RecordRing::Claim, 4> claims;
        if (!ring->try_claim_batch(sizes, claims, static_cast<uint32_t>(i))) {
          b.pause();
          continue;
        }
        for (uint64_t k = 0; k < 4; ++k) {
          if (aborted(i + k, n)) {
            ring->abort(claims[k]);
            continue;
          }
          for (std::size_t j = 0; j < claims[k].size; ++j)
            claims[k].data[j] = record_byte(i + k, j);
          sent_sum += i + k;
        }
        ring->commit(claims[3]);
        i += 4;
      } else {
        const uint32_t len = record_len(i, max);
        RecordRing::Claim c;
        if (!ring->try_claim(len, c, static_cast<uint32_t>(i))) {
          b.pause();
          continue;
        }
        for (std::size_t j = 0; j < len; ++j) c.data[j] = record_byte(i, j);
        ring->commit(c);
        sent_sum += i;
        ++i;
      }
      b.reset();
    }
  });
  uint64_t expect = 0, got_sum = 0;
  bool ok = true;
  Backoff b;
  auto advance = [&] {
    while (expect < n && aborted(expect, n)) ++expect;
  };
  advance();
  while (expect < n) {
    auto consumed = ring->consume([&](const RecordRing::Record& r) {
      const uint64_t type = in_batch(expect, n) ? expect - expect % 5 : expect;
      ok &= expect < n && r.type == static_cast<uint32_t>(type) &&
            r.data.size() == record_len(expect, max);
      for (std::size_t j = 0; ok && j < r.data.size(); ++j)
        ok &= r.data[j] == record_byte(expect, j);
      got_sum += expect;
      ++expect;
      advance();
    });
    ASSERT_TRUE(consumed.ok()) << consumed.status();
    if (*consumed == 0)
      b.pause();
    else
      b.reset();
  }
  producer.join();
  EXPECT_TRUE(ok) << "record " << expect << " arrived corrupted or out of order";
  EXPECT_EQ(got_sum, sent_sum);
  EXPECT_TRUE(ring->empty_approx());
}

// Same-size batches across two threads: batch j holds 1 + j % 8 records of 8 + (j * 24) % 200
// bytes, type j; every third batch of three or more aborts its record 1 (padding), and batches of
// four or more are committed in two parts (up to record 1, then the whole batch).
struct SameSizeBatch {
  uint32_t count, size;
  bool abort_second;
};
SameSizeBatch same_size_batch(uint64_t j) {
  const auto count = static_cast<uint32_t>(1 + j % 8);
  return {count, static_cast<uint32_t>(8 + (j * 24) % 200), count > 2 && j % 3 == 0};
}

TEST(RingStress, RecordRingSameSizeBatches) {
  const uint64_t batches = 100'000 / kScale;
  auto ring = RecordRing::create(4096, {.initial_position = kNearWrap & ~uint64_t{7}});
  ASSERT_TRUE(ring.ok()) << ring.status();
  std::thread producer([&] {
    Backoff b;
    uint64_t index = 0;  // of the next record, aborted ones included
    for (uint64_t j = 0; j < batches;) {
      const SameSizeBatch spec = same_size_batch(j);
      RecordRing::BatchClaim claim;
      if (!ring->try_claim_batch(spec.count, spec.size, claim, static_cast<uint32_t>(j))) {
        b.pause();
        continue;
      }
      b.reset();
      for (uint32_t i = 0; i < spec.count; ++i, ++index) {
        std::byte* d = claim.data(i);
        std::memcpy(d, &index, sizeof(index));
        for (uint32_t k = sizeof(index); k < spec.size; ++k) d[k] = record_byte(index, k);
      }
      if (spec.abort_second) ring->abort(claim.claim(1));
      if (spec.count > 3) ring->commit(claim.claim(1));
      ring->commit(claim);
      ++j;
    }
  });
  uint64_t j = 0, i = 0, index = 0;
  bool ok = true;
  Backoff b;
  // Steps (j, i, index) to the next record that was not aborted.
  auto advance = [&] {
    for (;;) {
      if (j == batches) return;
      const SameSizeBatch spec = same_size_batch(j);
      if (i == spec.count) {
        ++j;
        i = 0;
        continue;
      }
      if (spec.abort_second && i == 1) {
        ++i;
        ++index;
        continue;
      }
      return;
    }
  };
  advance();
  while (j < batches) {
    auto consumed = ring->consume([&](const RecordRing::Record& r) {
      const SameSizeBatch spec = same_size_batch(j);
      uint64_t got = 0;
      ok &= j < batches && r.type == static_cast<uint32_t>(j) && r.data.size() == spec.size;
      if (ok) std::memcpy(&got, r.data.data(), sizeof(got));
      ok &= got == index;
      for (std::size_t k = sizeof(got); ok && k < r.data.size(); ++k)
        ok &= r.data[k] == record_byte(index, k);
      ++i;
      ++index;
      advance();
    });
    ASSERT_TRUE(consumed.ok()) << consumed.status();
    if (*consumed == 0)
      b.pause();
    else
      b.reset();
  }
  producer.join();
  EXPECT_TRUE(ok) << "record " << index << " of batch " << j
                  << " arrived corrupted or out of order";
  EXPECT_EQ(j, batches);
  EXPECT_TRUE(ring->empty_approx());
}

void waiter_round_trip(WaitMode mode) {
  const uint64_t n = 20'000 / kScale;
  auto ring = SpscRing<uint64_t>::create(16);
  ASSERT_TRUE(ring.ok());
  WaitOptions options{.mode = mode, .spin_ns = 1'000, .liveness_check_ns = 1'000'000};
  Result<EventFd> efd = EventFd::create();
  ASSERT_TRUE(efd.ok()) << efd.status();
  Result<EventFd> efd2 = efd->duplicate();
  ASSERT_TRUE(efd2.ok());
  Waiter consumer_waiter(&ring->consumer_wait_word(), options, std::move(*efd));
  Waiter producer_waiter(&ring->consumer_wait_word(), options, std::move(*efd2));
  std::thread producer([&] {
    Backoff b;
    for (uint64_t i = 0; i < n;) {
      if (ring->try_push(i)) {
        producer_waiter.notify();
        ++i;
        // Every 64th item, let the consumer run dry so it goes to sleep.
        if (i % 64 == 0) {
          while (!ring->empty_approx()) std::this_thread::yield();
          for (int k = 0; k < 2000; ++k) cpu_relax();
        }
      } else {
        b.pause();
      }
    }
  });
  bool in_order = true;
  for (uint64_t expect = 0; expect < n; ++expect) {
    uint64_t v = 0;
    // A lost wake-up would show as a timeout here.
    const Status s =
        consumer_waiter.wait([&] { return ring->try_pop(v); }, Deadline::after_ms(10'000));
    ASSERT_TRUE(s.ok()) << s << " at item " << expect;
    in_order &= v == expect;
  }
  producer.join();
  EXPECT_TRUE(in_order);
}

TEST(RingStress, FutexWaiterLosesNoWakeups) {
  waiter_round_trip(WaitMode::kSpinThenFutex);
}
TEST(RingStress, EventFdWaiterLosesNoWakeups) {
  waiter_round_trip(WaitMode::kSpinThenEventFd);
}
TEST(RingStress, BusyPollWaiter) {
  waiter_round_trip(WaitMode::kBusyPoll);
}

TEST(Waiter, TimesOutOnAnEmptyRing) {
  auto ring = SpscRing<uint64_t>::create(4);
  ASSERT_TRUE(ring.ok());
  for (WaitMode mode : {WaitMode::kBusyPoll, WaitMode::kSpinThenFutex}) {
    Waiter w(&ring->consumer_wait_word(), {.mode = mode, .spin_ns = 1000});
    uint64_t v;
    const int64_t start = monotonic_ns();
    const Status s = w.wait([&] { return ring->try_pop(v); }, Deadline::after_ms(30));
    EXPECT_EQ(s.code(), StatusCode::kTimeout) << s;
    EXPECT_GE(monotonic_ns() - start, 30'000'000);
  }
}

TEST(Waiter, LivenessCheckEndsTheWait) {
  auto ring = SpscRing<uint64_t>::create(4);
  ASSERT_TRUE(ring.ok());
  for (WaitMode mode : {WaitMode::kBusyPoll, WaitMode::kSpinThenFutex}) {
    Waiter w(&ring->consumer_wait_word(),
             {.mode = mode, .spin_ns = 1000, .liveness_check_ns = 2'000'000});
    int checks = 0;
    w.set_liveness_check([&]() -> Status {
      return ++checks >= 3 ? peer_failed("producer pid 12345 is gone") : ok_status();
    });
    uint64_t v;
    const Status s = w.wait([&] { return ring->try_pop(v); }, Deadline::after_ms(10'000));
    EXPECT_EQ(s.code(), StatusCode::kPeerFailed) << s;
    EXPECT_EQ(checks, 3);
  }
}

}  // namespace
}  // namespace myelin
