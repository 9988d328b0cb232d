// Multi-process integration: the real myelin-broker daemon, clients in this process and in forked
// children, real kill -9s, /metrics scraped with curl.
#include <gtest/gtest.h>

#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include <myelin/broker/client.hpp>
#include <myelin/broker/server.hpp>

#include "auth.hpp"
#include "broker_daemon.hpp"
#include "raw_connection.hpp"
#include "wire.hpp"

namespace myelin::broker {
namespace {

using test_support::have_curl;
using test_support::Raw;
using test_support::wait_exit;
using test_support::wait_readable;

constexpr const char* kSecret = "integration-secret-0123456789";

std::span<const std::byte> bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// The daemon with this file's secret and 300 ms heartbeats.
class Daemon : public test_support::BrokerDaemon {
 public:
  explicit Daemon(const std::string& extra_config, std::vector<std::string> flags = {})
      : BrokerDaemon({.secret = kSecret,
                      .extra_config = extra_config,
                      .flags = std::move(flags),
                      .heartbeat_ms = 300}) {}
};

std::unique_ptr<Client> connect_or_die(const ClientOptions& o) {
  auto c = Client::connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

// Waits for a child; false when it did not exit 0 within the deadline.
bool child_ok(pid_t pid, int64_t timeout_ms) {
  int st = 0;
  if (wait_exit(pid, Deadline::after_ms(timeout_ms), &st)) {
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return false;
}

TEST(BrokerIntegration, WildcardRoutingOrderingAndBatchBoundariesAcrossProcesses) {
  Daemon d("[[topic]]\npattern = \"ctrl/#\"\nlane = \"control\"\nbatching = false\n");
  ASSERT_TRUE(d.up());
  auto shard0 = connect_or_die(d.client("sub0"));
  auto all = connect_or_die(d.client("suball"));
  ASSERT_TRUE(shard0 && all);
  ASSERT_TRUE(shard0->subscribe("grad/*/shard0").ok());
  ASSERT_TRUE(all->subscribe("grad/#").ok());
  ASSERT_TRUE(all->subscribe("ctrl/step").ok());
  constexpr int kN = 2000;
  pid_t pub = ::fork();
  if (pub == 0) {
    auto c = Client::connect(d.client("pub"));
    if (!c.ok()) ::_exit(2);
    for (int i = 0; i < kN; ++i) {
      // Sizes vary so coalesced batch frames must keep every boundary.
      std::string body = std::to_string(i) + ":" + std::string(static_cast<size_t>(i % 300), 'x');
      const char* topic = i % 2 ? "grad/layer3/shard0" : "grad/layer3/shard1";
      if (!(*c)->publish(topic, body).ok()) ::_exit(3);
      if (i % 100 == 0 &&
          !(*c)->publish("ctrl/step", std::to_string(i), {.lane = Lane::kControl}).ok())
        ::_exit(4);
    }
    c->reset();
    ::_exit(0);
  }
  std::map<std::string, int> next;  // per topic: next expected index
  int got_all = 0, got0 = 0, ctrl = 0;
  const Deadline dl = Deadline::after_ms(30000);
  while ((got_all < kN || got0 < kN / 2) && !dl.expired()) {
    if (got_all < kN + kN / 100) {
      auto m = all->poll(Deadline::after_ms(10));
      if (m.ok()) {
        EXPECT_EQ(m->missed_before, 0u);
        if (m->topic == "ctrl/step") {
          ctrl++;
          continue;
        }
        const std::string t(m->text());
        const int idx = std::stoi(t.substr(0, t.find(':')));
        EXPECT_EQ(t.size(), std::to_string(idx).size() + 1 + static_cast<size_t>(idx % 300));
        auto [it, fresh] = next.try_emplace(m->topic, idx);
        EXPECT_EQ(idx, it->second) << "out of order on " << m->topic;
        it->second = idx + 2;
        got_all++;
      }
    }
    auto m0 = shard0->poll(Deadline::after_ms(1));
    if (m0.ok()) {
      EXPECT_EQ(m0->topic, "grad/layer3/shard0");
      got0++;
    }
  }
  EXPECT_TRUE(child_ok(pub, 10000));
  EXPECT_EQ(got_all, kN);
  EXPECT_EQ(got0, kN / 2);
  const Deadline dc = Deadline::after_ms(2000);
  while (ctrl < kN / 100 && !dc.expired()) {
    if (all->poll(Deadline::after_ms(10)).ok()) ctrl++;
  }
  EXPECT_EQ(ctrl, kN / 100);
}

TEST(BrokerIntegration, LargeBulkMessagesArriveWholeAndControlStillFlows) {
  Daemon d("[[topic]]\npattern = \"ctrl/#\"\nlane = \"control\"\nbatching = false\n");
  ASSERT_TRUE(d.up());
  auto sub = connect_or_die(d.client("sub"));
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(sub && pub);
  ASSERT_TRUE(sub->subscribe("#").ok());
  std::vector<std::byte> big(4 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::byte>(i * 31 + 7);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(pub->publish("grad/big", big).ok());
    ASSERT_TRUE(pub->publish("ctrl/step", std::to_string(i), {.lane = Lane::kControl}).ok());
  }
  int bigs = 0, ctrls = 0;
  const Deadline dl = Deadline::after_ms(20000);
  while ((bigs < 3 || ctrls < 3) && !dl.expired()) {
    auto m = sub->poll(Deadline::after_ms(100));
    if (!m.ok()) continue;
    if (m->topic == "grad/big") {
      ASSERT_EQ(m->payload.size(), big.size());
      EXPECT_EQ(std::memcmp(m->payload.data(), big.data(), big.size()), 0);
      bigs++;
    } else {
      EXPECT_TRUE(m->control);
      ctrls++;
    }
  }
  EXPECT_EQ(bigs, 3);
  EXPECT_EQ(ctrls, 3);
}

// A client closed right after publishing more than its socket takes at once still delivers every
// message: closing flushes what is queued (bounded by close_flush_ms) instead of dropping it.
TEST(BrokerIntegration, ClosingAfterABurstDeliversEveryMessage) {
  Daemon d("");
  ASSERT_TRUE(d.up());
  auto sub = connect_or_die(d.client("sub"));
  ASSERT_TRUE(sub);
  ASSERT_TRUE(sub->subscribe("grad/#").ok());
  std::vector<std::byte> big(1 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::byte>(i * 13 + 5);
  constexpr int kN = 16;
  {
    ClientOptions o = d.client("pub");
    o.socket_buffer_bytes = 64 * 1024;
    o.close_flush_ms = 20000;  // room for a loaded or sanitized run; a quiet one needs ~10 ms
    auto pub = connect_or_die(o);
    ASSERT_TRUE(pub);
    for (int i = 0; i < kN; ++i) ASSERT_TRUE(pub->publish("grad/burst", big).ok());
  }  // closed at once, with most of the burst still queued in the client
  int got = 0;
  const Deadline dl = Deadline::after_ms(20000);
  while (got < kN && !dl.expired()) {
    auto m = sub->poll(Deadline::after_ms(100));
    if (!m.ok()) continue;
    ASSERT_EQ(m->payload.size(), big.size());
    EXPECT_EQ(std::memcmp(m->payload.data(), big.data(), big.size()), 0);
    got++;
  }
  EXPECT_EQ(got, kN);
}

// A bulk in-flight bound below 4 bytes (a quarter of it rounds to 0) still has the client report
// what it reads, so bulk moves while control messages keep flowing to that client.
TEST(BrokerIntegration, TinyBulkInflightBoundStillMovesBulkBesideControl) {
  Daemon d(
      "bulk_inflight_bytes = 2\n[[topic]]\npattern = \"ctrl/#\"\nlane = \"control\"\n"
      "batching = false\n");
  ASSERT_TRUE(d.up());
  auto sub = connect_or_die(d.client("sub"));
  auto pub = connect_or_die(d.client("pub"));
  auto ctl = connect_or_die(d.client("ctl"));
  ASSERT_TRUE(sub && pub && ctl);
  ASSERT_TRUE(sub->subscribe("#").ok());
  std::atomic<bool> stop{false};  // relaxed: a flag, orders nothing
  std::thread ticker([&] {
    const Deadline dl = Deadline::after_ms(30000);
    while (!stop.load(std::memory_order_relaxed) && !dl.expired()) {
      if (!ctl->publish("ctrl/tick", "t", {.lane = Lane::kControl}).ok()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  std::vector<std::byte> big(256 << 10, std::byte{0x5a});
  constexpr int kBulk = 8;
  for (int i = 0; i < kBulk; ++i) EXPECT_TRUE(pub->publish("grad/x", big).ok());
  int bulks = 0;
  const Deadline dl = Deadline::after_ms(8000);
  while (bulks < kBulk && !dl.expired()) {
    auto m = sub->poll(Deadline::after_ms(100));
    if (m.ok() && m->topic == "grad/x") {
      EXPECT_EQ(m->payload.size(), big.size());
      bulks++;
    }
  }
  stop.store(true, std::memory_order_relaxed);
  ticker.join();
  EXPECT_EQ(bulks, kBulk);
}

TEST(BrokerIntegration, PollingThreadsReadTheSocketAndHandlersStillRun) {
  Daemon d("");
  ASSERT_TRUE(d.up());
  auto sub = connect_or_die(d.client("sub"));
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(sub && pub);
  // Handler subscription: run by whichever thread reads the socket, one at a time, in order.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint64_t> handled;  // seq of h/x, under mu
  ASSERT_TRUE(sub->subscribe("h/#",
                             [&](const ReceivedMessage& m) {
                               std::lock_guard<std::mutex> lock(mu);
                               EXPECT_EQ(m.missed_before, 0u);
                               handled.push_back(m.seq);
                               cv.notify_all();
                             })
                  .ok());
  ASSERT_TRUE(sub->subscribe("p/#").ok());
  constexpr uint64_t kEach = 2000;
  // Two threads poll at once: every p/x message reaches exactly one of them, each in order.
  std::atomic<uint64_t> polled{0};  // both pollers add; read after join
  std::vector<uint64_t> seen[2];
  std::thread pollers[2];
  for (int t = 0; t < 2; ++t) {
    pollers[t] = std::thread([&, t] {
      const Deadline dl = Deadline::after_ms(30000);
      while (polled.load(std::memory_order_relaxed) < kEach && !dl.expired()) {
        auto m = sub->poll(Deadline::after_ms(20));
        if (!m.ok()) continue;
        seen[t].push_back(m->seq);
        polled.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (uint64_t i = 0; i < kEach; ++i) {
    ASSERT_TRUE(pub->publish("h/x", "h").ok());
    ASSERT_TRUE(pub->publish("p/x", "p").ok());
  }
  for (auto& t : pollers) t.join();
  std::vector<uint64_t> all;
  for (auto& v : seen) {
    EXPECT_TRUE(std::is_sorted(v.begin(), v.end()));
    all.insert(all.end(), v.begin(), v.end());
  }
  std::sort(all.begin(), all.end());
  ASSERT_EQ(all.size(), kEach);
  for (uint64_t i = 0; i < kEach; ++i) EXPECT_EQ(all[i], i + 1);
  // Nobody polls any more: the I/O thread reads again and the handler gets the rest.
  for (uint64_t i = 0; i < 100; ++i) ASSERT_TRUE(pub->publish("h/x", "h").ok());
  std::unique_lock<std::mutex> lock(mu);
  cv.wait_for(lock, std::chrono::seconds(20), [&] { return handled.size() == kEach + 100; });
  ASSERT_EQ(handled.size(), kEach + 100);
  for (uint64_t i = 0; i < handled.size(); ++i) EXPECT_EQ(handled[i], i + 1);
}

// ClientOptions::poll_read_grace_us bounds how long a handler's message waits once poll() stopped
// reading: the I/O thread, asleep on a timeout it chose while it watched the socket (up to 50 ms),
// must watch it again when the grace ends. The bound checked (20 ms, median of 9) is far above the
// grace (0 here) and far below the 50 ms sleep that a missed hand-back costs.
TEST(BrokerIntegration, HandlerMessagesAfterAPollWaitOnlyTheGrace) {
  Daemon d("");
  ASSERT_TRUE(d.up());
  ClientOptions so = d.client("sub");
  so.poll_read_grace_us = 0;
  auto sub = connect_or_die(so);
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(sub && pub);
  std::mutex mu;
  std::condition_variable cv;
  uint64_t handled = 0;  // under mu
  ASSERT_TRUE(sub->subscribe("g/#",
                             [&](const ReceivedMessage&) {
                               std::lock_guard<std::mutex> lock(mu);
                               ++handled;
                               cv.notify_all();
                             })
                  .ok());
  std::vector<int64_t> waits_ns;
  for (uint64_t i = 1; i <= 9; ++i) {
    // Nothing to poll: the call reads the socket for 1 ms and hands it back.
    EXPECT_EQ(sub->poll(Deadline::after_ms(1)).status().code(), StatusCode::kTimeout);
    const int64_t start = monotonic_ns();
    ASSERT_TRUE(pub->publish("g/x", "g").ok());
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return handled == i; }));
    waits_ns.push_back(monotonic_ns() - start);
  }
  std::sort(waits_ns.begin(), waits_ns.end());
  EXPECT_LT(waits_ns[waits_ns.size() / 2], 20'000'000) << "median wait in ns";
}

TEST(BrokerIntegration, SlowConsumerBlocksProducerWithoutLoss) {
  Daemon d(
      "lane_capacity = 16\npublish_credits = 8\n[[topic]]\npattern = \"blk/#\"\noverflow = "
      "\"block\"\n");
  ASSERT_TRUE(d.up());
  auto o = d.client("slow");
  o.receive_window = 8;
  auto slow = connect_or_die(o);
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(slow && pub);
  ASSERT_TRUE(slow->subscribe("blk/#").ok());
  int published = 0;
  Status last;
  for (int i = 0; i < 500; ++i) {
    last = pub->publish("blk/t", std::to_string(i), {.timeout_ms = 300});
    if (!last.ok()) break;
    published++;
  }
  EXPECT_EQ(last.code(), StatusCode::kTimeout)
      << "the producer should have been held back: " << last;
  EXPECT_LT(published, 500);
  EXPECT_GT(pub->stats().publish_stalls, 0u);
  // Now drain: every accepted message arrives, in order, with no gap.
  for (int i = 0; i < published; ++i) {
    auto m = slow->poll(Deadline::after_ms(5000));
    ASSERT_TRUE(m.ok()) << "message " << i << " of " << published << ": " << m.status();
    EXPECT_EQ(m->text(), std::to_string(i));
    EXPECT_EQ(m->missed_before, 0u);
  }
  // The producer can go on once the consumer caught up.
  EXPECT_TRUE(pub->publish("blk/t", "after", {.timeout_ms = 5000}).ok());
  if (have_curl()) {
    auto m = d.metrics();
    EXPECT_GT(m["myelin_broker_topic_stalls_total{topic=\"blk/t\"}"], 0);
  }
}

TEST(BrokerIntegration, SlowConsumerDropOldestIsAnnouncedAndVisibleAsGaps) {
  Daemon d("lane_capacity = 16\n[[topic]]\npattern = \"lossy/#\"\noverflow = \"drop_oldest\"\n");
  ASSERT_TRUE(d.up());
  auto o = d.client("slow");
  o.receive_window = 8;
  auto slow = connect_or_die(o);
  auto watch = connect_or_die(d.client("watch"));
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(slow && watch && pub);
  ASSERT_TRUE(slow->subscribe("lossy/#").ok());
  std::atomic<int> announcements{0};
  ASSERT_TRUE(
      watch->subscribe("$pressure/#", [&](const ReceivedMessage&) { announcements++; }).ok());
  // More messages than the publish window (512): the publisher waits for grants, so drops also
  // fall after the first message the subscriber sees (a burst the broker could read whole would
  // drop only messages before it, which the client cannot see as a gap).
  constexpr int kN = 2000;
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(pub->publish("lossy/t", std::to_string(i)).ok());
  uint64_t received = 0, missed = 0, last_seq = 0;
  while (last_seq < kN) {
    auto m = slow->poll(Deadline::after_ms(5000));
    ASSERT_TRUE(m.ok()) << m.status();
    received++;
    missed += m->missed_before;
    last_seq = m->seq;
  }
  // Drops before the first message this subscriber saw are not visible as a gap to it, so the
  // client's count is a lower bound; the broker's counters account for every message.
  EXPECT_GT(missed, 0u);
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  std::map<std::string, double> m;
  const Deadline dl = Deadline::after_ms(5000);
  double drops = 0, announce_drops = 0;
  while (!dl.expired()) {
    m = d.metrics();
    drops = m["myelin_broker_topic_drops_total{topic=\"lossy/t\"}"];
    announce_drops = m["myelin_broker_topic_drops_total{topic=\"$pressure/lossy/t\"}"];
    if (announcements.load() + announce_drops >= drops) break;
    // A bounded poll: /metrics has no fd to wait on for a counter to change.
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(static_cast<double>(received) + drops, kN);  // delivered or counted as dropped
  EXPECT_LE(static_cast<double>(missed), drops);
  // Every drop was announced; announcements the watcher could not take are counted themselves.
  EXPECT_EQ(announcements.load() + announce_drops, drops);
}

TEST(BrokerIntegration, ParameterServerMatchesSerialReference) {
  Daemon d(
      "[ps]\nenabled = true\nworkers = 2\nmode = \"sync\"\naggregation = \"mean\"\noptimizer = "
      "\"momentum\"\nlr = 0.1\nmomentum = 0.9\n");
  ASSERT_TRUE(d.up());
  constexpr int kSteps = 5;
  const std::vector<float> init = {1.0f, -2.0f, 0.5f, 3.0f, 0.0f, 7.0f};
  {
    auto c = connect_or_die(d.client("init"));
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->ps_init("w/layer0", init).ok());
  }
  std::vector<pid_t> kids;
  for (uint32_t w = 0; w < 2; ++w) {
    pid_t p = ::fork();
    if (p == 0) {
      auto o = d.client("worker" + std::to_string(w));
      o.ps_worker = w;
      auto c = Client::connect(o);
      if (!c.ok()) ::_exit(2);
      std::vector<float> params(init.size()), grad(init.size());
      for (int s = 0; s < kSteps; ++s) {
        if (!(*c)->ps_pull("w/layer0", static_cast<uint64_t>(s), params).ok()) ::_exit(3);
        for (size_t i = 0; i < grad.size(); ++i)
          grad[i] = 0.5f * params[i] + static_cast<float>(w) - 0.1f * static_cast<float>(i);
        if (!(*c)->ps_push("w/layer0", grad, static_cast<uint64_t>(s)).ok()) ::_exit(4);
      }
      ::_exit(0);
    }
    kids.push_back(p);
  }
  for (pid_t p : kids) EXPECT_TRUE(child_ok(p, 30000));
  std::vector<float> ref = init, vel(init.size(), 0.0f);
  for (int s = 0; s < kSteps; ++s) {
    std::vector<float> g(init.size(), 0.0f);
    for (int w = 0; w < 2; ++w) {
      for (size_t i = 0; i < g.size(); ++i)
        g[i] += 0.5f * ref[i] + static_cast<float>(w) - 0.1f * static_cast<float>(i);
    }
    for (size_t i = 0; i < g.size(); ++i) {
      vel[i] = 0.9f * vel[i] + g[i] / 2.0f;
      ref[i] -= 0.1f * vel[i];
    }
  }
  auto c = connect_or_die(d.client("check"));
  ASSERT_TRUE(c);
  std::vector<float> got(init.size());
  auto v = c->ps_pull("w/layer0", kSteps, got);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, static_cast<uint64_t>(kSteps));
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-4) << i;
}

TEST(BrokerIntegration, RequestRetriesAreDeduplicatedAndDeadLettered) {
  // svc/slow allows many attempts so a loaded machine cannot turn slowness into a dead letter.
  Daemon d(
      "[[topic]]\npattern = \"svc/flaky\"\nmax_delivery_attempts = 3\n"
      "[[topic]]\npattern = \"svc/slow\"\nmax_delivery_attempts = 100\n");
  ASSERT_TRUE(d.up());
  auto server = connect_or_die(d.client("server"));
  auto caller = connect_or_die(d.client("caller"));
  auto watcher = connect_or_die(d.client("watcher"));
  ASSERT_TRUE(server && caller && watcher);
  std::atomic<int> calls{0};
  ASSERT_TRUE(server
                  ->serve("svc/slow",
                          [&](const ReceivedMessage& m) -> Result<std::vector<std::byte>> {
                            // The first call is slow work that outlives attempt 1 (150 ms), so
                            // the caller retries; this simulates the handler, it waits for nothing.
                            if (calls++ == 0)
                              std::this_thread::sleep_for(std::chrono::milliseconds(400));
                            std::string r = "re:" + std::string(m.text());
                            return std::vector<std::byte>(bytes(r).begin(), bytes(r).end());
                          })
                  .ok());
  ASSERT_TRUE(server
                  ->serve("svc/flaky",
                          [&](const ReceivedMessage&) -> Result<std::vector<std::byte>> {
                            return unavailable("always busy");
                          })
                  .ok());
  ASSERT_TRUE(watcher->subscribe("$dead/#").ok());
  auto r =
      caller->request("svc/slow", bytes("q1"), {.attempt_timeout_ms = 150, .max_attempts = 10});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(r->payload.data()), r->payload.size()),
            "re:q1");
  EXPECT_GE(r->attempts, 2u);
  EXPECT_EQ(calls.load(), 1);  // retries did not run the handler again
  // The server's I/O thread may read the retry only after its reply has reached the caller. A
  // bounded poll: the counter has no fd to wait on.
  for (const Deadline dd = Deadline::after_ms(5000);
       server->stats().duplicate_requests < 1 && !dd.expired();) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_GE(server->stats().duplicate_requests, 1u);
  auto dead = caller->request("svc/flaky", bytes("q2"),
                              {.attempt_timeout_ms = 500, .max_attempts = 10, .backoff_ms = 5});
  EXPECT_EQ(dead.status().code(), StatusCode::kFailedPrecondition) << dead.status();
  auto m = watcher->poll(Deadline::after_ms(3000));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->topic, "$dead/svc/flaky");
  EXPECT_EQ(m->text(), "q2");
}

TEST(BrokerIntegration, WrongSecretAndAclViolationsAreRefusedAndCounted) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d("[[client]]\nidentity = \"worker\"\npublish = [\"grad/#\"]\nsubscribe = [\"ctrl/#\"]\n");
  ASSERT_TRUE(d.up());
  auto bad = d.client("worker");
  bad.secret = "not-the-job-secret-at-all";
  auto c = Client::connect(bad);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied) << c.status();
  auto stranger = Client::connect(d.client("stranger"));  // no ACL entry
  EXPECT_FALSE(stranger.ok());
  auto w = connect_or_die(d.client("worker"));
  ASSERT_TRUE(w);
  auto sub = w->subscribe("grad/#");
  EXPECT_EQ(sub.status().code(), StatusCode::kPermissionDenied) << sub.status();
  EXPECT_TRUE(w->subscribe("ctrl/step").ok());
  EXPECT_TRUE(w->publish("ctrl/step", "nope").ok());  // fire and forget: refused at the broker
  EXPECT_TRUE(w->publish("grad/x", "fine").ok());
  const Deadline dl = Deadline::after_ms(5000);
  std::map<std::string, double> m;
  while (!dl.expired()) {
    m = d.metrics();
    if (m["myelin_broker_acl_denied_total"] >= 2) break;
    // A bounded poll: /metrics has no fd to wait on for a counter to change.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(m["myelin_broker_acl_denied_total"], 2);
  EXPECT_EQ(m["myelin_broker_auth_failures_total"], 2);
  EXPECT_EQ(m["myelin_broker_topic_messages_total{topic=\"grad/x\"}"], 1);
  EXPECT_EQ(m.count("myelin_broker_topic_messages_total{topic=\"ctrl/step\"}"), 0u);
  EXPECT_GE(m["myelin_broker_publish_to_deliver_seconds_count"], 0);
  EXPECT_EQ(d.http_status("/healthz"), "200");
  EXPECT_EQ(d.http_status("/nothing"), "404");
}

TEST(BrokerIntegration, KilledSubscriberPublisherAndBrokerNeverHang) {
  Daemon d("");
  ASSERT_TRUE(d.up());
  auto pub = connect_or_die(d.client("pub"));
  auto sub = connect_or_die(d.client("sub"));
  ASSERT_TRUE(pub && sub);
  ASSERT_TRUE(sub->subscribe("t/#").ok());
  // A subscriber process killed mid-stream: it writes a byte to `ready` once it has received
  // its first message.
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t victim = ::fork();
  if (victim == 0) {
    ::close(ready[0]);
    auto c = Client::connect(d.client("victim"));
    if (!c.ok() || !(*c)->subscribe("t/#").ok()) ::_exit(2);
    bool told = false;
    while (true) {
      auto m = (*c)->poll(Deadline::after_ms(100));
      if (m.ok() && !told) {
        told = ::write(ready[1], "r", 1) == 1;
      }
    }
  }
  ::close(ready[1]);
  // A publisher process killed mid-stream.
  pid_t pub2 = ::fork();
  if (pub2 == 0) {
    auto c = Client::connect(d.client("pub2"));
    if (!c.ok()) ::_exit(2);
    for (int i = 0;; ++i) (void)(*c)->publish("t/other", std::to_string(i));
  }
  // Both are mid-stream once the victim has a message and `sub` sees pub2's traffic. `sub` is
  // drained all the while: a subscriber nobody reads holds pub2 back once its delivery credits
  // are spent (back-pressure), and a victim that subscribed after that would wait for nothing.
  bool victim_streaming = false, pub2_streaming = false;
  for (const Deadline dw = Deadline::after_ms(10000);
       !(victim_streaming && pub2_streaming) && !dw.expired();) {
    auto m = sub->poll(Deadline::after_ms(10));
    if (m.ok() && m->topic == "t/other") pub2_streaming = true;
    if (!victim_streaming) victim_streaming = wait_readable(ready[0], Deadline::after_ms(0));
  }
  ::close(ready[0]);
  ::kill(victim, SIGKILL);
  ::kill(pub2, SIGKILL);
  ::waitpid(victim, nullptr, 0);
  ::waitpid(pub2, nullptr, 0);
  ASSERT_TRUE(victim_streaming) << "the victim subscriber never received a message";
  ASSERT_TRUE(pub2_streaming) << "the victim publisher's messages never arrived";
  // Survivors carry on.
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(pub->publish("t/x", "alive").ok());
  int alive = 0;
  const Deadline dl = Deadline::after_ms(10000);
  while (alive < 100 && !dl.expired()) {
    auto m = sub->poll(Deadline::after_ms(100));
    if (m.ok() && m->topic == "t/x") alive++;
  }
  EXPECT_EQ(alive, 100);
  if (have_curl()) {
    const Deadline dm = Deadline::after_ms(5000);
    double active = -1;
    while (!dm.expired()) {
      active = d.metrics()["myelin_broker_connections_active"];
      if (active == 2) break;
      // A bounded poll: /metrics has no fd to wait on for a counter to change.
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(active, 2);  // the killed clients were cleaned up
  }
  // Now the broker dies: every survivor gets an error quickly, nothing hangs.
  d.kill9();
  const int64_t t0 = monotonic_ns();
  auto m = sub->poll(Deadline::after_ms(10000));
  while (m.ok()) m = sub->poll(Deadline::after_ms(10000));
  EXPECT_NE(m.status().code(), StatusCode::kTimeout) << m.status();
  EXPECT_LT(monotonic_ns() - t0, 5'000'000'000);
  Status s;
  for (int i = 0; i < 1000 && s.ok(); ++i) s = pub->publish("t/x", "late", {.timeout_ms = 2000});
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(pub->status().ok());
}

TEST(BrokerIntegration, SigtermDrainsAndExitsCleanly) {
  Daemon d("");
  ASSERT_TRUE(d.up());
  auto sub = connect_or_die(d.client("sub"));
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(sub && pub);
  ASSERT_TRUE(sub->subscribe("t/#").ok());
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(pub->publish("t/x", std::to_string(i)).ok());
  int got = 0;
  std::thread reader([&] {
    while (got < 50) {
      auto m = sub->poll(Deadline::after_ms(5000));
      if (!m.ok()) break;
      got++;
    }
  });
  reader.join();
  EXPECT_EQ(got, 50);
  EXPECT_EQ(d.terminate(10000), 0);
}

// Waits until /metrics shows `name` at `value` (or more, with at_least); returns the last value.
double metric_reaches(const Daemon& d, const std::string& name, double value, bool at_least,
                      int64_t timeout_ms = 5000) {
  const Deadline dl = Deadline::after_ms(timeout_ms);
  double v = -1;
  while (true) {
    auto m = d.metrics();
    v = m.count(name) ? m[name] : -1;
    if (v == value || (at_least && v >= value) || dl.expired()) return v;
    // A bounded poll: /metrics has no fd to wait on for a counter to change.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// A session opened by hand on `main`: auth with `versions` (0: as a protocol-1 client does).
struct RawSession {
  uint64_t id = 0;
  uint64_t publish_credits = 0;  // the window auth_ok grants
  AuthOk ok;
  internal::Nonce server_nonce{}, client_nonce{};  // what auth_ok's proof covers
};
Result<RawSession> raw_auth(Raw& main, std::string_view identity, uint64_t versions,
                            std::string_view secret = kSecret) {
  MYELIN_ASSIGN_OR_RETURN(FrameView hello, main.next(Deadline::after_ms(5000)));
  MYELIN_ASSIGN_OR_RETURN(auto sn, parse_hello(hello));
  MYELIN_ASSIGN_OR_RETURN(auto cn, internal::random_nonce());
  const auto mac = internal::client_mac(secret, sn, cn, identity);
  std::vector<std::byte> p(cn.begin(), cn.end());
  p.insert(p.end(), mac.begin(), mac.end());
  MYELIN_RETURN_IF_ERROR(
      main.send({.type = FrameType::kAuth, .flags = kFlagControl, .seq = versions}, identity, p));
  MYELIN_ASSIGN_OR_RETURN(FrameView f, main.next(Deadline::after_ms(5000)));
  if (f.header.type == FrameType::kError) {
    return Status(static_cast<StatusCode>(f.header.seq),
                  std::string(reinterpret_cast<const char*>(f.payload.data()), f.payload.size()));
  }
  RawSession s;
  MYELIN_ASSIGN_OR_RETURN(s.ok, parse_auth_ok(f));
  s.id = f.header.id;
  s.publish_credits = f.header.seq;
  s.server_nonce = sn;
  s.client_nonce = cn;
  MYELIN_RETURN_IF_ERROR(
      main.send({.type = FrameType::kCredit, .flags = kFlagControl, .id = 1024}));
  return s;
}
// The attach frame for `conn` (after reading its hello): a MAC over its server nonce with
// `token`, `session` and `secret`.
Result<std::vector<std::byte>> raw_attach_frame(Raw& conn, uint64_t session,
                                                const internal::Token& token,
                                                std::string_view identity,
                                                std::string_view secret = kSecret) {
  MYELIN_ASSIGN_OR_RETURN(FrameView hello, conn.next(Deadline::after_ms(5000)));
  MYELIN_ASSIGN_OR_RETURN(auto sn, parse_hello(hello));
  MYELIN_ASSIGN_OR_RETURN(auto cn, internal::random_nonce());
  const auto mac = internal::attach_mac(secret, sn, cn, token, session, identity);
  std::vector<std::byte> p(cn.begin(), cn.end());
  p.insert(p.end(), mac.begin(), mac.end());
  std::vector<std::byte> frame;
  MYELIN_RETURN_IF_ERROR(append_frame(frame,
                                      {.type = FrameType::kAttach,
                                       .flags = kFlagControl,
                                       .seq = encode_versions(VersionRange{}),
                                       .id = session},
                                      identity, p));
  return frame;
}
// Sends a pre-encoded frame's bytes as they are.
Status send_bytes(Raw& conn, std::span<const std::byte> frame) {
  size_t off = 0;
  const Deadline d = Deadline::after_ms(5000);
  while (off < frame.size()) {
    const ssize_t n = ::send(conn.fd(), frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<size_t>(n);
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return errno_status("send", errno);
    } else if (d.expired()) {
      return timeout_error("send");
    } else {
      pollfd p{conn.fd(), POLLOUT, 0};
      (void)::poll(&p, 1, d.remaining_ms_for_poll());
    }
  }
  return ok_status();
}
// Reads the broker's answer to an attach: true for auth_ok, false for a refusal (an error frame
// then the connection closed).
Result<bool> attach_answer(Raw& conn) {
  MYELIN_ASSIGN_OR_RETURN(FrameView f, conn.next(Deadline::after_ms(5000)));
  if (f.header.type == FrameType::kAuthOk) return true;
  if (f.header.type != FrameType::kError)
    return internal_error("unexpected ", frame_type_name(f.header.type));
  if (f.header.seq != static_cast<uint64_t>(StatusCode::kPermissionDenied))
    return internal_error("refused with code ", f.header.seq);
  if (!conn.closed_by_peer(Deadline::after_ms(5000)))
    return internal_error("refused but left open");
  return false;
}

// Publish credits come back half a window at a time: with a window of 8, no grant for the first
// two publishes (a quarter window would have sent one), one grant of 4 once four were accepted.
// A subscription's answer marks that the broker read what came before it.
TEST(BrokerIntegration, PublishCreditsComeBackHalfAWindowAtATime) {
  Daemon d("publish_credits = 8\n");
  ASSERT_TRUE(d.up());
  Raw main(d.address());
  ASSERT_TRUE(main.ok());
  auto session = raw_auth(main, "grants", encode_versions(VersionRange{}));
  ASSERT_TRUE(session.ok()) << session.status();
  EXPECT_EQ(session->publish_credits, 8u);
  const std::string payload = "x";
  const auto bytes = std::as_bytes(std::span(payload));
  auto publish_two_then_subscribe = [&](uint64_t first_id, uint64_t sub_id) {
    for (uint64_t id = first_id; id < first_id + 2; ++id) {
      ASSERT_TRUE(main.send({.type = FrameType::kPublish, .id = id}, "g/credits", bytes).ok());
    }
    ASSERT_TRUE(
        main.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = sub_id}, "none/#")
            .ok());
  };
  // Frames up to the answer to `sub_id` (and, with `want_grant`, up to a grant as well); the
  // grants seen go to *grants.
  auto read_until = [&](uint64_t sub_id, bool want_grant, std::vector<uint64_t>* grants) {
    bool answered = false;
    while (!answered || (want_grant && grants->empty())) {
      auto f = main.next(Deadline::after_ms(5000), /*all=*/true);
      ASSERT_TRUE(f.ok()) << f.status();
      if (f->header.type == FrameType::kCredit) grants->push_back(f->header.id);
      if (f->header.type == FrameType::kReply && f->header.id == sub_id) answered = true;
    }
  };
  publish_two_then_subscribe(1, 101);
  std::vector<uint64_t> grants;
  if (!HasFatalFailure()) read_until(101, false, &grants);
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_TRUE(grants.empty()) << "a grant of " << grants.front() << " after two publishes";
  publish_two_then_subscribe(3, 102);
  if (!HasFatalFailure()) read_until(102, true, &grants);
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(grants, std::vector<uint64_t>{4});
}

// A publish the client refuses before sending (a control-lane message larger than a chunk) never
// reaches the broker, so no credit comes back for it: it must not keep the credit it took. With a
// window of 8, eight such refusals used to leave none, and every later publish timed out.
TEST(BrokerIntegration, RefusedPublishesGiveTheirCreditBack) {
  Daemon d("publish_credits = 8\n");
  ASSERT_TRUE(d.up());
  auto pub = connect_or_die(d.client("refused"));
  ASSERT_TRUE(pub);
  const std::string big(70 * 1024, 'x');  // over the client's 64 KiB chunk
  for (int i = 0; i < 8; ++i) {
    const Status s = pub->publish("g/refused", big, {.lane = Lane::kControl, .timeout_ms = 1000});
    ASSERT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  }
  for (int i = 0; i < 32; ++i) {
    const Status s = pub->publish("g/refused", std::to_string(i), {.timeout_ms = 2000});
    ASSERT_TRUE(s.ok()) << "publish " << i << " after 8 refused ones: " << s;
  }
  EXPECT_TRUE(pub->status().ok()) << pub->status();
}

constexpr const char* kLanes =
    "[[topic]]\npattern = \"ctrl/#\"\nlane = \"control\"\nbatching = false\n";

TEST(ControlConnection, ControlFramesTravelOnItAndBulkOnTheMainConnection) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  Raw main(d.address()), ctrl(d.address());
  ASSERT_TRUE(main.ok() && ctrl.ok());
  auto s = raw_auth(main, "raw", encode_versions(VersionRange{}));
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(s->ok.has_token);
  auto frame = raw_attach_frame(ctrl, s->id, s->ok.token, "raw");
  ASSERT_TRUE(frame.ok()) << frame.status();
  ASSERT_TRUE(send_bytes(ctrl, *frame).ok());
  auto answer = attach_answer(ctrl);
  ASSERT_TRUE(answer.ok() && *answer) << (answer.ok() ? "refused" : answer.status().to_string());
  // Subscriptions go on the control connection (control lane), and so do their acks.
  for (uint64_t sub : {1, 2}) {
    ASSERT_TRUE(ctrl.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = sub},
                          sub == 1 ? "ctrl/#" : "grad/#")
                    .ok());
    auto ack = ctrl.next(Deadline::after_ms(5000));
    ASSERT_TRUE(ack.ok()) << ack.status();
    EXPECT_EQ(ack->header.type, FrameType::kReply);
    EXPECT_EQ(ack->header.id, sub);
  }
  // A real client in another process publishes both lanes, interleaved.
  constexpr int kN = 200;
  pid_t pub = ::fork();
  if (pub == 0) {
    auto c = Client::connect(d.client("pub"));
    if (!c.ok() || !(*c)->subscribe("ctrl/done").ok()) ::_exit(2);
    for (int i = 0; i < kN; ++i) {
      if (!(*c)->publish("grad/x", std::to_string(i) + std::string(3000, 'g')).ok()) ::_exit(3);
      if (!(*c)->publish("ctrl/x", std::to_string(i), {.lane = Lane::kControl}).ok()) ::_exit(4);
    }
    // Closing flushes what the socket takes at once; wait until everything arrived instead.
    if (!(*c)->poll(Deadline::after_ms(20000)).ok()) ::_exit(5);
    c->reset();
    ::_exit(0);
  }
  // Every control message on the control connection, every bulk one on the main connection, each
  // in order. Credits go back on the control connection.
  int ctrl_next = 0, bulk_next = 0;
  const Deadline dl = Deadline::after_ms(20000);
  auto take = [&](Raw& conn, bool control) {
    auto f = conn.next(Deadline::after_ms(5000));
    ASSERT_TRUE(f.ok()) << f.status();
    if (f->header.type == FrameType::kBatch) {
      ASSERT_TRUE(for_each_in_batch(f->payload, DecodeLimits{}, [&](const FrameView& in) {
                    EXPECT_EQ(in.topic, "grad/x");
                    const std::string t(reinterpret_cast<const char*>(in.payload.data()),
                                        in.payload.size());
                    EXPECT_EQ(std::stoi(t), bulk_next++);
                    return ok_status();
                  }).ok());
    } else {
      ASSERT_EQ(f->header.type, FrameType::kDeliver);
      EXPECT_EQ(f->control(), control);
      EXPECT_EQ(f->topic, control ? "ctrl/x" : "grad/x");
      const std::string t(reinterpret_cast<const char*>(f->payload.data()), f->payload.size());
      EXPECT_EQ(std::stoi(t), control ? ctrl_next++ : bulk_next++);
    }
    (void)ctrl.send({.type = FrameType::kCredit, .flags = kFlagControl, .id = 1});
    // Both connections must be heard from within three heartbeat intervals.
    (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
  };
  while ((ctrl_next < kN || bulk_next < kN) && !dl.expired() && !HasFatalFailure()) {
    if (ctrl_next < kN) take(ctrl, true);
    if (bulk_next < kN) take(main, false);
  }
  EXPECT_EQ(ctrl_next, kN);
  EXPECT_EQ(bulk_next, kN);
  ASSERT_TRUE(ctrl.send({.type = FrameType::kPublish, .flags = kFlagControl, .id = 76}, "ctrl/done",
                        bytes("done"))
                  .ok());
  EXPECT_TRUE(child_ok(pub, 10000));
  // Control publishes on the control connection are accepted and routed too.
  auto sub = connect_or_die(d.client("sub"));
  ASSERT_TRUE(sub);
  ASSERT_TRUE(sub->subscribe("ctrl/#").ok());
  ASSERT_TRUE(main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl}).ok());
  ASSERT_TRUE(ctrl.send({.type = FrameType::kPublish, .flags = kFlagControl, .id = 77},
                        "ctrl/from-raw", bytes("hello"))
                  .ok());
  auto m = sub->poll(Deadline::after_ms(5000));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->topic, "ctrl/from-raw");
  EXPECT_TRUE(m->control);
  EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 2, false), 2);
}

