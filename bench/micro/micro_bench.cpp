// Microbenchmarks: broker frame codec and Context::register_memory's cache hit.
//
//   build/bench/bench/micro/bench_micro --benchmark_min_time=0.2
//
// Frame/*: append_frame() of a header + topic + payload into a reused vector, and decode_frame()
// of the same bytes (header checks, topic syntax, lengths), at payloads from 0 B to 64 KiB;
// encode's bytes_per_second counts the frame bytes. Registration/*: register_memory() of a buffer
// that is already registered (the cache lookup a training loop pays per step when it re-registers
// its gradient buffer), for each backend that opens here. Copy/*: std::memcpy against
// myelin::copy_bytes from a page-aligned source to a destination `distance` bytes after it
// modulo 4 KiB (16: a large malloc'd buffer), 4 KiB to 1 MiB.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include <myelin/broker/frame.hpp>
#include <myelin/core/copy.hpp>
#include <myelin/transport/context.hpp>

namespace {

using namespace myelin;

std::vector<std::byte> payload_of(size_t n) {
  std::vector<std::byte> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>(i * 7);
  return p;
}

void Frame_encode(benchmark::State& state) {
  const auto payload = payload_of(static_cast<size_t>(state.range(0)));
  std::vector<std::byte> out;
  out.reserve(payload.size() + 512);
  broker::FrameHeader h{.type = broker::FrameType::kPublish, .flags = broker::kFlagControl};
  for (auto _ : state) {
    out.clear();
    h.seq++;
    if (!broker::append_frame(out, h, "grad/layer3/shard0", payload).ok()) {
      state.SkipWithError("append_frame failed");
      break;
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(out.size()));
}
BENCHMARK(Frame_encode)->Arg(0)->Arg(64)->Arg(4096)->Arg(65536);

void Frame_decode(benchmark::State& state) {
  const auto payload = payload_of(static_cast<size_t>(state.range(0)));
  std::vector<std::byte> wire;
  broker::FrameHeader h{.type = broker::FrameType::kPublish, .flags = broker::kFlagControl};
  if (!broker::append_frame(wire, h, "grad/layer3/shard0", payload).ok()) {
    state.SkipWithError("append_frame failed");
    return;
  }
  const broker::DecodeLimits limits;
  for (auto _ : state) {
    broker::FrameView view;
    size_t consumed = 0;
    auto r = broker::decode_frame(wire, limits, &view, &consumed);
    if (!r.ok() || *r != broker::DecodeOutcome::kFrame || consumed != wire.size()) {
      state.SkipWithError("decode_frame did not return the frame");
      break;
    }
    benchmark::DoNotOptimize(view.payload.data());
  }
  // Decoding points into the buffer (no copy): its cost does not grow with the payload, so a
  // byte rate would mislead; time per frame is the figure.
}
BENCHMARK(Frame_decode)->Arg(0)->Arg(64)->Arg(4096)->Arg(65536);

void Registration_cache_hit(benchmark::State& state, transport::Backend backend) {
  auto ctx = transport::Context::create({.backend = backend, .name = "bench"});
  if (!ctx.ok()) {
    state.SkipWithError(ctx.status().to_string().c_str());
    return;
  }
  std::vector<uint8_t> buf(size_t{4} << 20);
  auto first = (*ctx)->register_memory(buf.data(), buf.size());
  if (!first.ok()) {
    state.SkipWithError(first.status().to_string().c_str());
    return;
  }
  for (auto _ : state) {
    auto again = (*ctx)->register_memory(buf.data(), buf.size());
    if (!again.ok() || again->id() != first->id()) {
      state.SkipWithError("not a cache hit");
      break;
    }
    benchmark::DoNotOptimize(again->data());
  }
  (*ctx)->deregister(*first);
}
BENCHMARK_CAPTURE(Registration_cache_hit, tcp, transport::Backend::kTcp);
BENCHMARK_CAPTURE(Registration_cache_hit, shm, transport::Backend::kShm);
BENCHMARK_CAPTURE(Registration_cache_hit, ucx, transport::Backend::kUcx);

// Two page-aligned 2 MiB mappings; the copy reads from the first and writes `distance` bytes into
// a page of the second.
void copy_at_distance(benchmark::State& state, bool library) {
  const auto n = static_cast<size_t>(state.range(0));
  const auto distance = static_cast<size_t>(state.range(1));
  constexpr size_t kMap = size_t{2} << 20;
  void* src = ::mmap(nullptr, kMap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void* dst = ::mmap(nullptr, kMap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (src == MAP_FAILED || dst == MAP_FAILED) {
    state.SkipWithError("mmap failed");
    return;
  }
  std::memset(src, 1, kMap);
  std::memset(dst, 2, kMap);
  auto* to = static_cast<unsigned char*>(dst) + 4096 + distance;
  for (auto _ : state) {
    if (library) {
      std::memcpy(to, src, n);
    } else {
      copy_bytes(to, src, n);
    }
    benchmark::DoNotOptimize(to);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
  ::munmap(src, kMap);
  ::munmap(dst, kMap);
}
void Copy_memcpy(benchmark::State& state) {
  copy_at_distance(state, true);
}
void Copy_copy_bytes(benchmark::State& state) {
  copy_at_distance(state, false);
}
BENCHMARK(Copy_memcpy)->ArgsProduct({{4096, 65536, 262144, 1 << 20}, {0, 16, 64}});
BENCHMARK(Copy_copy_bytes)->ArgsProduct({{4096, 65536, 262144, 1 << 20}, {0, 16, 64}});

}  // namespace

BENCHMARK_MAIN();
