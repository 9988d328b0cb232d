// Single-threaded behaviour of the rings: edges, wrap-around of the 64-bit positions, claim
// and abort, and refusal of foreign or incompatible regions.
#include <myelin/core/duplex_ring.hpp>
#include <myelin/core/mpsc_ring.hpp>
#include <myelin/core/record_ring.hpp>
#include <myelin/core/spsc_ring.hpp>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace myelin {
namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

// Scratch memory, aligned as rings require, standing in for a shared region.
struct Region {
  explicit Region(std::size_t n)
      : bytes(n),
        mem(static_cast<std::byte*>(::operator new (n, std::align_val_t{kFalseSharingRange}))) {
    std::memset(mem, 0, n);
  }
  ~Region() { ::operator delete (mem, std::align_val_t{kFalseSharingRange}); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  std::size_t bytes;
  std::byte* mem;
};

struct Wide {
  uint64_t a, b, c;
};

TEST(SpscRing, FullAndEmptyEdges) {
  auto ring = SpscRing<uint64_t>::create(8);
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t v = 0;
  EXPECT_FALSE(ring->try_pop(v));
  EXPECT_TRUE(ring->empty_approx());
  for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(ring->try_push(i)) << i;
  EXPECT_FALSE(ring->try_push(99)) << "a full ring must refuse, not overwrite";
  EXPECT_EQ(ring->size_approx(), 8u);
  ASSERT_TRUE(ring->try_pop(v));
  EXPECT_EQ(v, 0u);
  EXPECT_TRUE(ring->try_push(8));  // exactly one slot came free
  EXPECT_FALSE(ring->try_push(9));
  for (uint64_t i = 1; i <= 8; ++i) {
    ASSERT_TRUE(ring->try_pop(v));
    EXPECT_EQ(v, i);
  }
  EXPECT_FALSE(ring->try_pop(v));
  EXPECT_EQ(ring->size_approx(), 0u);
}

TEST(SpscRing, RejectsBadCapacity) {
  EXPECT_EQ(SpscRing<uint64_t>::create(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SpscRing<uint64_t>::create(12).status().code(), StatusCode::kInvalidArgument);
  Region r(SpscRing<uint64_t>::bytes_for(16));
  auto small = SpscRing<uint64_t>::format(r.mem, r.bytes - 1, 16);
  EXPECT_EQ(small.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("needs"), std::string::npos) << small.status();
  auto misaligned = SpscRing<uint64_t>::format(r.mem + 8, r.bytes - 8, 8);
  EXPECT_EQ(misaligned.status().code(), StatusCode::kInvalidArgument);
}

// Positions start 50 short of 2^64 and run 1000 past it; the slot sequence numbers and the
// full/empty arithmetic must not notice.
TEST(SpscRing, WrapsPast64BitPositions) {
  auto ring = SpscRing<uint64_t>::create(16, {.initial_position = kMax - 50});
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t next_push = 0, next_pop = 0, v = 0;
  for (int round = 0; round < 200; ++round) {
    while (ring->try_push(next_push)) ++next_push;
    EXPECT_EQ(next_push - next_pop, 16u);
    const int take = 1 + round % 16;
    for (int i = 0; i < take; ++i) {
      ASSERT_TRUE(ring->try_pop(v));
      ASSERT_EQ(v, next_pop++);
    }
  }
  while (ring->try_pop(v)) ASSERT_EQ(v, next_pop++);
  EXPECT_EQ(next_pop, next_push);
  EXPECT_GT(next_push, 1000u);
}

TEST(SpscRing, BatchPushAndPop) {
  auto ring = SpscRing<Wide>::create(8);
  ASSERT_TRUE(ring.ok());
  std::array<Wide, 12> in{};
  for (uint64_t i = 0; i < in.size(); ++i) in[i] = {i, i * 2, i * 3};
  EXPECT_EQ(ring->try_push_n(in.data(), in.size()), 8u);  // capped by capacity
  EXPECT_EQ(ring->try_push_n(in.data(), 1), 0u);
  std::array<Wide, 12> out{};
  EXPECT_EQ(ring->try_pop_n(out.data(), 5), 5u);
  EXPECT_EQ(ring->try_push_n(in.data() + 8, 4), 4u);
  EXPECT_EQ(ring->try_pop_n(out.data() + 5, 12), 7u);
  for (uint64_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(out[i].a, i);
    EXPECT_EQ(out[i].c, i * 3);
  }
}

TEST(SpscRing, TwoObjectsOverOneRegionShareTheRing) {
  Region r(SpscRing<uint64_t>::bytes_for(4));
  auto producer = SpscRing<uint64_t>::format(r.mem, r.bytes, 4, kMax - 1);
  ASSERT_TRUE(producer.ok()) << producer.status();
  auto consumer = SpscRing<uint64_t>::attach(r.mem, r.bytes);
  ASSERT_TRUE(consumer.ok()) << consumer.status();
  EXPECT_EQ(consumer->capacity(), 4u);
  for (uint64_t i = 0; i < 10; ++i) {
    ASSERT_TRUE(producer->try_push(i * 7));
    uint64_t v = 0;
    ASSERT_TRUE(consumer->try_pop(v));
    EXPECT_EQ(v, i * 7);
  }
}

// A producer that attaches to a ring another producer used (a restarted process) continues after
// the last element, although the shared tail is only published every few pushes.
TEST(SpscRing, ReattachedProducerContinuesAfterTheLastElement) {
  Region r(SpscRing<uint64_t>::bytes_for(64));
  auto consumer = SpscRing<uint64_t>::format(r.mem, r.bytes, 64, kMax - 2);
  ASSERT_TRUE(consumer.ok());
  uint64_t next = 0;
  for (int generation = 0; generation < 3; ++generation) {
    auto producer = SpscRing<uint64_t>::attach(r.mem, r.bytes);
    ASSERT_TRUE(producer.ok()) << producer.status();
    ASSERT_LT(5u, producer->publish_batch());
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(producer->try_push(next++));
  }
  for (uint64_t i = 0; i < next; ++i) {
    uint64_t v = 0;
    ASSERT_TRUE(consumer->try_pop(v));
    EXPECT_EQ(v, i);
  }
  uint64_t v;
  EXPECT_FALSE(consumer->try_pop(v));
}

// ---- DuplexRing ----

TEST(DuplexRing, SlotsOfOnePositionShareACacheLine) {
  using Ring = DuplexRing<uint64_t>;
  EXPECT_EQ(Ring::positions_per_line(), 2u);              // {seq, value} x 2 directions = 32 bytes
  EXPECT_EQ(DuplexRing<Wide>::positions_per_line(), 1u);  // 32 + 32 bytes: one line
  auto ring = Ring::create(8);
  ASSERT_TRUE(ring.ok()) << ring.status();
  auto* cells = static_cast<std::byte*>(ring->region()) + (Ring::bytes_for(8) - 8 * 32);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(cells) % kCacheLine, 0u);
  // Find where each direction's value for position 0 landed by pushing distinct values.
  ASSERT_TRUE(ring->forward().try_push(0x1111111111111111));
  ASSERT_TRUE(ring->backward().try_push(0x2222222222222222));
  std::size_t forward_at = 0, backward_at = 0;
  for (std::size_t off = 0; off + 8 <= kCacheLine; off += 8) {
    uint64_t v;
    std::memcpy(&v, cells + off, 8);
    if (v == 0x1111111111111111) forward_at = off;
    if (v == 0x2222222222222222) backward_at = off;
  }
  EXPECT_NE(forward_at, 0u);
  EXPECT_NE(backward_at, 0u);
  EXPECT_EQ(forward_at / kCacheLine, backward_at / kCacheLine);
}

TEST(DuplexRing, EachDirectionIsAnSpscRingWithItsOwnEdges) {
  auto ring = DuplexRing<uint64_t, Wide>::create(4);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->capacity(), 4u);
  uint64_t v = 0;
  Wide w{};
  EXPECT_FALSE(ring->forward().try_pop(v));
  EXPECT_FALSE(ring->backward().try_pop(w));
  EXPECT_TRUE(ring->forward().empty_approx());
  for (uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(ring->forward().try_push(i));
  EXPECT_FALSE(ring->forward().try_push(99)) << "a full direction must refuse, not overwrite";
  // The other direction is unaffected by a full forward ring.
  for (uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(ring->backward().try_push(Wide{i, i + 1, i + 2}));
  EXPECT_FALSE(ring->backward().try_push(Wide{}));
  EXPECT_EQ(ring->forward().size_approx(), 4u);
  ASSERT_TRUE(ring->forward().try_pop(v));
  EXPECT_EQ(v, 0u);
  EXPECT_TRUE(ring->forward().try_push(4));
  EXPECT_FALSE(ring->forward().try_push(5));
  for (uint64_t i = 0; i < 4; ++i) {
    ASSERT_TRUE(ring->backward().try_pop(w));
    EXPECT_EQ(w.a, i);
    EXPECT_EQ(w.c, i + 2);
  }
  EXPECT_FALSE(ring->backward().try_pop(w));
  for (uint64_t i = 1; i <= 4; ++i) {
    ASSERT_TRUE(ring->forward().try_pop(v));
    EXPECT_EQ(v, i);
  }
  EXPECT_FALSE(ring->forward().try_pop(v));
  EXPECT_EQ(ring->forward().size_approx(), 0u);
}

// Both directions start 40 short of 2^64 and run past it, out of step with each other.
TEST(DuplexRing, WrapsPast64BitPositionsInBothDirections) {
  auto ring = DuplexRing<uint64_t>::create(8, {.initial_position = kMax - 40});
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t fwd_push = 0, fwd_pop = 0, bwd_push = 0, bwd_pop = 0, v = 0;
  for (int round = 0; round < 300; ++round) {
    while (ring->forward().try_push(fwd_push)) ++fwd_push;
    ASSERT_EQ(fwd_push - fwd_pop, 8u);
    for (int i = 0; i < 1 + round % 8; ++i) {
      ASSERT_TRUE(ring->forward().try_pop(v));
      ASSERT_EQ(v, fwd_pop++);
    }
    // The backward ring moves at its own pace: a request/response pattern (push one, pop one)
    // with a batch now and then.
    if (round % 5 == 0) {
      std::array<uint64_t, 6> batch{};
      for (uint64_t k = 0; k < batch.size(); ++k) batch[k] = bwd_push + k;
      bwd_push += ring->backward().try_push_n(batch.data(), batch.size());
      std::array<uint64_t, 6> out{};
      const std::size_t n = ring->backward().try_pop_n(out.data(), out.size());
      for (std::size_t k = 0; k < n; ++k) ASSERT_EQ(out[k], bwd_pop++);
    } else {
      ASSERT_TRUE(ring->backward().try_push(bwd_push++));
      ASSERT_TRUE(ring->backward().try_pop(v));
      ASSERT_EQ(v, bwd_pop++);
    }
  }
  while (ring->forward().try_pop(v)) ASSERT_EQ(v, fwd_pop++);
  EXPECT_EQ(fwd_pop, fwd_push);
  EXPECT_EQ(bwd_pop, bwd_push);
  EXPECT_GT(fwd_push, 1000u);
  EXPECT_GT(bwd_push, 300u);
}

// Side A and side B each attach their own object to one region, as two processes would.
TEST(DuplexRing, TwoSidesOverOneRegion) {
  using Ring = DuplexRing<uint64_t, Wide>;
  Region r(Ring::bytes_for(4));
  auto a = Ring::format(r.mem, r.bytes, 4, kMax - 2);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Ring::attach(r.mem, r.bytes);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->capacity(), 4u);
  for (uint64_t i = 0; i < 20; ++i) {
    ASSERT_TRUE(a->forward().try_push(i * 3));
    uint64_t req = 0;
    ASSERT_TRUE(b->forward().try_pop(req));
    EXPECT_EQ(req, i * 3);
    ASSERT_TRUE(b->backward().try_push(Wide{req, req + 1, req + 2}));
    Wide reply{};
    ASSERT_TRUE(a->backward().try_pop(reply));
    EXPECT_EQ(reply.b, i * 3 + 1);
  }
  // A side that re-attaches continues after the last element in each direction.
  ASSERT_TRUE(a->forward().try_push(1000));
  ASSERT_TRUE(b->backward().try_push(Wide{2000, 0, 0}));
  auto a2 = Ring::attach(r.mem, r.bytes);
  ASSERT_TRUE(a2.ok());
  ASSERT_TRUE(a2->forward().try_push(1001));
  uint64_t v = 0;
  ASSERT_TRUE(b->forward().try_pop(v));
  EXPECT_EQ(v, 1000u);
  ASSERT_TRUE(b->forward().try_pop(v));
  EXPECT_EQ(v, 1001u);
  Wide w{};
  ASSERT_TRUE(a2->backward().try_pop(w));
  EXPECT_EQ(w.a, 2000u);
}

TEST(DuplexRing, RefusesOtherRingsAndOtherElementTypes) {
  Region r(DuplexRing<uint64_t>::bytes_for(16) + 4096);
  ASSERT_TRUE(SpscRing<uint64_t>::format(r.mem, r.bytes, 16).ok());
  auto wrong_kind = DuplexRing<uint64_t>::attach(r.mem, r.bytes);
  ASSERT_FALSE(wrong_kind.ok());
  EXPECT_NE(wrong_kind.status().message().find("holds a spsc ring"), std::string::npos)
      << wrong_kind.status();
  ASSERT_TRUE(DuplexRing<uint64_t>::format(r.mem, r.bytes, 16).ok());
  EXPECT_FALSE(SpscRing<uint64_t>::attach(r.mem, r.bytes).ok());
  // Same cell size (32 bytes), other element layout: the layout check tells them apart.
  auto other = DuplexRing<uint64_t, uint32_t>::attach(r.mem, r.bytes);
  EXPECT_FALSE(other.ok());
  auto small = DuplexRing<uint64_t>::attach(r.mem, DuplexRing<uint64_t>::bytes_for(16) - 1);
  EXPECT_FALSE(small.ok());
  EXPECT_EQ(DuplexRing<uint64_t>::create(6).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DuplexRing<uint64_t>::format(r.mem + 64, r.bytes - 64, 16).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(RingAttach, RefusesForeignAndIncompatibleHeaders) {
  Region r(SpscRing<uint64_t>::bytes_for(16));
  // Never formatted: zero bytes.
  auto blank = SpscRing<uint64_t>::attach(r.mem, r.bytes);
  EXPECT_EQ(blank.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(blank.status().message().find("does not hold a myelin ring"), std::string::npos)
      << blank.status();
  // Random foreign bytes.
  for (std::size_t i = 0; i < r.bytes; ++i) r.mem[i] = static_cast<std::byte>(i * 37 + 11);
  EXPECT_EQ(SpscRing<uint64_t>::attach(r.mem, r.bytes).status().code(),
            StatusCode::kInvalidArgument);
  // Too small to hold a header at all.
  EXPECT_EQ(SpscRing<uint64_t>::attach(r.mem, 16).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SpscRing<uint64_t>::attach(nullptr, 4096).status().code(),
            StatusCode::kInvalidArgument);

  ASSERT_TRUE(SpscRing<uint64_t>::format(r.mem, r.bytes, 16).ok());
  auto* h = reinterpret_cast<RingLayoutHeader*>(r.mem);

  // Wrong kind: an SPSC region attached as MPSC.
  auto as_mpsc = MpscRing<uint64_t>::attach(r.mem, r.bytes);
  EXPECT_EQ(as_mpsc.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(as_mpsc.status().message().find("holds a spsc ring, not an mpsc ring"),
            std::string::npos)
      << as_mpsc.status();
  // Wrong element type.
  auto as_wide = SpscRing<Wide>::attach(r.mem, r.bytes);
  EXPECT_NE(as_wide.status().message().find("element size 8 != 24"), std::string::npos)
      << as_wide.status();
  // Region shorter than the header says.
  EXPECT_EQ(SpscRing<uint64_t>::attach(r.mem, r.bytes - 16).status().code(),
            StatusCode::kInvalidArgument);
  // Another layout version.
  h->version = kRingLayoutVersion + 1;
  auto newer = SpscRing<uint64_t>::attach(r.mem, r.bytes);
  EXPECT_EQ(newer.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(newer.status().message().find("version"), std::string::npos) << newer.status();
  h->version = kRingLayoutVersion;
  // A build that lays the ring out differently.
  h->layout_check ^= 1;
  auto other_build = SpscRing<uint64_t>::attach(r.mem, r.bytes);
  EXPECT_EQ(other_build.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(other_build.status().message().find("layout check"), std::string::npos);
  h->layout_check ^= 1;
  // A capacity that is not a power of two, or that disagrees with total_bytes.
  h->capacity = 12;
  EXPECT_EQ(SpscRing<uint64_t>::attach(r.mem, r.bytes).status().code(),
            StatusCode::kInvalidArgument);
  h->capacity = 8;
  EXPECT_EQ(SpscRing<uint64_t>::attach(r.mem, r.bytes).status().code(),
            StatusCode::kInvalidArgument);
  h->capacity = 16;
  // Not published yet.
  h->ready.store(0, std::memory_order_relaxed);
  EXPECT_EQ(SpscRing<uint64_t>::attach(r.mem, r.bytes).status().code(), StatusCode::kUnavailable);
  h->ready.store(kRingReady, std::memory_order_relaxed);
  EXPECT_TRUE(SpscRing<uint64_t>::attach(r.mem, r.bytes).ok());
}

TEST(MpscRing, FullEmptyAndWrap) {
  auto ring = MpscRing<uint64_t>::create(8, {.initial_position = kMax - 3});
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t v = 0;
  EXPECT_FALSE(ring->try_pop(v));
  uint64_t pushed = 0, popped = 0;
  for (int round = 0; round < 50; ++round) {
    while (ring->try_push(pushed)) ++pushed;
    EXPECT_EQ(pushed - popped, 8u) << "full after exactly capacity pushes";
    for (int i = 0; i < 3 + round % 6; ++i) {
      ASSERT_TRUE(ring->try_pop(v));
      ASSERT_EQ(v, popped++);
    }
  }
  std::array<uint64_t, 16> out{};
  const std::size_t n = ring->try_pop_n(out.data(), out.size());
  for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(out[i], popped++);
  EXPECT_EQ(popped, pushed);
  EXPECT_FALSE(ring->try_pop(v));
}

std::vector<std::pair<uint32_t, std::string>> drain(RecordRing& ring, std::size_t max = SIZE_MAX) {
  std::vector<std::pair<uint32_t, std::string>> out;
  auto n = ring.consume(
      [&](const RecordRing::Record& r) {
        out.emplace_back(r.type,
                         std::string(reinterpret_cast<const char*>(r.data.data()), r.data.size()));
      },
      max);
  EXPECT_TRUE(n.ok()) << n.status();
  if (n.ok()) {
    EXPECT_EQ(*n, out.size());
  }
  return out;
}

bool write_string(RecordRing& ring, const std::string& s, uint32_t type = 1) {
  return ring.try_write(s.data(), static_cast<uint32_t>(s.size()), type);
}

TEST(RecordRing, ClaimCommitConsume) {
  auto ring = RecordRing::create(256);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->max_record_size(), 120u);
  EXPECT_EQ(RecordRing::record_bytes(64), 72u) << "an 8-byte header, records aligned to 8";
  RecordRing::Claim c;
  ASSERT_TRUE(ring->try_claim(5, c, 42));
  std::memcpy(c.data, "hello", 5);
  EXPECT_TRUE(drain(*ring).empty()) << "nothing is visible before commit";
  ring->commit(c);
  ASSERT_TRUE(write_string(*ring, "", 3));  // empty payloads are records too
  auto got = drain(*ring);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], std::make_pair(42u, std::string("hello")));
  EXPECT_EQ(got[1], std::make_pair(3u, std::string()));
  EXPECT_TRUE(ring->empty_approx());
}

TEST(RecordRing, FullIsBackPressureAndSpaceReturns) {
  auto ring = RecordRing::create(256);
  ASSERT_TRUE(ring.ok());
  const std::string payload(56, 'x');  // 64 bytes per record with its header: exactly 4 fit
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(write_string(*ring, payload)) << i;
  EXPECT_FALSE(write_string(*ring, payload));
  EXPECT_FALSE(write_string(*ring, "")) << "even a bare header does not fit in a full ring";
  EXPECT_EQ(drain(*ring, 1).size(), 1u);
  EXPECT_TRUE(write_string(*ring, payload));
  EXPECT_EQ(drain(*ring).size(), 4u);
}

// Records of every size, starting 112 bytes short of 2^64: wrap padding at the end of the data
// area and the 64-bit wrap of the positions both happen many times.
TEST(RecordRing, VariableSizesWrapPast64BitPositions) {
  auto ring = RecordRing::create(512, {.initial_position = kMax - 111});
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t written = 0, read = 0;
  for (int round = 0; round < 400; ++round) {
    for (;;) {
      std::string s(static_cast<std::size_t>((written * 13) % 200), '\0');
      for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(written + i);
      if (!write_string(*ring, s, static_cast<uint32_t>(written))) break;
      ++written;
    }
    for (const auto& [type, s] : drain(*ring, 1 + round % 3)) {
      ASSERT_EQ(type, static_cast<uint32_t>(read));
      ASSERT_EQ(s.size(), (read * 13) % 200);
      for (std::size_t i = 0; i < s.size(); ++i) ASSERT_EQ(s[i], static_cast<char>(read + i));
      ++read;
    }
  }
  read += drain(*ring).size();
  EXPECT_EQ(read, written);
  EXPECT_GT(written, 400u);
}

TEST(RecordRing, AbortLatestGivesSpaceBack) {
  auto ring = RecordRing::create(128);
  ASSERT_TRUE(ring.ok());
  RecordRing::Claim a, b;
  ASSERT_TRUE(ring->try_claim(40, a));
  ASSERT_TRUE(ring->try_claim(40, b));
  RecordRing::Claim c;
  EXPECT_FALSE(ring->try_claim(40, c)) << "a third 48-byte record does not fit in 128 bytes";
  ring->abort(b);
  ASSERT_TRUE(ring->try_claim(40, c)) << "the aborted space is claimable again";
  std::memset(a.data, 'a', 40);
  std::memset(c.data, 'c', 40);
  ring->commit(c);
  auto got = drain(*ring);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].second, std::string(40, 'a'));
  EXPECT_EQ(got[1].second, std::string(40, 'c'));
}

TEST(RecordRing, AbortEarlierClaimBecomesPadding) {
  auto ring = RecordRing::create(256);
  ASSERT_TRUE(ring.ok());
  RecordRing::Claim a, b, c;
  ASSERT_TRUE(ring->try_claim(3, a, 1));
  ASSERT_TRUE(ring->try_claim(3, b, 2));
  ASSERT_TRUE(ring->try_claim(3, c, 3));
  std::memcpy(a.data, "aaa", 3);
  std::memcpy(c.data, "ccc", 3);
  ring->abort(b);
  ring->commit(c);
  auto got = drain(*ring);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], std::make_pair(1u, std::string("aaa")));
  EXPECT_EQ(got[1], std::make_pair(3u, std::string("ccc")));
}

