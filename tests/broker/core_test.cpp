// The routing core embedded in-process (LocalSubscriber) and the parameter server.
#include <gtest/gtest.h>

#include <thread>

#include <myelin/broker/broker.hpp>
#include <myelin/broker/param_server.hpp>

namespace myelin::broker {
namespace {

std::span<const std::byte> bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}
std::string text(const Message& m) {
  return {reinterpret_cast<const char*>(m.payload.data()), m.payload.size()};
}

BrokerOptions options(size_t cap) {
  BrokerOptions o;
  o.lane_capacity = cap;
  o.policies.push_back({.pattern = "ctrl/#",
                        .lane = Lane::kControl,
                        .overflow = OverflowPolicy::kBlock,
                        .batching = false});
  o.policies.push_back(
      {.pattern = "lossy/#", .lane = Lane::kBulk, .overflow = OverflowPolicy::kDropOldest});
  return o;
}

TEST(BrokerCore, WildcardsOneCopyPerSessionControlFirst) {
  Broker b(options(64));
  auto s = std::make_shared<LocalSubscriber>(1, "a", 64);
  b.add_session(s);
  ASSERT_TRUE(b.subscribe(1, 1, "grad/*/shard0").ok());
  ASSERT_TRUE(b.subscribe(1, 2, "grad/#").ok());
  ASSERT_TRUE(b.subscribe(1, 3, "ctrl/step").ok());
  EXPECT_FALSE(b.subscribe(1, 3, "x").ok());
  ASSERT_TRUE(b.publish({.topic = "grad/l1/shard0", .payload = bytes("g1")}).ok());
  ASSERT_TRUE(b.publish({.topic = "grad/l1/shard1", .payload = bytes("g2")}).ok());
  ASSERT_TRUE(b.publish({.topic = "other", .payload = bytes("no")}).ok());
  ASSERT_TRUE(b.publish({.topic = "ctrl/step", .payload = bytes("c1")}).ok());
  std::vector<std::string> got;
  while (true) {
    auto m = s->poll(Deadline::after_ms(0));
    if (!m.ok()) break;
    got.push_back(text(**m));
  }
  EXPECT_EQ(got, (std::vector<std::string>{"c1", "g1", "g2"}));
}

// A payload whose owner is shared with other data (the daemon's receive block) is queued by
// reference while the lanes it goes to are short; once a lane is deep it is copied, unless the
// message queued there last by reference holds the same owner (one read's messages share one
// block, which the lane holds already): a deep lane takes no further owner, so a message waiting
// behind many others never keeps another block alive. Without owner_shared the owner is always
// kept, however deep the lane.
TEST(BrokerCore, SharedOwnerIsCopiedOnlyIntoADeepLane) {
  constexpr size_t kDepth = Broker::kMaxSharedOwnerDepth;
  Broker b(options(4 * kDepth));
  auto s = std::make_shared<LocalSubscriber>(1, "a", 4 * kDepth);
  b.add_session(s);
  ASSERT_TRUE(b.subscribe(1, 1, "grad/#").ok());
  ASSERT_TRUE(b.subscribe(1, 2, "lossy/#").ok());
  auto block = std::make_shared<std::string>("0123456789abcdef");
  auto other = std::make_shared<std::string>("0123456789abcdef");
  const std::span<const std::byte> payload = bytes(*block).subspan(4, 8);
  const std::span<const std::byte> other_payload = bytes(*other).subspan(4, 8);
  for (const bool shared : {true, false}) {
    for (const char* topic : {"grad/x", "lossy/x"}) {
      SCOPED_TRACE(std::string(topic) + (shared ? " shared" : " exclusive"));
      // kDepth + 3 messages from `block`, then 3 from `other`, then 2 from `block` again.
      std::vector<int> from;  // 0: block, 1: other
      for (size_t i = 0; i < kDepth + 3; ++i) from.push_back(0);
      for (int i = 0; i < 3; ++i) from.push_back(1);
      for (int i = 0; i < 2; ++i) from.push_back(0);
      for (const int k : from) {
        auto r = b.publish({.topic = topic,
                            .payload = k == 0 ? payload : other_payload,
                            .owner = k == 0 ? block : other,
                            .owner_shared = shared});
        ASSERT_TRUE(r.ok());
        ASSERT_EQ(*r, PublishOutcome::kAccepted);
      }
      // The lane was deep from the ninth message on: those from `block` still share it (the
      // last shared owner), those from `other` were copied.
      EXPECT_EQ(block.use_count(), 1 + static_cast<long>(kDepth + 5));
      EXPECT_EQ(other.use_count(), 1 + (shared ? 0 : 3));
      for (size_t i = 0; i < from.size(); ++i) {
        auto m = s->poll(Deadline::after_ms(0));
        ASSERT_TRUE(m.ok()) << m.status();
        EXPECT_EQ(text(**m), "456789ab");
        const bool by_reference =
            (*m)->payload.data() == payload.data() || (*m)->payload.data() == other_payload.data();
        EXPECT_EQ(by_reference, !shared || from[i] == 0) << "message " << i;
      }
      EXPECT_EQ(block.use_count(), 1);
      EXPECT_EQ(other.use_count(), 1);
      // A shallow lane takes `other` by reference again, and then it is the lane's last owner.
      if (shared) {
        for (int i = 0; i < static_cast<int>(kDepth) + 2; ++i) {
          ASSERT_TRUE(
              b.publish(
                   {.topic = topic, .payload = other_payload, .owner = other, .owner_shared = true})
                  .ok());
        }
        EXPECT_EQ(other.use_count(), 1 + static_cast<long>(kDepth) + 2);
        ASSERT_TRUE(
            b.publish({.topic = topic, .payload = payload, .owner = block, .owner_shared = true})
                .ok());
        EXPECT_EQ(block.use_count(), 1);  // copied: the deep lane's last owner is `other`
        while (s->poll(Deadline::after_ms(0)).ok()) {
        }
        EXPECT_EQ(other.use_count(), 1);
      }
    }
  }
}

// A publisher's RouteCache follows the topic it publishes: each publish gets its own topic's
// policy, sequence and statistics whatever the cache held, a bad topic is still refused, and a
// cache filled by one Broker is never taken for another's topics.
TEST(BrokerCore, RouteCacheFollowsTheTopic) {
  Broker b(options(64)), other(options(64));
  auto s = std::make_shared<LocalSubscriber>(1, "a", 64);
  auto t = std::make_shared<LocalSubscriber>(1, "b", 64);
  b.add_session(s);
  other.add_session(t);
  ASSERT_TRUE(b.subscribe(1, 1, "#").ok());
  ASSERT_TRUE(other.subscribe(1, 1, "#").ok());
  RouteCache route;
  auto pub = [&](Broker& to, std::string_view topic) {
    return to.publish({.topic = topic, .payload = bytes("x"), .route = &route});
  };
  for (const char* topic : {"ctrl/a", "ctrl/a", "grad/x", "ctrl/a", "grad/x", "grad/x"})
    ASSERT_TRUE(pub(b, topic).ok()) << topic;
  EXPECT_FALSE(pub(b, "grad//x").ok());
  ASSERT_TRUE(pub(b, "grad/x").ok());
  ASSERT_TRUE(pub(other, "grad/x").ok());  // the same cache, another broker
  ASSERT_TRUE(pub(b, "grad/x").ok());
  std::vector<std::pair<std::string, uint64_t>> got;
  std::vector<Lane> lanes;
  while (true) {
    auto m = s->poll(Deadline::after_ms(0));
    if (!m.ok()) break;
    got.emplace_back((*m)->topic, (*m)->seq);
    lanes.push_back((*m)->lane);
  }
  // Control first, then bulk, each in order with its topic's own sequence.
  const std::vector<std::pair<std::string, uint64_t>> want = {
      {"ctrl/a", 1}, {"ctrl/a", 2}, {"ctrl/a", 3}, {"grad/x", 1},
      {"grad/x", 2}, {"grad/x", 3}, {"grad/x", 4}, {"grad/x", 5}};
  EXPECT_EQ(got, want);
  EXPECT_EQ(lanes, (std::vector<Lane>{Lane::kControl, Lane::kControl, Lane::kControl, Lane::kBulk,
                                      Lane::kBulk, Lane::kBulk, Lane::kBulk, Lane::kBulk}));
  EXPECT_EQ(b.topic_stats().at("grad/x").messages_in, 5u);
  EXPECT_EQ(b.topic_stats().at("ctrl/a").messages_in, 3u);
  auto m = t->poll(Deadline::after_ms(0));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->topic, "grad/x");
  EXPECT_EQ((*m)->seq, 1u);
  EXPECT_FALSE(t->poll(Deadline::after_ms(0)).ok());
  EXPECT_EQ(other.topic_stats().at("grad/x").messages_in, 1u);
}

