// Publish/subscribe and parameter-server benchmarks through an embedded broker Server.
#include <myelin/bench/broker_bench.hpp>

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <myelin/broker/client.hpp>
#include <myelin/broker/server.hpp>
#include <myelin/core/clock.hpp>

namespace myelin::bench {

namespace {
// MYELIN_CONTROL_SCHEDULING=normal|rr (broker::ControlScheduling): the threads that exchange the
// ping-pong (the pinger, the echo) run under it for one pubsub() round and get their own policy
// back after it; the embedded broker's control thread takes it too. A name it does not know
// fails the round.
Result<broker::ControlScheduling> control_scheduling_from_env() {
  const char* sv = std::getenv("MYELIN_CONTROL_SCHEDULING");
  if (sv == nullptr || *sv == '\0') return broker::ControlScheduling::kNormal;
  return broker::parse_control_scheduling(sv).with_context("MYELIN_CONTROL_SCHEDULING");
}

// MYELIN_CONTROL_CPUS=LIST (broker::ServerOptions / ClientOptions::control_cpus): the embedded
// broker and every client of this process keep bulk threads off these CPUs while control
// traffic flows; "" or unset: none. A list the parser refuses fails the run.
Result<std::vector<int>> control_cpus_from_env() {
  const char* v = std::getenv("MYELIN_CONTROL_CPUS");
  if (v == nullptr) return std::vector<int>{};
  return broker::parse_control_cpu_list(v).with_context("MYELIN_CONTROL_CPUS");
}

class ControlSchedulingScope {
 public:
  static Result<std::unique_ptr<ControlSchedulingScope>> enter() {
    MYELIN_ASSIGN_OR_RETURN(broker::ControlScheduling s, control_scheduling_from_env());
    auto scope = std::unique_ptr<ControlSchedulingScope>(new ControlSchedulingScope());
    if (s == broker::ControlScheduling::kNormal) return scope;
    if (::pthread_getschedparam(::pthread_self(), &scope->policy_, &scope->param_) != 0)
      return internal_error("pthread_getschedparam failed");
    MYELIN_RETURN_IF_ERROR(broker::apply_control_scheduling_to_this_thread(s));
    scope->restore_ = true;
    return scope;
  }
  ~ControlSchedulingScope() {
    if (restore_) (void)::pthread_setschedparam(::pthread_self(), policy_, &param_);
  }
  ControlSchedulingScope(const ControlSchedulingScope&) = delete;
  ControlSchedulingScope& operator=(const ControlSchedulingScope&) = delete;

 private:
  ControlSchedulingScope() = default;
  bool restore_ = false;
  int policy_ = 0;
  sched_param param_{};
};

constexpr const char* kPing = "ctrl/ping";
constexpr const char* kPong = "ctrl/pong";
constexpr const char* kFlood = "grad/flood";
constexpr const char* kData = "tput/data";

std::string random_secret() {
  std::random_device rd;
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < 48; ++i) s += hex[rd() & 15];
  return s;
}

std::string as_string(const std::vector<uint8_t>& v) {
  return {v.begin(), v.end()};
}

std::span<const std::byte> bytes_of(const std::vector<uint8_t>& v, size_t n) {
  return {reinterpret_cast<const std::byte*>(v.data()), n};
}

uint8_t pattern(size_t i, uint64_t salt) {
  return static_cast<uint8_t>((i * 29 + salt * 13) & 0xFF);
}

broker::PublishOptions control_publish(std::chrono::milliseconds timeout) {
  return {.lane = broker::Lane::kControl, .batch = false, .timeout_ms = timeout.count()};
}
}  // namespace

