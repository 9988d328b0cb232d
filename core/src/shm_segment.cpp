// Shared-memory segments, ring header validation and process liveness.
#include <myelin/core/shm_segment.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

namespace myelin {
namespace {

// Fields of /proc/<pid>/stat after the command name, which may itself contain spaces and ')'.
struct ProcStat {
  char state = '?';
  uint64_t start_time = 0;
};

// false when the process does not exist (ENOENT); errors other than that leave `known` false.
bool read_proc_stat(int32_t pid, ProcStat& out, bool& known) noexcept {
  known = false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    known = (errno == ENOENT || errno == ESRCH);
    return false;
  }
  char buf[1024];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) {
    known = (n == 0 || errno == ESRCH);  // the process went away between open and read
    return false;
  }
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr || p[1] != ' ') return false;
  p += 2;
  out.state = *p;
  // After ") ": field 3 is the state; starttime is field 22, i.e. 19 fields further.
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p, ' ');
    if (p == nullptr) return false;
    ++p;
  }
  out.start_time = std::strtoull(p, nullptr, 10);
  known = true;
  return true;
}

std::string normalise_shm_name(std::string_view name) {
  std::string out;
  if (name.empty() || name[0] != '/') out.push_back('/');
  out.append(name);
  return out;
}

Status check_shm_name(std::string_view name) {
  const std::string_view bare = (!name.empty() && name[0] == '/') ? name.substr(1) : name;
  if (bare.empty() || bare.size() > 200 || bare.find('/') != std::string_view::npos ||
      bare == "." || bare == "..") {
    return invalid_argument("shared-memory name '", name,
                            "' must be 1..200 characters without '/' after the first");
  }
  return ok_status();
}

