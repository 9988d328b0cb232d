// myelin/core/duplex_ring.hpp
//
// DuplexRing<Forward, Backward>: two bounded lock-free single-producer/single-consumer rings, one
// per direction between two sides A and B, whose slots interleave so that slot i of the forward
// ring (A -> B) and slot i of the backward ring (B -> A) share one cache line.
//
//   auto ring = DuplexRing<Request, Reply>::create(64);
//   side A:  ring->forward().try_push(req);   ...  ring->backward().try_pop(reply);
//   side B:  ring->forward().try_pop(req);    ...  ring->backward().try_push(reply);
//
// Why. In a request/response exchange through two separate rings every cache line has one
// writer: B's reply lands in a line A is polling, so B's store first has to invalidate A's copy
// and A's read then transfers the line back; each request costs the same the other way. Here B
// writes its reply into the line it has just read the request from and still holds, and A writes
// its next request into the line it has just read the reply from (while both positions stay in
// one line): a read followed by a write of the same line, which costs about one transfer, as in
// a raw cache-line ping-pong (consistent with migratory sharing in the hardware). With 8-byte
// values a line holds two positions of each direction, so a strict request/response exchange pays
// the extra invalidation only when it moves to the next line, every positions_per_line() round
// trips. docs/rings.md gives the measurements.
//
// Each direction is exactly an SpscRing (same protocol, same contracts, see spsc_ring.hpp and
// internal/spsc_lane.hpp): try_push()/try_pop() and the _n forms, a full direction is
// back-pressure (false), the per-slot sequence number carries the hand-off, 64-bit positions
// are wrap-around safe. The two directions are independent: neither waits for the other, and
// their positions need not stay in step (they only share lines; traffic in one direction while
// the other is idle runs like an SpscRing whose slots are 2x apart).
//
// Two modes, one layout, as for every ring: create(capacity, {.memory = ...}) owns NUMA-placed
// memory; format(region, bytes, capacity) / attach(region, bytes) lay it over a caller's region,
// e.g. a ShmSegment shared by two processes; attach() validates the versioned header (kind
// kDuplex). Layout (offsets from the region start; nothing inside is a pointer):
//     0  RingLayoutHeader   magic, version, kind, cell size, capacity (per direction), check
//   128  forward head       side B's position in the forward ring (u64)
//   256  forward tail       side A's position, published lazily
//   384  backward head      side A's position in the backward ring
//   512  backward tail      side B's position, published lazily
//   640  WaitWord           side B sleeps here for forward data (A notifies)
//   768  WaitWord           side A sleeps here for backward data (B notifies)
//   896  cells[capacity]    {u64 seq; Forward value; u64 seq; Backward value}, sized to a power
//                           of two up to 64 bytes (or a multiple of 64), so a cell never
//                           straddles a line and, when both values are at most 24 bytes, the
//                           two slots of a position always share one.
//
// Thread safety: side A's thread calls forward().try_push*() and backward().try_pop*(); side B's
// thread calls forward().try_pop*() and backward().try_push*(). Within one process both threads
// may use one DuplexRing object (each side's private state is padded apart); across processes
// each side attaches its own. Queries (capacity(), size_approx(), ...) from anywhere.
// Blocking: nothing blocks; try_* return at once. To sleep instead of polling, run a Waiter
// (wait.hpp) over forward_wait_word() (side B) or backward_wait_word() (side A).
// Ownership: create() owns its memory; over a caller's region the ring only borrows it.
// Requirements: Forward and Backward are trivially copyable.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/internal/spsc_lane.hpp>
#include <myelin/core/shm_segment.hpp>
#include <myelin/core/status.hpp>
#include <myelin/core/wait.hpp>

