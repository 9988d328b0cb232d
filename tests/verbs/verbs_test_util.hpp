// tests/verbs/verbs_test_util.hpp — helpers shared by the verbs tests: backends driven directly
// through the internal BackendContext interface, progress pumping with deadlines, regions.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/transport/memory.hpp>
#include <myelin/transport/options.hpp>
#include <myelin/transport/request.hpp>

#include "backend.hpp"
#include "verbs/verbs_backend.hpp"

namespace myelin::transport::verbs_test {

using internal::BackendContext;

inline Result<std::unique_ptr<BackendContext>> make_backend(const std::string& name,
                                                            Options options = {}) {
  if (options.device.empty()) {
    if (const char* d = std::getenv("MYELIN_DEVICE")) options.device = d;
  }
  return internal::create_verbs_backend(options, {name, "node-" + name});
}

// Pumps both backends until `done()` or the deadline; returns whether done() became true.
template <typename Done>
bool pump(BackendContext& a, BackendContext* b, Done done, Deadline deadline) {
  while (!done()) {
    if (deadline.expired()) return false;
    a.progress();
    if (b) b->progress();
  }
  return true;
}

inline Status wait_request(const Request& r, BackendContext& a, BackendContext* b,
                           std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  if (!pump(
          a, b, [&] { return r.done(); }, Deadline::after(timeout))) {
    return timeout_error("request not done after ", timeout.count(), " ms");
  }
  return r.status();
}

// A registered buffer: the RegionState a Context would keep, and the RemoteKey peers use.
struct Registered {
  std::vector<uint8_t> bytes;
  std::shared_ptr<RegionState> state;
  MemoryRegion region;
  RemoteKey key;
};

inline Result<std::unique_ptr<Registered>> register_buffer(
    BackendContext& b, size_t size, uint64_t id, Access access = Access::kRemoteReadWrite) {
  auto r = std::make_unique<Registered>();
  r->bytes.assign(size, 0);
  r->state = std::make_shared<RegionState>();
  r->state->data = r->bytes.data();
  r->state->size = size;
  r->state->access = access;
  r->state->id = id;
  MYELIN_ASSIGN_OR_RETURN(auto reg, b.register_memory(*r->state));
  std::vector<uint8_t> blob = reg->remote_key_blob();
  r->state->registrations.push_back(std::move(reg));
  r->region = MemoryRegion(r->state);
  r->key =
      RemoteKey(reinterpret_cast<uintptr_t>(r->bytes.data()), size, id, access, MemoryKind::kHost);
  r->key.add_backend_blob(Backend::kVerbs, std::move(blob));
  return r;
}

inline std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 8));
  return v;
}

}  // namespace myelin::transport::verbs_test
