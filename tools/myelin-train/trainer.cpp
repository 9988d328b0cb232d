// The roles of a myelin-train run: workers (allreduce or ps mode) and parameter servers.
#include "trainer.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include <myelin/broker/client.hpp>
#include <myelin/broker/param_server.hpp>
#include <myelin/broker/server.hpp>
#include <myelin/collectives/collectives.hpp>
#include <myelin/collectives/communicator.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/log.hpp>
#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/context.hpp>

#include <nlohmann/json.hpp>

namespace myelin::train {
namespace {

constexpr const char* kBrokerKey = "train/broker";
constexpr const char* kReadyKey = "train/ps_ready";
constexpr const char* kDoneKey = "train/done";
constexpr const char* kFinishedKey = "train/finished";

std::string ps_key(int server) {
  return "train/ps/" + std::to_string(server);
}

std::string to_text(std::span<const uint8_t> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// An address other hosts can reach this one at: the first non-loopback IPv4 address when the run
// spans nodes, loopback for a local run.
std::string reachable_host(bool local_run) {
  if (local_run) return "127.0.0.1";
  ifaddrs* list = nullptr;
  std::string found = "127.0.0.1";
  if (::getifaddrs(&list) == 0) {
    for (ifaddrs* a = list; a != nullptr; a = a->ifa_next) {
      if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
      const auto* sin = reinterpret_cast<const sockaddr_in*>(a->ifa_addr);
      if ((ntohl(sin->sin_addr.s_addr) >> 24) == 127) continue;
      char buf[INET_ADDRSTRLEN];
      if (::inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)) != nullptr) {
        found = buf;
        break;
      }
    }
    ::freeifaddrs(list);
  }
  return found;
}

bool run_is_local() {
  // Under Slurm the ranks may sit on several nodes; the local launchers set MYELIN_RANK.
  return std::getenv("SLURM_PROCID") == nullptr || std::getenv("MYELIN_RANK") != nullptr;
}

Result<std::unique_ptr<broker::Server>> start_broker(const TrainConfig& config, bool ps,
                                                     std::string* address) {
  const bool local = run_is_local();
  broker::ServerOptions o;
  o.listen = local ? "127.0.0.1:0" : "0.0.0.0:0";
  o.metrics_listen = "";
  o.secret = config.secret;
  o.heartbeat_ms = 1000;
  if (ps) {
    o.enable_ps = true;
    o.ps.num_workers = static_cast<uint32_t>(config.workers);
    o.ps.mode = broker::PsMode::kSync;
    o.ps.aggregation = broker::Aggregation::kSum;
    // Workers push gradients already scaled by the learning rate, so the server applies them
    // as they are (see docs/train.md): the schedule stays with the coordinator.
    o.ps.optimizer = std::make_shared<broker::SgdOptimizer>(1.0f);
  }
  MYELIN_ASSIGN_OR_RETURN(auto server, broker::Server::create(std::move(o)));
  MYELIN_RETURN_IF_ERROR(server->start());
  *address = reachable_host(local) + ":" + std::to_string(server->port());
  return server;
}

struct Percentiles {
  double p50 = 0, p99 = 0, mean = 0;
};
Percentiles percentiles(std::vector<double> v) {
  Percentiles p;
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    const size_t i =
        std::min(v.size() - 1, static_cast<size_t>(std::ceil(q * double(v.size())) - 1));
    return v[i];
  };
  p.p50 = at(0.50);
  p.p99 = at(0.99);
  double sum = 0;
  for (double x : v) sum += x;
  p.mean = sum / double(v.size());
  return p;
}

// The key layout of ps mode: contiguous slices of the flat parameter vector.
struct KeySlice {
  std::string key;
  size_t offset;
  size_t size;
  int server;
};
std::vector<KeySlice> key_slices(size_t params, int servers) {
  const size_t keys = static_cast<size_t>(std::max(servers, 1)) * 2;
  std::vector<KeySlice> out;
  for (size_t k = 0; k < keys; ++k) {
    const size_t begin = params * k / keys, end = params * (k + 1) / keys;
    if (end == begin) continue;
    KeySlice s{"params/" + std::to_string(k), begin, end - begin, 0};
    s.server = static_cast<int>(broker::shard_of(s.key, static_cast<uint32_t>(servers)));
    out.push_back(std::move(s));
  }
  return out;
}

