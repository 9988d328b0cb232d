// Google Benchmark of the reduction kernels: every instruction set the CPU has, per type and op,
// at sizes from L1-resident to memory-bound. Reports bytes/s of dst+src read and dst written.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include <myelin/collectives/reduce.hpp>

namespace {
using myelin::collectives::DataType;
using myelin::collectives::ReduceIsa;
using myelin::collectives::ReduceOp;

void BM_Reduce(benchmark::State& state, ReduceIsa isa, DataType type, ReduceOp op) {
  if (!myelin::collectives::isa_supported(isa)) {
    state.SkipWithError("instruction set not supported on this CPU");
    return;
  }
  const auto count = static_cast<size_t>(state.range(0));
  const size_t es = myelin::collectives::dtype_size(type);
  std::vector<uint8_t> dst(count * es), src(count * es);
  // Values that stay finite under repeated sum/prod: 1.0 in every float format, small integers.
  for (size_t i = 0; i < count; ++i) {
    switch (type) {
      case DataType::kF32: {
        const float v = 1.0f;
        std::memcpy(&src[i * 4], &v, 4);
        break;
      }
      case DataType::kF64: {
        const double v = 1.0;
        std::memcpy(&src[i * 8], &v, 8);
        break;
      }
      case DataType::kF16:
        src[i * 2 + 1] = 0x3C;
        break;
      case DataType::kBF16:
        src[i * 2 + 1] = 0x3F;
        src[i * 2] = 0x80;
        break;
      default:
        src[i * es] = 1;
        break;
    }
  }
  dst = src;
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        myelin::collectives::reduce_into(isa, dst.data(), src.data(), count, type, op));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(3 * count * es));
}

void register_all() {
  for (ReduceIsa isa : {ReduceIsa::kScalar, ReduceIsa::kAvx2, ReduceIsa::kAvx512}) {
    for (DataType t : myelin::collectives::kAllDataTypes) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
        const std::string name = std::string("reduce/") +
                                 std::string(myelin::collectives::reduce_isa_name(isa)) + "/" +
                                 std::string(myelin::collectives::dtype_name(t)) + "/" +
                                 std::string(myelin::collectives::reduce_op_name(op));
        benchmark::RegisterBenchmark(name.c_str(), BM_Reduce, isa, t, op)->Arg(4096)->Arg(1 << 20);
      }
    }
  }
}
}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
