// collectives/src/reduce_scalar.cpp — the portable kernels. Built with vectorisation off (see
// CMakeLists.txt) so that "scalar" means one element per instruction: the reference the vector
// kernels are tested and benchmarked against.
#define MYELIN_KERNEL_NS scalar_isa
#define MYELIN_KERNEL_ATTR inline __attribute__((always_inline))
#include "reduce_kernels.hpp"

namespace myelin::collectives::internal {
namespace MYELIN_KERNEL_NS {
struct ScalarKernels {
  template <ReduceOp Op, Form F, typename T>
  static void run(T* __restrict d, const T* __restrict a, const T* __restrict b, size_t n) {
    plain_loop<Op, F>(d, a, b, n);
  }
  template <ReduceOp Op, Form F, bool Bf16>
  static void half(uint16_t* __restrict d, const uint16_t* __restrict a,
                   const uint16_t* __restrict b, size_t n) {
    half_tail<Op, Bf16>(d, left<F>(d, a), right<F>(d, b), n);
  }
};
}  // namespace MYELIN_KERNEL_NS

void reduce_scalar(void* dst, const void* a, const void* b, size_t n, DataType type,
                   ReduceOp op) noexcept {
  MYELIN_KERNEL_NS::dispatch<MYELIN_KERNEL_NS::ScalarKernels>(dst, a, b, n, type, op);
}
}  // namespace myelin::collectives::internal