// The control round at a check point: every worker publishes its loss contribution, worker 0
// sums them in rank order, decides the schedule and publishes "ctrl/step"; every worker waits
// for that decision (the step barrier). Returns the decision and the control latency seen here.
struct Decision {
  float lr = 0;
  bool stop = false;
  double global_loss = 0;
  double latency_us = 0;
};

Result<Decision> control_round(broker::Client& client, const TrainConfig& config, int rank,
                               uint64_t step, double my_loss_part, ScheduleState& schedule) {
  const Deadline deadline = Deadline::after_ms(config.timeout_ms);
  broker::PublishOptions control{
      .lane = broker::Lane::kControl, .batch = false, .timeout_ms = config.timeout_ms};
  char text[96];
  std::snprintf(text, sizeof(text), "%llu %d %.17g", static_cast<unsigned long long>(step), rank,
                my_loss_part);
  MYELIN_RETURN_IF_ERROR(client.publish("ctrl/loss", std::string_view(text), control));
  Decision d;
  if (rank == 0) {
    std::vector<double> parts(static_cast<size_t>(config.workers), 0.0);
    std::vector<bool> seen(parts.size(), false);
    size_t have = 0;
    while (have < parts.size()) {
      MYELIN_ASSIGN_OR_RETURN(broker::ReceivedMessage m, client.poll(deadline));
      if (m.topic != "ctrl/loss") continue;
      unsigned long long s = 0;
      int r = -1;
      double part = 0;
      if (std::sscanf(std::string(m.text()).c_str(), "%llu %d %lf", &s, &r, &part) != 3 || r < 0 ||
          r >= config.workers) {
        return protocol_error("malformed ctrl/loss message '", m.text(), "'");
      }
      if (s != step || seen[static_cast<size_t>(r)]) continue;
      seen[static_cast<size_t>(r)] = true;
      parts[static_cast<size_t>(r)] = part;
      ++have;
    }
    double global = 0;
    for (double p : parts) global += p;  // rank order: the serial replay sums the same way
    apply_check_point(config, step, global, schedule);
    std::snprintf(text, sizeof(text), "%llu %.9g %d %.17g", static_cast<unsigned long long>(step),
                  static_cast<double>(schedule.lr), schedule.stop ? 1 : 0, global);
    MYELIN_RETURN_IF_ERROR(client.publish("ctrl/step", std::string_view(text), control));
  }
  for (;;) {
    MYELIN_ASSIGN_OR_RETURN(broker::ReceivedMessage m, client.poll(deadline));
    if (m.topic != "ctrl/step") continue;
    unsigned long long s = 0;
    double lr = 0, global = 0;
    int stop = 0;
    if (std::sscanf(std::string(m.text()).c_str(), "%llu %lf %d %lf", &s, &lr, &stop, &global) !=
        4) {
      return protocol_error("malformed ctrl/step message '", m.text(), "'");
    }
    if (s != step) continue;
    d.lr = static_cast<float>(lr);
    d.stop = stop != 0;
    d.global_loss = global;
    d.latency_us = double(monotonic_ns() - static_cast<int64_t>(m.publish_ts_ns)) / 1e3;
    schedule.lr = d.lr;
    schedule.stop = d.stop;
    return d;
  }
}

uint64_t hash_params(std::span<const float> p) {
  uint64_t h = 1469598103934665603ULL;
  for (float f : p) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    h = (h ^ bits) * 1099511628211ULL;
  }
  return h;
}

bool is_check_point(const TrainConfig& c, uint64_t step) {
  return (step + 1) % c.check_every == 0 || step + 1 == c.steps;
}

}  // namespace

void apply_check_point(const TrainConfig& config, uint64_t step, double global_loss,
                       ScheduleState& state) {
  if (global_loss < state.best_loss * 0.99) {
    state.best_loss = global_loss;
  } else {
    state.lr *= config.lr_decay;
  }
  state.stop =
      step + 1 >= config.steps || (config.target_loss > 0 && global_loss < config.target_loss);
}

