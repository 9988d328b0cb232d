// myelin/core/record_ring.hpp
//
// RecordRing: a single-producer/single-consumer ring of variable-length records, written and read
// in place (zero copy). The producer claims space, writes the payload where it lies, and commits;
// the consumer is handed each record as a span into the ring.
//
//   RecordRing::Claim c;
//   if (ring.try_claim(n, c, /*type=*/7)) { fill(c.data, n); ring.commit(c); }   // producer
//   auto r = ring.consume([](const RecordRing::Record& rec) { use(rec.type, rec.data); });
//   if (!r.ok()) ...   // protocol_error: the peer corrupted a record header
//
// Same two modes as the other rings (create() owning NUMA-placed memory; format()/attach() over a
// caller's region, e.g. a ShmSegment), kind kRecord. Layout (nothing inside is a pointer):
//     0  RingLayoutHeader   magic, version, kind, element size 1, capacity (data bytes), check
//    64  salt               random u64 chosen by format(), read-only afterwards
//   128  head               consumer position in bytes
//   256  tail               producer position in bytes (published lazily: a hint, orders nothing)
//   384  WaitWord           consumer's sleep/wake word
//   512  data[capacity]     records, each aligned to 16 bytes:
//                           {u64 stamp; u32 length; u32 type; payload[length]; pad to 16}
// A record never wraps: when one does not fit before the end, the producer fills the rest with a
// padding record (type kPaddingType) and starts at offset 0. Positions are monotonically
// increasing 64-bit byte counters; offset = position & (capacity - 1).
//
// Protocol. The commit signal travels inside the record, as in SpscRing: the producer writes the
// header and payload, then stores stamp = salt ^ position (release); the consumer at position h
// polls the stamp at h (acquire) and reads the record when it equals salt ^ h. So the consumer
// touches only the line the next record arrives in, never a producer index line, and the producer
// writes no shared index per record. A stale stamp from an earlier lap (or payload bytes at that
// offset) cannot match: it would have to equal this position XOR a random salt.
//   Producer: a private claim position advances per claim; head is cached and reloaded (acquire)
// only when the cache says "full". commit(claim) stamps every uncommitted record up to and
// including `claim`, in order -- so a batch of claims is published by committing its last one.
// abort() of the latest uncommitted claim gives the space back; abort() of an earlier one turns it
// into padding the consumer skips.
//   Consumer: walks stamped records from head, then stores head (release) once per consume() call
// -- and every quarter ring within a long batch -- after which the producer may reuse the space.
//   The shared tail orders nothing. A commit of several records (a batch) stores it; single-record
// commits store it every kTailPublishInterval commits, and a producer that finds the ring full
// stores it. When consume() starts at a small record it reads the tail and prefetches the lines
// of the records committed up to it (at most 4 KiB): otherwise each record's line is requested
// only after the previous record was read, one transfer from the producer's cache at a time.
// Reading a stale tail costs nothing but a missed prefetch.
//
// Records from a peer are checked before the handler sees them: a length running past the data
// area or the ring's limit ends consume() with protocol_error.
//
// Thread safety: one producer thread (try_claim*, commit, abort, try_write), one consumer thread
// (consume); across processes each side attaches its own RecordRing object.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <span>
#include <utility>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/check.hpp>
#include <myelin/core/internal/spsc_lane.hpp>
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/shm_segment.hpp>
#include <myelin/core/status.hpp>
#include <myelin/core/wait.hpp>