TEST(BrokerCore, BlockPolicyRefusesWholePublishUntilDrained) {
  Broker b(options(4));
  auto s = std::make_shared<LocalSubscriber>(1, "a", 4);
  b.add_session(s);
  ASSERT_TRUE(b.subscribe(1, 1, "grad/#").ok());
  int accepted = 0;
  for (int i = 0; i < 10; ++i) {
    auto r = b.publish({.topic = "grad/x", .payload = bytes(std::to_string(i))});
    ASSERT_TRUE(r.ok());
    if (*r == PublishOutcome::kAccepted) accepted++;
  }
  EXPECT_EQ(accepted, 4);
  EXPECT_EQ(b.topic_stats().at("grad/x").stalls, 6u);
  auto m = s->poll(Deadline::after_ms(100));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->seq, 1u);
  EXPECT_EQ(*b.publish({.topic = "grad/x", .payload = bytes("late")}), PublishOutcome::kAccepted);
}

TEST(BrokerCore, DropOldestAnnouncesOnPressureTopic) {
  Broker b(options(4));
  auto slow = std::make_shared<LocalSubscriber>(1, "slow", 4);
  auto watcher = std::make_shared<LocalSubscriber>(2, "watch", 64);
  b.add_session(slow);
  b.add_session(watcher);
  ASSERT_TRUE(b.subscribe(1, 1, "lossy/#").ok());
  ASSERT_TRUE(b.subscribe(2, 1, "$pressure/#").ok());
  for (int i = 0; i < 10; ++i)
    ASSERT_TRUE(b.publish({.topic = "lossy/t", .payload = bytes("m")}).ok());
  EXPECT_EQ(b.topic_stats().at("lossy/t").drops, 6u);
  std::vector<uint64_t> seqs;
  while (true) {
    auto m = slow->poll(Deadline::after_ms(0));
    if (!m.ok()) break;
    seqs.push_back((*m)->seq);
  }
  EXPECT_EQ(seqs, (std::vector<uint64_t>{7, 8, 9, 10}));  // the newest survive; the gap is visible
  int announced = 0;
  while (true) {
    auto m = watcher->poll(Deadline::after_ms(0));
    if (!m.ok()) break;
    EXPECT_EQ((*m)->topic, "$pressure/lossy/t");
    announced++;
  }
  EXPECT_EQ(announced, 6);
}

