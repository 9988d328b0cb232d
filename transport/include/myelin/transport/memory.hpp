// myelin/transport/memory.hpp
//
// Registered memory and the keys peers use to reach it.
//
// MemoryRegion: memory registered with every backend of a Context (pinned and keyed for verbs and
// UCX, mapped into peers for shm, looked up by id for tcp). Regions come from
// Context::register_memory() (the caller's memory) or Context::allocate() (memory the Context
// allocates NUMA-locally, shareable with same-node peers: the true zero-copy path inside a node).
// A MemoryRegion is a cheap handle; the registration itself is owned by the Context's registration
// cache, so registering the same gradient buffer every step is a lookup. It stays registered until
// Context::deregister() or the Context's destruction: call deregister() before freeing the memory.
//
// RemoteKey: what a peer needs for put/get on a region; serialises to bytes (versioned, validated
// on deserialisation) to be exchanged through the bootstrap store or a message.
//
// Thread safety: handles may be copied and read from any thread; register/deregister belong to the
// Context's thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <myelin/core/status.hpp>
#include <myelin/transport/options.hpp>

namespace myelin::transport {

// Where the bytes live. Only host memory is registered today; device memory (GPUDirect or staged
// through host) will use the same API.
enum class MemoryKind : uint8_t { kHost = 0, kCuda = 1 };

// Remote access a region allows. Local access is always allowed.
enum class Access : uint8_t {
  kNone = 0,
  kRemoteRead = 1,   // peers may get() from it
  kRemoteWrite = 2,  // peers may put() into it
  kRemoteReadWrite = 3,
};
constexpr bool allows(Access granted, Access wanted) noexcept {
  return (static_cast<uint8_t>(granted) & static_cast<uint8_t>(wanted)) ==
         static_cast<uint8_t>(wanted);
}

// One backend's registration of a region (an ibv_mr, a ucp_mem_h, a shared mapping...).
class BackendRegistration {
 public:
  virtual ~BackendRegistration() = default;
  [[nodiscard]] virtual Backend backend() const noexcept = 0;
  // Backend-specific part of the remote key (rkey, packed UCX rkey, segment name...).
  [[nodiscard]] virtual std::vector<uint8_t> remote_key_blob() const = 0;
};

class RemoteKey {
 public:
  RemoteKey() = default;
  [[nodiscard]] uint64_t address() const noexcept { return address_; }
  [[nodiscard]] uint64_t length() const noexcept { return length_; }
  // Unique per (Context, registration); lets targets refuse stale keys after deregistration.
  [[nodiscard]] uint64_t region_id() const noexcept { return region_id_; }
  [[nodiscard]] Access access() const noexcept { return access_; }
  [[nodiscard]] MemoryKind kind() const noexcept { return kind_; }
  // The blob for one backend; empty when the region is not registered with it.
  [[nodiscard]] std::span<const uint8_t> backend_blob(Backend b) const noexcept;

  // Format: magic "MYRK", version 1, kind, access, address, length, region id, blob count, then
  // (backend, length, bytes) per blob; little-endian. Deserialisation rejects anything else.
  [[nodiscard]] std::vector<uint8_t> serialize() const;
  static Result<RemoteKey> deserialize(std::span<const uint8_t> bytes);

  // For Context implementations.
  RemoteKey(uint64_t address, uint64_t length, uint64_t region_id, Access access, MemoryKind kind)
      : address_(address), length_(length), region_id_(region_id), access_(access), kind_(kind) {}
  void add_backend_blob(Backend b, std::vector<uint8_t> blob);

 private:
  uint64_t address_ = 0;
  uint64_t length_ = 0;
  uint64_t region_id_ = 0;
  Access access_ = Access::kNone;
  MemoryKind kind_ = MemoryKind::kHost;
  std::vector<std::pair<Backend, std::vector<uint8_t>>> blobs_;
};

// The registration record shared by the Context's cache and the handles.
struct RegionState {
  void* data = nullptr;
  size_t size = 0;
  Access access = Access::kNone;
  MemoryKind kind = MemoryKind::kHost;
  uint64_t id = 0;
  bool owned_allocation = false;  // allocated by Context::allocate(); freed with the registration
  bool valid = true;              // false once deregistered: operations on it fail
  std::vector<std::unique_ptr<BackendRegistration>> registrations;
  std::shared_ptr<void> allocation;  // keeps Context::allocate()'s memory alive
  [[nodiscard]] BackendRegistration* registration(Backend b) const noexcept {
    for (const auto& r : registrations) {
      if (r->backend() == b) return r.get();
    }
    return nullptr;
  }
};

class MemoryRegion {
 public:
  MemoryRegion() = default;
  explicit MemoryRegion(std::shared_ptr<RegionState> state) : state_(std::move(state)) {}

  [[nodiscard]] bool valid() const noexcept { return state_ && state_->valid; }
  [[nodiscard]] void* data() const noexcept { return state_ ? state_->data : nullptr; }
  [[nodiscard]] size_t size() const noexcept { return state_ ? state_->size : 0; }
  [[nodiscard]] Access access() const noexcept { return state_ ? state_->access : Access::kNone; }
  [[nodiscard]] MemoryKind kind() const noexcept {
    return state_ ? state_->kind : MemoryKind::kHost;
  }
  [[nodiscard]] uint64_t id() const noexcept { return state_ ? state_->id : 0; }
  // True when [ptr, ptr+len) lies inside the region.
  [[nodiscard]] bool contains(const void* ptr, size_t len) const noexcept {
    if (!state_) return false;
    const auto base = reinterpret_cast<uintptr_t>(state_->data);
    const auto p = reinterpret_cast<uintptr_t>(ptr);
    return p >= base && len <= state_->size && p - base <= state_->size - len;
  }
  [[nodiscard]] RemoteKey remote_key() const;
  [[nodiscard]] BackendRegistration* registration(Backend b) const noexcept {
    return state_ ? state_->registration(b) : nullptr;
  }
  [[nodiscard]] const std::shared_ptr<RegionState>& state() const noexcept { return state_; }

 private:
  std::shared_ptr<RegionState> state_;
};

}  // namespace myelin::transport
