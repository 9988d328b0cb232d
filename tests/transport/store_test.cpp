// Stores and rank discovery: TcpStore/TcpStoreServer, FileStore, connect_store, Slurm and
// launcher environments.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <thread>

#include <myelin/transport/bootstrap.hpp>

#include "silent_listener.hpp"

namespace myelin::transport {
namespace {

std::string text(const std::vector<uint8_t>& v) {
  return std::string(v.begin(), v.end());
}

void exercise(Store& s) {
  ASSERT_TRUE(s.set("myelin/addr/0", "hello").ok());
  auto v = s.get("myelin/addr/0", Deadline::after_ms(1000));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(text(*v), "hello");
  ASSERT_TRUE(s.set("myelin/addr/0", "again").ok());
  EXPECT_EQ(text(*s.get("myelin/addr/0", Deadline::after_ms(1000))), "again");
  EXPECT_TRUE(*s.contains("myelin/addr/0"));
  EXPECT_FALSE(*s.contains("missing"));
  EXPECT_EQ(*s.add("counter", 2), 2);
  EXPECT_EQ(*s.add("counter", 5), 7);
  EXPECT_EQ(*s.add("counter", -10), -3);
  EXPECT_EQ(text(*s.get("counter", Deadline::after_ms(100))), "-3");
  EXPECT_EQ(s.add("myelin/addr/0", 1).status().code(), StatusCode::kFailedPrecondition);
  const int64_t t0 = monotonic_ns();
  auto missing = s.get("never/set", Deadline::after_ms(100));
  EXPECT_EQ(missing.status().code(), StatusCode::kTimeout);
  EXPECT_NE(missing.status().message().find("never/set"), std::string_view::npos);
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000);
  EXPECT_EQ(s.set("", "x").code(), StatusCode::kInvalidArgument);
  std::vector<uint8_t> big(1 << 20, 0xAB);
  ASSERT_TRUE(s.set("big", big).ok());
  EXPECT_EQ(*s.get("big", Deadline::after_ms(1000)), big);
  // A get that waits for a set from another thread.
  std::thread later([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    EXPECT_TRUE(s.set("late", "arrived").ok());
  });
  auto late = s.get("late", Deadline::after_ms(5000));
  later.join();
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(text(*late), "arrived");
}

TEST(TcpStore, SetGetAddContainsTimeouts) {
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = TcpStore::connect("127.0.0.1", (*server)->port(), Deadline::after_ms(5000));
  ASSERT_TRUE(client.ok()) << client.status();
  exercise(**client);
}

TEST(TcpStore, SilentStoreFailsByTheCallersDeadline) {
  const test_support::SilentListener silent;
  ASSERT_TRUE(silent.ok());
  const uint16_t port = silent.port();

  // get() waits no longer than its own deadline.
  auto a = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(5000));
  ASSERT_TRUE(a.ok()) << a.status();
  int64_t t0 = monotonic_ns();
  auto got = (*a)->get("key", Deadline::after_ms(300));
  EXPECT_EQ(got.status().code(), StatusCode::kTimeout) << got.status();
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000) << "get() overran its 300 ms deadline";

  // set(), add() and contains() wait the request timeout.
  auto b = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(5000));
  ASSERT_TRUE(b.ok()) << b.status();
  (*b)->set_request_timeout(std::chrono::milliseconds(300));
  t0 = monotonic_ns();
  const Status set = (*b)->set("key", "value");
  EXPECT_EQ(set.code(), StatusCode::kTimeout) << set;
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000) << "set() ignored the request timeout";
}

TEST(TcpStore, ConcurrentAddsFromManyClients) {
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      auto c = TcpStore::connect("127.0.0.1", (*server)->port(), Deadline::after_ms(5000));
      ASSERT_TRUE(c.ok());
      for (int i = 0; i < 100; ++i) ASSERT_TRUE((*c)->add("n", 1).ok());
    });
  }
  for (auto& t : threads) t.join();
  auto c = TcpStore::connect("127.0.0.1", (*server)->port(), Deadline::after_ms(5000));
  EXPECT_EQ(*(*c)->add("n", 0), 400);
}

