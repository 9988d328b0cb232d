// myelin-bench: the benchmark CLI (point-to-point, one-sided, collectives, broker).
//
//   myelin-bench lat -n 2 --transport shm                 two local ranks (fork/exec of itself)
//   myelin-bench bw --server --port 29500                 rank 0 on host A (serves the store)
//   myelin-bench bw --connect hostA:29500                 rank 1 on host B
//   srun -N 2 -n 8 myelin-bench allreduce -b 8 -e 64M     ranks from Slurm's environment
//   myelin-run -n 4 myelin-bench allreduce                ranks from the local launcher
//
// `-n N` is the number of local ranks (as in the transport issue), not an iteration count:
// iterations are `--iters`. Ranks meet through a Store (each publishes its Context address
// under myelin/addr/<rank>); the measurement itself is bench/harness (a library).
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <myelin/bench/broker_bench.hpp>
#include <myelin/bench/collectives_bench.hpp>
#include <myelin/bench/harness.hpp>
#include <myelin/bench/report.hpp>
#include <myelin/broker/secret.hpp>
#include <myelin/collectives/communicator.hpp>
#include <myelin/config.hpp>
#include <myelin/core/log.hpp>
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/topology.hpp>
#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/context.hpp>

#include "cli_checks.hpp"
#include "launcher.hpp"
#include "rdma_check.hpp"

