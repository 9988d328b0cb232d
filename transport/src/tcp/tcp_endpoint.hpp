// transport/src/tcp/tcp_endpoint.hpp — the Endpoint of the TCP backend: a handle on a Connection.
// Destroying it closes the connection and cancels what is pending on it.
#pragma once

#include <memory>
#include <string>

#include <myelin/transport/endpoint.hpp>

#include "tcp/tcp_backend.hpp"

namespace myelin::transport::internal::tcp {

class TcpEndpoint final : public Endpoint {
 public:
  TcpEndpoint(TcpBackend& backend, std::shared_ptr<Connection> conn, std::string peer_name);
  ~TcpEndpoint() override;

  [[nodiscard]] Backend backend() const noexcept override { return Backend::kTcp; }
  [[nodiscard]] const std::string& peer_name() const noexcept override { return peer_name_; }
  [[nodiscard]] Status status() const override { return conn_->status(); }

  Request send(uint32_t channel, const void* data, size_t size,
               const MemoryRegion* region) override;
  Request recv(uint32_t channel, void* data, size_t capacity, const MemoryRegion* region) override;
  Request put(const void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
              const MemoryRegion* local_region) override;
  Request put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                             uint64_t remote_offset, uint32_t immediate,
                             const MemoryRegion* local_region) override;
  Request get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
              const MemoryRegion* local_region) override;
  bool try_pop_immediate(uint32_t& value) override { return conn_->try_pop_immediate(value); }

 private:
  TcpBackend& backend_;
  std::shared_ptr<Connection> conn_;
  std::string peer_name_;
};

}  // namespace myelin::transport::internal::tcp
