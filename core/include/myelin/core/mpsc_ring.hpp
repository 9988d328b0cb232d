// myelin/core/mpsc_ring.hpp
//
// MpscRing<T>: a bounded lock-free multi-producer/single-consumer ring of fixed-size elements.
// Same two modes (create() owning NUMA-placed memory; format()/attach() over a caller's region)
// and the same versioned layout as SpscRing (see spsc_ring.hpp), with kind kMpsc.
//
// Protocol. Producers claim a position by compare-and-swap on `tail`; a slot is free for the
// claimer at position t when its seq == t, which the consumer sets (seq = h + capacity, release)
// after copying the value out, so producers learn about free space from the slot they are about
// to write rather than from the consumer's index line. The claimer writes the value and publishes
// seq = t + 1 (release); the consumer at h reads only the slot, exactly as in SpscRing, and
// publishes head for size_approx() every publish_batch() pops and when it finds the ring empty. A
// slot whose seq is t + 1 - capacity still holds the previous lap's element: the ring is full and
// try_push() returns false (back-pressure).
//
// A producer that dies between its claim and its publish leaves a hole the consumer cannot pass:
// run the consumer's waits with a liveness check (ShmSegment::check_peers()) so it gets
// peer_failed instead of waiting forever.
//
// Thread safety: any number of producer threads/processes call try_push(); one consumer thread
// calls try_pop*(). Requirements: T is trivially copyable.
#pragma once

#include <myelin/core/spsc_ring.hpp>

namespace myelin {

template <typename T>
class MpscRing : public internal::SequencedRingBase<MpscRing<T>, T, RingKind::kMpsc> {
  using Base = internal::SequencedRingBase<MpscRing<T>, T, RingKind::kMpsc>;
  using Slot = internal::SequencedSlot<T>;
  friend Base;

 public:
  MpscRing(MpscRing&&) noexcept = default;
  MpscRing& operator=(MpscRing&&) noexcept = default;
  MpscRing(const MpscRing&) = delete;
  MpscRing& operator=(const MpscRing&) = delete;

  // ---- producers (any thread) ----
  [[nodiscard]] bool try_push(const T& value) noexcept {
    // Relaxed: only a starting guess; the CAS below decides.
    uint64_t t = shared_->tail.load(std::memory_order_relaxed);
    Slot* slot;
    for (;;) {
      slot = &slots_[t & mask_];
      // Pairs with the consumer's release store that freed the slot (or with format()).
      const uint64_t seq = slot->seq.load(std::memory_order_acquire);
      const auto diff = static_cast<int64_t>(seq - t);
      if (diff == 0) {
        // Relaxed: the claim itself orders nothing; the slot's seq carries the data.
        if (shared_->tail.compare_exchange_weak(t, t + 1, std::memory_order_relaxed,
                                                std::memory_order_relaxed)) {
          break;
        }
      } else if (diff < 0) {
        return false;  // the previous lap's element is still there: full
      } else {
        t = shared_->tail.load(std::memory_order_relaxed);  // another producer took t
      }
    }
    slot->value = value;
    // Pairs with the consumer's acquire load of seq in try_pop().
    slot->seq.store(t + 1, std::memory_order_release);
    return true;
  }

  // ---- consumer (one thread) ----
  [[nodiscard]] bool try_pop(T& out) noexcept {
    const uint64_t h = head_;
    Slot& slot = slots_[h & mask_];
    // Pairs with the producer's release store of seq = h + 1.
    if (slot.seq.load(std::memory_order_acquire) != h + 1) {
      if (published_ != h) publish_head(h);  // idle: make size_approx() exact
      return false;
    }
    out = slot.value;
    // Pairs with a producer's acquire load of seq: free for position h + capacity.
    slot.seq.store(h + capacity_, std::memory_order_release);
    head_ = h + 1;
    if (((h + 1) & publish_mask_) == 0) publish_head(h + 1);
    return true;
  }
  [[nodiscard]] std::size_t try_pop_n(T* out, std::size_t n) noexcept {
    std::size_t count = 0;
    while (count < n && try_pop(out[count])) ++count;
    return count;
  }

  // ---- either side ----
  // Claimed positions minus consumed ones: includes claims not yet published, and up to
  // publish_batch() - 1 elements the consumer took since it last published its head (it does
  // every publish_batch() pops and whenever it finds the ring empty).
  [[nodiscard]] std::size_t size_approx() const noexcept {
    // Relaxed: an estimate only.
    const uint64_t h = shared_->head.load(std::memory_order_relaxed);
    const uint64_t t = shared_->tail.load(std::memory_order_relaxed);
    const uint64_t n = t - h;
    return n > capacity_ ? 0 : static_cast<std::size_t>(n);
  }
  [[nodiscard]] bool empty_approx() const noexcept { return size_approx() == 0; }

 private:
  using Base::capacity_;
  using Base::shared_;

  MpscRing(internal::SequencedRingShared* shared, uint64_t capacity) noexcept
      : Base(shared, capacity),
        slots_(reinterpret_cast<Slot*>(this->first_slot())),
        mask_(capacity - 1),
        publish_mask_(internal::publish_batch_for(capacity) - 1) {
    // Acquire: pairs with the release store of the consumer (or format()).
    head_ = published_ = shared->head.load(std::memory_order_acquire);
  }
  void publish_head(uint64_t h) noexcept {
    published_ = h;
    // Relaxed: read by size_approx() only; producers learn about space from the slots.
    shared_->head.store(h, std::memory_order_relaxed);
  }

  Slot* slots_;
  uint64_t mask_;
  uint64_t publish_mask_;
  alignas(kFalseSharingRange) uint64_t head_ = 0;  // consumer-private position
  uint64_t published_ = 0;                         // last head stored to shared memory
};

}  // namespace myelin
