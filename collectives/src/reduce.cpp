// collectives/src/reduce.cpp — names of types and ops, run-time choice of the kernel set.
#include <myelin/collectives/reduce.hpp>

#include <atomic>
#include <cstdlib>
#include <string>

#include <myelin/collectives/half.hpp>
#include <myelin/core/log.hpp>

#include "reduce_entry.hpp"

namespace myelin::collectives {
std::string_view dtype_name(DataType t) noexcept {
  switch (t) {
    case DataType::kF32:
      return "f32";
    case DataType::kF64:
      return "f64";
    case DataType::kF16:
      return "f16";
    case DataType::kBF16:
      return "bf16";
    case DataType::kI32:
      return "i32";
    case DataType::kI64:
      return "i64";
    case DataType::kU8:
      return "u8";
  }
  return "?";
}

std::string_view reduce_op_name(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kProd:
      return "prod";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kAvg:
      return "avg";
  }
  return "?";
}

Result<DataType> parse_dtype(std::string_view name) {
  for (DataType t : kAllDataTypes) {
    if (name == dtype_name(t)) return t;
  }
  if (name == "float") return DataType::kF32;
  if (name == "double") return DataType::kF64;
  if (name == "half") return DataType::kF16;
  if (name == "int32") return DataType::kI32;
  if (name == "int64") return DataType::kI64;
  if (name == "uint8") return DataType::kU8;
  return invalid_argument("unknown data type '", name,
                          "' (expected f32, f64, f16, bf16, i32, i64 or u8)");
}

Result<ReduceOp> parse_reduce_op(std::string_view name) {
  for (ReduceOp op : kAllReduceOps) {
    if (name == reduce_op_name(op)) return op;
  }
  return invalid_argument("unknown reduction '", name, "' (expected sum, prod, min, max or avg)");
}

std::string_view reduce_isa_name(ReduceIsa isa) noexcept {
  switch (isa) {
    case ReduceIsa::kScalar:
      return "scalar";
    case ReduceIsa::kAvx2:
      return "avx2";
    case ReduceIsa::kAvx512:
      return "avx512";
  }
  return "?";
}

ReduceIsa best_supported_isa() noexcept {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    // F16C has no __builtin_cpu_supports name; every AVX-512 CPU has it.
    return ReduceIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    // Every AVX2 CPU shipped (Haswell, Excavator and later) has F16C as well.
    return ReduceIsa::kAvx2;
  }
#endif
  return ReduceIsa::kScalar;
}

bool isa_supported(ReduceIsa isa) noexcept {
  return static_cast<int>(isa) <= static_cast<int>(best_supported_isa());
}

namespace {
ReduceIsa choose_isa() noexcept {
  ReduceIsa isa = best_supported_isa();
  if (const char* cap = std::getenv("MYELIN_REDUCE_ISA"); cap != nullptr && *cap != '\0') {
    const std::string_view v(cap);
    ReduceIsa wanted = isa;
    if (v == "scalar") {
      wanted = ReduceIsa::kScalar;
    } else if (v == "avx2") {
      wanted = ReduceIsa::kAvx2;
    } else if (v == "avx512") {
      wanted = ReduceIsa::kAvx512;
    } else {
      MYELIN_LOG_WARN << "MYELIN_REDUCE_ISA='" << v << "' is not scalar|avx2|avx512; ignored";
    }
    if (static_cast<int>(wanted) < static_cast<int>(isa)) isa = wanted;
  }
  MYELIN_LOG_DEBUG << "reduction kernels: " << reduce_isa_name(isa);
  return isa;
}

using KernelFn = void (*)(void*, const void*, const void*, size_t, DataType, ReduceOp) noexcept;
KernelFn kernel_for(ReduceIsa isa) noexcept {
  switch (isa) {
    case ReduceIsa::kAvx512:
      return &internal::reduce_avx512;
    case ReduceIsa::kAvx2:
      return &internal::reduce_avx2;
    case ReduceIsa::kScalar:
      break;
  }
  return &internal::reduce_scalar;
}
}  // namespace

ReduceIsa active_isa() noexcept {
  static const ReduceIsa isa = choose_isa();  // thread-safe static initialisation
  return isa;
}

namespace {
KernelFn active_kernel() noexcept {
  static const KernelFn fn = kernel_for(active_isa());  // thread-safe static initialisation
  return fn;
}
}  // namespace

void reduce_into(void* dst, const void* src, size_t count, DataType type, ReduceOp op) noexcept {
  if (count == 0) return;
  active_kernel()(dst, dst, src, count, type, op);
}

void reduce_to(void* dst, const void* a, const void* b, size_t count, DataType type,
               ReduceOp op) noexcept {
  if (count == 0) return;
  active_kernel()(dst, a, b, count, type, op);
}

Status reduce_into(ReduceIsa isa, void* dst, const void* src, size_t count, DataType type,
                   ReduceOp op) noexcept {
  return reduce_to(isa, dst, dst, src, count, type, op);
}

Status reduce_to(ReduceIsa isa, void* dst, const void* a, const void* b, size_t count,
                 DataType type, ReduceOp op) noexcept {
  if (!isa_supported(isa)) {
    return unsupported("this CPU does not support the ", reduce_isa_name(isa), " kernels");
  }
  if (count != 0) kernel_for(isa)(dst, a, b, count, type, op);
  return ok_status();
}

namespace {
template <typename T>
void divide_plain(T* p, size_t n, uint32_t divisor) {
  const T d = static_cast<T>(divisor);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<T>(p[i] / d);
}
}  // namespace

void divide_by(void* data, size_t count, DataType type, uint32_t divisor) noexcept {
  MYELIN_CHECK_GT(divisor, 0u);
  switch (type) {
    case DataType::kF32:
      return divide_plain(static_cast<float*>(data), count, divisor);
    case DataType::kF64:
      return divide_plain(static_cast<double*>(data), count, divisor);
    case DataType::kI32:
      return divide_plain(static_cast<int32_t*>(data), count, divisor);
    case DataType::kI64:
      return divide_plain(static_cast<int64_t*>(data), count, divisor);
    case DataType::kU8: {
      auto* p = static_cast<uint8_t*>(data);
      for (size_t i = 0; i < count; ++i) p[i] = static_cast<uint8_t>(p[i] / divisor);
      return;
    }
    case DataType::kF16:
    case DataType::kBF16: {
      auto* p = static_cast<uint16_t*>(data);
      const float d = static_cast<float>(divisor);
      const bool bf = type == DataType::kBF16;
      for (size_t i = 0; i < count; ++i) {
        p[i] = bf ? float_to_bf16(bf16_to_float(p[i]) / d) : float_to_f16(f16_to_float(p[i]) / d);
      }
      return;
    }
  }
}

}  // namespace myelin::collectives
