// transport/src/verbs/verbs_wire.cpp — encoding and validated parsing of the verbs wire formats.
#include "verbs/verbs_wire.hpp"

#include <infiniband/verbs.h>

#include <cstring>

namespace myelin::transport::internal::verbs {
namespace {

class Writer {
 public:
  template <typename T>
  void put(T v) {
    for (size_t i = 0; i < sizeof(T); ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  void bytes(std::span<const uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  std::vector<uint8_t> take() { return std::move(out_); }

 private:
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  template <typename T>
  bool get(T& v) {
    if (in_.size() - pos_ < sizeof(T)) return false;
    uint64_t acc = 0;
    for (size_t i = 0; i < sizeof(T); ++i) acc |= uint64_t{in_[pos_ + i]} << (8 * i);
    v = static_cast<T>(acc);
    pos_ += sizeof(T);
    return true;
  }
  bool bytes(uint8_t* dst, size_t n) {
    if (in_.size() - pos_ < n) return false;
    std::memcpy(dst, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  [[nodiscard]] size_t left() const { return in_.size() - pos_; }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

}  // namespace

const char* cm_mode_name(CmMode m) noexcept {
  return m == CmMode::kRdmaCm ? "rdmacm" : "exchange";
}

std::vector<uint8_t> VerbsAddress::serialize() const {
  Writer w;
  w.put(kMagic);
  w.put(kVersion);
  w.put(static_cast<uint8_t>(mode));
  w.put(link_layer);
  w.put(port);
  w.put(mtu);
  w.put(lid);
  w.bytes(gid);
  w.put(ud_qpn);
  w.put(token);
  w.put(ip_family);
  w.bytes(ip);
  w.put(cm_port);
  return w.take();
}

Result<VerbsAddress> VerbsAddress::parse(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  VerbsAddress a;
  uint32_t magic = 0;
  uint8_t version = 0, mode = 0;
  if (!r.get(magic) || magic != kMagic) return protocol_error("verbs address: bad magic");
  if (!r.get(version) || version != kVersion) {
    return protocol_error("verbs address: unsupported version ", int{version});
  }
  if (!r.get(mode) || mode > 1 || !r.get(a.link_layer) || !r.get(a.port) || !r.get(a.mtu) ||
      !r.get(a.lid) || !r.bytes(a.gid.data(), a.gid.size()) || !r.get(a.ud_qpn) ||
      !r.get(a.token) || !r.get(a.ip_family) || !r.bytes(a.ip.data(), a.ip.size()) ||
      !r.get(a.cm_port) || r.left() != 0) {
    return protocol_error("verbs address: truncated or malformed (", bytes.size(), " bytes)");
  }
  a.mode = static_cast<CmMode>(mode);
  if (a.ip_family != 0 && a.ip_family != 4 && a.ip_family != 6) {
    return protocol_error("verbs address: bad ip family ", int{a.ip_family});
  }
  if (a.mtu < IBV_MTU_256 || a.mtu > IBV_MTU_4096) {
    return protocol_error("verbs address: bad mtu enum ", int{a.mtu});
  }
  return a;
}

std::vector<uint8_t> ConnectInfo::serialize(bool compact) const {
  Writer w;
  w.put(kMagic);
  w.put(kVersion);
  w.put(flags);
  w.put(mtu);
  w.put(uint8_t{0});
  w.put(src_token);
  w.put(qpn);
  w.put(ring_addr);
  w.put(ring_rkey);
  w.put(credit_addr);
  w.put(credit_rkey);
  w.put(slots);
  w.put(slot_size);
  if (!compact) {
    w.put(dst_token);
    w.put(psn);
    w.put(static_cast<uint16_t>(sender_address.size()));
    w.bytes(sender_address);
  }
  return w.take();
}

Result<ConnectInfo> ConnectInfo::parse(std::span<const uint8_t> bytes, bool compact) {
  Reader r(bytes);
  ConnectInfo c;
  uint32_t magic = 0;
  uint8_t version = 0, pad = 0;
  if (!r.get(magic) || magic != kMagic) return protocol_error("verbs connect info: bad magic");
  if (!r.get(version) || version != kVersion) {
    return protocol_error("verbs connect info: unsupported version ", int{version});
  }
  if (!r.get(c.flags) || !r.get(c.mtu) || !r.get(pad) || !r.get(c.src_token) || !r.get(c.qpn) ||
      !r.get(c.ring_addr) || !r.get(c.ring_rkey) || !r.get(c.credit_addr) ||
      !r.get(c.credit_rkey) || !r.get(c.slots) || !r.get(c.slot_size)) {
    return protocol_error("verbs connect info: truncated (", bytes.size(), " bytes)");
  }
  if (!compact) {
    uint16_t len = 0;
    if (!r.get(c.dst_token) || !r.get(c.psn) || !r.get(len) || r.left() < len) {
      return protocol_error("verbs connect info: truncated (", bytes.size(), " bytes)");
    }
    c.sender_address.resize(len);
    (void)r.bytes(c.sender_address.data(), len);
  }
  if (c.slots == 0 || c.slots > (1u << 16) || c.slot_size < sizeof(RingHeader) ||
      c.slot_size > (1u << 24) || (c.qpn >> 24) != 0 || (c.psn >> 24) != 0) {
    return protocol_error("verbs connect info: out-of-range field (slots ", c.slots, ", slot size ",
                          c.slot_size, ", qpn ", c.qpn, ")");
  }
  return c;
}

Result<RingHeader> decode_header(const uint8_t* slot, size_t slot_size) {
  RingHeader h;
  std::memcpy(&h, slot, sizeof h);
  switch (static_cast<MsgType>(h.type)) {
    case MsgType::kEager:
      if (h.size > slot_size - sizeof(RingHeader)) {
        return protocol_error("verbs ring: eager size ", h.size, " exceeds slot");
      }
      return h;
    case MsgType::kRts:
    case MsgType::kFin:
    case MsgType::kImmediate:
      return h;
  }
  return protocol_error("verbs ring: unknown message type ", int{h.type});
}

std::vector<uint8_t> make_key_blob(uint32_t rkey) {
  Writer w;
  w.put(uint8_t{1});
  w.put(rkey);
  return w.take();
}

Result<uint32_t> parse_key_blob(std::span<const uint8_t> blob) {
  Reader r(blob);
  uint8_t version = 0;
  uint32_t rkey = 0;
  if (blob.empty()) return invalid_argument("remote key carries no verbs registration");
  if (!r.get(version) || version != 1 || !r.get(rkey) || r.left() != 0) {
    return invalid_argument("remote key: malformed verbs blob (", blob.size(), " bytes)");
  }
  return rkey;
}

}  // namespace myelin::transport::internal::verbs
