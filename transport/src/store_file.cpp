// FileStore: one file per key, atomic publication by rename, counters under flock().
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <random>
#include <thread>

#include <myelin/transport/bootstrap.hpp>

namespace myelin::transport {

namespace {
Status write_file_atomically(const std::string& dir, const std::string& path,
                             std::span<const uint8_t> value) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  const std::string tmp = dir + "/.tmp." + std::to_string(getpid()) + "." + std::to_string(rng());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return errno_status("create " + tmp, errno);
  size_t done = 0;
  while (done < value.size()) {
    const ssize_t w = ::write(fd, value.data() + done, value.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return errno_status("write " + tmp, err);
    }
    done += static_cast<size_t>(w);
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return errno_status("close " + tmp, errno);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return errno_status("rename to " + path, err);
  }
  return ok_status();
}

// nullopt-like: NotFound when missing.
Result<std::vector<uint8_t>> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return not_found(path);
    return errno_status("open " + path, errno);
  }
  std::vector<uint8_t> out;
  uint8_t buf[65536];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      return errno_status("read " + path, err);
    }
    if (r == 0) break;
    out.insert(out.end(), buf, buf + r);
  }
  ::close(fd);
  return out;
}

Status check_key(std::string_view key) {
  if (key.empty() || key.size() > 1024) {
    return invalid_argument("store key of ", key.size(), " bytes (must be 1..1024)");
  }
  return ok_status();
}
}  // namespace

Result<std::unique_ptr<FileStore>> FileStore::open(const std::string& directory) {
  if (directory.empty()) return invalid_argument("FileStore: empty directory");
  if (::mkdir(directory.c_str(), 0755) != 0 && errno != EEXIST) {
    return errno_status("mkdir " + directory, errno);
  }
  struct stat st {};
  if (::stat(directory.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return invalid_argument("FileStore: '", directory, "' is not a directory");
  }
  return std::unique_ptr<FileStore>(new FileStore(directory));
}

// Keys may hold '/', so every byte outside [A-Za-z0-9._-] becomes %XX; the leading "k" keeps
// names clear of the ".tmp." prefix.
std::string FileStore::path_for(std::string_view key) const {
  static const char* hex = "0123456789ABCDEF";
  std::string name = "k";
  for (unsigned char c : key) {
    if (std::isalnum(c) || c == '.' || c == '_' || c == '-') {
      name += static_cast<char>(c);
    } else {
      name += '%';
      name += hex[c >> 4];
      name += hex[c & 15];
    }
  }
  return dir_ + "/" + name;
}

Status FileStore::set(std::string_view key, std::span<const uint8_t> value) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  return write_file_atomically(dir_, path_for(key), value);
}

Result<std::vector<uint8_t>> FileStore::get(std::string_view key, Deadline deadline) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  const std::string path = path_for(key);
  const int64_t start = monotonic_ns();
  int64_t backoff_us = 500;
  for (;;) {
    auto v = read_file(path);
    if (v.ok() || v.status().code() != StatusCode::kNotFound) return v;
    if (deadline.expired()) {
      return timeout_error("store key '", key, "' (", path, ") did not appear within ",
                           (monotonic_ns() - start) / 1'000'000, " ms");
    }
    const int64_t sleep_us = std::min(backoff_us, deadline.remaining_ns() / 1000 + 1);
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    backoff_us = std::min<int64_t>(backoff_us * 2, 100'000);
  }
}

Result<int64_t> FileStore::add(std::string_view key, int64_t delta) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  const std::string path = path_for(key);
  const std::string lock_path = dir_ + "/.lock." + path.substr(dir_.size() + 1);
  const int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock < 0) return errno_status("open " + lock_path, errno);
  while (::flock(lock, LOCK_EX) != 0) {
    if (errno != EINTR) {
      const int err = errno;
      ::close(lock);
      return errno_status("flock " + lock_path, err);
    }
  }
  int64_t cur = 0;
  auto v = read_file(path);
  Status s;
  if (v.ok()) {
    const char* b = reinterpret_cast<const char*>(v->data());
    auto [p, ec] = std::from_chars(b, b + v->size(), cur);
    if (v->empty() || ec != std::errc() || p != b + v->size()) {
      s = failed_precondition("store key '", key, "' does not hold a counter");
    }
  } else if (v.status().code() != StatusCode::kNotFound) {
    s = v.status();
  }
  int64_t next = 0;
  if (s.ok() && __builtin_add_overflow(cur, delta, &next)) {
    s = failed_precondition("store counter '", key, "' overflows");
  }
  if (s.ok()) {
    const std::string text = std::to_string(next);
    s = write_file_atomically(
        dir_, path,
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  }
  ::flock(lock, LOCK_UN);
  ::close(lock);
  if (!s.ok()) return s;
  return next;
}

Result<bool> FileStore::contains(std::string_view key) {
  MYELIN_RETURN_IF_ERROR(check_key(key));
  return ::access(path_for(key).c_str(), F_OK) == 0;
}

}  // namespace myelin::transport
