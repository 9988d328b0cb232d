// myelin/broker/secret.hpp
//
// The job secret file, read the same way by the broker daemon and by every tool that connects
// to it (`--secret-file`): a regular file of at most kMaxSecretFileBytes whose first line is the
// secret. The line ending (`\n` or `\r\n`) is not part of it; empty lines may follow, anything
// else after the first line is an error (a file holding two secrets, or a secret with a line
// break, would otherwise authenticate differently on each side). The secret must hold at least
// kMinSecretBytes bytes.
//
// Thread safety: free functions, no shared state.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <myelin/core/status.hpp>

namespace myelin::broker {

inline constexpr size_t kMinSecretBytes = 16;
inline constexpr size_t kMaxSecretFileBytes = 4096;

// The secret in a secret file's text (`path` only names it in errors). Errors: invalid_argument
// for a non-empty line after the first, or a secret shorter than kMinSecretBytes.
Result<std::string> parse_secret_text(std::string_view text, std::string_view path);

// The secret in the file at `path`. Errors: not_found (missing), invalid_argument (a directory,
// not a regular file, larger than kMaxSecretFileBytes, or the errors of parse_secret_text),
// io_error.
Result<std::string> read_secret_file(const std::string& path);

}  // namespace myelin::broker
