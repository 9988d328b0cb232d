// collectives/src/reduce_kernels.hpp — the element loops behind reduce_into(), written once as
// templates and compiled three times: reduce_scalar.cpp (vectorisation off), reduce_avx2.cpp and
// reduce_avx512.cpp (target attributes; the compiler vectorises the plain loops, the 16-bit float
// formats use explicit conversions there). Not public API.
//
// Each including file defines MYELIN_KERNEL_NS (a namespace name, distinct per instruction set) and
// MYELIN_KERNEL_ATTR (inline, always_inline and its target attribute) first. The distinct namespace
// keeps the three compilations of the same template apart: without it the linker could pick an
// AVX-512 copy for a call made on a CPU that lacks AVX-512.
// No include guard on purpose: one inclusion per translation unit.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <myelin/collectives/half.hpp>
#include <myelin/collectives/types.hpp>

#if !defined(MYELIN_KERNEL_NS) || !defined(MYELIN_KERNEL_ATTR)
#error "define MYELIN_KERNEL_NS and MYELIN_KERNEL_ATTR before including reduce_kernels.hpp"
#endif
#define MYELIN_KERNEL_INLINE MYELIN_KERNEL_ATTR

namespace myelin::collectives::internal {

// One entry point per instruction set (defined in reduce_<isa>.cpp).
void reduce_scalar(void* dst, const void* src, size_t n, DataType type, ReduceOp op) noexcept;
void reduce_avx2(void* dst, const void* src, size_t n, DataType type, ReduceOp op) noexcept;
void reduce_avx512(void* dst, const void* src, size_t n, DataType type, ReduceOp op) noexcept;

namespace MYELIN_KERNEL_NS {

// Integer sum/prod wrap: compute them in the unsigned type of the same width.
template <typename T, bool = std::is_integral_v<T>>
struct Wrap {
  using type = T;
};
template <typename T>
struct Wrap<T, true> {
  using type = std::make_unsigned_t<T>;
};
template <typename T>
using WrapT = typename Wrap<T>::type;

template <ReduceOp Op, typename T>
MYELIN_KERNEL_INLINE T combine(T a, T b) {
  if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) {
    return static_cast<T>(static_cast<WrapT<T>>(a) + static_cast<WrapT<T>>(b));
  } else if constexpr (Op == ReduceOp::kProd) {
    return static_cast<T>(static_cast<WrapT<T>>(a) * static_cast<WrapT<T>>(b));
  } else if constexpr (Op == ReduceOp::kMin) {
    return b < a ? b : a;
  } else {
    return a < b ? b : a;
  }
}

template <ReduceOp Op, typename T>
MYELIN_KERNEL_INLINE void plain_loop(T* __restrict dst, const T* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = combine<Op>(dst[i], src[i]);
}

// 16-bit floats one element at a time (the tail of the vector loops, and the scalar kernel).
template <ReduceOp Op, bool Bf16>
MYELIN_KERNEL_INLINE void half_tail(uint16_t* __restrict dst, const uint16_t* __restrict src,
                                    size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if constexpr (Bf16) {
      dst[i] = float_to_bf16(combine<Op>(bf16_to_float(dst[i]), bf16_to_float(src[i])));
    } else {
      dst[i] = float_to_f16(combine<Op>(f16_to_float(dst[i]), f16_to_float(src[i])));
    }
  }
}

// Dispatches (type, op) to Kernels::run<Op, T>(dst, src, n) for the plain types and to
// Kernels::half<Op, Bf16>(dst, src, n) for f16/bf16.
template <typename Kernels, ReduceOp Op>
MYELIN_KERNEL_INLINE void dispatch_type(void* d, const void* s, size_t n, DataType type) {
  switch (type) {
    case DataType::kF32:
      return Kernels::template run<Op, float>(static_cast<float*>(d), static_cast<const float*>(s),
                                              n);
    case DataType::kF64:
      return Kernels::template run<Op, double>(static_cast<double*>(d),
                                               static_cast<const double*>(s), n);
    case DataType::kI32:
      return Kernels::template run<Op, int32_t>(static_cast<int32_t*>(d),
                                                static_cast<const int32_t*>(s), n);
    case DataType::kI64:
      return Kernels::template run<Op, int64_t>(static_cast<int64_t*>(d),
                                                static_cast<const int64_t*>(s), n);
    case DataType::kU8:
      return Kernels::template run<Op, uint8_t>(static_cast<uint8_t*>(d),
                                                static_cast<const uint8_t*>(s), n);
    case DataType::kF16:
      return Kernels::template half<Op, false>(static_cast<uint16_t*>(d),
                                               static_cast<const uint16_t*>(s), n);
    case DataType::kBF16:
      return Kernels::template half<Op, true>(static_cast<uint16_t*>(d),
                                              static_cast<const uint16_t*>(s), n);
  }
}

template <typename Kernels>
MYELIN_KERNEL_INLINE void dispatch(void* d, const void* s, size_t n, DataType type, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return dispatch_type<Kernels, ReduceOp::kSum>(d, s, n, type);
    case ReduceOp::kProd:
      return dispatch_type<Kernels, ReduceOp::kProd>(d, s, n, type);
    case ReduceOp::kMin:
      return dispatch_type<Kernels, ReduceOp::kMin>(d, s, n, type);
    case ReduceOp::kMax:
      return dispatch_type<Kernels, ReduceOp::kMax>(d, s, n, type);
  }
}

}  // namespace MYELIN_KERNEL_NS
}  // namespace myelin::collectives::internal
