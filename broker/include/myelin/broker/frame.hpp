// myelin/broker/frame.hpp
//
// The broker's wire format: every byte a broker or client reads from a peer goes through the
// decoders here, which validate strictly and never read past the span they are given.
//
// A frame is a fixed 40-byte little-endian header, then `topic_len` topic bytes, then
// `payload_len` payload bytes:
//   off  size  field
//    0    4    magic   0x424C594D ("MYLB" in memory order)
//    4    1    version kFrameVersion
//    5    1    type    FrameType
//    6    1    flags   FrameFlag bits; unknown bits are an error
//    7    1    reserved, must be 0
//    8    2    topic_len  (<= kMaxTopicLength)
//   10    2    reserved, must be 0
//   12    4    payload_len (<= DecodeLimits::max_frame_payload)
//   16    8    seq     topic sequence number, attempt number, step, ... (per type)
//   24    8    id      message / request / subscription id, or credits (per type)
//   32    8    timestamp_ns  publisher's CLOCK_MONOTONIC at publish (latency histograms)
//
// A batch frame (kBatch) carries complete inner frames back to back in its payload; inner frames
// keep their own boundaries, may not be batches themselves and may not be chunks.
// Bulk messages larger than the chunk size travel as a first chunk (kFlagMore, topic present)
// followed by continuation chunks (kFlagContinuation, no topic, same id), the last without
// kFlagMore; Reassembler rebuilds them.
//
// Thread safety: the free functions are pure. Reassembler is a value owned by one connection.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin::broker {

inline constexpr uint32_t kFrameMagic = 0x424C594Du;
inline constexpr uint8_t kFrameVersion = 1;
inline constexpr size_t kFrameHeaderSize = 40;
inline constexpr size_t kMaxTopicLength = 255;
inline constexpr size_t kNonceSize = 32;
inline constexpr size_t kMacSize = 32;  // HMAC-SHA256
inline constexpr size_t kSessionTokenSize = 32;

// Protocol versions (of the conversation, above the frame format kFrameVersion). Each side states
// the range it speaks in the handshake (hello's and auth's seq, see encode_versions()); the newest
// version both speak is used, and a client and broker without a common version are refused with
// a clear error on both sides.
//   1: one connection per client.
//   2: auth_ok also carries a session token; the client may attach a second, control connection
//      to its session (kAttach) that carries every control-lane frame both ways.
//   3: as 2, and auth_ok's proof also covers the session token and id (auth.hpp), so neither can
//      be swapped on the way; with a version-2 peer the proof leaves them out, as version 2 did.
inline constexpr uint32_t kMinProtocolVersion = 1;
inline constexpr uint32_t kProtocolVersion = 3;

enum class FrameType : uint8_t {
  kHello = 1,        // S->C  payload: server nonce (32 B); seq: versions (encode_versions)
  kAuth = 2,         // C->S  topic: identity; payload: client nonce (32 B) + HMAC (32 B);
                     //       seq: versions (0 from clients older than protocol 2: version 1)
  kAuthOk = 3,       // S->C  payload: server proof HMAC (32 B), then (protocol 2, main connection)
                     //       the session token (32 B); id: client id; seq: publish credits;
                     //       timestamp_ns: report bytes read every this many bytes (0: never)
  kError = 4,        // both  seq: StatusCode; id: id of the failed request (0: the connection)
  kPublish = 5,      // C->S  topic; seq: publisher sequence; id: message id
  kDeliver = 6,      // S->C  topic; seq: topic sequence; id: message id
  kSubscribe = 7,    // C->S  topic: pattern; id: subscription id
  kUnsubscribe = 8,  // C->S  id: subscription id
  kCredit = 9,       // both  id: credits granted (C->S: deliveries; S->C: publishes);
                     //       C->S seq: bytes read from the socket since the last report
  kRequest = 10,     // both  topic; id: message id; seq: attempt number (1, 2, ...)
  kReply = 11,       // both  id: message id of the request
  kBatch = 12,       // both  payload: inner frames
  kHeartbeat = 13,   // both
  kPsPush = 14,      // C->S  topic: key; seq: step; id: request id; payload: f32 tensor
  kPsPull = 15,      // C->S  topic: key; seq: min step; id: request id
  kPsReply = 16,     // S->C  id: request id; seq: step; payload: f32 tensor (empty for a push)
  kGoAway = 17,      // S->C  the broker is draining; no new work
  kAttach = 18,      // C->S  first frame of a control connection (protocol 2): topic: identity;
                     //       id: session (client) id; seq: versions; payload: client nonce (32 B)
                     //       + HMAC (32 B) over the server nonce, the session token and the rest
};
inline constexpr uint8_t kMaxFrameType = 18;
std::string_view frame_type_name(FrameType type) noexcept;

enum FrameFlag : uint8_t {
  kFlagControl = 1u << 0,       // control lane (else bulk)
  kFlagMore = 1u << 1,          // more chunks of this message follow
  kFlagContinuation = 1u << 2,  // not the first chunk of the message
};
inline constexpr uint8_t kKnownFlags = kFlagControl | kFlagMore | kFlagContinuation;

struct FrameHeader {
  FrameType type = FrameType::kHeartbeat;
  uint8_t flags = 0;
  uint16_t topic_len = 0;
  uint32_t payload_len = 0;
  uint64_t seq = 0;
  uint64_t id = 0;
  uint64_t timestamp_ns = 0;
};

// A decoded frame; topic and payload point into the caller's buffer.
struct FrameView {
  FrameHeader header;
  std::string_view topic;
  std::span<const std::byte> payload;
  [[nodiscard]] bool control() const noexcept { return header.flags & kFlagControl; }
};