namespace myelin {

class RecordRing : public internal::RingMemory<RecordRing> {
  struct alignas(kFalseSharingRange) Shared {
    RingLayoutHeader layout;
    uint64_t salt;                                           // read-only after format()
    alignas(kFalseSharingRange) std::atomic<uint64_t> head;  // consumer position (bytes)
    alignas(kFalseSharingRange) std::atomic<uint64_t> tail;  // producer position (lazy)
    alignas(kFalseSharingRange) WaitWord consumer_wait;
  };
  static_assert(offsetof(Shared, salt) == 64 && offsetof(Shared, head) == 128 &&
                offsetof(Shared, tail) == 256 && offsetof(Shared, consumer_wait) == 384 &&
                sizeof(Shared) == 512);
  struct RecordHeader {
    std::atomic<uint64_t> stamp;  // salt ^ position once committed
    uint32_t length;              // payload bytes
    uint32_t type;
  };
  static_assert(sizeof(RecordHeader) == 16 && std::atomic<uint64_t>::is_always_lock_free);

 public:
  static constexpr std::size_t kRecordHeaderBytes = sizeof(RecordHeader);
  static constexpr std::size_t kRecordAlignment = 16;
  static constexpr uint32_t kPaddingType = std::numeric_limits<uint32_t>::max();
  static constexpr std::size_t kMinCapacity = 64;
  static constexpr RingLayoutSpec kSpec{
      RingKind::kRecord,
      1,
      layout_hash({static_cast<uint64_t>(RingKind::kRecord), sizeof(Shared), offsetof(Shared, head),
                   offsetof(Shared, tail), offsetof(Shared, consumer_wait), sizeof(WaitWord),
                   sizeof(RecordHeader), offsetof(RecordHeader, type), kRecordAlignment,
                   kPaddingType, kCacheLine}),
      sizeof(Shared),
      1,
      kMinCapacity};

  // A claimed, not yet committed record: write `size` bytes at `data`.
  struct Claim {
    std::byte* data = nullptr;
    uint32_t size = 0;
    uint64_t begin = 0;  // position before the record (and before any wrap padding)
    uint64_t end = 0;    // position after the record
  };
  // A record handed to consume()'s handler; `data` is valid during the call only.
  struct Record {
    uint32_t type;
    std::span<const std::byte> data;
  };

  // Space one record of `payload` bytes takes in the ring.
  static constexpr std::size_t record_bytes(std::size_t payload) noexcept {
    return align_up(kRecordHeaderBytes + payload, kRecordAlignment);
  }
  // Bytes a region needs for `capacity` data bytes (a power of two >= 64).
  static constexpr std::size_t bytes_for(std::size_t capacity) noexcept {
    return sizeof(Shared) + capacity;
  }

  static Result<RecordRing> format(void* region, std::size_t bytes, std::size_t capacity,
                                   uint64_t initial_position = 0) {
    MYELIN_RETURN_IF_ERROR(check_ring_region(region, bytes, capacity, kSpec));
    if (initial_position % kRecordAlignment != 0) {
      return invalid_argument("record ring initial position ", initial_position,
                              " is not a multiple of ", kRecordAlignment);
    }
    auto* shared = new (region) Shared;
    write_ring_header(&shared->layout, capacity, kSpec);
    shared->salt = internal::random_salt();
    shared->head.store(initial_position, std::memory_order_relaxed);
    shared->tail.store(initial_position, std::memory_order_relaxed);
    std::memset(reinterpret_cast<std::byte*>(shared) + sizeof(Shared), 0, capacity);
    publish_ring_header(&shared->layout);  // release: orders the above before `ready`
    return RecordRing(shared, capacity);
  }
  static Result<RecordRing> attach(void* region, std::size_t bytes) {
    MYELIN_ASSIGN_OR_RETURN(uint64_t capacity, validate_ring_header(region, bytes, kSpec));
    auto* shared = std::launder(static_cast<Shared*>(region));
    // Acquire: pairs with the release stores of the other side.
    const uint64_t head = shared->head.load(std::memory_order_acquire);
    const uint64_t tail = shared->tail.load(std::memory_order_acquire);
    if (head % kRecordAlignment != 0 || tail % kRecordAlignment != 0 || tail - head > capacity) {
      return invalid_argument("record ring positions are inconsistent: head ", head, ", tail ",
                              tail, ", capacity ", capacity);
    }
    return RecordRing(shared, capacity);
  }

