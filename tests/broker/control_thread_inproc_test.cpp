// The broker's control thread in this process (an embedded Server, with and without
// ServerOptions::control_thread), so that ThreadSanitizer sees both of the broker's threads and
// every field they share (test_broker_control_thread runs the daemon as a child process, whose
// reports do not fail a test): control and bulk publishes, requests and replies,
// parameter-server pulls handed from the control connection to the loop, clients that attach,
// subscribe and go while messages are routed to them, metrics read meanwhile, then a drain.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <myelin/broker/client.hpp>
#include <myelin/broker/server.hpp>
#include <myelin/core/clock.hpp>

#include "thread_ids.hpp"

namespace myelin::broker {
namespace {

constexpr const char* kSecret = "control-thread-inproc-secret-0123";

std::span<const std::byte> bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

ServerOptions server_options(bool control_thread) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.metrics_listen = "";
  o.secret = kSecret;
  // Liveness is not under test: a loaded 2-CPU host must not turn slowness into dead clients.
  o.heartbeat_ms = 2000;
  o.control_thread = control_thread;
  o.enable_ps = true;
  o.ps.num_workers = 1;
  o.broker.policies = {
      TopicPolicy{.pattern = "ctrl/#", .lane = Lane::kControl, .batching = false},
      TopicPolicy{.pattern = "grad/#", .lane = Lane::kBulk, .batching = true},
  };
  return o;
}

ClientOptions client_options(uint16_t port, const std::string& identity) {
  return ClientOptions{.address = "127.0.0.1:" + std::to_string(port),
                       .identity = identity,
                       .secret = kSecret,
                       .heartbeat_ms = 2000};
}

class ControlThreadInProcess : public ::testing::TestWithParam<bool> {};

INSTANTIATE_TEST_SUITE_P(Broker, ControlThreadInProcess, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? "Thread" : "Inline";
                         });

