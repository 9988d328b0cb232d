// transport/src/address.hpp — the Context address format (not public API).
//
//   magic "MYAD" | version u8 (1) | name_len u16 | name | node_len u16 | node id | count u8 |
//   count x (backend u8 | len u32 | backend bytes)          all integers little-endian
//
// The node id is transport::local_node_id() (myelin/transport/node.hpp): equal exactly for
// contexts on the same running kernel and in the same network namespace, which is what shared
// memory needs. parse_address() rejects anything that is not exactly this.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <myelin/core/status.hpp>
#include <myelin/transport/options.hpp>

namespace myelin::transport::internal {

inline constexpr uint8_t kAddressVersion = 1;
inline constexpr size_t kMaxAddressName = 1024;
inline constexpr size_t kMaxAddressEntry = 64 * 1024;

struct ParsedAddress {
  std::string name;
  std::string node_id;
  std::vector<std::pair<Backend, std::vector<uint8_t>>> entries;

  [[nodiscard]] const std::vector<uint8_t>* entry(Backend b) const noexcept {
    for (const auto& [backend, bytes] : entries) {
      if (backend == b) return &bytes;
    }
    return nullptr;
  }
};

std::vector<uint8_t> encode_address(const ParsedAddress& address);
Result<ParsedAddress> parse_address(std::span<const uint8_t> bytes);

}  // namespace myelin::transport::internal
