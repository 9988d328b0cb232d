// myelin/core/internal/spsc_lane.hpp -- not an API header; include the ring headers instead.
//
// The parts every ring shares:
//   - RingMemory<Ring>: create(), which allocates NUMA-placed memory, formats the ring in it and
//     keeps the buffer alive with the ring (the other mode, a caller's region, needs nothing);
//   - SequencedSlot<T>: a slot whose sequence number says which lap it holds;
//   - SpscLane<T, Slot, kStride>: the single-producer/single-consumer protocol over slots placed
//     kStride bytes apart, with the consumer's head and the producer's (lazily published) tail in
//     shared memory. SpscRing is one lane over packed slots; DuplexRing is two lanes whose slots
//     interleave, so slot i of one direction shares a cache line with slot i of the other.
//
// Lane protocol (see spsc_ring.hpp for why): the producer at position t checks its cached copy of
// head (reloading it, acquire, only when the cache says "full"), writes the value into slot t and
// publishes it with a release store of seq = t + 1 in the same slot; the consumer at h polls only
// slot h (acquire) until seq == h + 1, copies the value out and stores head = h + 1 (release) so
// the producer may reuse the slot. The shared tail orders nothing; it is stored every
// publish_batch() pushes and when the ring is found full, for size_approx() and for a producer
// that re-attaches. Slots start "free for the first lap" (seq == the first position >= the
// initial one that maps to them), so no stale seq can equal h + 1 wherever positions start; all
// arithmetic is modulo 2^64.
//
// Thread safety: one producer thread calls try_push*, one consumer thread try_pop*; the read-only
// queries from anywhere. A lane object is a view: it never owns the memory it points into.
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

namespace myelin::internal {

// ---- create() for every ring -------------------------------------------------------------------

// Base of each ring class: create() allocates bytes_for(capacity) NUMA-placed bytes, lays the ring
// over them with Ring::format() and keeps the buffer (released with the ring). Ring provides
// kSpec, bytes_for() and format(region, bytes, capacity, initial_position).
template <typename Ring>
class RingMemory {
 public:
  // A ring owning NUMA-placed memory, e.g. {.memory = placement_for_consumer(cpu)}.
  static Result<Ring> create(std::size_t capacity, const RingOptions& options = {}) {
    if (!is_power_of_two(capacity) || capacity < Ring::kSpec.min_capacity) {
      return invalid_argument(ring_kind_name(Ring::kSpec.kind), " capacity ", capacity,
                              " must be a power of two >= ", Ring::kSpec.min_capacity);
    }
    MYELIN_ASSIGN_OR_RETURN(NumaBuffer buffer,
                            allocate_numa(Ring::bytes_for(capacity), options.memory));
    MYELIN_ASSIGN_OR_RETURN(
        Ring ring, Ring::format(buffer.data(), buffer.size(), capacity, options.initial_position));
    ring.owned_ = std::move(buffer);
    return ring;
  }

 protected:
  NumaBuffer owned_;  // empty when laid over a caller's region
};

// ---- sequenced slots ---------------------------------------------------------------------------

// Slot alignment: the next power of two of the slot's size up to one cache line, so slots pack a
// line without straddling two; larger slots start on a line.
template <typename T>
constexpr std::size_t sequenced_slot_align() {
  const std::size_t raw = align_up(sizeof(uint64_t) + sizeof(T), alignof(T) > 8 ? alignof(T) : 8);
  const std::size_t a = raw >= kCacheLine ? kCacheLine : std::bit_ceil(raw);
  return a > alignof(T) ? a : alignof(T);
}

// A position that orders nothing (a lane's tail, MpscRing's head: the slots carry the data) is
// published to shared memory every this many operations, and whenever its side finds the ring
// full (empty): a power of two, at most a quarter of the ring.
constexpr uint64_t publish_batch_for(uint64_t capacity) noexcept {
  const uint64_t quarter = capacity / 4;
  return quarter >= 64 ? 64 : (quarter == 0 ? 1 : quarter);
}

// A slot whose sequence number says which lap it holds, aligned so that slots pack cache lines.
template <typename T>
struct alignas(sequenced_slot_align<T>()) SequencedSlot {
  std::atomic<uint64_t> seq;
  T value;
};

// The same without extra alignment, for slots packed into a larger cell (DuplexRing).
template <typename T>
struct PackedSequencedSlot {
  std::atomic<uint64_t> seq;
  T value;
};

// Constructs `capacity` slots kStride bytes apart from `first`, each "free for the first lap":
// seq == the first position >= initial that maps to it.
template <typename Slot, std::size_t kStride>
void format_lane_slots(std::byte* first, uint64_t capacity, uint64_t initial) noexcept {
  const uint64_t mask = capacity - 1;
  for (uint64_t i = 0; i < capacity; ++i) {
    auto* slot = new (first + i * kStride) Slot;
    slot->seq.store(initial + ((i - initial) & mask), std::memory_order_relaxed);
  }
}

// ---- the single-producer/single-consumer protocol ----------------------------------------------

template <typename T, typename Slot, std::size_t kStride>
class SpscLane {
  static_assert(std::is_trivially_copyable_v<T>, "ring elements are copied through shared memory");
  static_assert(kStride >= sizeof(Slot) && kStride % alignof(Slot) == 0);

 public:
  using value_type = T;

