// UCX backend: two BackendContexts in one process, connected to each other, under each UCX_TLS
// setting of kTlsSettings.
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include <myelin/transport/memory.hpp>

#include "ucx/ucx_endpoint.hpp"
#include "ucx/ucx_memory.hpp"
#include "ucx/ucx_worker.hpp"
#include "ucx_test_util.hpp"

namespace myelin::transport::ucx_test {
namespace {

// The wire carries the low 32 bits of each sequence number; the receiver recovers the full one
// from the next it expects, across the 2^32 wrap, and recognises what lies behind as duplicates.
TEST(UcxSequence, ExtendsWireSequencesAcrossTheWrap) {
  using internal::ucx::extend_sequence;
  using internal::ucx::kStaleSequence;
  EXPECT_EQ(extend_sequence(0, 0), 0u);
  EXPECT_EQ(extend_sequence(5, 0), 5u);
  EXPECT_EQ(extend_sequence(0xffffffffu, 0), kStaleSequence);  // before the first: a duplicate
  const uint64_t next = (uint64_t{3} << 32) - 2;               // just below a wrap
  EXPECT_EQ(extend_sequence(0xfffffffeu, next), next);
  EXPECT_EQ(extend_sequence(0xffffffffu, next), next + 1);
  EXPECT_EQ(extend_sequence(0u, next), next + 2);  // the wire wrapped, the sequence goes on
  EXPECT_EQ(extend_sequence(7u, next), next + 9);
  EXPECT_EQ(extend_sequence(0xfffffff0u, next), next - 14);           // behind: the caller drops it
  EXPECT_EQ(extend_sequence(0x7ffffffdu, next), next + 0x7fffffffu);  // furthest ahead
  EXPECT_EQ(extend_sequence(0x7ffffffeu, next), next - 0x80000000u);  // then it reads as behind
}

// copy_bytes copies exactly n bytes for every small size (each of its branches) and beyond.
TEST(UcxCopyBytes, CopiesExactlyTheGivenBytes) {
  using internal::ucx::copy_bytes;
  for (size_t n = 0; n <= 40; ++n) {
    for (size_t offset : {0, 1, 3, 7}) {  // unaligned source and destination too
      SCOPED_TRACE(testing::Message() << n << " bytes at offset " << offset);
      std::vector<uint8_t> src(64), dst(64, 0xee);
      for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i + 1);
      copy_bytes(dst.data() + offset, src.data() + offset, n);
      for (size_t i = 0; i < dst.size(); ++i) {
        const bool inside = i >= offset && i < offset + n;
        ASSERT_EQ(dst[i], inside ? src[i] : 0xee) << "byte " << i;
      }
    }
  }
}

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 131 + (i >> 9));
  return v;
}

class UcxPair : public testing::TestWithParam<TlsSetting> {
 protected:
  void SetUp() override {
    apply_tls(GetParam());
    a_ = open_backend(options_, "ctx-a");
    b_ = open_backend(options_, "ctx-b");
    ASSERT_TRUE(a_ && b_);
    auto ab = a_->connect(b_->local_address(), "ctx-b", Deadline::after_ms(5000));
    ASSERT_TRUE(ab.ok()) << ab.status();
    auto ba = b_->connect(a_->local_address(), "ctx-a", Deadline::after_ms(5000));
    ASSERT_TRUE(ba.ok()) << ba.status();
    ab_ = std::move(ab).value();
    ba_ = std::move(ba).value();
  }
  void TearDown() override {
    ab_.reset();
    ba_.reset();
    a_.reset();
    b_.reset();
  }
  Status drive2(const Request& r) { return drive(r, {a_.get(), b_.get()}); }

  // A registered region on b_ and its key, as a peer would receive it.
  struct Region {
    std::vector<uint8_t> memory;
    std::unique_ptr<BackendRegistration> registration;
    RemoteKey key;
  };
  // Registers [data, data + size) with `ctx` and builds its remote key; false (and a test
  // failure) when the registration is refused.
  static bool register_range(BackendContext& ctx, uint8_t* data, size_t size, Access access,
                             uint64_t id, std::unique_ptr<BackendRegistration>& registration,
                             RemoteKey& key) {
    RegionState state;
    state.data = data;
    state.size = size;
    state.access = access;
    state.id = id;
    auto reg = ctx.register_memory(state);
    EXPECT_TRUE(reg.ok()) << reg.status();
    if (!reg.ok()) return false;
    registration = std::move(reg).value();
    key = RemoteKey(reinterpret_cast<uint64_t>(data), size, id, access, MemoryKind::kHost);
    key.add_backend_blob(Backend::kUcx, registration->remote_key_blob());
    return true;
  }

  Region register_on(BackendContext& ctx, size_t size, Access access, uint64_t id) {
    Region r;
    r.memory.assign(size, 0);
    register_range(ctx, r.memory.data(), size, access, id, r.registration, r.key);
    return r;
  }

  // A region of `size` bytes at `offset` inside UCX-allocated memory of `ctx`; the allocation
  // handle is the caller's to keep or drop.
  struct AllocatedRegion {
    std::shared_ptr<void> allocation;
    uint8_t* data = nullptr;
    std::unique_ptr<BackendRegistration> registration;
    RemoteKey key;
  };
  AllocatedRegion allocate_on(BackendContext& ctx, size_t alloc_size, size_t offset, size_t size,
                              Access access, uint64_t id) {
    AllocatedRegion r;
    auto mem = ctx.allocate_shared(alloc_size);
    EXPECT_TRUE(mem.ok()) << mem.status();
    if (!mem.ok()) return r;
    r.allocation = std::move(mem).value();
    r.data = static_cast<uint8_t*>(r.allocation.get()) + offset;
    register_range(ctx, r.data, size, access, id, r.registration, r.key);
    return r;
  }
  static ucp_mem_h memh_of(const BackendRegistration& reg) {
    return static_cast<const internal::ucx::UcxRegistration&>(reg).memh();
  }

