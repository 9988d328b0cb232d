// myelin/collectives/types.hpp
//
// Element types and reduction operators of the collectives.
//
//   DataType: f32, f64, f16 (IEEE binary16), bf16 (bfloat16), i32, i64, u8.
//   ReduceOp: sum, prod, min, max, avg. avg is a sum followed by a division by the number of ranks
//             (truncating toward zero for integer types).
// Integer sum and prod wrap around (two's complement), like unsigned arithmetic: no undefined
// behaviour and the same answer on every rank whatever the order of reduction.
//
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include <myelin/core/status.hpp>

namespace myelin::collectives {

enum class DataType : uint8_t { kF32 = 0, kF64, kF16, kBF16, kI32, kI64, kU8 };
enum class ReduceOp : uint8_t { kSum = 0, kProd, kMin, kMax, kAvg };

inline constexpr DataType kAllDataTypes[] = {DataType::kF32,  DataType::kF64, DataType::kF16,
                                             DataType::kBF16, DataType::kI32, DataType::kI64,
                                             DataType::kU8};
inline constexpr ReduceOp kAllReduceOps[] = {ReduceOp::kSum, ReduceOp::kProd, ReduceOp::kMin,
                                             ReduceOp::kMax, ReduceOp::kAvg};

// Bytes per element.
constexpr size_t dtype_size(DataType t) noexcept {
  switch (t) {
    case DataType::kF64:
    case DataType::kI64:
      return 8;
    case DataType::kF32:
    case DataType::kI32:
      return 4;
    case DataType::kF16:
    case DataType::kBF16:
      return 2;
    case DataType::kU8:
      return 1;
  }
  return 0;
}
constexpr bool is_floating(DataType t) noexcept {
  return t == DataType::kF32 || t == DataType::kF64 || t == DataType::kF16 || t == DataType::kBF16;
}

std::string_view dtype_name(DataType t) noexcept;       // "f32", "f64", "f16", "bf16", "i32", ...
std::string_view reduce_op_name(ReduceOp op) noexcept;  // "sum", "prod", "min", "max", "avg"
// Accept the names above (and "float", "double", "half", "int32", "int64", "uint8").
Result<DataType> parse_dtype(std::string_view name);
Result<ReduceOp> parse_reduce_op(std::string_view name);

}  // namespace myelin::collectives
