// myelin/core/record_ring.hpp
//
// RecordRing: a single-producer/single-consumer ring of variable-length records, written and read
// in place (zero copy). The producer claims space, writes the payload where it lies, and commits;
// the consumer is handed each record as a span into the ring.
//
//   RecordRing::Claim c;
//   if (ring.try_claim(n, c, /*type=*/7)) { fill(c.data, n); ring.commit(c); }   // producer
//   RecordRing::BatchClaim b;                                                     // or 16 at once
//   if (ring.try_claim_batch(16, n, b, 7)) { for (i..16) fill(b.data(i), n); ring.commit(b); }
//   auto r = ring.consume([](const RecordRing::Record& rec) { use(rec.type, rec.data); });
//   if (!r.ok()) ...   // protocol_error: the peer corrupted a record header or its position
//
// Same two modes as the other rings (create() owning NUMA-placed memory; format()/attach() over a
// caller's region, e.g. a ShmSegment), kind kRecord. Layout (nothing inside is a pointer):
//     0  RingLayoutHeader   magic, version, kind, element size 1, capacity (data bytes), check
//   128  head               consumer position in bytes
//   256  tail               producer position in bytes: everything before it is committed
//   384  WaitWord           consumer's sleep/wake word
//   512  data[capacity]     records, each aligned to 8 bytes:
//                           {u32 length; u32 type; payload[length]; pad to 8}
// A record never wraps: when one does not fit before the end, the producer fills the rest with a
// padding record (type kPaddingType) and starts at offset 0. Positions are monotonically
// increasing 64-bit byte counters; offset = position & (capacity - 1).
//
// Protocol. The producer's tail is the commit: commit(claim) stores tail = the end of `claim`
// (release), which publishes that record and every claim before it, so a batch of claims is
// published by committing its last one, with one store. The consumer loads the tail (acquire) when
// it has read everything up to its cached copy, and reads the records before it in place; it never
// touches a line the producer may still be writing (except the one the tail ends in), so the
// lines of a batch move to it once each, and with a prefetch, all at once. A record header needs
// no commit stamp, so it is 8 bytes: a 64-byte payload takes 72 bytes, not 80.
//   Producer: a private claim position advances per claim; head is cached and reloaded (acquire)
// only when the cache says "full". abort() of the latest uncommitted claim gives the space back;
// abort() of an earlier one turns it into padding the consumer skips. The producer's speed is set
// by its stores: each one holds a store-buffer entry until its line has come back from the
// consumer's cache, so the fewer stores per record, the more records are in flight. A claim writes
// its header with one 8-byte store, and try_claim_batch(count, size, BatchClaim&) claims records
// of one size without writing a Claim per record (BatchClaim::data(i) computes where each goes).
//   Consumer: walks records from head to its cached tail, then stores head (release) once per
// consume() call -- and every quarter ring within a long batch -- after which the producer may
// reuse the space. When it loads a new tail and the first record is small, it prefetches the
// lines up to that tail (at most 4 KiB): otherwise each record's line would be requested only
// after the previous record was read, one transfer from the producer's cache at a time. While
// records arrive one at a time (the last tail moved by one small record), a consume() that finds
// the ring empty also prefetches the line the next record will be written to, so that the record
// travels while the tail does; not during batches, where that line is still being filled.
//
// Everything from the peer is checked before the handler sees it: a tail that is misaligned,
// behind head or more than the capacity ahead, a record length above the ring's limit, running
// past the data area or past the tail, ends consume() with protocol_error.
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
    alignas(kFalseSharingRange) std::atomic<uint64_t> head;  // consumer position (bytes)
    alignas(kFalseSharingRange) std::atomic<uint64_t> tail;  // producer position: committed up to
    alignas(kFalseSharingRange) WaitWord consumer_wait;
  };
  static_assert(offsetof(Shared, head) == 128 && offsetof(Shared, tail) == 256 &&
                offsetof(Shared, consumer_wait) == 384 && sizeof(Shared) == 512);
  struct RecordHeader {
    uint32_t length;  // payload bytes
    uint32_t type;
  };
  static_assert(sizeof(RecordHeader) == 8 && std::atomic<uint64_t>::is_always_lock_free);

 public:
  static constexpr std::size_t kRecordHeaderBytes = sizeof(RecordHeader);
  static constexpr std::size_t kRecordAlignment = 8;
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
  // `count` claimed records of `size` bytes each (try_claim_batch(count, size, ...)).
  struct BatchClaim {
    std::byte* first = nullptr;    // payload of record 0
    std::byte* wrapped = nullptr;  // payload of record before_wrap (at the start of the data)
    uint64_t stride = 0;           // record_bytes(size)
    uint32_t size = 0;
    uint32_t count = 0;
    uint32_t before_wrap = 0;  // records placed before the end of the data area
    uint64_t begin = 0;        // position before record 0
    uint64_t pad = 0;          // padding bytes before record before_wrap (0: no wrap)
    uint64_t end = 0;          // position after the last record

    // Where record i's payload goes (i < count).
    [[nodiscard]] std::byte* data(std::size_t i) const noexcept {
      return i < before_wrap ? first + i * stride : wrapped + (i - before_wrap) * stride;
    }
    // Record i as a single claim, for commit() (publishes records 0..i) or abort().
    [[nodiscard]] Claim claim(std::size_t i) const noexcept {
      const uint64_t b = begin + i * stride + (i > before_wrap ? pad : 0);
      return Claim{data(i), size, b, b + (i == before_wrap ? pad : 0) + stride};
    }
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
    if (!claim_at(producer_.claim, size, type, out)) return false;
    producer_.claim = out.end;
    return true;
  }
  // Claims one record per entry of `sizes`, all or none. Commit the last to publish them all.
  [[nodiscard]] bool try_claim_batch(std::span<const uint32_t> sizes, std::span<Claim> out,
                                     uint32_t type = 0) noexcept {
    MYELIN_CHECK_LE(sizes.size(), out.size());
    // The position stays in a register: stores through `out` could alias producer_.
    uint64_t pos = producer_.claim;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      // On failure nothing was published: the headers written are dead bytes.
      if (!claim_at(pos, sizes[i], type, out[i])) return false;
      pos = out[i].end;
    }
    prefetch_for_write(pos, pos - producer_.claim);
    producer_.claim = pos;
    return true;
  }
  // Claims `count` records of `size` bytes each, all or none, without a Claim per record: write
  // record i's payload at out.data(i), and commit(out) publishes them all (commit(out.claim(i))
  // publishes records 0..i). A batch must fit an empty ring: count * record_bytes(size) at most
  // capacity() - record_bytes(size) (checked).
  [[nodiscard]] bool try_claim_batch(uint32_t count, uint32_t size, BatchClaim& out,
                                     uint32_t type = 0) noexcept {
    if (size > max_record_size()) [[unlikely]] {
      fail_record_too_large(size);
    }
    MYELIN_DCHECK_NE(type, kPaddingType);
    const uint64_t stride = record_bytes(size);
    if (count > capacity_ / stride - 1) [[unlikely]] {
      fail_batch_too_large(count, size);
    }
    const uint64_t pos = producer_.claim;
    const uint64_t offset = pos & mask_;
    const uint64_t fit = (capacity_ - offset) / stride;  // records that fit before the end
    const uint64_t before_wrap = fit < count ? fit : count;
    const uint64_t pad = fit < count ? capacity_ - offset - fit * stride : 0;
    const uint64_t end = pos + pad + count * stride;
    if (!has_space_until(end)) return false;
    out.first = data_ + offset + kRecordHeaderBytes;
    out.wrapped = data_ + kRecordHeaderBytes;
    out.stride = stride;
    out.size = size;
    out.count = count;
    out.before_wrap = static_cast<uint32_t>(before_wrap);
    out.begin = pos;
    out.pad = pad;
    out.end = end;
    if (pad != 0) {
      write_header(offset + before_wrap * stride, static_cast<uint32_t>(pad - kRecordHeaderBytes),
                   kPaddingType);
    }
    for (uint32_t i = 0; i < count; ++i) {
      write_header(static_cast<uint64_t>(out.data(i) - kRecordHeaderBytes - data_), size, type);
    }
    producer_.claim = end;
    prefetch_for_write(end, end - pos);
    return true;
  }
  // Publishes every record of `batch` and every claim before it.
  void commit(const BatchClaim& batch) noexcept {
    if (batch.count != 0) commit(Claim{nullptr, 0, batch.begin, batch.end});
  }
  // Publishes `claim` and every claim before it: one store of the tail.
  void commit(const Claim& claim) noexcept {
    // A claim that was aborted away or never made would publish bytes nobody wrote.
    if (claim.end - producer_.published > producer_.claim - producer_.published) [[unlikely]] {
      fail_commit_not_outstanding(claim);
    }
    producer_.published = claim.end;
    // Pairs with the consumer's acquire load of tail in consume(): the headers and payloads of the
    // records before claim.end are visible to it.
    shared_->tail.store(claim.end, std::memory_order_release);
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
  // Withdraws an uncommitted batch: the latest gives its space back, an earlier one becomes
  // padding.
  void abort(const BatchClaim& batch) noexcept {
    if (batch.end == producer_.claim) {
      producer_.claim = batch.begin;
      return;
    }
    for (uint32_t i = 0; i < batch.count; ++i) abort(batch.claim(i));
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
  // protocol_error when the tail or a record header is corrupt (the ring is then unusable).
  template <typename Handler>
  Result<std::size_t> consume(Handler&& handler,
                              std::size_t max_records = std::numeric_limits<std::size_t>::max()) {
    uint64_t h = consumer_.head;
    uint64_t t = consumer_.tail_cache;
    uint64_t released = h;
    std::size_t count = 0;
    while (count < max_records) {
      if (h == t) {
        // Pairs with the producer's release store of tail in commit(): every record before it
        // is written.
        t = shared_->tail.load(std::memory_order_acquire);
        if (t == h) {
          // Records arrive one at a time: ask for the line the next one will be written to, so
          // that when the tail moves the record is on its way (one transfer of latency instead of
          // two, tail then record). Not while batches arrive: a line the producer is filling would
          // be taken from it each time.
          if (consumer_.trickle) __builtin_prefetch(data_ + (h & mask_), 0, 3);
          break;
        }
        if (t - h > capacity_ || t % kRecordAlignment != 0) {
          consumer_.tail_cache = h;
          return protocol_error("record ring: corrupt tail ", t, " at head ", h, " (capacity ",
                                capacity_, ")");
        }
        consumer_.tail_cache = t;
        consumer_.trickle = t - h <= kPrefetchRecordBytes;
        prefetch_committed(h, t);
      }
      const uint64_t offset = h & mask_;
      const RecordHeader* header = header_at(offset);
      const uint32_t length = header->length;
      const uint32_t type = header->type;
      const uint64_t size = record_bytes(length);
      // Every record the producer writes, wrap padding included, is at most max_record_size().
      if (length > max_record_size() || offset + size > capacity_ || size > t - h) {
        return protocol_error("record ring: corrupt record at position ", h, ": length ", length,
                              length > max_record_size()  ? " exceeds the limit"
                              : offset + size > capacity_ ? " runs past the data area"
                                                          : " runs past the committed tail");
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
    if (h == consumer_.head) return std::size_t{0};
    consumer_.head = h;
    // Pairs with the producer's acquire load of head in try_claim(): the space may be reused.
    shared_->head.store(h, std::memory_order_release);
    return count;
  }

  // ---- either side ----
  [[nodiscard]] std::size_t capacity() const noexcept {
    return static_cast<std::size_t>(capacity_);
  }
  // Bytes committed and not yet consumed (headers and padding included), from the shared
  // positions (the consumer stores head at the end of each consume()).
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
    return shared_->head.load(std::memory_order_relaxed) ==
           shared_->tail.load(std::memory_order_relaxed);
  }
  [[nodiscard]] WaitWord& consumer_wait_word() const noexcept { return shared_->consumer_wait; }
  [[nodiscard]] void* region() const noexcept { return shared_; }

 private:
  RecordRing(Shared* shared, uint64_t capacity) noexcept
      : shared_(shared),
        data_(reinterpret_cast<std::byte*>(shared) + sizeof(Shared)),
        capacity_(capacity),
        mask_(capacity - 1) {
    // Acquire: pairs with the release stores of the other side (or of format()). The producer
    // resumes at the tail: claims never committed (a producer that died mid-write) are dropped.
    producer_.head_cache = consumer_.head = consumer_.tail_cache =
        shared->head.load(std::memory_order_acquire);
    producer_.claim = producer_.published = shared->tail.load(std::memory_order_acquire);
  }
  [[noreturn, gnu::noinline, gnu::cold]] void fail_record_too_large(uint32_t size) const {
    MYELIN_CHECK_LE(size, max_record_size()) << "record larger than the ring allows";
    __builtin_unreachable();
  }
  [[noreturn, gnu::noinline, gnu::cold]] void fail_batch_too_large(uint32_t count,
                                                                   uint32_t size) const {
    MYELIN_CHECK_LE(count, capacity_ / record_bytes(size) - 1)
        << "batch of records of " << size << " bytes larger than the ring allows";
    __builtin_unreachable();
  }
  // Whether the space up to position `end` is free, reloading head only when the cached copy
  // says it is not.
  bool has_space_until(uint64_t end) noexcept {
    if (end - producer_.head_cache <= capacity_) return true;
    // Pairs with the consumer's release store of head in consume().
    producer_.head_cache = shared_->head.load(std::memory_order_acquire);
    return end - producer_.head_cache <= capacity_;
  }
  // Claims a record of `size` bytes at position `pos` (writing its header and any wrap padding
  // before it) into `out`; the caller advances producer_.claim.
  bool claim_at(uint64_t pos, uint32_t size, uint32_t type, Claim& out) noexcept {
    // The failure paths are out of line so that the claim itself inlines into the caller's loop.
    if (size > max_record_size()) [[unlikely]] {
      fail_record_too_large(size);
    }
    MYELIN_DCHECK_NE(type, kPaddingType);
    const uint64_t need = record_bytes(size);
    const uint64_t offset = pos & mask_;
    const uint64_t pad = offset + need > capacity_ ? capacity_ - offset : 0;
    const uint64_t end = pos + pad + need;
    if (!has_space_until(end)) return false;
    if (pad != 0) {
      write_header(offset, static_cast<uint32_t>(pad - kRecordHeaderBytes), kPaddingType);
    }
    const uint64_t record_offset = (pos + pad) & mask_;
    write_header(record_offset, size, type);
    out = Claim{data_ + record_offset + kRecordHeaderBytes, size, pos, end};
    return true;
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
  // One 8-byte store: each store the producer makes holds a store-buffer entry until its line
  // comes back from the consumer's cache.
  void write_header(uint64_t offset, uint32_t length, uint32_t type) noexcept {
    const RecordHeader header{length, type};
    std::memcpy(data_ + offset, &header, sizeof(header));
  }
  // Asks for the lines of [pos, pos + bytes) that are free (at most kPrefetchBytes) in exclusive
  // state, for the producer's next claims: their transfers from the consumer's cache then overlap
  // with this batch's stores instead of holding the store buffer one at a time.
  void prefetch_for_write(uint64_t pos, uint64_t bytes) const noexcept {
    const uint64_t n = bytes < kPrefetchBytes ? bytes : kPrefetchBytes;
    for (uint64_t off = 0; off < n; off += kCacheLine) {
      const uint64_t p = pos + off;
      if (p + kCacheLine - producer_.head_cache > capacity_) return;  // not free yet
      prefetch_exclusive(data_ + (p & mask_));
    }
  }
  static void prefetch_exclusive(const std::byte* p) noexcept {
#if defined(__x86_64__)
    // PREFETCHW itself: __builtin_prefetch(p, 1) is a read prefetch unless the compiler targets
    // PRFCHW. (Processors without the instruction execute it as a no-op.)
    asm volatile("prefetchw %0" : : "m"(*p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
  }
  // Starts fetching the lines of the records committed in [h, t) (at most kPrefetchBytes) when
  // the record at h is small, so that their transfers from the producer's cache overlap instead of
  // following one another. Larger records are left alone: a handler may never touch most of their
  // lines.
  void prefetch_committed(uint64_t h, uint64_t t) const noexcept {
    if (record_bytes(header_at(h & mask_)->length) > kPrefetchRecordBytes) return;
    const uint64_t first_line = (h & ~uint64_t{kCacheLine - 1}) + kCacheLine;
    const uint64_t stop = t - h < kPrefetchBytes ? t : h + kPrefetchBytes;
    for (uint64_t p = first_line; p - h < stop - h; p += kCacheLine) {
      __builtin_prefetch(data_ + (p & mask_), 0, 3);
    }
  }

  // consume() prefetches up to kPrefetchBytes of committed records when it loads a new tail and
  // the record at its position is at most kPrefetchRecordBytes.
  static constexpr uint64_t kPrefetchBytes = 4096;
  static constexpr uint64_t kPrefetchRecordBytes = 2 * kCacheLine;

  Shared* shared_;
  std::byte* data_;
  uint64_t capacity_;
  uint64_t mask_;
  struct alignas(kFalseSharingRange) Producer {
    uint64_t claim = 0;       // next position to claim
    uint64_t published = 0;   // the tail last stored: everything before it is committed
    uint64_t head_cache = 0;  // consumer position as last seen
  } producer_;
  struct alignas(kFalseSharingRange) Consumer {
    uint64_t head = 0;
    uint64_t tail_cache = 0;  // producer's tail as last loaded
    bool trickle = false;     // the last tail it loaded had moved by one small record
  } consumer_;
};

}  // namespace myelin
