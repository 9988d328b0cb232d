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
#include <bit>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/shm_segment.hpp>
#include <myelin/core/status.hpp>
#include <myelin/core/wait.hpp>

namespace myelin {
namespace internal {

// Slot alignment: the next power of two of the slot's size up to one cache line, so slots pack a
// line without straddling two; larger slots start on a line.
template <typename T>
constexpr std::size_t sequenced_slot_align() {
  const std::size_t raw = align_up(sizeof(uint64_t) + sizeof(T), alignof(T) > 8 ? alignof(T) : 8);
  const std::size_t a = raw >= kCacheLine ? kCacheLine : std::bit_ceil(raw);
  return a > alignof(T) ? a : alignof(T);
}

// A position that orders nothing (SpscRing's tail, MpscRing's head: the slots carry the data) is
// published to shared memory every this many operations, and whenever its side finds the ring
// full (empty): a power of two, at most a quarter of the ring.
constexpr uint64_t publish_batch_for(uint64_t capacity) noexcept {
  const uint64_t quarter = capacity / 4;
  return quarter >= 64 ? 64 : (quarter == 0 ? 1 : quarter);
}

// A slot whose sequence number says which lap it holds (see the protocol in spsc_ring.hpp).
template <typename T>
struct alignas(sequenced_slot_align<T>()) SequencedSlot {
  std::atomic<uint64_t> seq;
  T value;
};

// The cache lines before the slots of SpscRing and MpscRing.
struct alignas(kCacheLine) SequencedRingShared {
  RingLayoutHeader layout;
  alignas(kCacheLine) std::atomic<uint64_t> head;  // consumer position
  alignas(kCacheLine) std::atomic<uint64_t> tail;  // producer position
  WaitWord consumer_wait;
};
static_assert(offsetof(SequencedRingShared, head) == 64 &&
              offsetof(SequencedRingShared, tail) == 128 &&
              offsetof(SequencedRingShared, consumer_wait) == 192 &&
              sizeof(SequencedRingShared) == 256);

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

// Lays the shared lines and the slots of a sequenced ring over `region`; every slot starts "free
// for the first lap": seq == the first position >= initial that maps to it.
template <typename T>
SequencedRingShared* format_sequenced_ring(void* region, uint64_t capacity, uint64_t initial,
                                           const RingLayoutSpec& spec) {
  auto* shared = new (region) SequencedRingShared;
  write_ring_header(&shared->layout, capacity, spec);
  shared->head.store(initial, std::memory_order_relaxed);
  shared->tail.store(initial, std::memory_order_relaxed);
  auto* slots = reinterpret_cast<SequencedSlot<T>*>(static_cast<std::byte*>(region) +
                                                    sizeof(SequencedRingShared));
  const uint64_t mask = capacity - 1;
  for (uint64_t i = 0; i < capacity; ++i) {
    auto* slot = new (&slots[i]) SequencedSlot<T>;
    slot->seq.store(initial + ((i - initial) & mask), std::memory_order_relaxed);
  }
  publish_ring_header(&shared->layout);  // release: orders all of the above before `ready`
  return shared;
}

}  // namespace internal

template <typename T>
class SpscRing {
  static_assert(std::is_trivially_copyable_v<T>, "ring elements are copied through shared memory");
  using Slot = internal::SequencedSlot<T>;
  using Shared = internal::SequencedRingShared;

 public:
  using value_type = T;
  static constexpr RingLayoutSpec kSpec = internal::sequenced_ring_spec<T>(RingKind::kSpsc);

  // Bytes a region must have for `capacity` elements.
  static constexpr std::size_t bytes_for(std::size_t capacity) noexcept {
    return sizeof(Shared) + capacity * sizeof(Slot);
  }

