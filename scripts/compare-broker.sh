#!/usr/bin/env bash
# compare-broker.sh — the myelin broker (the myelin-broker daemon) against NATS (nats-server and
# the NATS C client), both over TCP loopback on this machine, interleaved and repeated; prints a
# markdown table of medians and ratios and writes $OUT/compare.md, $OUT/compare.json and every
# raw JSON line in $OUT/raw.jsonl.
#
#   scripts/compare-broker.sh [--build DIR] [--rounds N] [--out DIR] [--quick] [--no-build]
#                             [--flood-nice N] [--bulk-io-nice N] [--broker-loop-nice N]
#                             [--bulk-io-scheduling normal|idle] [--broker-loop-scheduling normal|idle]
#                             [--broker-spin-us N] [--client-spin-us N]
#                             [--control-scheduling normal|rr] [--control-cpus LIST|none]
#
# What is measured, the same way on both sides (docs/bench.md, "Broker comparison"):
#   lat1k    1 KiB publish-to-deliver latency, one-way = round trip / 2 through the broker
#            (a publisher and an echoing subscriber, each its own process/connection), p50 and p99
#   tput1k   1 KiB throughput at the subscriber, one publisher, one subscriber (messages/s, GB/s);
#            myelin: credits (never drops); NATS: with a 1024-message acknowledgement window
#            (the same flow control) and without one (free running; any slow-consumer drop fails
#            the run and is reported)
#   ctrl64   64 B latency on the control topic, p50 and p99, alone ...
#   flood64  ... and while another publisher floods 1 MiB messages on grad/flood (grad.flood) at
#            full speed to the same subscriber connection
# myelin: `myelin-bench pubsub --broker` against `myelin-broker` (ctrl/# control lane, unbatched;
# grad/# and tput/# bulk lane, batched). NATS: bench/compare/nats_bench against nats-server.
# --flood-nice N: both sides' flooding thread runs at nice N (MYELIN_FLOOD_NICE), the bulk
# producer's CPU time as a lower priority lane; the default leaves it at the caller's priority.
# --bulk-io-nice N: myelin's client I/O threads run at nice N (MYELIN_BULK_IO_NICE, ClientOptions::
# io_thread_nice): with control connections and polling threads, the threads that read bulk.
# --broker-loop-nice N: the myelin broker's bulk loop thread runs at nice N (loop_nice in its
# configuration; its control thread keeps the default); a setting of the broker, not of the bench.
# --bulk-io-scheduling normal|idle: myelin's client I/O threads (MYELIN_BULK_IO_SCHEDULING,
# ClientOptions::io_thread_scheduling; idle: SCHED_IDLE). Without it the library's default.
# --broker-loop-scheduling normal|idle: the myelin broker's loop thread (loop_scheduling in its
# configuration). Without it the broker's default. Both are myelin settings; nothing changes for NATS.
# --broker-spin-us N: the myelin broker's threads spin up to N us before they sleep
# (spin_before_block_us in its configuration); --client-spin-us N: myelin's poll() callers do
# (MYELIN_CLIENT_SPIN_US, ClientOptions::spin_before_block_us). Without them the defaults.
# --control-scheduling normal|rr: the myelin broker's control thread (control_scheduling in its
# configuration) and both sides' ping-pong threads (MYELIN_CONTROL_SCHEDULING, read by
# myelin-bench and nats_bench) run under it; rr: SCHED_RR at priority 1 (needs root,
# CAP_SYS_NICE or RLIMIT_RTPRIO). Without it the default (normal).
# --control-cpus LIST|none: the myelin broker (control_cpus in its configuration) and myelin's
# clients (MYELIN_CONTROL_CPUS, ClientOptions::control_cpus) keep their bulk threads off these
# CPUs while control traffic flows (docs/broker.md, "CPUs kept for control"). Default: the first
# CPU this script may run on when it may run on 2 or more, else none. Nothing changes for NATS,
# which has no lanes.
# Each benchmark run is limited to COMPARE_RUN_TIMEOUT_S seconds (default 120); one past it is
# reported as failed and left out of the medians. Runs start COMPARE_PAUSE_S seconds (default
# 0.5) after the one before, longer than the control_cpus hold.
# As root, the whole run goes into its own session whose autogroup gets nice -20 (fewer
# disturbances from other work on the machine). Needs `scripts/setup.sh --with peers` for NATS.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${MYELIN_COMPARE_PRIORITY:-}" != set ] && [ "$(id -u)" = 0 ]; then
  export MYELIN_COMPARE_PRIORITY=set
  exec setsid -w sh -c 'echo -20 > /proc/self/autogroup; exec "$0" "$@"' "$0" "$@"