TEST(ControlConnection, ForgedReplayedAndSecondAttachesAreRefusedAndCounted) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  Raw main(d.address());
  ASSERT_TRUE(main.ok());
  auto s = raw_auth(main, "raw", encode_versions(VersionRange{}));
  ASSERT_TRUE(s.ok()) << s.status();
  int refused = 0;
  auto expect_refused = [&](Raw& conn, std::span<const std::byte> frame, const char* what) {
    ASSERT_TRUE(send_bytes(conn, frame).ok()) << what;
    auto a = attach_answer(conn);
    ASSERT_TRUE(a.ok()) << what << ": " << a.status();
    EXPECT_FALSE(*a) << what << " was accepted";
    refused++;
  };
  {  // Without the secret.
    Raw c(d.address());
    auto f = raw_attach_frame(c, s->id, s->ok.token, "raw", "some-other-secret-0123456789");
    ASSERT_TRUE(f.ok());
    expect_refused(c, *f, "a MAC made without the job secret");
  }
  {  // Another token (a stale or guessed session).
    Raw c(d.address());
    internal::Token other = s->ok.token;
    other[0] ^= std::byte{1};
    auto f = raw_attach_frame(c, s->id, other, "raw");
    ASSERT_TRUE(f.ok());
    expect_refused(c, *f, "another session token");
  }
  {  // Another identity, and a session that does not exist.
    Raw c(d.address()), e(d.address());
    auto f = raw_attach_frame(c, s->id, s->ok.token, "intruder");
    auto g = raw_attach_frame(e, s->id + 1000, s->ok.token, "raw");
    ASSERT_TRUE(f.ok() && g.ok());
    expect_refused(c, *f, "another identity");
    expect_refused(e, *g, "no such session");
  }
  // A replay: a valid attach made for connection X, sent on connection Y (its own server nonce).
  Raw x(d.address()), y(d.address());
  auto fx = raw_attach_frame(x, s->id, s->ok.token, "raw");
  ASSERT_TRUE(fx.ok());
  ASSERT_TRUE(y.next(Deadline::after_ms(5000)).ok());  // y's hello
  expect_refused(y, *fx, "an attach replayed on another connection");
  // The same bytes on the connection they were made for: accepted.
  ASSERT_TRUE(send_bytes(x, *fx).ok());
  auto ax = attach_answer(x);
  ASSERT_TRUE(ax.ok() && *ax);
  {  // A second control connection for the same session, even with valid credentials.
    Raw c(d.address());
    auto f = raw_attach_frame(c, s->id, s->ok.token, "raw");
    ASSERT_TRUE(f.ok());
    expect_refused(c, *f, "a second control connection");
  }
  {  // A protocol-1 session has no token and takes no control connection.
    Raw old(d.address()), c(d.address());
    auto v1 = raw_auth(old, "old", 0);
    ASSERT_TRUE(v1.ok()) << v1.status();
    EXPECT_FALSE(v1->ok.has_token);
    auto f = raw_attach_frame(c, v1->id, s->ok.token, "old");
    ASSERT_TRUE(f.ok());
    expect_refused(c, *f, "an attach to a protocol-1 session");
  }
  EXPECT_EQ(metric_reaches(d, "myelin_broker_attach_refused_total", refused, false), refused);
  EXPECT_EQ(d.metrics()["myelin_broker_auth_failures_total"], refused);
  // The refusals did not hurt the session: it still subscribes (ack on its control connection).
  ASSERT_TRUE(
      x.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 5}, "ctrl/#").ok());
  auto ack = x.next(Deadline::after_ms(5000));
  ASSERT_TRUE(ack.ok()) << ack.status();
  EXPECT_EQ(ack->header.type, FrameType::kReply);
}