namespace {

using namespace myelin;
using namespace myelin::transport;
namespace coll = myelin::collectives;

enum class Kind { kP2p, kOneSided, kCollective, kBroker };

// Bounds of the counts a user gives: past them a run would only exhaust memory (every timed
// iteration keeps a sample; every operation in flight a request and, by default, a buffer).
constexpr long long kMaxIters = 100'000'000;
constexpr long long kMaxWindow = 65'536;
constexpr long long kMaxStepFactor = 1024;

struct Args {
  std::string bench;
  Kind kind = Kind::kP2p;
  std::string transport = "auto";
  std::string device;
  std::string progress = "auto";
  int nprocs = 0;
  bool server = false;
  std::string connect;
  uint16_t port = 29500;
  bool port_given = false;  // --port on the command line (else srun derives one per job step)
  std::vector<std::string> sizes;
  std::string begin, end;
  size_t factor = 2;
  size_t iters = 0;
  size_t warmup = 0;
  double duration_s = 0;
  size_t window = 0;
  size_t buffers = 0;
  bool bidir = false;
  std::vector<int> cpus;
  int numa = -1;
  bool json = false, csv = false;
  int timeout_s = 60;
  std::string dtype = "f32", op = "sum", algo = "auto";
  std::string flood = "0";
  bool throughput = false;  // pubsub: throughput instead of latency
  std::string broker;       // pubsub/ps: a running broker's host:port ("": embedded)
  std::string secret_file;  // its job secret (else $MYELIN_BROKER_SECRET)
  size_t inject_wrong = SIZE_MAX;
  std::string command;  // the exact command line, for the header
};

int fail(int rank, const Status& s) {
  std::fprintf(stderr, "myelin-bench rank %d: %s\n", rank, s.to_string().c_str());
  return 2;
}

Result<std::vector<size_t>> sizes_of(const Args& a) {
  std::vector<size_t> sizes;
  if (!a.begin.empty() || !a.end.empty()) {
    MYELIN_ASSIGN_OR_RETURN(size_t b, bench::parse_size(a.begin.empty() ? "1" : a.begin));
    MYELIN_ASSIGN_OR_RETURN(size_t e, bench::parse_size(a.end.empty() ? a.begin : a.end));
    MYELIN_ASSIGN_OR_RETURN(sizes, bench::size_sweep(b, e, a.factor));
  }
  for (const auto& s : a.sizes) {
    MYELIN_ASSIGN_OR_RETURN(size_t v, bench::parse_size(s));
    sizes.push_back(v);
  }
  if (a.bench == "barrier") return std::vector<size_t>{0};  // no payload: one row
  if (sizes.empty()) {
    if (a.bench == "lat" || a.bench == "pubsub" || a.bench == "rate") {
      sizes = {a.bench == "rate" ? size_t{8} : size_t{64}};
    } else if (a.kind == Kind::kCollective) {
      MYELIN_ASSIGN_OR_RETURN(sizes, bench::size_sweep(8, size_t{64} << 20, 2));
    } else {
      sizes = {size_t{1} << 20};
    }
  }
  return sizes;
}

// Default iterations: a sweep should finish in seconds on a laptop.
size_t default_iters(const Args& a, size_t size) {
  const bool big = size >= (size_t{1} << 20);
  if (a.bench == "lat") return big ? 200 : 10000;
  if (a.bench == "rate") return big ? 500 : 100000;
  if (a.bench == "pubsub" && a.throughput) return big ? 2000 : 200000;
  if (a.bench == "pubsub") return big ? 100 : 5000;
  if (a.bench == "ps") return big ? 50 : 1000;
  if (a.kind == Kind::kCollective) return 20;
  return big ? 500 : 20000;
}

// The rank that prints: the one that measured.
bool is_reporter(const Args& a, int rank) {
  if (a.bench == "bw" && !a.bidir) return rank == 1;
  if (a.bench == "rate" || a.kind == Kind::kBroker) return rank == 1;
  return rank == 0;
}

std::vector<bench::Column> columns_for(const Args& a) {
  using bench::Column;
  const std::vector<Column> lead = {{"bench", "", 0, 0}, {"transport", "", 0, 0}};
  std::vector<Column> c = lead;
  auto add = [&](std::initializer_list<Column> more) { c.insert(c.end(), more); };
  if (a.bench == "pubsub" && a.throughput) {
    add({{"mode", "", 0, 0},
         {"size", "size(B)", 13, 0},
         {"iters", "iters", 9, 0},
         {"GBps", "GB/s", 9, 3},
         {"msgs_per_s", "msg/s", 13, 0},
         {"wrong", "#wrong", 7, 0}});
    return c;
  }
  if (a.bench == "lat" || a.bench == "pubsub" || a.bench == "ps") {
    if (a.bench == "ps") add({{"workers", "", 0, 0}});
    add({{"size", "size(B)", 13, 0},
         {"iters", "iters", 9, 0},
         {"min_us", "min(us)", 9, 2},
         {"avg_us", "avg(us)", 9, 2},
         {"p50_us", "p50(us)", 9, 2},
         {"p90_us", "p90(us)", 9, 2},
         {"p99_us", "p99(us)", 9, 2},
         {"p999_us", "p99.9(us)", 9, 2},
         {"max_us", "max(us)", 9, 2}});
    if (a.bench == "pubsub") {
      add({{"flood_size", "", 0, 0},
           {"flood_GBps", "flood(GB/s)", 11, 3},
           {"flood_delivered_GBps", "", 0, 0},
           {"ping_leg_p50_us", "", 0, 0},
           {"ping_leg_p99_us", "", 0, 0},
           {"pong_leg_p50_us", "", 0, 0},
           {"pong_leg_p99_us", "", 0, 0}});
    }
    if (a.bench == "ps") add({{"GBps", "GB/s", 9, 3}});
    add({{"wrong", "#wrong", 7, 0}});
    return c;
  }
  if (a.bench == "bw") add({{"direction", "", 0, 0}});
  add({{"size", "size(B)", 13, 0},
       {"iters", "iters", 9, 0},
       {"window", "window", 7, 0},
       {"GBps", "GB/s", 9, 3},
       {"msgs_per_s", "msg/s", 13, 0},
       {"wrong", "#wrong", 7, 0}});
  return c;
}

// Runs this process as one rank of `size`.
int run_rank(const Args& a, int rank, int size, Store& store) {
  set_log_tag("rank " + std::to_string(rank));
  // Store requests without a deadline of their own (set, add) wait --timeout, not the default.
  if (auto* tcp = dynamic_cast<TcpStore*>(&store)) {
    tcp->set_request_timeout(std::chrono::seconds(a.timeout_s));
  }
  // Placement first, so the Context's memory is allocated where the thread runs.
  std::string placement = "not pinned";
  if (!a.cpus.empty()) {
    const int cpu = a.cpus[static_cast<size_t>(rank) % a.cpus.size()];
    if (Status s = pin_current_thread_to_cpu(cpu); !s.ok()) return fail(rank, s);
    placement = "cpu " + std::to_string(cpu);
  } else if (a.numa >= 0) {
    auto topo = Topology::discover();
    if (!topo.ok()) return fail(rank, topo.status());
    if (Status s = topo->pin_current_thread_to_numa_node(a.numa); !s.ok()) return fail(rank, s);
    placement = "NUMA node " + std::to_string(a.numa) + " cpus";
  }
  auto node = current_numa_node();
  const std::string numa_text = node.ok() ? std::to_string(*node) : "unknown";

  auto sizes = sizes_of(a);
  if (!sizes.ok()) return fail(rank, sizes.status());
  auto backend = parse_backend(a.transport);
  if (!backend.ok()) return fail(rank, backend.status());
  auto progress = parse_progress_mode(a.progress);
  if (!progress.ok()) return fail(rank, progress.status());
  const bool p2p = a.kind == Kind::kP2p || a.kind == Kind::kOneSided;
  if (p2p && size != 2) {
    return fail(rank, invalid_argument(a.bench, " runs exactly 2 ranks, not ", size));
  }
  if (a.kind == Kind::kBroker && size < 2) {
    return fail(rank, invalid_argument(a.bench, " needs at least 2 ranks, not ", size));
  }

  Options opts;
  opts.backend = *backend;
  opts.progress = *progress;
  opts.device = a.device;
  opts.numa_node = a.numa;
  opts.name = "rank " + std::to_string(rank);
  opts.timeout = std::chrono::seconds(a.timeout_s);
  // Ranks this binary started here (-n) and pinned (--cpu) share a CPU only with those pinned to
  // the same one: the count `auto` compares with the CPUs this rank may use (one, once pinned).
  if (!a.cpus.empty() && std::getenv("MYELIN_BENCH_CHILD") != nullptr) {
    const auto cpu_of = [&](int r) { return a.cpus[static_cast<size_t>(r) % a.cpus.size()]; };
    int sharing = 0;
    for (int q = 0; q < size; ++q) sharing += cpu_of(q) == cpu_of(rank) ? 1 : 0;
    opts.local_ranks = sharing;
  }
  auto env_opts = opts.with_env_overlay();
  if (!env_opts.ok()) return fail(rank, env_opts.status());
  auto ctx = Context::create(*env_opts);
  if (!ctx.ok()) return fail(rank, ctx.status());
  const Deadline deadline = Deadline::after(opts.timeout);
  if (Status s = store.set(address_key(rank), (*ctx)->address()); !s.ok()) return fail(rank, s);

  // The peer (point-to-point) or the group (collectives) or the broker.
  Endpoint* ep = nullptr;
  std::string used = a.kind == Kind::kBroker ? "tcp" : a.transport;
  std::string why = a.kind == Kind::kBroker ? "the broker's own framing over TCP" : "";
  std::unique_ptr<coll::Communicator> comm;
  std::unique_ptr<bench::BrokerBench> brk;
  bench::CollectiveBenchOptions copts;
  if (p2p) {
    auto peer = store.get(address_key(1 - rank), deadline);
    if (!peer.ok()) return fail(rank, peer.status());
    auto choice = (*ctx)->choice_for(*peer);
    if (!choice.ok()) return fail(rank, choice.status());
    auto e = (*ctx)->connect(*peer);
    if (!e.ok()) return fail(rank, e.status());
    ep = *e;
    used = std::string(backend_name(choice->backend));
    why = choice->reason;
  } else if (a.kind == Kind::kCollective) {
    coll::CommunicatorOptions co;
    co.rank = rank;
    co.size = size;
    co.context = ctx->get();
    co.store = &store;
    co.publish_address = false;  // done above under the same key
    co.timeout = opts.timeout;
    auto c = coll::Communicator::create(co);
    if (!c.ok()) return fail(rank, c.status());
    comm = std::move(c).value();
    if (size > 1) {
      auto peer = store.get(address_key((rank + 1) % size), deadline);
      if (!peer.ok()) return fail(rank, peer.status());
      auto choice = (*ctx)->choice_for(*peer);
      if (!choice.ok()) return fail(rank, choice.status());
      used = std::string(backend_name(choice->backend));
      why = "to the next rank: " + choice->reason;
    } else {
      why = "a single rank";
    }
    auto col = std::string(a.bench);
    const std::pair<const char*, coll::Collective> names[] = {
        {"allreduce", coll::Collective::kAllreduce},
        {"reduce_scatter", coll::Collective::kReduceScatter},
        {"allgather", coll::Collective::kAllgather},
        {"broadcast", coll::Collective::kBroadcast},
        {"reduce", coll::Collective::kReduce},
        {"barrier", coll::Collective::kBarrier},
        {"alltoall", coll::Collective::kAlltoall}};
    for (const auto& [n, c2] : names) {
      if (col == n) copts.collective = c2;
    }
    auto dt = coll::parse_dtype(a.dtype);
    if (!dt.ok()) return fail(rank, dt.status());
    auto op = coll::parse_reduce_op(a.op);
    if (!op.ok()) return fail(rank, op.status());
    auto al = coll::parse_algorithm(a.algo);
    if (!al.ok()) return fail(rank, al.status());
    copts.type = *dt;
    copts.op = *op;
    copts.algorithm = *al;
    copts.transport = used;
    copts.corrupt = a.inject_wrong != SIZE_MAX;
  } else {
    auto flood = bench::parse_size(a.flood);
    if (!flood.ok()) return fail(rank, flood.status());
    bench::BrokerBenchOptions bo;
    bo.rank = rank;
    bo.size = size;
    bo.store = &store;
    bo.flood_size = *flood;
    bo.timeout = opts.timeout;
    if (!a.broker.empty()) {
      bo.broker_address = a.broker;
      if (!a.secret_file.empty()) {
        auto secret = myelin::broker::read_secret_file(a.secret_file);
        if (!secret.ok()) return fail(rank, secret.status());
        bo.secret = *std::move(secret);
      } else if (const char* env = std::getenv("MYELIN_BROKER_SECRET")) {
        bo.secret = env;
      }
      why = "the broker's own framing over TCP, broker " + a.broker;
    }
    if (a.server || !a.connect.empty() || std::getenv("SLURM_PROCID") != nullptr) {
      char host[256] = {0};
      ::gethostname(host, sizeof(host) - 1);
      bo.listen_host = "0.0.0.0";
      bo.advertise_host = host;
    }
    auto b = bench::BrokerBench::start(bo);
    if (!b.ok()) return fail(rank, b.status());
    brk = std::move(b).value();
  }

  const bool reporter = is_reporter(a, rank);
  const bench::Format format = a.json  ? bench::Format::kJson
                               : a.csv ? bench::Format::kCsv
                                       : bench::Format::kTable;
  std::vector<bench::Column> cols =
      a.kind == Kind::kCollective ? bench::collective_columns() : columns_for(a);
  bench::Report report(std::cout, format, cols);
  const size_t window = a.window != 0 ? a.window : (a.bench == "rate" ? 256 : 64);
  if (reporter) {
    char host[256] = {0};
    ::gethostname(host, sizeof(host) - 1);
    report.comment(std::string("myelin-bench ") + a.bench + ": transport " + used + " (" + why +
                   "), progress " + (*ctx)->progress_reason() +
                   (a.kind == Kind::kCollective
                        ? std::string()
                        : ", window " + std::to_string(window) + ", buffers " +
                              (a.buffers == 0 ? std::string("one per operation in flight")
                                              : std::to_string(std::min(a.buffers, window)))));
    report.comment(std::string("myelin ") + MYELIN_VERSION_STRING + " (" + MYELIN_BUILD_TYPE +
                   "), host " + host + ", " + std::to_string(size) + " ranks, device " +
                   (opts.device.empty() ? "default" : opts.device) + ", this rank: " + placement +
                   ", NUMA node " + numa_text);
    report.comment("command: " + a.command);
    if (a.bench == "pubsub" && a.throughput) {
      report.comment("one publisher, one subscriber; measured at the subscriber, GB = 10^9 bytes");
    } else if (a.bench == "pubsub") {
      report.comment(
          "publish-to-deliver latency: one-way = round trip / 2 through the broker (echoing "
          "subscriber), microseconds");
    } else if (a.bench == "lat") {
      report.comment("one-way latency = round trip / 2, microseconds");
    } else if (a.bench == "ps") {
      report.comment("one step = push + pull of `size` bytes of f32 by each of " +
                     std::to_string(size - 1) + " workers; GB/s = 2 x size / step time");
    } else if (a.kind == Kind::kCollective) {
      report.comment("out-of-place, then in-place; algbw = size / time, busbw = algbw x " +
                     std::to_string(bench::busbw_factor(copts.collective, size)).substr(0, 5) +
                     " (GB = 10^9 B); time = slowest rank's mean");
    } else {
      report.comment(std::string(a.kind == Kind::kOneSided ? "measured at the initiator"
                                 : a.bidir                 ? "sum of both directions"
                                                           : "measured at the receiver") +
                     ", GB = 10^9 bytes");
    }
    report.begin();
  }

  bench::RunConfig cfg;
  cfg.window = window;
  cfg.buffers = a.buffers;
  cfg.corrupt_at = a.inject_wrong;
  uint64_t wrong = 0;
  const int64_t started = monotonic_ns();
  const bool progress_line = reporter && ::isatty(STDERR_FILENO) != 0;
  size_t index = 0;
  // One measurement at `size` with cfg; appends the row (reporter) and counts wrong data.
  // The latency columns every broker row shares: iterations, then min, avg, p50, p90, p99, p99.9
  // and max.
  const auto append_latency = [](std::vector<bench::Value>& row, const bench::LatencyResult& l) {
    row.insert(row.end(), {uint64_t{l.iters}, l.min_us, l.avg_us, l.p50_us, l.p90_us, l.p99_us,
                           l.p999_us, l.max_us});
  };
  std::function<Status(size_t, bool)> measure = [&](size_t msg, bool probe) -> Status {
    std::vector<bench::Value> row;
    uint64_t bad = 0;
    const std::string name = a.bench;
    if (a.kind == Kind::kP2p || a.kind == Kind::kOneSided) {
      if (a.bench == "lat") {
        MYELIN_ASSIGN_OR_RETURN(auto r, bench::run_latency(**ctx, *ep, rank == 0, msg, cfg));
        bad = r.wrong;
        row = {name,     used,     uint64_t{msg}, uint64_t{r.iters}, r.min_us, r.avg_us,
               r.p50_us, r.p90_us, r.p99_us,      r.p999_us,         r.max_us, r.wrong};
      } else {
        Result<bench::BandwidthResult> r = bench::BandwidthResult{};
        if (a.bench == "put" || a.bench == "get") {
          r = bench::run_one_sided(**ctx, *ep,
                                   a.bench == "put" ? bench::OneSided::kPut : bench::OneSided::kGet,
                                   rank == 0, msg, cfg);
        } else if (a.bidir) {
          r = bench::run_bidirectional(**ctx, *ep, msg, cfg);
        } else {
          r = bench::run_bandwidth(**ctx, *ep, rank == 0, msg, cfg);
        }
        if (!r.ok()) return r.status();
        bad = r->wrong;
        const uint64_t w = cfg.window;
        row = {name, used};
        if (a.bench == "bw") row.emplace_back(std::string(a.bidir ? "bidir" : "uni"));
        row.insert(row.end(),
                   {uint64_t{msg}, uint64_t{r->iters}, w, r->gbps, r->msgs_per_s, r->wrong});
      }
    } else if (a.kind == Kind::kCollective) {
      copts.iterations = static_cast<int>(cfg.iters);
      copts.warmup = static_cast<int>(cfg.warmup);
      MYELIN_ASSIGN_OR_RETURN(auto r, bench::measure_collective(*comm, copts, msg));
      bad = r.wrong + r.ip_wrong;
      row = bench::collective_row(copts, size, r);
    } else if (a.bench == "pubsub" && a.throughput) {
      MYELIN_ASSIGN_OR_RETURN(auto r, brk->pubsub_throughput(msg, cfg));
      bad = r.wrong;
      row = {
          name,         used,   std::string("throughput"), uint64_t{msg}, uint64_t{r.iters}, r.gbps,
          r.msgs_per_s, r.wrong};
    } else if (a.bench == "pubsub") {
      MYELIN_ASSIGN_OR_RETURN(auto r, brk->pubsub(msg, cfg));
      const auto& l = r.latency;
      bad = l.wrong;
      auto flood = bench::parse_size(a.flood);
      // The round trip's two legs (microseconds, not halved); -1 where the ranks' clocks differ.
      const auto leg = [&](const bench::LatencyResult& g, double v) {
        return r.legs_valid && g.iters > 0 ? v : -1.0;
      };
      row = {name, used, uint64_t{msg}};
      append_latency(row, l);
      row.insert(row.end(),
                 {uint64_t{flood.ok() ? *flood : 0}, r.flood_gbps, r.flood_delivered_gbps,
                  leg(r.ping_leg, r.ping_leg.p50_us), leg(r.ping_leg, r.ping_leg.p99_us),
                  leg(r.pong_leg, r.pong_leg.p50_us), leg(r.pong_leg, r.pong_leg.p99_us), l.wrong});
    } else {
      MYELIN_ASSIGN_OR_RETURN(auto r, brk->ps(msg, cfg));
      const auto& l = r.step;
      bad = l.wrong;
      row = {name, used, uint64_t{r.workers}, uint64_t{l.size}};
      append_latency(row, l);
      row.insert(row.end(), {r.gbps, l.wrong});
    }
    if (probe) return ok_status();
    wrong += bad;
    if (reporter) report.row(row);
    return ok_status();
  };

  for (size_t msg : *sizes) {
    ++index;
    if (progress_line && monotonic_ns() - started > 2'000'000'000) {
      std::fprintf(stderr, "\r# %s: size %zu (%zu of %zu), %.0f s   ", a.bench.c_str(), msg, index,
                   sizes->size(), static_cast<double>(monotonic_ns() - started) / 1e9);
    }
    cfg.iters = a.iters != 0 ? a.iters : default_iters(a, msg);
    cfg.warmup = a.warmup != 0 ? a.warmup : std::max<size_t>(cfg.iters / 10, 1);
    if (a.duration_s > 0) {
      // Every rank runs a short probe; rank 0 times it and decides the iterations for about
      // --duration seconds; the others read its decision from the store.
      bench::RunConfig probe = cfg;
      probe.iters = std::max<size_t>(cfg.warmup, 10);
      probe.warmup = 1;
      probe.corrupt_at = SIZE_MAX;
      std::swap(cfg, probe);
      const int64_t t0 = monotonic_ns();
      Status s = measure(msg, true);
      const double per_iter =
          static_cast<double>(monotonic_ns() - t0) / 1e9 / static_cast<double>(cfg.iters);
      std::swap(cfg, probe);
      if (!s.ok()) return fail(rank, s);
      const std::string key = "myelin/bench/iters/" + std::to_string(index);
      if (rank == 0) {
        const double n = per_iter > 0 ? a.duration_s / per_iter : 1e9;
        const size_t iters =
            static_cast<size_t>(std::clamp(n, 10.0, static_cast<double>(kMaxIters)));
        if (Status st = store.set(key, std::to_string(iters)); !st.ok()) return fail(rank, st);
      }
      auto v = store.get(key, Deadline::after(opts.timeout));
      if (!v.ok()) return fail(rank, v.status());
      cfg.iters = std::stoull(std::string(v->begin(), v->end()));
      cfg.warmup = a.warmup != 0 ? a.warmup : std::max<size_t>(cfg.iters / 10, 1);
    }
    if (Status s = measure(msg, false); !s.ok())
      return fail(rank, s.with_context("size " + std::to_string(msg)));
  }
  if (progress_line && monotonic_ns() - started > 2'000'000'000) std::fputs("\r\033[K", stderr);
  if (reporter) {
    report.comment(
        "done: " + std::to_string(sizes->size()) + " sizes in " +
        std::to_string(static_cast<int>(static_cast<double>(monotonic_ns() - started) / 1e6)) +
        " ms, " + std::to_string(wrong) + " wrong" + (wrong != 0 ? " (DATA CHECK FAILED)" : ""));
  }
  // Broker clients leave before rank 0 stops the broker they talk to.
  if (rank != 0) brk.reset();
  // Let every rank finish its last exchange (serving it if needed) before anyone leaves.
  (void)store.add("myelin/bench/done", 1);
  const Deadline done_by = Deadline::after_ms(10000);
  while (!done_by.expired()) {
    auto n = store.add("myelin/bench/done", 0);
    if (!n.ok() || *n >= size) break;
    (*ctx)->progress();
  }
  brk.reset();
  comm.reset();
  if (wrong != 0) {
    std::fprintf(stderr, "myelin-bench rank %d: %llu results with wrong data\n", rank,
                 static_cast<unsigned long long>(wrong));
    return 3;
  }
  return 0;
}

// -n N: serve the store here and run the ranks as child processes of this binary, supervised by
// the launcher myelin-run uses (a failing rank stops the others; the job has a deadline).
int run_local(const Args& a, int argc, char** argv) {
  auto server = TcpStoreServer::start("127.0.0.1", 0);
  if (!server.ok()) {
    std::fprintf(stderr, "myelin-bench: %s\n", server.status().to_string().c_str());
    return 2;
  }
  const std::string store = "tcp://127.0.0.1:" + std::to_string((*server)->port());
  std::vector<myelin::tools::ProcessSpec> ranks(static_cast<size_t>(a.nprocs));
  for (int rank = 0; rank < a.nprocs; ++rank) {
    auto& spec = ranks[static_cast<size_t>(rank)];
    spec.program = "/proc/self/exe";
    spec.argv.assign(argv, argv + argc);
    spec.env = {{"MYELIN_RANK", std::to_string(rank)},
                {"MYELIN_SIZE", std::to_string(a.nprocs)},
                {"MYELIN_LOCAL_RANK", std::to_string(rank)},
                {"MYELIN_LOCAL_SIZE", std::to_string(a.nprocs)},
                {"MYELIN_STORE", store},
                {"MYELIN_BENCH_CHILD", "1"}};
    spec.inherit_output = true;  // result lines stay exactly as the ranks print them
    spec.name = "rank " + std::to_string(rank);
  }
  auto rc = myelin::tools::run_processes(
      ranks, {.timeout = std::chrono::seconds(a.timeout_s) * 20, .name = "myelin-bench"});
  if (!rc.ok()) {
    std::fprintf(stderr, "myelin-bench: %s\n", rc.status().to_string().c_str());
    return 2;
  }
  return *rc;
}

Result<std::pair<std::string, uint16_t>> host_port(const std::string& text) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return invalid_argument("'", text, "' is not host:port");
  }
  int port = 0;
  try {
    port = std::stoi(text.substr(colon + 1));
  } catch (...) {
    port = 0;
  }
  if (port <= 0 || port > 65535) return invalid_argument("bad port in '", text, "'");
  return std::make_pair(text.substr(0, colon), static_cast<uint16_t>(port));
}

