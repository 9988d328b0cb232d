// transport/src/backend.hpp — the interface every backend implements (not public API).
//
// A Context owns one BackendContext per open backend. Each backend lives in its own folder
// (src/tcp, src/shm, src/ucx, src/verbs) with the same file set:
//   <name>_backend.hpp/.cpp   BackendContext subclass + create_<name>_backend()
//   <name>_endpoint.hpp/.cpp  Endpoint subclass
//   (plus whatever else it needs: frames, rings, queue pairs...)
// and is listed in src/registry.cpp, guarded by MYELIN_HAVE_<NAME> when optional.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/endpoint.hpp>
#include <myelin/transport/memory.hpp>
#include <myelin/transport/options.hpp>

namespace myelin::transport::internal {

// What every backend of one Context shares.
struct ContextInfo {
  std::string name;     // "rank 3" or "pid 1234@host"
  std::string node_id;  // transport::local_node_id(): hostname, boot id, network namespace
};

class BackendContext {
 public:
  BackendContext() = default;
  BackendContext(const BackendContext&) = delete;
  BackendContext& operator=(const BackendContext&) = delete;
  virtual ~BackendContext() = default;

  [[nodiscard]] virtual Backend kind() const noexcept = 0;
  [[nodiscard]] virtual Limits limits() const noexcept = 0;
  // This backend's part of the Context address (listening socket, UCX worker address, ...).
  [[nodiscard]] virtual std::vector<uint8_t> local_address() const = 0;

  // Makes (or claims an accepted) connection to a peer given its part of the address. Both peers
  // call it; the first must not block waiting for the other's call (see context.hpp).
  virtual Result<std::unique_ptr<Endpoint>> connect(std::span<const uint8_t> peer_address,
                                                    const std::string& peer_name,
                                                    Deadline deadline) = 0;

  // Registers region.data/size with this backend.
  virtual Result<std::unique_ptr<BackendRegistration>> register_memory(
      const RegionState& region) = 0;
  // Memory that same-node peers can map (shm; ucx: UCX-allocated); unsupported elsewhere.
  virtual Result<std::shared_ptr<void>> allocate_shared(size_t /*size*/) {
    return unsupported("this backend does not allocate shared memory");
  }

  // Advances the backend without blocking; returns the number of events handled.
  virtual size_t progress() = 0;
  // For ProgressMode::kSpinThenBlock: an fd that turns readable when progress() has work, or -1
  // when the backend cannot block (the Context then keeps spinning).
  [[nodiscard]] virtual int wait_fd() const noexcept { return -1; }
  // Arms wait_fd() before sleeping; returns false when work is already pending (don't sleep).
  virtual bool arm_wait() { return true; }
  // For ProgressMode::kSpinThenBlock when this is the Context's only backend: sleeps inside the
  // backend's own receive (no separate wait on wait_fd(), one system call per wakeup fewer) for at
  // most max_ms > 0, handles what arrived, and stores the events handled in `handled`. Returns
  // false without sleeping when the backend cannot (several sockets to watch, output queued, a
  // timer due); the Context then sleeps on wait_fd(). May return earlier than max_ms with nothing
  // handled (a signal, a keepalive check).
  virtual bool progress_blocking(int /*max_ms*/, size_t& /*handled*/) { return false; }
  // For a busy wait when this is the Context's only backend: polls at most `polls` times and
  // stops at the first poll after which `request` is done; true when it is. The default calls
  // progress(); a backend may poll in a loop of its own (no virtual call per poll).
  virtual bool poll_until_done(const Request& request, uint32_t polls) {
    for (uint32_t i = 0; i < polls; ++i) {
      progress();
      if (request.done()) return true;
    }
    return false;
  }
};

using BackendFactoryFn = Result<std::unique_ptr<BackendContext>> (*)(const Options&,
                                                                     const ContextInfo&);

struct BackendFactory {
  Backend kind;
  BackendFactoryFn create;
};

// Backends compiled into this build, in auto-selection preference for remote peers
// (verbs, ucx, tcp) followed by shm.
std::span<const BackendFactory> compiled_backends() noexcept;

}  // namespace myelin::transport::internal
