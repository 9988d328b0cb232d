// ucp_pingpong: the plainest two-process UCP ping-pong, the baseline below myelin's UCX backend.
//
// Two processes (fork, or separately exec'd with --exec) exchange UCP worker addresses over pipes,
// pin themselves, create one endpoint each and ping-pong `size` bytes: ucp_am_send_nbx with no AM
// header and UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL, an AM handler that bumps a counter, and
// ucp_worker_progress in a loop until the counter moves. Process 0 reads the time-stamp counter
// once per round trip and prints the median one-way latency (round trip / 2) in microseconds, as
// `ucx_perftest -t ucp_am_lat` and `myelin-bench lat` report it.
//
//   ucp_pingpong [-s size] [-n iters] [-w warmup] [--cpu a,b] [-e] [--exec] [--pin-after]
//                [--work N] [--work-after N] [--timeout s]
//
//   --cpu a,b    pin process 0 to CPU a and process 1 to CPU b (before ucp_init, unless
//                --pin-after: then once the worker exists)
//   -e           peer error handling on the endpoints (as myelin's UCX backend asks)
//   --exec       run the two processes as separately exec'd programs instead of fork alone
//   --work N     N rounds of dummy ALU work (7 instructions each) in the handler and again
//                before each send, to see what a longer per-message path costs
//   --work-after N  the same work after each send instead (off the round trip's path: it
//                runs while the message travels)
//   --timeout s  deadline of the whole run in each process (default 60 s + 20 us per round
//                trip); a process that passes it says so and exits with status 3
//
// Environment as for any UCP program (UCX_TLS=posix,self ...). Exit status 0 on success.
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <ucp/api/ucp.h>
#include <unistd.h>
#include <x86intrin.h>

enum { kAmId = 1 };

static struct {
  size_t size;
  long iters;
  long warmup;
  int cpu[2];
  int pin_after;
  int error_handling;
  int exec;
  int work;
  int work_after;
  long timeout_s;
} opt = {8, 20000, 2000, {-1, -1}, 0, 0, 0, 0, 0, 0};

// Bumped by the AM handler. A plain variable: the handler runs inside ucp_worker_progress(), an
// opaque call, so the wait loop reads it afresh after every poll.
static uint64_t g_arrived;

static void on_deadline(int sig) {
  (void)sig;
  static const char msg[] = "ucp_pingpong: no end within the deadline (--timeout)\n";
  (void)!write(2, msg, sizeof(msg) - 1);
  _exit(3);
}

static inline void work(int rounds) {
  uint64_t a = 1, b = 2, c = 3, d = 4;
  for (int i = 0; i < rounds; i++) {
    a += (uint64_t)i;
    b ^= (uint64_t)i;
    c += 3;
    d ^= 5;
    __asm__ volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d));
  }
}

static ucs_status_t on_am(void* arg, const void* header, size_t header_length, void* data,
                          size_t length, const ucp_am_recv_param_t* param) {
  (void)arg, (void)header, (void)header_length, (void)data, (void)length, (void)param;
  work(opt.work);
  g_arrived++;
  return UCS_OK;
}

static void die(const char* what) {
  fprintf(stderr, "ucp_pingpong: %s\n", what);
  exit(1);
}

static void write_all(int fd, const void* buf, size_t n) {
  const char* p = buf;
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r <= 0) die("pipe write failed");
    p += r;
    n -= (size_t)r;
  }
}

static void read_all(int fd, void* buf, size_t n) {
  char* p = buf;
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) die("pipe read failed (peer gone)");
    p += r;
    n -= (size_t)r;
  }
}

static int compare_u64(const void* a, const void* b) {
  uint64_t x = *(const uint64_t*)a, y = *(const uint64_t*)b;
  return (x > y) - (x < y);
}

