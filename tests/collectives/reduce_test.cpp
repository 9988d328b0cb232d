// Unit tests of the reduction kernels and the 16-bit float conversions: no processes, no sockets.
#include <gtest/gtest.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <myelin/collectives/half.hpp>
#include <myelin/collectives/reduce.hpp>

namespace myelin::collectives {
namespace {

bool cpu_has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");  // every AVX2 CPU has F16C
}
__attribute__((target("f16c"))) float hw_f16_to_float(uint16_t h) {
  return _cvtsh_ss(h);
}
__attribute__((target("f16c"))) uint16_t hw_float_to_f16(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}

uint32_t bits(float f) {
  return std::bit_cast<uint32_t>(f);
}

TEST(HalfConversion, F16KnownValues) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(float_to_f16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7BFF);            // largest finite
  EXPECT_EQ(float_to_f16(65520.0f), 0x7C00);            // rounds up to infinity
  EXPECT_EQ(float_to_f16(5.9604645e-8f), 0x0001);       // smallest subnormal
  EXPECT_EQ(float_to_f16(2.9802322e-8f), 0x0000);       // half of it: tie to even (zero)
  EXPECT_EQ(float_to_f16(1.0f + 1.0f / 2048), 0x3C00);  // tie between 1 and next: to even
  EXPECT_EQ(float_to_f16(1.0f + 3.0f / 2048), 0x3C02);  // tie between odd and even: up
  EXPECT_EQ(f16_to_float(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(HalfConversion, F16ToFloatMatchesHardwareForEveryValue) {
  if (!cpu_has_f16c()) GTEST_SKIP() << "no F16C on this CPU to compare with";
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float sw = f16_to_float(static_cast<uint16_t>(h));
    const float hw = hw_f16_to_float(static_cast<uint16_t>(h));
    ASSERT_EQ(bits(sw), bits(hw)) << "f16 0x" << std::hex << h;
  }
}

TEST(HalfConversion, FloatToF16MatchesHardware) {
  if (!cpu_has_f16c()) GTEST_SKIP() << "no F16C on this CPU to compare with";
  // Every f16 value, and the midpoints and neighbours around each, plus random floats.
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const float f = f16_to_float(static_cast<uint16_t>(h));
    const float next = f16_to_float(static_cast<uint16_t>(h + 1));
    const float mid = (f + next) / 2;
    for (float x : {f, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f), -mid}) {
      ASSERT_EQ(float_to_f16(x), hw_float_to_f16(x)) << "float " << x;
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 1'000'000; ++i) {
    const float x = std::bit_cast<float>(static_cast<uint32_t>(rng()));
    ASSERT_EQ(float_to_f16(x), hw_float_to_f16(x)) << "bits 0x" << std::hex << bits(x);
  }
}

TEST(HalfConversion, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);  // above tie
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x7F7FFFFFu)), 0x7F80);  // max float -> inf
  EXPECT_EQ(bf16_to_float(0xC040), -3.0f);
  const uint16_t nan = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(bf16_to_float(nan)));
  // A NaN whose payload sits only in the low half must not become infinity.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::bit_cast<float>(0x7F800001u)))));
}

// Reference: one element at a time, written independently of the kernels.
template <typename T>
T ref_combine(T a, T b, ReduceOp op) {
  using W =
      std::conditional_t<std::is_integral_v<T>,
                         std::make_unsigned_t<std::conditional_t<std::is_integral_v<T>, T, int>>,
                         T>;
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return static_cast<T>(static_cast<W>(a) + static_cast<W>(b));
    case ReduceOp::kProd:
      return static_cast<T>(static_cast<W>(a) * static_cast<W>(b));
    case ReduceOp::kMin:
      return std::min(a, b);
    case ReduceOp::kMax:
      return std::max(a, b);
  }
  return a;
}

std::vector<uint8_t> random_bytes(DataType type, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(n * dtype_size(type));
  std::uniform_real_distribution<float> real(-4.0f, 4.0f);
  for (size_t i = 0; i < n; ++i) {
    uint8_t* p = out.data() + i * dtype_size(type);
    switch (type) {
      case DataType::kF32: {
        float v = real(rng);
        std::memcpy(p, &v, 4);
        break;
      }
      case DataType::kF64: {
        double v = real(rng);
        std::memcpy(p, &v, 8);
        break;
      }
      case DataType::kF16: {
        uint16_t v = float_to_f16(real(rng));
        std::memcpy(p, &v, 2);
        break;
      }
      case DataType::kBF16: {
        uint16_t v = float_to_bf16(real(rng));
        std::memcpy(p, &v, 2);
        break;
      }
      case DataType::kI32: {
        uint32_t v = rng();
        std::memcpy(p, &v, 4);
        break;
      }
      case DataType::kI64: {
        uint64_t v = (static_cast<uint64_t>(rng()) << 32) | rng();
        std::memcpy(p, &v, 8);
        break;
      }
      case DataType::kU8:
        *p = static_cast<uint8_t>(rng());
        break;
    }
  }
  return out;
}

