// Ring benchmarks, peers side by side in one binary, threads pinned to two CPUs:
//   BM_Throughput<Queue>   64-bit items, one producer thread -> the measured consumer thread
//   BM_PingPong<Queue>     round trip of one item through two rings (there and back)
//   BM_DuplexPingPong      the same through a DuplexRing: two SPSC rings, one per direction,
//                          whose slot i share a cache line
//   BM_RawPingPong         the floor: one cache line written in turn by the two CPUs
//   BM_TwoLinePingPong     the floor for one channel per direction: two lines, one writer each
//   BM_RecordRing          64 B and 1 KiB records, claim/commit per record or per batch of 16
//                          (a Claim per record, or one BatchClaim of same-size records); the
//                          consumer checks each record's first and last word
//   BM_RecordRingPingPong  round trip of one 8-byte record through two record rings
//   BM_LineStream          the floor for the record ring: 64-byte lines handed over in batches
//                          through a published position, no ring code
//   BM_Mpsc                MpscRing with 1..4 producer threads
// CPUs: MYELIN_BENCH_CPUS="producer,consumer" (default "0,1"). Every consumer verifies the
// sequence it receives; a gap or reordering fails the benchmark.
//
//   build/rings/bench/rings/bench_rings --benchmark_repetitions=5
//       --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
#include <myelin/core/duplex_ring.hpp>
#include <myelin/core/mpsc_ring.hpp>
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/record_ring.hpp>
#include <myelin/core/spsc_ring.hpp>

#include <benchmark/benchmark.h>
#include <readerwriterqueue/readerwriterqueue.h>
#include <boost/lockfree/spsc_queue.hpp>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace myelin {
namespace {

constexpr std::size_t kCapacity = 1 << 14;  // elements; the rings fit in L2 on both sides

struct Cpus {
  int producer = 0;
  int consumer = 1;
};
const Cpus& cpus() {
  static const Cpus c = [] {
    Cpus out;
    if (const char* env = std::getenv("MYELIN_BENCH_CPUS")) {
      if (std::sscanf(env, "%d,%d", &out.producer, &out.consumer) != 2) {
        std::fprintf(stderr, "MYELIN_BENCH_CPUS must be 'producer,consumer'\n");
        std::exit(2);
      }
    }
    return out;
  }();
  return c;
}

// Pins the calling thread or fails the benchmark with the reason.
bool pin(benchmark::State* state, int cpu) {
  const Status s = pin_current_thread_to_cpu(cpu);
  if (!s.ok() && state != nullptr) state->SkipWithError(s.to_string().c_str());
  return s.ok();
}

// Everything the benchmark's second thread touches lives on the heap, and its lambda captures
// pointers by value: a lambda holding references to the first thread's locals reads that
// thread's stack on every iteration, sharing a line with whatever the first thread writes next to
// them. (We found the raw ping-pong 86 ns in one build and 106 ns in another; this removed one
// suspect, not the whole difference -- see docs/performance.md.)
struct alignas(kFalseSharingRange) StopFlag {
  std::atomic<bool> stop{false};
};

// A ring created on the heap (create() returns it by value inside a Result on the stack).
template <typename Ring>
std::unique_ptr<Ring> heap_ring(benchmark::State& state, Result<Ring> created) {
  if (!created.ok()) {
    state.SkipWithError(created.status().to_string().c_str());
    return nullptr;
  }
  return std::make_unique<Ring>(std::move(created).value());
}

// ---- the queues under test, behind one interface ------------------------------------------------

class OurSpsc {
 public:
  OurSpsc() : ring_(std::move(SpscRing<uint64_t>::create(kCapacity).value())) {}
  bool push(uint64_t v) { return ring_.try_push(v); }
  bool pop(uint64_t& v) { return ring_.try_pop(v); }

 private:
  SpscRing<uint64_t> ring_;
};

class BoostSpsc {
 public:
  bool push(uint64_t v) { return q_.push(v); }
  bool pop(uint64_t& v) { return q_.pop(v); }

