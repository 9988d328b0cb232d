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

#include "reduce_entry.hpp"

#if !defined(MYELIN_KERNEL_NS) || !defined(MYELIN_KERNEL_ATTR)
#error "define MYELIN_KERNEL_NS and MYELIN_KERNEL_ATTR before including reduce_kernels.hpp"
#endif
#define MYELIN_KERNEL_INLINE MYELIN_KERNEL_ATTR

namespace myelin::collectives::internal {

// How the operands of one kernel call alias, so that every loop can promise the compiler that
// the pointers it uses do not overlap (__restrict) and still compute a op b in that order:
//   kInto  dst == a: dst[i] = dst[i] op b[i]
//   kRev   dst == b: dst[i] = a[i] op dst[i]
//   kThree all disjoint: dst[i] = a[i] op b[i]
enum class Form : uint8_t { kInto, kRev, kThree };
inline Form form_of(const void* dst, const void* a, const void* b) noexcept {
  return dst == a ? Form::kInto : dst == b ? Form::kRev : Form::kThree;
}

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

// The operands of one form: x is read as a, y as b. In kInto / kRev one of them is dst itself
// (so based on the restrict pointer dst), and the other pointer argument is not used.
template <Form F, typename T>
MYELIN_KERNEL_INLINE const T* left(T* dst, const T* a) {
  if constexpr (F == Form::kInto) return dst;
  return a;
}
template <Form F, typename T>
MYELIN_KERNEL_INLINE const T* right(T* dst, const T* b) {
  if constexpr (F == Form::kRev) return dst;
  return b;
}

template <ReduceOp Op, Form F, typename T>
MYELIN_KERNEL_INLINE void plain_loop(T* __restrict dst, const T* __restrict a,
                                     const T* __restrict b, size_t n) {
  const T* x = left<F>(dst, a);
  const T* y = right<F>(dst, b);
  for (size_t i = 0; i < n; ++i) dst[i] = combine<Op>(x[i], y[i]);
}

// 16-bit floats one element at a time (the tail of the vector loops, and the scalar kernel);
// x, y as from left() / right().
template <ReduceOp Op, bool Bf16>
MYELIN_KERNEL_INLINE void half_tail(uint16_t* dst, const uint16_t* x, const uint16_t* y, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if constexpr (Bf16) {
      dst[i] = float_to_bf16(combine<Op>(bf16_to_float(x[i]), bf16_to_float(y[i])));
    } else {
      dst[i] = float_to_f16(combine<Op>(f16_to_float(x[i]), f16_to_float(y[i])));
    }
  }
}

// Dispatches (type, op) to Kernels::run<Op, F, T>(dst, a, b, n) for the plain types and to
// Kernels::half<Op, F, Bf16>(dst, a, b, n) for f16/bf16.
template <typename Kernels, ReduceOp Op, Form F>
MYELIN_KERNEL_INLINE void dispatch_type(void* d, const void* a, const void* b, size_t n,
                                        DataType type) {
  switch (type) {
    case DataType::kF32:
      return Kernels::template run<Op, F, float>(
          static_cast<float*>(d), static_cast<const float*>(a), static_cast<const float*>(b), n);
    case DataType::kF64:
      return Kernels::template run<Op, F, double>(
          static_cast<double*>(d), static_cast<const double*>(a), static_cast<const double*>(b), n);
    case DataType::kI32:
      return Kernels::template run<Op, F, int32_t>(static_cast<int32_t*>(d),
                                                   static_cast<const int32_t*>(a),
                                                   static_cast<const int32_t*>(b), n);
    case DataType::kI64:
      return Kernels::template run<Op, F, int64_t>(static_cast<int64_t*>(d),
                                                   static_cast<const int64_t*>(a),
                                                   static_cast<const int64_t*>(b), n);
    case DataType::kU8:
      return Kernels::template run<Op, F, uint8_t>(static_cast<uint8_t*>(d),
                                                   static_cast<const uint8_t*>(a),
                                                   static_cast<const uint8_t*>(b), n);
    case DataType::kF16:
      return Kernels::template half<Op, F, false>(static_cast<uint16_t*>(d),
                                                  static_cast<const uint16_t*>(a),
                                                  static_cast<const uint16_t*>(b), n);
    case DataType::kBF16:
      return Kernels::template half<Op, F, true>(static_cast<uint16_t*>(d),
                                                 static_cast<const uint16_t*>(a),
                                                 static_cast<const uint16_t*>(b), n);
  }
}

template <typename Kernels, Form F>
MYELIN_KERNEL_INLINE void dispatch_op(void* d, const void* a, const void* b, size_t n,
                                      DataType type, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return dispatch_type<Kernels, ReduceOp::kSum, F>(d, a, b, n, type);
    case ReduceOp::kProd:
      return dispatch_type<Kernels, ReduceOp::kProd, F>(d, a, b, n, type);
    case ReduceOp::kMin:
      return dispatch_type<Kernels, ReduceOp::kMin, F>(d, a, b, n, type);
    case ReduceOp::kMax:
      return dispatch_type<Kernels, ReduceOp::kMax, F>(d, a, b, n, type);
  }
}

template <typename Kernels>
MYELIN_KERNEL_INLINE void dispatch(void* d, const void* a, const void* b, size_t n, DataType type,
                                   ReduceOp op) {
  switch (form_of(d, a, b)) {
    case Form::kInto:
      return dispatch_op<Kernels, Form::kInto>(d, nullptr, b, n, type, op);
    case Form::kRev:
      return dispatch_op<Kernels, Form::kRev>(d, a, nullptr, n, type, op);
    case Form::kThree:
      return dispatch_op<Kernels, Form::kThree>(d, a, b, n, type, op);
  }
}

}  // namespace MYELIN_KERNEL_NS
}  // namespace myelin::collectives::internal
