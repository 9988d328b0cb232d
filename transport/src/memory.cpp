// RemoteKey serialisation and MemoryRegion::remote_key().
#include <myelin/transport/memory.hpp>

#include "wire.hpp"

namespace myelin::transport {

namespace {
constexpr uint8_t kKeyMagic[4] = {'M', 'Y', 'R', 'K'};
constexpr uint8_t kKeyVersion = 1;
// A key carries at most one blob per real backend; a blob is a handful of bytes (an rkey, a
// packed UCX rkey of a few hundred bytes), so anything near this bound is garbage.
constexpr size_t kMaxBlobs = 4;
constexpr uint32_t kMaxBlobBytes = 64 * 1024;
}  // namespace

std::span<const uint8_t> RemoteKey::backend_blob(Backend b) const noexcept {
  for (const auto& [backend, blob] : blobs_) {
    if (backend == b) return blob;
  }
  return {};
}

void RemoteKey::add_backend_blob(Backend b, std::vector<uint8_t> blob) {
  for (auto& [backend, existing] : blobs_) {
    if (backend == b) {
      existing = std::move(blob);
      return;
    }
  }
  blobs_.emplace_back(b, std::move(blob));
}

std::vector<uint8_t> RemoteKey::serialize() const {
  std::vector<uint8_t> out;
  internal::WireWriter w(out);
  w.bytes(std::span<const uint8_t>(kKeyMagic));
  w.u8(kKeyVersion);
  w.u8(static_cast<uint8_t>(kind_));
  w.u8(static_cast<uint8_t>(access_));
  w.u64(address_);
  w.u64(length_);
  w.u64(region_id_);
  w.u8(static_cast<uint8_t>(blobs_.size()));
  for (const auto& [backend, blob] : blobs_) {
    w.u8(static_cast<uint8_t>(backend));
    w.u32(static_cast<uint32_t>(blob.size()));
    w.bytes(blob);
  }
  return out;
}

Result<RemoteKey> RemoteKey::deserialize(std::span<const uint8_t> bytes) {
  internal::WireReader r(bytes);
  std::span<const uint8_t> magic;
  if (!r.bytes(4, magic) || std::memcmp(magic.data(), kKeyMagic, 4) != 0) {
    return invalid_argument("remote key: bad magic (", bytes.size(), " bytes)");
  }
  uint8_t version = 0, kind = 0, access = 0, count = 0;
  uint64_t address = 0, length = 0, id = 0;
  if (!r.u8(version)) return invalid_argument("remote key: truncated before version");
  if (version != kKeyVersion) {
    return invalid_argument("remote key: unsupported version ", int{version}, " (expected ",
                            int{kKeyVersion}, ")");
  }
  if (!r.u8(kind) || !r.u8(access) || !r.u64(address) || !r.u64(length) || !r.u64(id) ||
      !r.u8(count)) {
    return invalid_argument("remote key: truncated header (", bytes.size(), " bytes)");
  }
  if (kind > static_cast<uint8_t>(MemoryKind::kCuda)) {
    return invalid_argument("remote key: unknown memory kind ", int{kind});
  }
  if (access > static_cast<uint8_t>(Access::kRemoteReadWrite)) {
    return invalid_argument("remote key: unknown access ", int{access});
  }
  if (address + length < address) {
    return invalid_argument("remote key: address ", address, " + length ", length, " overflows");
  }
  if (count > kMaxBlobs) return invalid_argument("remote key: ", int{count}, " backend blobs");
  RemoteKey key(address, length, id, static_cast<Access>(access), static_cast<MemoryKind>(kind));
  for (uint8_t i = 0; i < count; ++i) {
    uint8_t backend = 0;
    uint32_t len = 0;
    std::span<const uint8_t> blob;
    if (!r.u8(backend) || !r.u32(len)) {
      return invalid_argument("remote key: truncated blob header ", int{i});
    }
    if (backend == static_cast<uint8_t>(Backend::kAuto) ||
        backend > static_cast<uint8_t>(Backend::kVerbs)) {
      return invalid_argument("remote key: unknown backend ", int{backend}, " in blob ", int{i});
    }
    if (len > kMaxBlobBytes) {
      return invalid_argument("remote key: blob ", int{i}, " claims ", len, " bytes");
    }
    if (!r.bytes(len, blob)) return invalid_argument("remote key: truncated blob ", int{i});
    if (!key.backend_blob(static_cast<Backend>(backend)).empty()) {
      return invalid_argument("remote key: duplicate blob for ",
                              backend_name(static_cast<Backend>(backend)));
    }
    key.add_backend_blob(static_cast<Backend>(backend),
                         std::vector<uint8_t>(blob.begin(), blob.end()));
  }
  if (!r.at_end()) {
    return invalid_argument("remote key: ", r.remaining(), " trailing bytes");
  }
  return key;
}

RemoteKey MemoryRegion::remote_key() const {
  if (!state_) return RemoteKey();
  RemoteKey key(reinterpret_cast<uintptr_t>(state_->data), state_->size, state_->id, state_->access,
                state_->kind);
  for (const auto& reg : state_->registrations) {
    key.add_backend_blob(reg->backend(), reg->remote_key_blob());
  }
  return key;
}

}  // namespace myelin::transport