 private:
  boost::lockfree::spsc_queue<uint64_t, boost::lockfree::capacity<kCapacity>> q_;
};

class MoodycamelRwq {
 public:
  MoodycamelRwq() : q_(kCapacity) {}
  bool push(uint64_t v) { return q_.try_enqueue(v); }
  bool pop(uint64_t& v) { return q_.try_dequeue(v); }

 private:
  moodycamel::ReaderWriterQueue<uint64_t> q_;
};

// ---- throughput ----------------------------------------------------------------------------

template <typename Queue>
void BM_Throughput(benchmark::State& state) {
  auto q = std::make_unique<Queue>();
  auto flag = std::make_unique<StopFlag>();
  if (!pin(&state, cpus().consumer)) return;
  std::thread producer([qp = q.get(), fp = flag.get()] {
    pin(nullptr, cpus().producer);
    uint64_t i = 0;
    // Relaxed: a plain stop flag; the queue carries the data.
    while (!fp->stop.load(std::memory_order_relaxed)) {
      if (qp->push(i)) ++i;
    }
  });
  uint64_t expect = 0, errors = 0;
  for (auto _ : state) {
    uint64_t v;
    while (!q->pop(v)) {
    }
    errors += v != expect;
    ++expect;
  }
  flag->stop.store(true, std::memory_order_relaxed);
  producer.join();
  if (errors != 0) state.SkipWithError("items arrived out of order");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Throughput<OurSpsc>)->Name("SPSC_throughput/myelin")->UseRealTime();
BENCHMARK(BM_Throughput<BoostSpsc>)->Name("SPSC_throughput/boost_spsc_queue")->UseRealTime();
BENCHMARK(BM_Throughput<MoodycamelRwq>)->Name("SPSC_throughput/moodycamel_rwq")->UseRealTime();

// ---- ping-pong through two rings ---------------------------------------------------------------

template <typename Queue>
void BM_PingPong(benchmark::State& state) {
  auto there = std::make_unique<Queue>();
  auto back = std::make_unique<Queue>();
  constexpr uint64_t kStop = ~uint64_t{0};
  if (!pin(&state, cpus().consumer)) return;
  std::thread echo([in = there.get(), out = back.get()] {
    pin(nullptr, cpus().producer);
    for (;;) {
      uint64_t v;
      while (!in->pop(v)) {
      }
      if (v == kStop) return;
      while (!out->push(v + 1)) {
      }
    }
  });
  uint64_t i = 0, errors = 0;
  for (auto _ : state) {
    while (!there->push(i)) {
    }
    uint64_t v;
    while (!back->pop(v)) {
    }
    errors += v != i + 1;
    ++i;
  }
  while (!there->push(kStop)) {
  }
  echo.join();
  if (errors != 0) state.SkipWithError("wrong echo");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_PingPong<OurSpsc>)->Name("PingPong_rtt/myelin")->UseRealTime();
BENCHMARK(BM_PingPong<BoostSpsc>)->Name("PingPong_rtt/boost_spsc_queue")->UseRealTime();
BENCHMARK(BM_PingPong<MoodycamelRwq>)->Name("PingPong_rtt/moodycamel_rwq")->UseRealTime();

// The same round trip through a DuplexRing: the forward ring carries the item there, the backward
// ring carries item + 1 back; each is an SPSC ring with its own positions, and slot i of both
// share a cache line. range(0): positions per direction.
void BM_DuplexPingPong(benchmark::State& state) {
  auto ring =
      heap_ring(state, DuplexRing<uint64_t>::create(static_cast<std::size_t>(state.range(0))));
  if (!ring) return;
  constexpr uint64_t kStop = ~uint64_t{0};
  if (!pin(&state, cpus().consumer)) return;
  std::thread echo([r = ring.get()] {
    pin(nullptr, cpus().producer);
    for (;;) {
      uint64_t v;
      while (!r->forward().try_pop(v)) {
      }
      if (v == kStop) return;
      while (!r->backward().try_push(v + 1)) {
      }
    }
  });
  uint64_t i = 0, errors = 0;
  for (auto _ : state) {
    while (!ring->forward().try_push(i)) {
    }
    uint64_t v;
    while (!ring->backward().try_pop(v)) {
    }
    errors += v != i + 1;
    ++i;
  }
  while (!ring->forward().try_push(kStop)) {
  }
  echo.join();
  if (errors != 0) state.SkipWithError("wrong echo");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DuplexPingPong)
    ->Name("PingPong_rtt/myelin_duplex")
    ->ArgName("capacity")
    ->Arg(kCapacity)
    ->Arg(8)
    ->UseRealTime();

// The physical floor: one line, written by each CPU in turn. The line has its 128-byte pair to
// itself (like the rings' hot fields), so that nothing the allocator puts next to it can share
// the pair.
void BM_RawPingPong(benchmark::State& state) {
  struct alignas(kFalseSharingRange) Line {
    std::atomic<uint64_t> value{0};
  };
  auto line = std::make_unique<Line>();
  constexpr uint64_t kStop = ~uint64_t{0};
  if (!pin(&state, cpus().consumer)) return;
  std::thread echo([l = line.get()] {
    pin(nullptr, cpus().producer);
    uint64_t seen = 0;
    for (;;) {
      uint64_t v;
      // Acquire pairs with the initiator's release store; the reply pairs with its load.
      while ((v = l->value.load(std::memory_order_acquire)) == seen) {
      }
      if (v == kStop) return;
      seen = v + 1;
      l->value.store(seen, std::memory_order_release);
    }
  });
  uint64_t next = 1;
  for (auto _ : state) {
    line->value.store(next, std::memory_order_release);
    while (line->value.load(std::memory_order_acquire) != next + 1) {
    }
    next += 2;
  }
  line->value.store(kStop, std::memory_order_release);
  echo.join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RawPingPong)->Name("PingPong_rtt/raw_cache_line")->UseRealTime();

// The floor for any design with one channel per direction: two lines, each written by one CPU
// only. Slower than one shared line, which the hardware hands over exclusively on each read
// (migratory sharing), so the writer's store then needs no second transaction.
void BM_TwoLinePingPong(benchmark::State& state) {
  struct alignas(kFalseSharingRange) Line {
    std::atomic<uint64_t> value{0};
  };
  auto there = std::make_unique<Line>();
  auto back = std::make_unique<Line>();
  constexpr uint64_t kStop = ~uint64_t{0};
  if (!pin(&state, cpus().consumer)) return;
  std::thread echo([in = there.get(), out = back.get()] {
    pin(nullptr, cpus().producer);
    uint64_t seen = 0;
    for (;;) {
      uint64_t v;
      // Acquire pairs with the initiator's release store of `there`.
      while ((v = in->value.load(std::memory_order_acquire)) == seen) {
      }
      if (v == kStop) return;
      seen = v;
      // Pairs with the initiator's acquire load of `back`.
      out->value.store(v, std::memory_order_release);
    }
  });
  uint64_t next = 1;
  for (auto _ : state) {
    there->value.store(next, std::memory_order_release);
    while (back->value.load(std::memory_order_acquire) != next) {
    }
    ++next;
  }
  there->value.store(kStop, std::memory_order_release);
  echo.join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TwoLinePingPong)->Name("PingPong_rtt/two_cache_lines")->UseRealTime();

// ---- record ring -------------------------------------------------------------------------------

// range(0): payload bytes; range(1): records per commit (1 = claim/commit each record).
// The producer claims `batch` records of `payload` bytes, fills each (a copy of the payload, then
// the sequence number in the first 8 bytes and its complement in the last 8) and commits them
// with one commit. kSameSize = false: try_claim_batch(sizes, claims), a Claim per record, commit of
// the last claim (RecordRing_throughput); true: try_claim_batch(count, size, BatchClaim), payloads
// at BatchClaim::data(i), commit of the batch (RecordRing_batch). The consumer reads both words of
// every record in place and checks them, so each record's first and last line reach it, as they
// would a real consumer.
template <bool kSameSize, std::size_t kRingBytes>
void BM_RecordRing(benchmark::State& state) {
  const auto payload = static_cast<uint32_t>(state.range(0));
  const auto batch = static_cast<std::size_t>(state.range(1));
  auto ring = heap_ring(state, RecordRing::create(kRingBytes));
  if (!ring) return;
  auto flag = std::make_unique<StopFlag>();
  if (!pin(&state, cpus().consumer)) return;
  std::thread producer([r = ring.get(), fp = flag.get(), payload, batch] {
    pin(nullptr, cpus().producer);
    const std::vector<std::byte> source(payload, std::byte{0x5a});
    std::vector<uint32_t> sizes(batch, payload);
    std::vector<RecordRing::Claim> claims(batch);
    uint64_t seq = 0;
    auto fill = [&](std::byte* data) {
      std::memcpy(data, source.data(), payload);
      const uint64_t last = ~seq;
      std::memcpy(data, &seq, sizeof(seq));
      std::memcpy(data + payload - sizeof(last), &last, sizeof(last));
      ++seq;
    };
    RecordRing::BatchClaim b;
    // Relaxed: a plain stop flag.
    while (!fp->stop.load(std::memory_order_relaxed)) {
      if constexpr (kSameSize) {
        if (!r->try_claim_batch(static_cast<uint32_t>(batch), payload, b)) continue;
        for (uint32_t i = 0; i < b.count; ++i) fill(b.data(i));
        r->commit(b);
      } else {
        if (!r->try_claim_batch(sizes, claims)) continue;
        for (auto& c : claims) fill(c.data);
        r->commit(claims.back());
      }
    }
  });
  constexpr std::size_t kPerIteration = 64;
  uint64_t expect = 0, errors = 0;
  for (auto _ : state) {
    std::size_t got = 0;
    while (got < kPerIteration) {
      auto n = ring->consume(
          [&](const RecordRing::Record& r) {
            uint64_t first, last;
            std::memcpy(&first, r.data.data(), sizeof(first));
            std::memcpy(&last, r.data.data() + r.data.size() - sizeof(last), sizeof(last));
            errors += (first != expect) | (last != ~expect);
            ++expect;
          },
          kPerIteration - got);
      got += n.ok() ? *n : kPerIteration;
    }
  }
  flag->stop.store(true, std::memory_order_relaxed);
  producer.join();
  if (errors != 0) state.SkipWithError("records arrived out of order or torn");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kPerIteration));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kPerIteration * payload));
}
constexpr std::size_t kRecordRingBytes = std::size_t{256} << 10;  // fits L2 on both sides
// Larger than both CPUs' L2 (1 MiB each): see docs/rings.md, "What bounds it".
constexpr std::size_t kLargeRecordRingBytes = std::size_t{16} << 20;
BENCHMARK(BM_RecordRing<false, kRecordRingBytes>)
    ->Name("RecordRing_throughput")
    ->ArgNames({"bytes", "per_commit"})
    ->Args({64, 1})
    ->Args({64, 16})
    ->Args({1024, 1})
    ->Args({1024, 16})
    ->UseRealTime();