int raw_connect(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

TEST(TcpStore, GarbageInputClosesOnlyThatClient) {
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  auto good = TcpStore::connect("127.0.0.1", (*server)->port(), Deadline::after_ms(5000));
  ASSERT_TRUE(good.ok());
  const std::vector<std::vector<uint8_t>> attacks = {
      {0xFF, 0xFF, 0xFF, 0xFF, 1},               // oversize length
      {0, 0, 0, 0},                              // zero length
      {3, 0, 0, 0, 9, 1, 0},                     // unknown op
      {4, 0, 0, 0, 2, 0, 0, 'k'},                // empty key
      {5, 0, 0, 0, 2, 9, 0, 'k', 'e'},           // key longer than the request
      {8, 0, 0, 0, 1, 1, 0, 'k', 200, 0, 0, 0},  // set value longer than the request
      {6, 0, 0, 0, 2, 1, 0, 'k', 'x', 'y'},      // trailing bytes after get
  };
  for (const auto& bytes : attacks) {
    const int fd = raw_connect((*server)->port());
    ASSERT_EQ(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
    uint8_t reply[64];
    ssize_t got = 0, n = 0;
    while ((n = ::recv(fd, reply + got, sizeof(reply) - static_cast<size_t>(got), 0)) > 0) got += n;
    EXPECT_EQ(n, 0) << "the server did not close the connection";
    ASSERT_EQ(got, 5);
    EXPECT_EQ(reply[4], 2) << "expected 'bad request'";
    ::close(fd);
  }
  ASSERT_TRUE((*good)->set("still", "alive").ok());
  EXPECT_EQ(text(*(*good)->get("still", Deadline::after_ms(1000))), "alive");
}

TEST(TcpStore, ConnectToNothingTimesOutWithBackoff) {
  // A port with no listener: bind one, learn its number, close it.
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  const uint16_t port = (*server)->port();
  server->reset();
  const int64_t t0 = monotonic_ns();
  auto c = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(300));
  const int64_t took_ms = (monotonic_ns() - t0) / 1'000'000;
  EXPECT_EQ(c.status().code(), StatusCode::kTimeout) << c.status();
  EXPECT_GE(took_ms, 250);
  EXPECT_LT(took_ms, 3000);
}

TEST(TcpStore, ClientRetriesUntilTheServerAppears) {
  auto probe = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(probe.ok());
  const uint16_t port = (*probe)->port();
  probe->reset();
  std::unique_ptr<TcpStoreServer> late;
  std::thread starter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto s = TcpStoreServer::start("127.0.0.1", port);
    if (s.ok()) late = std::move(s).value();
  });
  auto c = TcpStore::connect("127.0.0.1", port, Deadline::after_ms(5000));
  starter.join();
  if (!late) GTEST_SKIP() << "the port was taken by someone else meanwhile";
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->set("k", "v").ok());
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/myelin-store-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(FileStore, SetGetAddContainsTimeouts) {
  TempDir dir;
  auto fs = FileStore::open(dir.path() + "/store");
  ASSERT_TRUE(fs.ok()) << fs.status();
  exercise(**fs);
  // Keys with odd bytes map to distinct files.
  ASSERT_TRUE((*fs)->set("a/b", "1").ok());
  ASSERT_TRUE((*fs)->set("a%2Fb", "2").ok());
  EXPECT_EQ(text(*(*fs)->get("a/b", Deadline::after_ms(100))), "1");
  EXPECT_EQ(text(*(*fs)->get("a%2Fb", Deadline::after_ms(100))), "2");
}

TEST(FileStore, ConcurrentAddsAreAtomic) {
  TempDir dir;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      auto fs = FileStore::open(dir.path());
      ASSERT_TRUE(fs.ok());
      for (int i = 0; i < 50; ++i) ASSERT_TRUE((*fs)->add("n", 1).ok());
    });
  }
  for (auto& t : threads) t.join();
  auto fs = FileStore::open(dir.path());
  EXPECT_EQ(*(*fs)->add("n", 0), 200);
}