  // A ring owning NUMA-placed memory. capacity: a power of two.
  static Result<SpscRing> create(std::size_t capacity, const RingOptions& options = {}) {
    if (!is_power_of_two(capacity)) {
      return invalid_argument("spsc ring capacity ", capacity, " must be a power of two");
    }
    MYELIN_ASSIGN_OR_RETURN(NumaBuffer buffer, allocate_numa(bytes_for(capacity), options.memory));
    MYELIN_ASSIGN_OR_RETURN(
        SpscRing ring, format(buffer.data(), buffer.size(), capacity, options.initial_position));
    ring.owned_ = std::move(buffer);
    return ring;
  }
  // Initialises a ring in `region` (aligned to 128 bytes, >= bytes_for(capacity) bytes). The
  // other side attaches only after this returned.
  static Result<SpscRing> format(void* region, std::size_t bytes, std::size_t capacity,
                                 uint64_t initial_position = 0) {
    MYELIN_RETURN_IF_ERROR(check_ring_region(region, bytes, capacity, kSpec));
    return SpscRing(internal::format_sequenced_ring<T>(region, capacity, initial_position, kSpec),
                    capacity);
  }
  // Uses a ring another process (or thread) formatted in `region`.
  static Result<SpscRing> attach(void* region, std::size_t bytes) {
    MYELIN_ASSIGN_OR_RETURN(uint64_t capacity, validate_ring_header(region, bytes, kSpec));
    return SpscRing(std::launder(static_cast<Shared*>(region)), capacity);
  }

  SpscRing(SpscRing&&) noexcept = default;
  SpscRing& operator=(SpscRing&&) noexcept = default;
  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;

  // ---- producer ----
  [[nodiscard]] bool try_push(const T& value) noexcept {
    const uint64_t t = producer_.tail;
    if (t - producer_.head_cache >= capacity_) {
      // Pairs with the consumer's release store of head after it copied the value out.
      producer_.head_cache = shared_->head.load(std::memory_order_acquire);
      if (t - producer_.head_cache >= capacity_) {
        publish_tail(t);
        return false;
      }
    }
    Slot& slot = slots_[t & mask_];
    slot.value = value;
    // Pairs with the consumer's acquire load of seq in try_pop(): the value is visible.
    slot.seq.store(t + 1, std::memory_order_release);
    producer_.tail = t + 1;
    if (((t + 1) & publish_mask_) == 0) publish_tail(t + 1);
    return true;
  }
  // Pushes up to n values in order; returns how many (0 when full).
  [[nodiscard]] std::size_t try_push_n(const T* values, std::size_t n) noexcept {
    const uint64_t t = producer_.tail;
    uint64_t free = capacity_ - (t - producer_.head_cache);
    if (free < n) {
      // Pairs with the consumer's release store of head.
      producer_.head_cache = shared_->head.load(std::memory_order_acquire);
      free = capacity_ - (t - producer_.head_cache);
    }
    const std::size_t count = n < free ? n : static_cast<std::size_t>(free);
    for (std::size_t i = 0; i < count; ++i) {
      Slot& slot = slots_[(t + i) & mask_];
      slot.value = values[i];
      // Pairs with the consumer's acquire load of seq.
      slot.seq.store(t + i + 1, std::memory_order_release);
    }
    producer_.tail = t + count;
    publish_tail(t + count);
    return count;
  }

  // ---- consumer ----
  [[nodiscard]] bool try_pop(T& out) noexcept {
    const uint64_t h = consumer_.head;
    Slot& slot = slots_[h & mask_];
    // Pairs with the producer's release store of seq in try_push().
    if (slot.seq.load(std::memory_order_acquire) != h + 1) return false;
    out = slot.value;
    consumer_.head = h + 1;
    // Pairs with the producer's acquire load of head: the slot may be overwritten now.
    shared_->head.store(h + 1, std::memory_order_release);
    return true;
  }
  // Pops up to n values in order into out; returns how many. Releases the slots once.
  [[nodiscard]] std::size_t try_pop_n(T* out, std::size_t n) noexcept {
    const uint64_t h = consumer_.head;
    std::size_t count = 0;
    while (count < n) {
      Slot& slot = slots_[(h + count) & mask_];
      // Pairs with the producer's release store of seq.
      if (slot.seq.load(std::memory_order_acquire) != h + count + 1) break;
      out[count] = slot.value;
      ++count;
    }
    if (count != 0) {
      consumer_.head = h + count;
      // Pairs with the producer's acquire load of head.
      shared_->head.store(h + count, std::memory_order_release);
    }
    return count;
  }

