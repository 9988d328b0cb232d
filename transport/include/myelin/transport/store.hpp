// myelin/transport/store.hpp
//
// Store: the bootstrap key-value store ranks use to exchange addresses and keys before they have
// connections. Keys are strings, values bytes; set() publishes, get() waits (with a deadline) until
// a key exists. Implementations:
//   - TcpStoreServer + TcpStore: a store served over TCP by rank 0, the broker or a standalone
//     process; clients connect with timeout, exponential backoff and jitter.
//   - FileStore: one file per key in a directory on a shared filesystem (atomic rename).
//
// Thread safety: a Store object may be used from several threads (calls are serialised inside).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin::transport {

class Store {
 public:
  virtual ~Store() = default;
  virtual Status set(std::string_view key, std::span<const uint8_t> value) = 0;
  // Waits until the key exists or the deadline passes (timeout naming the key).
  virtual Result<std::vector<uint8_t>> get(std::string_view key, Deadline deadline) = 0;
  // Atomically adds delta to an integer counter (created at 0) and returns the new value.
  virtual Result<int64_t> add(std::string_view key, int64_t delta) = 0;
  // True when the key exists now; never waits.
  virtual Result<bool> contains(std::string_view key) = 0;

  Status set(std::string_view key, std::string_view value) {
    return set(key, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(value.data()),
                                             value.size()));
  }
};

}  // namespace myelin::transport