Status store_barrier(transport::Store& store, const std::string& name, int n, Deadline deadline) {
  // The rank that completes the count publishes "<name>/done"; the others wait on that key with
  // the store's own deadline-bounded get() instead of polling the counter.
  const std::string done = name + "/done";
  MYELIN_ASSIGN_OR_RETURN(int64_t v, store.add(name, 1));
  if (v >= n) return store.set(done, std::string_view("1"));
  auto got = store.get(done, deadline);
  if (got.ok()) return ok_status();
  if (got.status().code() != StatusCode::kTimeout) return got.status();
  MYELIN_ASSIGN_OR_RETURN(v, store.add(name, 0));
  return timeout_error("barrier '", name, "': ", v, " of ", n, " ranks arrived");
}

class BrokerBench::Impl {
 public:
  BrokerBenchOptions o;
  std::unique_ptr<broker::Server> server;  // rank 0
  std::unique_ptr<broker::Client> client;
  std::string address, secret;
  uint64_t round = 0;
  std::atomic<uint64_t> flood_received{0};  // rank 0's flood handler (I/O thread) adds; unread

  // Throughput subscriber (rank 1): written by the tput/data handler on the client's I/O thread
  // and read by the measuring thread, all under tput_mu.
  std::mutex tput_mu;
  std::condition_variable tput_cv;
  struct Tput {
    size_t size = 0, warmup = 0, total = 0;  // set before the round, under tput_mu
    std::vector<uint8_t> expect;             // pattern(k, size) for every k, same
    size_t received = 0;
    uint64_t wrong = 0;
    int64_t first_ns = 0, last_ns = 0;
  } tput;
  void on_data(const broker::ReceivedMessage& m) {
    std::lock_guard<std::mutex> lock(tput_mu);
    Tput& t = tput;
    const size_t i = t.received;
    const auto* got = reinterpret_cast<const uint8_t*>(m.payload.data());
    const bool good = m.payload.size() == t.size && (t.size < 8 || std::memcmp(got, &i, 8) == 0) &&
                      m.missed_before == 0 &&
                      (t.size <= 8 || std::memcmp(got + 8, t.expect.data() + 8, t.size - 8) == 0);
    if (!good) ++t.wrong;
    ++t.received;
    if (i == t.warmup) t.first_ns = monotonic_ns();
    if (t.received == t.total) {
      t.last_ns = monotonic_ns();
      tput_cv.notify_all();
    }
  }

  Deadline deadline() const { return Deadline::after(o.timeout); }
  Status barrier(const std::string& what) {
    return store_barrier(*o.store, "myelin/bench/barrier/" + std::to_string(round) + "/" + what,
                         o.size, deadline());
  }
  Result<std::unique_ptr<broker::Client>> connect(const std::string& identity) const {
    broker::ClientOptions co;
    co.address = address;
    co.identity = identity;
    co.secret = secret;
    co.connect_timeout_ms = o.timeout.count();
    co.ps_worker = o.rank >= 1 ? static_cast<uint32_t>(o.rank - 1) : 0;
    // MYELIN_BULK_IO_NICE=N: every client's I/O thread runs at nice N (ClientOptions::
    // io_thread_nice): with control connections and polling threads, the threads that read bulk.
    if (const char* nv = std::getenv("MYELIN_BULK_IO_NICE"); nv != nullptr && *nv != '\0')
      co.io_thread_nice = std::atoi(nv);
    // MYELIN_BULK_IO_SCHEDULING=normal|idle: every client's I/O thread is scheduled so
    // (ClientOptions::io_thread_scheduling); a name it does not know fails the connect.
    if (const char* sv = std::getenv("MYELIN_BULK_IO_SCHEDULING"); sv != nullptr && *sv != '\0') {
      MYELIN_ASSIGN_OR_RETURN(
          co.io_thread_scheduling,
          broker::parse_bulk_scheduling(sv).with_context("MYELIN_BULK_IO_SCHEDULING"));
    }
    // MYELIN_CONTROL_CONNECTION=0: clients keep the control lane on their main connection
    // (ClientOptions::control_connection), to compare the two set-ups on one build.
    if (const char* cv = std::getenv("MYELIN_CONTROL_CONNECTION"); cv != nullptr && *cv != '\0')
      co.control_connection = std::string_view(cv) != "0";
    // MYELIN_CLIENT_SPIN_US=N: poll() callers spin up to N us before they sleep
    // (ClientOptions::spin_before_block_us).
    if (const char* sv = std::getenv("MYELIN_CLIENT_SPIN_US"); sv != nullptr && *sv != '\0')
      co.spin_before_block_us = std::atoll(sv);
    MYELIN_ASSIGN_OR_RETURN(co.control_cpus, control_cpus_from_env());
    return broker::Client::connect(std::move(co));
  }
  // Publishes flood messages until `stop` is set (rank 1's thread) or the store says so (ranks
  // >= 2); returns the bytes published and the seconds it took.
  static Status flood(broker::Client& c, size_t size, const std::function<bool()>& stop,
                      std::chrono::milliseconds timeout, uint64_t& bytes, double& seconds) {
    std::vector<uint8_t> payload(size);
    for (size_t i = 0; i < size; ++i) payload[i] = pattern(i, 3);
    const int64_t t0 = monotonic_ns();
    broker::PublishOptions po{
        .lane = broker::Lane::kBulk, .batch = true, .timeout_ms = timeout.count()};
    while (!stop()) {
      MYELIN_RETURN_IF_ERROR(c.publish(kFlood, bytes_of(payload, size), po));
      bytes += size;
    }
    seconds = static_cast<double>(monotonic_ns() - t0) / 1e9;
    return ok_status();
  }
};

