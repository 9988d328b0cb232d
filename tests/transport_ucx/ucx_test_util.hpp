// Helpers shared by the UCX backend tests: UCX_TLS selection, a connected pair of backends, and
// waits that drive progress on both sides with a deadline.
#pragma once

#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/transport/endpoint.hpp>
#include <myelin/transport/request.hpp>

#include "backend.hpp"
#include "ucx/ucx_backend.hpp"

namespace myelin::transport::ucx_test {

using internal::BackendContext;

// The UCX transport sets the tests run under; each names what UCX needs on this machine.
struct TlsSetting {
  const char* tls;
  const char* net_devices;  // nullptr: leave UCX_NET_DEVICES alone
};
inline const TlsSetting kTlsSettings[] = {{"tcp,self", "lo"}, {"posix,cma,self", nullptr}};

inline std::string tls_test_name(const testing::TestParamInfo<TlsSetting>& info) {
  std::string name = info.param.tls;
  for (char& c : name) {
    if (c == ',') c = '_';
  }
  return name;
}

// Sets the UCX environment for the contexts created afterwards (UCX reads it at ucp_init).
inline void apply_tls(const TlsSetting& s) {
  setenv("UCX_TLS", s.tls, 1);
  if (s.net_devices != nullptr) {
    setenv("UCX_NET_DEVICES", s.net_devices, 1);
  } else {
    unsetenv("UCX_NET_DEVICES");
  }
}

inline Options test_options(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  Options o;
  o.backend = Backend::kUcx;
  o.timeout = timeout;
  return o;
}

// Pipes between a forked test child and its parent: one length-prefixed blob (an address).
inline bool write_blob(int fd, const std::vector<uint8_t>& bytes) {
  const uint32_t n = static_cast<uint32_t>(bytes.size());
  return write(fd, &n, sizeof n) == sizeof n &&
         write(fd, bytes.data(), n) == static_cast<ssize_t>(n);
}

// Reads exactly `n` bytes; waits at most `ms` for them (0: only what is there now).
inline bool read_exact(int fd, void* p, size_t n, int ms) {
  auto* b = static_cast<uint8_t*>(p);
  const Deadline deadline = Deadline::after_ms(ms);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, deadline.remaining_ms_for_poll()) != 1) return false;
    const ssize_t got = read(fd, b, n);
    if (got <= 0) return false;
    b += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

// Reads one length-prefixed blob (at most 1 MiB); waits at most `ms` for each part of it.
inline bool read_blob(int fd, std::vector<uint8_t>& out, int ms) {
  uint32_t n = 0;
  if (!read_exact(fd, &n, sizeof n, ms) || n > (1u << 20)) return false;
  out.resize(n);
  return read_exact(fd, out.data(), n, ms);
}

// In a forked child: a UCX backend named "child" (5 s timeout), addresses traded with the parent
// over the pipes, an endpoint connected back to it. Exits the child with 2, 3 or 4 when a step
// fails (the parent's test reports the exit code).
struct ChildLink {
  std::unique_ptr<BackendContext> backend;
  std::unique_ptr<Endpoint> ep;
};
inline ChildLink connect_child_to_parent(int to_parent, int from_parent) {
  auto backend = internal::create_ucx_backend(test_options(std::chrono::seconds(5)),
                                              internal::ContextInfo{"child", "test-node"});
  if (!backend.ok() || !write_blob(to_parent, (*backend)->local_address())) _exit(2);
  std::vector<uint8_t> parent_address;
  if (!read_blob(from_parent, parent_address, 20'000)) _exit(3);
  auto ep = (*backend)->connect(parent_address, "parent", Deadline::after_ms(5000));
  if (!ep.ok()) _exit(4);
  return {std::move(backend).value(), std::move(ep).value()};
}

// Creates a backend or skips the test when UCX cannot open the transports asked for.
inline std::unique_ptr<BackendContext> open_backend(const Options& options,
                                                    const std::string& name) {
  auto r = internal::create_ucx_backend(options, internal::ContextInfo{name, "test-node"});
  if (!r.ok()) {
    ADD_FAILURE() << "create_ucx_backend(" << name << ") with UCX_TLS=" << std::getenv("UCX_TLS")
                  << ": " << r.status();
    return nullptr;
  }
  return std::move(r).value();
}

// Drives progress on every backend until the request is done or the deadline passes.
inline Status drive(const Request& r, std::initializer_list<BackendContext*> backends,
                    Deadline deadline = Deadline::after(std::chrono::seconds(20))) {
  while (!r.done()) {
    if (deadline.expired()) return timeout_error("request not done before the test deadline");
    for (BackendContext* b : backends) b->progress();
  }
  return r.status();
}

}  // namespace myelin::transport::ucx_test
