// myelin-broker configuration: a TOML file (every key optional, unknown keys are errors) that
// command-line flags override. See docs/broker.md for the full list.
#pragma once

#include <string>

#include <myelin/broker/server.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker::tool {

// Reads `path` into `opts` (keys present in the file replace the defaults).
Status load_config_file(const std::string& path, ServerOptions* opts);
// Reads the secret from a file (trailing newline stripped).
Result<std::string> read_secret_file(const std::string& path);

}  // namespace myelin::broker::tool
