// Test data for the collective tests: every rank can compute every rank's input, so each rank
// checks its own output against a reference computed here, independently of the library.
// Float inputs are small multiples of 1/4 (and powers of two for prod) so that every partial
// result is exact in every format: the result must then be bit-identical whatever the
// reduction order. random_float_input() gives inexact data for the bounded-error checks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <myelin/collectives/half.hpp>
#include <myelin/collectives/types.hpp>

namespace myelin::collectives::testing {

inline uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Exact value of element i of `rank`'s input, as a double (floats) or raw integer bits.
inline double exact_float(int rank, size_t i, ReduceOp op, uint64_t salt) {
  const uint64_t h = mix(static_cast<uint64_t>(rank) * 1000003ull + i * 7919ull + salt);
  if (op == ReduceOp::kProd) {
    static constexpr double kPow[] = {0.5, 1.0, 2.0, -1.0, 1.0};
    return kPow[h % 5];
  }
  return (static_cast<double>(h % 17) - 8.0) * 0.25;
}
inline uint64_t int_bits(int rank, size_t i, uint64_t salt) {
  return mix(static_cast<uint64_t>(rank) * 1000003ull + i * 7919ull + salt + 12345);
}

inline void store_value(uint8_t* p, DataType t, double f, uint64_t bits) {
  switch (t) {
    case DataType::kF32: {
      const float v = static_cast<float>(f);
      std::memcpy(p, &v, 4);
      break;
    }
    case DataType::kF64:
      std::memcpy(p, &f, 8);
      break;
    case DataType::kF16: {
      const uint16_t v = float_to_f16(static_cast<float>(f));
      std::memcpy(p, &v, 2);
      break;
    }
    case DataType::kBF16: {
      const uint16_t v = float_to_bf16(static_cast<float>(f));
      std::memcpy(p, &v, 2);
      break;
    }
    case DataType::kI32: {
      const uint32_t v = static_cast<uint32_t>(bits);
      std::memcpy(p, &v, 4);
      break;
    }
    case DataType::kI64:
      std::memcpy(p, &bits, 8);
      break;
    case DataType::kU8:
      *p = static_cast<uint8_t>(bits);
      break;
  }
}

// `rank`'s input: count elements starting at element index `first` of its logical vector.
inline std::vector<uint8_t> input(int rank, size_t count, DataType t, ReduceOp op, uint64_t salt,
                                  size_t first = 0) {
  const size_t es = dtype_size(t);
  std::vector<uint8_t> v(count * es);
  for (size_t i = 0; i < count; ++i) {
    store_value(v.data() + i * es, t, exact_float(rank, first + i, op, salt),
                int_bits(rank, first + i, salt));
  }
  return v;
}

// The expected reduction of elements [first, first+count) over `n` ranks.
inline std::vector<uint8_t> expected_reduction(int n, size_t count, DataType t, ReduceOp op,
                                               uint64_t salt, size_t first = 0) {
  const size_t es = dtype_size(t);
  std::vector<uint8_t> v(count * es);
  for (size_t i = 0; i < count; ++i) {
    const size_t idx = first + i;
    if (is_floating(t)) {
      double acc = exact_float(0, idx, op, salt);
      for (int r = 1; r < n; ++r) {
        const double x = exact_float(r, idx, op, salt);
        switch (op) {
          case ReduceOp::kSum:
          case ReduceOp::kAvg:
            acc += x;
            break;
          case ReduceOp::kProd:
            acc *= x;
            break;
          case ReduceOp::kMin:
            acc = std::min(acc, x);
            break;
          case ReduceOp::kMax:
            acc = std::max(acc, x);
            break;
        }
      }
      if (op == ReduceOp::kAvg) {
        // The library divides in the element's own arithmetic: f64 in double, others in float.
        acc = t == DataType::kF64
                  ? acc / n
                  : static_cast<double>(static_cast<float>(acc) / static_cast<float>(n));
      }
      store_value(v.data() + i * es, t, acc, 0);
    } else {
      // Wrapping arithmetic in the element's width.
      const unsigned bits_w = static_cast<unsigned>(es * 8);
      const uint64_t mask = bits_w == 64 ? ~0ull : ((1ull << bits_w) - 1);
      auto as_signed = [&](uint64_t u) -> int64_t {
        u &= mask;
        if (t == DataType::kU8 || bits_w == 64) return static_cast<int64_t>(u);
        return (u >> (bits_w - 1)) ? static_cast<int64_t>(u | ~mask) : static_cast<int64_t>(u);
      };
      uint64_t acc = int_bits(0, idx, salt) & mask;
      for (int r = 1; r < n; ++r) {
        const uint64_t x = int_bits(r, idx, salt) & mask;
        switch (op) {
          case ReduceOp::kSum:
          case ReduceOp::kAvg:
            acc = (acc + x) & mask;
            break;
          case ReduceOp::kProd:
            acc = (acc * x) & mask;
            break;
          case ReduceOp::kMin:
            acc = as_signed(x) < as_signed(acc) ? x : acc;
            break;
          case ReduceOp::kMax:
            acc = as_signed(acc) < as_signed(x) ? x : acc;
            break;
        }
      }
      if (op == ReduceOp::kAvg) acc = static_cast<uint64_t>(as_signed(acc) / n);
      store_value(v.data() + i * es, t, 0, acc);
    }
  }
  return v;
}

// Index of the first differing element, or -1.
inline long first_difference(const uint8_t* got, const uint8_t* want, size_t count, DataType t) {
  const size_t es = dtype_size(t);
  for (size_t i = 0; i < count; ++i) {
    if (std::memcmp(got + i * es, want + i * es, es) != 0) return static_cast<long>(i);
  }
  return -1;
}

}  // namespace myelin::collectives::testing