TEST(RecordRing, BatchClaimIsAllOrNothing) {
  auto ring = RecordRing::create(256);
  ASSERT_TRUE(ring.ok());
  const std::array<uint32_t, 3> sizes{10, 20, 30};
  std::array<RecordRing::Claim, 3> claims;
  ASSERT_TRUE(ring->try_claim_batch(sizes, claims, 9));
  for (std::size_t i = 0; i < 3; ++i)
    std::memset(claims[i].data, 'a' + static_cast<int>(i), sizes[i]);
  ring->commit(claims[2]);  // publishes all three
  const std::array<uint32_t, 3> big{100, 100, 100};
  std::array<RecordRing::Claim, 3> more;
  EXPECT_FALSE(ring->try_claim_batch(big, more)) << "324 bytes cannot fit next to 96";
  auto got = drain(*ring);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[1].second, std::string(20, 'b'));
  // The failed batch left nothing behind: 108 + 72 bytes fit again.
  const std::array<uint32_t, 2> fits{100, 60};
  ASSERT_TRUE(ring->try_claim_batch(fits, more));
  ring->commit(more[1]);
  EXPECT_EQ(drain(*ring).size(), 2u);
}

// Same-size batches: nothing is visible before a commit, commit(b.claim(i)) publishes records
// 0..i, commit(b) the rest, and the batch wraps (padding at the end of the data area, positions
// past 2^64) like single claims do.
TEST(RecordRing, SameSizeBatchWrapsAndCommitsInParts) {
  auto ring = RecordRing::create(512, {.initial_position = kMax - 207});
  ASSERT_TRUE(ring.ok()) << ring.status();
  uint64_t next = 0, expect = 0;
  for (uint32_t round = 0; round < 300; ++round) {
    const uint32_t size = 8 + (round * 8) % 40;
    const uint32_t count = 1 + round % 7;
    RecordRing::BatchClaim b;
    ASSERT_TRUE(ring->try_claim_batch(count, size, b, round)) << round;
    ASSERT_EQ(b.count, count);
    for (uint32_t i = 0; i < count; ++i) {
      std::memset(b.data(i), static_cast<int>(next & 0xff), size);
      std::memcpy(b.data(i), &next, sizeof(next));
      ++next;
    }
    EXPECT_TRUE(drain(*ring).empty()) << "nothing is visible before commit";
    auto check = [&](const std::vector<std::pair<uint32_t, std::string>>& got) {
      for (const auto& [type, s] : got) {
        ASSERT_EQ(type, round);
        ASSERT_EQ(s.size(), size);
        uint64_t v = 0;
        std::memcpy(&v, s.data(), sizeof(v));
        ASSERT_EQ(v, expect);
        EXPECT_EQ(s.back(), static_cast<char>(size > 8 ? expect & 0xff : (expect >> 56) & 0xff));
        ++expect;
      }
    };
    if (count > 2) {
      ring->commit(b.claim(1));
      const auto first = drain(*ring);
      EXPECT_EQ(first.size(), 2u) << "commit of record 1 publishes records 0 and 1";
      check(first);
    }
    ring->commit(b);
    check(drain(*ring));
    EXPECT_TRUE(ring->empty_approx());
  }
  EXPECT_EQ(expect, next);
}

