// Helpers shared by the UCX backend tests: UCX_TLS selection, a connected pair of backends, and
// waits that drive progress on both sides with a deadline.
#pragma once

#include <gtest/gtest.h>

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
