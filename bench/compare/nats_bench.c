/* nats_bench: the NATS side of scripts/compare-broker.sh, measuring what `myelin-bench pubsub`
 * measures, with the same definitions, through a NATS server and the NATS C client.
 *
 *   nats_bench lat  nats://127.0.0.1:4222 SIZE ITERS WARMUP [FLOOD_BYTES]
 *   nats_bench tput nats://127.0.0.1:4222 SIZE ITERS WARMUP [WINDOW]
 *
 * lat: publish-to-deliver latency, one-way = round trip / 2. The measuring thread publishes SIZE
 *   bytes on "ctrl.ping" and waits (synchronous subscription) for the echo on "ctrl.pong"; an echo
 *   thread with its own connection waits for each ping (synchronous subscription) and republishes
 *   it. Both connections send at once (SendAsap: no buffering, no flush round trip), the NATS
 *   equivalent of myelin's unbatched control lane. With FLOOD_BYTES > 0 a flood thread with a third
 *   connection publishes FLOOD_BYTES-byte messages on "grad.flood" as fast as the client takes them
 *   for the whole timed phase, and the echo connection subscribes to "grad.flood" too, so the
 *   pings share the server's connection to the echo with the flood (as in myelin-bench, where the
 *   echo rank subscribes to the flood topic). NATS has no priorities: the pings queue behind it.
 *   With MYELIN_FLOOD_NICE=N in the environment the flood thread runs at nice N (as
 *   myelin-bench's), so the CPU goes to the pings first. With MYELIN_CONTROL_SCHEDULING=rr the
 *   measuring and the echo thread run under SCHED_RR at the lowest priority, as myelin-bench's
 *   pinger and echo (the NATS client's own reader threads and the server keep theirs).
 * tput: throughput at the subscriber. One publisher connection (default buffering: NATS batches
 *   publishes itself) publishes WARMUP + ITERS messages of SIZE bytes on "tput.data"; a subscriber
 *   connection (asynchronous subscription, no pending limit) counts them; the rate is ITERS over
 *   the time from the first timed message to the last one at the subscriber. WINDOW > 0 adds flow
 *   control like myelin's credits: the subscriber acknowledges every WINDOW/4 messages on
 *   "tput.ack" and the publisher never has more than WINDOW unacknowledged. WINDOW = 0 publishes
 *   freely; NATS may then cut the subscriber off as a slow consumer or drop messages, which is
 *   reported ("dropped", "slow_consumer") and makes the run fail.
 *
 * Every message carries its index in its first 8 bytes and a pattern in the rest; every echo and
 * every delivered message is checked ("wrong"). Prints one JSON line with the same keys as
 * `myelin-bench pubsub --json`. Exit 1 on usage errors, 2 on NATS errors, 3 on wrong or lost
 * data. */
#define _GNU_SOURCE /* gettid */
#include <nats/nats.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted samples (the definition bench/harness uses). */
static double pct(const double* sorted, long n, double p) {
  long rank = (long)(p / 100.0 * (double)n + 0.999999);
  if (rank < 1) rank = 1;
  if (rank > n) rank = n;
  return sorted[rank - 1];
}

static unsigned char pattern(long i, long salt) {
  return (unsigned char)((i * 29 + salt * 13) & 0xFF);
}

static void fill(unsigned char* buf, long size, long salt) {
  for (long i = 0; i < size; ++i) buf[i] = pattern(i, salt);
}

/* Does `data` hold message `index` of `size` bytes: the stamp, then the bytes of `expect` (a
 * buffer built by fill(), compared from byte 8 on)? */
static int good_message(const unsigned char* data, long len, long size, const unsigned char* expect,
                        long index) {
  if (len != size) return 0;
  if (size >= 8 && memcmp(data, &index, 8) != 0) return 0;
  return size <= 8 || memcmp(data + 8, expect + 8, (size_t)size - 8) == 0;
}

static atomic_int slow_consumer_events; /* error handler (client threads) -> main, relaxed */

