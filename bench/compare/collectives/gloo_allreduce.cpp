// compare_gloo_allreduce — Gloo's side of scripts/compare-collectives.sh: forks N ranks on this
// host; each opens Gloo's TCP transport on 127.0.0.1, meets the others through a Gloo FileStore in
// a fresh temporary directory (connectFullMesh), and times float-sum allreduce with each of Gloo's
// algorithms, measured the way `myelin-bench allreduce` measures myelin: a checked first call,
// warm-up calls, a barrier, then the mean over timed calls of the slowest rank.
//
//   compare_gloo_allreduce -n 4 --sizes 4096,1048576,67108864
//
// Algorithms: "ring" and "bcube" of the options API (gloo::allreduce, out of place), and the older
// in-place classes AllreduceRingChunked and AllreduceHalvingDoubling. The script reports each and
// the best of them. Output on rank 0, one line per algorithm and size:
//   RESULT impl=gloo-ring np=4 bytes=1048576 time_us=812.3 busbw_GBps=1.937 algo=ring
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gloo/allreduce.h>
#include <gloo/allreduce_halving_doubling.h>
#include <gloo/allreduce_ring_chunked.h>
#include <gloo/barrier.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>

namespace {

using Clock = std::chrono::steady_clock;
using ReduceFn = void (*)(void*, const void*, const void*, size_t);

int iterations_for(size_t bytes) {
  if (bytes <= 64 * 1024) return 2000;
  if (bytes <= 4 * 1024 * 1024) return 100;
  return 10;
}

double slowest(const std::shared_ptr<gloo::Context>& ctx, double mine) {
  gloo::AllreduceOptions o(ctx);
  o.setInput(&mine, 1);
  o.setOutput(&mine, 1);
  o.setReduceFunction(static_cast<ReduceFn>(&gloo::max<double>));
  o.setTag(7);
  gloo::allreduce(o);
  return mine;
}

// One algorithm as a callable over fixed buffers.
using Runner = std::function<void()>;

Runner make_runner(const std::string& algo, const std::shared_ptr<gloo::Context>& ctx,
                   std::vector<float>& send, std::vector<float>& recv) {
  const size_t count = send.size();
  if (algo == "ring" || algo == "bcube") {
    auto opts = std::make_shared<gloo::AllreduceOptions>(ctx);
    opts->setInput(send.data(), count);
    opts->setOutput(recv.data(), count);
    opts->setReduceFunction(static_cast<ReduceFn>(&gloo::sum<float>));
    opts->setAlgorithm(algo == "ring" ? gloo::AllreduceOptions::Algorithm::RING
                                      : gloo::AllreduceOptions::Algorithm::BCUBE);
    opts->setTag(1);
    return [opts] { gloo::allreduce(*opts); };
  }
  // The older algorithm classes reduce in place: copy the input first (as an out-of-place call
  // would), which costs one memcpy per call.
  std::shared_ptr<gloo::Algorithm> a;
  std::vector<float*> ptrs{recv.data()};
  if (algo == "ring_chunked") {
    a = std::make_shared<gloo::AllreduceRingChunked<float>>(ctx, ptrs, static_cast<int>(count));
  } else {
    a = std::make_shared<gloo::AllreduceHalvingDoubling<float>>(ctx, ptrs, static_cast<int>(count));
  }
  return [a, &send, &recv] {
    std::copy(send.begin(), send.end(), recv.begin());
    a->run();
  };
}

int run_rank(int rank, int n, const std::string& dir, const std::vector<size_t>& sizes,
             const std::vector<std::string>& algos, int iters_arg) {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto dev = gloo::transport::tcp::CreateDevice(attr);
  gloo::rendezvous::FileStore store(dir);
  auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, n);
  ctx->setTimeout(std::chrono::seconds(120));
  ctx->connectFullMesh(store, dev);
  long wrong_total = 0;
  for (const std::string& algo : algos) {
    for (size_t bytes : sizes) {
      const size_t count = bytes / sizeof(float);
      std::vector<float> send(count, static_cast<float>(rank + 1));
      std::vector<float> recv(count, 0.0f);
      Runner run = make_runner(algo, ctx, send, recv);
      run();
      const float want = static_cast<float>(n * (n + 1) / 2);
      long wrong = 0;
      for (float v : recv) wrong += v != want;
      const int iters = iters_arg > 0 ? iters_arg : iterations_for(bytes);
      for (int i = 0; i < std::max(2, iters / 10); ++i) run();
      gloo::BarrierOptions b(ctx);
      gloo::barrier(b);
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) run();
      const double us =
          std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
      const double worst = slowest(ctx, us);
      wrong_total += wrong;
      if (rank == 0) {
        const double busbw =
            static_cast<double>(count * sizeof(float)) / (worst * 1e3) * 2.0 * (n - 1) / n;
        std::printf("RESULT impl=gloo-%s np=%d bytes=%zu time_us=%.3f busbw_GBps=%.4f algo=%s\n",
                    algo.c_str(), n, count * sizeof(float), worst, busbw, algo.c_str());
        std::fflush(stdout);
      }
    }
  }
  gloo::BarrierOptions b(ctx);
  gloo::barrier(b);
  if (wrong_total != 0) {
    std::fprintf(stderr, "gloo rank %d: %ld wrong elements\n", rank, wrong_total);
    return 1;
  }
  return 0;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int n = 2;
  int iters = 0;
  std::vector<size_t> sizes{4096, size_t{1} << 20, size_t{64} << 20};
  std::vector<std::string> algos{"ring", "bcube", "ring_chunked", "halving_doubling"};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "-n") {
      n = std::atoi(argv[i + 1]);
    } else if (k == "--iters") {
      iters = std::atoi(argv[i + 1]);
    } else if (k == "--sizes") {
      sizes.clear();
      for (const auto& s : split(argv[i + 1])) sizes.push_back(std::stoull(s));
    } else if (k == "--algos") {
      algos = split(argv[i + 1]);
    } else {
      std::fprintf(stderr,
                   "usage: compare_gloo_allreduce [-n RANKS] [--sizes B,...] [--iters N] "
                   "[--algos ring,bcube,ring_chunked,halving_doubling]\n");
      return 2;
    }
  }
  if (n < 1 || n > 64) {
    std::fprintf(stderr, "compare_gloo_allreduce: -n must be in [1, 64]\n");
    return 2;
  }
  std::string tmpl = (std::filesystem::temp_directory_path() / "gloo-cmp-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string dir = tmpl;
  std::vector<pid_t> kids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fork");
      for (pid_t k : kids) kill(k, SIGKILL);
      return 1;
    }
    if (pid == 0) {
      int rc = 1;
      try {
        rc = run_rank(r, n, dir, sizes, algos, iters);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "gloo rank %d: %s\n", r, e.what());
      }
      std::fflush(nullptr);
      _exit(rc);
    }
    kids.push_back(pid);
  }
  int rc = 0;
  size_t alive = kids.size();
  const auto deadline = Clock::now() + std::chrono::minutes(10);
  while (alive > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      --alive;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        rc = 1;
        for (pid_t k : kids) {
          if (k != pid) kill(k, SIGTERM);
        }
      }
      continue;
    }
    if (Clock::now() > deadline) {
      std::fprintf(stderr, "compare_gloo_allreduce: ranks did not finish in 10 min; killing\n");
      for (pid_t k : kids) kill(k, SIGKILL);
      while (waitpid(-1, nullptr, 0) > 0) {
      }
      rc = 1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling children, bounded
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return rc;
}