  Options options_ = test_options();
  std::unique_ptr<BackendContext> a_, b_;
  std::unique_ptr<Endpoint> ab_, ba_;
};

TEST_P(UcxPair, ReportsLimitsFromItsConfiguration) {
  EXPECT_EQ(a_->kind(), Backend::kUcx);
  EXPECT_EQ(a_->limits().eager_limit, 8192u);
  EXPECT_EQ(a_->limits().max_message, options_.max_message_size);
  Options o = test_options();
  o.eager_limit = 2048;
  auto c = open_backend(o, "ctx-c");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->limits().eager_limit, 2048u);
}

TEST_P(UcxPair, RejectsMalformedPeerAddresses) {
  std::vector<uint8_t> garbage(40, 0xab);
  auto r = a_->connect(garbage, "garbage", Deadline::after_ms(100));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
  std::vector<uint8_t> truncated = b_->local_address();
  truncated.resize(truncated.size() - 5);
  r = a_->connect(truncated, "truncated", Deadline::after_ms(100));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
  // A second endpoint to the same peer is refused (the Context hands out the first one).
  r = a_->connect(b_->local_address(), "ctx-b again", Deadline::after_ms(100));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kAlreadyExists) << r.status();
}

TEST_P(UcxPair, EverySizeArrivesIntactWhetherRecvIsPostedFirstOrLast) {
  const size_t sizes[] = {0, 1, 63, 64, 4095, 4096, (size_t{1} << 20) + 1};
  uint8_t seed = 1;
  for (bool recv_first : {true, false}) {
    for (size_t size : sizes) {
      SCOPED_TRACE(testing::Message()
                   << "size " << size << (recv_first ? " recv first" : " send first"));
      const auto out = pattern(size, seed++);
      std::vector<uint8_t> in(size + 7, 0xee);
      Request r, s;
      if (recv_first) {
        r = ba_->recv(3, in.data(), in.size());
        s = ab_->send(3, out.data(), out.size());
      } else {
        s = ab_->send(3, out.data(), out.size());
        for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();  // let it arrive unexpected
        r = ba_->recv(3, in.data(), in.size());
      }
      ASSERT_TRUE(drive2(s).ok()) << s.status();
      ASSERT_TRUE(drive2(r).ok()) << r.status();
      EXPECT_EQ(s.bytes(), size);
      ASSERT_EQ(r.bytes(), size);
      EXPECT_TRUE(std::equal(out.begin(), out.end(), in.begin()));
      EXPECT_EQ(in[size], 0xee) << "recv wrote past the message";
    }
  }
}

// Small messages travel packed (header and payload in one piece, kAmPackedId), larger ones with
// the header apart: every size around the packed limit and the copy's size steps arrives intact,
// into a posted recv and as an unexpected message, and nothing is written past it.
TEST_P(UcxPair, SizesAroundThePackedLimitArriveIntact) {
  using internal::ucx::kPackedLimit;
  std::vector<size_t> sizes;
  for (size_t n = 0; n <= 24; ++n) sizes.push_back(n);
  for (size_t n : {kPackedLimit - 1, kPackedLimit, kPackedLimit + 1, 2 * kPackedLimit}) {
    sizes.push_back(n);
  }
  uint8_t seed = 3;
  for (bool recv_first : {true, false}) {
    for (size_t size : sizes) {
      SCOPED_TRACE(testing::Message()
                   << "size " << size << (recv_first ? " recv first" : " send first"));
      const auto out = pattern(size, seed++);
      std::vector<uint8_t> in(size + 8, 0xee);
      Request r, s;
      if (recv_first) {
        r = ba_->recv(5, in.data(), size + 1);
        s = ab_->send(5, out.data(), out.size());
      } else {
        s = ab_->send(5, out.data(), out.size());
        for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();  // let it arrive unexpected
        r = ba_->recv(5, in.data(), size + 1);
      }
      ASSERT_TRUE(drive2(s).ok()) << s.status();
      ASSERT_TRUE(drive2(r).ok()) << r.status();
      ASSERT_EQ(r.bytes(), size);
      EXPECT_TRUE(std::equal(out.begin(), out.end(), in.begin()));
      for (size_t i = size; i < in.size(); ++i) ASSERT_EQ(in[i], 0xee) << "byte " << i;
    }
  }
}