  // A view of a lane another party formatted (format_lane_slots()) or is using. A producer
  // resumes after the last filled slot: the shared tail may trail the last push.
  SpscLane(std::byte* first_slot, std::atomic<uint64_t>* head, std::atomic<uint64_t>* tail,
           uint64_t capacity) noexcept
      : first_(first_slot),
        head_(head),
        tail_(tail),
        capacity_(capacity),
        mask_(capacity - 1),
        publish_mask_(publish_batch_for(capacity) - 1) {
    // Acquire: pairs with the release stores of the other side (or of format()).
    uint64_t t = tail->load(std::memory_order_acquire);
    for (uint64_t i = 0; i < capacity; ++i) {
      // Pairs with the release store of seq in try_push().
      if (slot(t).seq.load(std::memory_order_acquire) != t + 1) break;
      ++t;
    }
    producer_.tail = t;
    producer_.head_cache = head->load(std::memory_order_acquire);
    consumer_.head = producer_.head_cache;
  }

  SpscLane(SpscLane&&) noexcept = default;
  SpscLane& operator=(SpscLane&&) noexcept = default;
  SpscLane(const SpscLane&) = delete;
  SpscLane& operator=(const SpscLane&) = delete;

  // ---- producer ----
  // False when full (back-pressure).
  [[nodiscard]] bool try_push(const T& value) noexcept {
    const uint64_t t = producer_.tail;
    if (t - producer_.head_cache >= capacity_) {
      // Pairs with the consumer's release store of head after it copied the value out.
      producer_.head_cache = head_->load(std::memory_order_acquire);
      if (t - producer_.head_cache >= capacity_) {
        publish_tail(t);
        return false;
      }
    }
    Slot& s = slot(t);
    s.value = value;
    // Pairs with the consumer's acquire load of seq in try_pop(): the value is visible.
    s.seq.store(t + 1, std::memory_order_release);
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
      producer_.head_cache = head_->load(std::memory_order_acquire);
      free = capacity_ - (t - producer_.head_cache);
    }
    const std::size_t count = n < free ? n : static_cast<std::size_t>(free);
    for (std::size_t i = 0; i < count; ++i) {
      Slot& s = slot(t + i);
      s.value = values[i];
      // Pairs with the consumer's acquire load of seq.
      s.seq.store(t + i + 1, std::memory_order_release);
    }
    producer_.tail = t + count;
    publish_tail(t + count);
    return count;
  }

  // ---- consumer ----
  // False when empty.
  [[nodiscard]] bool try_pop(T& out) noexcept {
    const uint64_t h = consumer_.head;
    Slot& s = slot(h);
    // Pairs with the producer's release store of seq in try_push().
    if (s.seq.load(std::memory_order_acquire) != h + 1) return false;
    out = s.value;
    consumer_.head = h + 1;
    // Pairs with the producer's acquire load of head: the slot may be overwritten now.
    head_->store(h + 1, std::memory_order_release);
    return true;
  }
  // Pops up to n values in order into out; returns how many. Releases the slots once.
  [[nodiscard]] std::size_t try_pop_n(T* out, std::size_t n) noexcept {
    const uint64_t h = consumer_.head;
    std::size_t count = 0;
    while (count < n) {
      Slot& s = slot(h + count);
      // Pairs with the producer's release store of seq.
      if (s.seq.load(std::memory_order_acquire) != h + count + 1) break;
      out[count] = s.value;
      ++count;
    }
    if (count != 0) {
      consumer_.head = h + count;
      // Pairs with the producer's acquire load of head.
      head_->store(h + count, std::memory_order_release);
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
    const uint64_t h = head_->load(std::memory_order_relaxed);
    const uint64_t t = tail_->load(std::memory_order_relaxed);
    const uint64_t n = t - h;
    return n > capacity_ ? 0 : static_cast<std::size_t>(n);
  }
  // Whether the slot at the consumer's position is still unfilled; exact when the consumer is
  // not popping concurrently.
  [[nodiscard]] bool empty_approx() const noexcept {
    // Relaxed: a hint; nothing is read through it.
    const uint64_t h = head_->load(std::memory_order_relaxed);
    return slot(h).seq.load(std::memory_order_relaxed) != h + 1;
  }
  // How many pushes may pass between two stores of the shared tail.
  [[nodiscard]] std::size_t publish_batch() const noexcept { return publish_mask_ + 1; }

 private:
  Slot& slot(uint64_t position) const noexcept {
    return *reinterpret_cast<Slot*>(first_ + (position & mask_) * kStride);
  }
  void publish_tail(uint64_t t) noexcept {
    // Relaxed: read by size_approx() and a re-attaching producer only; data is published through
    // the slots' seq.
    tail_->store(t, std::memory_order_relaxed);
  }

  // Read-only after construction: shared by both sides without false sharing.
  std::byte* first_;
  std::atomic<uint64_t>* head_;
  std::atomic<uint64_t>* tail_;
  uint64_t capacity_;
  uint64_t mask_;
  uint64_t publish_mask_;
  // Each side's private state in its own pair of cache lines (see kFalseSharingRange).
  struct alignas(kFalseSharingRange) Producer {
    uint64_t tail = 0;
    uint64_t head_cache = 0;
  } producer_;
  struct alignas(kFalseSharingRange) Consumer {
    uint64_t head = 0;
  } consumer_;
};

}  // namespace myelin::internal