std::size_t page_size() noexcept {
  return static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

constexpr uint64_t segment_layout_check() noexcept {
  return layout_hash({sizeof(SegmentHeader), offsetof(SegmentHeader, total_bytes),
                      offsetof(SegmentHeader, data_bytes), offsetof(SegmentHeader, ready),
                      offsetof(SegmentHeader, creator_start_time), offsetof(SegmentHeader, peers),
                      sizeof(SegmentPeer), offsetof(SegmentPeer, start_time),
                      offsetof(SegmentPeer, role), kSegmentMaxPeers, kSegmentDataOffset});
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

// ---- processes --------------------------------------------------------------------------------

ProcessIdentity current_process_identity() {
  ProcessIdentity id;
  id.pid = static_cast<int32_t>(getpid());
  ProcStat st;
  bool known = false;
  if (read_proc_stat(id.pid, st, known)) id.start_time = st.start_time;
  return id;
}

bool process_is_alive(int32_t pid, uint64_t start_time) noexcept {
  if (pid <= 0) return false;
  ProcStat st;
  bool known = false;
  if (read_proc_stat(pid, st, known)) {
    if (st.state == 'Z' || st.state == 'X') return false;  // exited, not yet reaped
    return start_time == 0 || st.start_time == start_time;
  }
  if (known) return false;
  // No usable /proc: existence is all we can learn.
  return kill(pid, 0) == 0 || errno == EPERM;
}

// ---- ring headers ------------------------------------------------------------------------------

std::string_view ring_kind_name(RingKind kind) noexcept {
  switch (kind) {
    case RingKind::kSpsc:
      return "spsc ring";
    case RingKind::kMpsc:
      return "mpsc ring";
    case RingKind::kRecord:
      return "record ring";
    case RingKind::kDuplex:
      return "duplex ring";
  }
  return "unknown ring";
}

Result<uint64_t> check_ring_region(const void* region, std::size_t bytes, uint64_t capacity,
                                   const RingLayoutSpec& spec) {
  if (region == nullptr) return invalid_argument("ring region is null");
  if (reinterpret_cast<uintptr_t>(region) % kFalseSharingRange != 0) {
    return invalid_argument("ring region is not aligned to ", kFalseSharingRange, " bytes");
  }
  if (!is_power_of_two(capacity) || capacity < spec.min_capacity) {
    return invalid_argument(ring_kind_name(spec.kind), " capacity ", capacity,
                            " must be a power of two >= ", spec.min_capacity);
  }
  if (capacity > (uint64_t{1} << 40)) {
    return invalid_argument(ring_kind_name(spec.kind), " capacity ", capacity, " is too large");
  }
  const uint64_t need = spec.header_bytes + capacity * spec.slot_bytes;
  if (bytes < need) {
    return invalid_argument(ring_kind_name(spec.kind), " of capacity ", capacity, " needs ", need,
                            " bytes, region has ", bytes);
  }
  return need;
}

void write_ring_header(RingLayoutHeader* h, uint64_t capacity, const RingLayoutSpec& spec) {
  h->magic = kRingMagic;
  h->version = kRingLayoutVersion;
  h->kind = static_cast<uint32_t>(spec.kind);
  h->element_size = spec.element_size;
  h->capacity = capacity;
  h->total_bytes = spec.header_bytes + capacity * spec.slot_bytes;
  h->layout_check = spec.layout_check;
  h->reserved = 0;
}

Result<uint64_t> validate_ring_header(const void* region, std::size_t bytes,
                                      const RingLayoutSpec& spec) {
  const std::string_view want = ring_kind_name(spec.kind);
  if (region == nullptr) return invalid_argument("ring region is null");
  if (reinterpret_cast<uintptr_t>(region) % kFalseSharingRange != 0) {
    return invalid_argument("ring region is not aligned to ", kFalseSharingRange, " bytes");
  }
  if (bytes < spec.header_bytes) {
    return invalid_argument("region of ", bytes, " bytes is smaller than an ", want, " header (",
                            spec.header_bytes, ")");
  }
  const auto* h = static_cast<const RingLayoutHeader*>(region);
  if (h->magic != kRingMagic) {
    return invalid_argument("region does not hold a myelin ring: magic ", hex(h->magic),
                            ", expected ", hex(kRingMagic));
  }
  if (h->version != kRingLayoutVersion) {
    return unsupported("ring layout version ", h->version, ", this build reads version ",
                       kRingLayoutVersion);
  }
  if (h->kind != static_cast<uint32_t>(spec.kind)) {
    return invalid_argument("region holds a ", ring_kind_name(static_cast<RingKind>(h->kind)),
                            ", not an ", want);
  }
  // Pairs with publish_ring_header(): the fields below were written before it.
  if (h->ready.load(std::memory_order_acquire) != kRingReady) {
    return unavailable(want, " is not initialised yet (format() has not finished)");
  }
  if (h->element_size != spec.element_size) {
    return invalid_argument(want, " element size ", h->element_size, " != ", spec.element_size,
                            " expected by this side");
  }
  if (h->layout_check != spec.layout_check) {
    return unsupported(want, " layout check ", hex(h->layout_check), " != ", hex(spec.layout_check),
                       " (built by an incompatible myelin?)");
  }
  const uint64_t cap = h->capacity;
  if (!is_power_of_two(cap) || cap < spec.min_capacity || cap > (uint64_t{1} << 40)) {
    return invalid_argument(want, " header has invalid capacity ", cap);
  }
  const uint64_t need = spec.header_bytes + cap * spec.slot_bytes;
  if (h->total_bytes != need) {
    return invalid_argument(want, " header says ", h->total_bytes, " bytes, capacity ", cap,
                            " implies ", need);
  }
  if (bytes < need) {
    return invalid_argument(want, " needs ", need, " bytes, region has ", bytes);
  }
  return cap;
}

// ---- segments ----------------------------------------------------------------------------------

Status ShmSegment::validate(const void* mapping, std::size_t bytes) {
  if (mapping == nullptr) return invalid_argument("segment mapping is null");
  if (bytes < kSegmentDataOffset) {
    return invalid_argument("segment of ", bytes, " bytes is smaller than its header page (",
                            kSegmentDataOffset, ")");
  }
  const auto* h = static_cast<const SegmentHeader*>(mapping);
  if (h->magic != kSegmentMagic) {
    return invalid_argument("not a myelin shared-memory segment: magic ", hex(h->magic),
                            ", expected ", hex(kSegmentMagic));
  }
  if (h->version != kSegmentVersion) {
    return unsupported("segment version ", h->version, ", this build reads version ",
                       kSegmentVersion);
  }
  // Pairs with the release store at the end of map_fd() in the creator.
  if (h->ready.load(std::memory_order_acquire) != kRingReady) {
    return unavailable("segment is still being initialised by pid ", h->creator_pid);
  }
  if (h->header_bytes != sizeof(SegmentHeader) || h->layout_check != segment_layout_check()) {
    return unsupported("segment header layout differs (header ", h->header_bytes, " bytes, check ",
                       hex(h->layout_check), "; built by an incompatible myelin?)");
  }
  if (h->data_offset != kSegmentDataOffset || h->total_bytes != bytes ||
      h->data_bytes > bytes - kSegmentDataOffset) {
    return invalid_argument("segment header sizes are inconsistent: total ", h->total_bytes,
                            " (object has ", bytes, "), data ", h->data_bytes, " at offset ",
                            h->data_offset);
  }
  return ok_status();
}

Result<ShmSegment> ShmSegment::map_fd(int fd, std::string name, bool creator,
                                      std::size_t data_bytes, const SegmentOptions& options) {
  ShmSegment seg;
  seg.fd_ = fd;  // owned from here on: reset() closes it on every error path
  seg.name_ = std::move(name);
  seg.creator_ = creator;
  seg.unlink_on_close_ = creator && options.unlink_on_close && !seg.name_.empty();
  std::size_t total = 0;
  if (creator) {
    total = kSegmentDataOffset + align_up(data_bytes, page_size());
    if (ftruncate(fd, static_cast<off_t>(total)) != 0) {
      return errno_status("sizing shared-memory segment to " + std::to_string(total) + " bytes",
                          errno, StatusCode::kResourceExhausted);
    }
  } else {
    struct stat st;
    if (fstat(fd, &st) != 0) return errno_status("fstat of shared-memory segment", errno);
    total = static_cast<std::size_t>(st.st_size);
    if (total < kSegmentDataOffset) {
      return invalid_argument("not a myelin shared-memory segment: ", total,
                              " bytes is smaller than the header page");
    }
  }
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return errno_status("mmap of shared-memory segment", errno);
  seg.base_ = static_cast<std::byte*>(p);
  seg.mapped_ = total;
  if (!creator) {
    MYELIN_RETURN_IF_ERROR(validate(p, total));
    return seg;
  }
  if (options.numa_node != kAnyNumaNode) {
    MYELIN_RETURN_IF_ERROR(bind_memory_to_node(p, total, options.numa_node));
  }
  SegmentHeader* h = seg.header();
  h->magic = kSegmentMagic;
  h->version = kSegmentVersion;
  h->header_bytes = sizeof(SegmentHeader);
  h->total_bytes = total;
  h->data_offset = kSegmentDataOffset;
  h->data_bytes = data_bytes;
  h->layout_check = segment_layout_check();
  const ProcessIdentity me = current_process_identity();
  h->creator_pid = me.pid;
  h->creator_start_time = me.start_time;
  // Pairs with the acquire load in validate().
  h->ready.store(kRingReady, std::memory_order_release);
  return seg;
}

Result<ShmSegment> ShmSegment::create_memfd(std::string_view name, std::size_t data_bytes,
                                            const SegmentOptions& options) {
  if (data_bytes == 0) return invalid_argument("shared-memory segment of zero bytes");
  const std::string label(name.empty() ? "myelin" : name);
  const int fd = memfd_create(label.c_str(), MFD_CLOEXEC);
  if (fd < 0) return errno_status("memfd_create(" + label + ")", errno);
  return map_fd(fd, std::string(), true, data_bytes, options);
}

Result<ShmSegment> ShmSegment::create_named(std::string_view name, std::size_t data_bytes,
                                            const SegmentOptions& options) {
  MYELIN_RETURN_IF_ERROR(check_shm_name(name));
  if (data_bytes == 0) return invalid_argument("shared-memory segment of zero bytes");
  std::string path = normalise_shm_name(name);
  const int fd = shm_open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      return already_exists("shared-memory segment ", path,
                            " exists (a live job, or stale: see ShmSegment::remove_stale())");
    }
    return errno_status("shm_open(" + path + ")", errno);
  }
  auto seg = map_fd(fd, path, true, data_bytes, options);
  if (!seg.ok()) shm_unlink(path.c_str());
  return seg;
}