// "job.step" of this Slurm job step ("" outside Slurm).
std::string slurm_step_id() {
  const char* job = std::getenv("SLURM_JOB_ID");
  const char* step = std::getenv("SLURM_STEP_ID");
  if (job == nullptr) return "";
  return std::string(job) + "." + (step != nullptr ? step : "");
}

// The store port of a job step launched by srun without MYELIN_STORE or --port: one of 2048
// ports above `base`, chosen by the step's id, so that concurrent steps whose first node is the
// same host do not all try `base` (the second could not bind it, and its other ranks would join
// the first step's store). Every rank of the step computes the same port. FNV-1a, not
// std::hash: ranks on different nodes may run differently built binaries.
uint16_t slurm_store_port(uint16_t base, const std::string& step) {
  if (step.empty()) return base;
  uint64_t h = 1469598103934665603ull;
  for (char c : step) {
    h ^= static_cast<uint8_t>(c);
    h *= 1099511628211ull;
  }
  const uint32_t port = static_cast<uint32_t>(base) + 1 + static_cast<uint32_t>(h % 2048);
  return port <= 65535 ? static_cast<uint16_t>(port) : base;
}

// A rank started by someone else (this binary's -n, myelin-run, srun): its store and rank.
int run_discovered(const Args& a, const RankInfo& me) {
  std::string spec = me.store_spec;
  if (spec.empty() && me.source == "slurm") {
    // Rank 0 serves a TcpStore on the first node of the allocation.
    const char* list = std::getenv("SLURM_JOB_NODELIST");
    auto nodes = expand_hostlist(list != nullptr ? list : "");
    if (!nodes.ok() || nodes->empty()) {
      return fail(me.rank, invalid_argument("under srun, set MYELIN_STORE=host:port or "
                                            "SLURM_JOB_NODELIST must name the nodes"));
    }
    spec = "tcp://" + nodes->front() + ":" +
           std::to_string(a.port_given ? a.port : slurm_store_port(a.port, slurm_step_id()));
  }
  const Deadline deadline = Deadline::after(std::chrono::seconds(a.timeout_s));
  std::unique_ptr<Store> store;
  if (std::getenv("MYELIN_BENCH_CHILD") != nullptr && spec.rfind("tcp://", 0) == 0) {
    // The parent (-n) serves this store; every child is a client.
    auto hp = host_port(spec.substr(6));
    if (!hp.ok()) return fail(me.rank, hp.status());
    auto s = TcpStore::connect(hp->first, hp->second, deadline);
    if (!s.ok()) return fail(me.rank, s.status());
    store = std::move(s).value();
  } else {
    auto s = connect_store(spec, me.rank, deadline);
    if (!s.ok()) return fail(me.rank, s.status());
    store = std::move(s).value();
  }
  if (me.source == "slurm") {
    // Another job step on the same first node may have reached this port first (an explicit
    // --port, or two steps whose derived ports agree): refuse its store rather than join it.
    const std::string step = slurm_step_id();
    const std::string key = "myelin/bench/slurm-step";
    if (me.rank == 0) {
      if (Status s = store->set(key, step); !s.ok()) return fail(me.rank, s);
    }
    auto owner = store->get(key, deadline);
    if (!owner.ok()) return fail(me.rank, owner.status());
    if (std::string(owner->begin(), owner->end()) != step) {
      return fail(me.rank,
                  already_exists("the store at ", spec, " belongs to Slurm step ",
                                 std::string(owner->begin(), owner->end()), ", not to this one (",
                                 step, "); give each concurrent step its own --port"));
    }
  }
  return run_rank(a, me.rank, me.size, *store);
}

