#include <gtest/gtest.h>

#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include <myelin/broker/frame.hpp>
#include <myelin/broker/sequence.hpp>

#include "wire.hpp"

namespace myelin::broker {
namespace {

std::span<const std::byte> bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

std::vector<std::byte> one(FrameHeader h, std::string_view topic, std::string_view payload) {
  std::vector<std::byte> out;
  EXPECT_TRUE(append_frame(out, h, topic, bytes(payload)).ok());
  return out;
}

TEST(Frame, RoundTripAndIncremental) {
  FrameHeader h{
      .type = FrameType::kPublish, .flags = kFlagControl, .seq = 42, .id = 7, .timestamp_ns = 99};
  auto buf = one(h, "grad/layer3/shard0", "payload");
  for (size_t cut = 0; cut < buf.size(); ++cut) {
    FrameView f;
    size_t used = 0;
    auto r = decode_frame(std::span(buf).first(cut), {}, &f, &used);
    ASSERT_TRUE(r.ok()) << cut << ": " << r.status();
    EXPECT_EQ(*r, DecodeOutcome::kNeedMore);
  }
  FrameView f;
  size_t used = 0;
  auto r = decode_frame(buf, {}, &f, &used);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(*r, DecodeOutcome::kFrame);
  EXPECT_EQ(used, buf.size());
  EXPECT_EQ(f.topic, "grad/layer3/shard0");
  EXPECT_EQ(f.header.seq, 42u);
  EXPECT_EQ(f.header.id, 7u);
  EXPECT_EQ(f.header.timestamp_ns, 99u);
  EXPECT_TRUE(f.control());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.payload.data()), f.payload.size()),
            "payload");
}

// A bad magic is shown in hexadecimal, with the one expected.
TEST(Frame, BadMagicIsReportedInHex) {
  std::vector<std::byte> b = one(FrameHeader{.type = FrameType::kPublish}, "a/b", "x");
  b[0] = std::byte{0};
  FrameView f;
  size_t used = 0;
  auto r = decode_frame(b, {}, &f, &used);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().to_string().find("bad frame magic 0x424c5900 (expected 0x424c594d)"),
            std::string::npos)
      << r.status();
}

TEST(Frame, RejectsCorruption) {
  FrameHeader h{.type = FrameType::kPublish};
  const auto good = one(h, "a/b", "x");
  auto expect_bad = [](std::vector<std::byte> b, const char* what) {
    FrameView f;
    size_t used = 0;
    auto r = decode_frame(b, {.max_frame_payload = 1024}, &f, &used);
    EXPECT_FALSE(r.ok()) << what;
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kProtocolError) << what;
    }
  };
  auto b = good;
  b[0] = std::byte{0};
  expect_bad(b, "magic");
  b = good;
  b[4] = std::byte{2};
  expect_bad(b, "version");
  b = good;
  b[5] = std::byte{0};
  expect_bad(b, "type 0");
  b = good;
  b[5] = std::byte{200};
  expect_bad(b, "type 200");
  b = good;
  b[6] = std::byte{0x80};
  expect_bad(b, "flags");
  b = good;
  b[7] = std::byte{1};
  expect_bad(b, "reserved");
  b = good;
  b[14] = std::byte{1};
  expect_bad(b, "payload over limit");
  b = good;
  b[40] = std::byte{'#'};
  expect_bad(b, "wildcard in a published topic");
  b = good;
  b[6] = std::byte{kFlagControl | kFlagMore};
  expect_bad(b, "chunked control");
}

TEST(Frame, BatchKeepsBoundariesAndRefusesNesting) {
  std::vector<std::byte> inner;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(append_frame(inner,
                             {.type = FrameType::kDeliver, .seq = static_cast<uint64_t>(i + 1)},
                             "t/x", bytes(std::string(static_cast<size_t>(i), 'a')))
                    .ok());
  }
  std::vector<size_t> sizes;
  ASSERT_TRUE(for_each_in_batch(inner, {}, [&](const FrameView& f) {
                sizes.push_back(f.payload.size());
                return ok_status();
              }).ok());
  EXPECT_EQ(sizes, (std::vector<size_t>{0, 1, 2, 3, 4}));
  auto truncated = inner;
  truncated.pop_back();
  EXPECT_FALSE(for_each_in_batch(truncated, {}, [](const FrameView&) { return ok_status(); }).ok());
  std::vector<std::byte> nested;
  ASSERT_TRUE(append_frame(nested, {.type = FrameType::kBatch}, "", inner).ok());
  EXPECT_FALSE(for_each_in_batch(nested, {}, [](const FrameView&) { return ok_status(); }).ok());
  EXPECT_FALSE(for_each_in_batch({}, {}, [](const FrameView&) { return ok_status(); }).ok());
}