TEST(BrokerCore, RequestsRouteToRespondersAndDeadLetter) {
  BrokerOptions o = options(16);
  o.policies.push_back({.pattern = "svc/#", .max_delivery_attempts = 2});
  Broker b(o);
  auto req = std::make_shared<LocalSubscriber>(1, "req", 16);
  auto rsp = std::make_shared<LocalSubscriber>(2, "rsp", 16);
  auto dead = std::make_shared<LocalSubscriber>(3, "dead", 16);
  b.add_session(req);
  b.add_session(rsp);
  b.add_session(dead);
  EXPECT_EQ(b.request({.topic = "svc/a", .payload = bytes("q"), .id = 5, .from_session = 1})
                .status()
                .code(),
            StatusCode::kUnavailable);
  ASSERT_TRUE(b.subscribe(2, 1, "svc/#", /*responder=*/true).ok());
  ASSERT_TRUE(b.subscribe(3, 1, "$dead/#").ok());
  ASSERT_TRUE(
      b.request({.topic = "svc/a", .payload = bytes("q"), .id = 6, .attempt = 1, .from_session = 1})
          .ok());
  auto m = rsp->poll(Deadline::after_ms(100));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->type, FrameType::kRequest);
  EXPECT_TRUE(b.reply(6, bytes("answer"), nullptr));
  EXPECT_FALSE(b.reply(6, bytes("again"), nullptr));  // duplicate reply is dropped
  auto r = req->poll(Deadline::after_ms(100));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(text(**r), "answer");
  ASSERT_TRUE(
      b.request({.topic = "svc/a", .payload = bytes("z"), .id = 7, .attempt = 1, .from_session = 1})
          .ok());
  ASSERT_TRUE(
      b.request({.topic = "svc/a", .payload = bytes("z"), .id = 7, .attempt = 2, .from_session = 1})
          .ok());
  auto third = b.request(
      {.topic = "svc/a", .payload = bytes("z"), .id = 7, .attempt = 3, .from_session = 1});
  EXPECT_EQ(third.status().code(), StatusCode::kFailedPrecondition);
  auto d = dead->poll(Deadline::after_ms(100));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ((*d)->topic, "$dead/svc/a");
  EXPECT_EQ(text(**d), "z");
}