TEST(ControlConnection, ClosedControlConnectionFallsBackAndASilentOneEndsTheSession) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);  // heartbeat_ms = 300: silent for 900 ms is dead
  ASSERT_TRUE(d.up());
  auto attach = [&](Raw& main, Raw& ctrl, const char* who) {
    auto s = raw_auth(main, who, encode_versions(VersionRange{}));
    ASSERT_TRUE(s.ok()) << s.status();
    auto f = raw_attach_frame(ctrl, s->id, s->ok.token, who);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(send_bytes(ctrl, *f).ok());
    auto a = attach_answer(ctrl);
    ASSERT_TRUE(a.ok() && *a);
  };
  auto pub = connect_or_die(d.client("pub"));
  ASSERT_TRUE(pub);
  {  // Closed: the session goes on over its main connection, control deliveries included.
    Raw main(d.address()), ctrl(d.address());
    attach(main, ctrl, "closer");
    ASSERT_FALSE(HasFatalFailure());
    ASSERT_TRUE(
        ctrl.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 1}, "ctrl/#").ok());
    ASSERT_TRUE(ctrl.next(Deadline::after_ms(5000)).ok());  // the ack
    EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 2, false), 2);
    ctrl.close();
    EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 1, false), 1);
    ASSERT_TRUE(main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl}).ok());
    ASSERT_TRUE(pub->publish("ctrl/after", "still here", {.lane = Lane::kControl}).ok());
    auto f = main.next(Deadline::after_ms(5000));
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->header.type, FrameType::kDeliver);
    EXPECT_EQ(f->topic, "ctrl/after");
    EXPECT_TRUE(f->control());
    EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 2, false), 2);
    main.close();
    EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 1, false), 1);
  }
  {  // Silent: heartbeats on the main connection alone do not keep the session.
    Raw main(d.address()), ctrl(d.address());
    attach(main, ctrl, "mute");
    ASSERT_FALSE(HasFatalFailure());
    std::atomic<bool> stop{false};
    std::thread beat([&] {
      while (!stop.load(std::memory_order_acquire)) {
        (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
    const Deadline dl = Deadline::after_ms(5000);
    const int64_t t0 = monotonic_ns();
    bool closed = false;
    while (!closed && !dl.expired()) {
      auto f = ctrl.next(Deadline::after_ms(200), true);
      if (!f.ok() && f.status().code() == StatusCode::kPeerFailed) closed = true;
    }
    stop.store(true, std::memory_order_release);  // pairs with the beat thread's acquire load
    beat.join();
    EXPECT_TRUE(closed);
    EXPECT_GE(monotonic_ns() - t0, 500'000'000);  // not before the heartbeat deadline
    EXPECT_EQ(metric_reaches(d, "myelin_broker_dead_clients_total", 1, false), 1);
    EXPECT_TRUE(main.closed_by_peer(Deadline::after_ms(5000)));
  }
  pub.reset();
  // A client whose process dies takes both connections with it; the broker cleans up.
  pid_t child = ::fork();
  if (child == 0) {
    auto c = Client::connect(d.client("doomed"));
    if (!c.ok()) ::_exit(2);
    if (!(*c)->subscribe("ctrl/#").ok()) ::_exit(3);
    ::pause();
    ::_exit(0);
  }
  EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 1, false), 1);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 0, false), 0);
  EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 0, false), 0);
}

