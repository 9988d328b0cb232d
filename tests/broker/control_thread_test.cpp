// The broker's control thread (ServerOptions::control_thread), against the real myelin-broker
// daemon with and without it (`--control-thread on|off`): order per topic and publisher with a
// bulk flood beside, a killed and a stopped client cleaned up while others go on, a SIGTERM drain
// that delivers what control and bulk lanes still hold. The clients live in this process (each its
// own connections and I/O thread) and, for the killed one, in a child forked before this process
// starts any thread.
#include <gtest/gtest.h>

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <myelin/broker/broker.hpp>
#include <myelin/broker/client.hpp>
#include <myelin/broker/frame.hpp>
#include <myelin/core/clock.hpp>

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

constexpr const char* kSecret = "control-thread-secret-0123456789";
constexpr const char* kTopics =
    "[[topic]]\npattern = \"ctrl/#\"\nlane = \"control\"\nbatching = false\n"
    "[[topic]]\npattern = \"grad/#\"\nlane = \"bulk\"\nbatching = true\n";

// The daemon as a child process, its control thread on or off.
class Daemon : public test_support::BrokerDaemon {
 public:
  explicit Daemon(bool control_thread, const std::string& broker_keys = "",
                  const std::string& drain_timeout_ms = "5000")
      : BrokerDaemon(
            {.secret = kSecret,
             .extra_config = broker_keys + kTopics,
             .flags = {"--log-level", "warn", "--control-thread", control_thread ? "on" : "off",
                       "--drain-timeout-ms", drain_timeout_ms},
             .heartbeat_ms = 1000,
             .name = "ctrl-thread-test"}) {}
};

std::string seq_text(int i) {
  return std::to_string(i);
}

class ControlThread : public ::testing::TestWithParam<bool> {};

INSTANTIATE_TEST_SUITE_P(Broker, ControlThread, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? "Thread" : "Inline";
                         });

// Two control publishers and a bulk flooder to one subscriber: every message arrives once, in
// order per topic and publisher, bulk whole.
TEST_P(ControlThread, OrderPerTopicAndPublisherIsKeptBesideABulkFlood) {
  Daemon d(GetParam());
  ASSERT_TRUE(d.up());
  auto sub = Client::connect(d.client("sub"));
  ASSERT_TRUE(sub.ok()) << sub.status();
  ASSERT_TRUE((*sub)->subscribe("ctrl/#").ok());
  ASSERT_TRUE((*sub)->subscribe("grad/#").ok());
  constexpr int kControl = 1500, kBulk = 48;
  constexpr size_t kBulkSize = 256 * 1024;
  // The publishers stay connected until everything arrived: closing a client gives what it
  // still has queued only a bounded time (close_flush_ms).
  auto pub_a = Client::connect(d.client("pub-a"));
  auto pub_b = Client::connect(d.client("pub-b"));
  auto flooder = Client::connect(d.client("flooder"));
  ASSERT_TRUE(pub_a.ok() && pub_b.ok() && flooder.ok());
  std::atomic<bool> failed{false};
  auto control_publisher = [&](Client& c, const std::string& topic) {
    for (int i = 0; i < kControl && !failed; ++i) {
      if (!c.publish(topic, seq_text(i), {.lane = Lane::kControl}).ok()) failed = true;
    }
  };
  std::thread a(control_publisher, std::ref(**pub_a), "ctrl/a");
  std::thread b(control_publisher, std::ref(**pub_b), "ctrl/b");
  std::thread flood([&] {
    std::string body(kBulkSize, '\0');
    for (int i = 0; i < kBulk && !failed; ++i) {
      std::memcpy(body.data(), &i, sizeof(i));
      for (size_t k = sizeof(i); k < body.size(); k += 4096) body[k] = static_cast<char>(i + k);
      if (!(*flooder)->publish("grad/f", body).ok()) failed = true;
    }
  });
  std::map<std::string, int> next;
  int control = 0, bulk = 0;
  const Deadline dl = Deadline::after_ms(60000);
  while ((control < 2 * kControl || bulk < kBulk) && !dl.expired() && !failed) {
    auto m = (*sub)->poll(Deadline::after_ms(100));
    if (!m.ok()) continue;
    EXPECT_EQ(m->missed_before, 0u);
    if (m->topic == "grad/f") {
      ASSERT_EQ(m->payload.size(), kBulkSize);
      int i = -1;
      std::memcpy(&i, m->payload.data(), sizeof(i));
      EXPECT_EQ(i, bulk) << "bulk out of order";
      for (size_t k = sizeof(i); k < kBulkSize; k += 4096) {
        ASSERT_EQ(static_cast<char>(m->payload[k]), static_cast<char>(i + k)) << "at " << k;
      }
      ++bulk;
      continue;
    }
    const int i = std::stoi(std::string(m->text()));
    EXPECT_EQ(i, next[m->topic]) << "out of order on " << m->topic;
    next[m->topic] = i + 1;
    ++control;
  }
  a.join();
  b.join();
  flood.join();
  EXPECT_FALSE(failed.load());
  EXPECT_EQ(control, 2 * kControl);
  EXPECT_EQ(bulk, kBulk);
  EXPECT_EQ(next["ctrl/a"], kControl);
  EXPECT_EQ(next["ctrl/b"], kControl);
}

