// transport/src/ucx/ucx_wire.hpp — little-endian byte writers/readers for the UCX backend's
// address and remote-key formats (not public API).
//
// WireReader never reads past its span: the caller checks the total size first, and a short read
// is a broken invariant (checked), not bad input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include <myelin/core/check.hpp>

namespace myelin::transport::internal::ucx {

class WireWriter {
 public:
  explicit WireWriter(std::vector<uint8_t>& out) : out_(out) {}
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t>& out_;
};

class WireReader {
 public:
  explicit WireReader(std::span<const uint8_t> in) : in_(in) {}
  uint16_t u16() { return static_cast<uint16_t>(get(2)); }
  uint32_t u32() { return static_cast<uint32_t>(get(4)); }
  uint64_t u64() { return get(8); }
  [[nodiscard]] size_t offset() const noexcept { return pos_; }
  void skip(size_t n) {
    MYELIN_CHECK_LE(pos_ + n, in_.size());
    pos_ += n;
  }

 private:
  uint64_t get(int n) {
    MYELIN_CHECK_LE(pos_ + static_cast<size_t>(n), in_.size());
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(in_[pos_ + i]) << (8 * i);
    pos_ += static_cast<size_t>(n);
    return v;
  }
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

// FNV-1a, 64 bit (pass the previous result as h to continue over more bytes): a checksum over
// packed rkeys so a corrupted blob is refused before UCX parses it.
inline uint64_t fnv1a64(std::span<const uint8_t> bytes,
                        uint64_t h = 0xcbf29ce484222325ULL) noexcept {
  for (uint8_t b : bytes) {
    h ^= b;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace myelin::transport::internal::ucx