// A closing client's two streams end in no particular order: when the broker reads the main
// connection's end while the control connection still holds control frames sent before it (here
// several times the 64 KiB the broker reads there per pass, sent while it was stopped), they
// are still routed, and so is a control frame that arrives after that end was read: the session
// ends with its control connection.
TEST(ControlConnection, MainConnectionEndStillRoutesWhatTheControlConnectionHolds) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  auto sub = connect_or_die(d.client("sub"));
  ASSERT_TRUE(sub);
  ASSERT_TRUE(sub->subscribe("ctrl/#").ok());
  Raw main(d.address()), ctrl(d.address());
  ASSERT_TRUE(main.ok() && ctrl.ok());
  auto s = raw_auth(main, "closer", encode_versions(VersionRange{}));
  ASSERT_TRUE(s.ok()) << s.status();
  auto f = raw_attach_frame(ctrl, s->id, s->ok.token, "closer");
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE(send_bytes(ctrl, *f).ok());
  auto a = attach_answer(ctrl);
  ASSERT_TRUE(a.ok() && *a);
  // Room in this side's send buffer for all of it while the broker reads nothing.
  const int sndbuf = 1 << 20;
  ASSERT_EQ(::setsockopt(ctrl.fd(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf), 0);
  constexpr int kN = 200;  // of 2 KiB each: 400 KiB, several passes' worth of reads
  const std::string body(2048, 'c');
  std::vector<std::byte> frames;
  for (int i = 0; i < kN; ++i) {
    const std::string payload = std::to_string(i) + " " + body;
    ASSERT_TRUE(append_frame(frames,
                             {.type = FrameType::kPublish,
                              .flags = kFlagControl,
                              .id = static_cast<uint64_t>(100 + i)},
                             "ctrl/last", bytes(payload))
                    .ok());
  }
  ASSERT_TRUE(main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl}).ok());
  ASSERT_TRUE(ctrl.send({.type = FrameType::kHeartbeat, .flags = kFlagControl}).ok());
  ASSERT_TRUE(d.stop_process());
  const Status sent = send_bytes(ctrl, frames);
  main.close();
  d.continue_process();
  ASSERT_TRUE(sent.ok()) << sent;
  int got = 0;
  const Deadline dl = Deadline::after_ms(10000);
  while (got < kN && !dl.expired()) {
    auto m = sub->poll(Deadline::after_ms(200));
    if (!m.ok()) continue;
    ASSERT_EQ(m->topic, "ctrl/last");
    const std::string t(reinterpret_cast<const char*>(m->payload.data()), m->payload.size());
    EXPECT_EQ(std::stoi(t), got) << "out of order";
    got++;
  }
  EXPECT_EQ(got, kN);
  // The broker has read the main connection's end by now (it was there before the control
  // connection's last bytes): a control frame that arrives after it is routed too.
  ASSERT_TRUE(ctrl.send({.type = FrameType::kPublish, .flags = kFlagControl, .id = 99}, "ctrl/last",
                        bytes(std::to_string(kN) + " late"))
                  .ok());
  auto late = sub->poll(Deadline::after_ms(5000));
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(std::stoi(std::string(reinterpret_cast<const char*>(late->payload.data()),
                                  late->payload.size())),
            kN);
  // The session ends with the main connection's silence past the heartbeat deadline (or the
  // control connection's end).
  EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 1, false), 1);
  EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 1, false), 1);
}