std::vector<float> serial_reference(const TrainConfig& config, std::vector<double>* losses) {
  const Mlp mlp(config.shape);
  const Dataset data(config.shape, config.seed);
  std::vector<float> params = mlp.initial_parameters(config.seed);
  const size_t n = params.size();
  const size_t local = config.global_batch / static_cast<size_t>(config.workers);
  std::vector<float> grad(n), acc(n);
  ScheduleState schedule{.lr = config.lr};
  for (uint64_t step = 0; step < config.steps; ++step) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::vector<double> parts;
    std::vector<std::vector<float>> grads;
    for (int r = 0; r < config.workers; ++r) {
      const Batch b = data.batch(step, static_cast<size_t>(r) * local, local);
      const double loss = mlp.loss_and_gradient(params, b, grad, double(config.global_batch));
      parts.push_back(loss * double(local) / double(config.global_batch));
      grads.push_back(grad);
    }
    if (is_check_point(config, step)) {
      double global = 0;
      for (double p : parts) global += p;
      if (losses) losses->push_back(global);
      apply_check_point(config, step, global, schedule);
    }
    if (config.mode == Mode::kAllreduce) {
      for (const auto& g : grads) {
        for (size_t i = 0; i < n; ++i) acc[i] += g[i];
      }
      for (size_t i = 0; i < n; ++i) params[i] -= schedule.lr * acc[i];
    } else {
      for (const auto& g : grads) {
        for (size_t i = 0; i < n; ++i) acc[i] += schedule.lr * g[i];
      }
      for (size_t i = 0; i < n; ++i) params[i] -= 1.0f * acc[i];
    }
    if (schedule.stop) break;
  }
  return params;
}