// Inner frames that repeat the topic of the frame before them are not validated again; any other
// topic is, whatever came before it (a topic of the same length with one bad byte, a topic after
// a frame that had none or a pattern).
TEST(Frame, BatchValidatesEveryTopicThatDiffers) {
  auto batch = [](std::vector<std::pair<FrameType, std::string>> frames) {
    std::vector<std::byte> inner;
    for (auto& [type, topic] : frames) {
      EXPECT_TRUE(append_frame(inner, {.type = type}, topic, bytes("p")).ok());
    }
    std::vector<std::string> seen;
    Status s = for_each_in_batch(inner, {}, [&](const FrameView& f) {
      seen.emplace_back(f.topic);
      return ok_status();
    });
    return std::make_pair(s, seen);
  };
  auto [good, seen] = batch({{FrameType::kPublish, "grad/x"},
                             {FrameType::kPublish, "grad/x"},
                             {FrameType::kDeliver, "grad/x"},
                             {FrameType::kPublish, "grad/y"},
                             {FrameType::kPublish, "grad/y"}});
  EXPECT_TRUE(good.ok()) << good;
  EXPECT_EQ(seen, (std::vector<std::string>{"grad/x", "grad/x", "grad/x", "grad/y", "grad/y"}));
  for (const std::string bad : {"grad/ ", "grad//", "grad/x/", "$"}) {
    SCOPED_TRACE(bad);
    EXPECT_EQ(batch({{FrameType::kPublish, "grad/x"}, {FrameType::kPublish, bad}}).first.code(),
              StatusCode::kProtocolError);
    EXPECT_EQ(batch({{FrameType::kPublish, "grad/x"},
                     {FrameType::kPublish, "grad/x"},
                     {FrameType::kRequest, bad}})
                  .first.code(),
              StatusCode::kProtocolError);
  }
  // A reply carries no topic to check; the next publish's topic is still checked.
  EXPECT_EQ(batch({{FrameType::kReply, "grad/ "}, {FrameType::kPublish, "grad/ "}}).first.code(),
            StatusCode::kProtocolError);
  EXPECT_EQ(batch({{FrameType::kPublish, "grad/x"}, {FrameType::kPublish, ""}}).first.code(),
            StatusCode::kProtocolError);
}

TEST(Handshake, VersionRangesAndNegotiation) {
  EXPECT_EQ(decode_versions(0)->min, 1u);  // peers older than protocol 2 send nothing
  EXPECT_EQ(decode_versions(0)->max, 1u);
  const uint64_t ours = encode_versions(VersionRange{});
  EXPECT_EQ(decode_versions(ours)->min, kMinProtocolVersion);
  EXPECT_EQ(decode_versions(ours)->max, kProtocolVersion);
  EXPECT_EQ(decode_versions(encode_versions({3, 2})).status().code(), StatusCode::kProtocolError);
  EXPECT_EQ(decode_versions(encode_versions({0, 2})).status().code(), StatusCode::kProtocolError);
  EXPECT_EQ(*negotiate_version(VersionRange{}, {1, 1}, "old"), 1u);
  EXPECT_EQ(*negotiate_version(VersionRange{}, {1, 9}, "newer"), kProtocolVersion);
  auto none = negotiate_version(VersionRange{}, {7, 9}, "the broker at x");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(none.status().message().find("7..9"), std::string_view::npos) << none.status();
  EXPECT_NE(none.status().message().find("upgrade this side"), std::string_view::npos);
}

