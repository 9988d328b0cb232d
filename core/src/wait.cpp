// The sleeping half of Waiter: futex and eventfd calls. Kept out of line so the spin loop in the
// header stays small.
#include <myelin/core/wait.hpp>

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <ctime>

namespace myelin {
namespace {

timespec to_timespec(int64_t ns) noexcept {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
  return ts;
}

// The futex word is the atomic's object representation: std::atomic<uint32_t> is lock-free and
// has the size and alignment of uint32_t (checked in wait.hpp).
uint32_t* futex_word(std::atomic<uint32_t>& a) noexcept {
  return reinterpret_cast<uint32_t*>(&a);
}

}  // namespace

Result<EventFd> EventFd::create() {
  const int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return errno_status("eventfd", errno);
  return EventFd(fd);
}

EventFd& EventFd::operator=(EventFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

EventFd::~EventFd() {
  if (fd_ >= 0) close(fd_);
}

Result<EventFd> EventFd::duplicate() const {
  if (fd_ < 0) return failed_precondition("duplicate of an empty EventFd");
  const int fd = fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return errno_status("dup of eventfd", errno);
  return EventFd(fd);
}

void EventFd::signal() const noexcept {
  const uint64_t one = 1;
  // EAGAIN means the counter is saturated: a poller is woken anyway.
  [[maybe_unused]] const ssize_t n = write(fd_, &one, sizeof(one));
}

void EventFd::drain() const noexcept {
  uint64_t value;
  [[maybe_unused]] const ssize_t n = read(fd_, &value, sizeof(value));
}

Status Waiter::deadline_error() {
  return timeout_error("deadline passed while waiting for the ring");
}

void Waiter::wake() noexcept {
  // Pairs with the acquire load of `epoch` in announce_sleep(); futex_wait also compares it.
  word_->epoch.fetch_add(1, std::memory_order_release);
  if (options_.mode == WaitMode::kSpinThenEventFd && eventfd_.fd() >= 0) {
    eventfd_.signal();
  } else {
    syscall(SYS_futex, futex_word(word_->epoch), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  }
}

void Waiter::sleep_until(uint32_t epoch, int64_t until_ns, int64_t now_ns) noexcept {
  if (until_ns <= now_ns) return;
  const int64_t left = until_ns - now_ns;
  const timespec ts = to_timespec(left);
  if (options_.mode == WaitMode::kSpinThenEventFd && eventfd_.fd() >= 0) {
    // Relaxed: only a change matters here, the acquire in announce_sleep() orders the data.
    if (word_->epoch.load(std::memory_order_relaxed) != epoch) return;
    pollfd p{eventfd_.fd(), POLLIN, 0};
    if (ppoll(&p, 1, &ts, nullptr) > 0) eventfd_.drain();
    return;
  }
  // Returns at once (EAGAIN) when the epoch already moved on; EINTR and ETIMEDOUT just return to
  // the caller's loop, which re-checks the ring and the deadline.
  syscall(SYS_futex, futex_word(word_->epoch), FUTEX_WAIT, epoch, &ts, nullptr, 0);
}

}  // namespace myelin