// A control connection that ends while the broker still holds frames for it (deliveries that
// took a delivery credit): they reach the client on the main connection, in order, the one the
// ended socket took only part of included, none twice and none lost.
TEST(ControlConnection, FramesQueuedForAnEndedControlConnectionGoOnTheMainConnection) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  // Small buffers on the control connection: most of the deliveries stay queued in the broker.
  Raw main(d.address()), ctrl(d.address(), 4096);
  ASSERT_TRUE(main.ok() && ctrl.ok());
  auto s = raw_auth(main, "ender", encode_versions(VersionRange{}));
  ASSERT_TRUE(s.ok()) << s.status();
  auto f = raw_attach_frame(ctrl, s->id, s->ok.token, "ender");
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE(send_bytes(ctrl, *f).ok());
  auto a = attach_answer(ctrl);
  ASSERT_TRUE(a.ok() && *a);
  ASSERT_TRUE(
      ctrl.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 1}, "ctrl/#").ok());
  ASSERT_TRUE(ctrl.next(Deadline::after_ms(5000)).ok());  // the ack
  constexpr int kN = 300;  // of 4 KiB each: 1.2 MiB, far past the control socket's buffers
  const std::string body(4096, 'q');
  pid_t pub = ::fork();
  if (pub == 0) {
    auto c = Client::connect(d.client("pub"));
    if (!c.ok()) ::_exit(2);
    for (int i = 0; i < kN; ++i) {
      if (!(*c)->publish("ctrl/q", std::to_string(i) + " " + body, {.lane = Lane::kControl}).ok())
        ::_exit(3);
    }
    // Stay until the broker routed it all (the test kills this process then).
    (void)(*c)->poll(Deadline::after_ms(20000));
    ::_exit(0);
  }
  // Both connections must be heard from within three heartbeat intervals (900 ms) while the
  // publisher runs, however slow a loaded machine makes it; only this thread sends meanwhile.
  // (Started after the fork: the child is a copy of one thread only.)
  std::atomic<bool> quiet{false};
  std::thread beat([&] {
    while (!quiet.load(std::memory_order_acquire)) {
      (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
      (void)ctrl.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  // Every message routed, so queued towards this session (the raw side granted 1024 credits).
  EXPECT_EQ(metric_reaches(d, "myelin_broker_topic_deliveries_total{topic=\"ctrl/q\"}", kN, false),
            kN);
  ::kill(pub, SIGKILL);
  ::waitpid(pub, nullptr, 0);
  quiet.store(true, std::memory_order_release);  // pairs with the beat thread's acquire load
  beat.join();
  // The client ends its control connection: the broker reads its end and detaches it.
  ASSERT_EQ(::shutdown(ctrl.fd(), SHUT_WR), 0);
  std::vector<int> seen;
  auto record = [&](const FrameView& m) {
    ASSERT_EQ(m.header.type, FrameType::kDeliver);
    EXPECT_EQ(m.topic, "ctrl/q");
    const std::string t(reinterpret_cast<const char*>(m.payload.data()), m.payload.size());
    seen.push_back(std::stoi(t));
  };
  // What the control socket holds, up to its end (a last frame cut off there is not decoded).
  const Deadline dl = Deadline::after_ms(10000);
  while (!dl.expired()) {
    auto m = ctrl.next(dl);
    if (!m.ok()) {
      EXPECT_EQ(m.status().code(), StatusCode::kPeerFailed) << m.status();
      break;
    }
    record(*m);
    ASSERT_FALSE(HasFatalFailure());
  }
  const size_t on_ctrl = seen.size();
  EXPECT_LT(on_ctrl, static_cast<size_t>(kN));
  // The rest on the main connection.
  while (seen.size() < static_cast<size_t>(kN) && !dl.expired()) {
    auto m = main.next(dl);
    ASSERT_TRUE(m.ok()) << m.status() << " after " << seen.size() << " of " << kN << " (" << on_ctrl
                        << " on the control connection)";
    record(*m);
    ASSERT_FALSE(HasFatalFailure());
    (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
  }
  ASSERT_EQ(seen.size(), static_cast<size_t>(kN)) << on_ctrl << " on the control connection";
  for (int i = 0; i < kN; ++i) EXPECT_EQ(seen[i], i) << "at " << i;
  EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 0, false), 0);
  EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 1, false), 1);
}

