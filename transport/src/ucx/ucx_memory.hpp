// transport/src/ucx/ucx_memory.hpp — UCX memory registration and its remote-key blob (not public
// API).
//
// A UcxAllocation is memory UCX allocated itself (ucp_mem_map with UCP_MEM_MAP_ALLOCATE): over
// posix,cma UCX places it in a shared-memory segment that a same-node peer maps, so puts and gets
// into it are plain copies by the origin (the lane ucx_perftest's ucp_put_bw uses), not active
// messages emulated at the target. It owns its ucp_mem_h; ucp_mem_unmap frees the memory when the
// last reference (the Context's allocation handle or a registration inside it) goes.
//
// A UcxRegistration either maps the caller's memory with ucp_mem_map (UCP_MEM_MAP_PARAM_FIELD_
// ADDRESS: UCX registers the memory in place) or, for a region inside a UcxAllocation, reuses that
// allocation's ucp_mem_h (no second mapping, which would describe the memory as foreign to UCX);
// either way it packs its rkey once. Its blob in a RemoteKey is
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

class UcxAllocation {
 public:
  // Allocates at least `size` bytes (> 0) through UCX. Errors: resource_exhausted (or UCX's own
  // code) when UCX cannot allocate.
  static Result<std::shared_ptr<UcxAllocation>> create(std::shared_ptr<UcpContext> context,
                                                       size_t size);
  UcxAllocation(const UcxAllocation&) = delete;
  UcxAllocation& operator=(const UcxAllocation&) = delete;
  ~UcxAllocation();

  [[nodiscard]] void* data() const noexcept { return data_; }
  [[nodiscard]] size_t size() const noexcept { return size_; }  // may exceed what was asked
  [[nodiscard]] ucp_mem_h memh() const noexcept { return memh_; }
  // True when [data, data + size) lies inside this allocation.
  [[nodiscard]] bool contains(const void* data, size_t size) const noexcept;

 private:
  UcxAllocation(std::shared_ptr<UcpContext> context, ucp_mem_h memh, void* data, size_t size)
      : context_(std::move(context)), memh_(memh), data_(data), size_(size) {}
  std::shared_ptr<UcpContext> context_;
  ucp_mem_h memh_;
  void* data_;
  size_t size_;
};

class UcxRegistration final : public BackendRegistration {
 public:
  // Registers region.data/size: reuses `inside`'s mapping when given (the caller checked that
  // the region lies inside it), else maps the memory in place. Size 0 and non-host memory are
  // refused.
  static Result<std::unique_ptr<UcxRegistration>> create(
      const UcxWorker& worker, const RegionState& region,
      std::shared_ptr<UcxAllocation> inside = nullptr);
  UcxRegistration(const UcxRegistration&) = delete;
  UcxRegistration& operator=(const UcxRegistration&) = delete;
  ~UcxRegistration() override;

  [[nodiscard]] Backend backend() const noexcept override { return Backend::kUcx; }
  [[nodiscard]] std::vector<uint8_t> remote_key_blob() const override { return blob_; }
  [[nodiscard]] ucp_mem_h memh() const noexcept { return memh_; }

 private:
  UcxRegistration(std::shared_ptr<UcpContext> context, ucp_mem_h memh,
                  std::shared_ptr<UcxAllocation> allocation)
      : context_(std::move(context)), memh_(memh), allocation_(std::move(allocation)) {}
  std::shared_ptr<UcpContext> context_;
  ucp_mem_h memh_;
  std::shared_ptr<UcxAllocation> allocation_;  // set: memh_ is its mapping, not ours to unmap
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