// A packed message that is too short for its header, too long, or comes with an AM header is a
// stranger's: dropped with a warning, and the receiver's own traffic goes on unharmed.
TEST_P(UcxPair, MalformedPackedMessagesAreDropped) {
  using namespace internal::ucx;
  auto stranger = UcxWorker::create(options_, internal::ContextInfo{"stranger", "elsewhere"});
  ASSERT_TRUE(stranger.ok()) << stranger.status();
  auto peer = parse_peer_address(b_->local_address());
  ASSERT_TRUE(peer.ok()) << peer.status();
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
  params.address = reinterpret_cast<const ucp_address_t*>(peer->worker_address.data());
  ucp_ep_h ep = nullptr;
  ASSERT_EQ(ucp_ep_create((*stranger)->worker(), &params, &ep), UCS_OK);
  // A posted recv of the stranger's would-be channel: none of these may complete it.
  std::vector<uint8_t> in(64, 0xee);
  Request victim = ba_->recv(0, in.data(), in.size());
  // Headers that would complete that recv were they taken: a_'s id, channel 0, sequence 0.
  auto a_address = parse_peer_address(a_->local_address());
  ASSERT_TRUE(a_address.ok()) << a_address.status();
  const AmHeader header{a_address->context_id, 0, 0};
  std::vector<uint8_t> too_long(sizeof(AmHeader) + kPackedLimit + 1, 0);
  std::memcpy(too_long.data(), &header, sizeof header);
  const uint8_t too_short[3] = {1, 2, 3};
  struct Bad {
    const void* am_header;
    size_t am_header_length;
    const void* data;
    size_t length;
  };
  const Bad bad[] = {{nullptr, 0, too_short, sizeof too_short},
                     {nullptr, 0, too_long.data(), too_long.size()},
                     {&header, sizeof header, too_short, sizeof too_short}};
  std::vector<ucs_status_ptr_t> pending;
  for (const Bad& b : bad) {
    ucp_request_param_t param{};
    ucs_status_ptr_t p =
        ucp_am_send_nbx(ep, kAmPackedId, b.am_header, b.am_header_length, b.data, b.length, &param);
    ASSERT_FALSE(UCS_PTR_IS_ERR(p)) << ucs_status_string(UCS_PTR_STATUS(p));
    if (p != nullptr) pending.push_back(p);
  }
  const Deadline deadline = Deadline::after_ms(5000);
  auto sent = [&] {
    for (ucs_status_ptr_t p : pending) {
      if (ucp_request_check_status(p) == UCS_INPROGRESS) return false;
    }
    return true;
  };
  while (!sent() && !deadline.expired()) {
    ucp_worker_progress((*stranger)->worker());
    b_->progress();
  }
  ASSERT_TRUE(sent()) << "the stranger's messages did not leave within 5 s";
  for (ucs_status_ptr_t p : pending) ucp_request_free(p);
  for (int i = 0; i < 200; ++i) ucp_worker_progress((*stranger)->worker()), b_->progress();
  EXPECT_FALSE(victim.done()) << "a malformed message completed a recv: " << victim.status();
  // The real peer's next message lands in that recv, intact.
  const auto out = pattern(12, 41);
  Request s = ab_->send(0, out.data(), out.size());
  ASSERT_TRUE(drive2(s).ok()) << s.status();
  ASSERT_TRUE(drive2(victim).ok()) << victim.status();
  ASSERT_EQ(victim.bytes(), out.size());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), in.begin()));
  EXPECT_TRUE(ba_->status().ok()) << ba_->status();
  ucp_request_param_t close{};
  close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  close.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t p = ucp_ep_close_nbx(ep, &close);
  if (UCS_PTR_IS_PTR(p)) ucp_request_free(p);
}

TEST_P(UcxPair, TooSmallRecvBufferIsOutOfRangeAndConsumesTheMessage) {
  for (size_t size : {size_t{100}, size_t{1} << 20}) {
    SCOPED_TRACE(testing::Message() << "size " << size);
    const auto big = pattern(size, 9);
    const auto next = pattern(16, 77);
    std::vector<uint8_t> small(10), in(16);
    for (bool recv_first : {true, false}) {
      Request r;
      if (recv_first) r = ba_->recv(0, small.data(), small.size());
      Request s1 = ab_->send(0, big.data(), big.size());
      Request s2 = ab_->send(0, next.data(), next.size());
      if (!recv_first) {
        for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();
        r = ba_->recv(0, small.data(), small.size());
      }
      Status st = drive2(r);
      EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st;
      EXPECT_TRUE(drive2(s1).ok()) << s1.status();
      Request r2 = ba_->recv(0, in.data(), in.size());
      ASSERT_TRUE(drive2(r2).ok()) << r2.status();
      EXPECT_EQ(in, next) << "the message after the refused one must still arrive";
      EXPECT_TRUE(drive2(s2).ok()) << s2.status();
    }
  }
  EXPECT_TRUE(ab_->status().ok()) << ab_->status();
}

