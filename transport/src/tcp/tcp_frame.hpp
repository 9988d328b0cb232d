// transport/src/tcp/tcp_frame.hpp — the TCP backend's wire format (not public API; tests use it to
// craft malformed frames).
//
// Every frame is a fixed 56-byte header, little-endian, followed by `length` payload bytes:
//   off size field
//     0    4 magic    "MYTF"
//     4    1 version  1
//     5    1 type     FrameType
//     6    2 flags    FrameFlag bits allowed for the type; others are an error
//     8    4 channel  two-sided channel, or the immediate of a PUT
//    12    4 seq      per-direction frame counter starting at 0 (the HELLO), wrapping
//    16    8 length   payload bytes; bounded per type (0 for control frames)
//    24    8 id       operation id chosen by the origin (send, put, get) or receive token (DATA)
//    32    8 a0       type-specific (see FrameType)
//    40    8 a1
//    48    8 a2
// A frame that breaks any rule closes its connection with a logged reason; nothing else is
// affected. Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin::transport::internal::tcp {

inline constexpr uint32_t kFrameMagic = 0x4654594d;  // "MYTF" read little-endian
inline constexpr uint8_t kFrameVersion = 1;
inline constexpr size_t kHeaderSize = 56;
inline constexpr size_t kMaxHelloPayload = 4096;

enum class FrameType : uint8_t {
  kHello = 1,    // payload: hello (below); flags kReply on the acceptor's answer
  kEager = 2,    // two-sided message carried whole; payload = message
  kRts = 3,      // rendezvous request: id = send id, a0 = message size
  kCts = 4,      // clear to send: id = send id, a0 = receive token; kDiscard = recv too small
  kData = 5,     // rendezvous payload: id = receive token
  kPut = 6,      // id = op, a0 = region id, a1 = offset; kImmediate: channel = immediate
  kPutAck = 7,   // id = op, a0 = StatusCode (0 ok), a1 = RemoteError
  kGet = 8,      // id = op, a0 = region id, a1 = offset, a2 = size
  kGetResp = 9,  // id = op, a0 = StatusCode, a1 = RemoteError; payload = data when ok
};
inline constexpr uint8_t kMaxFrameType = 9;

enum FrameFlag : uint16_t {
  kFlagReply = 1,      // kHello
  kFlagImmediate = 2,  // kPut
  kFlagDiscard = 4,    // kCts
};

// Why a target refused a one-sided operation (a1 of kPutAck / kGetResp).
enum class RemoteError : uint8_t { kNone = 0, kUnknownRegion, kOutOfBounds, kAccessDenied };
const char* remote_error_text(uint64_t e) noexcept;

struct FrameHeader {
  FrameType type = FrameType::kHello;
  uint16_t flags = 0;
  uint32_t channel = 0;
  uint32_t seq = 0;
  uint64_t length = 0;
  uint64_t id = 0;
  uint64_t a0 = 0;
  uint64_t a1 = 0;
  uint64_t a2 = 0;
};

void encode_header(const FrameHeader& h, uint8_t* out);
// Validates magic, version, type, flags and the length bound for the type (max_payload for data
// frames). Sequence and state checks belong to the connection.
Status decode_header(const uint8_t* in, size_t max_payload, FrameHeader& h);

// The backend's address entry: version u8 (1) | family u8 (4) | port u16 | ipv4 4 bytes |
// instance u64 (random, so a restarted process on the same port is a different peer).
inline constexpr size_t kAddressSize = 16;
struct TcpAddress {
  uint32_t ipv4 = 0;  // network byte order
  uint16_t port = 0;  // host byte order
  uint64_t instance = 0;
  [[nodiscard]] std::vector<uint8_t> encode() const;
  static Result<TcpAddress> decode(std::span<const uint8_t> bytes);
  [[nodiscard]] std::string to_string() const;  // "10.0.0.2:40123"
};

// Hello payload: name_len u16 | name | sender address | address the sender meant to reach.
struct Hello {
  std::string name;
  std::vector<uint8_t> sender;
  std::vector<uint8_t> target;
  [[nodiscard]] std::vector<uint8_t> encode() const;
  static Result<Hello> decode(std::span<const uint8_t> bytes);
};

}  // namespace myelin::transport::internal::tcp
