// myelin/core/file.hpp
//
// Reading small configuration-like files (a TOML configuration, a job secret) without trusting
// what the path names: only a regular file is read, and at most a bounded number of bytes, so a
// directory, a device (/dev/zero), a FIFO or a huge file gives an error instead of an empty
// result, an endless read or a hang.
//
// Thread safety: free function, no shared state. Blocking: reads a local file; opening never
// waits for a FIFO's writer (O_NONBLOCK).
#pragma once

#include <cstddef>
#include <string>

#include <myelin/core/status.hpp>

namespace myelin {

// The whole of `path`, which must be a regular file of at most `max_bytes` bytes. `what` names
// the file in errors ("config", "secret file"). Errors: not_found (missing), invalid_argument
// ("is a directory", "is not a regular file", larger than `max_bytes`), io_error (open or read
// failed otherwise).
Result<std::string> read_regular_file(const std::string& path, size_t max_bytes,
                                      std::string_view what);

}  // namespace myelin