// A subscriber killed with SIGKILL, then one stopped with SIGSTOP (silent on both connections):
// the broker ends both sessions (the second past the heartbeat deadline), while a control round
// trip between two live clients goes on the whole time.
TEST_P(ControlThread, KilledAndStoppedClientsAreCleanedUpWhileControlFlows) {
  if (!have_curl()) GTEST_SKIP() << "curl is needed to read /metrics";
  Daemon d(GetParam());
  ASSERT_TRUE(d.up());
  // The children are forked before this process starts a thread of its own (each then starts
  // its client's threads after the fork).
  auto spawn_subscriber = [&](const std::string& who) -> std::pair<pid_t, int> {
    int fds[2];
    if (::pipe(fds) != 0) return {-1, -1};
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      auto c = Client::connect(d.client(who));
      if (!c.ok() || !(*c)->subscribe("ctrl/#").ok()) ::_exit(2);
      const char ready = 'r';
      if (::write(fds[1], &ready, 1) != 1) ::_exit(3);
      // Reads until killed or stopped; bounded, so a broken test leaves no process behind.
      const Deadline end = Deadline::after_ms(60000);
      while (!end.expired()) (void)(*c)->poll(Deadline::after_ms(100));
      ::_exit(0);
    }
    ::close(fds[1]);
    return {pid, fds[0]};
  };
  auto [killed, killed_fd] = spawn_subscriber("victim-killed");
  auto [stopped, stopped_fd] = spawn_subscriber("victim-stopped");
  ASSERT_GT(killed, 0);
  ASSERT_GT(stopped, 0);
  for (int fd : {killed_fd, stopped_fd}) {
    pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1) << "a child did not subscribe";
    char ready = 0;
    ASSERT_EQ(::read(fd, &ready, 1), 1);
    ::close(fd);
  }
  auto ping = Client::connect(d.client("ping"));
  auto pong = Client::connect(d.client("pong"));
  ASSERT_TRUE(ping.ok() && pong.ok());
  ASSERT_TRUE((*pong)->subscribe("ctrl/ping").ok());
  ASSERT_TRUE((*ping)->subscribe("ctrl/pong").ok());
  EXPECT_EQ(d.metric_reaches("myelin_broker_connections_active", 4), 4);
  EXPECT_EQ(d.metric_reaches("myelin_broker_control_connections_active", 4), 4);
  const double dead_before = d.metric("myelin_broker_dead_clients_total");

  std::atomic<bool> stop{false};
  std::atomic<int> round_trips{0};
  Status ping_status;
  std::thread pinger([&] {
    for (int i = 0; !stop.load(std::memory_order_acquire); ++i) {
      Status s = (*ping)->publish("ctrl/ping", seq_text(i), {.lane = Lane::kControl});
      auto echo = s.ok() ? (*pong)->poll(Deadline::after_ms(5000)) : Result<ReceivedMessage>(s);
      if (echo.ok())
        s = (*pong)->publish("ctrl/pong", echo->text(), {.lane = Lane::kControl});
      else
        s = echo.status();
      auto back = s.ok() ? (*ping)->poll(Deadline::after_ms(5000)) : Result<ReceivedMessage>(s);
      if (!back.ok() || back->text() != seq_text(i)) {
        ping_status = back.ok() ? internal_error("echo ", back->text(), " for ", i) : back.status();
        return;
      }
      round_trips.fetch_add(1, std::memory_order_relaxed);
    }
  });
  ::kill(killed, SIGKILL);
  int st = 0;
  EXPECT_TRUE(wait_exit(killed, Deadline::after_ms(10000), &st));
  EXPECT_EQ(d.metric_reaches("myelin_broker_connections_active", 3), 3);
  EXPECT_EQ(d.metric_reaches("myelin_broker_control_connections_active", 3), 3);
  ::kill(stopped, SIGSTOP);
  EXPECT_EQ(d.metric_reaches("myelin_broker_connections_active", 2), 2);
  EXPECT_EQ(d.metric_reaches("myelin_broker_control_connections_active", 2), 2);
  EXPECT_GE(d.metric("myelin_broker_dead_clients_total"), dead_before + 1);
  ::kill(stopped, SIGKILL);
  EXPECT_TRUE(wait_exit(stopped, Deadline::after_ms(10000), &st));
  const int before = round_trips.load(std::memory_order_relaxed);
  // The live pair still gets round trips through after the cleanup.
  const Deadline more = Deadline::after_ms(10000);
  while (round_trips.load(std::memory_order_relaxed) < before + 50 && !more.expired() &&
         ping_status.ok()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  stop.store(true, std::memory_order_release);
  pinger.join();
  EXPECT_TRUE(ping_status.ok()) << ping_status;
  EXPECT_GE(round_trips.load(), before + 50);
}