TEST_P(UcxPair, MessagesOnOneChannelArriveInOrderAcrossSizeClasses) {
  constexpr int kChannels = 4, kPerChannel = 300;
  std::vector<Request> sends;
  std::vector<std::vector<uint8_t>> payloads;
  payloads.reserve(kChannels * kPerChannel);
  for (int i = 0; i < kPerChannel; ++i) {
    for (int c = 0; c < kChannels; ++c) {
      // Every 50th message is a rendezvous one, so eager ones may overtake it on the wire.
      const size_t size = (i % 50 == 7) ? 100'000 : 8 + static_cast<size_t>(i % 5) * 1000;
      std::vector<uint8_t> p(size, static_cast<uint8_t>(c));
      std::memcpy(p.data(), &i, sizeof i);
      payloads.push_back(std::move(p));
      sends.push_back(ab_->send(static_cast<uint32_t>(c), payloads.back().data(), size));
    }
  }
  std::vector<uint8_t> in(100'000);
  for (int c = kChannels - 1; c >= 0; --c) {
    for (int i = 0; i < kPerChannel; ++i) {
      Request r = ba_->recv(static_cast<uint32_t>(c), in.data(), in.size());
      ASSERT_TRUE(drive2(r).ok()) << r.status();
      int got = -1;
      std::memcpy(&got, in.data(), sizeof got);
      ASSERT_EQ(got, i) << "channel " << c;
      EXPECT_EQ(in[sizeof got], static_cast<uint8_t>(c));
    }
  }
  for (const Request& s : sends) EXPECT_TRUE(drive2(s).ok()) << s.status();
}

TEST_P(UcxPair, TenThousandMessagesInFlight) {
  constexpr uint32_t kCount = 10'000;
  std::vector<uint32_t> out(kCount), in(kCount, ~0u);
  std::iota(out.begin(), out.end(), 0u);
  std::vector<Request> sends, recvs;
  for (uint32_t i = 0; i < kCount; ++i) sends.push_back(ab_->send(1, &out[i], sizeof(uint32_t)));
  for (uint32_t i = 0; i < kCount; ++i) recvs.push_back(ba_->recv(1, &in[i], sizeof(uint32_t)));
  for (auto& r : recvs) ASSERT_TRUE(drive2(r).ok()) << r.status();
  for (auto& s : sends) ASSERT_TRUE(drive2(s).ok()) << s.status();
  EXPECT_EQ(in, out);
}

TEST_P(UcxPair, PutAndGetInsideTheRegion) {
  Region target = register_on(*b_, 1 << 16, Access::kRemoteReadWrite, 41);
  ASSERT_TRUE(target.registration);
  const auto data = pattern(4096, 3);
  Request p = ab_->put(data.data(), data.size(), target.key, 1000);
  ASSERT_TRUE(drive2(p).ok()) << p.status();
  // A completed put is in the target's memory.
  EXPECT_TRUE(std::equal(data.begin(), data.end(), target.memory.begin() + 1000));
  std::vector<uint8_t> back(4096);
  Request g = ab_->get(back.data(), back.size(), target.key, 1000);
  ASSERT_TRUE(drive2(g).ok()) << g.status();
  EXPECT_EQ(back, data);
  // The last byte, a whole-region transfer and an empty one are in bounds too.
  uint8_t last = 0x5a;
  Request p2 = ab_->put(&last, 1, target.key, target.memory.size() - 1);
  ASSERT_TRUE(drive2(p2).ok()) << p2.status();
  EXPECT_EQ(target.memory.back(), 0x5a);
  std::vector<uint8_t> whole(target.memory.size());
  Request g2 = ab_->get(whole.data(), whole.size(), target.key, 0);
  ASSERT_TRUE(drive2(g2).ok()) << g2.status();
  EXPECT_EQ(whole, target.memory);
  Request g3 = ab_->get(nullptr, 0, target.key, target.memory.size());
  EXPECT_TRUE(drive2(g3).ok()) << g3.status();
}

// Recvs reuse finished requests' states: one the caller still holds keeps its own outcome.
TEST_P(UcxPair, HeldRecvRequestsKeepTheirOutcomeWhileLaterOnesReuseStates) {
  std::vector<Request> held;
  std::vector<uint64_t> in(200, 0);
  for (uint64_t i = 0; i < in.size(); ++i) {
    Request r = ba_->recv(3, &in[i], sizeof(uint64_t));
    const uint64_t v = i * 7 + 1;
    Request s = ab_->send(3, &v, sizeof v);
    ASSERT_TRUE(drive2(r).ok()) << r.status();
    ASSERT_TRUE(drive2(s).ok()) << s.status();
    ASSERT_EQ(in[i], v);
    if (i % 3 == 0) held.push_back(r);  // the others drop their handle: the state is reusable
  }
  for (const Request& r : held) {
    EXPECT_TRUE(r.done());
    EXPECT_TRUE(r.status().ok()) << r.status();
    EXPECT_EQ(r.bytes(), sizeof(uint64_t));
  }
}

// Puts issued back to back share flushes; each completes only once its bytes are in the target.
TEST_P(UcxPair, ManyPutsInFlightEachCompleteWithItsDataInPlace) {
  constexpr size_t kPuts = 300;
  constexpr size_t kChunk = 3000;  // eager and multi-fragment sizes mixed below
  Region target = register_on(*b_, kPuts * kChunk, Access::kRemoteWrite, 42);
  ASSERT_TRUE(target.registration);
  std::vector<std::vector<uint8_t>> chunks;
  std::vector<Request> puts;
  for (size_t i = 0; i < kPuts; ++i) {
    chunks.push_back(pattern(i % 5 == 0 ? kChunk : 1 + i * 7 % kChunk, static_cast<uint8_t>(i)));
    puts.push_back(ab_->put(chunks[i].data(), chunks[i].size(), target.key, i * kChunk));
    if (i % 50 == 49) {
      a_->progress();  // a flush goes out for what was issued so far; later puts need another
      b_->progress();
    }
  }
  for (size_t i = 0; i < kPuts; ++i) {
    ASSERT_TRUE(drive2(puts[i]).ok()) << "put " << i << ": " << puts[i].status();
    EXPECT_EQ(puts[i].bytes(), chunks[i].size());
    ASSERT_TRUE(std::equal(chunks[i].begin(), chunks[i].end(),
                           target.memory.begin() + static_cast<ptrdiff_t>(i * kChunk)))
        << "put " << i << " completed before its data was in place";
  }
}

TEST_P(UcxPair, OutOfBoundsOrForbiddenOneSidedOpsFailCleanly) {
  Region rw = register_on(*b_, 4096, Access::kRemoteReadWrite, 1);
  Region ro = register_on(*b_, 4096, Access::kRemoteRead, 2);
  Region wo = register_on(*b_, 4096, Access::kRemoteWrite, 3);
  std::vector<uint8_t> buf(8192, 1);
  auto expect_code = [&](Request r, StatusCode code) {
    Status st = drive2(r);
    EXPECT_EQ(st.code(), code) << st;
  };
  expect_code(ab_->put(buf.data(), 4097, rw.key, 0), StatusCode::kOutOfRange);
  expect_code(ab_->put(buf.data(), 1, rw.key, 4096), StatusCode::kOutOfRange);
  expect_code(ab_->get(buf.data(), 16, rw.key, ~uint64_t{0} - 4), StatusCode::kOutOfRange);
  expect_code(ab_->put(buf.data(), 16, ro.key, 0), StatusCode::kPermissionDenied);
  expect_code(ab_->get(buf.data(), 16, wo.key, 0), StatusCode::kPermissionDenied);
  expect_code(ab_->put(nullptr, 16, rw.key, 0), StatusCode::kInvalidArgument);
  // The endpoint stays usable.
  Request ok = ab_->put(buf.data(), 16, rw.key, 0);
  EXPECT_TRUE(drive2(ok).ok()) << ok.status();
  EXPECT_TRUE(ab_->status().ok());
  EXPECT_EQ(std::vector<uint8_t>(buf.begin(), buf.begin() + 16),
            std::vector<uint8_t>(rw.memory.begin(), rw.memory.begin() + 16));
}

TEST_P(UcxPair, BadRemoteKeyBlobsAreRefusedBeforeUcxSeesThem) {
  Region rw = register_on(*b_, 4096, Access::kRemoteReadWrite, 5);
  std::vector<uint8_t> buf(64);
  auto with_blob = [&](std::vector<uint8_t> blob) {
    RemoteKey k(rw.key.address(), rw.key.length(), 5, Access::kRemoteReadWrite, MemoryKind::kHost);
    if (!blob.empty()) k.add_backend_blob(Backend::kUcx, std::move(blob));
    return k;
  };
  const auto good = rw.registration->remote_key_blob();
  std::vector<std::vector<uint8_t>> bad;
  bad.push_back({});                                                     // no ucx part at all
  bad.push_back(std::vector<uint8_t>(200, 0x42));                        // garbage
  bad.push_back(std::vector<uint8_t>(good.begin(), good.begin() + 20));  // truncated header
  bad.push_back(std::vector<uint8_t>(good.begin(), good.end() - 1));     // truncated rkey
  auto flipped = good;
  flipped.back() ^= 0x10;
  bad.push_back(flipped);  // corrupted rkey bytes
  for (size_t i = 0; i < bad.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "bad blob #" << i);
    RemoteKey k = with_blob(bad[i]);
    Status st = drive2(ab_->put(buf.data(), buf.size(), k, 0));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
    st = drive2(ab_->get(buf.data(), buf.size(), k, 0));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  }
  // A key registered by a's own context is not a key of peer b.
  Region mine = register_on(*a_, 4096, Access::kRemoteReadWrite, 6);
  Status st = drive2(ab_->put(buf.data(), buf.size(), mine.key, 0));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  // And the endpoint still works with the good key.
  Request ok = ab_->put(buf.data(), buf.size(), with_blob(good), 0);
  EXPECT_TRUE(drive2(ok).ok()) << ok.status();
}

