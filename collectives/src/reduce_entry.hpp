// collectives/src/reduce_entry.hpp — the per-instruction-set reduction entry points, defined in
// reduce_scalar.cpp, reduce_avx2.cpp and reduce_avx512.cpp and chosen at run time by reduce.cpp.
// Each computes dst = a op b over n elements, where dst is a, b, or disjoint from both. Not public
// API.
#pragma once

#include <cstddef>

#include <myelin/collectives/types.hpp>

namespace myelin::collectives::internal {

void reduce_scalar(void* dst, const void* a, const void* b, size_t n, DataType type,
                   ReduceOp op) noexcept;
void reduce_avx2(void* dst, const void* a, const void* b, size_t n, DataType type,
                 ReduceOp op) noexcept;
void reduce_avx512(void* dst, const void* a, const void* b, size_t n, DataType type,
                   ReduceOp op) noexcept;

}  // namespace myelin::collectives::internal