  RecordRing(RecordRing&&) noexcept = default;
  RecordRing& operator=(RecordRing&&) noexcept = default;
  RecordRing(const RecordRing&) = delete;
  RecordRing& operator=(const RecordRing&) = delete;

  // The largest payload one record may have: a record (with any padding before it) always fits.
  [[nodiscard]] std::size_t max_record_size() const noexcept {
    return static_cast<std::size_t>(capacity_ / 2 - kRecordHeaderBytes);
  }

  // ---- producer ----
  // Claims space for a record of `size` bytes (<= max_record_size(), checked) and `type`
  // (!= kPaddingType). False when the ring lacks the space now (back-pressure).
  [[nodiscard]] bool try_claim(uint32_t size, Claim& out, uint32_t type = 0) noexcept {
    // The failure paths are out of line so that the claim itself inlines into the caller's loop.
    if (size > max_record_size()) [[unlikely]] {
      fail_record_too_large(size);
    }
    MYELIN_DCHECK_NE(type, kPaddingType);
    const uint64_t need = record_bytes(size);
    const uint64_t pos = producer_.claim;
    const uint64_t offset = pos & mask_;
    const uint64_t pad = offset + need > capacity_ ? capacity_ - offset : 0;
    const uint64_t end = pos + pad + need;
    if (end - producer_.head_cache > capacity_) {
      // Pairs with the consumer's release store of head in consume().
      producer_.head_cache = shared_->head.load(std::memory_order_acquire);
      if (end - producer_.head_cache > capacity_) {
        publish_tail();
        return false;
      }
    }
    if (pad != 0) {
      write_header(offset, static_cast<uint32_t>(pad - kRecordHeaderBytes), kPaddingType);
    }
    const uint64_t record_offset = (pos + pad) & mask_;
    write_header(record_offset, size, type);
    out.data = data_ + record_offset + kRecordHeaderBytes;
    out.size = size;
    out.begin = pos;
    out.end = end;
    producer_.claim = end;
    return true;
  }
  // Claims one record per entry of `sizes`, all or none. Commit the last to publish them all.
  [[nodiscard]] bool try_claim_batch(std::span<const uint32_t> sizes, std::span<Claim> out,
                                     uint32_t type = 0) noexcept {
    MYELIN_CHECK_LE(sizes.size(), out.size());
    const uint64_t start = producer_.claim;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      if (!try_claim(sizes[i], out[i], type)) {
        producer_.claim = start;  // nothing was published: the headers written are dead bytes
        return false;
      }
    }
    return true;
  }
  // Publishes `claim` and every claim before it.
  void commit(const Claim& claim) noexcept {
    // A claim that was aborted away or never made would send the walk below into the weeds.
    if (claim.end - producer_.published > producer_.claim - producer_.published) [[unlikely]] {
      fail_commit_not_outstanding(claim);
    }
    uint64_t pos = producer_.published;
    uint64_t records = 0;
    while (pos != claim.end) {
      RecordHeader* header = header_at(pos & mask_);
      // Pairs with the consumer's acquire load of the stamp: header and payload are visible.
      header->stamp.store(salt_ ^ pos, std::memory_order_release);
      pos += record_bytes(header->length);
      ++records;
    }
    producer_.published = pos;
    // A batch publishes the tail at once (the consumer prefetches up to it); single-record commits
    // only every kTailPublishInterval, so that the tail's line does not travel once per record.
    if (records > 1 || ++producer_.commits % kTailPublishInterval == 0) publish_tail();
  }
  // Withdraws an uncommitted claim: the latest one gives its space back, an earlier one becomes
  // padding that the consumer skips when a later claim is committed.
  void abort(const Claim& claim) noexcept {
    if (claim.end == producer_.claim) {
      producer_.claim = claim.begin;
      return;
    }
    header_at(static_cast<uint64_t>(claim.data - kRecordHeaderBytes - data_))->type = kPaddingType;
  }
  // Copies one record in and commits it.
  [[nodiscard]] bool try_write(const void* payload, uint32_t size, uint32_t type = 0) noexcept {
    Claim c;
    if (!try_claim(size, c, type)) return false;
    if (size != 0) std::memcpy(c.data, payload, size);
    commit(c);
    return true;
  }

