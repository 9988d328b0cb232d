// UCX memory registration and the remote-key blob format.
#include "ucx/ucx_memory.hpp"

#include "ucx/ucx_wire.hpp"

namespace myelin::transport::internal::ucx {

Result<std::shared_ptr<UcxAllocation>> UcxAllocation::create(std::shared_ptr<UcpContext> context,
                                                             size_t size) {
  if (size == 0) return invalid_argument("cannot allocate 0 bytes through ucx");
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = nullptr;  // no placement hint
  params.length = size;
  params.flags = UCP_MEM_MAP_ALLOCATE;
  ucp_mem_h memh = nullptr;
  ucs_status_t st = ucp_mem_map(context->get(), &params, &memh);
  if (st != UCS_OK) {
    return ucs_to_status(st, "allocating " + std::to_string(size) + " bytes through ucx");
  }
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  st = ucp_mem_query(memh, &attr);
  if (st != UCS_OK || attr.address == nullptr || attr.length < size) {
    const ucs_status_t unmapped = ucp_mem_unmap(context->get(), memh);
    MYELIN_CHECK(unmapped == UCS_OK) << "ucp_mem_unmap: " << ucs_status_string(unmapped);
    if (st != UCS_OK) return ucs_to_status(st, "querying a ucx allocation");
    return internal_error("ucx allocated ", attr.length, " bytes at ",
                          reinterpret_cast<uintptr_t>(attr.address), " when asked for ", size);
  }
  return std::shared_ptr<UcxAllocation>(
      new UcxAllocation(std::move(context), memh, attr.address, attr.length));
}

UcxAllocation::~UcxAllocation() {
  const ucs_status_t st = ucp_mem_unmap(context_->get(), memh_);
  MYELIN_CHECK(st == UCS_OK) << "ucp_mem_unmap of a ucx allocation: " << ucs_status_string(st);
}

bool UcxAllocation::contains(const void* data, size_t size) const noexcept {
  const auto base = reinterpret_cast<uintptr_t>(data_);
  const auto p = reinterpret_cast<uintptr_t>(data);
  return p >= base && size <= size_ && p - base <= size_ - size;
}

Result<std::unique_ptr<UcxRegistration>> UcxRegistration::create(
    const UcxWorker& worker, const RegionState& region, std::shared_ptr<UcxAllocation> inside) {
  if (region.kind != MemoryKind::kHost) {
    return unsupported("the ucx backend registers host memory only");
  }
  if (region.size == 0 || region.data == nullptr) {
    return invalid_argument("cannot register an empty region (", region.size, " bytes at ",
                            reinterpret_cast<uintptr_t>(region.data), ") with ucx");
  }
  ucs_status_t st = UCS_OK;
  std::unique_ptr<UcxRegistration> reg;
  if (inside) {
    // The allocation's own mapping: its rkey tells the peer this is UCX's (shared) memory.
    reg.reset(new UcxRegistration(worker.context(), inside->memh(), inside));
  } else {
    // Access is enforced at the origin from the RemoteKey (see UcxEndpoint), so the mapping
    // itself keeps UCX's default protection: some UCX memory domains ignore narrower ones anyway.
    ucp_mem_map_params_t params{};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    params.address = region.data;
    params.length = region.size;
    ucp_mem_h memh = nullptr;
    st = ucp_mem_map(worker.context()->get(), &params, &memh);
    if (st != UCS_OK) {
      return ucs_to_status(st, "registering " + std::to_string(region.size) + " bytes with ucx");
    }
    reg.reset(new UcxRegistration(worker.context(), memh, nullptr));
  }

  void* packed = nullptr;
  size_t packed_size = 0;
  st = ucp_rkey_pack(worker.context()->get(), reg->memh_, &packed, &packed_size);
  if (st != UCS_OK) return ucs_to_status(st, "packing a ucx rkey");
  const std::span<const uint8_t> bytes(static_cast<const uint8_t*>(packed), packed_size);
  WireWriter out(reg->blob_);
  out.u32(kRkeyMagic);
  out.u16(kRkeyVersion);
  out.u16(static_cast<uint16_t>(region.access));
  out.u64(worker.id());
  out.u64(reinterpret_cast<uint64_t>(region.data));
  out.u64(region.size);
  out.u32(static_cast<uint32_t>(packed_size));
  const uint64_t sum = fnv1a64(bytes, fnv1a64(reg->blob_));
  out.u64(sum);
  out.bytes(packed, packed_size);
  ucp_rkey_buffer_release(packed);
  return reg;
}

UcxRegistration::~UcxRegistration() {
  if (allocation_) return;  // the allocation unmaps its memory when its last reference goes
  const ucs_status_t st = ucp_mem_unmap(context_->get(), memh_);
  MYELIN_CHECK(st == UCS_OK) << "ucp_mem_unmap: " << ucs_status_string(st);
}

Result<RkeyBlob> parse_rkey_blob(std::span<const uint8_t> blob) {
  if (blob.empty())
    return invalid_argument("the remote key has no ucx part (region not registered with ucx)");
  if (blob.size() < kRkeyHeaderSize) {
    return invalid_argument("ucx remote key blob of ", blob.size(), " bytes is shorter than its ",
                            kRkeyHeaderSize, "-byte header");
  }
  WireReader in(blob);
  if (in.u32() != kRkeyMagic) return invalid_argument("ucx remote key blob has a bad magic");
  const uint16_t version = in.u16();
  if (version != kRkeyVersion) {
    return invalid_argument("ucx remote key blob version ", version, " is not the supported ",
                            kRkeyVersion);
  }
  RkeyBlob out;
  out.access = static_cast<Access>(in.u16() & 3);
  out.owner_id = in.u64();
  out.address = in.u64();
  out.length = in.u64();
  const uint32_t length = in.u32();
  out.checksum = in.u64();
  if (length == 0 || length != blob.size() - kRkeyHeaderSize) {
    return invalid_argument("ucx remote key blob announces ", length, " packed bytes but carries ",
                            blob.size() - kRkeyHeaderSize);
  }
  out.packed = blob.subspan(kRkeyHeaderSize);
  if (fnv1a64(out.packed, fnv1a64(blob.first(kRkeyChecksumOffset))) != out.checksum) {
    return invalid_argument("ucx remote key blob fails its checksum (corrupted in transit?)");
  }
  return out;
}

}  // namespace myelin::transport::internal::ucx