// The region lies inside its allocation with room on both sides (until 2026-11-27 it ran one
// byte past the allocation's end: the put to its last byte then landed in whatever UCX had
// mapped next, its shared-memory fifo or request pool, and the test hung or crashed now and
// then). Bytes of the allocation outside the region stay untouched.
TEST_P(UcxPair, PutAndGetIntoUcxAllocatedMemory) {
  constexpr size_t kAlloc = (size_t{1} << 20) + 8192;
  constexpr size_t kOffset = 4096;
  constexpr size_t kSize = (size_t{1} << 20) + 1;
  static_assert(kOffset + kSize < kAlloc, "the region must lie inside its allocation");
  constexpr uint8_t kCanary = 0xc5;
  AllocatedRegion target = allocate_on(*b_, kAlloc, kOffset, kSize, Access::kRemoteReadWrite, 51);
  ASSERT_TRUE(target.registration);
  uint8_t* const base = target.data - kOffset;
  std::memset(base, kCanary, kAlloc);
  for (size_t len : {size_t{1}, size_t{64}, size_t{4096}, kSize}) {
    SCOPED_TRACE(testing::Message() << len << " bytes");
    const auto data = pattern(len, static_cast<uint8_t>(len));
    const uint64_t off = kSize - len;  // ends at the region's last byte
    Request p = ab_->put(data.data(), len, target.key, off);
    ASSERT_TRUE(drive2(p).ok()) << p.status();
    EXPECT_TRUE(std::equal(data.begin(), data.end(), target.data + off));
    std::vector<uint8_t> back(len);
    Request g = ab_->get(back.data(), len, target.key, off);
    ASSERT_TRUE(drive2(g).ok()) << g.status();
    EXPECT_EQ(back, data);
  }
  // Bounds are the region's, not the allocation's, and hold in both directions.
  std::vector<uint8_t> buf(8192, 1);
  Status st = drive2(ab_->put(buf.data(), 2, target.key, kSize - 1));
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st;
  st = drive2(ab_->get(buf.data(), 1, target.key, kSize));
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st;
  // A key of a's own allocation is not a key of peer b; a corrupted one is refused.
  AllocatedRegion mine = allocate_on(*a_, 4096, 0, 4096, Access::kRemoteReadWrite, 52);
  ASSERT_TRUE(mine.registration);
  st = drive2(ab_->put(buf.data(), 16, mine.key, 0));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  auto blob = target.registration->remote_key_blob();
  blob.back() ^= 0x01;
  RemoteKey bad(target.key.address(), kSize, 51, Access::kRemoteReadWrite, MemoryKind::kHost);
  bad.add_backend_blob(Backend::kUcx, blob);
  st = drive2(ab_->put(buf.data(), 16, bad, 0));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(ab_->status().ok()) << ab_->status();
  EXPECT_EQ(std::count(base, base + kOffset, kCanary), static_cast<ptrdiff_t>(kOffset))
      << "bytes before the region changed";
  EXPECT_EQ(std::count(base + kOffset + kSize, base + kAlloc, kCanary),
            static_cast<ptrdiff_t>(kAlloc - kOffset - kSize))
      << "bytes after the region changed";
}

// The first one-sided operations of fresh pairs, right after connecting (where a wire-up race
// was once suspected): each of 16 new pairs puts to and gets from the last byte of a region that
// ends where the size asked of its UCX allocation ends, and the byte before the region stays
// untouched.
TEST_P(UcxPair, FirstPutAndGetOfFreshPairsReachTheAllocationsLastByte) {
  constexpr size_t kAlloc = 65536;
  constexpr size_t kOffset = 4096;
  for (int round = 0; round < 16; ++round) {
    SCOPED_TRACE(testing::Message() << "pair " << round);
    auto a = open_backend(options_, "fresh-a");
    auto b = open_backend(options_, "fresh-b");
    ASSERT_TRUE(a && b);
    auto ab = a->connect(b->local_address(), "fresh-b", Deadline::after_ms(5000));
    ASSERT_TRUE(ab.ok()) << ab.status();
    auto ba = b->connect(a->local_address(), "fresh-a", Deadline::after_ms(5000));
    ASSERT_TRUE(ba.ok()) << ba.status();
    AllocatedRegion target =
        allocate_on(*b, kAlloc, kOffset, kAlloc - kOffset, Access::kRemoteReadWrite, 91);
    ASSERT_TRUE(target.registration);
    std::memset(target.data - kOffset, 0xc5, kAlloc);
    const auto last = static_cast<uint8_t>(round + 1);
    Request p = (*ab)->put(&last, 1, target.key, kAlloc - kOffset - 1);
    ASSERT_TRUE(drive(p, {a.get(), b.get()}).ok()) << p.status();
    EXPECT_EQ(target.data[kAlloc - kOffset - 1], last);
    EXPECT_EQ(target.data[-1], 0xc5) << "the byte before the region changed";
    uint8_t back = 0;
    Request g = (*ab)->get(&back, 1, target.key, kAlloc - kOffset - 1);
    ASSERT_TRUE(drive(g, {a.get(), b.get()}).ok()) << g.status();
    EXPECT_EQ(back, last);
  }
}