BENCHMARK(BM_RecordRing<false, kLargeRecordRingBytes>)
    ->Name("RecordRing_throughput_16MiB")
    ->ArgNames({"bytes", "per_commit"})
    ->Args({64, 16})
    ->UseRealTime();
BENCHMARK(BM_RecordRing<true, kRecordRingBytes>)
    ->Name("RecordRing_batch")
    ->ArgNames({"bytes", "per_commit"})
    ->Args({64, 16})
    ->Args({1024, 16})
    ->UseRealTime();
BENCHMARK(BM_RecordRing<true, kLargeRecordRingBytes>)
    ->Name("RecordRing_batch_16MiB")
    ->ArgNames({"bytes", "per_commit"})
    ->Args({64, 16})
    ->UseRealTime();

// Round trip of one 8-byte record through two 64 KiB RecordRings (there and back), claim/commit
// and consume() of one record each way: the latency a same-node transport built on the record
// ring pays per message. A record carrying ~0 stops the echo thread.
void BM_RecordRingPingPong(benchmark::State& state) {
  auto there = heap_ring(state, RecordRing::create(1 << 16));
  auto back = heap_ring(state, RecordRing::create(1 << 16));
  if (!there || !back) return;
  if (!pin(&state, cpus().consumer)) return;
  constexpr uint64_t kStop = ~uint64_t{0};
  auto send = [](RecordRing* ring, uint64_t v) {
    RecordRing::Claim c;
    while (!ring->try_claim(sizeof(v), c)) {
    }
    std::memcpy(c.data, &v, sizeof(v));
    ring->commit(c);
  };
  auto receive = [](RecordRing* ring) {
    uint64_t v = 0;
    for (;;) {
      auto n = ring->consume(
          [&](const RecordRing::Record& r) { std::memcpy(&v, r.data.data(), sizeof(v)); }, 1);
      if (!n.ok() || *n != 0) return n.ok() ? v : kStop;
    }
  };
  std::thread echo([in = there.get(), out = back.get(), send, receive] {
    pin(nullptr, cpus().producer);
    for (;;) {
      const uint64_t v = receive(in);
      if (v == kStop) return;
      send(out, v + 1);
    }
  });
  uint64_t next = 0, errors = 0;
  for (auto _ : state) {
    send(there.get(), next);
    errors += receive(back.get()) != next + 1;
    ++next;
  }
  send(there.get(), kStop);
  echo.join();
  if (errors != 0) state.SkipWithError("a reply carried the wrong value");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RecordRingPingPong)->Name("PingPong_rtt/record_ring")->UseRealTime();

