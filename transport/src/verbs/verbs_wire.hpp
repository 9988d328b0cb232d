// transport/src/verbs/verbs_wire.hpp — byte formats the verbs backend exchanges with peers.
//
// Everything a peer sends is parsed with bounds checks and version checks; a malformed message is
// a protocol_error, never a crash. All integers are little-endian on the wire.
//
//   VerbsAddress     this backend's part of the Context address (static for its lifetime): how
//                    to reach its wire-up UD QP (LID, GID, QPN, MTU) and its rdma_cm listener
//                    (IP, port), plus a random token that identifies the backend instance.
//   ConnectInfo      one side of a connection: RC QPN, PSN, MTU and where its eager receive ring
//                    and credit word live. Sent over UD (exchange mode) or as rdma_cm private
//                    data (rdmacm mode; kept within the 56 bytes a CM REQ carries).
//   RingHeader       the 32-byte header at the start of every eager ring slot.
//   verbs key blob   the verbs part of a RemoteKey: version + rkey.
//
// Thread safety: pure functions on values.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin::transport::internal::verbs {

enum class CmMode : uint8_t { kExchange = 0, kRdmaCm = 1 };
const char* cm_mode_name(CmMode m) noexcept;

struct VerbsAddress {
  static constexpr uint32_t kMagic = 0x4256594d;  // "MYVB"
  static constexpr uint8_t kVersion = 1;
  CmMode mode = CmMode::kExchange;
  uint8_t link_layer = 0;  // IBV_LINK_LAYER_*
  uint8_t port = 1;
  uint8_t mtu = 0;  // enum ibv_mtu
  uint16_t lid = 0;
  std::array<uint8_t, 16> gid{};
  uint32_t ud_qpn = 0;
  uint64_t token = 0;
  uint8_t ip_family = 0;  // 0 none, 4, 6
  std::array<uint8_t, 16> ip{};
  uint16_t cm_port = 0;  // host order

  [[nodiscard]] std::vector<uint8_t> serialize() const;
  static Result<VerbsAddress> parse(std::span<const uint8_t> bytes);
};

struct ConnectInfo {
  static constexpr uint32_t kMagic = 0x4856594d;  // "MYVH"
  static constexpr uint8_t kVersion = 1;
  static constexpr uint8_t kHaveInfo = 1;  // sender's QP is in RTR: it knows our ConnectInfo
  static constexpr uint8_t kReady = 2;     // sender knows our QP is in RTR
  uint8_t flags = 0;
  uint8_t mtu = 0;
  uint64_t src_token = 0;
  uint64_t dst_token = 0;
  uint32_t qpn = 0;
  uint32_t psn = 0;
  uint64_t ring_addr = 0;
  uint32_t ring_rkey = 0;
  uint64_t credit_addr = 0;
  uint32_t credit_rkey = 0;
  uint32_t slots = 0;
  uint32_t slot_size = 0;
  // Exchange mode only: the sender's full VerbsAddress, so the receiver can answer.
  std::vector<uint8_t> sender_address;

  // Compact form without sender_address (rdmacm private data, at most 56 bytes).
  static constexpr size_t kCompactSize = 4 + 1 + 1 + 1 + 1 + 8 + 4 + 8 + 4 + 8 + 4 + 4 + 4;
  [[nodiscard]] std::vector<uint8_t> serialize(bool compact) const;
  static Result<ConnectInfo> parse(std::span<const uint8_t> bytes, bool compact);
};
static_assert(ConnectInfo::kCompactSize <= 56, "rdma_cm REQ private data holds 56 bytes");

// Ring message types.
enum class MsgType : uint8_t {
  kEager = 1,      // payload follows the header in the slot
  kRts = 2,        // rendezvous: read `size` bytes at addr/rkey, then answer kFin with id
  kFin = 3,        // rendezvous done: id; channel = 0 ok, 1 receiver refused (too small)
  kImmediate = 4,  // put_with_immediate's value (channel field), after its data
};

struct RingHeader {
  uint8_t type = 0;
  uint8_t reserved[3] = {0, 0, 0};
  uint32_t channel = 0;
  uint64_t size = 0;
  uint64_t addr = 0;
  uint32_t rkey = 0;
  uint32_t id = 0;
};
static_assert(sizeof(RingHeader) == 32, "ring header layout is part of the wire format");

// Encodes in the sender's byte order: both ends are little-endian x86-64/aarch64 hosts (checked
// at compile time below) and the header travels by RDMA WRITE, never through a parser of ours
// except decode_header() which validates the type.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the ring format assumes little-endian");
Result<RingHeader> decode_header(const uint8_t* slot, size_t slot_size);

std::vector<uint8_t> make_key_blob(uint32_t rkey);
Result<uint32_t> parse_key_blob(std::span<const uint8_t> blob);

}  // namespace myelin::transport::internal::verbs
