// TCP Endpoint: forwards to its Connection. Registered regions need no special handling: TCP
// reads and writes user memory directly whether or not it is registered.
#include "tcp/tcp_endpoint.hpp"

namespace myelin::transport::internal::tcp {

TcpEndpoint::TcpEndpoint(TcpBackend& backend, std::shared_ptr<Connection> conn,
                         std::string peer_name)
    : backend_(backend), conn_(std::move(conn)), peer_name_(std::move(peer_name)) {}

TcpEndpoint::~TcpEndpoint() {
  conn_->fail(cancelled("endpoint to ", peer_name_, " disconnected"), false);
  backend_.release(*conn_);
}

Request TcpEndpoint::send(uint32_t channel, const void* data, size_t size, const MemoryRegion*) {
  return conn_->send(channel, data, size);
}

Request TcpEndpoint::recv(uint32_t channel, void* data, size_t capacity, const MemoryRegion*) {
  return conn_->recv(channel, data, capacity);
}

Request TcpEndpoint::put(const void* local, size_t size, const RemoteKey& remote,
                         uint64_t remote_offset, const MemoryRegion*) {
  return conn_->put(local, size, remote, remote_offset, false, 0);
}

Request TcpEndpoint::put_with_immediate(const void* local, size_t size, const RemoteKey& remote,
                                        uint64_t remote_offset, uint32_t immediate,
                                        const MemoryRegion*) {
  return conn_->put(local, size, remote, remote_offset, true, immediate);
}

Request TcpEndpoint::get(void* local, size_t size, const RemoteKey& remote, uint64_t remote_offset,
                         const MemoryRegion*) {
  return conn_->get(local, size, remote, remote_offset);
}

}  // namespace myelin::transport::internal::tcp
