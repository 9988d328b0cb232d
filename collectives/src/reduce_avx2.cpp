// collectives/src/reduce_avx2.cpp — AVX2 kernels. Only the entry point carries the target
// attribute; everything it calls is always_inline, so no AVX2 code leaks into functions the rest of
// the program may call on a CPU without AVX2.
#include <immintrin.h>

#define MYELIN_KERNEL_NS avx2_isa
#define MYELIN_KERNEL_ATTR inline __attribute__((target("avx2,f16c,fma"), always_inline))
#include "reduce_kernels.hpp"

#define MYELIN_AVX2 MYELIN_KERNEL_ATTR

namespace myelin::collectives::internal {
namespace MYELIN_KERNEL_NS {

template <ReduceOp Op>
MYELIN_AVX2 __m256 combine8(__m256 dst, __m256 src) {
  if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) return _mm256_add_ps(dst, src);
  if constexpr (Op == ReduceOp::kProd) return _mm256_mul_ps(dst, src);
  if constexpr (Op == ReduceOp::kMin) return _mm256_min_ps(src, dst);  // src < dst ? src : dst
  return _mm256_max_ps(src, dst);                                      // src > dst ? src : dst
}

MYELIN_AVX2 __m256 load_bf16x8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Round-to-nearest-even to bf16, NaN kept quiet: the same arithmetic as float_to_bf16().
MYELIN_AVX2 void store_bf16x8(uint16_t* p, __m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)),
                                            _mm256_set1_epi32(0x7F800000));
  const __m256i out =
      _mm256_blendv_epi8(rounded, _mm256_and_si256(quiet, _mm256_set1_epi32(0xFFFF)), is_nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

struct Avx2Kernels {
  template <ReduceOp Op, Form F, typename T>
  MYELIN_AVX2 static void run(T* __restrict d, const T* __restrict a, const T* __restrict b,
                              size_t n) {
    plain_loop<Op, F>(d, a, b, n);
  }
  template <ReduceOp Op, Form F, bool Bf16>
  MYELIN_AVX2 static void half(uint16_t* __restrict d, const uint16_t* __restrict a0,
                               const uint16_t* __restrict b0, size_t n) {
    const uint16_t* x = left<F>(d, a0);
    const uint16_t* y = right<F>(d, b0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      if constexpr (Bf16) {
        store_bf16x8(d + i, combine8<Op>(load_bf16x8(x + i), load_bf16x8(y + i)));
      } else {
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
        const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                         _mm256_cvtps_ph(combine8<Op>(a, b), _MM_FROUND_TO_NEAREST_INT));
      }
    }
    half_tail<Op, Bf16>(d + i, x + i, y + i, n - i);
  }
};

}  // namespace MYELIN_KERNEL_NS

__attribute__((target("avx2,f16c,fma"))) void reduce_avx2(void* dst, const void* a, const void* b,
                                                          size_t n, DataType type,
                                                          ReduceOp op) noexcept {
  MYELIN_KERNEL_NS::dispatch<MYELIN_KERNEL_NS::Avx2Kernels>(dst, a, b, n, type, op);
}

}  // namespace myelin::collectives::internal
