// myelin/broker/bounded_queue.hpp
//
// BoundedQueue<T>: a fixed-capacity lock-free multi-producer multi-consumer ring (one sequence
// word per cell). The broker keeps one per subscriber and lane: the routing thread pushes, the
// thread that drains the subscriber pops, and under a drop-oldest policy the routing thread also
// pops the oldest entry to make room, which is why the ring must allow several consumers.
//
// Full and empty are back-pressure, not errors: try_push/try_pop return false.
// Thread safety: every method may be called from any thread at once. size() is a snapshot.
// Capacity is rounded up to a power of two (at least 2).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

#include <myelin/core/check.hpp>

namespace myelin::broker {

inline constexpr size_t kCacheLine = 64;

template <typename T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) {
    size_t cap = 2;
    while (cap < capacity) cap <<= 1;
    mask_ = cap - 1;
    cells_ = std::make_unique<Cell[]>(cap);
    for (size_t i = 0; i < cap; ++i) cells_[i].seq.store(i, std::memory_order_relaxed);
  }
  BoundedQueue(const BoundedQueue&) = delete;
  BoundedQueue& operator=(const BoundedQueue&) = delete;
  ~BoundedQueue() {
    T v;
    while (try_pop(v)) {
    }
  }

  [[nodiscard]] size_t capacity() const noexcept { return mask_ + 1; }

  [[nodiscard]] bool try_push(T&& v) {
    size_t pos = tail_.load(std::memory_order_relaxed);
    while (true) {
      Cell& c = cells_[pos & mask_];
      // Pairs with the release store in try_pop that frees the cell.
      const size_t seq = c.seq.load(std::memory_order_acquire);
      const intptr_t diff = static_cast<intptr_t>(seq) - static_cast<intptr_t>(pos);
      if (diff == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          new (&c.storage) T(std::move(v));
          // Pairs with the acquire load in try_pop: publishes the value.
          c.seq.store(pos + 1, std::memory_order_release);
          return true;
        }
      } else if (diff < 0) {
        return false;  // full
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
  }

  [[nodiscard]] bool try_pop(T& out) {
    size_t pos = head_.load(std::memory_order_relaxed);
    while (true) {
      Cell& c = cells_[pos & mask_];
      // Pairs with the release store in try_push that publishes the value.
      const size_t seq = c.seq.load(std::memory_order_acquire);
      const intptr_t diff = static_cast<intptr_t>(seq) - static_cast<intptr_t>(pos + 1);
      if (diff == 0) {
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          T* p = std::launder(reinterpret_cast<T*>(&c.storage));
          out = std::move(*p);
          p->~T();
          // Pairs with the acquire load in try_push: the cell is free for lap pos + capacity.
          c.seq.store(pos + mask_ + 1, std::memory_order_release);
          return true;
        }
      } else if (diff < 0) {
        return false;  // empty
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
  }

  // Entries pushed and not yet popped; exact when no push or pop runs concurrently.
  [[nodiscard]] size_t size() const noexcept {
    // Relaxed: a snapshot for room checks and metrics, not a synchronisation point.
    const size_t t = tail_.load(std::memory_order_relaxed);
    const size_t h = head_.load(std::memory_order_relaxed);
    return t >= h ? t - h : 0;
  }

 private:
  struct Cell {
    std::atomic<size_t> seq{0};
    alignas(T) unsigned char storage[sizeof(T)];
  };
  alignas(kCacheLine) std::atomic<size_t> head_{0};
  alignas(kCacheLine) std::atomic<size_t> tail_{0};
  alignas(kCacheLine) size_t mask_ = 0;
  std::unique_ptr<Cell[]> cells_;
};

}  // namespace myelin::broker