TEST(Handshake, AttachAndAuthOkPayloads) {
  std::string body(kNonceSize + kMacSize, 'n');
  auto parse = [&](FrameHeader h, std::string_view topic, std::string_view payload) {
    auto buf = one(h, topic, payload);
    FrameView f;
    size_t used = 0;
    auto r = decode_frame(buf, DecodeLimits{}, &f, &used);
    EXPECT_TRUE(r.ok() && *r == DecodeOutcome::kFrame);
    return parse_attach(f);
  };
  const uint64_t v = encode_versions(VersionRange{});
  auto ok = parse({.type = FrameType::kAttach, .seq = v, .id = 5}, "worker0", body);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->session, 5u);
  EXPECT_EQ(ok->identity, "worker0");
  EXPECT_EQ(ok->versions.max, kProtocolVersion);
  EXPECT_FALSE(parse({.type = FrameType::kAttach, .seq = v, .id = 0}, "w", body).ok());
  EXPECT_FALSE(parse({.type = FrameType::kAttach, .seq = 0, .id = 5}, "w", body).ok());  // v1
  EXPECT_FALSE(parse({.type = FrameType::kAttach, .seq = v, .id = 5}, "w", "short").ok());
  EXPECT_FALSE(parse({.type = FrameType::kAttach, .seq = v, .id = 5}, "", body).ok());
  EXPECT_FALSE(parse({.type = FrameType::kAuth, .seq = v, .id = 5}, "w", body).ok());

  for (size_t size : {kMacSize, kMacSize + kSessionTokenSize, kMacSize + 1, size_t{0}}) {
    std::string p(size, 't');
    auto buf = one({.type = FrameType::kAuthOk}, {}, p);
    FrameView f;
    size_t used = 0;
    ASSERT_TRUE(decode_frame(buf, DecodeLimits{}, &f, &used).ok());
    auto r = parse_auth_ok(f);
    const bool valid = size == kMacSize || size == kMacSize + kSessionTokenSize;
    EXPECT_EQ(r.ok(), valid) << size;
    if (valid) {
      EXPECT_EQ(r->has_token, size > kMacSize);
    }
  }
  // Handshake frames never travel inside a batch.
  std::vector<std::byte> inner;
  ASSERT_TRUE(
      append_frame(inner, {.type = FrameType::kAttach, .seq = v, .id = 5}, "w", bytes(body)).ok());
  EXPECT_FALSE(
      for_each_in_batch(inner, DecodeLimits{}, [](const FrameView&) { return ok_status(); }).ok());
}

TEST(Topic, ValidationAndWildcards) {
  EXPECT_TRUE(validate_topic("grad/layer3/shard0").ok());
  EXPECT_TRUE(validate_topic("$pressure/a").ok());
  EXPECT_FALSE(validate_topic("").ok());
  EXPECT_FALSE(validate_topic("a//b").ok());
  EXPECT_FALSE(validate_topic("a/*").ok());
  EXPECT_FALSE(validate_topic("a/b$").ok());
  EXPECT_FALSE(validate_topic(std::string(300, 'a')).ok());
  EXPECT_TRUE(validate_pattern("grad/*/shard0").ok());
  EXPECT_TRUE(validate_pattern("grad/#").ok());
  EXPECT_FALSE(validate_pattern("grad/#/x").ok());
  EXPECT_TRUE(topic_matches("grad/*/shard0", "grad/layer3/shard0"));
  EXPECT_FALSE(topic_matches("grad/*/shard0", "grad/layer3/shard1"));
  EXPECT_FALSE(topic_matches("grad/*", "grad/a/b"));
  EXPECT_TRUE(topic_matches("grad/#", "grad/a/b"));
  EXPECT_FALSE(topic_matches("grad/#", "grad"));
  EXPECT_TRUE(topic_matches("#", "ctrl/step"));
  EXPECT_FALSE(topic_matches("#", "$pressure/x"));
  EXPECT_TRUE(topic_matches("$pressure/#", "$pressure/x/y"));
}

// topic_matches against a plain level-by-level reference, over every pattern and topic of up to
// three characters from an alphabet of level characters, separators and wildcards (valid or
// not), and some longer patterns against every topic of up to four.
bool reference_matches(std::string_view pattern, std::string_view topic) {
  auto levels = [](std::string_view s) {
    std::vector<std::string_view> out;
    size_t start = 0;
    while (true) {
      const size_t e = s.find('/', start);
      out.push_back(
          s.substr(start, e == std::string_view::npos ? std::string_view::npos : e - start));
      if (e == std::string_view::npos) return out;
      start = e + 1;
    }
  };
  if (!topic.empty() && topic[0] == '$' && !pattern.empty() &&
      (pattern[0] == '*' || pattern[0] == '#')) {
    return false;
  }
  const auto p = levels(pattern), t = levels(topic);
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == "#") return i < t.size();  // one or more levels remain
    if (i >= t.size()) return false;
    if (p[i] != "*" && p[i] != t[i]) return false;
  }
  return p.size() == t.size();
}

