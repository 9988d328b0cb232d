// Latency and bandwidth measurement over a transport Endpoint.
#include <myelin/bench/harness.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include <myelin/core/clock.hpp>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

namespace myelin::bench {

using transport::Context;
using transport::Endpoint;
using transport::Request;

namespace {
constexpr uint32_t kData = 0;
constexpr uint32_t kControl = 1;

uint8_t pattern_byte(size_t i, uint64_t salt) {
  return static_cast<uint8_t>((i * 131 + salt * 7 + (i >> 9)) & 0xFF);
}
void fill(std::vector<uint8_t>& buf, uint64_t salt) {
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern_byte(i, salt);
}
// Stamps the message index at both ends (as much of it as fits). Inline, with fixed 8-byte moves
// from 8 bytes up: a latency sample holds a stamp and its check, which should cost a few
// instructions, not calls into the C library (memcpy and memcmp of a variable length were).
inline void stamp(uint8_t* p, size_t size, uint64_t index) {
  if (size >= 8) {
    std::memcpy(p, &index, 8);
    if (size >= 16) std::memcpy(p + size - 8, &index, 8);
    return;
  }
  uint8_t bytes[8];
  std::memcpy(bytes, &index, 8);
  for (size_t i = 0; i < size; ++i) p[i] = bytes[i];  // a 0-byte message may have a null buffer
}
inline bool check_stamp(const uint8_t* p, size_t size, uint64_t index) {
  if (size >= 8) {
    uint64_t head = 0, tail = 0;
    std::memcpy(&head, p, 8);
    if (head != index) return false;
    if (size < 16) return true;
    std::memcpy(&tail, p + size - 8, 8);
    return tail == index;
  }
  uint8_t bytes[8];
  std::memcpy(bytes, &index, 8);
  for (size_t i = 0; i < size; ++i) {
    if (p[i] != bytes[i]) return false;
  }
  return true;  // nothing stamped beyond what fits; a 0-byte message may have a null buffer
}
// Every byte: the pattern with the stamps laid over it.
bool check_all(const std::vector<uint8_t>& buf, size_t size, uint64_t salt, uint64_t index) {
  if (!check_stamp(buf.data(), size, index)) return false;
  const size_t head = std::min<size_t>(size, 8);
  const size_t tail = size >= 16 ? size - 8 : size;
  for (size_t i = head; i < tail; ++i) {
    if (buf[i] != pattern_byte(i, salt)) return false;
  }
  return true;
}

// Buffers (slots) used round robin: cfg.buffers, or one per operation in flight; never more than
// `cap` bytes in total.
size_t buffer_count(const RunConfig& cfg, size_t window, size_t size, size_t cap) {
  const size_t wanted = cfg.buffers != 0 ? std::min(cfg.buffers, window) : window;
  return std::max<size_t>(1, std::min(wanted, cap / std::max<size_t>(size, 1)));
}
// Operations in flight: cfg.window; with one buffer per operation (cfg.buffers == 0) bounded by
// how many buffers fit in `cap` bytes, as the buffers are.
size_t window_of(const RunConfig& cfg, size_t size, size_t cap) {
  const size_t w = std::max<size_t>(1, cfg.window);
  return cfg.buffers != 0 ? w : buffer_count(cfg, w, size, cap);
}
// The stamp check where receive buffers may be shared by pending operations (nbuf < window): a
// later message may already have landed in the same buffer, so any index still in flight counts.
bool check_stamp_shared(const uint8_t* p, size_t size, uint64_t index, size_t nbuf, size_t window,
                        uint64_t last) {
  if (nbuf >= window) return check_stamp(p, size, index);
  const size_t n = std::min<size_t>(size, 8);
  if (n == 0) return true;
  uint64_t head = 0, tail = 0;
  std::memcpy(&head, p, n);
  if (n == 8) {
    if (head < index || head > last) return false;
  } else if (std::memcmp(p, &index, n) != 0) {
    // Short messages: only the low bytes of the index fit; accept any in-flight index.
    bool any = false;
    for (uint64_t k = index; k <= last && !any; ++k) any = std::memcmp(p, &k, n) == 0;
    if (!any) return false;
  }
  if (size < 16) return true;
  std::memcpy(&tail, p + size - 8, 8);
  return tail >= index && tail <= last;
}
// Every byte of the pattern between the stamps (shared buffers: the stamps are checked apart).
bool check_pattern(const std::vector<uint8_t>& buf, size_t size, uint64_t salt) {
  const size_t head = std::min<size_t>(size, 8);
  const size_t tail = size >= 16 ? size - 8 : size;
  for (size_t i = head; i < tail; ++i) {
    if (buf[i] != pattern_byte(i, salt)) return false;
  }
  return true;
}

Status wait(Context& ctx, const Request& r, const char* what) {
  Status s = ctx.wait(r);
  if (!s.ok()) return std::move(s).with_context(what);
  return ok_status();
}

// A one-byte handshake on the control channel: the side that calls signal() releases wait_for().
Status signal(Context& ctx, Endpoint& ep) {
  uint8_t token = 1;
  return wait(ctx, ep.send(kControl, &token, 1), "sending a sync token");
}
Status wait_for(Context& ctx, Endpoint& ep) {
  uint8_t token = 0;
  return wait(ctx, ep.recv(kControl, &token, 1), "waiting for a sync token");
}
}  // namespace

void summarize(std::vector<double>& samples, LatencyResult& res) {
  if (samples.empty()) return;
  double sum = 0;
  for (double v : samples) sum += v;
  std::sort(samples.begin(), samples.end());
  res.min_us = samples.front();
  res.max_us = samples.back();
  res.avg_us = sum / static_cast<double>(samples.size());
  res.p50_us = percentile(samples, 50);
  res.p90_us = percentile(samples, 90);
  res.p99_us = percentile(samples, 99);
  res.p999_us = percentile(samples, 99.9);
}

double percentile(const std::vector<double>& sorted, double pct) {
  if (sorted.empty()) return 0;
  const double rank = std::ceil(pct / 100.0 * static_cast<double>(sorted.size()) - 1e-9);
  const size_t idx = rank < 1 ? 0 : static_cast<size_t>(rank) - 1;
  return sorted[std::min(idx, sorted.size() - 1)];
}

Result<LatencyResult> run_latency(Context& ctx, Endpoint& ep, bool initiator, size_t size,
                                  const RunConfig& cfg) {
  std::vector<uint8_t> out(size), in(size);
  fill(out, size);
  LatencyResult res;
  res.size = size;
  res.iters = cfg.iters;
  std::vector<uint64_t> ticks;  // per round trip; in microseconds one way after the loop
  ticks.reserve(cfg.iters);
  MYELIN_RETURN_IF_ERROR(initiator ? wait_for(ctx, ep) : signal(ctx, ep));
  const size_t total = cfg.warmup + cfg.iters;
  // One clock read per round trip, as ucx_perftest reads it: a sample runs from the end of the
  // previous round trip (the start of the first timed one) to the end of this one, so it also
  // holds the 8-byte stamp and its check between them; a check of every byte is kept out. The
  // read is the time-stamp counter itself where CycleTimer uses it (its now() asks uses_tsc()
  // out of line every time), and the conversion waits until after the loop.
  const bool tsc = CycleTimer::uses_tsc();
  const auto clock = [tsc] {
#if defined(__x86_64__) || defined(__i386__)
    if (tsc) return static_cast<uint64_t>(__rdtsc());
#endif
    return CycleTimer::now();
  };
  uint64_t t_prev = 0;
  for (size_t i = 0; i < total; ++i) {
    // Every byte once per size (and of the message the fault injection corrupts).
    const bool full_check =
        i == cfg.warmup || (i >= cfg.warmup && i - cfg.warmup == cfg.corrupt_at);
    if (initiator) {
      stamp(out.data(), size, i);
      if (i == cfg.warmup) t_prev = clock();
      // The ping leaves first and the pong's recv is posted while it travels, off the round
      // trip's critical path. No message is lost by the order: one that arrives before its recv
      // waits for it.
      Request ping = ep.send(kData, out.data(), size);
      Request pong = ep.recv(kData, in.data(), in.size());
      MYELIN_RETURN_IF_ERROR(wait(ctx, ping, "latency: ping"));
      MYELIN_RETURN_IF_ERROR(wait(ctx, pong, "latency: pong"));
      const uint64_t t1 = clock();
      if (i >= cfg.warmup) ticks.push_back(t1 - t_prev);
      t_prev = t1;
      const bool good = pong.bytes() == size && (full_check ? check_all(in, size, size, i)
                                                            : check_stamp(in.data(), size, i));
      if (full_check) t_prev = clock();
      if (!good && i >= cfg.warmup) ++res.wrong;
    } else {
      Request r = ep.recv(kData, in.data(), in.size());
      MYELIN_RETURN_IF_ERROR(wait(ctx, r, "latency: waiting for a ping"));
      const bool good = r.bytes() == size && (full_check ? check_all(in, size, size, i)
                                                         : check_stamp(in.data(), size, i));
      if (!good && i >= cfg.warmup) ++res.wrong;
      if (i - cfg.warmup == cfg.corrupt_at && i >= cfg.warmup && size > 0) in[size / 2] ^= 0x5A;
      // Echo what arrived: the initiator checks the same stamp and pattern.
      MYELIN_RETURN_IF_ERROR(wait(ctx, ep.send(kData, in.data(), size), "latency: pong"));
    }
  }
  std::vector<double> samples;
  samples.reserve(ticks.size());
  for (uint64_t t : ticks) samples.push_back(CycleTimer::to_ns(t) / 2000.0);
  summarize(samples, res);
  // Report the echo side's wrong count to the initiator so one process sees both.
  uint64_t peer_wrong = 0;
  if (initiator) {
    MYELIN_RETURN_IF_ERROR(wait(ctx, ep.recv(kControl, &peer_wrong, 8), "latency: peer report"));
    res.wrong += peer_wrong;
  } else {
    MYELIN_RETURN_IF_ERROR(wait(ctx, ep.send(kControl, &res.wrong, 8), "latency: report"));
  }
  return res;
}

Result<BandwidthResult> run_bandwidth(Context& ctx, Endpoint& ep, bool sender, size_t size,
                                      const RunConfig& cfg) {
  // Enough buffers for the window (or cfg.buffers), bounded to 256 MiB in total.
  const size_t window = window_of(cfg, size, size_t{256} << 20);
  const size_t nbuf = buffer_count(cfg, window, size, size_t{256} << 20);
  std::vector<std::vector<uint8_t>> bufs(nbuf, std::vector<uint8_t>(size));
  if (sender) {
    for (auto& b : bufs) fill(b, size);
  }
  BandwidthResult res;
  res.size = size;
  res.iters = cfg.iters;
  std::vector<Request> reqs(window);

  auto phase = [&](size_t first, size_t count, bool timed) -> Status {
    if (sender) {
      MYELIN_RETURN_IF_ERROR(wait_for(ctx, ep));  // the receiver has started its clock
      for (size_t i = 0; i < count; ++i) {
        const size_t slot = (first + i) % window;
        if (i >= window) MYELIN_RETURN_IF_ERROR(wait(ctx, reqs[slot], "bandwidth: send"));
        // With shared buffers a pending send's bytes may change under it: the receiver accepts
        // any in-flight stamp then, and the pattern between the stamps never changes.
        uint8_t* out = bufs[(first + i) % nbuf].data();
        stamp(out, size, first + i);
        reqs[slot] = ep.send(kData, out, size);
      }
      for (size_t i = 0; i < std::min(count, window); ++i) {
        MYELIN_RETURN_IF_ERROR(
            wait(ctx, reqs[(first + count - 1 - i) % window], "bandwidth: send"));
      }
      return ok_status();
    }
    for (size_t i = 0; i < std::min(count, window); ++i) {
      reqs[(first + i) % window] = ep.recv(kData, bufs[(first + i) % nbuf].data(), size);
    }
    const uint64_t t0 = CycleTimer::now();
    MYELIN_RETURN_IF_ERROR(signal(ctx, ep));
    for (size_t i = 0; i < count; ++i) {
      const size_t slot = (first + i) % window;
      std::vector<uint8_t>& buf = bufs[(first + i) % nbuf];
      if (Status s = wait(ctx, reqs[slot], "bandwidth: recv"); !s.ok()) {
        return std::move(s).with_context("message " + std::to_string(i) + " of " +
                                         std::to_string(count));
      }
      const bool full = timed && (i == 0 || i == cfg.corrupt_at);
      if (timed && i == cfg.corrupt_at && size > 0) buf[size / 2] ^= 0x5A;
      // The sender re-stamps a shared buffer while earlier sends of it are pending: a message may
      // carry the stamp of one up to two windows later.
      const uint64_t last = first + i + 2 * window;
      const bool stamped =
          nbuf >= window ? (full ? check_all(buf, size, size, first + i)
                                 : check_stamp(buf.data(), size, first + i))
                         : check_stamp_shared(buf.data(), size, first + i, nbuf, window, last) &&
                               (!full || check_pattern(buf, size, size));
      const bool good = reqs[slot].bytes() == size && stamped;
      if (!good && timed) ++res.wrong;
      if (i + window < count) {
        reqs[slot] = ep.recv(kData, buf.data(), size);
      }
    }
    if (timed) {
      res.seconds = CycleTimer::to_ns(CycleTimer::now() - t0) / 1e9;
    }
    return ok_status();
  };
  MYELIN_RETURN_IF_ERROR(phase(0, cfg.warmup, false));
  MYELIN_RETURN_IF_ERROR(phase(cfg.warmup, cfg.iters, true));
  if (!sender && res.seconds > 0) {
    res.gbps = static_cast<double>(size) * static_cast<double>(cfg.iters) / res.seconds / 1e9;
    res.msgs_per_s = static_cast<double>(cfg.iters) / res.seconds;
  }
  return res;
}

namespace {
// Drives progress until `r` is done, reposting completed receives of a bidirectional run meanwhile
// (so neither side can wait on a send whose matching receive the other side has not reposted).
template <typename Drain>
Status wait_draining(Context& ctx, const Request& r, Deadline deadline, Drain&& drain,
                     const char* what) {
  while (!r.done()) {
    ctx.progress();
    MYELIN_RETURN_IF_ERROR(drain());
    if (deadline.expired()) return timeout_error(what, ": ", r.description(), " did not complete");
  }
  if (!r.status().ok()) return Status(r.status()).with_context(what);
  return ok_status();
}
}  // namespace

Result<BandwidthResult> run_bidirectional(Context& ctx, Endpoint& ep, size_t size,
                                          const RunConfig& cfg) {
  const size_t window = window_of(cfg, size, size_t{128} << 20);
  const size_t nbuf = buffer_count(cfg, window, size, size_t{128} << 20);
  std::vector<std::vector<uint8_t>> out(nbuf, std::vector<uint8_t>(size));
  std::vector<std::vector<uint8_t>> in(nbuf, std::vector<uint8_t>(size));
  for (auto& b : out) fill(b, size);
  BandwidthResult res;
  res.size = size;
  res.iters = cfg.iters;
  std::vector<Request> sends(window), recvs(window);
  double seconds = 0;

  auto phase = [&](size_t first, size_t count, bool timed) -> Status {
    size_t posted = 0, received = 0;
    for (; posted < std::min(count, window); ++posted) {
      recvs[posted % window] = ep.recv(kData, in[(first + posted) % nbuf].data(), size);
    }
    // Symmetric start: each side tells the other its receives are posted, then waits for the same.
    MYELIN_RETURN_IF_ERROR(signal(ctx, ep));
    MYELIN_RETURN_IF_ERROR(wait_for(ctx, ep));
    const uint64_t t0 = CycleTimer::now();
    const Deadline deadline = Deadline::after(ctx.options().timeout);
    auto drain = [&]() -> Status {
      while (received < count && recvs[received % window].done()) {
        const size_t slot = received % window;
        if (!recvs[slot].status().ok()) {
          return Status(recvs[slot].status()).with_context("bidirectional: recv");
        }
        const size_t index = first + received;
        std::vector<uint8_t>& buf = in[index % nbuf];
        const bool full = timed && (received == 0 || received == cfg.corrupt_at);
        if (timed && received == cfg.corrupt_at && size > 0) buf[size / 2] ^= 0x5A;
        const bool stamped =
            nbuf >= window
                ? (full ? check_all(buf, size, size, index) : check_stamp(buf.data(), size, index))
                : check_stamp_shared(buf.data(), size, index, nbuf, window, index + 2 * window) &&
                      (!full || check_pattern(buf, size, size));
        const bool good = recvs[slot].bytes() == size && stamped;
        if (!good && timed) ++res.wrong;
        ++received;
        if (posted < count) {
          recvs[posted % window] = ep.recv(kData, in[(first + posted) % nbuf].data(), size);
          ++posted;
        }
      }
      return ok_status();
    };
    for (size_t i = 0; i < count; ++i) {
      const size_t slot = (first + i) % window;
      if (i >= window) {
        MYELIN_RETURN_IF_ERROR(
            wait_draining(ctx, sends[slot], deadline, drain, "bidirectional: send"));
      }
      uint8_t* src = out[(first + i) % nbuf].data();
      stamp(src, size, first + i);
      sends[slot] = ep.send(kData, src, size);
      MYELIN_RETURN_IF_ERROR(drain());
    }
    for (size_t i = 0; i < std::min(count, window); ++i) {
      MYELIN_RETURN_IF_ERROR(wait_draining(ctx, sends[(first + count - 1 - i) % window], deadline,
                                           drain, "bidirectional: send"));
    }
    while (received < count) {
      MYELIN_RETURN_IF_ERROR(
          wait_draining(ctx, recvs[received % window], deadline, drain, "bidirectional: recv"));
      MYELIN_RETURN_IF_ERROR(drain());
    }
    if (timed) seconds = CycleTimer::to_ns(CycleTimer::now() - t0) / 1e9;
    return ok_status();
  };
  MYELIN_RETURN_IF_ERROR(phase(0, cfg.warmup, false));
  MYELIN_RETURN_IF_ERROR(phase(cfg.warmup, cfg.iters, true));
  // Exchange what each side received: the total is the sum of both directions.
  double mine[2] = {
      seconds > 0 ? static_cast<double>(size) * static_cast<double>(cfg.iters) / seconds : 0.0,
      static_cast<double>(res.wrong)};
  double theirs[2] = {0, 0};
  Request r = ep.recv(kControl, theirs, sizeof(theirs));
  MYELIN_RETURN_IF_ERROR(wait(ctx, ep.send(kControl, mine, sizeof(mine)), "bidirectional: report"));
  MYELIN_RETURN_IF_ERROR(wait(ctx, r, "bidirectional: peer report"));
  const double bytes_per_s = mine[0] + theirs[0];
  res.seconds = seconds;
  res.gbps = bytes_per_s / 1e9;
  res.msgs_per_s = size > 0 ? bytes_per_s / static_cast<double>(size)
                            : (seconds > 0 ? 2.0 * static_cast<double>(cfg.iters) / seconds : 0);
  res.wrong += static_cast<uint64_t>(theirs[1]);
  return res;
}

Result<BandwidthResult> run_one_sided(Context& ctx, Endpoint& ep, OneSided op, bool initiator,
                                      size_t size, const RunConfig& cfg) {
  // `window` operations in flight over `nslots` slots of the region (local source or destination
  // and remote offset alike), used round robin.
  const size_t window = window_of(cfg, size, size_t{128} << 20);
  const size_t nslots = buffer_count(cfg, window, size, size_t{128} << 20);
  const size_t bytes = std::max<size_t>(size, 1) * nslots;
  MYELIN_ASSIGN_OR_RETURN(transport::MemoryRegion region, ctx.allocate(bytes));
  auto* base = static_cast<uint8_t*>(region.data());
  BandwidthResult res;
  res.size = size;
  res.iters = cfg.iters;
  // Slot j of a region: bytes [j * size, (j + 1) * size).
  auto slot_ok = [&](size_t j, uint64_t index, bool full) {
    const uint8_t* p = base + j * size;
    if (!check_stamp(p, size, index)) return false;
    if (!full) return true;
    const size_t head = std::min<size_t>(size, 8);
    const size_t tail = size >= 16 ? size - 8 : size;
    for (size_t i = head; i < tail; ++i) {
      if (p[i] != pattern_byte(i, size)) return false;
    }
    return true;
  };
  auto fill_slot = [&](size_t j, uint64_t index) {
    uint8_t* p = base + j * size;
    for (size_t i = 0; i < size; ++i) p[i] = pattern_byte(i, size);
    stamp(p, size, index);
  };

  if (!initiator) {
    // get: every slot holds the pattern stamped with its slot number.
    if (op == OneSided::kGet) {
      for (size_t j = 0; j < nslots; ++j) fill_slot(j, j);
    }
    const std::vector<uint8_t> key = region.remote_key().serialize();
    MYELIN_RETURN_IF_ERROR(wait(ctx, ep.send(kControl, key.data(), key.size()), "sending the key"));
    for (int phase = 0; phase < 2; ++phase) {
      const bool timed = phase == 1;
      const size_t first = timed ? cfg.warmup : 0;
      const size_t count = timed ? cfg.iters : cfg.warmup;
      // Serve (tcp needs our progress) until the initiator says the phase is complete.
      uint64_t done = 0;
      MYELIN_RETURN_IF_ERROR(wait(ctx, ep.recv(kControl, &done, 8), "waiting for the initiator"));
      uint64_t wrong = 0;
      if (op == OneSided::kPut && timed && count > 0) {
        // The last put into each slot is the one that must be there, every byte.
        const size_t end = first + count;
        for (size_t j = 0; j < nslots; ++j) {
          // The highest index below `end` that went into slot j, if this phase wrote it.
          const size_t back = ((end - 1) % nslots + nslots - j) % nslots;
          if (back > end - 1 || end - 1 - back < first) continue;
          if (!slot_ok(j, end - 1 - back, true)) ++wrong;
        }
      }
      MYELIN_RETURN_IF_ERROR(wait(ctx, ep.send(kControl, &wrong, 8), "reporting the check"));
    }
    ctx.deregister(region);
    return res;
  }

  std::vector<uint8_t> key_bytes(64 * 1024);
  Request kr = ep.recv(kControl, key_bytes.data(), key_bytes.size());
  MYELIN_RETURN_IF_ERROR(wait(ctx, kr, "waiting for the peer's key"));
  key_bytes.resize(kr.bytes());
  MYELIN_ASSIGN_OR_RETURN(transport::RemoteKey key, transport::RemoteKey::deserialize(key_bytes));
  if (op == OneSided::kPut) {
    for (size_t j = 0; j < nslots; ++j) fill_slot(j, 0);
  }
  std::vector<Request> reqs(window);
  for (int phase = 0; phase < 2; ++phase) {
    const bool timed = phase == 1;
    const size_t first = timed ? cfg.warmup : 0;
    const size_t count = timed ? cfg.iters : cfg.warmup;
    uint64_t wrong = 0;
    auto complete = [&](size_t i) -> Status {
      const size_t slot = i % nslots;
      MYELIN_RETURN_IF_ERROR(wait(ctx, reqs[i % window], op == OneSided::kPut ? "put" : "get"));
      if (op == OneSided::kGet && timed) {
        const size_t k = i - first;
        if (k == cfg.corrupt_at && size > 0) base[slot * size + size / 2] ^= 0x5A;
        if (!slot_ok(slot, slot, k == 0 || k == cfg.corrupt_at)) ++wrong;
      }
      return ok_status();
    };
    const uint64_t t0 = CycleTimer::now();
    for (size_t i = first; i < first + count; ++i) {
      const size_t slot = i % nslots;
      if (i - first >= window) MYELIN_RETURN_IF_ERROR(complete(i - window));
      uint8_t* p = base + slot * size;
      if (op == OneSided::kPut) {
        stamp(p, size, i);
        // The last put of the phase: nothing overwrites it before the target checks.
        if (timed && cfg.corrupt_at != SIZE_MAX && i + 1 == first + count && size > 0) {
          p[size / 2] ^= 0x5A;
        }
        reqs[i % window] = ep.put(p, size, key, slot * size, &region);
      } else {
        reqs[i % window] = ep.get(p, size, key, slot * size, &region);
      }
    }
    for (size_t i = first + count - std::min(count, window); i < first + count; ++i) {
      MYELIN_RETURN_IF_ERROR(complete(i));
    }
    const double seconds = CycleTimer::to_ns(CycleTimer::now() - t0) / 1e9;
    if (op == OneSided::kPut) {
      for (size_t j = 0; j < nslots; ++j) fill_slot(j, 0);  // undoes a fault injection
    }
    uint64_t n = count;
    MYELIN_RETURN_IF_ERROR(wait(ctx, ep.send(kControl, &n, 8), "phase done"));
    uint64_t peer_wrong = 0;
    MYELIN_RETURN_IF_ERROR(wait(ctx, ep.recv(kControl, &peer_wrong, 8), "peer check"));
    if (timed) {
      res.wrong = wrong + peer_wrong;
      res.seconds = seconds;
      if (seconds > 0) {
        res.gbps = static_cast<double>(size) * static_cast<double>(count) / seconds / 1e9;
        res.msgs_per_s = static_cast<double>(count) / seconds;
      }
    }
  }
  ctx.deregister(region);
  return res;
}

Result<size_t> parse_size(const std::string& text) {
  if (text.empty()) return invalid_argument("empty size");
  // Digits first: std::stoull would skip blanks and accept a sign ("-1K" wraps around).
  if (text[0] == '-') return invalid_argument("size '", text, "' is negative");
  if (!std::isdigit(static_cast<unsigned char>(text[0]))) {
    return invalid_argument("size '", text, "' is not a number");
  }
  size_t pos = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(text, &pos);
  } catch (const std::out_of_range&) {
    return invalid_argument("size '", text, "' is too large (at most 1T bytes)");
  } catch (...) {
    return invalid_argument("size '", text, "' is not a number");
  }
  unsigned shift = 0;
  if (pos < text.size()) {
    const char unit = static_cast<char>(std::toupper(static_cast<unsigned char>(text[pos])));
    shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 99;
    if (shift == 99) return invalid_argument("size '", text, "': unknown unit");
    ++pos;
    if (pos < text.size() && (text[pos] == 'B' || text[pos] == 'b')) ++pos;
  }
  if (pos != text.size()) return invalid_argument("size '", text, "' has trailing characters");
  if (v > (uint64_t{1} << 40) >> shift) {
    return invalid_argument("size '", text, "' is too large (at most 1T bytes)");
  }
  return static_cast<size_t>(v << shift);
}