  // ---- either side ----
  [[nodiscard]] std::size_t capacity() const noexcept {
    return static_cast<std::size_t>(capacity_);
  }
  // A snapshot; it may miss up to publish_batch() - 1 of the latest pushes.
  [[nodiscard]] std::size_t size_approx() const noexcept {
    // Relaxed: an estimate; head first so the difference never goes negative through reordering
    // of our own loads (tail only grows).
    const uint64_t h = shared_->head.load(std::memory_order_relaxed);
    const uint64_t t = shared_->tail.load(std::memory_order_relaxed);
    const uint64_t n = t - h;
    return n > capacity_ ? 0 : static_cast<std::size_t>(n);
  }
  // Whether the slot at the consumer's position is still unfilled; exact when the consumer is
  // not popping concurrently.
  [[nodiscard]] bool empty_approx() const noexcept {
    // Relaxed: a hint; nothing is read through it.
    const uint64_t h = shared_->head.load(std::memory_order_relaxed);
    return slots_[h & mask_].seq.load(std::memory_order_relaxed) != h + 1;
  }
  // How many pushes may pass between two stores of the shared tail.
  [[nodiscard]] std::size_t publish_batch() const noexcept { return publish_mask_ + 1; }
  // The consumer's wait word, for a Waiter (consumer waits, producer notifies).
  [[nodiscard]] WaitWord& consumer_wait_word() const noexcept { return shared_->consumer_wait; }
  // The region's start (what was formatted or attached).
  [[nodiscard]] void* region() const noexcept { return shared_; }

 private:
  SpscRing(Shared* shared, uint64_t capacity) noexcept
      : shared_(shared),
        slots_(reinterpret_cast<Slot*>(reinterpret_cast<std::byte*>(shared) + sizeof(Shared))),
        capacity_(capacity),
        mask_(capacity - 1),
        publish_mask_(internal::publish_batch_for(capacity) - 1) {
    // Acquire: pairs with the release stores of the other side (or of format()). The shared tail
    // may trail the last push (it is published lazily): a producer resumes after the last slot
    // that holds an element for its own position.
    uint64_t t = shared->tail.load(std::memory_order_acquire);
    for (uint64_t i = 0; i < capacity; ++i) {
      // Pairs with the release store of seq in try_push().
      if (slots_[t & mask_].seq.load(std::memory_order_acquire) != t + 1) break;
      ++t;
    }
    producer_.tail = t;
    producer_.head_cache = shared->head.load(std::memory_order_acquire);
    consumer_.head = producer_.head_cache;
  }

  void publish_tail(uint64_t t) noexcept {
    // Relaxed: read by size_approx() only; data is published through the slots' seq.
    shared_->tail.store(t, std::memory_order_relaxed);
  }

  // Read-only after construction: shared by both sides without false sharing.
  Shared* shared_;
  Slot* slots_;
  uint64_t capacity_;
  uint64_t mask_;
  uint64_t publish_mask_;
  NumaBuffer owned_;  // empty when laid over a caller's region
  // Each side's private state in its own pair of cache lines (see kFalseSharingRange).
  struct alignas(kFalseSharingRange) Producer {
    uint64_t tail = 0;
    uint64_t head_cache = 0;
  } producer_;
  struct alignas(kFalseSharingRange) Consumer {
    uint64_t head = 0;
  } consumer_;
};

}  // namespace myelin