static void on_error(natsConnection* nc, natsSubscription* sub, natsStatus err, void* closure) {
  (void)nc;
  (void)sub;
  (void)closure;
  if (err == NATS_SLOW_CONSUMER)
    atomic_fetch_add_explicit(&slow_consumer_events, 1, memory_order_relaxed);
}

static natsStatus connect_to(natsConnection** nc, const char* url, int send_asap) {
  natsOptions* o = NULL;
  natsStatus s = natsOptions_Create(&o);
  if (s == NATS_OK) s = natsOptions_SetURL(o, url);
  if (s == NATS_OK) s = natsOptions_SetSendAsap(o, send_asap ? true : false);
  if (s == NATS_OK) s = natsOptions_SetErrorHandler(o, on_error, NULL);
  if (s == NATS_OK) s = natsConnection_Connect(nc, o);
  natsOptions_Destroy(o);
  return s;
}

static int fail(const char* what, natsStatus s) {
  const char* detail = nats_GetLastError(NULL);
  fprintf(stderr, "nats_bench: %s: %s (%s)\n", what, natsStatus_GetText(s),
          detail != NULL ? detail : "no detail");
  nats_Close();
  return 2;
}

/* ---- lat ------------------------------------------------------------------------------------ */

/* MYELIN_CONTROL_SCHEDULING=rr: the calling thread under SCHED_RR at the lowest priority, as
 * myelin-bench's ping-pong threads; a refusal (no CAP_SYS_NICE or RLIMIT_RTPRIO) is reported and
 * the thread keeps its policy. */
static void control_scheduling_from_env(void) {
  const char* sv = getenv("MYELIN_CONTROL_SCHEDULING");
  if (sv == NULL || strcmp(sv, "rr") != 0) return;
  struct sched_param param = {.sched_priority = sched_get_priority_min(SCHED_RR)};
  const int rc = pthread_setschedparam(pthread_self(), SCHED_RR, &param);
  if (rc != 0) fprintf(stderr, "nats_bench: SCHED_RR refused: %s\n", strerror(rc));
}

struct echo_args {
  natsConnection* nc;
  natsSubscription* sub;
  long total;
  natsStatus status;
};

static void* echo_main(void* p) {
  struct echo_args* a = p;
  control_scheduling_from_env();
  for (long i = 0; i < a->total; ++i) {
    natsMsg* m = NULL;
    natsStatus s = natsSubscription_NextMsg(&m, a->sub, 30000);
    if (s == NATS_OK) {
      s = natsConnection_Publish(a->nc, "ctrl.pong", natsMsg_GetData(m), natsMsg_GetDataLength(m));
      natsMsg_Destroy(m);
    }
    if (s != NATS_OK) {
      a->status = s;
      return NULL;
    }
  }
  return NULL;
}

struct flood_args {
  natsConnection* nc;
  long size;
  atomic_int stop;   /* main -> flood thread: release store / acquire load */
  int64_t bytes, ns; /* written by the flood thread, read by main after join */
  natsStatus status;
};

static void* flood_main(void* p) {
  struct flood_args* a = p;
  /* MYELIN_FLOOD_NICE=N: the bulk producer at nice N, as in myelin-bench pubsub --flood. */
  const char* nv = getenv("MYELIN_FLOOD_NICE");
  if (nv != NULL && *nv != '\0') (void)setpriority(PRIO_PROCESS, (id_t)gettid(), atoi(nv));
  unsigned char* buf = malloc((size_t)a->size);
  fill(buf, a->size, 3);
  const int64_t t0 = now_ns();
  while (!atomic_load_explicit(&a->stop, memory_order_acquire)) {
    natsStatus s = natsConnection_Publish(a->nc, "grad.flood", buf, (int)a->size);
    if (s != NATS_OK) {
      a->status = s;
      break;
    }
    a->bytes += a->size;
  }
  a->ns = now_ns() - t0;
  free(buf);
  return NULL;
}

static atomic_llong flood_received; /* flood subscription callback -> nobody (statistic) */