// The streaming floor for the record ring: no ring code, only what any ring must do to hand over
// cache lines in batches. A 256 KiB buffer of 64-byte lines; the producer writes `batch` lines
// (sequence number in the first word, its complement in the last) and then publishes its position
// (release) on its own line; the consumer loads that position (acquire), reads the first and last
// word of each line up to it, and publishes its own position every 64 lines, which the producer
// reads (acquire) only when its cached copy says "full". Items are lines.
struct alignas(kFalseSharingRange) StreamPosition {
  std::atomic<uint64_t> value{0};
};
struct LineStream {
  static constexpr uint64_t kLines = (1 << 18) / kCacheLine;
  StreamPosition head;  // lines the consumer has read
  StreamPosition tail;  // lines the producer has written
  struct alignas(kCacheLine) Line {
    uint64_t words[kCacheLine / sizeof(uint64_t)];
  };
  std::unique_ptr<Line[]> lines = std::make_unique<Line[]>(kLines);
};
void BM_LineStream(benchmark::State& state) {
  const auto batch = static_cast<uint64_t>(state.range(0));
  const auto prefetch = static_cast<uint64_t>(state.range(1));  // producer's distance, lines
  auto s = std::make_unique<LineStream>();
  auto flag = std::make_unique<StopFlag>();
  if (!pin(&state, cpus().consumer)) return;
  std::thread producer([sp = s.get(), fp = flag.get(), batch, prefetch] {
    pin(nullptr, cpus().producer);
    uint64_t t = 0, head_cache = 0;
    // Relaxed: a plain stop flag.
    while (!fp->stop.load(std::memory_order_relaxed)) {
      if (t + batch - head_cache > LineStream::kLines) {
        // Pairs with the consumer's release store of head.
        head_cache = sp->head.value.load(std::memory_order_acquire);
        if (t + batch - head_cache > LineStream::kLines) continue;
      }
      for (uint64_t i = t; i != t + batch; ++i) {
        // For writing, the lines one batch ahead: their ownership moves back from the consumer
        // while this batch is written.
        if (prefetch != 0 && i + prefetch - head_cache < LineStream::kLines) {
          __builtin_prefetch(&sp->lines[(i + prefetch) % LineStream::kLines], 1, 3);
        }
        LineStream::Line& l = sp->lines[i % LineStream::kLines];
        for (auto& w : l.words) w = i;
        l.words[7] = ~i;
      }
      t += batch;
      // Pairs with the consumer's acquire load of tail.
      sp->tail.value.store(t, std::memory_order_release);
    }
  });
  constexpr uint64_t kPerIteration = 64;
  uint64_t h = 0, tail_cache = 0, errors = 0;
  for (auto _ : state) {
    const uint64_t goal = h + kPerIteration;
    while (h != goal) {
      if (h == tail_cache) {
        // Pairs with the producer's release store of tail.
        tail_cache = s->tail.value.load(std::memory_order_acquire);
        // The lines up to the new tail are complete: fetch them all at once.
        for (uint64_t i = h + 1; prefetch != 0 && i < tail_cache && i < h + 64; ++i) {
          __builtin_prefetch(&s->lines[i % LineStream::kLines], 0, 3);
        }
        continue;
      }
      const LineStream::Line& l = s->lines[h % LineStream::kLines];
      errors += (l.words[0] != h) | (l.words[7] != ~h);
      ++h;
    }
    // Pairs with the producer's acquire load of head.
    s->head.value.store(h, std::memory_order_release);
  }
  flag->stop.store(true, std::memory_order_relaxed);
  producer.join();
  if (errors != 0) state.SkipWithError("lines arrived out of order or torn");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kPerIteration));
}
BENCHMARK(BM_LineStream)
    ->Name("LineStream_floor")
    ->ArgNames({"lines_per_publish", "prefetch"})
    ->Args({1, 0})
    ->Args({16, 0})
    ->Args({16, 16})
    ->Args({16, 64})
    ->Args({16, 256})
    ->UseRealTime();

