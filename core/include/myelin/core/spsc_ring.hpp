// myelin/core/spsc_ring.hpp
//
// SpscRing<T>: a bounded lock-free single-producer/single-consumer ring of fixed-size elements.
//
// Two modes, one layout:
//   - owning:   SpscRing<T>::create(capacity, {.memory = placement_for_consumer(cpu)}) allocates
//               NUMA-bound memory (the consumer's node by the placement policy);
//   - laid over a caller's region (shared memory): format(region, bytes, capacity) in one process,
//               attach(region, bytes) in the other; attach() validates the versioned header and
//               refuses foreign or incompatible regions with a clear error.
//
// Layout (offsets from the region start; nothing inside is a pointer):
//     0  RingLayoutHeader   magic, version, kind, element size, capacity, layout check, ready
//   128  head               consumer position (u64)
//   256  tail               producer position (u64)
//   384  WaitWord           consumer's sleep/wake word
//   512  slots[capacity]    {u64 seq; T value}, sized to 16/32/64 bytes or multiples of 64 so a
//                           slot never straddles a cache line
// Hot fields are kFalseSharingRange (128 bytes) apart: cores fetch lines in adjacent pairs.
// Positions are monotonically increasing 64-bit counters (they never wrap in practice, and the
// arithmetic is correct across 2^64 anyway); slot = position & (capacity - 1).
//
// Protocol. The producer at position t waits for space using its cached copy of `head` (reloading
// it only when the cache says "full"), writes the value, then publishes with a release store of
// seq = t + 1 into the same slot. The consumer at position h reads only the slot: seq == h + 1
// means the value is there. So a consumer polling an empty ring touches one cache line -- the one
// the next value arrives in -- and a hand-off costs one line transfer, not two (index line, then
// data line). The consumer releases each slot by storing head (release), which the producer reads
// only when it runs out of cached space. The producer's shared tail orders nothing (the slots
// do), so it is stored only every publish_batch() elements and when the ring is found full:
// one store fewer per element, which measurably raises throughput. Slot seqs are initialised to
// "free for the first lap" so that no stale value can ever match h + 1, whatever the initial
// position.
//
// A full ring is back-pressure: try_push() returns false. An empty ring: try_pop() returns false.
// To sleep instead of polling, see Waiter (wait.hpp) over consumer_wait_word().
//
// Thread safety: one producer thread calls the producer methods (try_push*), one consumer thread
// the consumer methods (try_pop*); across processes, the producer and the consumer each attach
// their own SpscRing object to the shared region. size_approx()/empty_approx() from anywhere.
// Requirements: T is trivially copyable (it is copied in and out of shared memory).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/internal/spsc_lane.hpp>
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/shm_segment.hpp>
#include <myelin/core/status.hpp>
#include <myelin/core/wait.hpp>

namespace myelin {
namespace internal {

// The cache lines before the slots of SpscRing and MpscRing; fields written by different sides
// are kFalseSharingRange apart.
struct alignas(kFalseSharingRange) SequencedRingShared {
  RingLayoutHeader layout;
  alignas(kFalseSharingRange) std::atomic<uint64_t> head;  // consumer position
  alignas(kFalseSharingRange) std::atomic<uint64_t> tail;  // producer position
  alignas(kFalseSharingRange) WaitWord consumer_wait;
};
static_assert(offsetof(SequencedRingShared, head) == 128 &&
              offsetof(SequencedRingShared, tail) == 256 &&
              offsetof(SequencedRingShared, consumer_wait) == 384 &&
              sizeof(SequencedRingShared) == 512);

template <typename T>
constexpr RingLayoutSpec sequenced_ring_spec(RingKind kind) {
  using Slot = SequencedSlot<T>;
  return RingLayoutSpec{
      kind,
      sizeof(T),
      layout_hash({static_cast<uint64_t>(kind), sizeof(SequencedRingShared),
                   offsetof(SequencedRingShared, head), offsetof(SequencedRingShared, tail),
                   offsetof(SequencedRingShared, consumer_wait), sizeof(WaitWord), sizeof(Slot),
                   alignof(Slot), offsetof(Slot, value), sizeof(T), alignof(T), kCacheLine}),
      sizeof(SequencedRingShared),
      sizeof(Slot),
      1};
}

// What SpscRing and MpscRing share: the layout (header lines, then SequencedSlot<T>[capacity]),
// create() / format() / attach() and the queries that need no protocol. Ring is constructed from
// (SequencedRingShared*, capacity) and befriends this class.
template <typename Ring, typename T, RingKind kKind>
class SequencedRingBase : public RingMemory<Ring> {
 public:
  using value_type = T;
  static constexpr RingLayoutSpec kSpec = sequenced_ring_spec<T>(kKind);