Result<ShmSegment> ShmSegment::open_named(std::string_view name) {
  MYELIN_RETURN_IF_ERROR(check_shm_name(name));
  std::string path = normalise_shm_name(name);
  const int fd = shm_open(path.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) {
    if (errno == ENOENT) return not_found("shared-memory segment ", path, " does not exist");
    return errno_status("shm_open(" + path + ")", errno);
  }
  return std::move(map_fd(fd, path, false, 0, {})).with_context("opening " + path);
}

Result<ShmSegment> ShmSegment::open_fd(int fd) {
  const int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return errno_status("dup of segment fd " + std::to_string(fd), errno);
  return map_fd(dup, std::string(), false, 0, {});
}

ShmSegment::ShmSegment(ShmSegment&& o) noexcept
    : base_(std::exchange(o.base_, nullptr)),
      mapped_(std::exchange(o.mapped_, 0)),
      fd_(std::exchange(o.fd_, -1)),
      name_(std::move(o.name_)),
      creator_(std::exchange(o.creator_, false)),
      unlink_on_close_(std::exchange(o.unlink_on_close_, false)),
      own_peer_(std::exchange(o.own_peer_, -1)) {}

ShmSegment& ShmSegment::operator=(ShmSegment&& o) noexcept {
  if (this != &o) {
    reset();
    base_ = std::exchange(o.base_, nullptr);
    mapped_ = std::exchange(o.mapped_, 0);
    fd_ = std::exchange(o.fd_, -1);
    name_ = std::move(o.name_);
    creator_ = std::exchange(o.creator_, false);
    unlink_on_close_ = std::exchange(o.unlink_on_close_, false);
    own_peer_ = std::exchange(o.own_peer_, -1);
  }
  return *this;
}