struct DecodeLimits {
  uint32_t max_frame_payload = 1u << 20;  // one frame, chunk or batch
  uint64_t max_message = 256ull << 20;    // one reassembled message
};

// Writes the 40-byte header into `out`.
void encode_header(const FrameHeader& h, std::span<std::byte, kFrameHeaderSize> out) noexcept;
// Appends a whole frame (header, topic, payload) to `out`; sets topic_len/payload_len from the
// arguments. Errors: invalid_argument for a topic over kMaxTopicLength or a payload over 4 GiB.
Status append_frame(std::vector<std::byte>& out, FrameHeader h, std::string_view topic,
                    std::span<const std::byte> payload);

enum class DecodeOutcome : uint8_t { kNeedMore, kFrame };
// Decodes one frame from the front of `in`. kNeedMore: `in` holds a prefix of a valid frame
// (nothing consumed). kFrame: *out is filled and *consumed is its size. An error (protocol_error)
// means the stream is corrupt and the connection must be closed. Checks: magic, version, type,
// flags, reserved bytes, lengths against limits, chunk flag combinations, topic characters.
Result<DecodeOutcome> decode_frame(std::span<const std::byte> in, const DecodeLimits& limits,
                                   FrameView* out, size_t* consumed);

// Calls `fn` on each inner frame of a batch payload, in order; stops at the first error (its own
// or fn's). Errors: protocol_error for a truncated inner frame, a nested batch, a chunk, an empty
// batch or an inner type that cannot be batched (handshake frames).
Status for_each_in_batch(std::span<const std::byte> payload, const DecodeLimits& limits,
                         const std::function<Status(const FrameView&)>& fn);

// Protocol version ranges as hello and auth carry them in seq: (min << 32) | max. 0 (what peers
// older than protocol 2 send) reads as version 1 only.
struct VersionRange {
  uint32_t min = kMinProtocolVersion;
  uint32_t max = kProtocolVersion;
};
[[nodiscard]] uint64_t encode_versions(VersionRange r) noexcept;
// Errors: protocol_error for min 0 or min > max.
Result<VersionRange> decode_versions(uint64_t seq);
// The newest version in both ranges. Errors: unsupported, naming both ranges; `peer` says who the
// other side is ("the broker at ...", "client 'x'").
Result<uint32_t> negotiate_version(VersionRange ours, VersionRange theirs, std::string_view peer);

// Handshake payloads.
struct AuthRequest {
  std::string identity;
  VersionRange versions;
  std::array<std::byte, kNonceSize> client_nonce{};
  std::array<std::byte, kMacSize> mac{};
};
struct AttachRequest {
  std::string identity;
  uint64_t session = 0;
  VersionRange versions;
  std::array<std::byte, kNonceSize> client_nonce{};
  std::array<std::byte, kMacSize> mac{};
};
struct AuthOk {
  std::array<std::byte, kMacSize> proof{};
  bool has_token = false;
  std::array<std::byte, kSessionTokenSize> token{};
};
// kHello -> server nonce. Errors: protocol_error on a wrong type or size. The broker's versions
// are decode_versions(f.header.seq).
Result<std::array<std::byte, kNonceSize>> parse_hello(const FrameView& f);
// kAuth -> identity, versions, client nonce, mac. Errors: protocol_error; identity must be
// 1..64 chars of [A-Za-z0-9_.-].
Result<AuthRequest> parse_auth(const FrameView& f);
// kAttach -> identity, session, versions, client nonce, mac. Errors: protocol_error (as
// parse_auth; session 0 and versions below 2 are refused too).
Result<AttachRequest> parse_attach(const FrameView& f);
// kAuthOk -> server proof and, when present, the session token.
Result<AuthOk> parse_auth_ok(const FrameView& f);
// Identity syntax used by parse_auth and by ACL configuration.
[[nodiscard]] bool valid_identity(std::string_view id) noexcept;

// A message reassembled from chunks, or a single-frame message whose payload was copied.
struct AssembledMessage {
  FrameHeader header;  // of the first chunk, payload_len = total size, chunk flags cleared
  std::string topic;
  std::shared_ptr<std::vector<std::byte>> payload;
};

// Rebuilds chunked bulk messages of one connection. Only bulk messages are chunked and bulk is one
// ordered lane per connection, so one message is in flight at a time.
class Reassembler {
 public:
  explicit Reassembler(DecodeLimits limits = {}) : limits_(limits) {}
  // For a frame with kFlagMore or kFlagContinuation: returns true and fills *done when the message
  // is complete, false while more chunks are needed. Errors (protocol_error): a continuation with
  // no message open, a first chunk while one is open, a different id, the total over
  // max_message, a control-lane chunk.
  Result<bool> add(const FrameView& chunk, AssembledMessage* done);
  [[nodiscard]] bool in_progress() const noexcept { return open_; }

 private:
  DecodeLimits limits_;
  bool open_ = false;
  AssembledMessage cur_;
};

// Topic names and subscription patterns.
//  - topic: levels separated by '/', each 1..64 chars of [A-Za-z0-9_.-]; the first level may start
//    with '$' (topics the broker itself publishes: $pressure/..., $dead/...); at most 255 bytes.
//  - pattern: a topic whose levels may be '*' (exactly one level) or, as the last level only,
//    '#' (one or more levels). Wildcards in the first level never match a '$' topic.
Status validate_topic(std::string_view topic);
Status validate_pattern(std::string_view pattern);
[[nodiscard]] bool topic_matches(std::string_view pattern, std::string_view topic) noexcept;

}  // namespace myelin::broker