TEST_P(ControlThreadInProcess, MixedTrafficWithClientsComingAndGoing) {
  auto server = Server::create(server_options(GetParam()));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->start().ok());
  const uint16_t port = (*server)->port();

  auto sub = Client::connect(client_options(port, "sub"));
  auto pub = Client::connect(client_options(port, "pub"));
  auto flooder = Client::connect(client_options(port, "flooder"));
  auto responder = Client::connect(client_options(port, "responder"));
  auto requester = Client::connect(client_options(port, "requester"));
  auto ps = Client::connect(client_options(port, "ps"));
  ASSERT_TRUE(sub.ok() && pub.ok() && flooder.ok() && responder.ok() && requester.ok() && ps.ok());
  ASSERT_TRUE((*sub)->subscribe("ctrl/a").ok());
  ASSERT_TRUE((*sub)->subscribe("grad/#").ok());
  ASSERT_TRUE((*responder)
                  ->serve("ctrl/rpc",
                          [](const ReceivedMessage& m) -> Result<std::vector<std::byte>> {
                            return std::vector<std::byte>(m.payload.begin(), m.payload.end());
                          })
                  .ok());
  const std::vector<float> init(256, 1.0f);
  ASSERT_TRUE((*ps)->ps_init("w", init).ok());

  constexpr int kControl = 1000, kBulk = 32, kRequests = 100, kPulls = 100, kChurn = 12;
  constexpr size_t kBulkSize = 64 * 1024;
  std::atomic<bool> failed{false};
  std::atomic<bool> done{false};
  std::string why;  // written once, by the first thread that fails
  std::mutex why_mu;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(why_mu);
    if (!failed.exchange(true)) why = what;
  };

  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    for (int i = 0; i < kControl && !failed; ++i) {
      Status s = (*pub)->publish("ctrl/a", std::to_string(i), {.lane = Lane::kControl});
      if (!s.ok()) fail("publish: " + s.to_string());
    }
  });
  threads.emplace_back([&] {
    std::string body(kBulkSize, 'g');
    for (int i = 0; i < kBulk && !failed; ++i) {
      std::memcpy(body.data(), &i, sizeof(i));
      Status s = (*flooder)->publish("grad/f", body);
      if (!s.ok()) fail("bulk publish: " + s.to_string());
    }
  });
  threads.emplace_back([&] {
    for (int i = 0; i < kRequests && !failed; ++i) {
      const std::string q = "q" + std::to_string(i);
      auto r = (*requester)->request("ctrl/rpc", bytes(q), {.attempt_timeout_ms = 2000});
      if (!r.ok()) {
        fail("request: " + r.status().to_string());
      } else if (std::string(reinterpret_cast<const char*>(r->payload.data()), r->payload.size()) !=
                 q) {
        fail("wrong reply to " + q);
      }
    }
  });
  threads.emplace_back([&] {
    std::vector<float> out(init.size());
    for (int i = 0; i < kPulls && !failed; ++i) {
      auto v = (*ps)->ps_pull("w", 0, out);  // on the control connection: handed to the loop
      if (!v.ok()) fail("ps_pull: " + v.status().to_string());
    }
  });
  threads.emplace_back([&] {
    // Clients that attach, subscribe to what flows, and close while it is routed to them.
    for (int i = 0; i < kChurn && !failed; ++i) {
      auto c = Client::connect(client_options(port, "churn" + std::to_string(i)));
      if (!c.ok()) {
        fail("churn connect: " + c.status().to_string());
        break;
      }
      auto id = (*c)->subscribe("ctrl/#");
      if (!id.ok()) fail("churn subscribe: " + id.status().to_string());
      Status s = (*c)->publish("ctrl/churn", "x", {.lane = Lane::kControl});
      if (!s.ok()) fail("churn publish: " + s.to_string());
      if (i % 2 == 0 && id.ok()) {
        s = (*c)->unsubscribe(*id);
        if (!s.ok()) fail("churn unsubscribe: " + s.to_string());
      }
    }
  });
  std::thread metrics([&] {
    while (!done.load(std::memory_order_acquire)) {
      if ((*server)->metrics_text().empty()) fail("empty metrics");
      (void)(*server)->counters();
      // Pacing of a reader beside the traffic (it waits for nothing).
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });

  int control = 0, bulk = 0;
  const Deadline dl = Deadline::after_ms(120000);
  while ((control < kControl || bulk < kBulk) && !dl.expired() && !failed) {
    auto m = (*sub)->poll(Deadline::after_ms(100));
    if (!m.ok()) {
      if (m.status().code() == StatusCode::kTimeout) continue;
      fail("subscriber: " + m.status().to_string());
      break;
    }
    if (m->topic == "grad/f") {
      int i = -1;
      std::memcpy(&i, m->payload.data(), sizeof(i));
      EXPECT_EQ(i, bulk) << "bulk out of order";
      ++bulk;
    } else {
      EXPECT_EQ(m->topic, "ctrl/a");
      EXPECT_EQ(std::string(m->text()), std::to_string(control)) << "control out of order";
      ++control;
    }
  }
  for (auto& t : threads) t.join();
  done.store(true, std::memory_order_release);
  metrics.join();
  EXPECT_FALSE(failed.load()) << why;
  EXPECT_EQ(control, kControl);
  EXPECT_EQ(bulk, kBulk);
  Status drained = (*server)->drain(Deadline::after_ms(10000));
  EXPECT_TRUE(drained.ok()) << drained;
}