TEST(BrokerCore, AclPatternCoverage) {
  EXPECT_TRUE(pattern_covers("grad/#", "grad/*/x"));
  EXPECT_TRUE(pattern_covers("grad/*", "grad/*"));
  EXPECT_FALSE(pattern_covers("grad/*", "grad/#"));
  EXPECT_FALSE(pattern_covers("grad/x", "grad/*"));
  EXPECT_FALSE(pattern_covers("#", "$pressure/#"));
  EXPECT_TRUE(pattern_covers("$pressure/#", "$pressure/#"));
}

TEST(BrokerCore, ConcurrentDrainerSeesEveryMessageInOrder) {
  Broker b(options(8));
  auto s = std::make_shared<LocalSubscriber>(1, "a", 8);
  b.add_session(s);
  ASSERT_TRUE(b.subscribe(1, 1, "t/#").ok());
  constexpr int kN = 20000;
  std::thread consumer([&] {
    uint64_t expect = 1;
    while (expect <= kN) {
      auto m = s->poll(Deadline::after_ms(5000));
      ASSERT_TRUE(m.ok()) << m.status();
      ASSERT_EQ((*m)->seq, expect);
      expect++;
    }
  });
  int sent = 0;
  const Deadline d = Deadline::after_ms(20000);
  while (sent < kN && !d.expired()) {
    auto r = b.publish({.topic = "t/x", .payload = bytes("p")});
    ASSERT_TRUE(r.ok());
    if (*r == PublishOutcome::kAccepted)
      sent++;
    else
      std::this_thread::yield();
  }
  consumer.join();
  EXPECT_EQ(sent, kN);
}

