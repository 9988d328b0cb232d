// myelin/transport/context.hpp
//
// Context: one per progress thread. Owns the backends it opened (devices, listening sockets, UCX
// workers, shared segments), the registration cache and the endpoints, and drives their progress.
//
//   MYELIN_ASSIGN_OR_RETURN(auto ctx, Context::create({.backend = Backend::kAuto}));
//   store.set("addr/" + std::to_string(rank), ctx->address());           // publish
//   MYELIN_ASSIGN_OR_RETURN(Endpoint* peer, ctx->connect(peer_address)); // lazily, when needed
//   Request r = peer->send(/*channel=*/0, buf, len);
//   MYELIN_RETURN_IF_ERROR(ctx->wait(r));
//
// Addresses: address() returns bytes that describe every backend this Context opened plus a node
// identity (so auto-selection knows whether a peer shares the node). connect() to such bytes picks
// the backend (options.backend, or per peer for kAuto: shm on the same node, else verbs > ucx >
// tcp) and logs the choice and why; choice_for() answers the same question without connecting.
//
// connect() is symmetric: both peers call it with each other's address to get their Endpoint; the
// first caller does not block on the other calling it (an incoming connection is accepted by the
// progress engine and kept until connect() claims it). Calling connect() again for the same peer
// returns the same Endpoint.
//
// Thread safety: none. Use a Context, its endpoints, requests and regions from one thread at a
// time (its progress thread). Several Contexts in one process are independent.
#pragma once

#include <chrono>
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
#include <myelin/transport/request.hpp>

namespace myelin::transport {

namespace internal {
class BackendContext;
}

// Which backend serves a peer, and why.
struct BackendChoice {
  Backend backend = Backend::kAuto;
  std::string reason;  // "same node (boot id and hostname match)", "verbs: rxe0 port 1 ACTIVE"...
};

class Context {
 public:
  // Opens the backends the options ask for. kAuto opens shm plus every network backend present.
  static Result<std::unique_ptr<Context>> create(const Options& options);

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ~Context();

  [[nodiscard]] const Options& options() const noexcept;
  // The mode waits run in: options().progress with kAuto resolved (resolve_progress_mode());
  // progress_reason() says which and why ("auto: yield (4 ranks on 2 CPUs: ...)").
  [[nodiscard]] ProgressMode progress_mode() const noexcept;
  [[nodiscard]] const std::string& progress_reason() const noexcept;
  // How many ranks drive progress on this rank's CPUs (Options::local_ranks; a collectives
  // Communicator calls this once it knows). Under kAuto the mode is resolved again (busy or
  // yield; a change is logged at info); other modes are left as requested. Call it between
  // waits, from the Context's thread.
  ProgressMode set_local_ranks(int local_ranks);
  // The backends this Context opened, in preference order.
  [[nodiscard]] std::vector<Backend> backends() const;
  // Limits of one backend (size classes); invalid_argument if it is not open.
  [[nodiscard]] Result<Limits> limits(Backend backend) const;

  // Bytes to give peers (through a Store or any channel); stable for the Context's lifetime.
  [[nodiscard]] const std::vector<uint8_t>& address() const noexcept;
  [[nodiscard]] Result<BackendChoice> choice_for(std::span<const uint8_t> peer_address) const;
  // The Endpoint for a peer; made on first use. Deadline defaults to now + options().timeout.
  Result<Endpoint*> connect(std::span<const uint8_t> peer_address);
  Result<Endpoint*> connect(std::span<const uint8_t> peer_address, Deadline deadline);
  // Tears an endpoint down; pending operations on it complete with cancelled.
  void disconnect(Endpoint* endpoint);

  // Registers caller memory with every open backend (a cache hit when already registered).
  Result<MemoryRegion> register_memory(void* data, size_t size,
                                       Access access = Access::kRemoteReadWrite,
                                       MemoryKind kind = MemoryKind::kHost);
  // Allocates registered memory on the Context's NUMA node, shareable with same-node peers.
  Result<MemoryRegion> allocate(size_t size, Access access = Access::kRemoteReadWrite);
  // Drops the registration: later operations with the region or its RemoteKey fail.
  void deregister(MemoryRegion& region);

  // Advances every backend once without blocking; returns the number of events handled.
  size_t progress();
  // Drives progress until the request is done or the deadline passes (timeout error naming the
  // wait); returns the request's status. Blocks or spins according to options().progress.
  Status wait(const Request& request);
  Status wait(const Request& request, Deadline deadline);
  // Waits for all; returns the first error (after every request is done or the deadline passed).
  Status wait_all(std::span<const Request> requests, Deadline deadline);

 private:
  struct Impl;
  explicit Context(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace myelin::transport