// spin_before_block_us on both broker threads and on two poll() callers, so that TSan sees the
// spinning waits beside the traffic they carry: control round trips in order while a third
// client floods bulk to a handler, every bulk message whole and in order. Values out of range
// are refused by Server::create and Client::connect.
TEST_P(ControlThreadInProcess, RoundTripsAndBulkThroughSpinningThreads) {
  ServerOptions so = server_options(GetParam());
  so.spin_before_block_us = 500;
  auto server = Server::create(so);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->start().ok());
  const uint16_t port = (*server)->port();
  ClientOptions po = client_options(port, "pinger");
  po.spin_before_block_us = 500;
  ClientOptions eo = client_options(port, "echo");
  eo.spin_before_block_us = 500;
  auto pinger = Client::connect(po);
  auto echo = Client::connect(eo);
  auto flooder = Client::connect(client_options(port, "flooder"));
  ASSERT_TRUE(pinger.ok() && echo.ok() && flooder.ok());
  ASSERT_TRUE((*echo)->subscribe("ctrl/ping").ok());
  ASSERT_TRUE((*pinger)->subscribe("ctrl/pong").ok());
  constexpr int kRounds = 500, kBulk = 32;
  constexpr size_t kBulkSize = 64 * 1024;
  std::mutex mu;
  std::condition_variable cv;
  int bulk_seen = 0;
  bool bulk_in_order = true;
  ASSERT_TRUE((*echo)
                  ->subscribe("grad/#",
                              [&](const ReceivedMessage& m) {
                                int i = -1;
                                std::memcpy(&i, m.payload.data(), sizeof(i));
                                std::lock_guard<std::mutex> lock(mu);
                                bulk_in_order = bulk_in_order && i == bulk_seen &&
                                                m.payload.size() == kBulkSize;
                                ++bulk_seen;
                                cv.notify_all();
                              })
                  .ok());
  std::thread echoer([&] {
    for (int i = 0; i < kRounds; ++i) {
      auto m = (*echo)->poll(Deadline::after_ms(30000));
      if (!m.ok()) return;
      if (!(*echo)->publish("ctrl/pong", m->payload, {.lane = Lane::kControl}).ok()) return;
    }
  });
  std::thread flood([&] {
    std::string body(kBulkSize, 'g');
    for (int i = 0; i < kBulk; ++i) {
      std::memcpy(body.data(), &i, sizeof(i));
      if (!(*flooder)->publish("grad/f", body).ok()) return;
    }
  });
  for (int i = 0; i < kRounds; ++i) {
    const std::string body = std::to_string(i);
    ASSERT_TRUE((*pinger)->publish("ctrl/ping", body, {.lane = Lane::kControl}).ok());
    auto m = (*pinger)->poll(Deadline::after_ms(30000));
    ASSERT_TRUE(m.ok()) << m.status() << " after " << i << " round trips";
    EXPECT_EQ(m->text(), body);
  }
  echoer.join();
  flood.join();
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return bulk_seen == kBulk; }))
        << bulk_seen << " of " << kBulk << " bulk messages arrived";
    EXPECT_TRUE(bulk_in_order);
  }
  pinger->reset();
  echo->reset();
  flooder->reset();
  (*server)->stop();
  for (const int64_t bad : {int64_t{-1}, int64_t{100'001}}) {
    ServerOptions bs = server_options(GetParam());
    bs.spin_before_block_us = bad;
    EXPECT_EQ(Server::create(bs).status().code(), StatusCode::kInvalidArgument) << bad;
    ClientOptions bc = client_options(port, "bad");
    bc.spin_before_block_us = bad;
    EXPECT_EQ(Client::connect(bc).status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

// A reply larger than one chunk travels to the broker chunked on the main connection and back to
// the requester on the bulk lane: a control frame is never chunked, and the broker once queued it
// on the control lane, where it was dropped (and the requester's delivery credit with it) at every
// attempt.
TEST_P(ControlThreadInProcess, ARequestWithAReplyLargerThanAChunkIsAnswered) {
  auto server = Server::create(server_options(GetParam()));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->start().ok());
  const uint16_t port = (*server)->port();
  auto responder = Client::connect(client_options(port, "responder"));
  auto requester = Client::connect(client_options(port, "requester"));
  ASSERT_TRUE(responder.ok() && requester.ok());
  const std::vector<std::byte> big(100 * 1024, std::byte{7});
  ASSERT_TRUE(
      (*responder)
          ->serve("svc/big",
                  [big](const ReceivedMessage&) -> Result<std::vector<std::byte>> { return big; })
          .ok());
  auto r = (*requester)
               ->request("svc/big", bytes("q"),
                         {.attempt_timeout_ms = 1000, .max_attempts = 2, .backoff_ms = 5});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->payload.size(), big.size());
}

// The routing core's side of it: a reply or dead letter over one control frame takes the bulk
// lane; a publish or request over it on a control-lane topic is refused, not queued to be lost.
TEST(BrokerControlFrameSize, OversizeControlMessagesTakeTheBulkLaneOrAreRefused) {
  BrokerOptions o;
  o.policies = {TopicPolicy{.pattern = "ctrl/#", .lane = Lane::kControl}};
  o.max_control_payload = 16;
  Broker b(o);
  auto sub = std::make_shared<LocalSubscriber>(1, "sub", 16);
  auto responder = std::make_shared<LocalSubscriber>(2, "responder", 16);
  auto requester = std::make_shared<LocalSubscriber>(3, "requester", 16);
  for (const auto& s : {sub, responder, requester}) b.add_session(s);
  ASSERT_TRUE(b.subscribe(1, 1, "ctrl/#", false).ok());
  ASSERT_TRUE(b.subscribe(2, 1, "svc/#", true).ok());
  const std::string small(16, 's'), large(17, 'l');
  auto r = b.publish({.topic = "ctrl/x", .payload = bytes(large), .id = 1, .from_session = 3});
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
  r = b.publish({.topic = "ctrl/x", .payload = bytes(small), .id = 2, .from_session = 3});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(sub->lane(Lane::kControl).size(), 1u);
  r = b.request({.topic = "ctrl/rpc", .payload = bytes(large), .id = 3, .from_session = 3});
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
  r = b.request(
      {.topic = "svc/a", .payload = bytes(small), .id = 4, .attempt = 1, .from_session = 3});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(b.reply(4, bytes(large), nullptr));
  EXPECT_EQ(requester->lane(Lane::kControl).size(), 0u);
  EXPECT_EQ(requester->lane(Lane::kBulk).size(), 1u);
  r = b.request(
      {.topic = "svc/b", .payload = bytes(small), .id = 5, .attempt = 1, .from_session = 3});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(b.reply(5, bytes(small), nullptr));
  EXPECT_EQ(requester->lane(Lane::kControl).size(), 1u);
}

// The nice value of this process's thread named `name`; -100 when there is none.
int thread_nice(const std::string& name) {
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return -100;
  int nice = -100;
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream comm(std::string("/proc/self/task/") + e->d_name + "/comm");
    std::string got;
    if (!std::getline(comm, got) || got != name) continue;
    errno = 0;
    const int v = ::getpriority(PRIO_PROCESS, static_cast<id_t>(std::atoi(e->d_name)));
    if (errno == 0) nice = v;
    break;
  }
  ::closedir(dir);
  return nice;
}

// loop_nice lowers the loop thread's priority, and only the loop's: the control thread keeps the
// process's. Without the control thread the loop serves control too and keeps its priority.
// Out-of-range values are refused.
TEST(LoopNice, OnlyTheBulkLoopYieldsAndOnlyWithAControlThread) {
  const int base = ::getpriority(PRIO_PROCESS, 0);
  if (base > 19 - 5) GTEST_SKIP() << "this process already runs at nice " << base;
  for (const bool control_thread : {true, false}) {
    SCOPED_TRACE(control_thread ? "control thread" : "inline");
    ServerOptions o = server_options(control_thread);
    o.loop_nice = base + 5;
    auto server = Server::create(o);
    ASSERT_TRUE(server.ok()) << server.status();
    ASSERT_TRUE((*server)->start().ok());
    // Both threads are up once a client got through the handshake and attached.
    auto c = Client::connect(client_options((*server)->port(), "nice"));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(thread_nice("myelin-brk-loop"), control_thread ? base + 5 : base);
    if (control_thread) {
      EXPECT_EQ(thread_nice("myelin-brk-ctrl"), base);
    }
    c->reset();
    (*server)->stop();
  }
  for (const int bad : {-1, 20}) {
    ServerOptions o = server_options(true);
    o.loop_nice = bad;
    auto server = Server::create(o);
    EXPECT_EQ(server.status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

// The scheduling policy (SCHED_OTHER, SCHED_IDLE, ...) of each of this process's threads named
// `name`, read back with sched_getscheduler on the thread's id.
std::vector<int> thread_policies(const std::string& name) {
  std::vector<int> out;
  for (const pid_t tid : test_support::thread_ids(0, name)) {
    const int policy = ::sched_getscheduler(tid);
    if (policy >= 0) out.push_back(policy);
  }
  return out;
}

// Waits (bounded) until every thread named `name` has `policy` and there are `count` of them:
// a thread applies its scheduling itself once it runs.
bool threads_reach_policy(const std::string& name, int policy, size_t count) {
  const Deadline d = Deadline::after_ms(5000);
  while (true) {
    const std::vector<int> now = thread_policies(name);
    if (now.size() == count && std::count(now.begin(), now.end(), policy) == std::ssize(now))
      return true;
    if (d.expired()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// loop_scheduling = kIdle puts the loop thread, and only it, under SCHED_IDLE; the control
// thread and the caller keep theirs. Without the control thread the loop serves control too and
// keeps its policy. A value outside the enumeration is refused.
TEST(LoopScheduling, IdleReachesOnlyTheBulkLoopAndOnlyWithAControlThread) {
  if (::sched_getscheduler(0) != SCHED_OTHER) GTEST_SKIP() << "this process is not SCHED_OTHER";
  for (const bool control_thread : {true, false}) {
    SCOPED_TRACE(control_thread ? "control thread" : "inline");
    ServerOptions o = server_options(control_thread);
    o.loop_scheduling = BulkScheduling::kIdle;
    auto server = Server::create(o);
    ASSERT_TRUE(server.ok()) << server.status();
    ASSERT_TRUE((*server)->start().ok());
    auto c = Client::connect(client_options((*server)->port(), "idle"));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE(
        threads_reach_policy("myelin-brk-loop", control_thread ? SCHED_IDLE : SCHED_OTHER, 1));
    if (control_thread) {
      EXPECT_EQ(thread_policies("myelin-brk-ctrl"), std::vector<int>{SCHED_OTHER});
    }
    // The client's I/O thread keeps the default (a client option of its own).
    EXPECT_EQ(thread_policies("myelin-cli-io"), std::vector<int>{SCHED_OTHER});
    EXPECT_EQ(::sched_getscheduler(0), SCHED_OTHER);
    c->reset();
    (*server)->stop();
  }
  ServerOptions o = server_options(true);
  o.loop_scheduling = static_cast<BulkScheduling>(7);
  auto server = Server::create(o);
  EXPECT_EQ(server.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(server.status().message().find("loop_scheduling"), std::string_view::npos)
      << server.status();
}

// Whether this process may put a thread under SCHED_RR (CAP_SYS_NICE or RLIMIT_RTPRIO): tried
// on a thread of its own, which ends with it.
bool may_use_realtime() {
  bool ok = false;
  std::thread t(
      [&] { ok = apply_control_scheduling_to_this_thread(ControlScheduling::kRealtime).ok(); });
  t.join();
  return ok;
}

TEST(ControlScheduling, NamesParseAndRefuseWhatTheyDoNotKnow) {
  EXPECT_EQ(control_scheduling_name(ControlScheduling::kNormal), "normal");
  EXPECT_EQ(control_scheduling_name(ControlScheduling::kRealtime), "rr");
  EXPECT_EQ(control_scheduling_name(static_cast<ControlScheduling>(9)), "invalid");
  EXPECT_EQ(*parse_control_scheduling("normal"), ControlScheduling::kNormal);
  EXPECT_EQ(*parse_control_scheduling("rr"), ControlScheduling::kRealtime);
  for (const char* bad : {"", "RR", "fifo", "idle"}) {
    auto r = parse_control_scheduling(bad);
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(validate_control_scheduling(static_cast<ControlScheduling>(2), "x").code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(apply_control_scheduling_to_this_thread(static_cast<ControlScheduling>(2)).code(),
            StatusCode::kInvalidArgument);
  ServerOptions o = server_options(true);
  o.control_scheduling = static_cast<ControlScheduling>(3);
  auto server = Server::create(o);
  EXPECT_EQ(server.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(server.status().message().find("control_scheduling"), std::string_view::npos)
      << server.status();
}

// this_thread_is_realtime() is cached per thread: apply_control_scheduling_to_this_thread() sets
// it at once, and a policy changed by other means is seen within 64 calls.
TEST(ControlScheduling, RealtimeQueryFollowsThePolicy) {
  if (::sched_getscheduler(0) != SCHED_OTHER) GTEST_SKIP() << "this process is not SCHED_OTHER";
  std::thread([] { EXPECT_FALSE(this_thread_is_realtime()); }).join();
  if (!may_use_realtime()) GTEST_SKIP() << "no CAP_SYS_NICE or RLIMIT_RTPRIO here";
  std::thread([] {
    EXPECT_FALSE(this_thread_is_realtime());
    ASSERT_TRUE(apply_control_scheduling_to_this_thread(ControlScheduling::kRealtime).ok());
    EXPECT_TRUE(this_thread_is_realtime());
    const sched_param fair{};
    ASSERT_EQ(::pthread_setschedparam(::pthread_self(), SCHED_OTHER, &fair), 0);
    bool seen = false;
    for (int i = 0; i < 64 && !seen; ++i) seen = !this_thread_is_realtime();
    EXPECT_TRUE(seen);
  }).join();
}

// CPU seconds the calling thread has used.
double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

// CPU seconds (user + system) used so far by this process's threads named `name`.
double named_threads_cpu_seconds(const std::string& name) {
  double sum = 0;
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return sum;
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    const std::string base = std::string("/proc/self/task/") + e->d_name;
    std::ifstream comm(base + "/comm");
    std::string got;
    if (!std::getline(comm, got) || got != name) continue;
    std::ifstream stat(base + "/stat");
    std::string line;
    std::getline(stat, line);
    // The fields after the command name's closing parenthesis: state is the first, utime
    // the 12th, stime the 13th.
    std::istringstream rest(line.substr(line.rfind(')') + 2));
    std::vector<std::string> f{std::istream_iterator<std::string>(rest), {}};
    if (f.size() > 12) sum += static_cast<double>(std::stol(f[11]) + std::stol(f[12]));
  }
  ::closedir(dir);
  return sum / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// control_scheduling = kRealtime puts the control thread, and only it, under SCHED_RR, and
// round trips flow through it to a poll() caller of the application's own under SCHED_RR, which
// keeps its policy. Neither spins, even with the longest spin configured (100 ms): a real-time
// spinner would keep bulk off its CPU. Without the privilege the server still starts, its
// control thread keeps SCHED_OTHER, and control flows.
TEST(ControlScheduling, RealtimeReachesOnlyTheControlThreadAndNeitherRealtimeThreadSpins) {
  if (::sched_getscheduler(0) != SCHED_OTHER) GTEST_SKIP() << "this process is not SCHED_OTHER";
  EXPECT_FALSE(this_thread_is_realtime());
  const bool realtime = may_use_realtime();
  ServerOptions so = server_options(true);
  so.control_scheduling = ControlScheduling::kRealtime;
  so.spin_before_block_us = 100'000;
  auto server = Server::create(so);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->start().ok());
  ClientOptions co = client_options((*server)->port(), "rr");
  co.spin_before_block_us = 100'000;
  auto c = Client::connect(co);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(threads_reach_policy("myelin-brk-ctrl", realtime ? SCHED_RR : SCHED_OTHER, 1));
  EXPECT_EQ(thread_policies("myelin-brk-loop"), std::vector<int>{SCHED_OTHER});
  EXPECT_EQ(thread_policies("myelin-cli-io"), std::vector<int>{SCHED_OTHER});
  ASSERT_TRUE((*c)->subscribe("#").ok());
  const double ctrl_cpu_before = named_threads_cpu_seconds("myelin-brk-ctrl");
  double poller_cpu = 0;
  std::thread poller([&] {
    if (realtime) {
      ASSERT_TRUE(apply_control_scheduling_to_this_thread(ControlScheduling::kRealtime).ok());
      EXPECT_TRUE(this_thread_is_realtime());
    }
    const double start = thread_cpu_seconds();
    for (int i = 0; i < 5; ++i) {
      ASSERT_TRUE((*c)->publish("ctrl/x", bytes("c"), {.lane = Lane::kControl}).ok());
      auto m = (*c)->poll(Deadline::after_ms(10000));
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ(m->topic, "ctrl/x");
      // Nothing comes for 40 ms: a spinning wait would use that CPU time.
      auto none = (*c)->poll(Deadline::after_ms(40));
      EXPECT_FALSE(none.ok());
    }
    poller_cpu = thread_cpu_seconds() - start;
    EXPECT_EQ(::sched_getscheduler(0), realtime ? SCHED_RR : SCHED_OTHER);
  });
  poller.join();
  const double ctrl_cpu = named_threads_cpu_seconds("myelin-brk-ctrl") - ctrl_cpu_before;
  if (realtime) {
    // Five spins of 40 ms (each cut short by the next wait's deadline) would be 0.2 s.
    EXPECT_LT(poller_cpu, 0.1);
    EXPECT_LT(ctrl_cpu, 0.1);
  }
  EXPECT_TRUE(threads_reach_policy("myelin-brk-ctrl", realtime ? SCHED_RR : SCHED_OTHER, 1));
  EXPECT_EQ(::sched_getscheduler(0), SCHED_OTHER);
  c->reset();
  (*server)->stop();
}

TEST(IoThreadScheduling, IdleReachesOnlyTheClientsIoThread) {
  if (::sched_getscheduler(0) != SCHED_OTHER) GTEST_SKIP() << "this process is not SCHED_OTHER";
  auto server = Server::create(server_options(true));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->start().ok());
  ClientOptions bad = client_options((*server)->port(), "bad");
  bad.io_thread_scheduling = static_cast<BulkScheduling>(2);
  auto refused = Client::connect(bad);
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("io_thread_scheduling"), std::string_view::npos)
      << refused.status();
  ClientOptions co = client_options((*server)->port(), "idle");
  co.io_thread_scheduling = BulkScheduling::kIdle;
  auto c = Client::connect(co);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(threads_reach_policy("myelin-cli-io", SCHED_IDLE, 1));
  EXPECT_EQ(thread_policies("myelin-brk-loop"), std::vector<int>{SCHED_OTHER});
  EXPECT_EQ(thread_policies("myelin-brk-ctrl"), std::vector<int>{SCHED_OTHER});
  EXPECT_EQ(::sched_getscheduler(0), SCHED_OTHER);
  // Control and bulk both still flow.
  ASSERT_TRUE((*c)->subscribe("#").ok());
  ASSERT_TRUE((*c)->publish("ctrl/x", "c", {.lane = Lane::kControl}).ok());
  ASSERT_TRUE((*c)->publish("grad/x", "b").ok());
  for (int i = 0; i < 2; ++i) EXPECT_TRUE((*c)->poll(Deadline::after_ms(10000)).ok());
  c->reset();
  (*server)->stop();
}

// With every bulk thread under SCHED_IDLE (the broker's loop, both clients' I/O threads) bulk
// still moves whenever a CPU is free: 24 messages of 512 KiB (chunked) reach a handler that runs
// on the subscriber's SCHED_IDLE I/O thread, whole and in order, beside control messages that a
// thread in poll() reads, within the deadline.
TEST(BulkScheduling, BulkStillProgressesWithEveryBulkThreadIdle) {
  ServerOptions so = server_options(true);
  so.loop_scheduling = BulkScheduling::kIdle;
  auto server = Server::create(so);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->start().ok());
  ClientOptions po = client_options((*server)->port(), "pub");
  po.io_thread_scheduling = BulkScheduling::kIdle;
  ClientOptions subo = client_options((*server)->port(), "sub");
  subo.io_thread_scheduling = BulkScheduling::kIdle;
  auto pub = Client::connect(po);
  ASSERT_TRUE(pub.ok()) << pub.status();
  auto sub = Client::connect(subo);
  ASSERT_TRUE(sub.ok()) << sub.status();
  constexpr int kBulk = 24;
  constexpr size_t kSize = 512 * 1024;
  std::mutex mu;
  std::condition_variable cv;
  int bulk_seen = 0;
  bool bulk_intact = true;
  ASSERT_TRUE((*sub)
                  ->subscribe("grad/#",
                              [&](const ReceivedMessage& m) {
                                std::lock_guard<std::mutex> lock(mu);
                                const auto* p = reinterpret_cast<const uint8_t*>(m.payload.data());
                                bulk_intact = bulk_intact && m.payload.size() == kSize &&
                                              p[0] == static_cast<uint8_t>(bulk_seen) &&
                                              p[kSize - 1] == static_cast<uint8_t>(bulk_seen);
                                ++bulk_seen;
                                cv.notify_all();
                              })
                  .ok());
  ASSERT_TRUE((*sub)->subscribe("ctrl/#").ok());
  EXPECT_TRUE(threads_reach_policy("myelin-cli-io", SCHED_IDLE, 2));
  std::vector<std::byte> payload(kSize);
  for (int i = 0; i < kBulk; ++i) {
    std::fill(payload.begin(), payload.end(), static_cast<std::byte>(i));
    ASSERT_TRUE((*pub)->publish("grad/x", payload).ok()) << i;
    ASSERT_TRUE((*pub)
                    ->publish("ctrl/x", std::to_string(i), {.lane = Lane::kControl, .batch = false})
                    .ok());
  }
  for (int i = 0; i < kBulk; ++i) {
    auto m = (*sub)->poll(Deadline::after_ms(60000));
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->text(), std::to_string(i));
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return bulk_seen == kBulk; }))
        << bulk_seen << " of " << kBulk << " bulk messages arrived";
    EXPECT_TRUE(bulk_intact);
  }
  pub->reset();
  sub->reset();
  (*server)->stop();
}

// SO_SNDBUF of this process's TCP sockets whose local port is `port` (the broker's side of its
// client connections), smallest first.
std::vector<int> send_buffers_on_port(uint16_t port) {
  std::vector<int> out;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return out;
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    const int fd = std::atoi(e->d_name);
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) continue;
    if (addr.ss_family != AF_INET) continue;
    sockaddr_storage peer{};
    socklen_t peer_len = sizeof(peer);
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) continue;
    if (ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port) != port) continue;
    int bytes = 0;
    socklen_t blen = sizeof(bytes);
    if (::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, &blen) == 0) out.push_back(bytes);
  }
  ::closedir(dir);
  std::sort(out.begin(), out.end());
  return out;
}