// Serial reference: plain loops, no server.
std::vector<float> reference(int workers, int steps, std::vector<float> p, float lr, float mu,
                             bool momentum) {
  std::vector<float> v(p.size(), 0.0f);
  for (int s = 0; s < steps; ++s) {
    std::vector<float> g(p.size(), 0.0f);
    for (int w = 0; w < workers; ++w) {
      for (size_t i = 0; i < p.size(); ++i)
        g[i] += 0.5f * p[i] + static_cast<float>(w) + 0.01f * static_cast<float>(i);
    }
    for (auto& x : g) x /= static_cast<float>(workers);
    for (size_t i = 0; i < p.size(); ++i) {
      if (momentum) {
        v[i] = mu * v[i] + g[i];
        p[i] -= lr * v[i];
      } else {
        p[i] -= lr * g[i];
      }
    }
  }
  return p;
}

TEST(ParameterServer, SyncMatchesSerialReferenceWithThreads) {
  for (bool momentum : {false, true}) {
    constexpr int kWorkers = 3, kSteps = 6;
    ParameterServerOptions o{.num_workers = kWorkers, .mode = PsMode::kSync};
    if (momentum)
      o.optimizer = std::make_shared<MomentumOptimizer>(0.1f, 0.9f);
    else
      o.optimizer = std::make_shared<SgdOptimizer>(0.1f);
    ParameterServer ps(o);
    const std::vector<float> init = {1, 2, 3, 4};
    ASSERT_TRUE(ps.init_key("w", init).ok());
    std::vector<std::thread> ts;
    for (int w = 0; w < kWorkers; ++w) {
      ts.emplace_back([&, w] {
        std::vector<float> p(4);
        for (int s = 0; s < kSteps; ++s) {
          ASSERT_TRUE(ps.pull("w", static_cast<uint64_t>(s), p, Deadline::after_ms(5000)).ok());
          std::vector<float> g(4);
          for (size_t i = 0; i < 4; ++i)
            g[i] = 0.5f * p[i] + static_cast<float>(w) + 0.01f * static_cast<float>(i);
          ASSERT_TRUE(ps.push(static_cast<uint32_t>(w), "w", g, static_cast<uint64_t>(s)).ok());
        }
      });
    }
    for (auto& t : ts) t.join();
    std::vector<float> p(4);
    ASSERT_EQ(*ps.pull("w", kSteps, p, Deadline::after_ms(1000)), static_cast<uint64_t>(kSteps));
    const auto ref = reference(kWorkers, kSteps, init, 0.1f, 0.9f, momentum);
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(p[i], ref[i], 1e-5) << i << " momentum=" << momentum;
  }
}

TEST(ParameterServer, RefusesBadPushesAndBoundsStaleness) {
  ParameterServer sync({.num_workers = 2});
  ASSERT_TRUE(sync.init_key("k", {0, 0}).ok());
  EXPECT_EQ(sync.init_key("k", {0}).code(), StatusCode::kAlreadyExists);
  const std::vector<float> g = {1, 1};
  EXPECT_EQ(sync.push(0, "k", g, 1).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(sync.push(0, "k", g, 0).ok());
  EXPECT_EQ(sync.push(0, "k", g, 0).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(sync.push(5, "k", g, 0).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(sync.push(1, "k", std::vector<float>{1}, 0).code(), StatusCode::kInvalidArgument);
  std::vector<float> out(2);
  EXPECT_EQ(sync.pull("k", 1, out, Deadline::after_ms(20)).status().code(), StatusCode::kTimeout);
  ParameterServer async({.num_workers = 1, .mode = PsMode::kAsync, .staleness_bound = 1});
  ASSERT_TRUE(async.init_key("k", {0}).ok());
  const std::vector<float> one = {1};
  ASSERT_TRUE(async.push(0, "k", one, 0).ok());  // version 1
  ASSERT_TRUE(async.push(0, "k", one, 0).ok());  // 1 stale: allowed; version 2
  EXPECT_EQ(async.push(0, "k", one, 0).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(shard_of("grad/a", 4), shard_of("grad/a", 4));
  EXPECT_LT(shard_of("grad/a", 4), 4u);
}

}  // namespace
}  // namespace myelin::broker
