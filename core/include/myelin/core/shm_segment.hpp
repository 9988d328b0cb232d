// myelin/core/shm_segment.hpp
//
// Shared-memory segments, the versioned header every ring lays over a region, and detection of
// peers that died.
//
// ShmSegment: a MAP_SHARED mapping of a memfd (anonymous, shared by fork or by passing the fd) or
// of a named POSIX object (/dev/shm/<name>, opened by name from any process). The first page holds
// a versioned SegmentHeader; the caller's bytes start at data(), page-aligned. Nothing inside
// holds a pointer: rings placed in data() address everything by offset, so each process may map
// the segment at a different address.
//
//   auto seg = ShmSegment::create_named("myelin-job7-rank3", 1 << 20);      // process A
//   auto ring = RecordRing::format(seg->data(), RecordRing::bytes_for(1 << 16), 1 << 16);
//   auto seg = ShmSegment::open_named("myelin-job7-rank3");                 // process B
//   auto ring = RecordRing::attach(seg->data(), seg->data_size());
//
// Peer death: each process joins the segment under a role ("producer", "consumer", ...), which
// records its pid and its start time (so a recycled pid is not mistaken for the peer). A survivor
// calls check_peers() -- typically as a Waiter's liveness check -- and gets
// peer_failed("producer pid 4242 is gone") once a peer's process has exited (a zombie counts as
// gone) without leaving. Leaving (leave() or the destructor) removes the entry: a peer that left
// cleanly is not reported.
//
// Stale segments: a named segment outlives a creator that crashed. remove_stale() unlinks the
// named myelin segments under a prefix whose creator and joined processes are all gone; foreign
// files are never touched.
//
// Thread safety: a ShmSegment is move-only; its const methods may be called from any thread.
// join()/leave() are for the owning thread. The shared bytes are synchronised by their users.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/status.hpp>

namespace myelin {

// ---- processes --------------------------------------------------------------------------------

// A process as the kernel knows it: pid plus start time (clock ticks after boot, field 22 of
// /proc/<pid>/stat), which tells a live peer from a new process that reused its pid.
struct ProcessIdentity {
  int32_t pid = 0;
  uint64_t start_time = 0;
};
ProcessIdentity current_process_identity();
// False when the process has exited, is a zombie, or its pid now belongs to another process
// (start_time differs; 0 skips that comparison).
bool process_is_alive(int32_t pid, uint64_t start_time) noexcept;

// ---- the header of a ring laid over memory ------------------------------------------------------

enum class RingKind : uint32_t { kSpsc = 1, kMpsc = 2, kRecord = 3, kDuplex = 4 };
std::string_view ring_kind_name(RingKind kind) noexcept;

inline constexpr uint64_t kRingMagic = 0x474e49524e4c594dULL;  // "MYLNRING" little-endian
inline constexpr uint32_t kRingLayoutVersion = 1;
inline constexpr uint32_t kRingReady = 0x52454459;  // "YDER"

// The first cache line of every ring region. Written once by format(), validated by attach().
struct alignas(kCacheLine) RingLayoutHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t kind;                // RingKind
  uint64_t element_size;        // bytes of one element (record ring: 1)
  uint64_t capacity;            // elements (record ring: data bytes); a power of two
  uint64_t total_bytes;         // header + slots, as bytes_for(capacity) computed it
  uint64_t layout_check;        // hash of the ring's field offsets, slot size and alignment
  std::atomic<uint32_t> ready;  // kRingReady once every other field is written (release)
  uint32_t reserved;
};
static_assert(sizeof(RingLayoutHeader) == kCacheLine);
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "rings in shared memory need address-free atomics");