// A region must lie wholly inside a UCX allocation or outside all of them: one that runs past an
// allocation's end, or starts before it, covers memory next to it that is not the caller's (a
// put there overwrote UCX's own shared memory), and registering it fails before UCX maps it.
TEST_P(UcxPair, RegionStraddlingAnAllocationIsRefused) {
  constexpr size_t kAsked = 65536;
  auto mem = b_->allocate_shared(kAsked);
  ASSERT_TRUE(mem.ok()) << mem.status();
  auto* const base = static_cast<uint8_t*>(mem->get());
  auto try_register = [&](uint8_t* data, size_t size) {
    RegionState r;
    r.data = data;
    r.size = size;
    r.access = Access::kRemoteReadWrite;
    r.id = 81;
    return b_->register_memory(r);
  };
  // What lies inside is fine; the whole of what was asked for shares the allocation's mapping,
  // whose length is the allocation's real end (UCX may round an allocation up).
  auto whole = try_register(base, kAsked);
  ASSERT_TRUE(whole.ok()) << whole.status();
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  ASSERT_EQ(ucp_mem_query(memh_of(**whole), &attr), UCS_OK);
  ASSERT_EQ(attr.address, static_cast<void*>(base));
  ASSERT_GE(attr.length, kAsked);
  const size_t alloc = attr.length;
  EXPECT_TRUE(try_register(base, alloc).ok());
  EXPECT_TRUE(try_register(base + alloc - 1, 1).ok());
  // One byte too many, from the start, from inside, from the last byte.
  for (auto [offset, size] :
       {std::pair<size_t, size_t>{0, alloc + 1}, {4096, alloc - 4096 + 1}, {alloc - 1, 2}}) {
    SCOPED_TRACE(testing::Message() << size << " bytes at offset " << offset);
    auto reg = try_register(base + offset, size);
    ASSERT_FALSE(reg.ok());
    EXPECT_EQ(reg.status().code(), StatusCode::kInvalidArgument) << reg.status();
    EXPECT_NE(reg.status().message().find("past its end"), std::string_view::npos) << reg.status();
  }
  // Starting before the allocation (refused before anything touches that memory).
  auto before = try_register(base - 16, 32);
  ASSERT_FALSE(before.ok());
  EXPECT_EQ(before.status().code(), StatusCode::kInvalidArgument) << before.status();
  EXPECT_NE(before.status().message().find("16 byte(s) before"), std::string_view::npos)
      << before.status();
}

// Regions inside one allocation share its mapping; memory UCX did not allocate gets its own.
TEST_P(UcxPair, RegionsInsideAnAllocationReuseItsMapping) {
  AllocatedRegion whole = allocate_on(*b_, 65536, 0, 65536, Access::kRemoteReadWrite, 61);
  ASSERT_TRUE(whole.registration);
  RegionState part;
  part.data = whole.data + 100;
  part.size = 1000;
  part.access = Access::kRemoteWrite;
  part.id = 62;
  auto inner = b_->register_memory(part);
  ASSERT_TRUE(inner.ok()) << inner.status();
  EXPECT_EQ(memh_of(**inner), memh_of(*whole.registration));
  // Memory UCX did not allocate is mapped on its own.
  Region own = register_on(*b_, 4096, Access::kRemoteReadWrite, 63);
  ASSERT_TRUE(own.registration);
  EXPECT_NE(memh_of(*own.registration), memh_of(*whole.registration));
  EXPECT_EQ(b_->allocate_shared(0).status().code(), StatusCode::kInvalidArgument);
}

// The allocation and its registrations may go in either order; the memory stays valid until the
// last of them is gone.
TEST_P(UcxPair, AllocationOutlivesWhicheverHandleGoesFirst) {
  for (bool allocation_first : {true, false}) {
    SCOPED_TRACE(allocation_first ? "allocation handle dropped first" : "registration first");
    AllocatedRegion target = allocate_on(*b_, 1 << 16, 0, 1 << 16, Access::kRemoteReadWrite, 71);
    ASSERT_TRUE(target.registration);
    uint8_t* const data = target.data;
    if (allocation_first) {
      target.allocation.reset();
      const auto bytes = pattern(1 << 16, 5);
      Request p = ab_->put(bytes.data(), bytes.size(), target.key, 0);
      ASSERT_TRUE(drive2(p).ok()) << p.status();
      EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), data)) << "registration keeps it mapped";
      target.registration.reset();
    } else {
      target.registration.reset();
      data[0] = 0x77;  // still ours: the allocation handle holds it
      EXPECT_EQ(data[0], 0x77);
      target.allocation.reset();
    }
  }
  // A fresh allocation afterwards works (nothing stale is reused).
  AllocatedRegion again = allocate_on(*b_, 1 << 16, 0, 1 << 16, Access::kRemoteReadWrite, 72);
  ASSERT_TRUE(again.registration);
  const auto bytes = pattern(512, 9);
  Request p = ab_->put(bytes.data(), bytes.size(), again.key, 100);
  ASSERT_TRUE(drive2(p).ok()) << p.status();
  EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), again.data + 100));
}

TEST_P(UcxPair, RegisteringNothingIsAnError) {
  RegionState empty;
  auto r = a_->register_memory(empty);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
}