ShmSegment::~ShmSegment() {
  reset();
}

void ShmSegment::reset() noexcept {
  leave();
  if (base_ != nullptr) munmap(base_, mapped_);
  if (fd_ >= 0) close(fd_);
  if (unlink_on_close_) shm_unlink(name_.c_str());
  base_ = nullptr;
  mapped_ = 0;
  fd_ = -1;
  unlink_on_close_ = false;
}

Status ShmSegment::join(std::string_view role) {
  if (base_ == nullptr) return failed_precondition("join on an empty segment");
  if (own_peer_ >= 0) return failed_precondition("this segment handle already joined");
  if (role.empty() || role.size() >= sizeof(SegmentPeer::role)) {
    return invalid_argument("role '", role, "' must be 1..", sizeof(SegmentPeer::role) - 1,
                            " characters");
  }
  const ProcessIdentity me = current_process_identity();
  SegmentHeader* h = header();
  // Two passes: a free entry first; only when all are taken, the entry of a process that died.
  for (int pass = 0; pass < 2; ++pass) {
    for (std::size_t i = 0; i < kSegmentMaxPeers; ++i) {
      SegmentPeer& p = h->peers[i];
      uint32_t expected = 0;
      if (pass == 1) {
        // Pairs with the release store that joined the entry: pid/start_time are complete.
        if (p.state.load(std::memory_order_acquire) != 2 || process_is_alive(p.pid, p.start_time)) {
          continue;
        }
        expected = 2;
      }
      // acq_rel: takes the entry exclusively; pairs with other joiners' CAS on the same entry.
      if (!p.state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) continue;
      p.pid = me.pid;
      p.start_time = me.start_time;
      std::memset(p.role, 0, sizeof(p.role));
      std::memcpy(p.role, role.data(), role.size());
      // Pairs with the acquire loads in check_peers() and remove_stale().
      p.state.store(2, std::memory_order_release);
      own_peer_ = static_cast<int>(i);
      return ok_status();
    }
  }
  return resource_exhausted("segment already has ", kSegmentMaxPeers, " live peers");
}