// What the ranks would otherwise find only once they have started: sizes (-s, -b, -e, -f),
// --flood and --algo. Usage errors, found before anything is launched.
Status check_before_launch(const Args& a) {
  MYELIN_RETURN_IF_ERROR(sizes_of(a).status());
  if (a.bench == "pubsub") MYELIN_RETURN_IF_ERROR(bench::parse_size(a.flood).status());
  if (a.kind == Kind::kCollective) MYELIN_RETURN_IF_ERROR(coll::parse_algorithm(a.algo).status());
  return ok_status();
}

// --transport verbs where no RDMA device opens: the reason myelin-info gives, not the verbs
// library's errno from inside every rank.
Status check_rdma(const Args& a) {
  if (a.transport != "verbs") return ok_status();
  const std::string why = bench_cli::why_no_rdma();
  if (why.empty()) return ok_status();
  return unavailable("--transport verbs: ", why, " (myelin-info shows what this machine offers)");
}

void add_options(CLI::App* sub, Args& a, Kind kind, const std::string& name) {
  sub->add_option("--transport,-t", a.transport, "auto|shm|tcp|ucx|verbs")
      ->check(CLI::IsMember({"auto", "shm", "tcp", "ucx", "verbs"}));
  sub->add_option("--device", a.device, "network device (verbs/ucx/tcp interface address)");
  sub->add_option("-n,--nprocs", a.nprocs,
                  "number of local ranks to start (NOT iterations: see --iters)");
  sub->add_flag("--server", a.server, "rank 0 of two hosts: serve the rendezvous store on --port");
  sub->add_option("--connect", a.connect, "rank 1 of two hosts: the --server's host:port")
      ->check(tools::non_empty());
  sub->add_option("--port", a.port,
                  "store port for --server (default 29500); under srun without MYELIN_STORE: "
                  "default one of 29501-31548 chosen by the job step")
      ->each([&a](const std::string&) { a.port_given = true; });
  sub->add_option("--size,-s", a.sizes, "message sizes (64, 4K, 1M...), repeatable");
  sub->add_option("-b,--minbytes", a.begin, "sweep start");
  sub->add_option("-e,--maxbytes", a.end, "sweep end");
  sub->add_option("-f,--stepfactor", a.factor, "sweep multiplier")
      ->check(tools::integer_in(2, kMaxStepFactor));
  sub->add_option("--iters,-i", a.iters, "timed iterations per size")
      ->check(tools::integer_in(1, kMaxIters));
  sub->add_option("--warmup,-w", a.warmup, "untimed iterations per size (default: iters / 10)")
      ->check(tools::integer_in(1, kMaxIters));
  sub->add_option("--duration", a.duration_s, "seconds per size (overrides --iters)")
      ->check(tools::finite_number(0, tools::kMaxTimeoutSeconds, /*lo_open=*/true));
  sub->add_option("--cpu", a.cpus, "pin rank r to the r-th CPU of this list (0,1 or 0 --cpu 1)")
      ->delimiter(',');
  sub->add_option("--numa", a.numa, "run the ranks on this NUMA node's CPUs and memory");
  sub->add_flag("--json", a.json, "one JSON object per line");
  sub->add_flag("--csv", a.csv, "CSV with a key line");
  sub->add_option("--progress", a.progress,
                  "busy|block|yield|auto (auto: yield when ranks outnumber CPUs, else busy)")
      ->check(CLI::IsMember({"busy", "block", "yield", "auto"}));
  sub->add_option("--timeout", a.timeout_s, "seconds for connects and each wait (default 60)")
      ->check(tools::integer_in(1, static_cast<long long>(tools::kMaxTimeoutSeconds)));
  // Fault injection for the tool's own tests (hidden): corrupt the timed message with this index.
  sub->add_option("--inject-wrong", a.inject_wrong)->group("");
  if (kind == Kind::kP2p || kind == Kind::kOneSided) {
    sub->add_option("--window", a.window, "operations in flight (default 64; rate 256)")
        ->check(tools::integer_in(1, kMaxWindow));
    sub->add_option("--buffers", a.buffers,
                    "distinct buffers (and put/get slots) per side, used round robin; default: "
                    "one per operation in flight; 1: ucx_perftest's one reused buffer")
        ->check(tools::integer_in(1, kMaxWindow));
  }
  if (name == "bw") sub->add_flag("--bidir,--bidirectional", a.bidir, "both directions at once");
  if (kind == Kind::kCollective) {
    sub->add_option("--dtype,-d", a.dtype, "f32|f64|f16|bf16|i32|i64|u8")
        ->check(CLI::IsMember({"f32", "f64", "f16", "bf16", "i32", "i64", "u8"}));
    sub->add_option("--op,-o", a.op, "sum|prod|min|max|avg")
        ->check(CLI::IsMember({"sum", "prod", "min", "max", "avg"}));
    sub->add_option("--algo,-a", a.algo, "auto or an algorithm name (see docs/collectives.md)");
  }
  if (name == "pubsub") {
    sub->add_option("--flood", a.flood, "bulk message size flooded on another topic (0: none)");
    sub->add_flag("--throughput", a.throughput,
                  "messages/s and GB/s from one publisher to one subscriber instead of latency");
  }
  if (kind == Kind::kBroker) {
    sub->add_option("--broker", a.broker,
                    "host:port of a running myelin-broker (default: rank 0 embeds one)")
        ->check(tools::non_empty());
    sub->add_option("--secret-file", a.secret_file,
                    "that broker's job secret (default: $MYELIN_BROKER_SECRET)");
  }
  sub->callback([&a, kind, name] {
    a.bench = name;
    a.kind = kind;
  });
}