template <typename T>
void ref_plain(std::vector<uint8_t>& d, const std::vector<uint8_t>& s, size_t n, ReduceOp op) {
  for (size_t i = 0; i < n; ++i) {
    T a, b;
    std::memcpy(&a, d.data() + i * sizeof(T), sizeof(T));
    std::memcpy(&b, s.data() + i * sizeof(T), sizeof(T));
    a = ref_combine(a, b, op);
    std::memcpy(d.data() + i * sizeof(T), &a, sizeof(T));
  }
}

std::vector<uint8_t> reference(const std::vector<uint8_t>& dst, const std::vector<uint8_t>& src,
                               size_t n, DataType type, ReduceOp op) {
  std::vector<uint8_t> d = dst;
  switch (type) {
    case DataType::kF32:
      ref_plain<float>(d, src, n, op);
      break;
    case DataType::kF64:
      ref_plain<double>(d, src, n, op);
      break;
    case DataType::kI32:
      ref_plain<int32_t>(d, src, n, op);
      break;
    case DataType::kI64:
      ref_plain<int64_t>(d, src, n, op);
      break;
    case DataType::kU8:
      ref_plain<uint8_t>(d, src, n, op);
      break;
    case DataType::kF16:
    case DataType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t a, b;
        std::memcpy(&a, d.data() + 2 * i, 2);
        std::memcpy(&b, src.data() + 2 * i, 2);
        const bool bf = type == DataType::kBF16;
        const float fa = bf ? bf16_to_float(a) : f16_to_float(a);
        const float fb = bf ? bf16_to_float(b) : f16_to_float(b);
        const float r = ref_combine(fa, fb, op);  // one f32 operation, one rounding
        a = bf ? float_to_bf16(r) : float_to_f16(r);
        std::memcpy(d.data() + 2 * i, &a, 2);
      }
      break;
  }
  return d;
}

class ReduceKernels : public ::testing::TestWithParam<ReduceIsa> {};

TEST_P(ReduceKernels, EveryTypeAndOpMatchesTheReferenceBitForBit) {
  const ReduceIsa isa = GetParam();
  if (!isa_supported(isa)) GTEST_SKIP() << reduce_isa_name(isa) << " not supported on this CPU";
  // Lengths around every vector width, with odd tails; offsets break alignment.
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{15}, size_t{16}, size_t{17}, size_t{63},
                   size_t{64}, size_t{65}, size_t{1023}, size_t{4099}}) {
    for (DataType type : kAllDataTypes) {
      for (ReduceOp op : kAllReduceOps) {
        const auto src = random_bytes(type, n + 1, static_cast<uint32_t>(n * 31 + 1));
        const auto dst0 = random_bytes(type, n + 1, static_cast<uint32_t>(n * 17 + 2));
        const auto want = reference(dst0, src, n + 1, type, op);
        auto got = dst0;
        const size_t es = dtype_size(type);
        // Reduce elements [1, n+1) at an unaligned address; element 0 must stay as it was.
        ASSERT_TRUE(reduce_into(isa, got.data() + es, src.data() + es, n, type, op).ok());
        ASSERT_EQ(0, std::memcmp(got.data(), dst0.data(), es));
        ASSERT_EQ(0, std::memcmp(got.data() + es, want.data() + es, n * es))
            << reduce_isa_name(isa) << " " << dtype_name(type) << " " << reduce_op_name(op)
            << " n=" << n;
      }
    }
  }
}

TEST_P(ReduceKernels, ThreeOperandFormsMatchTheReferenceBitForBit) {
  const ReduceIsa isa = GetParam();
  if (!isa_supported(isa)) GTEST_SKIP() << reduce_isa_name(isa) << " not supported on this CPU";
  for (size_t n : {size_t{0}, size_t{1}, size_t{15}, size_t{17}, size_t{65}, size_t{4099}}) {
    for (DataType type : kAllDataTypes) {
      for (ReduceOp op : kAllReduceOps) {
        const size_t es = dtype_size(type);
        const auto a = random_bytes(type, n + 1, static_cast<uint32_t>(n * 13 + 3));
        const auto b = random_bytes(type, n + 1, static_cast<uint32_t>(n * 7 + 4));
        const auto want = reference(a, b, n + 1, type, op);  // a op b, a the left operand
        const auto where = [&] {
          return ::testing::Message() << reduce_isa_name(isa) << " " << dtype_name(type) << " "
                                      << reduce_op_name(op) << " n=" << n;
        };
        // dst disjoint from both (unaligned by one element).
        std::vector<uint8_t> dst(a.size(), 0xEE);
        ASSERT_TRUE(
            reduce_to(isa, dst.data() + es, a.data() + es, b.data() + es, n, type, op).ok());
        ASSERT_EQ(0, std::memcmp(dst.data() + es, want.data() + es, n * es)) << where();
        ASSERT_EQ(dst[0], 0xEE) << where();
        // dst == a.
        auto got = a;
        ASSERT_TRUE(
            reduce_to(isa, got.data() + es, got.data() + es, b.data() + es, n, type, op).ok());
        ASSERT_EQ(0, std::memcmp(got.data() + es, want.data() + es, n * es)) << where();
        // dst == b: still a op b, a on the left.
        got = b;
        ASSERT_TRUE(
            reduce_to(isa, got.data() + es, a.data() + es, got.data() + es, n, type, op).ok());
        ASSERT_EQ(0, std::memcmp(got.data() + es, want.data() + es, n * es)) << where();
        ASSERT_EQ(0, std::memcmp(got.data(), b.data(), es)) << where();
      }
    }
  }
}

