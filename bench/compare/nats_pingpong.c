/* nats_pingpong: publish/subscribe round trips through a NATS server, for scripts/compare-peers.sh.
 *
 *   nats_pingpong nats://127.0.0.1:4222 SIZE ITERS WARMUP
 *
 * One connection publishes SIZE bytes on "bench.ping" and waits for the echo on "bench.pong"; a
 * second connection (the echo, an asynchronous subscription) republishes each ping on
 * "bench.pong". Like `myelin-bench pubsub`: one-way latency = round trip / 2; prints one JSON line
 * {"bench":"nats_pubsub","size":..,"iters":..,"p50_us":..,"p99_us":..,"max_us":..,"wrong":..}.
 * Every echo is checked against what was sent (its stamp and every byte). Exit 2 on errors, 3 on
 * wrong data. */
#include <nats/nats.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static natsConnection* echo_conn;

static void echo(natsConnection* nc, natsSubscription* sub, natsMsg* msg, void* closure) {
  (void)nc;
  (void)sub;
  (void)closure;
  natsConnection_Publish(echo_conn, "bench.pong", natsMsg_GetData(msg), natsMsg_GetDataLength(msg));
  natsConnection_Flush(echo_conn);
  natsMsg_Destroy(msg);
}

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static double pct(const double* sorted, long n, double p) {
  long rank = (long)(p / 100.0 * (double)n + 0.999999);
  if (rank < 1) rank = 1;
  if (rank > n) rank = n;
  return sorted[rank - 1];
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s nats://host:port SIZE ITERS WARMUP\n", argv[0]);
    return 1;
  }
  const long size = atol(argv[2]), iters = atol(argv[3]), warmup = atol(argv[4]);
  if (size < 8 || iters < 1 || warmup < 0) {
    fprintf(stderr, "nats_pingpong: SIZE >= 8, ITERS >= 1, WARMUP >= 0\n");
    return 1;
  }
  natsConnection* nc = NULL;
  natsSubscription *echo_sub = NULL, *pong_sub = NULL;
  natsStatus s = natsConnection_ConnectTo(&nc, argv[1]);
  if (s == NATS_OK) s = natsConnection_ConnectTo(&echo_conn, argv[1]);
  if (s == NATS_OK) s = natsConnection_Subscribe(&echo_sub, echo_conn, "bench.ping", echo, NULL);
  if (s == NATS_OK) s = natsConnection_SubscribeSync(&pong_sub, nc, "bench.pong");
  if (s == NATS_OK) s = natsConnection_Flush(echo_conn);
  if (s == NATS_OK) s = natsConnection_Flush(nc);
  if (s != NATS_OK) {
    fprintf(stderr, "nats_pingpong: %s\n", natsStatus_GetText(s));
    return 2;
  }
  unsigned char* out = malloc((size_t)size);
  double* samples = malloc(sizeof(double) * (size_t)iters);
  long wrong = 0;
  for (long i = 0; i < size; ++i) out[i] = (unsigned char)(i * 31 + 7);
  for (long i = 0; i < warmup + iters; ++i) {
    memcpy(out, &i, sizeof(i));
    natsMsg* reply = NULL;
    const double t0 = now_us();
    s = natsConnection_Publish(nc, "bench.ping", out, (int)size);
    if (s == NATS_OK) s = natsConnection_Flush(nc);
    if (s == NATS_OK) s = natsSubscription_NextMsg(&reply, pong_sub, 10000);
    const double t1 = now_us();
    if (s != NATS_OK) {
      fprintf(stderr, "nats_pingpong: round trip %ld: %s\n", i, natsStatus_GetText(s));
      return 2;
    }
    if (i >= warmup) {
      samples[i - warmup] = (t1 - t0) / 2.0;
      if (natsMsg_GetDataLength(reply) != size ||
          memcmp(natsMsg_GetData(reply), out, (size_t)size) != 0) {
        ++wrong;
      }
    }
    natsMsg_Destroy(reply);
  }
  qsort(samples, (size_t)iters, sizeof(double), cmp);
  printf("{\"bench\":\"nats_pubsub\",\"size\":%ld,\"iters\":%ld,\"p50_us\":%.3f,\"p99_us\":%.3f,"
         "\"max_us\":%.3f,\"wrong\":%ld}\n",
         size, iters, pct(samples, iters, 50), pct(samples, iters, 99), samples[iters - 1], wrong);
  natsSubscription_Destroy(pong_sub);
  natsSubscription_Destroy(echo_sub);
  natsConnection_Destroy(nc);
  natsConnection_Destroy(echo_conn);
  free(out);
  free(samples);
  nats_Close();
  return wrong != 0 ? 3 : 0;
}