BrokerBench::BrokerBench(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BrokerBench::~BrokerBench() {
  if (impl_ == nullptr) return;
  impl_->client.reset();
  if (impl_->server) impl_->server->stop();
}

Result<std::unique_ptr<BrokerBench>> BrokerBench::start(const BrokerBenchOptions& options) {
  if (options.store == nullptr) return invalid_argument("BrokerBench needs a store");
  if (options.size < 2) {
    return invalid_argument("broker benchmarks need at least 2 ranks (got ", options.size, ")");
  }
  auto impl = std::make_unique<Impl>();
  impl->o = options;
  transport::Store& store = *options.store;
  if (options.rank == 0 && options.broker_address.empty()) {
    broker::ServerOptions so;
    so.listen = options.listen_host + ":0";
    so.metrics_listen = "";
    so.secret = random_secret();
    broker::TopicPolicy control{.pattern = kPing,
                                .lane = broker::Lane::kControl,
                                .overflow = broker::OverflowPolicy::kBlock,
                                .batching = false};
    broker::TopicPolicy pong = control;
    pong.pattern = kPong;
    so.broker.policies = {control,
                          pong,
                          {.pattern = kFlood,
                           .lane = broker::Lane::kBulk,
                           .overflow = broker::OverflowPolicy::kBlock,
                           .batching = true}};
    // MYELIN_BROKER_SPIN_US=N: the embedded broker's threads spin up to N us before they sleep
    // (ServerOptions::spin_before_block_us).
    if (const char* sv = std::getenv("MYELIN_BROKER_SPIN_US"); sv != nullptr && *sv != '\0')
      so.spin_before_block_us = std::atoll(sv);
    MYELIN_ASSIGN_OR_RETURN(so.control_scheduling, control_scheduling_from_env());
    MYELIN_ASSIGN_OR_RETURN(so.control_cpus, control_cpus_from_env());
    so.enable_ps = true;
    so.ps.num_workers = static_cast<uint32_t>(options.size - 1);
    so.ps.aggregation = broker::Aggregation::kSum;
    so.ps.mode = broker::PsMode::kSync;
    MYELIN_ASSIGN_OR_RETURN(impl->server, broker::Server::create(so));
    MYELIN_RETURN_IF_ERROR(impl->server->start());
    const std::string addr = options.advertise_host + ":" + std::to_string(impl->server->port());
    MYELIN_RETURN_IF_ERROR(store.set("myelin/bench/broker/secret", so.secret));
    MYELIN_RETURN_IF_ERROR(store.set("myelin/bench/broker/address", addr));
  }
  const Deadline deadline = Deadline::after(options.timeout);
  if (options.broker_address.empty()) {
    MYELIN_ASSIGN_OR_RETURN(auto addr, store.get("myelin/bench/broker/address", deadline));
    MYELIN_ASSIGN_OR_RETURN(auto secret, store.get("myelin/bench/broker/secret", deadline));
    impl->address = as_string(addr);
    impl->secret = as_string(secret);
  } else {
    if (options.secret.empty()) return invalid_argument("an external broker needs its secret");
    impl->address = options.broker_address;
    impl->secret = options.secret;
  }
  MYELIN_ASSIGN_OR_RETURN(impl->client, impl->connect("rank" + std::to_string(options.rank)));
  if (options.rank == 0) {
    MYELIN_RETURN_IF_ERROR(impl->client->subscribe(kPing).status());
    Impl* raw = impl.get();
    MYELIN_RETURN_IF_ERROR(impl->client
                               ->subscribe(kFlood,
                                           [raw](const broker::ReceivedMessage& m) {
                                             // Only a statistic; nothing pairs with it (relaxed).
                                             raw->flood_received.fetch_add(
                                                 m.payload.size(), std::memory_order_relaxed);
                                           })
                               .status());
  } else if (options.rank == 1) {
    MYELIN_RETURN_IF_ERROR(impl->client->subscribe(kPong).status());
    Impl* raw = impl.get();
    MYELIN_RETURN_IF_ERROR(
        impl->client->subscribe(kData, [raw](const broker::ReceivedMessage& m) { raw->on_data(m); })
            .status());
  }
  MYELIN_RETURN_IF_ERROR(impl->barrier("ready"));
  return std::unique_ptr<BrokerBench>(new BrokerBench(std::move(impl)));
}

Result<PubSubResult> BrokerBench::pubsub(size_t size, const RunConfig& cfg) {
  Impl& m = *impl_;
  ++m.round;
  PubSubResult res;
  res.latency.size = size;
  res.latency.iters = cfg.iters;
  const size_t total = cfg.warmup + cfg.iters;
  const std::string stop_key = "myelin/bench/flood-stop/" + std::to_string(m.round);
  broker::Client& c = *m.client;

  if (m.o.rank == 0) {
    MYELIN_ASSIGN_OR_RETURN(auto scheduling, ControlSchedulingScope::enter());
    std::vector<uint8_t> copy;
    // The flood bytes this rank's handler took while it echoed (from the first ping on).
    uint64_t flood_at_first = 0;
    int64_t first_ns = 0;
    for (size_t i = 0; i < total; ++i) {
      MYELIN_ASSIGN_OR_RETURN(broker::ReceivedMessage msg, c.poll(m.deadline()));
      if (i == 0) {
        flood_at_first = m.flood_received.load(std::memory_order_relaxed);
        first_ns = monotonic_ns();
      }
      std::span<const std::byte> out = msg.payload;
      if (i >= cfg.warmup && i - cfg.warmup == cfg.corrupt_at && !out.empty()) {
        copy.assign(reinterpret_cast<const uint8_t*>(out.data()),
                    reinterpret_cast<const uint8_t*>(out.data()) + out.size());
        copy[copy.size() / 2] ^= 0x5A;
        out = bytes_of(copy, copy.size());
      }
      MYELIN_RETURN_IF_ERROR(c.publish(kPong, out, control_publish(m.o.timeout)));
    }
    if (m.o.flood_size > 0) {
      const uint64_t got = m.flood_received.load(std::memory_order_relaxed) - flood_at_first;
      const int64_t ns = monotonic_ns() - first_ns;
      MYELIN_RETURN_IF_ERROR(
          m.o.store->set("myelin/bench/flood-delivered/" + std::to_string(m.round),
                         std::to_string(got) + " " + std::to_string(ns)));
    }
  } else if (m.o.rank >= 2) {
    if (m.o.flood_size > 0) {
      uint64_t n = 0, bytes = 0;
      double seconds = 0;
      auto stop = [&] {
        // A store round trip every 64 messages.
        if (++n % 64 != 0) return false;
        auto has = m.o.store->contains(stop_key);
        return !has.ok() || *has;
      };
      MYELIN_RETURN_IF_ERROR(Impl::flood(c, m.o.flood_size, stop, m.o.timeout, bytes, seconds));
    }
  } else {
    // Rank 1: the flood thread (own connection), then ping-pong.
    std::atomic<bool> stop{false};  // set by this thread after the last pong; read by the flooder
    Status flood_status;
    uint64_t flood_bytes = 0;
    double flood_seconds = 0;
    std::unique_ptr<broker::Client> flooder;
    std::thread thread;
    if (m.o.flood_size > 0) {
      MYELIN_ASSIGN_OR_RETURN(flooder, m.connect("rank1-flood"));
      thread = std::thread([&] {
        // MYELIN_FLOOD_NICE=N: the bulk producer lowers its CPU priority (nice N), so the control
        // path gets the CPU first (nats_bench reads the same variable). Lowering one's own
        // priority needs no privilege; a refusal leaves it as it was.
        if (const char* nv = std::getenv("MYELIN_FLOOD_NICE"); nv != nullptr && *nv != '\0') {
          (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), std::atoi(nv));
        }
        flood_status = Impl::flood(
            *flooder, m.o.flood_size, [&] { return stop.load(std::memory_order_acquire); },
            m.o.timeout, flood_bytes, flood_seconds);
      });
    }
    // After the flood thread started: it keeps the default policy.
    auto scheduling = ControlSchedulingScope::enter();
    std::vector<uint8_t> out(size);
    for (size_t i = 0; i < size; ++i) out[i] = pattern(i, size);
    std::vector<double> samples, ping_leg, pong_leg;
    samples.reserve(cfg.iters);
    ping_leg.reserve(cfg.iters);
    pong_leg.reserve(cfg.iters);
    bool legs_valid = true;
    Status failure = scheduling.ok() ? ok_status() : scheduling.status();
    for (size_t i = 0; i < total && failure.ok(); ++i) {
      if (size > 0) std::memcpy(out.data(), &i, std::min<size_t>(size, 8));
      const int64_t sent_ns = monotonic_ns();
      const uint64_t t0 = CycleTimer::now();
      failure = c.publish(kPing, bytes_of(out, size), control_publish(m.o.timeout));
      if (!failure.ok()) break;
      auto pong = c.poll(m.deadline());
      const uint64_t t1 = CycleTimer::now();
      const int64_t back_ns = monotonic_ns();
      if (!pong.ok()) {
        failure = std::move(pong).status().with_context("waiting for pong " + std::to_string(i));
        break;
      }
      if (i < cfg.warmup) continue;
      samples.push_back(CycleTimer::to_ns(t1 - t0) / 2000.0);
      // The echo's clock is this one only on one host; elsewhere the split leaves the round trip.
      const int64_t echo_ns = static_cast<int64_t>(pong->publish_ts_ns);
      if (echo_ns < sent_ns || echo_ns > back_ns) legs_valid = false;
      if (legs_valid) {
        ping_leg.push_back(static_cast<double>(echo_ns - sent_ns) / 1000.0);
        pong_leg.push_back(static_cast<double>(back_ns - echo_ns) / 1000.0);
      }
      const auto* got = reinterpret_cast<const uint8_t*>(pong->payload.data());
      const bool good = pong->payload.size() == size &&
                        (size == 0 || std::memcmp(got, &i, std::min<size_t>(size, 8)) == 0) &&
                        (size <= 8 || std::memcmp(got + 8, out.data() + 8, size - 8) == 0);
      if (!good) ++res.latency.wrong;
    }
    stop.store(true, std::memory_order_release);  // pairs with the flooder's acquire load
    if (thread.joinable()) thread.join();
    flooder.reset();
    // Release the flooding ranks even when the ping-pong failed.
    (void)m.o.store->set(stop_key, "1");
    MYELIN_RETURN_IF_ERROR(failure);
    MYELIN_RETURN_IF_ERROR(flood_status.with_context("flood publisher"));
    summarize(samples, res.latency);
    res.legs_valid = legs_valid && !ping_leg.empty();
    if (res.legs_valid) {
      res.ping_leg.size = res.pong_leg.size = size;
      res.ping_leg.iters = res.pong_leg.iters = ping_leg.size();
      summarize(ping_leg, res.ping_leg);
      summarize(pong_leg, res.pong_leg);
    }
    if (flood_seconds > 0) res.flood_gbps = static_cast<double>(flood_bytes) / flood_seconds / 1e9;
  }
  MYELIN_RETURN_IF_ERROR(m.barrier("pubsub"));
  if (m.o.rank == 1 && m.o.flood_size > 0) {
    MYELIN_ASSIGN_OR_RETURN(
        auto v,
        m.o.store->get("myelin/bench/flood-delivered/" + std::to_string(m.round), m.deadline()));
    unsigned long long got = 0;
    long long ns = 0;
    if (std::sscanf(as_string(v).c_str(), "%llu %lld", &got, &ns) == 2 && ns > 0)
      res.flood_delivered_gbps = static_cast<double>(got) / static_cast<double>(ns);
  }
  return res;
}