void ShmSegment::leave() noexcept {
  if (base_ == nullptr || own_peer_ < 0) return;
  // Pairs with the acquire loads in check_peers(): a peer that left is no longer watched.
  header()->peers[own_peer_].state.store(0, std::memory_order_release);
  own_peer_ = -1;
}

Status ShmSegment::check_peers() const {
  if (base_ == nullptr) return failed_precondition("check_peers on an empty segment");
  const SegmentHeader* h = header();
  for (std::size_t i = 0; i < kSegmentMaxPeers; ++i) {
    if (static_cast<int>(i) == own_peer_) continue;
    const SegmentPeer& p = h->peers[i];
    // Pairs with the release store in join().
    if (p.state.load(std::memory_order_acquire) != 2) continue;
    const int32_t pid = p.pid;
    const uint64_t start = p.start_time;
    char role[sizeof(p.role)];
    std::memcpy(role, p.role, sizeof(role));
    role[sizeof(role) - 1] = '\0';
    if (!process_is_alive(pid, start)) {
      return peer_failed(role, " pid ", pid, " is gone (it exited without leaving the segment)");
    }
  }
  return ok_status();
}

Result<std::size_t> ShmSegment::remove_stale(std::string_view prefix) {
  if (!prefix.empty() && prefix[0] == '/') prefix.remove_prefix(1);
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return errno_status("opendir(/dev/shm)", errno);
  std::size_t removed = 0;
  while (dirent* e = readdir(dir)) {
    const std::string_view entry(e->d_name);
    if (entry == "." || entry == ".." || entry.substr(0, prefix.size()) != prefix) continue;
    const std::string path = "/" + std::string(entry);
    const int fd = shm_open(path.c_str(), O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) continue;
    struct stat st;
    void* p = MAP_FAILED;
    if (fstat(fd, &st) == 0 && static_cast<std::size_t>(st.st_size) >= kSegmentDataOffset) {
      p = mmap(nullptr, kSegmentDataOffset, PROT_READ, MAP_SHARED, fd, 0);
    }
    close(fd);
    if (p == MAP_FAILED) continue;
    const auto* h = static_cast<const SegmentHeader*>(p);
    bool stale =
        h->magic == kSegmentMagic && !process_is_alive(h->creator_pid, h->creator_start_time);
    for (std::size_t i = 0; stale && i < kSegmentMaxPeers; ++i) {
      // Pairs with the release store in join(); an entry being written (1) counts as alive.
      const uint32_t state = h->peers[i].state.load(std::memory_order_acquire);
      if (state == 1 || (state == 2 && process_is_alive(h->peers[i].pid, h->peers[i].start_time))) {
        stale = false;
      }
    }
    munmap(p, kSegmentDataOffset);
    if (stale && shm_unlink(path.c_str()) == 0) ++removed;
  }
  closedir(dir);
  return removed;
}

}  // namespace myelin