// FNV-1a over a list of numbers: rings feed it offsetof/sizeof/alignof of their layout, so two
// builds that would place a field differently refuse each other's regions.
constexpr uint64_t layout_hash(std::initializer_list<uint64_t> values) noexcept {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (uint64_t v : values) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xff;
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

// How a ring that owns its memory (create()) allocates it, and where its positions start.
struct RingOptions {
  MemoryOptions memory;           // e.g. placement_for_consumer(consumer_cpu)
  uint64_t initial_position = 0;  // first position; tests start near 2^64 to cross the wrap
};

// What a ring expects to find in a region it attaches to.
struct RingLayoutSpec {
  RingKind kind;
  uint64_t element_size;
  uint64_t layout_check;
  uint64_t header_bytes;  // bytes before the slots
  uint64_t slot_bytes;    // bytes per unit of capacity
  uint64_t min_capacity;
};

// Checks a region before a ring is laid over it by format(): non-null, aligned to
// kFalseSharingRange (128),
// capacity a power of two >= spec.min_capacity, and large enough. Returns the bytes needed.
Result<uint64_t> check_ring_region(const void* region, std::size_t bytes, uint64_t capacity,
                                   const RingLayoutSpec& spec);
// Writes the header fields (not `ready`) for a ring of `capacity`.
void write_ring_header(RingLayoutHeader* header, uint64_t capacity, const RingLayoutSpec& spec);
// Publishes a formatted ring: attach() refuses the region until then.
inline void publish_ring_header(RingLayoutHeader* header) noexcept {
  // Pairs with the acquire load in validate_ring_header(): every field and slot written by
  // format() is visible to the attaching process.
  header->ready.store(kRingReady, std::memory_order_release);
}
// Validates a foreign header (magic, version, kind, element size, layout check, capacity, size)
// and returns the capacity. Errors say what differs, e.g. "region holds a record ring, not an
// spsc ring", "element size 16 != 8", "layout check mismatch (built by another myelin?)".
Result<uint64_t> validate_ring_header(const void* region, std::size_t bytes,
                                      const RingLayoutSpec& spec);

// ---- segments ----------------------------------------------------------------------------------

inline constexpr uint64_t kSegmentMagic = 0x314d48534e4c594dULL;  // "MYLNSHM1"
inline constexpr uint32_t kSegmentVersion = 1;
inline constexpr std::size_t kSegmentMaxPeers = 16;
inline constexpr std::size_t kSegmentDataOffset = 4096;

// One process that joined a segment. 64 bytes.
struct SegmentPeer {
  std::atomic<uint32_t> state;  // 0 free, 1 being written, 2 joined
  int32_t pid;
  uint64_t start_time;
  char role[48];  // NUL-terminated
};
static_assert(sizeof(SegmentPeer) == 64);

struct SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t header_bytes;  // sizeof(SegmentHeader)
  uint64_t total_bytes;   // size of the whole object
  uint64_t data_offset;   // kSegmentDataOffset
  uint64_t data_bytes;
  uint64_t layout_check;
  std::atomic<uint32_t> ready;  // kRingReady once the header is complete (release)
  int32_t creator_pid;
  uint64_t creator_start_time;
  SegmentPeer peers[kSegmentMaxPeers];
};
static_assert(sizeof(SegmentHeader) <= kSegmentDataOffset);
static_assert(offsetof(SegmentHeader, peers) == 64);

struct SegmentOptions {
  int numa_node = kAnyNumaNode;  // bind the pages to this node (placement_for_consumer())
  bool unlink_on_close = true;   // the creator of a named segment unlinks it when destroyed
};

class ShmSegment {
 public:
  // An anonymous segment (memfd). `name` only labels it in /proc/<pid>/fd.
  static Result<ShmSegment> create_memfd(std::string_view name, std::size_t data_bytes,
                                         const SegmentOptions& options = {});
  // A named segment; already_exists when the name is taken (see remove_stale()). Names are
  // "[/]<chars>" without further '/', at most 200 characters.
  static Result<ShmSegment> create_named(std::string_view name, std::size_t data_bytes,
                                         const SegmentOptions& options = {});
  static Result<ShmSegment> open_named(std::string_view name);
  // Maps the segment behind `fd` (a memfd inherited or received); the fd is duplicated.
  static Result<ShmSegment> open_fd(int fd);
  // Validates a segment header in `bytes` of mapped memory (the checks open_*() apply).
  static Status validate(const void* mapping, std::size_t bytes);
  // Unlinks the named myelin segments whose names start with `prefix` and whose creator and
  // joined processes are all gone. Returns how many were removed.
  static Result<std::size_t> remove_stale(std::string_view prefix = "myelin");

  ShmSegment() noexcept = default;
  ShmSegment(ShmSegment&& other) noexcept;
  ShmSegment& operator=(ShmSegment&& other) noexcept;
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;
  ~ShmSegment();

  [[nodiscard]] std::byte* data() const noexcept { return base_ + kSegmentDataOffset; }
  [[nodiscard]] std::size_t data_size() const noexcept { return header()->data_bytes; }
  [[nodiscard]] int fd() const noexcept { return fd_; }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] bool is_creator() const noexcept { return creator_; }
  [[nodiscard]] SegmentHeader* header() const noexcept {
    return reinterpret_cast<SegmentHeader*>(base_);
  }

  // Records this process as a peer under `role` (at most 47 characters). One role per
  // ShmSegment object. Errors: failed_precondition when already joined, resource_exhausted
  // when kSegmentMaxPeers live processes have joined.
  Status join(std::string_view role);
  // Removes this process's entry; done by the destructor too.
  void leave() noexcept;
  // peer_failed("<role> pid N is gone") for the first joined process, other than this object's
  // own entry, that died without leaving.
  [[nodiscard]] Status check_peers() const;

 private:
  static Result<ShmSegment> map_fd(int fd, std::string name, bool creator, std::size_t data_bytes,
                                   const SegmentOptions& options);
  void reset() noexcept;

  std::byte* base_ = nullptr;
  std::size_t mapped_ = 0;
  int fd_ = -1;
  std::string name_;  // "/name" for named segments, empty for memfd
  bool creator_ = false;
  bool unlink_on_close_ = false;
  int own_peer_ = -1;  // index in header()->peers, or -1
};

}  // namespace myelin