static void on_flood(natsConnection* nc, natsSubscription* sub, natsMsg* msg, void* closure) {
  (void)nc;
  (void)sub;
  (void)closure;
  atomic_fetch_add_explicit(&flood_received, natsMsg_GetDataLength(msg), memory_order_relaxed);
  natsMsg_Destroy(msg);
}

static int run_lat(const char* url, long size, long iters, long warmup, long flood) {
  natsConnection *nc = NULL, *echo_nc = NULL, *flood_nc = NULL;
  natsSubscription *ping_sub = NULL, *pong_sub = NULL, *flood_sub = NULL;
  natsStatus s = connect_to(&nc, url, 1);
  if (s == NATS_OK) s = connect_to(&echo_nc, url, 1);
  if (s == NATS_OK) s = natsConnection_SubscribeSync(&ping_sub, echo_nc, "ctrl.ping");
  if (s == NATS_OK) s = natsSubscription_SetPendingLimits(ping_sub, -1, -1);
  if (s == NATS_OK && flood > 0)
    s = natsConnection_Subscribe(&flood_sub, echo_nc, "grad.flood", on_flood, NULL);
  if (s == NATS_OK && flood > 0) s = natsSubscription_SetPendingLimits(flood_sub, -1, -1);
  if (s == NATS_OK) s = natsConnection_SubscribeSync(&pong_sub, nc, "ctrl.pong");
  if (s == NATS_OK) s = natsConnection_Flush(echo_nc);
  if (s == NATS_OK) s = natsConnection_Flush(nc);
  if (s == NATS_OK && flood > 0) s = connect_to(&flood_nc, url, 0);
  if (s != NATS_OK) return fail("connecting and subscribing", s);

  struct echo_args ea = {
      .nc = echo_nc, .sub = ping_sub, .total = warmup + iters, .status = NATS_OK};
  pthread_t echo_thread, flood_thread;
  pthread_create(&echo_thread, NULL, echo_main, &ea);
  struct flood_args fa = {.nc = flood_nc, .size = flood, .bytes = 0, .ns = 0, .status = NATS_OK};
  atomic_init(&fa.stop, 0);
  if (flood > 0) pthread_create(&flood_thread, NULL, flood_main, &fa);
  control_scheduling_from_env(); /* after the flood thread, which keeps the default */

  unsigned char* out = malloc((size_t)size);
  double* samples = malloc(sizeof(double) * (size_t)iters);
  fill(out, size, size);
  long wrong = 0;
  for (long i = 0; i < warmup + iters && s == NATS_OK; ++i) {
    if (size >= 8) memcpy(out, &i, 8);
    natsMsg* reply = NULL;
    const int64_t t0 = now_ns();
    s = natsConnection_Publish(nc, "ctrl.ping", out, (int)size);
    if (s == NATS_OK) s = natsSubscription_NextMsg(&reply, pong_sub, 30000);
    const int64_t t1 = now_ns();
    if (s != NATS_OK) break;
    if (i >= warmup) {
      samples[i - warmup] = (double)(t1 - t0) / 2000.0;
      if (!good_message((const unsigned char*)natsMsg_GetData(reply), natsMsg_GetDataLength(reply),
                        size, out, i))
        ++wrong;
    }
    natsMsg_Destroy(reply);
  }
  if (flood > 0) {
    atomic_store_explicit(&fa.stop, 1, memory_order_release);
    pthread_join(flood_thread, NULL);
  }
  pthread_join(echo_thread, NULL);
  if (s != NATS_OK) return fail("round trip", s);
  if (ea.status != NATS_OK) return fail("echo", ea.status);
  if (fa.status != NATS_OK) return fail("flood publisher", fa.status);
  int64_t dropped = 0;
  if (flood_sub != NULL) (void)natsSubscription_GetDropped(flood_sub, &dropped);
  double sum = 0;
  for (long i = 0; i < iters; ++i) sum += samples[i];
  qsort(samples, (size_t)iters, sizeof(double), cmp_double);
  const int slow = atomic_load_explicit(&slow_consumer_events, memory_order_relaxed);
  printf(
      "{\"bench\":\"nats_pubsub\",\"mode\":\"latency\",\"size\":%ld,\"iters\":%ld,"
      "\"min_us\":%.3f,\"avg_us\":%.3f,\"p50_us\":%.3f,\"p90_us\":%.3f,\"p99_us\":%.3f,"
      "\"p999_us\":%.3f,\"max_us\":%.3f,\"flood_size\":%ld,\"flood_GBps\":%.3f,"
      "\"flood_dropped\":%lld,\"slow_consumer\":%d,\"wrong\":%ld}\n",
      size, iters, samples[0], sum / (double)iters, pct(samples, iters, 50),
      pct(samples, iters, 90), pct(samples, iters, 99), pct(samples, iters, 99.9),
      samples[iters - 1], flood, fa.ns > 0 ? (double)fa.bytes / (double)fa.ns : 0.0,
      (long long)dropped, slow, wrong);
  if (flood_sub) natsSubscription_Destroy(flood_sub);
  natsSubscription_Destroy(ping_sub);
  natsSubscription_Destroy(pong_sub);
  if (flood_nc) natsConnection_Destroy(flood_nc);
  natsConnection_Destroy(echo_nc);
  natsConnection_Destroy(nc);
  free(out);
  free(samples);
  nats_Close();
  return wrong != 0 ? 3 : 0;
}