// SIGTERM while control and bulk messages wait for a subscriber that has not read them: the
// daemon keeps delivering until both lanes are empty, then exits 0.
TEST_P(ControlThread, SigtermDrainDeliversWhatControlAndBulkLanesHold) {
  if (!have_curl()) GTEST_SKIP() << "curl is needed to read /metrics";
  // The drain may take its time: under a sanitizer on a loaded 2-CPU host, 4 MiB through a
  // subscriber took over the default 5 s; what is under test is that everything arrives.
  Daemon d(GetParam(), "", "20000");
  ASSERT_TRUE(d.up());
  auto sub = Client::connect(d.client("sub"));
  auto pub = Client::connect(d.client("pub"));
  ASSERT_TRUE(sub.ok() && pub.ok());
  ASSERT_TRUE((*sub)->subscribe("ctrl/#").ok());
  ASSERT_TRUE((*sub)->subscribe("grad/#").ok());
  constexpr int kControl = 512, kBulk = 64;
  const std::string body(64 * 1024, 'b');
  for (int i = 0; i < kControl; ++i) {
    ASSERT_TRUE((*pub)->publish("ctrl/x", seq_text(i), {.lane = Lane::kControl}).ok());
    if (i % (kControl / kBulk) == 0) {
      ASSERT_TRUE((*pub)->publish("grad/x", body).ok());
    }
  }
  // Everything published has reached the broker (a drain delivers what the broker holds, not
  // what is still on its way to it).
  EXPECT_EQ(d.metric_reaches("myelin_broker_topic_messages_total{topic=\"ctrl/x\"}", kControl),
            kControl);
  EXPECT_EQ(d.metric_reaches("myelin_broker_topic_messages_total{topic=\"grad/x\"}", kBulk), kBulk);
  std::atomic<int> exit_code{-3};
  std::thread term([&] { exit_code = d.terminate(25000); });
  int control = 0, bulk = 0;
  const Deadline dl = Deadline::after_ms(30000);
  while ((control < kControl || bulk < kBulk) && !dl.expired()) {
    auto m = (*sub)->poll(Deadline::after_ms(200));
    if (!m.ok()) {
      if (m.status().code() == StatusCode::kTimeout) continue;
      break;  // the broker went away
    }
    if (m->topic == "grad/x") {
      EXPECT_EQ(m->payload.size(), body.size());
      ++bulk;
    } else {
      EXPECT_EQ(std::string(m->text()), seq_text(control));
      ++control;
    }
  }
  term.join();
  EXPECT_EQ(control, kControl);
  EXPECT_EQ(bulk, kBulk);
  EXPECT_EQ(exit_code.load(), 0);
}

// Authenticates `main` as `identity` and grants 1024 credits: a session without a control
// connection. Returns auth_ok and the session id.
Result<std::pair<AuthOk, uint64_t>> raw_auth(Raw& main, std::string_view identity) {
  MYELIN_ASSIGN_OR_RETURN(FrameView hello, main.next(Deadline::after_ms(5000)));
  MYELIN_ASSIGN_OR_RETURN(auto sn, parse_hello(hello));
  MYELIN_ASSIGN_OR_RETURN(auto cn, internal::random_nonce());
  const auto mac = internal::client_mac(kSecret, sn, cn, identity);
  std::vector<std::byte> p(cn.begin(), cn.end());
  p.insert(p.end(), mac.begin(), mac.end());
  MYELIN_RETURN_IF_ERROR(main.send(
      {.type = FrameType::kAuth, .flags = kFlagControl, .seq = encode_versions(VersionRange{})},
      identity, p));
  MYELIN_ASSIGN_OR_RETURN(FrameView f, main.next(Deadline::after_ms(5000)));
  if (f.header.type != FrameType::kAuthOk) return internal_error("no auth_ok");
  MYELIN_ASSIGN_OR_RETURN(AuthOk ok, parse_auth_ok(f));
  const uint64_t session = f.header.id;
  MYELIN_RETURN_IF_ERROR(
      main.send({.type = FrameType::kCredit, .flags = kFlagControl, .id = 1024}));
  return std::make_pair(ok, session);
}