// A TCP relay between clients and the broker (a thread of this process) that can refuse the
// second connection or alter one byte of what the broker sends on a connection: what a
// firewall, a broken middlebox or an attacker on the path does.
class Relay {
 public:
  enum class Mode { kPass, kRefuseSecond, kAlterByte };
  // kAlterByte: flips byte `offset` of what the broker sends on connection `conn` (1-based).
  Relay(const std::string& broker, Mode mode, int conn = 0, size_t offset = 0)
      : mode_(mode), alter_conn_(conn), alter_offset_(offset) {
    auto hp = internal::parse_host_port(broker);
    if (!hp.ok()) return;
    broker_ = *hp;
    auto l = internal::listen_tcp({"127.0.0.1", 0});
    if (!l.ok()) return;
    listen_ = std::move(*l);
    auto port = internal::local_port(listen_.get());
    if (!port.ok()) return;
    port_ = *port;
    thread_ = std::thread([this] { run(); });
  }
  ~Relay() {
    stop_.store(true, std::memory_order_release);  // pairs with run()'s acquire load
    if (thread_.joinable()) thread_.join();
  }
  [[nodiscard]] bool up() const { return port_ != 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  struct Pair {
    internal::Fd client, broker;
    int number = 0;
    size_t from_broker = 0;  // bytes relayed broker -> client so far
  };
  // Moves what `from` holds to `to` (blocking writes, bounded); false when either side ended.
  bool relay(int from, int to, Pair* alter) {
    char buf[65536];
    const ssize_t n = ::read(from, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return false;
    if (n < 0) return true;
    if (alter) {
      if (alter->from_broker <= alter_offset_ &&
          alter_offset_ < alter->from_broker + static_cast<size_t>(n)) {
        buf[alter_offset_ - alter->from_broker] ^= 0x40;
      }
      alter->from_broker += static_cast<size_t>(n);
    }
    size_t off = 0;
    const Deadline d = Deadline::after_ms(5000);
    while (off < static_cast<size_t>(n) && !d.expired()) {
      const ssize_t w = ::send(to, buf + off, static_cast<size_t>(n) - off, MSG_NOSIGNAL);
      if (w > 0) {
        off += static_cast<size_t>(w);
      } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
        return false;
      } else {
        pollfd p{to, POLLOUT, 0};
        (void)::poll(&p, 1, 10);
      }
    }
    return off == static_cast<size_t>(n);
  }
  void run() {
    std::vector<std::unique_ptr<Pair>> pairs;
    int accepted = 0;
    while (!stop_.load(std::memory_order_acquire)) {
      std::vector<pollfd> p{{listen_.get(), POLLIN, 0}};
      for (auto& x : pairs) {
        p.push_back({x->client.get(), POLLIN, 0});
        p.push_back({x->broker.get(), POLLIN, 0});
      }
      if (::poll(p.data(), p.size(), 20) <= 0) continue;
      if (p[0].revents & POLLIN) {
        internal::Fd c(::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
        if (c.valid() && !(mode_ == Mode::kRefuseSecond && accepted++ >= 1)) {
          auto b = internal::connect_tcp(broker_, Deadline::after_ms(5000));
          if (b.ok()) {
            auto x = std::make_unique<Pair>();
            x->client = std::move(c);
            x->broker = std::move(*b);
            x->number = static_cast<int>(pairs.size()) + 1;
            pairs.push_back(std::move(x));
          }
        }
        continue;  // the poll set changed
      }
      for (size_t i = 0; i < pairs.size(); ++i) {
        Pair& x = *pairs[i];
        const short cr = p[1 + 2 * i].revents, br = p[2 + 2 * i].revents;
        bool alive = true;
        if (cr) alive = relay(x.client.get(), x.broker.get(), nullptr);
        Pair* alter = mode_ == Mode::kAlterByte && x.number == alter_conn_ ? &x : nullptr;
        if (alive && br) alive = relay(x.broker.get(), x.client.get(), alter);
        if (!alive) {
          x.client.reset();  // both ends see the end of the relayed connection
          x.broker.reset();
        }
      }
      std::erase_if(pairs, [](const auto& x) { return !x->client.valid(); });
    }
  }
  Mode mode_;
  int alter_conn_;
  size_t alter_offset_;
  internal::HostPort broker_;
  internal::Fd listen_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Bytes a connection's hello takes (header and server nonce): what precedes the broker's answer.
constexpr size_t kHelloBytes = kFrameHeaderSize + kNonceSize;

// A control connection that cannot be attached (refused on the way, or the broker's proof on it
// does not check out after the broker bound it) leaves the client on its main connection, with
// the reason logged: connect() succeeds and control traffic flows both ways there.
TEST(ControlConnection, AFailedAttachFallsBackToTheMainConnection) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  auto peer = connect_or_die(d.client("peer"));
  ASSERT_TRUE(peer);
  ASSERT_TRUE(peer->subscribe("ctrl/from-relayed").ok());
  // The second connection refused; then its auth_ok's proof altered.
  for (auto [mode, what] : {std::pair{Relay::Mode::kRefuseSecond, "refused"},
                            std::pair{Relay::Mode::kAlterByte, "altered proof"}}) {
    SCOPED_TRACE(what);
    Relay relay(d.address(), mode, 2, kHelloBytes + kFrameHeaderSize + 3);
    ASSERT_TRUE(relay.up());
    ClientOptions o = d.client("relayed");
    o.address = relay.address();
    auto c = Client::connect(o);
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE((*c)->subscribe("ctrl/to-relayed").ok());
    EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 1, false), 1);
    EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 2, false), 2);
    for (int i = 0; i < 20; ++i) {
      ASSERT_TRUE(
          peer->publish("ctrl/to-relayed", std::to_string(i), {.lane = Lane::kControl}).ok());
      auto m = (*c)->poll(Deadline::after_ms(5000));
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ(m->text(), std::to_string(i));
      EXPECT_TRUE(m->control);
      ASSERT_TRUE(
          (*c)->publish("ctrl/from-relayed", std::to_string(i), {.lane = Lane::kControl}).ok());
      auto back = peer->poll(Deadline::after_ms(5000));
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(back->text(), std::to_string(i));
    }
    c->reset();
    EXPECT_EQ(metric_reaches(d, "myelin_broker_connections_active", 1, false), 1);
  }
}

