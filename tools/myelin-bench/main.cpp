// myelin-bench: point-to-point transport benchmarks.
//
//   myelin-bench lat -n 2 --transport tcp                 both ranks on this host (fork/exec)
//   myelin-bench bw --server --port 29500                 rank 0 on host A (serves the store)
//   myelin-bench bw --connect hostA:29500                 rank 1 on host B
// Ranks meet through a TcpStore: each publishes its Context address under myelin/addr/<rank>.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <myelin/bench/harness.hpp>
#include <myelin/core/log.hpp>
#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/context.hpp>

namespace {

using namespace myelin;
using namespace myelin::transport;

struct Args {
  std::string bench;  // "lat" or "bw"
  std::string transport = "auto";
  std::string progress = "busy";
  int nprocs = 0;
  bool server = false;
  std::string connect;
  uint16_t port = 29500;
  std::vector<std::string> sizes;
  std::string begin, end;
  size_t factor = 2;
  size_t iters = 0;
  size_t warmup = 0;
  size_t window = 64;
  bool json = false;
  int timeout_s = 60;
};

// Runs this process as one rank: store, Context, connect, measure, report (rank 0 prints
// latency; the receiver, rank 1, reports bandwidth).
int run_rank(const Args& a, int rank, const std::string& store_host, uint16_t store_port,
             std::unique_ptr<TcpStoreServer> served) {
  set_log_tag("rank " + std::to_string(rank));
  auto fail = [&](const Status& s) {
    std::fprintf(stderr, "myelin-bench rank %d: %s\n", rank, s.to_string().c_str());
    return 2;
  };
  auto backend = parse_backend(a.transport);
  if (!backend.ok()) return fail(backend.status());
  auto progress = parse_progress_mode(a.progress);
  if (!progress.ok()) return fail(progress.status());
  std::vector<size_t> sizes;
  if (!a.begin.empty() || !a.end.empty()) {
    auto b = bench::parse_size(a.begin.empty() ? "1" : a.begin);
    auto e = bench::parse_size(a.end.empty() ? a.begin : a.end);
    if (!b.ok()) return fail(b.status());
    if (!e.ok()) return fail(e.status());
    auto sweep = bench::size_sweep(*b, *e, a.factor);
    if (!sweep.ok()) return fail(sweep.status());
    sizes = *sweep;
  }
  for (const auto& s : a.sizes) {
    auto v = bench::parse_size(s);
    if (!v.ok()) return fail(v.status());
    sizes.push_back(*v);
  }
  if (sizes.empty()) sizes = {a.bench == "lat" ? size_t{64} : size_t{1} << 20};

  Options opts;
  opts.backend = *backend;
  opts.progress = *progress;
  opts.name = "rank " + std::to_string(rank);
  opts.timeout = std::chrono::seconds(a.timeout_s);
  auto env_opts = opts.with_env_overlay();
  if (!env_opts.ok()) return fail(env_opts.status());
  auto ctx = Context::create(*env_opts);
  if (!ctx.ok()) return fail(ctx.status());
  const Deadline deadline = Deadline::after(opts.timeout);
  auto store = TcpStore::connect(store_host, store_port, deadline);
  if (!store.ok()) return fail(store.status());
  if (Status s = (*store)->set(address_key(rank), (*ctx)->address()); !s.ok()) return fail(s);
  auto peer = (*store)->get(address_key(1 - rank), deadline);
  if (!peer.ok()) return fail(peer.status());
  auto choice = (*ctx)->choice_for(*peer);
  if (!choice.ok()) return fail(choice.status());
  auto ep = (*ctx)->connect(*peer);
  if (!ep.ok()) return fail(ep.status());
  const std::string used(backend_name(choice->backend));

  bench::RunConfig cfg;
  cfg.window = a.window;
  const bool reporter = a.bench == "lat" ? rank == 0 : rank == 1;
  if (reporter && !a.json) {
    std::printf("# myelin-bench %s: transport %s (%s), progress %s, window %zu\n", a.bench.c_str(),
                used.c_str(), choice->reason.c_str(), a.progress.c_str(), a.window);
    if (a.bench == "lat") {
      std::printf("# one-way latency = round trip / 2\n%s\n", bench::latency_header().c_str());
    } else {
      std::printf("# bandwidth at the receiver, GB = 10^9 bytes\n%s\n",
                  bench::bandwidth_header().c_str());
    }
    std::fflush(stdout);
  }
  uint64_t wrong = 0;
  for (size_t size : sizes) {
    // Defaults scale down for large messages so a sweep finishes in seconds.
    const size_t big = size >= (size_t{1} << 20);
    cfg.iters =
        a.iters != 0 ? a.iters : (a.bench == "lat" ? (big ? 200 : 10000) : (big ? 500 : 20000));
    cfg.warmup = a.warmup != 0 ? a.warmup : std::max<size_t>(cfg.iters / 10, 1);
    if (a.bench == "lat") {
      auto r = bench::run_latency(**ctx, **ep, rank == 0, size, cfg);
      if (!r.ok()) return fail(r.status());
      wrong += r->wrong;
      if (reporter) {
        std::printf("%s\n", a.json ? bench::latency_json(used, *r).c_str()
                                   : bench::latency_row(*r).c_str());
      }
    } else {
      auto r = bench::run_bandwidth(**ctx, **ep, rank == 0, size, cfg);
      if (!r.ok()) return fail(r.status());
      wrong += r->wrong;
      if (reporter) {
        std::printf("%s\n", a.json ? bench::bandwidth_json(used, *r).c_str()
                                   : bench::bandwidth_row(*r).c_str());
      }
    }
    std::fflush(stdout);
  }
  // Let both ranks finish their last exchange before the store (and maybe its server) goes.
  (void)(*store)->add("myelin/bench/done", 1);
  const Deadline done_by = Deadline::after_ms(10000);
  while (!done_by.expired()) {
    auto n = (*store)->add("myelin/bench/done", 0);
    if (!n.ok() || *n >= 2) break;
    (*ctx)->progress();
  }
  served.reset();
  if (wrong != 0) {
    std::fprintf(stderr, "myelin-bench rank %d: %llu messages arrived with wrong data\n", rank,
                 static_cast<unsigned long long>(wrong));
    return 3;
  }
  return 0;
}

// -n 2: serve the store here and run both ranks as child processes of this binary.
int run_local(const Args& a, char** argv) {
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  if (!server.ok()) {
    std::fprintf(stderr, "myelin-bench: %s\n", server.status().to_string().c_str());
    return 2;
  }
  const std::string store = "127.0.0.1:" + std::to_string((*server)->port());
  std::vector<pid_t> kids;
  for (int rank = 0; rank < a.nprocs; ++rank) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fork");
      return 2;
    }
    if (pid == 0) {
      setenv("MYELIN_RANK", std::to_string(rank).c_str(), 1);
      setenv("MYELIN_SIZE", std::to_string(a.nprocs).c_str(), 1);
      setenv("MYELIN_STORE", store.c_str(), 1);
      setenv("MYELIN_BENCH_CHILD", "1", 1);
      execv("/proc/self/exe", argv);
      std::perror("execv /proc/self/exe");
      _exit(127);
    }
    kids.push_back(pid);
  }
  int rc = 0;
  const Deadline deadline = Deadline::after(std::chrono::seconds(a.timeout_s) * 20);
  size_t alive = kids.size();
  while (alive > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      --alive;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (code != 0) {
        rc = rc == 0 ? code : rc;
        for (pid_t k : kids) {
          if (k != pid) kill(k, SIGTERM);  // a rank failed: its peer cannot finish
        }
      }
      continue;
    }
    if (deadline.expired()) {
      std::fprintf(stderr, "myelin-bench: ranks did not finish in time; killing them\n");
      for (pid_t k : kids) kill(k, SIGKILL);
      rc = 4;
      break;
    }
    usleep(2000);
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"myelin-bench: transport point-to-point benchmarks"};
  app.require_subcommand(1, 1);
  Args a;
  for (const char* name : {"lat", "bw"}) {
    auto* sub = app.add_subcommand(name, std::string(name) == "lat"
                                             ? "ping-pong latency (one-way = round trip / 2)"
                                             : "streaming bandwidth measured at the receiver");
    sub->add_option("--transport,-t", a.transport, "auto|shm|tcp|ucx|verbs")
        ->check(CLI::IsMember({"auto", "shm", "tcp", "ucx", "verbs"}));
    sub->add_option("-n,--nprocs", a.nprocs, "run this many ranks locally (only 2 today)");
    sub->add_flag("--server", a.server, "rank 0: serve the rendezvous store on --port");
    sub->add_option("--connect", a.connect, "rank 1: the --server's host:port");
    sub->add_option("--port", a.port, "store port for --server");
    sub->add_option("--size,-s", a.sizes, "message sizes (64, 4K, 1M...)");
    sub->add_option("-b,--minbytes", a.begin, "sweep start");
    sub->add_option("-e,--maxbytes", a.end, "sweep end");
    sub->add_option("-f,--stepfactor", a.factor, "sweep multiplier");
    sub->add_option("--iters,-i", a.iters, "timed iterations per size");
    sub->add_option("--warmup,-w", a.warmup, "untimed iterations per size");
    sub->add_option("--window", a.window, "bw: sends in flight");
    sub->add_flag("--json", a.json, "one JSON object per size");
    sub->add_option("--progress", a.progress, "busy|block")
        ->check(CLI::IsMember({"busy", "block"}));
    sub->add_option("--timeout", a.timeout_s, "seconds for connects and each wait");
    sub->callback([&a, name] { a.bench = name; });
  }
  CLI11_PARSE(app, argc, argv);

  if (std::getenv("MYELIN_BENCH_CHILD") != nullptr) {
    auto me = discover_rank();
    if (!me.ok() || me->size != 2 || me->store_spec.rfind("tcp://", 0) != 0) {
      std::fprintf(stderr, "myelin-bench child: bad launch environment: %s\n",
                   me.ok() ? me->store_spec.c_str() : me.status().to_string().c_str());
      return 2;
    }
    const std::string hp = me->store_spec.substr(6);
    const size_t colon = hp.rfind(':');
    return run_rank(a, me->rank, hp.substr(0, colon),
                    static_cast<uint16_t>(std::stoi(hp.substr(colon + 1))), nullptr);
  }
  if (a.nprocs != 0) {
    if (a.nprocs != 2) {
      std::fprintf(stderr, "myelin-bench: -n %d: lat and bw run exactly 2 ranks\n", a.nprocs);
      return 1;
    }
    return run_local(a, argv);
  }
  if (a.server) {
    auto server = TcpStoreServer::start("0.0.0.0", a.port);
    if (!server.ok()) {
      std::fprintf(stderr, "myelin-bench: %s\n", server.status().to_string().c_str());
      return 2;
    }
    return run_rank(a, 0, "127.0.0.1", (*server)->port(), std::move(server).value());
  }
  if (!a.connect.empty()) {
    const size_t colon = a.connect.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      std::fprintf(stderr, "myelin-bench: --connect wants host:port\n");
      return 1;
    }
    int port = 0;
    try {
      port = std::stoi(a.connect.substr(colon + 1));
    } catch (...) {
      port = 0;
    }
    if (port <= 0 || port > 65535) {
      std::fprintf(stderr, "myelin-bench: bad port in --connect %s\n", a.connect.c_str());
      return 1;
    }
    return run_rank(a, 1, a.connect.substr(0, colon), static_cast<uint16_t>(port), nullptr);
  }
  std::fprintf(stderr, "myelin-bench: give -n 2, --server or --connect host:port\n");
  return 1;
}