// Authenticates `main` as `identity` and attaches `ctrl` to its session; grants 1024 credits.
Status raw_session(Raw& main, Raw& ctrl, std::string_view identity) {
  MYELIN_ASSIGN_OR_RETURN(auto auth, raw_auth(main, identity));
  const auto& [ok, session] = auth;
  MYELIN_ASSIGN_OR_RETURN(FrameView chello, ctrl.next(Deadline::after_ms(5000)));
  MYELIN_ASSIGN_OR_RETURN(auto csn, parse_hello(chello));
  MYELIN_ASSIGN_OR_RETURN(auto ccn, internal::random_nonce());
  const auto amac = internal::attach_mac(kSecret, csn, ccn, ok.token, session, identity);
  std::vector<std::byte> ap(ccn.begin(), ccn.end());
  ap.insert(ap.end(), amac.begin(), amac.end());
  MYELIN_RETURN_IF_ERROR(ctrl.send({.type = FrameType::kAttach,
                                    .flags = kFlagControl,
                                    .seq = encode_versions(VersionRange{}),
                                    .id = session},
                                   identity, ap));
  MYELIN_ASSIGN_OR_RETURN(FrameView a, ctrl.next(Deadline::after_ms(5000)));
  if (a.header.type != FrameType::kAuthOk) return internal_error("attach refused");
  return ok_status();
}