Result<ThroughputResult> BrokerBench::pubsub_throughput(size_t size, const RunConfig& cfg) {
  Impl& m = *impl_;
  ++m.round;
  ThroughputResult res;
  res.size = size;
  res.iters = cfg.iters;
  const size_t total = cfg.warmup + cfg.iters;
  if (m.o.rank == 1) {
    std::lock_guard<std::mutex> lock(m.tput_mu);
    m.tput = Impl::Tput{.size = size, .warmup = cfg.warmup, .total = total};
    m.tput.expect.resize(size);
    for (size_t k = 0; k < size; ++k) m.tput.expect[k] = pattern(k, size);
  }
  MYELIN_RETURN_IF_ERROR(m.barrier("tput-ready"));
  if (m.o.rank == 0) {
    std::vector<uint8_t> out(size);
    for (size_t i = 0; i < size; ++i) out[i] = pattern(i, size);
    const broker::PublishOptions po{
        .lane = broker::Lane::kBulk, .batch = true, .timeout_ms = m.o.timeout.count()};
    // Fault injection (tests): message warmup + corrupt_at goes out with one byte flipped.
    const size_t corrupt =
        cfg.corrupt_at == SIZE_MAX || size <= 8 ? SIZE_MAX : cfg.warmup + cfg.corrupt_at;
    for (size_t i = 0; i < total; ++i) {
      if (size >= 8) std::memcpy(out.data(), &i, 8);
      if (i == corrupt) out[size / 2] ^= 0x5A;
      Status s = m.client->publish(kData, bytes_of(out, size), po);
      if (i == corrupt) out[size / 2] ^= 0x5A;
      if (!s.ok()) return std::move(s).with_context("publishing message " + std::to_string(i));
    }
  } else if (m.o.rank == 1) {
    std::unique_lock<std::mutex> lock(m.tput_mu);
    const Deadline d = m.deadline();
    while (m.tput.received < total) {
      if (d.expired()) {
        return timeout_error("throughput: ", m.tput.received, " of ", total,
                             " messages arrived in time");
      }
      MYELIN_RETURN_IF_ERROR(m.client->status());
      m.tput_cv.wait_for(
          lock, std::chrono::nanoseconds(std::min<int64_t>(d.remaining_ns(), 100'000'000)));
    }
    res.wrong = m.tput.wrong;
    const double secs = static_cast<double>(m.tput.last_ns - m.tput.first_ns) / 1e9;
    if (secs > 0) {
      res.msgs_per_s = static_cast<double>(cfg.iters) / secs;
      res.gbps = res.msgs_per_s * static_cast<double>(size) / 1e9;
    }
  }
  MYELIN_RETURN_IF_ERROR(m.barrier("tput-done"));
  return res;
}