fi
build=$here/build/broker
rounds=5
out=""
quick=0
build_first=1
loop_nice=0
loop_scheduling=""
broker_spin=""
control_scheduling=""
# The first CPU this script may run on (a cpuset or taskset may leave out CPU 0).
control_cpus=$(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(c[0] if len(c) >= 2 else "none")')
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=${2:?}; shift ;;
    --rounds) rounds=${2:?}; shift ;;
    --out) out=${2:?}; shift ;;
    --quick) quick=1 ;;
    --no-build) build_first=0 ;;
    --flood-nice) export MYELIN_FLOOD_NICE=${2:?}; shift ;;
    --bulk-io-nice) export MYELIN_BULK_IO_NICE=${2:?}; shift ;;
    --broker-loop-nice) loop_nice=${2:?}; shift ;;
    --bulk-io-scheduling) export MYELIN_BULK_IO_SCHEDULING=${2:?}; shift ;;
    --broker-loop-scheduling) loop_scheduling=${2:?}; shift ;;
    --broker-spin-us) broker_spin=${2:?}; shift ;;
    --client-spin-us) export MYELIN_CLIENT_SPIN_US=${2:?}; shift ;;
    --control-scheduling) control_scheduling=${2:?}; export MYELIN_CONTROL_SCHEDULING=$control_scheduling; shift ;;
    --control-cpus) control_cpus=${2:?}; shift ;;
    -h|--help) sed -n '2,49p' "$0"; exit 0 ;;
    *) echo "compare-broker.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
[ "$control_cpus" = none ] || export MYELIN_CONTROL_CPUS=$control_cpus
out=${out:-$(mktemp -d /tmp/myelin-compare-broker.XXXXXX)}
mkdir -p "$out"
command -v nats-server >/dev/null || { echo "compare-broker.sh: nats-server missing (scripts/setup.sh --with peers)" >&2; exit 2; }
[ -f "$build/CMakeCache.txt" ] ||
  cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMYELIN_BUILD_BENCH=ON >/dev/null
[ $build_first = 0 ] ||
  nice -n 10 cmake --build "$build" --target myelin-broker myelin-bench nats_bench -j2 >/dev/null
mb=$build/tools/myelin-bench/myelin-bench
broker_bin=$build/tools/myelin-broker/myelin-broker
nb=$build/bench/compare/nats_bench
[ -x "$nb" ] || { echo "compare-broker.sh: $nb not built (libnats-dev missing?)" >&2; exit 2; }

lat_iters=20000; flood_iters=5000; tput_iters=200000
if [ $quick = 1 ]; then lat_iters=5000; flood_iters=1000; tput_iters=50000; fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The myelin broker: a fresh secret, the topic policies the benchmark expects.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$out/secret"
cat >"$out/broker.toml" <<EOF
[broker]
listen = "127.0.0.1:0"
metrics_listen = ""
$([ "$loop_nice" = 0 ] || echo "loop_nice = $loop_nice")
$([ -z "$loop_scheduling" ] || echo "loop_scheduling = \"$loop_scheduling\"")
$([ -z "$broker_spin" ] || echo "spin_before_block_us = $broker_spin")
$([ -z "$control_scheduling" ] || echo "control_scheduling = \"$control_scheduling\"")
$([ "$control_cpus" = none ] || echo "control_cpus = \"$control_cpus\"")
[[topic]]
pattern = "ctrl/#"
lane = "control"
batching = false
[[topic]]
pattern = "grad/#"
lane = "bulk"
batching = true
[[topic]]
pattern = "tput/#"
lane = "bulk"
batching = true
EOF
rm -f "$out/broker.port"
"$broker_bin" --config "$out/broker.toml" --secret-file "$out/secret" --port-file "$out/broker.port" \
  --log-level warn >"$out/broker.log" 2>&1 &
