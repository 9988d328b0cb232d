// The shm backend's wire formats and Unix-socket helpers.
#include "shm/shm_wire.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace myelin::transport::internal::shm {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

namespace {
template <typename T>
void put_le(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));  // x86-64 and AArch64 are little-endian
}
template <typename T>
T get_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
constexpr size_t kAddressFixed = 4 + 2 + 2 + 4 + 4 + 8;
constexpr size_t kMaxSocketName = sizeof(sockaddr_un::sun_path) - 1;

Result<sockaddr_un> abstract_sockaddr(const std::string& name, socklen_t& len) {
  if (name.empty() || name.size() > kMaxSocketName) {
    return invalid_argument("shm socket name of ", name.size(), " bytes (1..", kMaxSocketName,
                            " allowed)");
  }
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  sa.sun_path[0] = '\0';
  std::memcpy(sa.sun_path + 1, name.data(), name.size());
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return sa;
}
}  // namespace

std::vector<uint8_t> encode_address(const ShmAddress& a) {
  std::vector<uint8_t> out;
  out.reserve(kAddressFixed + a.socket_name.size());
  put_le<uint32_t>(out, kAddressMagic);
  put_le<uint16_t>(out, kWireVersion);
  put_le<uint16_t>(out, static_cast<uint16_t>(a.socket_name.size()));
  put_le<int32_t>(out, a.pid);
  put_le<uint32_t>(out, a.uid);
  put_le<uint64_t>(out, a.start_time);
  out.insert(out.end(), a.socket_name.begin(), a.socket_name.end());
  return out;
}

Result<ShmAddress> decode_address(std::span<const uint8_t> bytes) {
  if (bytes.size() < kAddressFixed) {
    return invalid_argument("shm address of ", bytes.size(), " bytes is shorter than its ",
                            kAddressFixed, "-byte header");
  }
  const uint8_t* p = bytes.data();
  if (get_le<uint32_t>(p) != kAddressMagic) return invalid_argument("not an shm address (magic)");
  if (const auto v = get_le<uint16_t>(p + 4); v != kWireVersion) {
    return invalid_argument("shm address version ", v, " (this build speaks ", kWireVersion, ")");
  }
  const size_t name_len = get_le<uint16_t>(p + 6);
  if (name_len == 0 || name_len > kMaxSocketName || bytes.size() != kAddressFixed + name_len) {
    return invalid_argument("shm address: socket name length ", name_len, " does not match ",
                            bytes.size(), " bytes");
  }
  ShmAddress a;
  a.pid = get_le<int32_t>(p + 8);
  a.uid = get_le<uint32_t>(p + 12);
  a.start_time = get_le<uint64_t>(p + 16);
  a.socket_name.assign(reinterpret_cast<const char*>(p + kAddressFixed), name_len);
  if (a.pid <= 0) return invalid_argument("shm address: pid ", a.pid);
  return a;
}

Status send_ctl(int sock, const CtlHeader& header_in, std::span<const uint8_t> text,
                std::span<const int> fds, Deadline deadline) {
  if (text.size() > kMaxCtlText || fds.size() > kMaxCtlFds) {
    return internal_error("shm control message too large: ", text.size(), " bytes, ", fds.size(),
                          " fds");
  }
  CtlHeader header = header_in;
  header.text_len = static_cast<uint32_t>(text.size());
  iovec iov[2] = {{&header, sizeof(header)}, {const_cast<uint8_t*>(text.data()), text.size()}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxCtlFds)] = {};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = text.empty() ? 1 : 2;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cm), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return ok_status();
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      const int err = errno;
      return errno_status(
          "sendmsg on the shm control socket", err,
          err == EPIPE || err == ECONNRESET ? StatusCode::kPeerFailed : StatusCode::kIoError);
    }
    if (deadline.expired())
      return timeout_error("shm control socket stayed full until the deadline");
    pollfd p{sock, POLLOUT, 0};
    (void)::poll(
        &p, 1,
        std::min(deadline.remaining_ms_for_poll() < 0 ? 100 : deadline.remaining_ms_for_poll(),
                 100));
  }
}