TEST_P(UcxPair, ImmediateArrivesAfterItsDataInOrder) {
  Region target = register_on(*b_, 1 << 20, Access::kRemoteWrite, 8);
  constexpr uint32_t kPuts = 64;
  std::vector<std::vector<uint8_t>> chunks;
  std::vector<Request> puts;
  for (uint32_t i = 0; i < kPuts; ++i) {
    chunks.push_back(pattern(16384, static_cast<uint8_t>(i)));
    puts.push_back(ab_->put_with_immediate(chunks[i].data(), chunks[i].size(), target.key,
                                           i * 16384, 1000 + i));
  }
  uint32_t expected = 1000;
  const Deadline deadline = Deadline::after(std::chrono::seconds(20));
  while (expected < 1000 + kPuts && !deadline.expired()) {
    a_->progress();
    b_->progress();
    uint32_t v = 0;
    while (ba_->try_pop_immediate(v)) {
      ASSERT_EQ(v, expected);
      const uint32_t i = v - 1000;
      // The data of this put is already in place when its immediate is seen.
      ASSERT_TRUE(std::equal(chunks[i].begin(), chunks[i].end(),
                             target.memory.begin() + static_cast<ptrdiff_t>(i) * 16384))
          << "immediate " << v << " seen before its data";
      ++expected;
    }
  }
  EXPECT_EQ(expected, 1000 + kPuts);
  for (auto& p : puts) EXPECT_TRUE(drive2(p).ok()) << p.status();
  uint32_t v = 0;
  EXPECT_FALSE(ab_->try_pop_immediate(v)) << "immediates go to the target only";
  // An immediate with no data at all.
  Request z = ab_->put_with_immediate(nullptr, 0, target.key, 0, 7);
  ASSERT_TRUE(drive2(z).ok()) << z.status();
  const Deadline d2 = Deadline::after(std::chrono::seconds(10));
  while (!ba_->try_pop_immediate(v) && !d2.expired()) b_->progress(), a_->progress();
  EXPECT_EQ(v, 7u);
}

TEST_P(UcxPair, DisconnectCancelsPostedRecvs) {
  std::vector<uint8_t> in(64);
  Request r = ba_->recv(9, in.data(), in.size());
  EXPECT_FALSE(r.done());
  ba_.reset();
  ASSERT_TRUE(r.done());
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status();
}

// A recv posted on an empty stream waits in the worker's fast slot, which a packed message
// completes directly; any other recv or message of that stream, a recv on another stream, a
// too-small buffer and a failed peer must see it as the front of its stream's queue.
TEST_P(UcxPair, RecvsInTheFastSlotKeepOrderAcrossChannelsAndErrors) {
  uint64_t a = 0, b = 0, c = 0;
  Request r1 = ba_->recv(5, &a, sizeof a);  // the slot
  Request r2 = ba_->recv(5, &b, sizeof b);  // r1 back to its queue, r2 behind it
  Request r3 = ba_->recv(6, &c, sizeof c);  // the slot, for another channel
  const uint64_t va = 0xA1, vb = 0xB2, vc = 0xC3;
  Request s3 = ab_->send(6, &vc, sizeof vc);
  Request s1 = ab_->send(5, &va, sizeof va);
  Request s2 = ab_->send(5, &vb, sizeof vb);
  for (const Request* r : {&r1, &r2, &r3, &s1, &s2, &s3}) {
    ASSERT_TRUE(drive2(*r).ok()) << r->status();
  }
  EXPECT_EQ(a, va);
  EXPECT_EQ(b, vb);
  EXPECT_EQ(c, vc);

  // A buffer too small for the message: out_of_range, the message consumed; the next recv works.
  uint32_t small = 0;
  Request tight = ba_->recv(5, &small, sizeof small);
  Request big = ab_->send(5, &va, sizeof va);
  EXPECT_EQ(drive2(tight).code(), StatusCode::kOutOfRange) << tight.status();
  EXPECT_TRUE(drive2(big).ok()) << big.status();
  Request after = ba_->recv(5, &b, sizeof b);
  Request s4 = ab_->send(5, &vc, sizeof vc);
  ASSERT_TRUE(drive2(after).ok()) << after.status();
  EXPECT_EQ(b, vc);
  EXPECT_EQ(after.bytes(), sizeof b);
  ASSERT_TRUE(drive2(s4).ok()) << s4.status();

  // Messages that arrived first are taken before the slot is used again, in order. Progress
  // until the receiver has handled two events (the two messages), then some more; a recv that
  // takes an arrived message is complete when posted.
  Request early1 = ab_->send(6, &va, sizeof va);
  Request early2 = ab_->send(6, &vb, sizeof vb);
  const Deadline arrival = Deadline::after(std::chrono::seconds(10));
  for (size_t events = 0; events < 2 && !arrival.expired();) {
    a_->progress();
    events += b_->progress();
  }
  for (int i = 0; i < 100; ++i) a_->progress(), b_->progress();
  Request got1 = ba_->recv(6, &a, sizeof a);
  Request got2 = ba_->recv(6, &c, sizeof c);
  EXPECT_TRUE(got1.done() && got2.done()) << "the messages had not arrived: no ready-queue path";
  ASSERT_TRUE(drive2(got1).ok() && drive2(got2).ok()) << got1.status() << got2.status();
  EXPECT_EQ(a, va);
  EXPECT_EQ(c, vb);

  // A failed peer fails the recv in the slot.
  Request pending = ba_->recv(6, &a, sizeof a);
  EXPECT_FALSE(pending.done());
  static_cast<internal::ucx::UcxEndpoint&>(*ba_).fail(peer_failed("peer a: failed in the test"));
  ASSERT_TRUE(pending.done());
  EXPECT_EQ(pending.status().code(), StatusCode::kPeerFailed) << pending.status();
}