// Time-stamp counter ticks per microsecond, measured against CLOCK_MONOTONIC over 50 ms.
static double ticks_per_us(void) {
  struct timespec t0, t1, pause = {0, 50 * 1000 * 1000};
  clock_gettime(CLOCK_MONOTONIC, &t0);
  uint64_t c0 = __rdtsc();
  nanosleep(&pause, NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  uint64_t c1 = __rdtsc();
  double us = (double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3;
  return (double)(c1 - c0) / us;
}

static void send_one(ucp_worker_h worker, ucp_ep_h ep, const void* buf) {
  ucp_request_param_t param;
  memset(&param, 0, sizeof(param));
  param.op_attr_mask = UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;
  ucs_status_ptr_t r;
  while ((r = ucp_am_send_nbx(ep, kAmId, NULL, 0, buf, opt.size, &param)) ==
         UCS_STATUS_PTR(UCS_ERR_NO_RESOURCE)) {
    ucp_worker_progress(worker);
  }
  if (r != NULL) die("ucp_am_send_nbx failed");
}

static void wait_arrived(ucp_worker_h worker, uint64_t count) {
  while (g_arrived < count) ucp_worker_progress(worker);
}

// One side of the ping-pong; rank 0 initiates and reports. rfd/wfd: pipes from/to the peer.
static void pin(int rank) {
  if (opt.cpu[rank] < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(opt.cpu[rank], &set);
  if (sched_setaffinity(0, sizeof(set), &set) != 0) die("sched_setaffinity failed");
}

static int run_rank(int rank, int rfd, int wfd) {
  // The deadline of the whole run: a peer that hangs ends it with a message.
  signal(SIGALRM, on_deadline);
  alarm((unsigned)opt.timeout_s);
  if (!opt.pin_after) pin(rank);
  const double tpu = rank == 0 ? ticks_per_us() : 0;

  ucp_params_t params;
  memset(&params, 0, sizeof(params));
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM;
  ucp_context_h context;
  if (ucp_init(&params, NULL, &context) != UCS_OK) die("ucp_init failed");
  ucp_worker_params_t wparams;
  memset(&wparams, 0, sizeof(wparams));
  wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wparams.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker;
  if (ucp_worker_create(context, &wparams, &worker) != UCS_OK) die("ucp_worker_create failed");
  if (opt.pin_after) pin(rank);
  ucp_am_handler_param_t am;
  memset(&am, 0, sizeof(am));
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = kAmId;
  am.cb = on_am;
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  if (ucp_worker_set_am_recv_handler(worker, &am) != UCS_OK) die("AM handler refused");

  ucp_address_t* address;
  size_t address_length;
  if (ucp_worker_get_address(worker, &address, &address_length) != UCS_OK) die("no address");
  write_all(wfd, &address_length, sizeof(address_length));
  write_all(wfd, address, address_length);
  size_t peer_length;
  read_all(rfd, &peer_length, sizeof(peer_length));
  if (peer_length > (1u << 20)) die("peer address too long");
  void* peer = malloc(peer_length);
  if (peer == NULL) die("out of memory");
  read_all(rfd, peer, peer_length);

  ucp_ep_params_t ep_params;
  memset(&ep_params, 0, sizeof(ep_params));
  ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
  ep_params.address = peer;
  if (opt.error_handling) {
    ep_params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  }
  ucp_ep_h ep;
  if (ucp_ep_create(worker, &ep_params, &ep) != UCS_OK) die("ucp_ep_create failed");

  char* buf = calloc(1, opt.size > 0 ? opt.size : 1);
  const long total = opt.warmup + opt.iters;
  uint64_t* samples = rank == 0 ? calloc((size_t)opt.iters, sizeof(uint64_t)) : NULL;
  if (buf == NULL || (rank == 0 && samples == NULL)) die("out of memory");
  char token = 1;
  write_all(wfd, &token, 1);  // both endpoints exist
  read_all(rfd, &token, 1);

  uint64_t prev = __rdtsc();
  for (long i = 0; i < total; i++) {
    if (rank == 0) {
      work(opt.work);
      send_one(worker, ep, buf);
      work(opt.work_after);
      wait_arrived(worker, (uint64_t)i + 1);
      const uint64_t now = __rdtsc();
      if (i >= opt.warmup) samples[i - opt.warmup] = now - prev;
      prev = now;
    } else {
      wait_arrived(worker, (uint64_t)i + 1);
      work(opt.work);
      send_one(worker, ep, buf);
      work(opt.work_after);
    }
  }
  write_all(wfd, &token, 1);  // neither side closes while the other still polls
  read_all(rfd, &token, 1);
  if (rank == 0 && opt.iters > 0) {
    qsort(samples, (size_t)opt.iters, sizeof(uint64_t), compare_u64);
    printf("%.4f\n", (double)samples[opt.iters / 2] / tpu / 2.0);
    fflush(stdout);
  }

  ucp_request_param_t close;
  memset(&close, 0, sizeof(close));
  close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  close.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &close);
  if (UCS_PTR_IS_PTR(r)) {
    while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(r);
  }
  ucp_worker_release_address(worker, address);
  ucp_worker_destroy(worker);
  ucp_cleanup(context);
  free(samples);
  free(buf);
  free(peer);
  return 0;
}

// A decimal number in [min, max] ending at `stop` (or at the string's end when stop is 0).
static long parse_long_until(const char* s, long min, long max, char stop, const char** rest) {
  char* end;
  long v = strtol(s, &end, 10);
  if (end == s || *end != stop || v < min || v > max) {
    fprintf(stderr, "ucp_pingpong: bad number '%s' (expected %ld..%ld)\n", s, min, max);
    exit(2);
  }
  if (rest != NULL) *rest = end + 1;
  return v;
}

static long parse_long(const char* s, long min, long max) {
  return parse_long_until(s, min, max, '\0', NULL);
}

int main(int argc, char** argv) {
  int role = -1, role_rfd = -1, role_wfd = -1;
  for (int i = 1; i < argc; i++) {
    const char* a = argv[i];
    const int more = i + 1 < argc;
    if (!strcmp(a, "-s") && more) {
      opt.size = (size_t)parse_long(argv[++i], 0, 1L << 30);
    } else if (!strcmp(a, "-n") && more) {
      opt.iters = parse_long(argv[++i], 1, 1000000000L);
    } else if (!strcmp(a, "-w") && more) {
      opt.warmup = parse_long(argv[++i], 0, 1000000000L);
    } else if (!strcmp(a, "--cpu") && more) {
      if (strchr(argv[i + 1], ',') == NULL) {
        fprintf(stderr, "ucp_pingpong: --cpu takes a,b (two CPUs), not '%s'\n", argv[i + 1]);
        return 2;
      }
      const char* rest;
      opt.cpu[0] = (int)parse_long_until(argv[++i], 0, CPU_SETSIZE - 1, ',', &rest);
      opt.cpu[1] = (int)parse_long(rest, 0, CPU_SETSIZE - 1);
    } else if (!strcmp(a, "--pin-after")) {
      opt.pin_after = 1;
    } else if (!strcmp(a, "--timeout") && more) {
      opt.timeout_s = parse_long(argv[++i], 1, 1000000L);
    } else if (!strcmp(a, "-e")) {
      opt.error_handling = 1;
    } else if (!strcmp(a, "--exec")) {
      opt.exec = 1;
    } else if (!strcmp(a, "--work") && more) {
      opt.work = (int)parse_long(argv[++i], 0, 1000000L);
    } else if (!strcmp(a, "--work-after") && more) {
      opt.work_after = (int)parse_long(argv[++i], 0, 1000000L);
    } else if (!strcmp(a, "--rank") && i + 3 < argc) {  // internal: an exec'd process
      role = (int)parse_long(argv[i + 1], 0, 1);
      role_rfd = (int)parse_long(argv[i + 2], 0, 1 << 20);
      role_wfd = (int)parse_long(argv[i + 3], 0, 1 << 20);
      i += 3;
    } else {
      fprintf(stderr,
              "usage: ucp_pingpong [-s size] [-n iters] [-w warmup] [--cpu a,b] [-e] [--exec] "
              "[--pin-after] [--work N] [--work-after N] [--timeout s]\n");
      return 2;
    }
  }
  if (opt.timeout_s == 0) opt.timeout_s = 60 + (opt.warmup + opt.iters) / 50000;
  if (role >= 0) return run_rank(role, role_rfd, role_wfd);

  int to1[2], to0[2];
  if (pipe(to1) != 0 || pipe(to0) != 0) die("pipe failed");
  pid_t child[2];
  for (int rank = 0; rank < 2; rank++) {
    const int rfd = rank == 0 ? to0[0] : to1[0];
    const int wfd = rank == 0 ? to1[1] : to0[1];
    child[rank] = fork();
    if (child[rank] < 0) die("fork failed");
    if (child[rank] > 0) continue;
    // Only this rank's two ends stay open, so a dead peer reads as end-of-file.
    const int ends[4] = {to1[0], to1[1], to0[0], to0[1]};
    for (int k = 0; k < 4; k++) {
      if (ends[k] != rfd && ends[k] != wfd) close(ends[k]);
    }
    if (!opt.exec) _exit(run_rank(rank, rfd, wfd));
    char r[16], rf[16], wf[16];
    snprintf(r, sizeof(r), "%d", rank);
    snprintf(rf, sizeof(rf), "%d", rfd);
    snprintf(wf, sizeof(wf), "%d", wfd);
    char** args = calloc((size_t)argc + 5, sizeof(char*));
    if (args == NULL) die("out of memory");
    for (int k = 0; k < argc; k++) args[k] = argv[k];
    args[argc] = "--rank";
    args[argc + 1] = r;
    args[argc + 2] = rf;
    args[argc + 3] = wf;
    execv("/proc/self/exe", args);
    die("exec failed");
  }
  close(to1[0]);
  close(to1[1]);
  close(to0[0]);
  close(to0[1]);
  int rc = 0;
  for (int rank = 0; rank < 2; rank++) {
    int status;
    if (waitpid(child[rank], &status, 0) < 0) {
      rc = 1;
    } else if (WIFSIGNALED(status)) {
      fprintf(stderr, "ucp_pingpong: process %d ended by signal %d\n", rank, WTERMSIG(status));
      rc = 1;
    } else if (WEXITSTATUS(status) != 0) {
      rc = WEXITSTATUS(status);
    }
  }
  return rc;
}