// A session's control connection ends (its client shuts it down) while control deliveries are
// queued for it, more than its 4 KiB socket buffers take: each arrives once and in order, first
// what the control socket held, the rest on the main connection; the session goes on there.
TEST_P(ControlThread, AnEndedControlConnectionReroutesItsQueueWithoutLoss) {
  if (!have_curl()) GTEST_SKIP() << "curl is needed to read /metrics";
  Daemon d(GetParam());
  ASSERT_TRUE(d.up());
  Raw main(d.address()), ctrl(d.address(), 4096);
  ASSERT_TRUE(main.ok() && ctrl.ok());
  Status s = raw_session(main, ctrl, "ender");
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_TRUE(
      ctrl.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 1}, "ctrl/#").ok());
  auto ack = ctrl.next(Deadline::after_ms(5000));
  ASSERT_TRUE(ack.ok() && ack->header.type == FrameType::kReply);
  constexpr int kN = 300;  // of 4 KiB each: far past the control socket's buffers
  const std::string body(4096, 'q');
  auto pub = Client::connect(d.client("pub"));
  ASSERT_TRUE(pub.ok()) << pub.status();
  // Both raw connections must be heard from within three heartbeat intervals meanwhile.
  std::atomic<bool> quiet{false};
  std::thread beat([&] {
    while (!quiet.load(std::memory_order_acquire)) {
      (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
      (void)ctrl.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE((*pub)->publish("ctrl/q", seq_text(i) + " " + body, {.lane = Lane::kControl}).ok());
  }
  // Every message routed, so queued towards this session.
  EXPECT_EQ(d.metric_reaches("myelin_broker_topic_deliveries_total{topic=\"ctrl/q\"}", kN), kN);
  quiet.store(true, std::memory_order_release);  // pairs with the beat thread's acquire load
  beat.join();
  ASSERT_EQ(::shutdown(ctrl.fd(), SHUT_WR), 0);
  std::vector<int> seen;
  const Deadline dl = Deadline::after_ms(20000);
  // What the control socket holds, up to its end (a last frame cut off there is not decoded).
  while (!dl.expired()) {
    auto m = ctrl.next(dl);
    if (!m.ok()) {
      EXPECT_EQ(m.status().code(), StatusCode::kPeerFailed) << m.status();
      break;
    }
    ASSERT_EQ(m->header.type, FrameType::kDeliver);
    seen.push_back(std::stoi(std::string(reinterpret_cast<const char*>(m->payload.data()), 8)));
  }
  const size_t on_ctrl = seen.size();
  EXPECT_LT(on_ctrl, static_cast<size_t>(kN));
  while (seen.size() < static_cast<size_t>(kN) && !dl.expired()) {
    auto m = main.next(dl);
    ASSERT_TRUE(m.ok()) << m.status() << " after " << seen.size() << " (" << on_ctrl
                        << " on the control connection)";
    ASSERT_EQ(m->header.type, FrameType::kDeliver);
    seen.push_back(std::stoi(std::string(reinterpret_cast<const char*>(m->payload.data()), 8)));
    (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
  }
  ASSERT_EQ(seen.size(), static_cast<size_t>(kN)) << on_ctrl << " on the control connection";
  for (int i = 0; i < kN; ++i) EXPECT_EQ(seen[i], i) << "at " << i;
  EXPECT_EQ(d.metric_reaches("myelin_broker_control_connections_active", 1), 1);  // pub's
  EXPECT_EQ(d.metric_reaches("myelin_broker_connections_active", 2), 2);
}

// A SIGTERM drain with a slow subscriber: the last deliveries are in the kernel's send queue
// when the broker is done, and the client keeps sending (heartbeats) meanwhile. The broker closes
// that socket only once the client has every byte: a close with unread input resets the
// connection and throws the send queue away.
TEST_P(ControlThread, SigtermDrainClosesASlowReadersConnectionOnlyOnceItHasEverything) {
  if (!have_curl()) GTEST_SKIP() << "curl is needed to read /metrics";
  Daemon d(GetParam());
  ASSERT_TRUE(d.up());
  Raw main(d.address(), 16384), ctrl(d.address());
  ASSERT_TRUE(main.ok() && ctrl.ok());
  Status s = raw_session(main, ctrl, "slow");
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_TRUE(
      main.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 1}, "grad/#").ok());
  auto ack = main.next(Deadline::after_ms(5000));
  ASSERT_TRUE(ack.ok() && ack->header.type == FrameType::kReply);
  constexpr int kN = 64;  // of 32 KiB each: far more than the client's 16 KiB socket buffers
  const std::string body(32 * 1024, 'g');
  {
    auto pub = Client::connect(d.client("pub"));
    ASSERT_TRUE(pub.ok()) << pub.status();
    for (int i = 0; i < kN; ++i)
      ASSERT_TRUE((*pub)->publish("grad/x", seq_text(i) + " " + body).ok());
    EXPECT_EQ(d.metric_reaches("myelin_broker_topic_deliveries_total{topic=\"grad/x\"}", kN), kN);
  }
  std::atomic<int> exit_code{-3};
  std::thread term([&] { exit_code = d.terminate(20000); });
  int got = 0;
  const Deadline dl = Deadline::after_ms(30000);
  while (got < kN && !dl.expired()) {
    (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
    (void)ctrl.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
    auto m = main.next(Deadline::after_ms(200));
    if (!m.ok()) {
      if (m.status().code() == StatusCode::kTimeout) continue;
      ADD_FAILURE() << m.status() << " after " << got << " deliveries";
      break;
    }
    if (m->header.type != FrameType::kDeliver) continue;  // the goaway
    EXPECT_EQ(std::stoi(std::string(reinterpret_cast<const char*>(m->payload.data()), 8)), got);
    ++got;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a slow reader
  }
  term.join();
  EXPECT_EQ(got, kN);
  EXPECT_EQ(exit_code.load(), 0);
}

// The daemon child of this process (BrokerDaemon forks it): its resident set in KiB, or -1.
long daemon_rss_kib() {
  std::error_code ec;  // processes come and go while this walks /proc
  for (auto it = std::filesystem::directory_iterator("/proc", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    const std::filesystem::path dir = it->path();
    std::ifstream stat(dir / "stat");
    std::string pid, comm, state;
    long ppid = 0;
    if (!(stat >> pid >> comm >> state >> ppid) || ppid != ::getpid() || comm != "(myelin-broker)")
      continue;
    std::ifstream status(dir / "status");
    for (std::string line; std::getline(status, line);) {
      if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
    }
  }
  return -1;
}

// A subscriber that stops reading while the few messages it gets are spread over a publisher's
// other traffic: each of its messages sits in a receive block of its own. What is queued for it
// (lane and send queue) keeps only a bounded number of those blocks alive, not one per queued
// message: a slow reader costs about its messages' bytes, not a block per message.
TEST_P(ControlThread, ASlowReaderKeepsFewReceiveBlocksAlive) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer keeps freed memory (ASan's quarantine) or shadow memory resident: "
                  "the daemon's size says nothing about the blocks it holds";
#endif
  Daemon d(GetParam());
  ASSERT_TRUE(d.up());
  // No control connection: the main connection keeps the small kernel buffers, so what the
  // stalled reader does not take waits in the broker.
  Raw main(d.address(), 4096);
  ASSERT_TRUE(main.ok());
  auto auth = raw_auth(main, "stalled");
  ASSERT_TRUE(auth.ok()) << auth.status();
  ASSERT_TRUE(
      main.send({.type = FrameType::kSubscribe, .flags = kFlagControl, .id = 1}, "grad/slow").ok());
  auto ack = main.next(Deadline::after_ms(5000));
  ASSERT_TRUE(ack.ok() && ack->header.type == FrameType::kReply);
  auto end = Client::connect(d.client("end"));
  auto pub = Client::connect(d.client("pub"));
  ASSERT_TRUE(end.ok() && pub.ok());
  ASSERT_TRUE((*end)->subscribe("grad/end").ok());
  const long rss_before = daemon_rss_kib();
  ASSERT_GT(rss_before, 0) << "the daemon's /proc entry was not found";
  std::atomic<bool> quiet{false};
  std::thread beat([&] {  // the stalled session is heard from, never reads
    while (!quiet.load(std::memory_order_acquire)) {
      (void)main.send({.type = FrameType::kHeartbeat, .flags = kFlagControl});
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  // 300 rounds of a 5000-byte message for the stalled reader (over the batching limit: queued
  // on its own) and 1 MiB in 60 KiB messages nobody subscribed to (routed and dropped at once):
  // every slow message in another receive block. The stalled reader's sockets take a few dozen;
  // the rest waits in its lane and send queue. Then a last message to another subscriber, which
  // arrives once every round before it was routed.
  constexpr int kRounds = 300;
  const std::string slow(5000, 's');
  const std::string filler(60 * 1024, 'f');
  bool published = true;
  for (int i = 0; i < kRounds && published; ++i) {
    published = (*pub)->publish("grad/slow", slow).ok();
    for (int k = 0; k < 17 && published; ++k) published = (*pub)->publish("grad/void", filler).ok();
  }
  published = published && (*pub)->publish("grad/end", "end").ok();
  auto last = (*end)->poll(Deadline::after_ms(60000));
  const long rss_after = daemon_rss_kib();
  quiet.store(true, std::memory_order_release);  // pairs with the beat thread's acquire load
  beat.join();
  ASSERT_TRUE(published);
  ASSERT_TRUE(last.ok()) << last.status();
  // About 1.3 MiB of slow messages wait; a receive block is over 1 MiB. kMaxSharedOwnerDepth
  // blocks for the lane and as many for the send queue (about 17 MiB) is the bound; one per
  // waiting message (about 270 here: 280 MiB) is not.
  const long grown_mib = (rss_after - rss_before) / 1024;
  EXPECT_LT(grown_mib, 128) << "the daemon grew from " << rss_before / 1024 << " MiB to "
                            << rss_after / 1024 << " MiB";
}

// The scheduling policy of each thread of the daemon `pid` named `name`.
std::vector<int> daemon_thread_policies(pid_t pid, const std::string& name) {
  return test_support::thread_stat_field(pid, 41, name);
}

// The daemon started with `key = value` in its [broker] table, for each of `bad`: each must stop it
// before it listens, with exit code 2 and a message that names the key (a known key refused, not
// an unknown one). Bounded all the same: a daemon that took the value would listen until killed.
void expect_daemon_refuses(const std::string& key, std::initializer_list<const char*> bad) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("myelin-refuses-" + key + "-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "secret") << kSecret << "\n";
  for (const std::string value : bad) {
    SCOPED_TRACE(key + " = " + value);
    std::ofstream(dir / "broker.toml") << "[broker]\nlisten = \"127.0.0.1:0\"\n"
                                       << key << " = " << value << "\n";
    const std::string cmd = "timeout 10 " + std::string(MYELIN_BROKER_BIN) + " --config " +
                            (dir / "broker.toml").string() + " --secret-file " +
                            (dir / "secret").string() + " 2>&1";
    FILE* p = ::popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string output;
    char buf[256];
    while (size_t n = std::fread(buf, 1, sizeof(buf), p)) output.append(buf, n);
    const int st = ::pclose(p);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 2) << st << ": " << output;
    EXPECT_NE(output.find(key), std::string::npos) << output;
    EXPECT_EQ(output.find("unknown key"), std::string::npos) << output;
  }
  std::filesystem::remove_all(dir);
}

// The daemon's loop_scheduling: "idle" in its configuration puts its loop thread, and not its
// control thread, under SCHED_IDLE, and it still routes both lanes; a value it does not know, or
// one of the wrong type, stops it at start with exit code 2 and a message that names the key.
TEST(LoopScheduling, TheDaemonAppliesItsConfigurationAndRefusesBadValues) {
  {
    Daemon d(true, "loop_scheduling = \"idle\"\n");
    ASSERT_TRUE(d.up());
    auto c = Client::connect(d.client("idle"));
    ASSERT_TRUE(c.ok()) << c.status();
    // The loop applies it when it starts, before it accepts the connection above.
    EXPECT_EQ(daemon_thread_policies(d.pid(), "myelin-brk-loop"), std::vector<int>{SCHED_IDLE});
    EXPECT_EQ(daemon_thread_policies(d.pid(), "myelin-brk-ctrl"), std::vector<int>{SCHED_OTHER});
    ASSERT_TRUE((*c)->subscribe("#").ok());
    ASSERT_TRUE((*c)->publish("ctrl/x", "c", {.lane = Lane::kControl}).ok());
    ASSERT_TRUE((*c)->publish("grad/x", "b").ok());
    for (int i = 0; i < 2; ++i) EXPECT_TRUE((*c)->poll(Deadline::after_ms(10000)).ok());
  }
  expect_daemon_refuses("loop_scheduling", {"\"fast\"", "1", "\"\""});
}

// The daemon's control_scheduling: "rr" in its configuration puts its control thread, and not
// its loop thread, under SCHED_RR where this user may (else the thread keeps SCHED_OTHER and the
// daemon runs on), and both lanes still flow; a value it does not know, or one of the wrong type,
// stops it at start with exit code 2 and a message that names the key.
TEST(ControlScheduling, TheDaemonAppliesItsConfigurationAndRefusesBadValues) {
  bool realtime = false;
  std::thread([&] {
    realtime = apply_control_scheduling_to_this_thread(ControlScheduling::kRealtime).ok();
  }).join();
  {
    Daemon d(true, "control_scheduling = \"rr\"\n");
    ASSERT_TRUE(d.up());
    auto c = Client::connect(d.client("rr"));
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE((*c)->subscribe("#").ok());
    ASSERT_TRUE((*c)->publish("ctrl/x", "c", {.lane = Lane::kControl}).ok());
    ASSERT_TRUE((*c)->publish("grad/x", "b").ok());
    for (int i = 0; i < 2; ++i) EXPECT_TRUE((*c)->poll(Deadline::after_ms(10000)).ok());
    // The control thread applied it when it started, before it served the round trip above.
    EXPECT_EQ(daemon_thread_policies(d.pid(), "myelin-brk-ctrl"),
              std::vector<int>{realtime ? SCHED_RR : SCHED_OTHER});
    EXPECT_EQ(daemon_thread_policies(d.pid(), "myelin-brk-loop"), std::vector<int>{SCHED_OTHER});
  }
  expect_daemon_refuses("control_scheduling", {"\"fifo\"", "1", "\"\""});
}

// Whether every thread named `name` of process `pid` (at least one) may run on `cpu` (`want`
// true), or none may (`want` false).
bool daemon_threads_have_cpu(pid_t pid, const std::string& name, int cpu, bool want) {
  const std::vector<pid_t> tids = test_support::thread_ids(pid, name);
  for (const pid_t tid : tids) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(tid, sizeof(set), &set) != 0) return false;
    if (static_cast<bool>(CPU_ISSET(cpu, &set)) != want) return false;
  }
  return !tids.empty();
}

// The daemon's control_cpus: with a CPU reserved in its configuration, control traffic moves its
// loop thread off that CPU (its control thread stays free to use it), and once control has been
// quiet for control_cpus_hold_ms the loop gets it back; both lanes flow throughout. Values that
// are not CPU lists, or holds outside 1..3600000, stop it at start with exit code 2.
TEST(ControlCpus, TheDaemonKeepsItsLoopOffTheReservedCpuWhileControlFlows) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ASSERT_EQ(::sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  if (CPU_COUNT(&allowed) < 2) GTEST_SKIP() << "this process may run on one CPU only";
  int cpu = 0;
  while (!CPU_ISSET(cpu, &allowed)) ++cpu;
  {
    Daemon d(true, "control_cpus = \"" + std::to_string(cpu) + "\"\ncontrol_cpus_hold_ms = 100\n");
    ASSERT_TRUE(d.up());
    auto c = Client::connect(d.client("cpus"));
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_TRUE((*c)->subscribe("#").ok());
    EXPECT_TRUE(daemon_threads_have_cpu(d.pid(), "myelin-brk-loop", cpu, true));
    const std::string block(16 * 1024, 'b');
    bool moved = false;
    const Deadline until = Deadline::after_ms(10000);
    while (!moved && !until.expired()) {
      ASSERT_TRUE((*c)->publish("ctrl/x", "c", {.lane = Lane::kControl}).ok());
      ASSERT_TRUE((*c)->publish("grad/x", block).ok());
      for (int i = 0; i < 2; ++i) ASSERT_TRUE((*c)->poll(Deadline::after_ms(10000)).ok());
      moved = daemon_threads_have_cpu(d.pid(), "myelin-brk-loop", cpu, false);
    }
    EXPECT_TRUE(moved);
    EXPECT_TRUE(daemon_threads_have_cpu(d.pid(), "myelin-brk-ctrl", cpu, true));
    // Quiet control: once the hold has passed, bulk alone brings the loop back within a pass.
    bool back = false;
    const Deadline until2 = Deadline::after_ms(10000);
    while (!back && !until2.expired()) {
      ASSERT_TRUE((*c)->publish("grad/x", block).ok());
      ASSERT_TRUE((*c)->poll(Deadline::after_ms(10000)).ok());
      back = daemon_threads_have_cpu(d.pid(), "myelin-brk-loop", cpu, true);
    }
    EXPECT_TRUE(back);
  }
  expect_daemon_refuses("control_cpus", {"\"a\"", "1", "\"0-\"", "\"2-1\""});
  expect_daemon_refuses("control_cpus_hold_ms", {"0", "\"x\"", "3600001"});
}

// CPU time (user + system, clock ticks) of the daemon `pid`'s threads named `name`.
long daemon_thread_ticks(pid_t pid, const std::string& name) {
  long ticks = 0;
  for (int field : {14, 15}) {
    for (int v : test_support::thread_stat_field(pid, field, name)) ticks += v;
  }
  return ticks;
}

// spin_before_block_us in the daemon's configuration: round trips through spinning broker
// threads and spinning poll() callers arrive in order, with and without the control thread;
// once traffic stops the broker's threads stop spinning (an idle second costs them less than a
// tenth of it); a value out of range, or of the wrong type, stops the daemon at start with exit
// code 2 and a message that names the key.
TEST_P(ControlThread, SpinningThreadsCarryRoundTripsAndGoToSleepWhenIdle) {
  Daemon d(GetParam(), "spin_before_block_us = 2000\n");
  ASSERT_TRUE(d.up());
  ClientOptions po = d.client("pinger");
  po.spin_before_block_us = 2000;
  ClientOptions eo = d.client("echo");
  eo.spin_before_block_us = 2000;
  auto pinger = Client::connect(po);
  auto echo = Client::connect(eo);
  ASSERT_TRUE(pinger.ok() && echo.ok());
  ASSERT_TRUE((*echo)->subscribe("ctrl/ping").ok());
  ASSERT_TRUE((*pinger)->subscribe("ctrl/pong").ok());
  constexpr int kRounds = 2000;
  std::thread echoer([&] {
    for (int i = 0; i < kRounds; ++i) {
      auto m = (*echo)->poll(Deadline::after_ms(20000));
      if (!m.ok()) return;
      if (!(*echo)->publish("ctrl/pong", m->payload, {.lane = Lane::kControl}).ok()) return;
    }
  });
  int answered = 0;
  for (int i = 0; i < kRounds; ++i) {
    const std::string body = seq_text(i);
    ASSERT_TRUE((*pinger)->publish("ctrl/ping", body, {.lane = Lane::kControl}).ok());
    auto m = (*pinger)->poll(Deadline::after_ms(20000));
    ASSERT_TRUE(m.ok()) << m.status() << " after " << i << " round trips";
    EXPECT_EQ(m->text(), body);
    ++answered;
  }
  echoer.join();
  EXPECT_EQ(answered, kRounds);
  // Idle: heartbeats only (one a second per connection), each followed by one spin of 2 ms.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const long before = daemon_thread_ticks(d.pid(), "myelin-brk-loop") +
                      daemon_thread_ticks(d.pid(), "myelin-brk-ctrl");
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const long after = daemon_thread_ticks(d.pid(), "myelin-brk-loop") +
                     daemon_thread_ticks(d.pid(), "myelin-brk-ctrl");
  const long hz = ::sysconf(_SC_CLK_TCK);
  EXPECT_LT(after - before, hz / 10) << "the broker's threads used " << after - before
                                     << " ticks of " << hz << " in an idle second";
}

TEST(SpinBeforeBlock, TheDaemonRefusesBadValues) {
  expect_daemon_refuses("spin_before_block_us", {"-1", "100001", "\"50\""});
}

// The routing core with a drainer on another thread, as the control thread drains control lanes
// while the loop publishes into them: a push that meets a cell the drainer has claimed and not
// yet handed back waits for it instead of failing. Every message is delivered (block) or
// delivered or counted as dropped (drop_oldest), with rings of 4.
TEST(BrokerDrainer, EveryPublishIsDeliveredOrCountedBesideAConcurrentDrainer) {
  for (const OverflowPolicy policy : {OverflowPolicy::kBlock, OverflowPolicy::kDropOldest}) {
    SCOPED_TRACE(std::string(overflow_policy_name(policy)));
    BrokerOptions o;
    o.lane_capacity = 4;
    o.policies = {TopicPolicy{.pattern = "t/#", .lane = Lane::kControl, .overflow = policy}};
    Broker broker(o);
    auto sub = std::make_shared<LocalSubscriber>(1, "sub", o.lane_capacity);
    broker.add_session(sub);
    ASSERT_TRUE(broker.subscribe(1, 1, "t/#").ok());
    constexpr uint64_t kN = 100000;
    std::atomic<bool> done{false};
    uint64_t received = 0, last_seq = 0;
    bool ordered = true;
    std::thread drainer([&] {
      while (true) {
        auto m = sub->poll(Deadline::after_ms(20));
        if (!m.ok()) {
          if (done.load(std::memory_order_acquire)) return;  // pairs with the release below
          continue;
        }
        ordered = ordered && (*m)->seq > last_seq;
        last_seq = (*m)->seq;
        ++received;
      }
    });
    const std::byte payload[8] = {};
    const Deadline dl = Deadline::after_ms(60000);
    for (uint64_t i = 0; i < kN && !dl.expired(); ++i) {
      while (true) {
        auto r = broker.publish({.topic = "t/x", .payload = payload});
        ASSERT_TRUE(r.ok()) << r.status();
        if (*r == PublishOutcome::kAccepted || dl.expired()) break;
        std::this_thread::yield();  // blocked: the drainer makes room
      }
    }
    done.store(true, std::memory_order_release);
    drainer.join();
    const uint64_t drops = broker.topic_stats()["t/x"].drops;
    EXPECT_TRUE(ordered);
    EXPECT_EQ(received + drops, kN);
    if (policy == OverflowPolicy::kBlock) {
      EXPECT_EQ(drops, 0u);
    }
  }
}

}  // namespace
}  // namespace myelin::broker
