#include <myelin/core/file.hpp>

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace myelin {

Result<std::string> read_regular_file(const std::string& path, size_t max_bytes,
                                      std::string_view what) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    const std::string where = std::string(what) + " '" + path + "'";
    if (err == ENOENT) return not_found(where, ": no such file");
    return errno_status("opening " + where, err);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) return errno_status("fstat of " + path, errno);
  if (S_ISDIR(st.st_mode)) return invalid_argument(what, " '", path, "' is a directory");
  if (!S_ISREG(st.st_mode)) return invalid_argument(what, " '", path, "' is not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return invalid_argument(what, " '", path, "' is ", static_cast<uint64_t>(st.st_size),
                            " bytes, more than the ", max_bytes, " it may hold");
  }
  std::string out;
  // One byte past the limit: a file that grew after fstat() is still refused.
  out.resize(max_bytes + 1);
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status("reading " + std::string(what) + " '" + path + "'", errno);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got > max_bytes) {
    return invalid_argument(what, " '", path, "' holds more than the ", max_bytes,
                            " bytes it may hold");
  }
  out.resize(got);
  return out;
}

}  // namespace myelin
