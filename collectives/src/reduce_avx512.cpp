// collectives/src/reduce_avx512.cpp — AVX-512 (F, BW, VL) kernels, 512-bit vectors. As in the
// AVX2 file only the entry point has the target attribute and the rest is always_inline.
#include <immintrin.h>

#define MYELIN_AVX512_TARGET \
  target("avx512f,avx512bw,avx512vl,avx2,f16c,fma,prefer-vector-width=512")
#define MYELIN_KERNEL_NS avx512_isa
#define MYELIN_KERNEL_ATTR inline __attribute__((MYELIN_AVX512_TARGET, always_inline))
#include "reduce_kernels.hpp"

#define MYELIN_AVX512 MYELIN_KERNEL_ATTR

namespace myelin::collectives::internal {
namespace MYELIN_KERNEL_NS {

template <ReduceOp Op>
MYELIN_AVX512 __m512 combine16(__m512 dst, __m512 src) {
  if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) return _mm512_add_ps(dst, src);
  if constexpr (Op == ReduceOp::kProd) return _mm512_mul_ps(dst, src);
  if constexpr (Op == ReduceOp::kMin) return _mm512_min_ps(src, dst);  // src < dst ? src : dst
  return _mm512_max_ps(src, dst);                                      // src > dst ? src : dst
}

MYELIN_AVX512 __m512 load_bf16x16(const uint16_t* p) {
  const __m512i wide =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// Round-to-nearest-even to bf16, NaN kept quiet: the same arithmetic as float_to_bf16().
MYELIN_AVX512 void store_bf16x16(uint16_t* p, __m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(
      _mm512_and_si512(x, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  const __m512i out = _mm512_mask_blend_epi32(is_nan, rounded, quiet);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
}

struct Avx512Kernels {
  template <ReduceOp Op, Form F, typename T>
  MYELIN_AVX512 static void run(T* __restrict d, const T* __restrict a, const T* __restrict b,
                                size_t n) {
    plain_loop<Op, F>(d, a, b, n);
  }
  template <ReduceOp Op, Form F, bool Bf16>
  MYELIN_AVX512 static void half(uint16_t* __restrict d, const uint16_t* __restrict a0,
                                 const uint16_t* __restrict b0, size_t n) {
    const uint16_t* x = left<F>(d, a0);
    const uint16_t* y = right<F>(d, b0);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      if constexpr (Bf16) {
        store_bf16x16(d + i, combine16<Op>(load_bf16x16(x + i), load_bf16x16(y + i)));
      } else {
        const __m512 a =
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
        const __m512 b =
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + i)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm512_cvtps_ph(combine16<Op>(a, b), _MM_FROUND_TO_NEAREST_INT));
      }
    }
    half_tail<Op, Bf16>(d + i, x + i, y + i, n - i);
  }
};

}  // namespace MYELIN_KERNEL_NS

__attribute__((MYELIN_AVX512_TARGET)) void reduce_avx512(void* dst, const void* a, const void* b,
                                                         size_t n, DataType type,
                                                         ReduceOp op) noexcept {
  MYELIN_KERNEL_NS::dispatch<MYELIN_KERNEL_NS::Avx512Kernels>(dst, a, b, n, type, op);
}

}  // namespace myelin::collectives::internal
