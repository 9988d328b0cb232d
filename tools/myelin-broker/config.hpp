// myelin-broker configuration: a TOML file (every key optional, unknown keys are errors) that
// command-line flags override. See docs/broker.md for the full list.
#pragma once

#include <string>

#include <myelin/broker/server.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker::tool {

// The largest configuration file read (a regular file; anything else is refused).
inline constexpr size_t kMaxConfigFileBytes = size_t{1} << 20;

// Reads `path` into `opts` (keys present in the file replace the defaults). Integer keys outside
// their ranges (server.hpp's bounds) are errors naming the key; Server::create() checks the
// options as a whole (duplicate ACL identities or topic patterns, nic with numa_node).
Status load_config_file(const std::string& path, ServerOptions* opts);

}  // namespace myelin::broker::tool