  // ---- consumer ----
  // Calls handler(const Record&) for up to max_records committed records in order, then releases
  // their space. Returns how many records were handed over (padding is not counted), or
  // protocol_error when a record header is corrupt (the ring is then unusable).
  template <typename Handler>
  Result<std::size_t> consume(Handler&& handler,
                              std::size_t max_records = std::numeric_limits<std::size_t>::max()) {
    uint64_t h = consumer_.head;
    const uint64_t start = h;
    uint64_t released = h;
    std::size_t count = 0;
    while (count < max_records) {
      const uint64_t offset = h & mask_;
      RecordHeader* header = header_at(offset);
      // Pairs with the producer's release store of the stamp in commit().
      if (header->stamp.load(std::memory_order_acquire) != (salt_ ^ h)) break;
      const uint32_t length = header->length;
      const uint32_t type = header->type;
      const uint64_t size = record_bytes(length);
      if (h == start && size <= kPrefetchRecordBytes) prefetch_committed(h);
      // Every record the producer writes, wrap padding included, is at most max_record_size().
      if (length > max_record_size()) {
        return protocol_error("record ring: corrupt record at position ", h, ": length ", length,
                              " exceeds the limit ", max_record_size());
      }
      if (offset + size > capacity_) {
        return protocol_error("record ring: corrupt record at position ", h, ": length ", length,
                              " runs past the data area");
      }
      if (type != kPaddingType) {
        handler(Record{
            type, std::span<const std::byte>(
                      reinterpret_cast<const std::byte*>(header) + kRecordHeaderBytes, length)});
        ++count;
      }
      h += size;
      if (h - released >= capacity_ / 4) {
        // A long batch hands space back as it goes so the producer need not stall for the
        // whole of it. Pairs with the producer's acquire load of head in try_claim().
        shared_->head.store(h, std::memory_order_release);
        released = h;
      }
    }
    if (h == start) return std::size_t{0};
    consumer_.head = h;
    // Pairs with the producer's acquire load of head in try_claim(): the space may be reused.
    shared_->head.store(h, std::memory_order_release);
    return count;
  }

  // ---- either side ----
  [[nodiscard]] std::size_t capacity() const noexcept {
    return static_cast<std::size_t>(capacity_);
  }
  // Bytes committed and not yet consumed (headers and padding included), from the published
  // positions: may miss single-record commits since the producer last published its tail (every
  // kTailPublishInterval of them, after every batch commit, and whenever it finds the ring full).
  [[nodiscard]] std::size_t used_bytes_approx() const noexcept {
    // Relaxed: an estimate only.
    const uint64_t h = shared_->head.load(std::memory_order_relaxed);
    const uint64_t t = shared_->tail.load(std::memory_order_relaxed);
    return t - h > capacity_ ? 0 : static_cast<std::size_t>(t - h);
  }
  // Whether no committed record waits at the consumer's position; exact when the consumer is not
  // consuming concurrently.
  [[nodiscard]] bool empty_approx() const noexcept {
    // Relaxed: a hint; nothing is read through it.
    const uint64_t h = shared_->head.load(std::memory_order_relaxed);
    return header_at(h & mask_)->stamp.load(std::memory_order_relaxed) != (salt_ ^ h);
  }
  [[nodiscard]] WaitWord& consumer_wait_word() const noexcept { return shared_->consumer_wait; }
  [[nodiscard]] void* region() const noexcept { return shared_; }