pids+=("$!")
nport=$(free_port)
nats-server -a 127.0.0.1 -p "$nport" >"$out/nats.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do [ -s "$out/broker.port" ] && break; sleep 0.05; done
[ -s "$out/broker.port" ] || { echo "compare-broker.sh: myelin-broker did not start" >&2; cat "$out/broker.log" >&2; exit 2; }
mport=$(cut -d' ' -f1 "$out/broker.port")
murl=127.0.0.1:$mport
nurl=nats://127.0.0.1:$nport
sleep 0.3

raw=$out/raw.jsonl
: >"$raw"
# tag side round command...: runs it, stores its last JSON line with the tag, side and round.
run() {
  local tag=$1 side=$2 round=$3
  shift 3
  local line
  # Runs are separate scenarios: a pause longer than the broker's control_cpus hold (200 ms) so
  # that one run's control traffic does not keep bulk off the reserved CPU in the next (the
  # throughput runs carry no control traffic of their own). Both sides get it.
  sleep "${COMPARE_PAUSE_S:-0.5}"
  # Every run is bounded (a peer's client that stalls under a flood would otherwise hold the
  # measurement lock indefinitely); one past the limit counts as failed.
  if ! line=$(timeout -k 5 "${COMPARE_RUN_TIMEOUT_S:-120}" "$@" 2>>"$out/stderr.log" | grep '^{' | tail -1); then
    echo "compare-broker.sh: $tag/$side round $round failed or timed out: $*" >&2
  fi
  [ -n "$line" ] || return 0
  python3 -c 'import json,sys; j=json.loads(sys.argv[1]); j.update(tag=sys.argv[2], side=sys.argv[3], round=int(sys.argv[4])); print(json.dumps(j))' \
    "$line" "$tag" "$side" "$round" >>"$raw"
}
myelin_side() {
  local r=$1
  run lat1k myelin "$r" "$mb" pubsub -n 2 --broker "$murl" --secret-file "$out/secret" -s 1K --iters "$lat_iters" --json
  run tput1k myelin "$r" "$mb" pubsub -n 2 --broker "$murl" --secret-file "$out/secret" -s 1K --throughput --iters "$tput_iters" --json
  run ctrl64 myelin "$r" "$mb" pubsub -n 2 --broker "$murl" --secret-file "$out/secret" -s 64 --iters "$lat_iters" --json
  run flood64 myelin "$r" "$mb" pubsub -n 2 --broker "$murl" --secret-file "$out/secret" -s 64 --flood 1M --iters "$flood_iters" --json
}
nats_side() {
  local r=$1
  run lat1k nats "$r" "$nb" lat "$nurl" 1024 "$lat_iters" $((lat_iters / 10))
  run tput1k nats "$r" "$nb" tput "$nurl" 1024 "$tput_iters" $((tput_iters / 10)) 1024
  run tput1k_free nats "$r" "$nb" tput "$nurl" 1024 "$tput_iters" $((tput_iters / 10)) 0
  run ctrl64 nats "$r" "$nb" lat "$nurl" 64 "$lat_iters" $((lat_iters / 10))
  run flood64 nats "$r" "$nb" lat "$nurl" 64 "$flood_iters" $((flood_iters / 10)) 1048576
}
for r in $(seq 1 "$rounds"); do
  echo "compare-broker.sh: round $r of $rounds (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  if [ $((r % 2)) = 1 ]; then myelin_side "$r"; nats_side "$r"; else nats_side "$r"; myelin_side "$r"; fi