// Operations UCX still holds when their endpoint goes (a rendezvous send the peer never pulled, a
// get the peer never served) are done once the endpoint's destructor returns. UCX completes them
// from the worker's next progress after the close: the destructor has to run it, since a closed
// Context never progresses its worker again (their Requests stayed pending, and each op's
// reference to its link kept the whole worker alive: LeakSanitizer reports UCX's allocations).
TEST_P(UcxPair, DisconnectCompletesWhatUcxStillHolds) {
  std::vector<uint8_t> out = pattern(size_t{4} << 20, 5);
  Region target = register_on(*b_, 1 << 16, Access::kRemoteRead, 61);
  std::vector<uint8_t> back(1 << 16);
  Request s = ab_->send(3, out.data(), out.size());
  Request g = ab_->get(back.data(), back.size(), target.key, 0);
  for (int i = 0; i < 20; ++i) a_->progress();  // b_ never runs: nothing is pulled or served
  if (s.done() && g.done()) GTEST_SKIP() << "both finished before the disconnect";
  ab_.reset();
  ASSERT_TRUE(s.done()) << "a send outlived its endpoint, pending";
  ASSERT_TRUE(g.done()) << "a get outlived its endpoint, pending";
  if (!s.status().ok()) {
    EXPECT_EQ(s.status().code(), StatusCode::kCancelled) << s.status();
  }
  if (!g.status().ok()) {
    EXPECT_EQ(g.status().code(), StatusCode::kCancelled) << g.status();
  }
}

TEST_P(UcxPair, RefusesOversizedAndNullBuffers) {
  Options o = test_options();
  o.max_message_size = 1024;
  auto c = open_backend(o, "ctx-c");
  ASSERT_TRUE(c);
  auto cb = c->connect(b_->local_address(), "ctx-b", Deadline::after_ms(100));
  ASSERT_TRUE(cb.ok()) << cb.status();
  std::vector<uint8_t> big(1025);
  Status st = drive((*cb)->send(0, big.data(), big.size()), {c.get(), b_.get()});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  st = drive(ab_->send(0, nullptr, 5), {a_.get()});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  st = drive(ba_->recv(0, nullptr, 5), {b_.get()});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
}

// A max_message_size below the packed limit bounds the small-message path as well: a message
// of exactly that size arrives whole, one byte more is refused with nothing sent (the next
// message is the one the receiver gets), and an empty message needs no buffer.
TEST_P(UcxPair, MaxMessageSizeBelowThePackedLimitBoundsSmallSends) {
  Options o = test_options();
  o.max_message_size = 40;
  auto c = open_backend(o, "ctx-c");
  ASSERT_TRUE(c);
  auto cb = c->connect(b_->local_address(), "ctx-b", Deadline::after_ms(5000));
  ASSERT_TRUE(cb.ok()) << cb.status();
  auto bc = b_->connect(c->local_address(), "ctx-c", Deadline::after_ms(5000));
  ASSERT_TRUE(bc.ok()) << bc.status();
  auto drive_cb = [&](const Request& r) { return drive(r, {c.get(), b_.get()}); };
  const auto out = pattern(41, 9);
  Status st = drive_cb((*cb)->send(2, out.data(), 41));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  for (size_t size : {size_t{40}, size_t{0}}) {
    SCOPED_TRACE(testing::Message() << "size " << size);
    std::vector<uint8_t> in(48, 0xee);
    Request r = (*bc)->recv(2, in.data(), in.size());
    ASSERT_TRUE(drive_cb((*cb)->send(2, size == 0 ? nullptr : out.data(), size)).ok());
    ASSERT_TRUE(drive_cb(r).ok()) << r.status();
    ASSERT_EQ(r.bytes(), size);
    EXPECT_TRUE(std::equal(out.begin(), out.begin() + static_cast<ptrdiff_t>(size), in.begin()));
    EXPECT_EQ(in[size], 0xee);
  }
}

INSTANTIATE_TEST_SUITE_P(Tls, UcxPair, testing::ValuesIn(kTlsSettings), tls_test_name);

// Blocking progress: the worker's event fd wakes a sleeper when a message arrives.
class UcxBlocking : public testing::TestWithParam<TlsSetting> {};

TEST_P(UcxBlocking, EventFdWakesOnArrival) {
  apply_tls(GetParam());
  Options o = test_options();
  o.progress = ProgressMode::kSpinThenBlock;
  auto a = open_backend(o, "block-a");
  auto b = open_backend(o, "block-b");
  ASSERT_TRUE(a && b);
  ASSERT_GE(b->wait_fd(), 0);
  auto ab = a->connect(b->local_address(), "block-b", Deadline::after_ms(100));
  auto ba = b->connect(a->local_address(), "block-a", Deadline::after_ms(100));
  ASSERT_TRUE(ab.ok() && ba.ok());
  for (uint64_t round = 0; round < 20; ++round) {
    uint64_t in = 0, out = 0x1234 + round;
    Request r = (*ba)->recv(0, &in, sizeof in);
    // Each context belongs to one thread: the sender's is driven by its own thread here.
    std::atomic<bool> stop{false};
    Request s;
    std::thread sender([&] {
      s = (*ab)->send(0, &out, sizeof out);
      // pairs with the release store below: the sender keeps progressing until told to stop
      while (!stop.load(std::memory_order_acquire)) a->progress();
    });
    const Deadline deadline = Deadline::after(std::chrono::seconds(20));
    while (!r.done() && !deadline.expired()) {
      if (b->progress() != 0 || !b->arm_wait()) continue;
      pollfd p{b->wait_fd(), POLLIN, 0};
      // Armed with nothing pending: the fd must turn readable once the message arrives.
      ASSERT_EQ(poll(&p, 1, 10'000), 1) << "armed event fd did not wake within 10 s";
    }
    stop.store(true, std::memory_order_release);  // pairs with the sender thread's acquire load
    sender.join();
    ASSERT_TRUE(r.done()) << "round " << round;
    EXPECT_TRUE(r.status().ok()) << r.status();
    EXPECT_EQ(in, out);
    EXPECT_TRUE(drive(s, {a.get(), b.get()}).ok());
  }
}

INSTANTIATE_TEST_SUITE_P(Tls, UcxBlocking, testing::ValuesIn(kTlsSettings), tls_test_name);

}  // namespace
}  // namespace myelin::transport::ucx_test