TEST(ConnectStore, Specs) {
  TempDir dir;
  auto f = connect_store("file://" + dir.path(), 3);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->set("x", "y").ok());
  EXPECT_EQ(connect_store("file://relative", 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(connect_store("http://x:1", 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(connect_store("tcp://nohost", 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(connect_store("tcp://h:99999", 0).status().code(), StatusCode::kInvalidArgument);
  // Rank 0 serves, rank 1 connects: pick a free port first.
  auto probe = TcpStoreServer::start("127.0.0.1", 0);
  ASSERT_TRUE(probe.ok());
  const std::string spec = "tcp://127.0.0.1:" + std::to_string((*probe)->port());
  probe->reset();
  auto r0 = connect_store(spec, 0);
  ASSERT_TRUE(r0.ok()) << r0.status();
  auto r1 = connect_store(spec, 1, Deadline::after_ms(5000));
  ASSERT_TRUE(r1.ok()) << r1.status();
  ASSERT_TRUE((*r1)->set(address_key(1), "addr-of-1").ok());
  EXPECT_EQ(text(*(*r0)->get("myelin/addr/1", Deadline::after_ms(1000))), "addr-of-1");
}

EnvLookup fake_env(std::map<std::string, std::string> vars) {
  auto shared = std::make_shared<std::map<std::string, std::string>>(std::move(vars));
  return [shared](const char* name) -> const char* {
    auto it = shared->find(name);
    return it == shared->end() ? nullptr : it->second.c_str();
  };
}

TEST(RankDiscovery, Slurm) {
  auto info = discover_rank(fake_env({{"SLURM_PROCID", "5"},
                                      {"SLURM_NTASKS", "8"},
                                      {"SLURM_LOCALID", "1"},
                                      {"SLURM_NODEID", "2"},
                                      {"SLURM_JOB_NODELIST", "gpu[01-03],login"},
                                      {"SLURM_TASKS_PER_NODE", "2(x3),2"},
                                      {"MYELIN_STORE", "gpu01:29500"}}));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->rank, 5);
  EXPECT_EQ(info->size, 8);
  EXPECT_EQ(info->local_rank, 1);
  EXPECT_EQ(info->local_size, 2);
  EXPECT_EQ(info->node_id, "gpu03");
  EXPECT_EQ(info->source, "slurm");
  EXPECT_EQ(info->store_spec, "tcp://gpu01:29500");
  auto ntpn = discover_rank(fake_env({{"SLURM_PROCID", "0"},
                                      {"SLURM_NTASKS", "4"},
                                      {"SLURM_LOCALID", "0"},
                                      {"SLURM_NTASKS_PER_NODE", "4"}}));
  ASSERT_TRUE(ntpn.ok()) << ntpn.status();
  EXPECT_EQ(ntpn->local_size, 4);
}

TEST(RankDiscovery, InconsistentEnvironmentsAreClearErrors) {
  const std::vector<std::pair<std::map<std::string, std::string>, std::string>> cases = {
      {{{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}}, "SLURM_NTASKS"},
      {{{"SLURM_PROCID", "1"}, {"SLURM_LOCALID", "0"}}, "SLURM_NTASKS"},
      {{{"SLURM_PROCID", "x"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}}, "SLURM_PROCID"},
      {{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}}, "SLURM_LOCALID"},
      {{{"SLURM_PROCID", "0"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_LOCALID", "3"},
        {"SLURM_NTASKS_PER_NODE", "2"}},
       "local rank"},
      {{{"SLURM_PROCID", "0"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_LOCALID", "0"},
        {"SLURM_NODEID", "5"},
        {"SLURM_JOB_NODELIST", "n[1-2]"}},
       "SLURM_JOB_NODELIST"},
      {{{"MYELIN_RANK", "2"}}, "MYELIN_SIZE"},
      {{{"MYELIN_RANK", "2"}, {"MYELIN_SIZE", "2"}}, "MYELIN_RANK"},
      {{{"MYELIN_RANK", "0"}, {"MYELIN_SIZE", "2"}, {"MYELIN_STORE", "nocolon"}}, "MYELIN_STORE"},
  };
  for (const auto& [env, mention] : cases) {
    auto info = discover_rank(fake_env(env));
    ASSERT_FALSE(info.ok()) << "accepted " << mention;
    EXPECT_EQ(info.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(info.status().message().find(mention), std::string_view::npos) << info.status();
  }
}

TEST(RankDiscovery, LauncherAndSingleAndExplicit) {
  auto l = discover_rank(fake_env({{"MYELIN_RANK", "1"},
                                   {"MYELIN_SIZE", "2"},
                                   {"MYELIN_STORE", "127.0.0.1:4000"},
                                   {"SLURM_PROCID", "9"}}));
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->rank, 1);
  EXPECT_EQ(l->size, 2);
  EXPECT_EQ(l->source, "launcher");
  EXPECT_EQ(l->store_spec, "tcp://127.0.0.1:4000");
  auto single = discover_rank(fake_env({}));
  ASSERT_TRUE(single.ok());
  EXPECT_EQ(single->size, 1);
  EXPECT_EQ(single->source, "single");
  EXPECT_TRUE(make_rank_info(3, 4, 1, 2).ok());
  EXPECT_FALSE(make_rank_info(4, 4).ok());
  EXPECT_FALSE(make_rank_info(0, 0).ok());
  EXPECT_FALSE(make_rank_info(0, 4, 2, 2).ok());
}

TEST(Hostlist, Expands) {
  auto h = expand_hostlist("n[01-03,7],login,x[9]");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(*h, (std::vector<std::string>{"n01", "n02", "n03", "n7", "login", "x9"}));
  for (const char* bad : {"", "n[", "n[1-]", "n[3-1]", "n[a]", "a,,b", "a,", "n]1[", "n[[1]]"}) {
    EXPECT_FALSE(expand_hostlist(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace myelin::transport