TEST(Topic, MatchingAgreesWithAReference) {
  const std::string alphabet = "ab/*#$";
  std::vector<std::string> all = {""};
  for (size_t len = 1, from = 0; len <= 4; ++len) {
    const size_t to = all.size();
    for (size_t i = from; i < to; ++i) {
      for (char c : alphabet) all.push_back(all[i] + c);
    }
    from = to;
  }
  size_t checked = 0, matched = 0;
  for (const std::string& p : all) {
    if (p.size() > 3) break;  // `all` goes by length
    for (const std::string& t : all) {
      if (t.size() > 3) break;
      const bool want = reference_matches(p, t);
      ASSERT_EQ(topic_matches(p, t), want) << "pattern '" << p << "' topic '" << t << "'";
      ++checked;
      matched += want;
    }
  }
  for (const char* p : {"a/#", "*/b", "a/*/b", "#", "*", "ab", "a/b", "*/*/#", "$a/#", "a//b"}) {
    for (const std::string& t : all) {
      ASSERT_EQ(topic_matches(p, t), reference_matches(p, t))
          << "pattern '" << p << "' topic '" << t << "'";
    }
  }
  EXPECT_GT(matched, 500u);
  EXPECT_GT(checked, matched);
}

// Keys that alternate, come back after others and are forgotten; copies and moves go on with
// their own state.
TEST(Sequence, GapDetectionWithInterleavedKeys) {
  GapDetector g;
  EXPECT_EQ(g.observe("a", 1).missed, 0u);
  EXPECT_EQ(g.observe("a", 2).missed, 0u);
  EXPECT_EQ(g.observe("b", 5).missed, 0u);
  EXPECT_EQ(g.observe("a", 4).missed, 1u);
  EXPECT_EQ(g.observe("b", 9).missed, 3u);
  EXPECT_EQ(g.observe("b", 10).missed, 0u);
  EXPECT_TRUE(g.observe("a", 4).duplicate_or_old);
  GapDetector copy = g;
  g.forget("b");
  EXPECT_EQ(g.observe("b", 20).missed, 0u);  // a new baseline
  EXPECT_EQ(copy.observe("b", 20).missed, 9u);
  EXPECT_EQ(copy.observe("a", 6).missed, 1u);
  GapDetector moved = std::move(copy);
  EXPECT_EQ(moved.observe("a", 8).missed, 1u);
  EXPECT_EQ(moved.observe("b", 21).missed, 0u);
  EXPECT_EQ(g.observe("a", 5).missed, 0u);
  EXPECT_EQ(g.missed_total(), 4u);
  EXPECT_EQ(moved.missed_total(), 4u + 9u + 1u + 1u);
}

TEST(Sequence, GapDetectionAcrossWrapAround) {
  GapDetector g;
  const uint64_t near = UINT64_MAX - 2;
  EXPECT_EQ(g.observe("t", near).missed, 0u);
  EXPECT_EQ(g.observe("t", near + 1).missed, 0u);
  EXPECT_EQ(g.observe("t", 1).missed, 2u);  // skipped UINT64_MAX and 0
  EXPECT_TRUE(g.observe("t", near).duplicate_or_old);
  EXPECT_EQ(g.observe("u", 10).missed, 0u);
  EXPECT_EQ(g.missed_total(), 2u);
  EXPECT_TRUE(seq_before(UINT64_MAX, 3));
}

// A connected pair of non-blocking local stream sockets; `sndbuf` > 0 caps a's send buffer.
// ok is false when the pair could not be made.
struct LocalPair {
  internal::Fd a, b;
  bool ok = false;
};
LocalPair local_pair(int sndbuf = 0) {
  LocalPair p;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return p;
  p.a = internal::Fd(sv[0]);
  p.b = internal::Fd(sv[1]);
  p.ok =
      internal::set_nonblocking(p.a.get()).ok() && internal::set_nonblocking(p.b.get()).ok() &&
      (sndbuf <= 0 || ::setsockopt(p.a.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)) == 0);
  return p;
}

TEST(Wire, AClosedPeerIsAnErrorNotSigpipe) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  internal::Fd a(sv[0]);
  ::close(sv[1]);  // the peer is gone before we write
  ASSERT_TRUE(internal::set_nonblocking(a.get()).ok());
  internal::OutQueue q;
  std::string payload(100, 'x');
  ASSERT_TRUE(
      q.push({.type = FrameType::kDeliver, .id = 1}, "t", bytes(payload), nullptr, false, 0).ok());
  // With SIGPIPE at its default action a plain write would kill this test process.
  Result<bool> r = q.flush(a.get());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kPeerFailed) << r.status();
}