Result<PsResult> BrokerBench::ps(size_t size, const RunConfig& cfg) {
  Impl& m = *impl_;
  ++m.round;
  const size_t count = std::max<size_t>(1, size / 4);
  const std::string key = "bench/ps/" + std::to_string(m.round);
  const std::string wrong_key = "myelin/bench/ps-wrong/" + std::to_string(m.round);
  const int64_t timeout_ms = m.o.timeout.count();
  PsResult res;
  res.workers = static_cast<size_t>(m.o.size - 1);
  res.step.size = count * 4;
  res.step.iters = cfg.iters;
  if (m.o.rank == 1) {
    MYELIN_RETURN_IF_ERROR(m.client->ps_init(key, std::vector<float>(count, 0.0f), timeout_ms));
  }
  MYELIN_RETURN_IF_ERROR(m.barrier("ps-init"));
  if (m.o.rank >= 1) {
    const double workers = static_cast<double>(m.o.size - 1);
    const double per_step = workers * (workers + 1) / 2;
    std::vector<float> grad(count, static_cast<float>(m.o.rank)), out(count);
    std::vector<double> samples;
    samples.reserve(cfg.iters);
    uint64_t wrong = 0;
    double seconds = 0;
    for (size_t s = 0; s < cfg.warmup + cfg.iters; ++s) {
      const uint64_t t0 = CycleTimer::now();
      MYELIN_RETURN_IF_ERROR(m.client->ps_push(key, grad, s, timeout_ms));
      MYELIN_ASSIGN_OR_RETURN(uint64_t version, m.client->ps_pull(key, s + 1, out, timeout_ms));
      const uint64_t t1 = CycleTimer::now();
      if (s < cfg.warmup) continue;
      const size_t k = s - cfg.warmup;
      samples.push_back(CycleTimer::to_ns(t1 - t0) / 1000.0);
      seconds += CycleTimer::to_ns(t1 - t0) / 1e9;
      if (m.o.rank == 1 && k == cfg.corrupt_at) out[count / 2] += 1.0f;
      const double want = -static_cast<double>(s + 1) * per_step;
      // Integers are exact in f32 below 2^24; beyond, allow the f32 rounding of the sums.
      const double tol = std::fabs(want) < 16777216.0 ? 0.0 : std::fabs(want) * 1e-6;
      const bool full = count <= 16384 || k == 0 || k == cfg.corrupt_at;
      const size_t stride = full ? 1 : count / 64;
      bool good = version == s + 1;
      for (size_t e = 0; good && e < count; e += stride) {
        good = std::fabs(static_cast<double>(out[e]) - want) <= tol;
      }
      if (good && !full) good = std::fabs(static_cast<double>(out[count - 1]) - want) <= tol;
      if (!good) ++wrong;
    }
    MYELIN_RETURN_IF_ERROR(m.o.store->add(wrong_key, static_cast<int64_t>(wrong)).status());
    summarize(samples, res.step);
    if (seconds > 0) {
      res.gbps =
          2.0 * static_cast<double>(count * 4) * static_cast<double>(cfg.iters) / seconds / 1e9;
    }
  }
  MYELIN_RETURN_IF_ERROR(m.barrier("ps-done"));
  MYELIN_ASSIGN_OR_RETURN(int64_t all_wrong, m.o.store->add(wrong_key, 0));
  res.step.wrong = static_cast<uint64_t>(all_wrong);
  return res;
}

}  // namespace myelin::bench