// Everything after the option parser: checks, then the run in the form the arguments ask for.
int run_parsed(const Args& a, int argc, char** argv) {
  // A peer that goes away must be an error on the socket, never a signal that kills the rank
  // (broker/src/wire.cpp writes with writev(), which raises SIGPIPE).
  ::signal(SIGPIPE, SIG_IGN);

  if (a.throughput && a.flood != "0") {
    std::fprintf(stderr, "myelin-bench: --throughput and --flood exclude each other\n");
    return 1;
  }
  if (a.json && a.csv) {
    std::fprintf(stderr, "myelin-bench: --json and --csv exclude each other\n");
    return 1;
  }
  if (Status s = check_before_launch(a); !s.ok()) {
    std::fprintf(stderr, "myelin-bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  const bool p2p = a.kind == Kind::kP2p || a.kind == Kind::kOneSided;
  if (std::getenv("MYELIN_BENCH_CHILD") == nullptr) {
    if (Status s = check_rdma(a); !s.ok()) {
      std::fprintf(stderr, "myelin-bench: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    if (a.nprocs != 0) {
      if (a.nprocs < 1 || a.nprocs > 256) {
        std::fprintf(stderr, "myelin-bench: -n %d: between 1 and 256 local ranks\n", a.nprocs);
        return 1;
      }
      if (p2p && a.nprocs != 2) {
        std::fprintf(stderr, "myelin-bench: -n %d: %s runs exactly 2 ranks\n", a.nprocs,
                     a.bench.c_str());
        return 1;
      }
      if (a.kind == Kind::kBroker && a.nprocs < 2) {
        std::fprintf(stderr, "myelin-bench: -n %d: %s needs at least 2 ranks\n", a.nprocs,
                     a.bench.c_str());
        return 1;
      }
      return run_local(a, argc, argv);
    }
    if (a.server) {
      auto server = TcpStoreServer::start("0.0.0.0", a.port);
      if (!server.ok()) return fail(0, server.status());
      auto store = TcpStore::connect("127.0.0.1", (*server)->port(),
                                     Deadline::after(std::chrono::seconds(a.timeout_s)));
      if (!store.ok()) return fail(0, store.status());
      return run_rank(a, 0, 2, **store);
    }
    if (!a.connect.empty()) {
      auto hp = host_port(a.connect);
      if (!hp.ok()) return fail(1, hp.status());
      auto store = TcpStore::connect(hp->first, hp->second,
                                     Deadline::after(std::chrono::seconds(a.timeout_s)));
      if (!store.ok()) return fail(1, store.status());
      return run_rank(a, 1, 2, **store);
    }
  }
  auto me = discover_rank();
  if (!me.ok()) return fail(0, me.status());
  if (me->source != "slurm" && me->source != "launcher") {
    std::fprintf(stderr,
                 "myelin-bench: give -n N (local ranks), --server / --connect host:port, or run "
                 "under srun or myelin-run\n");
    return 1;
  }
  return run_discovered(a, *me);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"myelin-bench: transport, collective and broker benchmarks"};
  app.require_subcommand(1, 1);
  Args a;
  for (int i = 0; i < argc; ++i) a.command += (i ? " " : "") + std::string(argv[i]);
  const struct {
    const char* name;
    Kind kind;
    const char* help;
  } subs[] = {
      {"lat", Kind::kP2p, "ping-pong latency (one-way = round trip / 2), percentiles"},
      {"bw", Kind::kP2p, "streaming bandwidth at the receiver (--bidir: both directions)"},
      {"rate", Kind::kP2p, "message rate: small messages, many in flight"},
      {"put", Kind::kOneSided, "one-sided put bandwidth and rate"},
      {"get", Kind::kOneSided, "one-sided get bandwidth and rate"},
      {"allreduce", Kind::kCollective, "nccl-tests style allreduce"},
      {"reduce_scatter", Kind::kCollective, "nccl-tests style reduce-scatter"},
      {"allgather", Kind::kCollective, "nccl-tests style allgather"},
      {"broadcast", Kind::kCollective, "nccl-tests style broadcast (root 0)"},
      {"reduce", Kind::kCollective, "nccl-tests style reduce (root 0)"},
      {"barrier", Kind::kCollective, "barrier latency"},
      {"alltoall", Kind::kCollective, "nccl-tests style all-to-all"},
      {"pubsub", Kind::kBroker, "publish/subscribe latency through a broker (--flood: with bulk)"},
      {"ps", Kind::kBroker, "parameter-server push + pull step time"},
  };
  for (const auto& s : subs) add_options(app.add_subcommand(s.name, s.help), a, s.kind, s.name);
  if (argc > 1 && argv[1][0] != '-') {
    // CLI11 would take an unknown word for a stray argument and ask for a sub-command.
    bool known = false;
    std::string names;
    for (const auto& s : subs) {
      known = known || std::string(argv[1]) == s.name;
      names += std::string(names.empty() ? "" : ", ") + s.name;
    }
    if (!known) {
      std::fprintf(stderr, "myelin-bench: unknown sub-command '%s' (one of %s)\n", argv[1],
                   names.c_str());
      return 1;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help prints and succeeds; every usage error exits 1, as docs/bench.md says.
    return app.exit(e) == 0 ? 0 : 1;
  }
  try {
    return run_parsed(a, argc, argv);
  } catch (const std::bad_alloc&) {
    // Sizes, windows and iterations are bounded, but their product may still not fit here.
    std::fprintf(stderr, "myelin-bench: out of memory for this run (%s)\n", a.command.c_str());
    return 2;
  }
}
