// Context address encoding and strict parsing.
#include "address.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>

#include <myelin/core/log.hpp>
#include <myelin/transport/node.hpp>

#include "wire.hpp"

namespace myelin::transport::internal {

namespace {
constexpr uint8_t kMagic[4] = {'M', 'Y', 'A', 'D'};
}

std::vector<uint8_t> encode_address(const ParsedAddress& address) {
  std::vector<uint8_t> out;
  WireWriter w(out);
  w.bytes(std::span<const uint8_t>(kMagic));
  w.u8(kAddressVersion);
  w.u16(static_cast<uint16_t>(address.name.size()));
  w.bytes(address.name);
  w.u16(static_cast<uint16_t>(address.node_id.size()));
  w.bytes(address.node_id);
  w.u8(static_cast<uint8_t>(address.entries.size()));
  for (const auto& [backend, bytes] : address.entries) {
    w.u8(static_cast<uint8_t>(backend));
    w.u32(static_cast<uint32_t>(bytes.size()));
    w.bytes(bytes);
  }
  return out;
}

Result<ParsedAddress> parse_address(std::span<const uint8_t> bytes) {
  WireReader r(bytes);
  std::span<const uint8_t> magic;
  if (!r.bytes(4, magic) || std::memcmp(magic.data(), kMagic, 4) != 0) {
    return invalid_argument("peer address: bad magic (", bytes.size(), " bytes)");
  }
  uint8_t version = 0;
  if (!r.u8(version)) return invalid_argument("peer address: truncated before version");
  if (version != kAddressVersion) {
    return invalid_argument("peer address: unsupported version ", int{version}, " (expected ",
                            int{kAddressVersion}, ")");
  }
  ParsedAddress a;
  uint16_t name_len = 0, node_len = 0;
  if (!r.u16(name_len)) return invalid_argument("peer address: truncated name length");
  if (name_len > kMaxAddressName)
    return invalid_argument("peer address: name of ", name_len, " bytes");
  if (!r.string(name_len, a.name)) return invalid_argument("peer address: truncated name");
  if (!r.u16(node_len)) return invalid_argument("peer address: truncated node id length");
  if (node_len == 0 || node_len > kMaxAddressName) {
    return invalid_argument("peer address: node id of ", node_len, " bytes");
  }
  if (!r.string(node_len, a.node_id)) return invalid_argument("peer address: truncated node id");
  uint8_t count = 0;
  if (!r.u8(count)) return invalid_argument("peer address: truncated backend count");
  if (count == 0 || count > 4) return invalid_argument("peer address: ", int{count}, " backends");
  for (uint8_t i = 0; i < count; ++i) {
    uint8_t backend = 0;
    uint32_t len = 0;
    std::span<const uint8_t> entry;
    if (!r.u8(backend) || !r.u32(len)) {
      return invalid_argument("peer address: truncated entry ", int{i});
    }
    if (backend == 0 || backend > static_cast<uint8_t>(Backend::kVerbs)) {
      return invalid_argument("peer address: unknown backend ", int{backend});
    }
    if (len == 0 || len > kMaxAddressEntry) {
      return invalid_argument("peer address: ", backend_name(static_cast<Backend>(backend)),
                              " entry of ", len, " bytes");
    }
    if (!r.bytes(len, entry)) return invalid_argument("peer address: truncated entry ", int{i});
    if (a.entry(static_cast<Backend>(backend)) != nullptr) {
      return invalid_argument("peer address: duplicate ",
                              backend_name(static_cast<Backend>(backend)), " entry");
    }
    a.entries.emplace_back(static_cast<Backend>(backend),
                           std::vector<uint8_t>(entry.begin(), entry.end()));
  }
  if (!r.at_end()) return invalid_argument("peer address: ", r.remaining(), " trailing bytes");
  return a;
}

}  // namespace myelin::transport::internal

namespace myelin::transport {

std::string local_node_id() {
  // One warning per process, whichever thread first finds /proc lacking (relaxed: the flag orders
  // nothing else).
  static std::atomic<bool> warned{false};
  auto warn_once = [](const char* what) {
    if (!warned.exchange(true, std::memory_order_relaxed)) {
      MYELIN_LOG_WARN << "node identity: cannot read " << what
                      << "; that part of the node id is a fixed marker";
    }
  };
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "unknown-host");
  std::string boot;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  if (!(in >> boot) || boot.empty()) {
    warn_once("/proc/sys/kernel/random/boot_id");
    boot = "no-boot-id";
  }
  // The namespace file's inode (with its device) names the network namespace: equal for every
  // process inside it, different across namespaces of the same kernel.
  std::string netns;
  struct stat st {};
  if (::stat("/proc/self/ns/net", &st) == 0) {
    netns = std::to_string(static_cast<unsigned long long>(st.st_dev)) + ":" +
            std::to_string(static_cast<unsigned long long>(st.st_ino));
  } else {
    warn_once("/proc/self/ns/net");
    netns = "unknown";
  }
  return std::string(host) + "/" + boot + "/netns:" + netns;
}

}  // namespace myelin::transport