// The session token travels in the main connection's auth_ok beside the broker's proof, which
// covers it: a token altered on the way fails connect() (permission_denied) instead of leading
// the client to attach with a token the broker never gave it.
TEST(ControlConnection, ASessionTokenAlteredOnTheWayFailsConnect) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  {  // The relay itself passes a client through unharmed.
    Relay relay(d.address(), Relay::Mode::kPass);
    ASSERT_TRUE(relay.up());
    ClientOptions o = d.client("relayed");
    o.address = relay.address();
    auto c = Client::connect(o);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 1, false), 1);
  }
  // auth_ok: header, proof, token; alter a byte of the token.
  Relay relay(d.address(), Relay::Mode::kAlterByte, 1,
              kHelloBytes + kFrameHeaderSize + kMacSize + 5);
  ASSERT_TRUE(relay.up());
  ClientOptions o = d.client("relayed");
  o.address = relay.address();
  auto c = Client::connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied) << c.status();
  EXPECT_EQ(metric_reaches(d, "myelin_broker_attach_refused_total", 0, false), 0);
}

TEST(ControlConnection, ProtocolOneClientsAndSingleConnectionClientsKeepWorking) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  // A protocol-1 client, by hand: one connection, control deliveries on it.
  Raw old(d.address());
  auto s = raw_auth(old, "old", 0);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FALSE(s->ok.has_token);
  ASSERT_TRUE(
      old.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 1}, "ctrl/#").ok());
  ASSERT_TRUE(old.next(Deadline::after_ms(5000)).ok());
  // A client with control_connection off, and one with it on.
  auto single = d.client("single");
  single.control_connection = false;
  auto one = connect_or_die(single);
  auto two = connect_or_die(d.client("two"));
  ASSERT_TRUE(one && two);
  ASSERT_TRUE(one->subscribe("#").ok());
  ASSERT_TRUE(two->subscribe("#").ok());
  EXPECT_EQ(metric_reaches(d, "myelin_broker_control_connections_active", 1, false), 1);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(one->publish("ctrl/a", std::to_string(i), {.lane = Lane::kControl}).ok());
    ASSERT_TRUE(two->publish("grad/b", std::to_string(i)).ok());
  }
  for (Client* c : {one.get(), two.get()}) {
    int ctrl = 0, bulk = 0;
    while (ctrl < 20 || bulk < 20) {
      auto m = c->poll(Deadline::after_ms(5000));
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ(std::stoi(std::string(m->text())), m->topic == "ctrl/a" ? ctrl++ : bulk++);
    }
  }
  int got = 0;
  while (got < 20) {
    auto f = old.next(Deadline::after_ms(5000));
    ASSERT_TRUE(f.ok()) << f.status();
    ASSERT_EQ(f->header.type, FrameType::kDeliver);
    EXPECT_EQ(f->topic, "ctrl/a");
    EXPECT_EQ(
        std::stoi(std::string(reinterpret_cast<const char*>(f->payload.data()), f->payload.size())),
        got++);
  }
}