Result<RecvOutcome> recv_ctl(int sock, CtlMessage& out) {
  out.text.assign(kMaxCtlText, 0);
  out.fds.clear();
  iovec iov[2] = {{&out.header, sizeof(out.header)}, {out.text.data(), out.text.size()}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxCtlFds)] = {};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = ::recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return RecvOutcome::kEmpty;
    if (errno == ECONNRESET) return RecvOutcome::kClosed;
    return errno_status("recvmsg on the shm control socket", errno);
  }
  // Take ownership of every fd first, so that an invalid message does not leak them.
  for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
      const size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
        out.fds.emplace_back(fd);
      }
    }
  }
  if (n == 0) return RecvOutcome::kClosed;
  if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) {
    return protocol_error("shm control message truncated (", n, " bytes)");
  }
  if (static_cast<size_t>(n) < sizeof(CtlHeader) || out.header.magic != kCtlMagic) {
    return protocol_error("shm control message of ", n, " bytes without the myelin header");
  }
  if (out.header.version != kWireVersion) {
    return protocol_error("shm control message version ", out.header.version,
                          " (this build speaks ", kWireVersion, ")");
  }
  if (out.header.text_len != static_cast<size_t>(n) - sizeof(CtlHeader)) {
    return protocol_error("shm control message: text length ", out.header.text_len, " but ",
                          static_cast<size_t>(n) - sizeof(CtlHeader), " bytes follow the header");
  }
  out.text.resize(out.header.text_len);
  return RecvOutcome::kMessage;
}

Result<UniqueFd> listen_abstract(const std::string& name) {
  socklen_t len = 0;
  MYELIN_ASSIGN_OR_RETURN(sockaddr_un sa, abstract_sockaddr(name, len));
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return errno_status("socket(AF_UNIX, SOCK_SEQPACKET)", errno);
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&sa), len) != 0) {
    return errno_status("bind of the shm socket @" + name, errno,
                        errno == EADDRINUSE ? StatusCode::kAlreadyExists : StatusCode::kIoError);
  }
  if (::listen(fd.get(), 128) != 0) return errno_status("listen on the shm socket", errno);
  return fd;
}

Result<UniqueFd> connect_abstract(const std::string& name, Deadline deadline) {
  socklen_t len = 0;
  MYELIN_ASSIGN_OR_RETURN(sockaddr_un sa, abstract_sockaddr(name, len));
  for (;;) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) return errno_status("socket(AF_UNIX, SOCK_SEQPACKET)", errno);
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&sa), len) == 0) return fd;
    const int err = errno;
    // A full backlog answers EAGAIN on a non-blocking Unix socket: the listener is alive but
    // slow, so retry until the deadline.
    if (err != EAGAIN && err != EINTR) {
      return errno_status(
          "connecting to the shm socket @" + name, err,
          err == ECONNREFUSED || err == ENOENT ? StatusCode::kUnavailable : StatusCode::kIoError);
    }
    if (deadline.expired()) {
      return timeout_error("the shm socket @", name, " kept its backlog full until the deadline");
    }
    // A bounded poll: a non-blocking AF_UNIX connect that met a full backlog leaves nothing in
    // progress, so there is no fd to wait on. Connection setup only, never a data path; the
    // pause is capped by the deadline.
    const int64_t pause_ns = std::min<int64_t>(200'000, deadline.remaining_ns());
    ::usleep(static_cast<useconds_t>((pause_ns + 999) / 1000));
  }
}

Result<KeyBlob> decode_key_blob(std::span<const uint8_t> bytes) {
  KeyBlob blob;
  if (bytes.size() != sizeof(KeyBlob)) {
    return invalid_argument("shm key blob of ", bytes.size(), " bytes (expected ", sizeof(KeyBlob),
                            ")");
  }
  std::memcpy(&blob, bytes.data(), sizeof(blob));
  if (blob.magic != kKeyBlobMagic || blob.version != kWireVersion) {
    return invalid_argument("shm key blob with a foreign magic or version ", blob.version);
  }
  if (blob.slot >= kKeySlots || blob.token == 0) {
    return invalid_argument("shm key blob names slot ", blob.slot, " token ", blob.token);
  }
  return blob;
}

}  // namespace myelin::transport::internal::shm