 private:
  RecordRing(Shared* shared, uint64_t capacity) noexcept
      : shared_(shared),
        data_(reinterpret_cast<std::byte*>(shared) + sizeof(Shared)),
        capacity_(capacity),
        mask_(capacity - 1),
        salt_(shared->salt) {
    // Acquire: pairs with the release stores of the other side (or of format()). The producer
    // resumes after the last record stamped, which may be past the lazily published tail.
    producer_.head_cache = consumer_.head = shared->head.load(std::memory_order_acquire);
    uint64_t pos = shared->tail.load(std::memory_order_acquire);
    for (uint64_t guard = 0; guard < capacity_ / kRecordAlignment; ++guard) {
      RecordHeader* header = header_at(pos & mask_);
      // Pairs with the release store in commit().
      if (header->stamp.load(std::memory_order_acquire) != (salt_ ^ pos)) break;
      pos += record_bytes(header->length);
    }
    producer_.claim = producer_.published = pos;
  }
  [[noreturn, gnu::noinline, gnu::cold]] void fail_record_too_large(uint32_t size) const {
    MYELIN_CHECK_LE(size, max_record_size()) << "record larger than the ring allows";
    __builtin_unreachable();
  }
  [[noreturn, gnu::noinline, gnu::cold]] void fail_commit_not_outstanding(
      const Claim& claim) const {
    MYELIN_CHECK_LE(claim.end - producer_.published, producer_.claim - producer_.published)
        << "commit of a claim that is not outstanding";
    __builtin_unreachable();
  }
  RecordHeader* header_at(uint64_t offset) const noexcept {
    return std::launder(reinterpret_cast<RecordHeader*>(data_ + offset));
  }
  void write_header(uint64_t offset, uint32_t length, uint32_t type) noexcept {
    RecordHeader* header = header_at(offset);
    header->length = length;
    header->type = type;
  }
  // Starts fetching the lines of the records committed after position h (up to kPrefetchBytes),
  // so their transfers from the producer's cache overlap instead of following one another. The
  // tail is a hint only: records are still read through their stamps.
  void prefetch_committed(uint64_t h) const noexcept {
    // Relaxed: a hint; pairs with nothing (see above).
    const uint64_t ahead = shared_->tail.load(std::memory_order_relaxed) - h;
    if (ahead > capacity_) return;  // the tail has not been published since h (it trails h)
    const uint64_t bytes = ahead < kPrefetchBytes ? ahead : kPrefetchBytes;
    for (uint64_t off = kCacheLine; off < bytes; off += kCacheLine) {
      __builtin_prefetch(data_ + ((h + off) & mask_), 0, 3);
    }
  }
  void publish_tail() noexcept {
    // Relaxed: read by used_bytes_approx() and as the consumer's prefetch hint only; records are
    // published by their stamps.
    shared_->tail.store(producer_.published, std::memory_order_relaxed);
  }

  static constexpr uint64_t kTailPublishInterval = 64;
  // consume() prefetches up to kPrefetchBytes of committed records when it starts at a record of
  // at most kPrefetchRecordBytes: small records are read one after the other, each waiting for its
  // line, whereas a handler of large records may not touch most of their lines at all.
  static constexpr uint64_t kPrefetchBytes = 4096;
  static constexpr uint64_t kPrefetchRecordBytes = 2 * kCacheLine;

  Shared* shared_;
  std::byte* data_;
  uint64_t capacity_;
  uint64_t mask_;
  uint64_t salt_;
  struct alignas(kFalseSharingRange) Producer {
    uint64_t claim = 0;       // next position to claim
    uint64_t published = 0;   // end of the last record stamped
    uint64_t head_cache = 0;  // consumer position as last seen
    uint64_t commits = 0;
  } producer_;
  struct alignas(kFalseSharingRange) Consumer {
    uint64_t head = 0;
  } consumer_;
};

}  // namespace myelin