Status run_worker(const TrainConfig& config, int rank) {
  const bool leader = rank == 0;
  const Deadline setup_deadline = Deadline::after_ms(config.timeout_ms);
  MYELIN_ASSIGN_OR_RETURN(auto store,
                          transport::connect_store(config.store_spec, rank, setup_deadline));
  // The control broker: external when configured, else hosted by worker 0 in allreduce mode and
  // by server 0 in ps mode.
  std::unique_ptr<broker::Server> control_server;
  broker::ClientOptions co;
  if (!config.broker.empty()) {
    co.address = config.broker;
  } else {
    if (leader && config.mode == Mode::kAllreduce) {
      std::string address;
      MYELIN_ASSIGN_OR_RETURN(control_server, start_broker(config, false, &address));
      MYELIN_RETURN_IF_ERROR(store->set(kBrokerKey, address));
    }
    MYELIN_ASSIGN_OR_RETURN(auto broker_address, store->get(kBrokerKey, setup_deadline));
    co.address = to_text(broker_address);
  }
  co.identity = "worker" + std::to_string(rank);
  co.secret = config.secret;
  co.ps_worker = static_cast<uint32_t>(rank);
  MYELIN_ASSIGN_OR_RETURN(auto control, broker::Client::connect(co).with_context(
                                            "connecting to the control broker at " + co.address));
  MYELIN_RETURN_IF_ERROR(control->subscribe("ctrl/step").status());
  if (leader) MYELIN_RETURN_IF_ERROR(control->subscribe("ctrl/loss").status());

  const Mlp mlp(config.shape);
  const Dataset data(config.shape, config.seed);
  std::vector<float> params = mlp.initial_parameters(config.seed);
  const size_t n = params.size();
  const size_t local = config.global_batch / static_cast<size_t>(config.workers);
  std::vector<float> grad(n), reduced;

  // Allreduce mode: a Communicator over a transport Context.
  std::unique_ptr<transport::Context> ctx;
  std::unique_ptr<collectives::Communicator> comm;
  collectives::Options coll;
  std::string transport_note;
  nlohmann::json peer_backends = nlohmann::json::array();  // worker 0: the backend per peer
  if (config.mode == Mode::kAllreduce) {
    transport::Options to;
    MYELIN_ASSIGN_OR_RETURN(to.backend, transport::parse_backend(config.transport));
    to.timeout = std::chrono::milliseconds(config.timeout_ms);
    to.name = "worker " + std::to_string(rank);
    if (config.progress_mode == "auto") {
      // Busy-polling ranks that outnumber the cores only steal each other's time slices.
      const long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
      to.progress = config.workers > cores ? transport::ProgressMode::kSpinThenBlock
                                           : transport::ProgressMode::kBusyPoll;
    } else {
      MYELIN_ASSIGN_OR_RETURN(to.progress, transport::parse_progress_mode(config.progress_mode));
    }
    MYELIN_ASSIGN_OR_RETURN(to, to.with_env_overlay());
    MYELIN_ASSIGN_OR_RETURN(ctx, transport::Context::create(to));
    MYELIN_ASSIGN_OR_RETURN(comm, collectives::Communicator::create(
                                      {.rank = rank,
                                       .size = config.workers,
                                       .context = ctx.get(),
                                       .store = store.get(),
                                       .timeout = std::chrono::milliseconds(config.timeout_ms)}));
    MYELIN_ASSIGN_OR_RETURN(coll.algorithm, collectives::parse_algorithm(config.algorithm));
    if (config.workers > 1) {
      // The backend towards every peer (worker 0 reports them all; the others only the next).
      for (int peer = 0; peer < config.workers; ++peer) {
        if (peer == rank || (!leader && peer != (rank + 1) % config.workers)) continue;
        auto peer_addr = store->get(transport::address_key(peer), setup_deadline);
        if (!peer_addr.ok()) continue;
        auto choice = ctx->choice_for(*peer_addr);
        if (!choice.ok()) continue;
        const std::string backend(transport::backend_name(choice->backend));
        if (peer == (rank + 1) % config.workers) {
          transport_note = backend + " (" + choice->reason + ")";
        }
        peer_backends.push_back({{"peer", peer}, {"backend", backend}, {"reason", choice->reason}});
      }
    } else {
      transport_note = "none (one worker)";
    }
    reduced.resize(config.deterministic ? n * size_t(config.workers) : n);
  }

  // Ps mode: one client per server, keys sliced over them.
  std::vector<std::unique_ptr<broker::Client>> ps_clients;
  std::vector<KeySlice> slices;
  if (config.mode == Mode::kPs) {
    transport_note = "broker client over tcp to " + std::to_string(config.servers) + " server(s)";
    slices = key_slices(n, config.servers);
    for (int s = 0; s < config.servers; ++s) {
      MYELIN_ASSIGN_OR_RETURN(auto addr, store->get(ps_key(s), setup_deadline));
      broker::ClientOptions pc = co;
      pc.address = to_text(addr);
      MYELIN_ASSIGN_OR_RETURN(auto client, broker::Client::connect(pc));
      ps_clients.push_back(std::move(client));
    }
    if (leader) {
      for (const auto& sl : slices) {
        MYELIN_RETURN_IF_ERROR(
            ps_clients[size_t(sl.server)]
                ->ps_init(sl.key, std::span<const float>(params).subspan(sl.offset, sl.size),
                          config.timeout_ms)
                .with_context("initialising " + sl.key));
      }
      MYELIN_RETURN_IF_ERROR(store->set(kReadyKey, std::string_view("1")));
    } else {
      MYELIN_RETURN_IF_ERROR(store->get(kReadyKey, setup_deadline).status());
    }
  }

  const bool tty = config.progress && !config.json && ::isatty(STDOUT_FILENO);
  if (leader && !config.json) {
    std::printf(
        "# myelin-train: mode %s, %d workers%s, %zu parameters (%.1f MB), global batch %zu,"
        " %llu steps\n",
        config.mode == Mode::kAllreduce ? "allreduce" : "ps", config.workers,
        config.mode == Mode::kPs ? (", " + std::to_string(config.servers) + " servers").c_str()
                                 : "",
        n, double(n) * 4 / 1e6, config.global_batch, static_cast<unsigned long long>(config.steps));
    std::printf("# transport: %s\n", transport_note.c_str());
    if (peer_backends.size() > 1) {
      std::string all;
      for (const auto& p : peer_backends) {
        all += " " + std::to_string(p["peer"].get<int>()) + ":" + p["backend"].get<std::string>();
      }
      std::printf("# transport per peer:%s\n", all.c_str());
    }
    std::printf("# %6s %10s %8s %11s %9s %10s %12s\n", "step", "loss", "lr", "compute_ms",
                "comm_ms", "comm_GBps", "ctrl_lat_us");
    std::fflush(stdout);
  }

  ScheduleState schedule{.lr = config.lr};
  std::vector<double> compute_ms, comm_ms, step_ms, control_us;
  double first_loss = -1, last_loss = 0;
  std::string algo_used;
  uint64_t steps_done = 0;
  const int64_t run_start = monotonic_ns();
  for (uint64_t step = 0; step < config.steps; ++step) {
    const int64_t t0 = monotonic_ns();
    const Batch b = data.batch(step, static_cast<size_t>(rank) * local, local);
    const double loss = mlp.loss_and_gradient(params, b, grad, double(config.global_batch));
    const int64_t t1 = monotonic_ns();
    if (is_check_point(config, step)) {
      MYELIN_ASSIGN_OR_RETURN(
          Decision d, control_round(*control, config, rank, step,
                                    loss * double(local) / double(config.global_batch), schedule)
                          .with_context("control round at step " + std::to_string(step)));
      control_us.push_back(d.latency_us);
      if (first_loss < 0) first_loss = d.global_loss;
      last_loss = d.global_loss;
    }
    const int64_t t2 = monotonic_ns();
    if (config.mode == Mode::kAllreduce) {
      if (config.deterministic) {
        MYELIN_ASSIGN_OR_RETURN(auto a,
                                collectives::allgather(*comm, grad.data(), reduced.data(), n,
                                                       collectives::DataType::kF32, coll));
        algo_used = "allgather/" + std::string(collectives::algorithm_name(a));
        std::fill(grad.begin(), grad.end(), 0.0f);
        for (int r = 0; r < config.workers; ++r) {
          const float* g = reduced.data() + size_t(r) * n;
          for (size_t i = 0; i < n; ++i) grad[i] += g[i];
        }
      } else {
        MYELIN_ASSIGN_OR_RETURN(auto a, collectives::allreduce(*comm, grad.data(), grad.data(), n,
                                                               collectives::DataType::kF32,
                                                               collectives::ReduceOp::kSum, coll));
        algo_used = std::string(collectives::algorithm_name(a));
      }
      for (size_t i = 0; i < n; ++i) params[i] -= schedule.lr * grad[i];
    } else {
      for (size_t i = 0; i < n; ++i) grad[i] *= schedule.lr;
      for (const auto& sl : slices) {
        MYELIN_RETURN_IF_ERROR(
            ps_clients[size_t(sl.server)]
                ->ps_push(sl.key, std::span<const float>(grad).subspan(sl.offset, sl.size), step,
                          config.timeout_ms)
                .with_context("pushing " + sl.key));
      }
      for (const auto& sl : slices) {
        MYELIN_RETURN_IF_ERROR(ps_clients[size_t(sl.server)]
                                   ->ps_pull(sl.key, step + 1,
                                             std::span<float>(params).subspan(sl.offset, sl.size),
                                             config.timeout_ms)
                                   .status()
                                   .with_context("pulling " + sl.key));
      }
      algo_used = "push/pull";
    }
    const int64_t t3 = monotonic_ns();
    compute_ms.push_back(double(t1 - t0) / 1e6);
    comm_ms.push_back(double(t3 - t2) / 1e6);
    step_ms.push_back(double(t3 - t0) / 1e6);
    ++steps_done;
    const double bytes = double(n) * 4 * (config.mode == Mode::kPs ? 2 : 1);
    if (leader && !config.json && (is_check_point(config, step) || tty)) {
      const bool check = is_check_point(config, step);
      std::printf(
          "%s  %6llu %10.5f %8.5f %11.3f %9.3f %10.3f %12s%s", tty ? "\r" : "",
          static_cast<unsigned long long>(step + 1),
          check ? last_loss
                : loss * double(config.workers) * double(local) / double(config.global_batch),
          double(schedule.lr), compute_ms.back(), comm_ms.back(), bytes / (comm_ms.back() * 1e6),
          check ? std::to_string(int64_t(control_us.back())).c_str() : "-", check ? "\n" : "");
      std::fflush(stdout);
    }
    if (leader && config.json && is_check_point(config, step)) {
      nlohmann::json j = {{"event", "step"},
                          {"step", step + 1},
                          {"loss", last_loss},
                          {"lr", schedule.lr},
                          {"compute_ms", compute_ms.back()},
                          {"comm_ms", comm_ms.back()},
                          {"control_latency_us", control_us.back()}};
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    }
    if (schedule.stop) break;
  }
  const double run_s = double(monotonic_ns() - run_start) / 1e9;

  // Every worker must hold the same parameters.
  bool agree = true;
  if (config.mode == Mode::kAllreduce && config.workers > 1) {
    uint64_t mine = hash_params(params);
    std::vector<uint64_t> all(size_t(config.workers));
    MYELIN_RETURN_IF_ERROR(
        collectives::allgather(*comm, &mine, all.data(), 1, collectives::DataType::kI64, coll)
            .status()
            .with_context("comparing final parameters"));
    agree = std::all_of(all.begin(), all.end(), [&](uint64_t h) { return h == all[0]; });
  }

  Status result;
  if (leader) {
    const Percentiles comp = percentiles(compute_ms), com = percentiles(comm_ms),
                      stp = percentiles(step_ms), ctl = percentiles(control_us);
    const double bytes = double(n) * 4 * (config.mode == Mode::kPs ? 2 : 1);
    double max_diff = -1;
    bool bit_exact = false;
    if (config.verify) {
      const std::vector<float> ref = serial_reference(config, nullptr);
      max_diff = 0;
      bit_exact = ref.size() == params.size();
      for (size_t i = 0; i < n && i < ref.size(); ++i) {
        const double d = std::fabs(double(ref[i]) - double(params[i]));
        max_diff = std::max(max_diff, d);
        uint32_t a, c;
        std::memcpy(&a, &ref[i], 4);
        std::memcpy(&c, &params[i], 4);
        bit_exact = bit_exact && a == c;
      }
    }
    const double tolerance = 1e-4;
    const bool loss_checked = control_us.size() >= 2;
    if (config.json) {
      nlohmann::json j = {{"event", "summary"},
                          {"mode", config.mode == Mode::kAllreduce ? "allreduce" : "ps"},
                          {"workers", config.workers},
                          {"servers", config.mode == Mode::kPs ? config.servers : 0},
                          {"parameters", n},
                          {"steps", steps_done},
                          {"first_loss", first_loss},
                          {"final_loss", last_loss},
                          {"final_lr", schedule.lr},
                          {"transport", transport_note},
                          {"peer_transports", peer_backends},
                          {"algorithm", algo_used},
                          {"run_s", run_s},
                          {"step_ms_p50", stp.p50},
                          {"compute_ms_p50", comp.p50},
                          {"comm_ms_p50", com.p50},
                          {"comm_ms_p99", com.p99},
                          {"comm_GBps", bytes / (com.p50 * 1e6)},
                          {"control_latency_us_p50", ctl.p50},
                          {"control_latency_us_p99", ctl.p99},
                          {"workers_agree", agree},
                          {"loss_checked", loss_checked}};
      if (config.verify) {
        j["verify_max_abs_diff"] = max_diff;
        j["verify_bit_exact"] = bit_exact;
      }
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%s\n# summary\n", tty ? "" : "");
      std::printf("#   steps %llu in %.2f s; loss %.5f -> %.5f; final lr %.5f\n",
                  static_cast<unsigned long long>(steps_done), run_s, first_loss, last_loss,
                  double(schedule.lr));
      std::printf("#   %-22s %10s %10s %10s\n", "per step", "p50", "p99", "mean");
      std::printf("#   %-22s %10.3f %10.3f %10.3f\n", "step time (ms)", stp.p50, stp.p99, stp.mean);
      std::printf("#   %-22s %10.3f %10.3f %10.3f\n", "compute (ms)", comp.p50, comp.p99,
                  comp.mean);
      std::printf("#   %-22s %10.3f %10.3f %10.3f\n", "communication (ms)", com.p50, com.p99,
                  com.mean);
      std::printf("#   %-22s %10.1f %10.1f %10.1f\n", "control latency (us)", ctl.p50, ctl.p99,
                  ctl.mean);
      std::printf("#   bandwidth at p50: %.3f GB/s (%s, %.1f MB per step)\n",
                  bytes / (com.p50 * 1e6), algo_used.c_str(), bytes / 1e6);
      std::printf("#   workers hold identical parameters: %s\n", agree ? "yes" : "NO");
      if (!loss_checked) {
        std::printf(
            "#   loss check: skipped, one check point (--steps %llu <= --check-every %llu)\n",
            static_cast<unsigned long long>(steps_done),
            static_cast<unsigned long long>(config.check_every));
      }
      if (config.verify) {
        std::printf("#   serial reference: %s (max |diff| %.3g)\n",
                    bit_exact ? "bit-exact" : (max_diff <= tolerance ? "within 1e-4" : "MISMATCH"),
                    max_diff);
      }
    }
    std::fflush(stdout);
    if (!agree) result = internal_error("workers ended with different parameters");
    if (config.verify && config.deterministic && config.mode == Mode::kAllreduce && !bit_exact) {
      result = internal_error("deterministic run differs from the serial reference (max |diff| ",
                              max_diff, ")");
    } else if (config.verify && max_diff > tolerance) {
      result = internal_error("run differs from the serial reference by ", max_diff);
    }
    // The loss must fall from the first check point to the last; a run with one check point
    // (--steps <= --check-every) has nothing to compare.
    if (!std::isfinite(first_loss) || !std::isfinite(last_loss)) {
      result = internal_error("the loss is not finite (", first_loss, " -> ", last_loss, ")");
    } else if (loss_checked && !(last_loss < first_loss)) {
      result = internal_error("the loss did not fall (", first_loss, " -> ", last_loss, ")");
    }
  }

  // Shutdown: in ps mode the servers wait for every worker; in allreduce mode the broker host
  // waits for everyone before closing.
  MYELIN_RETURN_IF_ERROR(
      store->set(std::string(kDoneKey) + "/" + std::to_string(rank), std::string_view("1")));
  if (leader) {
    const Deadline done_by = Deadline::after_ms(config.timeout_ms);
    for (int r = 0; r < config.workers; ++r) {
      MYELIN_RETURN_IF_ERROR(store->get(std::string(kDoneKey) + "/" + std::to_string(r), done_by)
                                 .status()
                                 .with_context("waiting for worker " + std::to_string(r)));
    }
    MYELIN_RETURN_IF_ERROR(store->set(kFinishedKey, std::string_view("1")));
  } else if (config.mode == Mode::kAllreduce) {
    MYELIN_RETURN_IF_ERROR(
        store->get(kFinishedKey, Deadline::after_ms(config.timeout_ms)).status());
  }
  ps_clients.clear();
  control.reset();
  if (control_server) control_server->stop();
  return result;
}

Status run_server(const TrainConfig& config, int server_index) {
  const Deadline setup_deadline = Deadline::after_ms(config.timeout_ms);
  // Servers never serve the store: that is worker 0's job.
  MYELIN_ASSIGN_OR_RETURN(
      auto store, transport::connect_store(config.store_spec, config.workers + 1 + server_index,
                                           setup_deadline));
  std::string address;
  MYELIN_ASSIGN_OR_RETURN(auto server, start_broker(config, true, &address));
  MYELIN_RETURN_IF_ERROR(store->set(ps_key(server_index), address));
  if (server_index == 0 && config.broker.empty()) {
    MYELIN_RETURN_IF_ERROR(store->set(kBrokerKey, address));
  }
  // Serve until every worker is done; give up only if the whole run exceeds its bound.
  const int64_t bound_ms = config.timeout_ms * int64_t(config.steps / config.check_every + 2);
  Status waited = store->get(kFinishedKey, Deadline::after_ms(bound_ms)).status();
  (void)server->drain(Deadline::after_ms(2000));
  return waited.with_context("server " + std::to_string(server_index) + " waiting for the workers");
}

}  // namespace myelin::train
