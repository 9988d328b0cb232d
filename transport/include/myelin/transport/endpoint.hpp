// myelin/transport/endpoint.hpp
//
// Endpoint: a connection to one peer, made by Context::connect(). Every backend implements it.
//
// Two-sided messages: send(channel, ...) is matched by the peer's recv(channel, ...) on the same
// channel, in order: messages on one endpoint and channel arrive in the order they were sent; there
// is no ordering between channels. A message that arrives before its recv is posted waits (eager
// sizes are buffered; larger ones wait for the recv and then move zero-copy). A recv whose buffer
// is smaller than the message completes with out_of_range and the message is consumed. Sizes 0 ..
// Options::max_message_size. Passing the MemoryRegion that holds the buffer lets backends skip
// registration and bounce buffers (zero-copy); without it they copy or register.
//
// One-sided: put()/get() move bytes between a local buffer and a peer's registered region named
// by its RemoteKey, at an offset. Out-of-bounds, wrong access or stale keys complete with an error
// (the endpoint stays usable where the backend allows it; on verbs such an error kills the QP and
// so the endpoint). put() may carry a 32-bit immediate that the target reads, in order, with
// try_pop_immediate() once the data is in place.
//
// Failure: when the peer dies or the connection breaks, every pending and later operation
// completes with peer_failed naming the peer, within the Context's timeout; status() reports it.
//
// Thread safety: none; an Endpoint belongs to its Context's progress thread.
// Ownership: the Context owns its endpoints; buffers must stay alive until their Request is done.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <myelin/core/status.hpp>
#include <myelin/transport/memory.hpp>
#include <myelin/transport/options.hpp>
#include <myelin/transport/request.hpp>

namespace myelin::transport {

class Endpoint {
 public:
  Endpoint() = default;
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  virtual ~Endpoint() = default;

  [[nodiscard]] virtual Backend backend() const noexcept = 0;
  // The peer's name as its Context reported it ("rank 5", "pid 123@node2").
  [[nodiscard]] virtual const std::string& peer_name() const noexcept = 0;
  // OK while the connection is healthy; afterwards the error that ended it.
  [[nodiscard]] virtual Status status() const = 0;

  virtual Request send(uint32_t channel, const void* data, size_t size,
                       const MemoryRegion* region = nullptr) = 0;
  virtual Request recv(uint32_t channel, void* data, size_t capacity,
                       const MemoryRegion* region = nullptr) = 0;

  virtual Request put(const void* local, size_t size, const RemoteKey& remote,
                      uint64_t remote_offset, const MemoryRegion* local_region = nullptr) = 0;
  virtual Request put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                                     uint64_t remote_offset, uint32_t immediate,
                                     const MemoryRegion* local_region = nullptr) = 0;
  virtual Request get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
                      const MemoryRegion* local_region = nullptr) = 0;
  // Immediates of puts from this peer whose data has landed, in arrival order.
  [[nodiscard]] virtual bool try_pop_immediate(uint32_t& value) = 0;
};

}  // namespace myelin::transport