TEST(RecordRing, SameSizeBatchAbort) {
  auto ring = RecordRing::create(256);
  ASSERT_TRUE(ring.ok());
  RecordRing::BatchClaim a, b;
  ASSERT_TRUE(ring->try_claim_batch(2, 24, a, 1));  // 2 x 32 bytes
  ASSERT_TRUE(ring->try_claim_batch(5, 24, b, 2));  // 5 x 32 bytes
  RecordRing::BatchClaim c;
  EXPECT_FALSE(ring->try_claim_batch(2, 24, c)) << "224 of 256 bytes are claimed";
  ring->abort(b);  // the latest: its space comes back
  ASSERT_TRUE(ring->try_claim_batch(2, 24, c, 3));
  for (uint32_t i = 0; i < 2; ++i) {
    std::memset(a.data(i), 'a', 24);
    std::memset(c.data(i), 'c', 24);
  }
  ring->abort(a.claim(1));  // an earlier record becomes padding
  ring->commit(c);
  auto got = drain(*ring);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0], std::make_pair(1u, std::string(24, 'a')));
  EXPECT_EQ(got[1], std::make_pair(3u, std::string(24, 'c')));
  EXPECT_EQ(got[2], std::make_pair(3u, std::string(24, 'c')));
}

TEST(RecordRing, SameSizeBatchLargerThanTheRingIsRefused) {
  auto ring = RecordRing::create(256);
  ASSERT_TRUE(ring.ok());
  RecordRing::BatchClaim b;
  EXPECT_DEATH({ (void)ring->try_claim_batch(8, 24, b); }, "larger than the ring allows");
  ASSERT_TRUE(ring->try_claim_batch(7, 24, b)) << "7 x 32 bytes leave room for any wrap padding";
}

