// myelin/core/cache_line.hpp
//
// The cache-line size myelin lays out shared structures with, and the spin-wait hint.
//
// kCacheLine is our own constant (64 bytes, the line size of every x86-64 and of the common
// AArch64 server cores). Shared-memory layouts must use it and never
// std::hardware_destructive_interference_size: that value may differ between compilers or flags,
// and two processes built differently would then disagree about where a field lives.
//
// Thread safety: constants and a stateless function.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace myelin {

inline constexpr std::size_t kCacheLine = 64;

// Hot fields written by different threads (or processes) are kept this far apart: x86 cores
// fetch cache lines in adjacent pairs (the spatial prefetcher), so two hot lines in one 128-byte
// block still slow each other down. Like kCacheLine, a fixed constant of ours, so shared layouts
// may use it.
inline constexpr std::size_t kFalseSharingRange = 2 * kCacheLine;

// Rounds n up to a multiple of align (a power of two).
constexpr std::size_t align_up(std::size_t n, std::size_t align) noexcept {
  return (n + align - 1) & ~(align - 1);
}

constexpr bool is_power_of_two(std::uint64_t n) noexcept {
  return n != 0 && (n & (n - 1)) == 0;
}

// Tells the core that this is a spin-wait loop (PAUSE on x86, YIELD on AArch64): saves power and
// leaves the sibling hyper-thread the pipeline.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace myelin