namespace myelin {
namespace internal {

// A power of two up to one cache line, at least the slots' alignment, so cells pack a line
// without straddling two; larger cells start on a line.
template <typename F, typename B>
constexpr std::size_t duplex_cell_align() {
  using SF = PackedSequencedSlot<F>;
  using SB = PackedSequencedSlot<B>;
  const std::size_t slot_align = std::max(alignof(SF), alignof(SB));
  const std::size_t raw = align_up(align_up(sizeof(SF), alignof(SB)) + sizeof(SB), slot_align);
  const std::size_t a = raw >= kCacheLine ? kCacheLine : std::bit_ceil(raw);
  return std::max(a, slot_align);
}

template <typename F, typename B>
struct alignas(duplex_cell_align<F, B>()) DuplexCell {
  PackedSequencedSlot<F> forward;
  PackedSequencedSlot<B> backward;
};

// The lines before the cells; fields written by different sides are kFalseSharingRange apart.
struct alignas(kFalseSharingRange) DuplexShared {
  RingLayoutHeader layout;
  alignas(kFalseSharingRange) std::atomic<uint64_t> forward_head;   // side B
  alignas(kFalseSharingRange) std::atomic<uint64_t> forward_tail;   // side A, lazily
  alignas(kFalseSharingRange) std::atomic<uint64_t> backward_head;  // side A
  alignas(kFalseSharingRange) std::atomic<uint64_t> backward_tail;  // side B, lazily
  alignas(kFalseSharingRange) WaitWord forward_wait;                // side B waits
  alignas(kFalseSharingRange) WaitWord backward_wait;               // side A waits
};
static_assert(offsetof(DuplexShared, forward_head) == 128 &&
              offsetof(DuplexShared, forward_tail) == 256 &&
              offsetof(DuplexShared, backward_head) == 384 &&
              offsetof(DuplexShared, backward_tail) == 512 &&
              offsetof(DuplexShared, forward_wait) == 640 &&
              offsetof(DuplexShared, backward_wait) == 768 && sizeof(DuplexShared) == 896);

}  // namespace internal

template <typename Forward, typename Backward = Forward>
class DuplexRing : public internal::RingMemory<DuplexRing<Forward, Backward>> {
  static_assert(std::is_trivially_copyable_v<Forward> && std::is_trivially_copyable_v<Backward>,
                "ring elements are copied through shared memory");
  using Shared = internal::DuplexShared;
  using Cell = internal::DuplexCell<Forward, Backward>;
  using ForwardSlot = internal::PackedSequencedSlot<Forward>;
  using BackwardSlot = internal::PackedSequencedSlot<Backward>;
  static_assert(sizeof(Cell) < kCacheLine ? kCacheLine % sizeof(Cell) == 0
                                          : sizeof(Cell) % kCacheLine == 0,
                "a cell never straddles a cache line");

 public:
  // Side A pushes and side B pops forward values; side B pushes and side A pops backward ones.
  using ForwardLane = internal::SpscLane<Forward, ForwardSlot, sizeof(Cell)>;
  using BackwardLane = internal::SpscLane<Backward, BackwardSlot, sizeof(Cell)>;

  static constexpr RingLayoutSpec kSpec{
      RingKind::kDuplex,
      sizeof(Cell),
      layout_hash({static_cast<uint64_t>(RingKind::kDuplex), sizeof(Shared),
                   offsetof(Shared, forward_head), offsetof(Shared, forward_tail),
                   offsetof(Shared, backward_head), offsetof(Shared, backward_tail),
                   offsetof(Shared, forward_wait), offsetof(Shared, backward_wait),
                   sizeof(WaitWord), sizeof(Cell), alignof(Cell), offsetof(Cell, backward),
                   offsetof(ForwardSlot, value), offsetof(BackwardSlot, value), sizeof(Forward),
                   alignof(Forward), sizeof(Backward), alignof(Backward), kCacheLine}),
      sizeof(Shared),
      sizeof(Cell),
      1};