// The tail is the commit: a batch commit publishes it exactly, and a tail that a faulty peer
// moved behind the head, further ahead than the ring holds, off the 8-byte grid, or into the
// middle of a record is a protocol error, never a record handed to the handler.
TEST(RecordRing, CorruptTailIsAProtocolError) {
  const std::array<uint64_t, 4> lies{4096, static_cast<uint64_t>(-64), 4, 16};
  for (std::size_t k = 0; k < lies.size(); ++k) {
    Region r(RecordRing::bytes_for(1024));
    auto producer = RecordRing::format(r.mem, r.bytes, 1024, kMax - 207);
    ASSERT_TRUE(producer.ok()) << producer.status();
    auto consumer = RecordRing::attach(r.mem, r.bytes);
    ASSERT_TRUE(consumer.ok()) << consumer.status();
    auto* tail = reinterpret_cast<std::atomic<uint64_t>*>(r.mem + 256);
    RecordRing::BatchClaim b;
    ASSERT_TRUE(producer->try_claim_batch(4, 16, b, 5));  // 4 x 24 bytes
    producer->commit(b);
    EXPECT_EQ(producer->used_bytes_approx(), 4 * RecordRing::record_bytes(16));
    const uint64_t head = kMax - 207;
    tail->store(head + lies[k]);  // the last: 16 bytes in, inside the first record
    bool called = false;
    auto n = consumer->consume([&](const RecordRing::Record&) { called = true; });
    EXPECT_EQ(n.status().code(), StatusCode::kProtocolError) << k;
    EXPECT_FALSE(called) << k;
  }
}