TEST(Reduce, ThreeOperandKeepsTheLeftOperandOrder) {
  // min(+0, -0) and min(-0, +0) differ in their sign bit: the left operand wins a tie.
  const float a[2] = {0.0f, -0.0f};
  const float b[2] = {-0.0f, 0.0f};
  float d[2] = {1.0f, 1.0f};
  reduce_to(d, a, b, 2, DataType::kF32, ReduceOp::kMin);
  EXPECT_FALSE(std::signbit(d[0]));
  EXPECT_TRUE(std::signbit(d[1]));
  float e[2] = {b[0], b[1]};
  reduce_to(e, a, e, 2, DataType::kF32, ReduceOp::kMin);  // dst == b
  EXPECT_FALSE(std::signbit(e[0]));
  EXPECT_TRUE(std::signbit(e[1]));
}

INSTANTIATE_TEST_SUITE_P(AllIsas, ReduceKernels,
                         ::testing::Values(ReduceIsa::kScalar, ReduceIsa::kAvx2,
                                           ReduceIsa::kAvx512),
                         [](const auto& p) { return std::string(reduce_isa_name(p.param)); });

TEST(Reduce, IntegerSumAndProdWrapAround) {
  int32_t d[2] = {std::numeric_limits<int32_t>::max(), 1 << 30};
  const int32_t s[2] = {1, 4};
  reduce_into(d, s, 2, DataType::kI32, ReduceOp::kSum);
  EXPECT_EQ(d[0], std::numeric_limits<int32_t>::min());
  reduce_into(d + 1, s + 1, 1, DataType::kI32, ReduceOp::kProd);
  EXPECT_EQ(d[1], 16);  // (2^30 + 4) * 4 = 2^32 + 16 wraps to 16
  uint8_t u[1] = {200};
  const uint8_t v[1] = {100};
  reduce_into(u, v, 1, DataType::kU8, ReduceOp::kSum);
  EXPECT_EQ(u[0], 44);
}

TEST(Reduce, HalfPrecisionAccumulatesInF32) {
  // 2048 + 1 is not representable in f16 (spacing 2 there); the sum must round to even, 2048,
  // and 2048 + 3 = 2051 rounds to 2052: one rounding of the exact f32 result.
  uint16_t d[2] = {float_to_f16(2048.0f), float_to_f16(2048.0f)};
  const uint16_t s[2] = {float_to_f16(1.0f), float_to_f16(3.0f)};
  reduce_into(d, s, 2, DataType::kF16, ReduceOp::kSum);
  EXPECT_EQ(f16_to_float(d[0]), 2048.0f);
  EXPECT_EQ(f16_to_float(d[1]), 2052.0f);
  uint16_t b[1] = {float_to_bf16(256.0f)};
  const uint16_t c[1] = {float_to_bf16(1.0f)};
  reduce_into(b, c, 1, DataType::kBF16, ReduceOp::kSum);
  EXPECT_EQ(bf16_to_float(b[0]), 256.0f);  // 257 ties to even at spacing 2
}

TEST(Reduce, DivideFinishesAvg) {
  int32_t i[3] = {7, -7, 9};
  divide_by(i, 3, DataType::kI32, 2);
  EXPECT_EQ(i[0], 3);
  EXPECT_EQ(i[1], -3);  // toward zero
  EXPECT_EQ(i[2], 4);
  float f[1] = {1.0f};
  divide_by(f, 1, DataType::kF32, 3);
  EXPECT_EQ(f[0], 1.0f / 3.0f);
  uint16_t h[1] = {float_to_f16(1.0f)};
  divide_by(h, 1, DataType::kF16, 3);
  EXPECT_EQ(h[0], float_to_f16(1.0f / 3.0f));
}

TEST(Reduce, NamesRoundTrip) {
  for (DataType t : kAllDataTypes) EXPECT_EQ(*parse_dtype(dtype_name(t)), t);
  for (ReduceOp op : kAllReduceOps) EXPECT_EQ(*parse_reduce_op(reduce_op_name(op)), op);
  EXPECT_EQ(parse_dtype("f8").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(parse_reduce_op("xor").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace myelin::collectives