  // Bytes a region must have for `capacity` positions in each direction.
  static constexpr std::size_t bytes_for(std::size_t capacity) noexcept {
    return sizeof(Shared) + capacity * sizeof(Cell);
  }
  // How many positions of each direction one cache line holds (2 for 8-byte values, 1 up to 24).
  static constexpr std::size_t positions_per_line() noexcept {
    return sizeof(Cell) < kCacheLine ? kCacheLine / sizeof(Cell) : 1;
  }

  // Initialises a duplex ring in `region` (aligned to 128 bytes, >= bytes_for(capacity) bytes):
  // `capacity` (a power of two) positions per direction, both starting at initial_position. The
  // other side attaches only after this returned.
  static Result<DuplexRing> format(void* region, std::size_t bytes, std::size_t capacity,
                                   uint64_t initial_position = 0) {
    MYELIN_RETURN_IF_ERROR(check_ring_region(region, bytes, capacity, kSpec));
    auto* shared = new (region) Shared;
    write_ring_header(&shared->layout, capacity, kSpec);
    shared->forward_head.store(initial_position, std::memory_order_relaxed);
    shared->forward_tail.store(initial_position, std::memory_order_relaxed);
    shared->backward_head.store(initial_position, std::memory_order_relaxed);
    shared->backward_tail.store(initial_position, std::memory_order_relaxed);
    std::byte* cells = static_cast<std::byte*>(region) + sizeof(Shared);
    internal::format_lane_slots<ForwardSlot, sizeof(Cell)>(cells + offsetof(Cell, forward),
                                                           capacity, initial_position);
    internal::format_lane_slots<BackwardSlot, sizeof(Cell)>(cells + offsetof(Cell, backward),
                                                            capacity, initial_position);
    publish_ring_header(&shared->layout);  // release: orders all of the above before `ready`
    return DuplexRing(shared, capacity);
  }
  // Uses a duplex ring another process (or thread) formatted in `region`, after validating its
  // header.
  static Result<DuplexRing> attach(void* region, std::size_t bytes) {
    MYELIN_ASSIGN_OR_RETURN(uint64_t capacity, validate_ring_header(region, bytes, kSpec));
    return DuplexRing(std::launder(static_cast<Shared*>(region)), capacity);
  }

  DuplexRing(DuplexRing&&) noexcept = default;
  DuplexRing& operator=(DuplexRing&&) noexcept = default;
  DuplexRing(const DuplexRing&) = delete;
  DuplexRing& operator=(const DuplexRing&) = delete;

  // The A -> B ring: side A calls try_push*, side B try_pop*.
  [[nodiscard]] ForwardLane& forward() noexcept { return forward_; }
  [[nodiscard]] const ForwardLane& forward() const noexcept { return forward_; }
  // The B -> A ring: side B calls try_push*, side A try_pop*.
  [[nodiscard]] BackwardLane& backward() noexcept { return backward_; }
  [[nodiscard]] const BackwardLane& backward() const noexcept { return backward_; }

  // Positions per direction.
  [[nodiscard]] std::size_t capacity() const noexcept { return forward_.capacity(); }
  // Side B's wait word (it waits for forward data; side A notifies), and side A's.
  [[nodiscard]] WaitWord& forward_wait_word() const noexcept { return shared_->forward_wait; }
  [[nodiscard]] WaitWord& backward_wait_word() const noexcept { return shared_->backward_wait; }
  // The region's start (what was formatted or attached).
  [[nodiscard]] void* region() const noexcept { return shared_; }

 private:
  DuplexRing(Shared* shared, uint64_t capacity) noexcept
      : shared_(shared),
        forward_(cells(shared) + offsetof(Cell, forward), &shared->forward_head,
                 &shared->forward_tail, capacity),
        backward_(cells(shared) + offsetof(Cell, backward), &shared->backward_head,
                  &shared->backward_tail, capacity) {}
  static std::byte* cells(Shared* shared) noexcept {
    return reinterpret_cast<std::byte*>(shared) + sizeof(Shared);
  }

  Shared* shared_;
  ForwardLane forward_;
  BackwardLane backward_;
};

}  // namespace myelin
