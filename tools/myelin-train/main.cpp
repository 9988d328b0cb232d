// myelin-train: a synthetic data-parallel training job whose gradients and control messages move
// through myelin. Run without a rank in the environment, it launches the whole job on this machine
// (N workers, plus S parameter servers in ps mode) and prints the summary; with MYELIN_RANK (from
// myelin-run) or under srun it runs one role (--role worker|server).
//
//   myelin-train                                  # 4 workers, allreduce mode, local default
//   myelin-train --mode ps -n 4 --servers 2 --verify
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <myelin/collectives/collectives.hpp>
#include <myelin/core/log.hpp>
#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/options.hpp>

#include "cli_checks.hpp"
#include "launcher.hpp"
#include "trainer.hpp"

namespace {

std::string random_secret() {
  unsigned char raw[24] = {};
  const int fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    [[maybe_unused]] ssize_t n = ::read(fd, raw, sizeof(raw));
    ::close(fd);
  }
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned char c : raw) {
    s += hex[c >> 4];
    s += hex[c & 15];
  }
  return s;
}

std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, size_t(n)) : std::string("myelin-train");
}

}  // namespace

int main(int argc, char** argv) {
  using myelin::train::Mode;
  myelin::train::TrainConfig c;
  CLI::App app{"myelin-train: synthetic data-parallel training over myelin"};
  std::string mode = "allreduce", role;
  size_t params = 200'000, layers = 2;
  double timeout_s = 60, job_timeout_s = 0;
  app.add_option("--mode", mode, "allreduce (synchronous SGD through collectives) or ps")
      ->check(CLI::IsMember({"allreduce", "ps"}));
  app.add_option("-n,--workers", c.workers, "worker ranks")->check(CLI::Range(1, 64));
  app.add_option("--servers", c.servers, "parameter servers (ps mode)")->check(CLI::Range(1, 16));
  app.add_option("--params", params, "model size in parameters (thousands to ~100M)")
      ->check(CLI::Range(size_t{1000}, size_t{200'000'000}));
  app.add_option("--layers", layers, "hidden layers")->check(CLI::Range(1, 16));
  app.add_option("--batch", c.global_batch, "global batch (split over the workers)")
      ->check(CLI::Range(size_t{1}, size_t{1} << 20));
  app.add_option("--steps", c.steps, "training steps")->check(CLI::Range(1, 1'000'000));
  using myelin::tools::finite_number;
  using myelin::tools::kMaxTimeoutSeconds;
  app.add_option("--lr", c.lr, "learning rate")->check(finite_number(0, 1e6, /*lo_open=*/true));
  app.add_option("--lr-decay", c.lr_decay, "factor applied when the loss stops improving")
      ->check(finite_number(0, 1));
  app.add_option("--check-every", c.check_every, "steps between control check points")
      ->check(CLI::Range(1, 1'000'000));
  app.add_option("--target-loss", c.target_loss, "stop early below this loss (0: never)")
      ->check(finite_number(0, 1e30));
  app.add_option("--seed", c.seed, "seed of data and initial parameters");
  app.add_option("--transport", c.transport, "auto|shm|tcp|ucx|verbs (allreduce mode)");
  app.add_option("--algo", c.algorithm, "allreduce algorithm (auto, ring, halving_doubling, ...)");
  app.add_option("--progress", c.progress_mode,
                 "busy|block|auto: how ranks wait (auto: block when ranks outnumber cores)")
      ->check(CLI::IsMember({"busy", "block", "auto"}));
  app.add_flag("--deterministic", c.deterministic,
               "rank-ordered reduction: bit-exact with the serial reference");
  app.add_flag("--verify", c.verify, "replay serially on worker 0 and compare the parameters");
  app.add_flag("--json", c.json, "JSON lines instead of the table");
  app.add_option("--timeout", timeout_s, "deadline of every wait, seconds")
      ->check(finite_number(0, kMaxTimeoutSeconds, /*lo_open=*/true));
  app.add_option("--job-timeout", job_timeout_s, "stop the whole local job after this (0: none)")
      ->check(finite_number(0, kMaxTimeoutSeconds));
  app.add_option("--broker", c.broker,
                 "external control broker host:port (else $MYELIN_TRAIN_BROKER; default: hosted "
                 "by worker 0 / server 0)");
  app.add_option("--role", role, "run one role (worker|server); default: launch the job")
      ->check(CLI::IsMember({"worker", "server"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  c.mode = mode == "ps" ? Mode::kPs : Mode::kAllreduce;
  c.shape = myelin::train::shape_for_parameters(params, layers);
  c.timeout_ms = std::max<int64_t>(1, static_cast<int64_t>(timeout_s * 1000));
  // What the workers would otherwise find only once they have started.
  if (auto backend = myelin::transport::parse_backend(c.transport); !backend.ok()) {
    std::fprintf(stderr, "myelin-train: --transport: %s\n",
                 std::string(backend.status().message()).c_str());
    return 2;
  }
  if (auto algo = myelin::collectives::parse_algorithm(c.algorithm); !algo.ok()) {
    std::fprintf(stderr, "myelin-train: --algo: %s\n",
                 std::string(algo.status().message()).c_str());
    return 2;
  }
  if (c.global_batch % static_cast<size_t>(c.workers) != 0) {
    std::fprintf(stderr, "myelin-train: --batch %zu is not a multiple of --workers %d\n",
                 c.global_batch, c.workers);
    return 2;
  }
  if (role.empty()) {
    if (const char* r = std::getenv("MYELIN_TRAIN_ROLE")) role = r;
  }
  if (c.broker.empty()) {
    if (const char* b = std::getenv("MYELIN_TRAIN_BROKER")) c.broker = b;
  }
  if (!c.broker.empty()) {
    const size_t colon = c.broker.rfind(':');
    const std::string port = colon == std::string::npos ? "" : c.broker.substr(colon + 1);
    const bool digits = !port.empty() && port.size() <= 5 &&
                        port.find_first_not_of("0123456789") == std::string::npos;
    if (colon == 0 || !digits || std::stoi(port) < 1 || std::stoi(port) > 65535) {
      std::fprintf(stderr, "myelin-train: --broker '%s' is not host:port\n", c.broker.c_str());
      return 2;
    }
  }

  if (role.empty() && std::getenv("MYELIN_RANK") == nullptr &&
      std::getenv("SLURM_PROCID") == nullptr) {
    // Launcher: the whole job on this machine.
    auto dir = myelin::tools::TempDir::create("myelin-train");
    if (!dir.ok()) {
      std::fprintf(stderr, "myelin-train: %s\n", dir.status().to_string().c_str());
      return 1;
    }
    const std::string secret = random_secret();
    const std::string exe = self_exe();
    std::vector<std::string> args{exe};
    for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
    std::vector<myelin::tools::ProcessSpec> procs;
    const std::string store = "file://" + dir->path();
    if (c.mode == Mode::kPs) {
      for (int s = 0; s < c.servers; ++s) {
        procs.push_back({args,
                         {{"MYELIN_TRAIN_ROLE", "server"},
                          {"MYELIN_TRAIN_SERVER", std::to_string(s)},
                          {"MYELIN_STORE", store},
                          {"MYELIN_JOB_SECRET", secret}},
                         "server " + std::to_string(s)});
      }
    }
    for (int r = 0; r < c.workers; ++r) {
      procs.push_back({args,
                       {{"MYELIN_TRAIN_ROLE", "worker"},
                        {"MYELIN_RANK", std::to_string(r)},
                        {"MYELIN_SIZE", std::to_string(c.workers)},
                        {"MYELIN_LOCAL_RANK", std::to_string(r)},
                        {"MYELIN_LOCAL_SIZE", std::to_string(c.workers)},
                        {"MYELIN_STORE", store},
                        {"MYELIN_JOB_SECRET", secret}},
                       "worker " + std::to_string(r),
                       /*inherit_output=*/r == 0});
    }
    auto rc = myelin::tools::run_processes(procs,
                                           {.timeout = std::chrono::duration<double>(job_timeout_s),
                                            .grace = std::chrono::duration<double>(3),
                                            .name = "myelin-train"});
    if (!rc.ok()) {
      std::fprintf(stderr, "myelin-train: %s\n", rc.status().to_string().c_str());
      return 1;
    }
    return *rc;
  }

  // One role of the job.
  if (const char* s = std::getenv("MYELIN_JOB_SECRET")) c.secret = s;
  if (c.secret.size() < 16) {
    std::fprintf(stderr,
                 "myelin-train: MYELIN_JOB_SECRET must hold the job secret (>= 16 bytes)\n");
    return 2;
  }
  if (const char* s = std::getenv("MYELIN_STORE")) c.store_spec = s;
  myelin::Status status;
  std::string who;
  if (role == "server") {
    int index = 0;
    if (const char* s = std::getenv("MYELIN_TRAIN_SERVER"))
      index = std::atoi(s);
    else if (const char* p = std::getenv("SLURM_PROCID"))
      index = std::atoi(p);
    who = "server " + std::to_string(index);
    status = myelin::train::run_server(c, index);
  } else {
    auto me = myelin::transport::discover_rank();
    if (!me.ok()) {
      std::fprintf(stderr, "myelin-train: %s\n", me.status().to_string().c_str());
      return 2;
    }
    if (me->size != c.workers) c.workers = me->size;  // the launcher's view wins
    if (c.store_spec.empty()) c.store_spec = me->store_spec;
    who = "worker " + std::to_string(me->rank);
    myelin::set_log_tag(who);
    status = myelin::train::run_worker(c, me->rank);
  }
  if (!status.ok()) {
    std::fprintf(stderr, "myelin-train: %s: %s\n", who.c_str(), status.to_string().c_str());
    return 1;
  }
  return 0;
}