TEST(ControlConnection, NoCommonProtocolVersionIsAClearErrorOnBothSides) {
  if (!have_curl()) GTEST_SKIP() << "curl is not installed";
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  Raw future(d.address());
  auto s = raw_auth(future, "future", encode_versions({7, 9}));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kUnsupported) << s.status();
  EXPECT_NE(s.status().message().find("7..9"), std::string_view::npos) << s.status();
  EXPECT_EQ(metric_reaches(d, "myelin_broker_version_refused_total", 1, false), 1);
  // The client side: a listener that says hello as a broker of protocols 7..9.
  auto lst = internal::listen_tcp({"127.0.0.1", 0});
  ASSERT_TRUE(lst.ok());
  auto port = internal::local_port(lst->get());
  ASSERT_TRUE(port.ok());
  std::thread fake([&] {
    if (!wait_readable(lst->get(), Deadline::after_ms(5000))) return;
    internal::Fd c(::accept(lst->get(), nullptr, nullptr));
    std::vector<std::byte> hello;
    std::vector<std::byte> nonce(kNonceSize, std::byte{3});
    (void)append_frame(hello, {.type = FrameType::kHello, .seq = encode_versions({7, 9})}, {},
                       nonce);
    (void)::send(c.get(), hello.data(), hello.size(), MSG_NOSIGNAL);
    (void)wait_readable(c.get(), Deadline::after_ms(5000));  // until the client hangs up
  });
  ClientOptions o = d.client("me");
  o.address = "127.0.0.1:" + std::to_string(*port);
  auto c = Client::connect(o);
  fake.join();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnsupported) << c.status();
  EXPECT_NE(c.status().message().find("7..9"), std::string_view::npos) << c.status();
}

TEST(ControlConnection, AuthOkProofCoversTheTokenFromProtocolThreeAndNotForProtocolTwo) {
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  for (uint32_t max : {2u, kProtocolVersion}) {
    SCOPED_TRACE("client speaks 1.." + std::to_string(max));
    Raw main(d.address());
    auto s = raw_auth(main, "prover", encode_versions({1, max}));
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE(s->ok.has_token);
    const auto plain = internal::server_proof(kSecret, s->server_nonce, s->client_nonce, "prover");
    const auto bound = internal::server_proof(kSecret, s->server_nonce, s->client_nonce, "prover",
                                              &s->ok.token, s->id);
    ASSERT_NE(plain, bound);
    // A protocol-2 peer checks the proof without the token, as protocol 2 always did.
    EXPECT_EQ(s->ok.proof, max >= 3 ? bound : plain);
    // Either way the token attaches a control connection.
    Raw ctrl(d.address());
    auto frame = raw_attach_frame(ctrl, s->id, s->ok.token, "prover");
    ASSERT_TRUE(frame.ok()) << frame.status();
    ASSERT_TRUE(send_bytes(ctrl, *frame).ok());
    auto answer = attach_answer(ctrl);
    ASSERT_TRUE(answer.ok() && *answer) << (answer.ok() ? "refused" : answer.status().to_string());
  }
}

TEST(ControlConnection, ChunksLargerThanTheSocketBuffersKeepControlMoving) {
  // 64 KiB chunks through 32 KiB socket buffers on both ends, with and without control
  // connections: every control round trip completes in time under a flood of 1 MiB messages,
  // and the flood moves.
  for (bool cc : {false, true}) {
    SCOPED_TRACE(cc ? "control connections" : "one connection per client");
    Daemon d(std::string("socket_buffer_bytes = 32768\nchunk_bytes = 65536\n") + kLanes);
    ASSERT_TRUE(d.up());
    auto opts = [&](const char* who) {
      ClientOptions o = d.client(who);
      o.control_connection = cc;
      o.socket_buffer_bytes = 32768;
      return o;
    };
    auto echo = connect_or_die(opts("echo"));
    auto flooder = connect_or_die(opts("flooder"));
    auto pinger = connect_or_die(opts("pinger"));
    ASSERT_TRUE(echo && flooder && pinger);
    std::atomic<uint64_t> flood_bytes{0};  // the echo's handler adds; read at the end
    ASSERT_TRUE(echo->subscribe("grad/#",
                                [&](const ReceivedMessage& m) {
                                  flood_bytes.fetch_add(m.payload.size(),
                                                        std::memory_order_relaxed);
                                })
                    .ok());
    ASSERT_TRUE(echo->subscribe("ctrl/ping").ok());
    ASSERT_TRUE(pinger->subscribe("ctrl/pong").ok());
    std::atomic<bool> stop{false};  // set by this thread; acquire loads in the others
    std::vector<std::byte> big(1 << 20, std::byte{7});
    Status flood_status, echo_status;
    std::thread flood([&] {
      while (!stop.load(std::memory_order_acquire) && flood_status.ok())
        flood_status = flooder->publish("grad/flood", big, {.timeout_ms = 10000});
    });
    std::thread responder([&] {
      while (!stop.load(std::memory_order_acquire)) {
        auto m = echo->poll(Deadline::after_ms(100));
        if (!m.ok()) {
          if (m.status().code() != StatusCode::kTimeout) echo_status = m.status();
          if (!echo_status.ok()) return;
          continue;
        }
        echo_status = echo->publish("ctrl/pong", m->text(), {.lane = Lane::kControl});
        if (!echo_status.ok()) return;
      }
    });
    int done = 0;
    const Deadline all = Deadline::after_ms(30000);
    for (; done < 300 && !all.expired(); ++done) {
      ASSERT_TRUE(
          pinger->publish("ctrl/ping", std::to_string(done), {.lane = Lane::kControl}).ok());
      auto m = pinger->poll(Deadline::after_ms(2000));
      if (!m.ok()) {
        ADD_FAILURE() << "round trip " << done << ": " << m.status();
        break;
      }
      EXPECT_EQ(std::stoi(std::string(m->text())), done);
    }
    stop.store(true, std::memory_order_release);
    flood.join();
    responder.join();
    EXPECT_EQ(done, 300);
    EXPECT_TRUE(flood_status.ok()) << flood_status;
    EXPECT_TRUE(echo_status.ok()) << echo_status;
    EXPECT_GT(flood_bytes.load(std::memory_order_relaxed), 0u);
  }
}

// The nice values of this process's threads.
std::vector<int> thread_nices() {
  return test_support::thread_stat_field(0, 19);
}

TEST(ControlConnection, IoThreadNiceLowersOnlyTheIoThread) {
  Daemon d(kLanes);
  ASSERT_TRUE(d.up());
  auto bad = d.client("bad");
  bad.io_thread_nice = 20;
  EXPECT_EQ(Client::connect(bad).status().code(), StatusCode::kInvalidArgument);
  bad.io_thread_nice = -1;
  EXPECT_EQ(Client::connect(bad).status().code(), StatusCode::kInvalidArgument);
  const int base = ::getpriority(PRIO_PROCESS, 0);
  if (base > 14) GTEST_SKIP() << "this process already runs at nice " << base;
  auto o = d.client("low");
  o.io_thread_nice = 5;
  auto c = connect_or_die(o);
  ASSERT_TRUE(c);
  // The I/O thread lowers itself when it starts: wait for it (a bounded poll of /proc).
  const Deadline dl = Deadline::after_ms(5000);
  std::vector<int> now;
  while (!dl.expired()) {
    now = thread_nices();
    if (std::count(now.begin(), now.end(), base + 5) == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(std::count(now.begin(), now.end(), base + 5), 1);
  EXPECT_EQ(::getpriority(PRIO_PROCESS, 0), base);  // the caller's thread is untouched
  // And it still works, control and bulk.
  ASSERT_TRUE(c->subscribe("#").ok());
  ASSERT_TRUE(c->publish("ctrl/x", "c", {.lane = Lane::kControl}).ok());
  ASSERT_TRUE(c->publish("grad/x", "b").ok());
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(c->poll(Deadline::after_ms(5000)).ok());
}

}  // namespace
}  // namespace myelin::broker
