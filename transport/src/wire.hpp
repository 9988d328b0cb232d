// transport/src/wire.hpp — little-endian encoding helpers for every byte format the transport
// reads from peers (Context addresses, remote keys, TCP frames, store messages).
//
// WireWriter appends; WireReader consumes with bounds checks and never reads past its span: every
// read returns false once the input is short, and the reader stays failed from then on, so parsers
// can read a whole record and check ok() once.
//
// Thread safety: values; one object per thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace myelin::transport::internal {

class WireWriter {
 public:
  explicit WireWriter(std::vector<uint8_t>& out) : out_(out) {}
  void u8(uint8_t v) { out_.push_back(v); }
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void bytes(std::span<const uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  void bytes(std::string_view s) {
    out_.insert(out_.end(), reinterpret_cast<const uint8_t*>(s.data()),
                reinterpret_cast<const uint8_t*>(s.data()) + s.size());
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
  bool u8(uint8_t& v) { return get(v, 1); }
  bool u16(uint16_t& v) { return get(v, 2); }
  bool u32(uint32_t& v) { return get(v, 4); }
  bool u64(uint64_t& v) { return get(v, 8); }
  // A view of the next n bytes (valid while the input is).
  bool bytes(size_t n, std::span<const uint8_t>& out) {
    if (!ok_ || remaining() < n) return ok_ = false;
    out = in_.subspan(pos_, n);
    pos_ += n;
    return true;
  }
  bool string(size_t n, std::string& out) {
    std::span<const uint8_t> b;
    if (!bytes(n, b)) return false;
    out.assign(reinterpret_cast<const char*>(b.data()), b.size());
    return true;
  }
  [[nodiscard]] bool ok() const noexcept { return ok_; }
  [[nodiscard]] size_t remaining() const noexcept { return in_.size() - pos_; }
  [[nodiscard]] bool at_end() const noexcept { return ok_ && pos_ == in_.size(); }

 private:
  template <typename T>
  bool get(T& v, int n) {
    if (!ok_ || remaining() < static_cast<size_t>(n)) return ok_ = false;
    uint64_t x = 0;
    for (int i = 0; i < n; ++i) x |= static_cast<uint64_t>(in_[pos_ + i]) << (8 * i);
    v = static_cast<T>(x);
    pos_ += n;
    return true;
  }
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

// Stores/loads a little-endian integer at p (for fixed-layout headers).
inline void store_le(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint64_t load_le(const uint8_t* p, int n) {
  uint64_t x = 0;
  for (int i = 0; i < n; ++i) x |= static_cast<uint64_t>(p[i]) << (8 * i);
  return x;
}

}  // namespace myelin::transport::internal
