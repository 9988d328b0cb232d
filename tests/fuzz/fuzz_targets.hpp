// Every parser of bytes from a broker peer, as one function per target. libFuzzer entry points
// (fuzz_*.cpp, built with clang by run.sh) and the g++ regression test (tests/broker) both call
// these, so the parsers are exercised in the normal test run too. Each must return without
// crashing, hanging or reading out of bounds on any input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <myelin/broker/frame.hpp>
#include <myelin/broker/server.hpp>

#include "wire.hpp"

namespace myelin::broker::fuzz {

// A byte stream of frames as a connection reads it, including chunks and batches.
inline void fuzz_frames(const uint8_t* data, size_t size) {
  DecodeLimits lim{.max_frame_payload = 1 << 16, .max_message = 1 << 20};
  internal::RxBuffer rx(lim, 4096);
  Reassembler re(lim);
  // Feed in two pieces so incremental decoding is exercised as well.
  const size_t half = size / 2;
  rx.append({reinterpret_cast<const std::byte*>(data), half});
  for (int pass = 0; pass < 2; ++pass) {
    while (true) {
      FrameView f;
      auto got = rx.next(&f);
      if (!got.ok() || !*got) break;
      if (f.header.flags & (kFlagMore | kFlagContinuation)) {
        AssembledMessage m;
        (void)re.add(f, &m);
      } else if (f.header.type == FrameType::kBatch) {
        (void)for_each_in_batch(f.payload, lim, [](const FrameView& in) {
          return in.topic.size() <= kMaxTopicLength ? ok_status() : internal_error("bad view");
        });
      }
    }
    if (pass == 0) rx.append({reinterpret_cast<const std::byte*>(data) + half, size - half});
  }
}

// A batch payload on its own.
inline void fuzz_batch(const uint8_t* data, size_t size) {
  (void)for_each_in_batch({reinterpret_cast<const std::byte*>(data), size}, DecodeLimits{},
                          [](const FrameView&) { return ok_status(); });
}

// The handshake: hello, auth, attach and auth_ok frames and their protocol version ranges, plus
// the topic and pattern syntax.
inline void fuzz_handshake(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  FrameView f;
  size_t used = 0;
  auto r = decode_frame(in, DecodeLimits{}, &f, &used);
  if (r.ok() && *r == DecodeOutcome::kFrame) {
    (void)parse_hello(f);
    (void)parse_auth(f);
    (void)parse_attach(f);
    (void)parse_auth_ok(f);
    auto v = decode_versions(f.header.seq);
    if (v.ok()) (void)negotiate_version(VersionRange{}, *v, "peer");
  }
  const std::string_view text(reinterpret_cast<const char*>(data), std::min<size_t>(size, 300));
  (void)validate_topic(text);
  if (validate_pattern(text).ok()) (void)topic_matches(text, "grad/layer3/shard0");
}

// HTTP request heads (the /metrics and /healthz port).
inline void fuzz_http(const uint8_t* data, size_t size) {
  std::string path;
  (void)parse_http_get(std::string_view(reinterpret_cast<const char*>(data), size), &path);
}

}  // namespace myelin::broker::fuzz