// ---- MPSC --------------------------------------------------------------------------------------

// range(0) producers, all pinned to the producer CPU (on a two-CPU machine they share it).
void BM_Mpsc(benchmark::State& state) {
  const int producers = static_cast<int>(state.range(0));
  auto ring = heap_ring(state, MpscRing<uint64_t>::create(kCapacity));
  if (!ring) return;
  auto flag = std::make_unique<StopFlag>();
  if (!pin(&state, cpus().consumer)) return;
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([r = ring.get(), fp = flag.get(), p] {
      pin(nullptr, cpus().producer);
      uint64_t i = 0;
      const uint64_t tag = static_cast<uint64_t>(p) << 56;
      // Relaxed: a plain stop flag.
      while (!fp->stop.load(std::memory_order_relaxed)) {
        if (r->try_push(tag | i)) {
          ++i;
        } else {
          std::this_thread::yield();  // full: let a sibling producer on this CPU run
        }
      }
    });
  }
  std::array<uint64_t, 4> next{};
  uint64_t errors = 0;
  for (auto _ : state) {
    uint64_t v;
    while (!ring->try_pop(v)) {
    }
    const auto p = static_cast<std::size_t>(v >> 56);
    errors += (v & ((uint64_t{1} << 56) - 1)) != next[p];
    ++next[p];
  }
  flag->stop.store(true, std::memory_order_relaxed);
  for (auto& t : threads) t.join();
  if (errors != 0) state.SkipWithError("a producer's items arrived out of order");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Mpsc)->Name("MPSC_throughput")->ArgName("producers")->DenseRange(1, 4)->UseRealTime();

}  // namespace
}  // namespace myelin

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("producer_cpu", std::to_string(myelin::cpus().producer));
  benchmark::AddCustomContext("consumer_cpu", std::to_string(myelin::cpus().consumer));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
