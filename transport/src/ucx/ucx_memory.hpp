// transport/src/ucx/ucx_memory.hpp — UCX memory registration and its remote-key blob (not public
// API).
//
// A UcxRegistration maps the caller's memory with ucp_mem_map (UCP_MEM_MAP_PARAM_FIELD_ADDRESS:
// UCX registers the memory in place, it allocates nothing) and packs its rkey once. Its blob in a
// RemoteKey is
//   "UXRK" u32 | version u16 | access u16 | owner context id u64 | address u64 | length u64
//   | packed length u32 | FNV-1a u64 (over every other byte) | ucp_rkey_pack bytes
// The owner id lets an endpoint refuse a key that belongs to another peer; the registered range
// and access, covered by the checksum, let it refuse a RemoteKey whose own fields claim more than
// was registered; and the checksum lets it refuse a corrupted blob before ucp_ep_rkey_unpack
// (which trusts its input) parses it. This guards against mistakes, not against a malicious peer:
// UCX's shared-memory and TCP transports do not check rkeys at the target.
//
// Thread safety: none; the Context's thread registers and deregisters.
// Ownership: holds the UCP context alive until the mapping is released, so a MemoryRegion handle
// that outlives its transport Context is still safe to drop.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include <myelin/core/status.hpp>
#include <myelin/transport/memory.hpp>

#include "ucx/ucx_worker.hpp"

namespace myelin::transport::internal::ucx {

inline constexpr uint32_t kRkeyMagic = 0x4b525855;  // "UXRK"
inline constexpr uint16_t kRkeyVersion = 1;
inline constexpr size_t kRkeyHeaderSize = 4 + 2 + 2 + 8 + 8 + 8 + 4 + 8;
inline constexpr size_t kRkeyChecksumOffset = kRkeyHeaderSize - 8;

class UcxRegistration final : public BackendRegistration {
 public:
  // Maps region.data/size; size 0 and non-host memory are refused.
  static Result<std::unique_ptr<UcxRegistration>> create(const UcxWorker& worker,
                                                         const RegionState& region);
  UcxRegistration(const UcxRegistration&) = delete;
  UcxRegistration& operator=(const UcxRegistration&) = delete;
  ~UcxRegistration() override;

  [[nodiscard]] Backend backend() const noexcept override { return Backend::kUcx; }
  [[nodiscard]] std::vector<uint8_t> remote_key_blob() const override { return blob_; }
  [[nodiscard]] ucp_mem_h memh() const noexcept { return memh_; }

 private:
  UcxRegistration(std::shared_ptr<UcpContext> context, ucp_mem_h memh)
      : context_(std::move(context)), memh_(memh) {}
  std::shared_ptr<UcpContext> context_;
  ucp_mem_h memh_;
  std::vector<uint8_t> blob_;
};

// A validated blob: who owns it and the packed rkey inside it (a view into the blob).
struct RkeyBlob {
  uint64_t owner_id = 0;
  uint64_t address = 0;
  uint64_t length = 0;
  Access access = Access::kNone;
  uint64_t checksum = 0;
  std::span<const uint8_t> packed;
};
Result<RkeyBlob> parse_rkey_blob(std::span<const uint8_t> blob);

}  // namespace myelin::transport::internal::ucx
