// TCP frame header, address and hello encoding with strict validation.
#include "tcp/tcp_frame.hpp"

#include <arpa/inet.h>

#include "wire.hpp"

namespace myelin::transport::internal::tcp {

const char* remote_error_text(uint64_t e) noexcept {
  switch (static_cast<RemoteError>(e)) {
    case RemoteError::kNone:
      return "no error";
    case RemoteError::kUnknownRegion:
      return "no such region (stale or foreign remote key)";
    case RemoteError::kOutOfBounds:
      return "offset + size beyond the region";
    case RemoteError::kAccessDenied:
      return "the region does not allow this access";
  }
  return "unknown remote error";
}

void encode_header(const FrameHeader& h, uint8_t* out) {
  store_le(out + 0, kFrameMagic, 4);
  out[4] = kFrameVersion;
  out[5] = static_cast<uint8_t>(h.type);
  store_le(out + 6, h.flags, 2);
  store_le(out + 8, h.channel, 4);
  store_le(out + 12, h.seq, 4);
  store_le(out + 16, h.length, 8);
  store_le(out + 24, h.id, 8);
  store_le(out + 32, h.a0, 8);
  store_le(out + 40, h.a1, 8);
  store_le(out + 48, h.a2, 8);
}

Status decode_header(const uint8_t* in, size_t max_payload, FrameHeader& h) {
  const auto magic = static_cast<uint32_t>(load_le(in, 4));
  if (magic != kFrameMagic) return protocol_error("bad frame magic 0x", std::to_string(magic));
  if (in[4] != kFrameVersion) {
    return protocol_error("unknown frame version ", int{in[4]}, " (expected ", int{kFrameVersion},
                          ")");
  }
  const uint8_t type = in[5];
  if (type == 0 || type > kMaxFrameType) return protocol_error("unknown frame type ", int{type});
  h.type = static_cast<FrameType>(type);
  h.flags = static_cast<uint16_t>(load_le(in + 6, 2));
  h.channel = static_cast<uint32_t>(load_le(in + 8, 4));
  h.seq = static_cast<uint32_t>(load_le(in + 12, 4));
  h.length = load_le(in + 16, 8);
  h.id = load_le(in + 24, 8);
  h.a0 = load_le(in + 32, 8);
  h.a1 = load_le(in + 40, 8);
  h.a2 = load_le(in + 48, 8);

  uint16_t allowed = 0;
  uint64_t max_len = 0;
  switch (h.type) {
    case FrameType::kHello:
      allowed = kFlagReply;
      max_len = kMaxHelloPayload;
      break;
    case FrameType::kEager:
    case FrameType::kData:
    case FrameType::kGetResp:
      max_len = max_payload;
      break;
    case FrameType::kPut:
      allowed = kFlagImmediate;
      max_len = max_payload;
      break;
    case FrameType::kCts:
      allowed = kFlagDiscard;
      break;
    case FrameType::kRts:
    case FrameType::kPutAck:
    case FrameType::kGet:
      break;
  }
  if ((h.flags & ~allowed) != 0) {
    return protocol_error("frame type ", int{type}, " with unknown flags 0x", int{h.flags});
  }
  if (h.length > max_len) {
    return protocol_error("frame type ", int{type}, " claims ", h.length, " payload bytes (limit ",
                          max_len, ")");
  }
  if (h.type == FrameType::kHello && h.length == 0) return protocol_error("empty hello");
  return ok_status();
}

std::vector<uint8_t> TcpAddress::encode() const {
  std::vector<uint8_t> out;
  WireWriter w(out);
  w.u8(1);
  w.u8(4);
  w.u16(port);
  const uint8_t* ip = reinterpret_cast<const uint8_t*>(&ipv4);  // already network order
  w.bytes(std::span<const uint8_t>(ip, 4));
  w.u64(instance);
  return out;
}

Result<TcpAddress> TcpAddress::decode(std::span<const uint8_t> bytes) {
  if (bytes.size() != kAddressSize) {
    return invalid_argument("tcp address entry of ", bytes.size(), " bytes (expected ",
                            kAddressSize, ")");
  }
  WireReader r(bytes);
  uint8_t version = 0, family = 0;
  TcpAddress a;
  std::span<const uint8_t> ip;
  (void)(r.u8(version) && r.u8(family) && r.u16(a.port) && r.bytes(4, ip) && r.u64(a.instance));
  if (version != 1) return invalid_argument("tcp address entry version ", int{version});
  if (family != 4) return invalid_argument("tcp address family ", int{family}, " (only IPv4)");
  if (a.port == 0) return invalid_argument("tcp address with port 0");
  std::memcpy(&a.ipv4, ip.data(), 4);
  return a;
}

std::string TcpAddress::to_string() const {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &ipv4, buf, sizeof(buf));
  return std::string(buf) + ":" + std::to_string(port);
}

std::vector<uint8_t> Hello::encode() const {
  std::vector<uint8_t> out;
  WireWriter w(out);
  w.u16(static_cast<uint16_t>(name.size()));
  w.bytes(name);
  w.bytes(sender);
  w.bytes(target);
  return out;
}

Result<Hello> Hello::decode(std::span<const uint8_t> bytes) {
  WireReader r(bytes);
  Hello h;
  uint16_t name_len = 0;
  std::span<const uint8_t> sender, target;
  if (!r.u16(name_len) || !r.string(name_len, h.name) || !r.bytes(kAddressSize, sender) ||
      !r.bytes(kAddressSize, target) || !r.at_end()) {
    return protocol_error("malformed hello (", bytes.size(), " bytes)");
  }
  h.sender.assign(sender.begin(), sender.end());
  h.target.assign(target.begin(), target.end());
  MYELIN_RETURN_IF_ERROR(TcpAddress::decode(h.sender).status().with_context("hello sender"));
  MYELIN_RETURN_IF_ERROR(TcpAddress::decode(h.target).status().with_context("hello target"));
  return h;
}

}  // namespace myelin::transport::internal::tcp