/* ---- tput ----------------------------------------------------------------------------------- */

struct tput_state {
  natsConnection* sub_nc; /* acknowledgements go out on it */
  long size, warmup, total, window;
  const unsigned char* expect; /* fill(.., size, size): the pattern of every message */
  long received, wrong;        /* subscriber callback thread only until `done` */
  int64_t t_first, t_last;     /* same */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done; /* under mu */
};

static void on_data(natsConnection* nc, natsSubscription* sub, natsMsg* msg, void* closure) {
  (void)nc;
  (void)sub;
  struct tput_state* t = closure;
  const long i = t->received;
  if (!good_message((const unsigned char*)natsMsg_GetData(msg), natsMsg_GetDataLength(msg), t->size,
                    t->expect, i))
    ++t->wrong;
  natsMsg_Destroy(msg);
  ++t->received;
  if (i == t->warmup) t->t_first = now_ns();
  if (t->window > 0 && t->received % (t->window / 4) == 0) {
    long acked = t->received;
    (void)natsConnection_Publish(t->sub_nc, "tput.ack", &acked, sizeof(acked));
  }
  if (t->received == t->total) {
    t->t_last = now_ns();
    pthread_mutex_lock(&t->mu);
    t->done = 1;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
  }
}

static int run_tput(const char* url, long size, long iters, long warmup, long window) {
  natsConnection *pub = NULL, *sub_nc = NULL;
  natsSubscription *data_sub = NULL, *ack_sub = NULL;
  struct tput_state t = {.size = size, .warmup = warmup, .total = warmup + iters, .window = window};
  unsigned char* expect = malloc((size_t)size);
  fill(expect, size, size);
  t.expect = expect; /* set before the subscription's thread exists */
  pthread_mutex_init(&t.mu, NULL);
  pthread_cond_init(&t.cv, NULL);
  natsStatus s = connect_to(&pub, url, 0);
  if (s == NATS_OK) s = connect_to(&sub_nc, url, 1);
  t.sub_nc = sub_nc;
  if (s == NATS_OK) s = natsConnection_Subscribe(&data_sub, sub_nc, "tput.data", on_data, &t);
  if (s == NATS_OK) s = natsSubscription_SetPendingLimits(data_sub, -1, -1);
  if (s == NATS_OK && window > 0) s = natsConnection_SubscribeSync(&ack_sub, pub, "tput.ack");
  if (s == NATS_OK) s = natsConnection_Flush(sub_nc);
  if (s == NATS_OK) s = natsConnection_Flush(pub);
  if (s != NATS_OK) return fail("connecting and subscribing", s);
  unsigned char* out = malloc((size_t)size);
  fill(out, size, size);
  long acked = 0;
  for (long i = 0; i < t.total && s == NATS_OK; ++i) {
    while (window > 0 && i - acked >= window && s == NATS_OK) {
      natsMsg* m = NULL;
      s = natsSubscription_NextMsg(&m, ack_sub, 30000);
      if (s == NATS_OK) {
        if (natsMsg_GetDataLength(m) == (int)sizeof(long))
          memcpy(&acked, natsMsg_GetData(m), sizeof(long));
        natsMsg_Destroy(m);
      }
    }
    if (size >= 8) memcpy(out, &i, 8);
    if (s == NATS_OK) s = natsConnection_Publish(pub, "tput.data", out, (int)size);
  }
  if (s == NATS_OK) s = natsConnection_Flush(pub);
  if (s != NATS_OK) return fail("publishing", s);
  /* Wait for the last message, at most 30 s (a slow-consumer cut-off loses messages). */
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += 30;
  pthread_mutex_lock(&t.mu);
  while (!t.done) {
    if (pthread_cond_timedwait(&t.cv, &t.mu, &until) != 0) break;
  }
  const int done = t.done;
  pthread_mutex_unlock(&t.mu);
  int64_t dropped = 0;
  (void)natsSubscription_GetDropped(data_sub, &dropped);
  const int slow = atomic_load_explicit(&slow_consumer_events, memory_order_relaxed);
  /* After the timed wait the callback may still run when messages were lost: read its fields
   * only when it finished, else report what is known. */
  const long lost = done ? 0 : -1;
  const double secs = done ? (double)(t.t_last - t.t_first) / 1e9 : 0;
  printf(
      "{\"bench\":\"nats_pubsub\",\"mode\":\"throughput\",\"size\":%ld,\"iters\":%ld,"
      "\"window\":%ld,\"GBps\":%.4f,\"msgs_per_s\":%.0f,\"dropped\":%lld,\"lost\":%ld,"
      "\"slow_consumer\":%d,\"wrong\":%ld}\n",
      size, iters, window, secs > 0 ? (double)iters * (double)size / secs / 1e9 : 0.0,
      secs > 0 ? (double)iters / secs : 0.0, (long long)dropped, lost, slow, done ? t.wrong : 0);
  const int bad = !done || dropped != 0 || slow != 0 || t.wrong != 0;
  if (ack_sub) natsSubscription_Destroy(ack_sub);
  natsSubscription_Destroy(data_sub);
  natsConnection_Destroy(pub);
  natsConnection_Destroy(sub_nc);
  free(out);
  free(expect);
  nats_Close();
  return bad ? 3 : 0;
}