Result<std::vector<size_t>> size_sweep(size_t begin, size_t end, size_t factor) {
  if (factor < 2) return invalid_argument("sweep factor ", factor, " must be at least 2");
  if (begin > end) return invalid_argument("sweep begin ", begin, " is above end ", end);
  std::vector<size_t> out;
  for (size_t s = begin;; s *= factor) {
    out.push_back(s);
    if (s == 0) {
      if (end == 0) break;
      s = 1;
      if (s > end) break;
      out.push_back(s);
    }
    if (s > end / factor) break;
  }
  return out;
}

std::string latency_json(const std::string& transport, const LatencyResult& r) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "{\"bench\":\"lat\",\"transport\":\"%s\",\"size\":%zu,\"iters\":%zu,"
                "\"p50_us\":%.3f,\"p99_us\":%.3f,\"p999_us\":%.3f,\"max_us\":%.3f,\"wrong\":%llu}",
                transport.c_str(), r.size, r.iters, r.p50_us, r.p99_us, r.p999_us, r.max_us,
                static_cast<unsigned long long>(r.wrong));
  return buf;
}

std::string bandwidth_json(const std::string& transport, const BandwidthResult& r) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "{\"bench\":\"bw\",\"transport\":\"%s\",\"size\":%zu,\"iters\":%zu,"
                "\"GBps\":%.4f,\"msgs_per_s\":%.1f,\"wrong\":%llu}",
                transport.c_str(), r.size, r.iters, r.gbps, r.msgs_per_s,
                static_cast<unsigned long long>(r.wrong));
  return buf;
}

std::string latency_header() {
  return "#     size(B)     iters   min(us)   avg(us)   p50(us)   p99(us) p99.9(us)   max(us)  "
         "#wrong";
}
std::string latency_row(const LatencyResult& r) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%13zu %9zu %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %7llu", r.size,
                r.iters, r.min_us, r.avg_us, r.p50_us, r.p99_us, r.p999_us, r.max_us,
                static_cast<unsigned long long>(r.wrong));
  return buf;
}
std::string bandwidth_header() {
  return "#     size(B)     iters      GB/s     Mmsg/s  #wrong";
}
std::string bandwidth_row(const BandwidthResult& r) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%13zu %9zu %9.3f %10.4f %7llu", r.size, r.iters, r.gbps,
                r.msgs_per_s / 1e6, static_cast<unsigned long long>(r.wrong));
  return buf;
}

}  // namespace myelin::bench