TEST(Wire, ChunksBatchesAndLanesSurviveASocketPair) {
  auto [a, b, made] = local_pair();
  ASSERT_TRUE(made);
  internal::OutQueue q(
      internal::OutOptions{.chunk_size = 1024, .batch_bytes = 4096, .batch_count = 8});
  auto big = std::make_shared<std::vector<std::byte>>(10000);
  for (size_t i = 0; i < big->size(); ++i) (*big)[i] = static_cast<std::byte>(i * 7);
  ASSERT_TRUE(q.push({.type = FrameType::kDeliver, .id = 1}, "bulk/x", *big, big, false, 0).ok());
  for (int i = 0; i < 20; ++i) {
    std::string s(static_cast<size_t>(i), 'c');
    ASSERT_TRUE(
        q.push(
             {.type = FrameType::kDeliver, .flags = kFlagControl, .seq = static_cast<uint64_t>(i)},
             "ctrl/x", bytes(s), nullptr, true, 0)
            .ok());
  }
  EXPECT_FALSE(
      q.push({.type = FrameType::kDeliver, .flags = kFlagControl}, "ctrl/x", *big, big, false, 0)
          .ok());
  q.close_due_batches(0, true);
  internal::RxBuffer rx(DecodeLimits{});
  Reassembler re;
  std::vector<uint64_t> control_seqs;
  std::vector<std::byte> got_big;
  size_t control_before_big = 0;
  const Deadline d = Deadline::after_ms(5000);
  while ((control_seqs.size() < 20 || got_big.empty()) && !d.expired()) {
    ASSERT_TRUE(q.flush(a.get()).ok());
    ASSERT_TRUE(rx.read_from(b.get()).ok());
    FrameView f;
    while (true) {
      auto r = rx.next(&f);
      ASSERT_TRUE(r.ok()) << r.status();
      if (!*r) break;
      auto handle = [&](const FrameView& x) {
        if (x.header.flags & (kFlagMore | kFlagContinuation)) {
          AssembledMessage m;
          auto done = re.add(x, &m);
          EXPECT_TRUE(done.ok());
          if (done.ok() && *done) got_big = *m.payload;
        } else {
          control_seqs.push_back(x.header.seq);
          EXPECT_EQ(x.payload.size(), x.header.seq);
          if (got_big.empty()) control_before_big++;
        }
        return ok_status();
      };
      if (f.header.type == FrameType::kBatch)
        ASSERT_TRUE(for_each_in_batch(f.payload, {}, handle).ok());
      else
        ASSERT_TRUE(handle(f).ok());
    }
  }
  ASSERT_EQ(control_seqs.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(control_seqs[i], i);
  EXPECT_EQ(got_big, *big);
  EXPECT_EQ(control_before_big, 20u);  // control went ahead of the queued bulk message
  EXPECT_GE(q.batches_sent(), 2u);
  EXPECT_EQ(q.chunks_sent(), 10u);
}

// A receive block is written again in place only once every frame handed out from it was let go,
// and after the last reads of whoever held them on another thread (the server's loop and control
// thread drop each other's blocks): each reader sees the bytes of its own frame, and TSan sees the
// rewrite ordered after those reads. The hand-back is relaxed on purpose: only the block's own
// reference count may order the reuse.
TEST(Wire, ReceiveBlockReusedOnlyAfterAnotherThreadLetGo) {
  internal::RxBuffer rx(DecodeLimits{});
  struct Handed {
    std::shared_ptr<const void> owner;
    std::span<const std::byte> payload;
    std::byte fill;
  };
  constexpr int kRounds = 200;
  std::atomic<Handed*> handoff{nullptr};
  std::atomic<int> let_go{0};  // relaxed: orders nothing (see above)
  std::atomic<int> wrong{0};
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    for (int i = 0; i < kRounds; ++i) {
      Handed* h = nullptr;
      // Acquire: pairs with the release store of the handoff below.
      while (!(h = handoff.exchange(nullptr, std::memory_order_acquire))) {
        if (stop.load(std::memory_order_relaxed)) return;
        std::this_thread::yield();
      }
      for (std::byte b : h->payload) {
        if (b != h->fill) {
          wrong.fetch_add(1, std::memory_order_relaxed);
          break;
        }
      }
      delete h;
      let_go.store(i + 1, std::memory_order_relaxed);
    }
  });
  struct Join {
    std::thread& t;
    std::atomic<bool>& stop;
    ~Join() {
      stop.store(true, std::memory_order_relaxed);
      t.join();
    }
  } join{reader, stop};
  for (int i = 0; i < kRounds; ++i) {
    const std::string payload(1000, static_cast<char>('a' + i % 26));
    rx.append(one({.type = FrameType::kPublish}, "t/x", payload));
    FrameView f;
    auto got = rx.next(&f);
    ASSERT_TRUE(got.ok() && *got);
    handoff.store(new Handed{rx.owner(), f.payload, static_cast<std::byte>(payload[0])},
                  std::memory_order_release);
    const Deadline d = Deadline::after_ms(10000);
    while (let_go.load(std::memory_order_relaxed) != i + 1) {
      ASSERT_FALSE(d.expired()) << "the reader did not let go of round " << i;
      std::this_thread::yield();
    }
    got = rx.next(&f);  // nothing more: the block is rewound for the next round
    ASSERT_TRUE(got.ok() && !*got);
  }
  EXPECT_EQ(wrong.load(), 0);
}

