// myelin::copy_bytes: every byte arrives, nothing around the destination is touched, at every
// distance modulo 4 KiB (the slow-path ones go through the vector loop) and every tail length.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <myelin/core/copy.hpp>

namespace myelin {
namespace {

TEST(CopyBytes, SlowDistancesAreTheOnesJustAfterTheSource) {
  alignas(4096) static unsigned char page[3 * 4096];
  const unsigned char* src = page;
  EXPECT_FALSE(is_slow_copy_distance(page + 4096, src));
  EXPECT_TRUE(is_slow_copy_distance(page + 4096 + 1, src));
  EXPECT_TRUE(is_slow_copy_distance(page + 4096 + 16, src));  // a malloc'd buffer's offset
  EXPECT_TRUE(is_slow_copy_distance(page + 4096 + 63, src));
  EXPECT_FALSE(is_slow_copy_distance(page + 4096 + 64, src));
  EXPECT_FALSE(is_slow_copy_distance(page + 4096 - 16, src));
  EXPECT_TRUE(is_slow_copy_distance(page + 2 * 4096 + 16, src + 0));
  EXPECT_TRUE(is_slow_copy_distance(page + 4096 + 16 + 100, src + 100));
}

TEST(CopyBytes, NothingToCopyTouchesNothing) {
  copy_bytes(nullptr, nullptr, 0);  // memcpy's contract would not allow null; this one does
  unsigned char a = 1, b = 2;
  copy_bytes(&a, &b, 0);
  EXPECT_EQ(a, 1);
}

TEST(CopyBytes, EveryDistanceAndTailCopiesExactly) {
  std::vector<unsigned char> src(70000 + 4096), dst(70000 + 3 * 4096);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 131 + 7);
  const auto base = reinterpret_cast<uintptr_t>(src.data());
  for (size_t n : {size_t{0}, size_t{1}, size_t{63}, size_t{1023}, size_t{1024}, size_t{1025},
                   size_t{4096}, size_t{4096 + 17}, size_t{65536 + 63}, size_t{70000}}) {
    for (size_t distance = 0; distance < 130; ++distance) {
      SCOPED_TRACE("n " + std::to_string(n) + " distance " + std::to_string(distance));
      std::fill(dst.begin(), dst.end(), 0xA5);
      // The destination offset that puts it `distance` bytes after the source modulo 4 KiB.
      const auto dbase = reinterpret_cast<uintptr_t>(dst.data());
      const size_t at = (base + distance - dbase) % 4096 + 4096;
      ASSERT_EQ((dbase + at - base) % 4096, distance % 4096);
      copy_bytes(dst.data() + at, src.data(), n);
      ASSERT_EQ(n == 0 ? 0 : std::memcmp(dst.data() + at, src.data(), n), 0);
      ASSERT_EQ(dst[at - 1], 0xA5);
      ASSERT_EQ(dst[at + n], 0xA5);
    }
  }
}

}  // namespace
}  // namespace myelin