TEST(RecordRing, ReattachedProducerContinuesAfterTheLastRecord) {
  Region r(RecordRing::bytes_for(1024));
  auto consumer = RecordRing::format(r.mem, r.bytes, 1024, kMax - 47);
  ASSERT_TRUE(consumer.ok()) << consumer.status();
  for (int generation = 0; generation < 3; ++generation) {
    auto producer = RecordRing::attach(r.mem, r.bytes);
    ASSERT_TRUE(producer.ok()) << producer.status();
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(write_string(*producer, std::string(1 + generation * 3 + i, 'a' + generation),
                               static_cast<uint32_t>(generation * 3 + i)));
    }
  }
  auto got = drain(*consumer);
  ASSERT_EQ(got.size(), 9u);
  for (uint32_t i = 0; i < 9; ++i) {
    EXPECT_EQ(got[i].first, i);
    EXPECT_EQ(got[i].second, std::string(1 + i, static_cast<char>('a' + i / 3)));
  }
}

TEST(RecordRing, CorruptHeaderIsAProtocolError) {
  Region r(RecordRing::bytes_for(256));
  auto producer = RecordRing::format(r.mem, r.bytes, 256);
  ASSERT_TRUE(producer.ok());
  auto consumer = RecordRing::attach(r.mem, r.bytes);
  ASSERT_TRUE(consumer.ok());
  ASSERT_TRUE(write_string(*producer, "abc"));
  // A buggy or hostile peer rewrites the length: above the ring's limit, or past what it
  // committed (the tail).
  for (const uint32_t bad : {1000u, 40u}) {
    std::memcpy(r.mem + 512, &bad, sizeof(bad));  // length field of the first record
    bool called = false;
    auto n = consumer->consume([&](const RecordRing::Record&) { called = true; });
    EXPECT_EQ(n.status().code(), StatusCode::kProtocolError) << bad;
    EXPECT_NE(n.status().message().find("corrupt record"), std::string::npos) << n.status();
    EXPECT_FALSE(called);
  }
}

TEST(RecordRing, AttachChecksKindAndPositions) {
  Region r(RecordRing::bytes_for(256));
  ASSERT_TRUE(RecordRing::format(r.mem, r.bytes, 256).ok());
  auto as_spsc = SpscRing<uint64_t>::attach(r.mem, r.bytes);
  EXPECT_NE(as_spsc.status().message().find("holds a record ring"), std::string::npos)
      << as_spsc.status();
  auto* tail = reinterpret_cast<std::atomic<uint64_t>*>(r.mem + 256);
  tail->store(4096, std::memory_order_relaxed);  // further ahead than the ring holds
  EXPECT_EQ(RecordRing::attach(r.mem, r.bytes).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RecordRing::format(r.mem, r.bytes, 100).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RecordRing::format(r.mem, r.bytes, 256, 3).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace myelin