TEST(Wire, BatchingNeverHoldsALoneMessage) {
  internal::OutQueue q(internal::OutOptions{.batch_window_ns = 200'000});
  const std::string p(100, 'x');
  const FrameHeader h{.type = FrameType::kDeliver};
  // The first message, and one a whole window after the previous, go out at once.
  ASSERT_TRUE(q.push(h, "t", bytes(p), nullptr, true, 1'000'000).ok());
  EXPECT_TRUE(q.has_unsent());
  EXPECT_EQ(q.next_batch_deadline(), INT64_MAX);
  // One in close succession opens a batch that closes at its window ...
  ASSERT_TRUE(q.push(h, "t", bytes(p), nullptr, true, 1'010'000).ok());
  EXPECT_EQ(q.next_batch_deadline(), 1'210'000);
  ASSERT_TRUE(q.push(h, "t", bytes(p), nullptr, true, 1'300'000).ok());
  EXPECT_EQ(q.next_batch_deadline(), 1'210'000);  // ... whatever follows meanwhile
  q.close_due_batches(1'210'000);
  EXPECT_EQ(q.next_batch_deadline(), INT64_MAX);
  EXPECT_EQ(q.batches_sent(), 1u);
  ASSERT_TRUE(q.push(h, "t", bytes(p), nullptr, true, 2'000'000).ok());
  EXPECT_EQ(q.next_batch_deadline(), INT64_MAX);
}

TEST(Wire, PushAndFlushWritesThroughAndFinishesAStartedFrame) {
  auto [a, b, made] = local_pair(4096);
  ASSERT_TRUE(made);
  internal::OutQueue q;
  // Nothing queued: written straight from the caller's buffer, nothing kept.
  std::string lone(300, 'l');
  auto r = q.push_and_flush(a.get(), {.type = FrameType::kDeliver, .flags = kFlagControl, .seq = 1},
                            "ctrl/a", bytes(lone), nullptr, false, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(*r);
  EXPECT_TRUE(q.empty());
  // A bulk message larger than the socket takes: the rest is copied and queued, marked started,
  // and a control message pushed next must not cut into it.
  std::string bulk(60000, 'b');
  for (size_t i = 0; i < bulk.size(); ++i) bulk[i] = static_cast<char>('a' + i % 26);
  r = q.push_and_flush(a.get(), {.type = FrameType::kDeliver, .seq = 2}, "grad/b", bytes(bulk),
                       nullptr, false, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(*r);
  bulk.assign(bulk.size(), '?');  // the queued rest must not point into the caller's buffer
  std::string ctrl(50, 'c');
  r = q.push_and_flush(a.get(), {.type = FrameType::kDeliver, .flags = kFlagControl, .seq = 3},
                       "ctrl/c", bytes(ctrl), nullptr, false, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  internal::RxBuffer rx(DecodeLimits{});
  std::vector<uint64_t> order;
  const Deadline d = Deadline::after_ms(5000);
  while (order.size() < 3 && !d.expired()) {
    ASSERT_TRUE(q.flush(a.get()).ok());
    ASSERT_TRUE(rx.read_from(b.get()).ok());
    FrameView f;
    while (true) {
      auto got = rx.next(&f);
      ASSERT_TRUE(got.ok()) << got.status();
      if (!*got) break;
      order.push_back(f.header.seq);
      if (f.header.seq == 2) {
        ASSERT_EQ(f.payload.size(), 60000u);
        for (size_t i = 0; i < f.payload.size(); ++i) {
          ASSERT_EQ(static_cast<char>(f.payload[i]), static_cast<char>('a' + i % 26)) << i;
        }
      }
    }
  }
  EXPECT_EQ(order, (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_TRUE(q.empty());
}

// Once the socket refused a write, push_and_flush() only queues until flush() (the caller's
// wait for room) has written what waits, even after the peer made room: one refused or sliver
// sendmsg per message is what a producer ahead of its reader would otherwise pay. Every byte
// still arrives, in order, and writing through resumes once the queue is empty.
TEST(Wire, PushAndFlushLeavesAFullSocketToTheFlush) {
  auto [a, b, made] = local_pair(4096);
  ASSERT_TRUE(made);
  internal::OutQueue q;
  const std::string payload(1000, 'p');
  uint64_t seq = 0;
  auto push = [&] {
    return q.push_and_flush(a.get(), {.type = FrameType::kDeliver, .seq = ++seq}, "t/x",
                            bytes(payload), nullptr, false, 0);
  };
  // Fill the socket until it refuses.
  Result<bool> r = true;
  while (true) {
    r = push();
    ASSERT_TRUE(r.ok()) << r.status();
    if (!*r) break;
    ASSERT_LT(seq, 100000u) << "the socket never filled";
  }
  internal::RxBuffer rx(DecodeLimits{});
  std::vector<uint64_t> got;
  auto drain = [&] {
    while (true) {
      auto n = rx.read_from(b.get());
      ASSERT_TRUE(n.ok()) << n.status();
      if (*n == 0) break;
    }
    FrameView f;
    while (true) {
      auto one_frame = rx.next(&f);
      ASSERT_TRUE(one_frame.ok()) << one_frame.status();
      if (!*one_frame) break;
      got.push_back(f.header.seq);
    }
  };
  drain();  // room again, but the queue does not ask the socket
  const uint64_t written = q.bytes_written();
  for (int k = 0; k < 5; ++k) {
    r = push();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE(*r);
  }
  EXPECT_EQ(q.bytes_written(), written);
  // The flush writes them; then push_and_flush writes through again.
  const Deadline d = Deadline::after_ms(5000);
  while (!d.expired()) {
    auto f = q.flush(a.get());
    ASSERT_TRUE(f.ok()) << f.status();
    drain();
    if (*f) break;
  }
  ASSERT_TRUE(q.empty());
  r = push();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(*r);
  drain();
  ASSERT_EQ(got.size(), seq);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], i + 1);
}

TEST(Wire, BulkBudgetHoldsBulkButNeverControl) {
  auto [a, b, made] = local_pair();
  ASSERT_TRUE(made);
  internal::OutQueue q(internal::OutOptions{.chunk_size = 1024});
  auto big = std::make_shared<std::vector<std::byte>>(3000);  // three chunks
  ASSERT_TRUE(q.push({.type = FrameType::kDeliver, .seq = 1}, "bulk/x", *big, big, false, 0).ok());
  ASSERT_TRUE(q.push({.type = FrameType::kDeliver, .flags = kFlagControl, .seq = 2}, "ctrl/x",
                     bytes("c"), nullptr, false, 0)
                  .ok());
  auto drain = [&] {
    internal::RxBuffer rx(DecodeLimits{});
    std::vector<std::pair<uint64_t, size_t>> got;  // (seq, payload bytes) per frame
    EXPECT_TRUE(rx.read_from(b.get()).ok());
    FrameView f;
    while (true) {
      auto r = rx.next(&f);
      EXPECT_TRUE(r.ok());
      if (!r.ok() || !*r) break;
      got.emplace_back(f.header.seq, f.payload.size());
    }
    return got;
  };
  // No budget: control goes out, bulk stays, and the queue says why.
  const uint64_t before = q.bytes_written();
  auto r = q.flush(a.get(), 0);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  EXPECT_TRUE(q.window_limited());
  EXPECT_EQ(drain(), (std::vector<std::pair<uint64_t, size_t>>{{2, 1}}));
  EXPECT_EQ(q.bytes_written() - before, kFrameHeaderSize + 6 + 1);
  // A budget of one byte starts (and so finishes) exactly one chunk.
  r = q.flush(a.get(), 1);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(q.window_limited());
  EXPECT_EQ(drain(), (std::vector<std::pair<uint64_t, size_t>>{{1, 1024}}));
  // Enough budget: the rest.
  r = q.flush(a.get(), 1 << 20);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r);
  EXPECT_FALSE(q.window_limited());
  EXPECT_EQ(drain(), (std::vector<std::pair<uint64_t, size_t>>{{1, 1024}, {1, 952}}));
  EXPECT_TRUE(q.empty());
}

TEST(Reassembler, RefusesInterleavingAndOversize) {
  Reassembler re({.max_frame_payload = 1024, .max_message = 8});
  FrameView cont;
  cont.header = {.type = FrameType::kDeliver, .flags = kFlagContinuation, .id = 1};
  AssembledMessage m;
  EXPECT_FALSE(re.add(cont, &m).ok());
  FrameView first;
  std::string p = "abcdef";
  first.header = {.type = FrameType::kDeliver, .flags = kFlagMore, .id = 1};
  first.topic = "a";
  first.payload = bytes(p);
  ASSERT_TRUE(re.add(first, &m).ok());
  EXPECT_FALSE(re.add(first, &m).ok());  // a second first chunk
  Reassembler re2({.max_frame_payload = 1024, .max_message = 8});
  ASSERT_TRUE(re2.add(first, &m).ok());
  cont.header.flags = kFlagContinuation;
  cont.payload = bytes(p);
  EXPECT_FALSE(re2.add(cont, &m).ok());  // 12 bytes > 8
}

// A chunked message holds at most twice its size: the reservation made at its first chunk (for
// a message that may grow to 1 MiB) is not kept by a small one, which a queue or an application
// may hold for long.
TEST(Reassembler, SmallChunkedMessageDoesNotKeepTheReservation) {
  Reassembler re;
  const std::string part(40 * 1024, 'r');
  FrameView first;
  first.header = {.type = FrameType::kDeliver, .flags = kFlagMore, .id = 3};
  first.topic = "bulk/x";
  first.payload = bytes(part);
  AssembledMessage m;
  auto r = re.add(first, &m);
  ASSERT_TRUE(r.ok() && !*r);
  FrameView last = first;
  last.header.flags = kFlagContinuation;
  r = re.add(last, &m);
  ASSERT_TRUE(r.ok() && *r) << (r.ok() ? "not complete" : r.status().to_string());
  ASSERT_EQ(m.payload->size(), 2 * part.size());
  EXPECT_LE(m.payload->capacity(), 2 * m.payload->size());
  EXPECT_EQ(m.header.payload_len, 2 * part.size());
}

// spin_until (the spin of spin_before_block_us): it returns what a look found, 0 at its end, a
// failed look's -1 with errno, and 0 early once a yield kept it off the CPU past kSpinGiveUpNs.
// The first two cases never give up (on a loaded host any yield may take longer than that).
TEST(SpinUntil, FindsEndsAndPassesErrorsOn) {
  constexpr int64_t kNever = INT64_MAX;
  int looks = 0;
  EXPECT_EQ(internal::spin_until([&] { return ++looks == 3 ? 2 : 0; },
                                 monotonic_ns() + 10'000'000'000, kNever),
            2);
  EXPECT_EQ(looks, 3);
  const int64_t start = monotonic_ns();
  looks = 0;
  EXPECT_EQ(internal::spin_until([&] { return ++looks, 0; }, start + 2'000'000, kNever), 0);
  EXPECT_GE(monotonic_ns() - start, 2'000'000);
  EXPECT_GT(looks, 1);
  epoll_event ev;
  errno = 0;
  EXPECT_EQ(internal::spin_until([&] { return ::epoll_wait(-1, &ev, 1, 0); },
                                 monotonic_ns() + 10'000'000'000),
            -1);
  EXPECT_EQ(errno, EBADF);
}

TEST(SpinUntil, GivesUpWhenAnotherThreadWantsTheCpu) {
  // Both threads on one CPU: the spinner's yields hand it to the busy thread, which keeps it
  // for a time slice (far more than kSpinGiveUpNs), so the spin ends long before its 20 s.
  const int cpu = ::sched_getcpu();
  ASSERT_GE(cpu, 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  std::atomic<bool> stop{false};
  std::atomic<bool> busy_pinned{false};
  std::thread busy([&] {
    busy_pinned = ::pthread_setaffinity_np(::pthread_self(), sizeof(one), &one) == 0;
    while (!stop.load(std::memory_order_relaxed)) {
    }
  });
  int64_t took = -1;
  int result = -2;
  std::thread spinner([&] {
    if (::pthread_setaffinity_np(::pthread_self(), sizeof(one), &one) != 0) return;
    const int64_t start = monotonic_ns();
    result = internal::spin_until([] { return 0; }, start + 20'000'000'000);
    took = monotonic_ns() - start;
  });
  spinner.join();
  stop = true;
  busy.join();
  ASSERT_TRUE(busy_pinned.load());
  EXPECT_EQ(result, 0);
  EXPECT_GE(took, 0);
  EXPECT_LT(took, 5'000'000'000) << "the spin did not give up the CPU";
}

}  // namespace
}  // namespace myelin::broker
