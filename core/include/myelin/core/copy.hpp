// Bulk byte copy for the data paths: std::memcpy, except where the C library's copy is known to
// crawl.
//
// On x86-64, glibc copies blocks from ~2 KiB up to about the size of the L2 cache with
// `rep movsb`. On AMD Zen cores that instruction runs at ~1/15 of its speed when the destination
// lies 1-31 bytes after the source modulo 4 KiB: measured here (glibc 2.36, AMD EPYC) 1.7-2.2
// GB/s against 21-31 GB/s at every other distance, for 4 KiB to 256 KiB. That distance is
// common: a large malloc'd buffer (a std::vector above 128 KiB) starts 16 bytes into its page,
// shared memory, ring slots and mapped regions start on a page, so a copy from a page-aligned
// region into a user's vector hits it. copy_bytes() sends exactly that case to a plain vector
// loop (~24 GB/s there) and everything else to std::memcpy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace myelin {

namespace detail {
// Copies with 16-byte vector loads and stores, front to back (std::memcpy off x86-64).
void copy_by_vectors(void* dst, const void* src, size_t n) noexcept;
}  // namespace detail

// Copies of this many bytes or more, up to kSlowCopyMax, are checked for the slow distance.
inline constexpr size_t kSlowCopyMin = 1024;
inline constexpr size_t kSlowCopyMax = size_t{1} << 20;

// True when std::memcpy(dst, src, n) would take the slow path described above.
inline bool is_slow_copy_distance(const void* dst, const void* src) noexcept {
  const uintptr_t distance =
      (reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src)) & uintptr_t{4095};
  return distance - 1 < 63;  // 1..63: the 1..31 measured, with a margin for other parts
}

// std::memcpy's contract (no overlap; n == 0 allowed with any pointers).
inline void copy_bytes(void* dst, const void* src, size_t n) noexcept {
  if (n >= kSlowCopyMin && n <= kSlowCopyMax && is_slow_copy_distance(dst, src)) {
    detail::copy_by_vectors(dst, src, n);
    return;
  }
  if (n != 0) std::memcpy(dst, src, n);
}

}  // namespace myelin