  // Bytes a region must have for `capacity` elements.
  static constexpr std::size_t bytes_for(std::size_t capacity) noexcept {
    return sizeof(SequencedRingShared) + capacity * sizeof(SequencedSlot<T>);
  }
  // Initialises a ring in `region` (aligned to 128 bytes, >= bytes_for(capacity) bytes), every
  // slot "free for the first lap". The other side attaches only after this returned.
  static Result<Ring> format(void* region, std::size_t bytes, std::size_t capacity,
                             uint64_t initial_position = 0) {
    MYELIN_RETURN_IF_ERROR(check_ring_region(region, bytes, capacity, kSpec));
    auto* shared = new (region) SequencedRingShared;
    write_ring_header(&shared->layout, capacity, kSpec);
    shared->head.store(initial_position, std::memory_order_relaxed);
    shared->tail.store(initial_position, std::memory_order_relaxed);
    format_lane_slots<SequencedSlot<T>, sizeof(SequencedSlot<T>)>(
        static_cast<std::byte*>(region) + sizeof(SequencedRingShared), capacity, initial_position);
    publish_ring_header(&shared->layout);  // release: orders all of the above before `ready`
    return Ring(shared, capacity);
  }
  // Uses a ring another process (or thread) formatted in `region`, after validating its header.
  static Result<Ring> attach(void* region, std::size_t bytes) {
    MYELIN_ASSIGN_OR_RETURN(uint64_t capacity, validate_ring_header(region, bytes, kSpec));
    return Ring(std::launder(static_cast<SequencedRingShared*>(region)), capacity);
  }

  [[nodiscard]] std::size_t capacity() const noexcept {
    return static_cast<std::size_t>(capacity_);
  }
  // The consumer's wait word, for a Waiter (consumer waits, producer notifies).
  [[nodiscard]] WaitWord& consumer_wait_word() const noexcept { return shared_->consumer_wait; }
  // The region's start (what was formatted or attached).
  [[nodiscard]] void* region() const noexcept { return shared_; }

 protected:
  SequencedRingBase(SequencedRingShared* shared, uint64_t capacity) noexcept
      : shared_(shared), capacity_(capacity) {}
  std::byte* first_slot() const noexcept {
    return reinterpret_cast<std::byte*>(shared_) + sizeof(SequencedRingShared);
  }

  SequencedRingShared* shared_;
  uint64_t capacity_;
};

}  // namespace internal

template <typename T>
class SpscRing : public internal::SequencedRingBase<SpscRing<T>, T, RingKind::kSpsc> {
  using Base = internal::SequencedRingBase<SpscRing<T>, T, RingKind::kSpsc>;
  using Slot = internal::SequencedSlot<T>;
  friend Base;

 public:
  SpscRing(SpscRing&&) noexcept = default;
  SpscRing& operator=(SpscRing&&) noexcept = default;
  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;

  // ---- producer ----
  // False when the ring is full (back-pressure).
  [[nodiscard]] bool try_push(const T& value) noexcept { return lane_.try_push(value); }
  // Pushes up to n values in order; returns how many (0 when full).
  [[nodiscard]] std::size_t try_push_n(const T* values, std::size_t n) noexcept {
    return lane_.try_push_n(values, n);
  }

  // ---- consumer ----
  // False when the ring is empty.
  [[nodiscard]] bool try_pop(T& out) noexcept { return lane_.try_pop(out); }
  // Pops up to n values in order into out; returns how many. Releases the slots once.
  [[nodiscard]] std::size_t try_pop_n(T* out, std::size_t n) noexcept {
    return lane_.try_pop_n(out, n);
  }

  // ---- either side ----
  // A snapshot; it may miss up to publish_batch() - 1 of the latest pushes.
  [[nodiscard]] std::size_t size_approx() const noexcept { return lane_.size_approx(); }
  // Whether the slot at the consumer's position is still unfilled; exact when the consumer is
  // not popping concurrently.
  [[nodiscard]] bool empty_approx() const noexcept { return lane_.empty_approx(); }
  // How many pushes may pass between two stores of the shared tail.
  [[nodiscard]] std::size_t publish_batch() const noexcept { return lane_.publish_batch(); }

 private:
  SpscRing(internal::SequencedRingShared* shared, uint64_t capacity) noexcept
      : Base(shared, capacity), lane_(this->first_slot(), &shared->head, &shared->tail, capacity) {}

  internal::SpscLane<T, Slot, sizeof(Slot)> lane_;
};

}  // namespace myelin