done

python3 - "$raw" "$out" "$rounds" "$(hostname)" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF'
import collections, json, os, statistics, sys
raw, out, rounds, host, cpus, load = sys.argv[1:7]
runs = [json.loads(l) for l in open(raw)]
def med(tag, side, key):
    v = [r[key] for r in runs if r["tag"] == tag and r["side"] == side and key in r]
    return (statistics.median(v), len(v)) if v else (None, 0)
rows = []
def row(what, tag_m, tag_n, key, unit, higher_better, goal=None):
    m, nm = med(tag_m, "myelin", key)
    n, nn = med(tag_n, "nats", key)
    ratio = None
    if m and n:
        ratio = (n / m) if not higher_better else (m / n)
    rows.append(dict(what=what, key=key, unit=unit, myelin=m, nats=n, rounds_myelin=nm,
                     rounds_nats=nn, ratio=ratio, goal=goal))
row("1 KiB latency p50", "lat1k", "lat1k", "p50_us", "us", False, "NATS/myelin >= 2")
row("1 KiB latency p99", "lat1k", "lat1k", "p99_us", "us", False, "NATS/myelin >= 2")
row("1 KiB throughput (NATS with 1024-msg window)", "tput1k", "tput1k", "msgs_per_s", "msg/s", True, "myelin/NATS >= 2")
row("1 KiB throughput (NATS free running)", "tput1k", "tput1k_free", "msgs_per_s", "msg/s", True, "myelin/NATS >= 2")
row("1 KiB throughput GB/s (NATS with window)", "tput1k", "tput1k", "GBps", "GB/s", True)
row("64 B control latency p50, no flood", "ctrl64", "ctrl64", "p50_us", "us", False)
row("64 B control latency p99, no flood", "ctrl64", "ctrl64", "p99_us", "us", False)
row("64 B control latency p50, 1 MiB flood", "flood64", "flood64", "p50_us", "us", False)
row("64 B control latency p99, 1 MiB flood", "flood64", "flood64", "p99_us", "us", False)
row("flood rate GB/s (1 MiB messages)", "flood64", "flood64", "flood_GBps", "GB/s", True)
row("flood delivered to the echo while it echoed (GB/s)", "flood64", "flood64", "flood_delivered_GBps", "GB/s", True)
iso = {}
for side in ("myelin", "nats"):
    a, _ = med("flood64", side, "p99_us")
    b, _ = med("ctrl64", side, "p99_us")
    iso[side] = (a / b) if a and b else None
fmt = lambda v: "-" if v is None else ("%.3g" % v if v < 100 else "%.0f" % v)
lines = ["| measure | myelin | NATS | ratio (>1: myelin ahead) | goal |", "|---|---:|---:|---:|---|"]
for r in rows:
    lines.append("| %s (%s) | %s | %s | %s | %s |" % (r["what"], r["unit"], fmt(r["myelin"]), fmt(r["nats"]),
                 "-" if r["ratio"] is None else "%.2f" % r["ratio"], r["goal"] or ""))
lines.append("")
lines.append("Control isolation, p99 with flood / p99 without (goal for myelin <= 2): myelin %s, NATS %s"
             % (fmt(iso["myelin"]), fmt(iso["nats"])))
lines.append("")
lines.append("Medians of %s interleaved rounds on %s (%s CPUs), load average at the end %s; myelin's control CPUs: %s." % (rounds, host, cpus, load, os.environ.get("MYELIN_CONTROL_CPUS") or "none"))
text = "\n".join(lines)
print(text)
open(out + "/compare.md", "w").write(text + "\n")
json.dump(dict(rows=rows, isolation=iso, rounds=int(rounds), host=host, cpus=int(cpus), load=load),
          open(out + "/compare.json", "w"), indent=1)
EOF
echo "compare-broker.sh: results in $out" >&2