int main(int argc, char** argv) {
  if (argc < 6 || argc > 7 || (strcmp(argv[1], "lat") != 0 && strcmp(argv[1], "tput") != 0)) {
    fprintf(stderr,
            "usage: %s lat  nats://host:port SIZE ITERS WARMUP [FLOOD_BYTES]\n"
            "       %s tput nats://host:port SIZE ITERS WARMUP [WINDOW]\n",
            argv[0], argv[0]);
    return 1;
  }
  const long size = atol(argv[3]), iters = atol(argv[4]), warmup = atol(argv[5]);
  const long extra = argc == 7 ? atol(argv[6]) : 0;
  if (size < 8 || size > (1 << 20) || iters < 1 || warmup < 0 || extra < 0 || extra > (1 << 20)) {
    fprintf(stderr,
            "nats_bench: 8 <= SIZE <= 1 MiB, ITERS >= 1, WARMUP >= 0, 0 <= extra <= 1 MiB\n");
    return 1;
  }
  if (strcmp(argv[1], "lat") == 0) return run_lat(argv[2], size, iters, warmup, extra);
  if (extra != 0 && extra < 4) {
    fprintf(stderr, "nats_bench: WINDOW is 0 or at least 4\n");
    return 1;
  }
  return run_tput(argv[2], size, iters, warmup, extra);
}
