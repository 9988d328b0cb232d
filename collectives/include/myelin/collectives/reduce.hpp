// myelin/collectives/reduce.hpp
//
// The element-wise reduction kernels the collectives run on received data, exposed for tests and
// benchmarks:
//
//   reduce_into(dst, src, n, DataType::kF32, ReduceOp::kSum);   // dst[i] = dst[i] + src[i]
//   reduce_to(dst, a, b, n, DataType::kF32, ReduceOp::kSum);    // dst[i] = a[i] + b[i]
//
// Kernels exist for three instruction sets, chosen once at run time from what the CPU supports
// (__builtin_cpu_supports): AVX-512 (F+BW+VL), AVX2 (+F16C), and portable scalar code. The
// environment variable MYELIN_REDUCE_ISA=scalar|avx2|avx512 caps the choice (read once).
// f16 and bf16 are widened to f32, combined, and rounded back to nearest-even: each pairwise
// reduction rounds once. avg reduces as sum; divide_by() finishes it.
// Every instruction set gives bit-identical results (the vector code does the same f32 operation
// per element as the scalar code), so ranks on different CPUs agree.
//
// reduce_to() lets a collective combine its own contribution with received data without first
// copying either into the destination.
//
// Thread safety: pure functions over caller memory. Buffers are equal or disjoint: reduce_into's
// dst and src must not overlap unless equal; reduce_to's dst may be a or b (not both), or disjoint
// from both (a and b may then be equal); never a partial overlap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include <myelin/collectives/types.hpp>
#include <myelin/core/status.hpp>

namespace myelin::collectives {

enum class ReduceIsa : uint8_t { kScalar = 0, kAvx2, kAvx512 };
std::string_view reduce_isa_name(ReduceIsa isa) noexcept;  // "scalar", "avx2", "avx512"

// Best instruction set this CPU supports (ignores the environment cap).
ReduceIsa best_supported_isa() noexcept;
// The instruction set reduce_into() uses: best_supported_isa() capped by MYELIN_REDUCE_ISA.
ReduceIsa active_isa() noexcept;
[[nodiscard]] bool isa_supported(ReduceIsa isa) noexcept;

// dst[i] = dst[i] op src[i] for i < count (avg behaves as sum).
void reduce_into(void* dst, const void* src, size_t count, DataType type, ReduceOp op) noexcept;
// dst[i] = a[i] op b[i] for i < count, a the left operand (avg behaves as sum).
void reduce_to(void* dst, const void* a, const void* b, size_t count, DataType type,
               ReduceOp op) noexcept;
// The same with an explicit instruction set; unsupported when the CPU lacks it.
[[nodiscard]] Status reduce_into(ReduceIsa isa, void* dst, const void* src, size_t count,
                                 DataType type, ReduceOp op) noexcept;
[[nodiscard]] Status reduce_to(ReduceIsa isa, void* dst, const void* a, const void* b, size_t count,
                               DataType type, ReduceOp op) noexcept;
// data[i] = data[i] / divisor (integers truncate toward zero; f16/bf16 computed in f32). Used to
// finish avg. divisor must be > 0.
void divide_by(void* data, size_t count, DataType type, uint32_t divisor) noexcept;

}  // namespace myelin::collectives