// A session's main connection gets bulk_socket_buffer_bytes once its control connection
// attached; the control connection keeps socket_buffer_bytes. 0 leaves both alike.
TEST(BulkSocketBuffers, OnlyTheMainConnectionOfASessionWithAControlConnectionGrows) {
  for (const int bulk : {512 * 1024, 0}) {
    SCOPED_TRACE(bulk);
    ServerOptions o = server_options(true);
    o.socket_buffer_bytes = 64 * 1024;
    o.bulk_socket_buffer_bytes = bulk;
    auto server = Server::create(o);
    ASSERT_TRUE(server.ok()) << server.status();
    ASSERT_TRUE((*server)->start().ok());
    auto c = Client::connect(client_options((*server)->port(), "buffers"));
    ASSERT_TRUE(c.ok()) << c.status();
    // The attach is done once a subscription made over the control connection was answered.
    ASSERT_TRUE((*c)->subscribe("ctrl/x").ok());
    const std::vector<int> sizes = send_buffers_on_port((*server)->port());
    ASSERT_EQ(sizes.size(), 2u) << "main and control connection, broker side";
    if (bulk > 0) {
      EXPECT_GT(sizes[1], sizes[0]);
    } else {
      EXPECT_EQ(sizes[1], sizes[0]);
    }
    c->reset();
    (*server)->stop();
  }
  ServerOptions o = server_options(true);
  o.bulk_socket_buffer_bytes = -1;
  EXPECT_EQ(Server::create(o).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace myelin::broker
