#!/usr/bin/env bash
# compare-peers.sh — myelin-bench beside the peer tools present on this machine, in one go:
# interleaved (peer, myelin, peer, myelin, ...), repeated, medians, and a ratio table in markdown
# and JSON.
#
#   scripts/compare-peers.sh [--build DIR] [--repeats N] [--out DIR] [--quick]
#
# Pairs (each only when its peer is installed; `scripts/setup.sh --with peers` installs them):
#   tcp 64 B one-way latency, p50       myelin lat --transport tcp    vs  sockperf ping-pong --tcp
#                                                                      and ucx_perftest ucp_am_lat (UCX_TLS=tcp)
#   tcp 1 MiB bandwidth                 myelin bw --transport tcp     vs  iperf3 (one stream)
#                                                                      and ucx_perftest ucp_am_bw (UCX_TLS=tcp)
#   shm 64 B one-way latency, p50       myelin lat --transport shm    vs  ucx_perftest ucp_am_lat (UCX_TLS=sm)
#   shm 1 MiB bandwidth                 myelin bw --transport shm     vs  ucx_perftest ucp_am_bw (UCX_TLS=sm)
#   ucx 8 B one-way latency, p50        myelin lat --transport ucx    vs  ucx_perftest ucp_am_lat
#                                       (both UCX_TLS=posix,self, ranks pinned to CPUs 0 and 1; on a
#                                       VM the two vCPUs' placement decides it, docs/performance.md)
#   pub/sub 64 B one-way latency, p50   myelin pubsub (broker)        vs  NATS server + C client
#                                                                      (bench/compare/nats_bench lat)
# Ratio = myelin / peer for bandwidth (higher is better) and peer / myelin for latency (higher is
# better), so > 1 always means myelin is ahead. Writes $OUT/compare.md and $OUT/compare.json and
# prints the markdown table. Everything runs on loopback of this one machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=$here/build/bench
repeats=5
out=""
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=${2:?}; shift ;;
    --repeats) repeats=${2:?}; shift ;;
    --out) out=${2:?}; shift ;;
    --quick) quick=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "compare-peers.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
out=${out:-$(mktemp -d /tmp/myelin-compare.XXXXXX)}
mkdir -p "$out"

if [ ! -x "$build/tools/myelin-bench/myelin-bench" ]; then
  echo "compare-peers.sh: building myelin-bench and nats_bench in $build" >&2
  [ -f "$build/CMakeCache.txt" ] ||
    cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" --target myelin-bench -j2 >/dev/null
fi
cmake --build "$build" --target nats_bench -j2 >/dev/null 2>&1 || true
mb=$build/tools/myelin-bench/myelin-bench
nats_pp=$build/bench/compare/nats_bench

lat_iters=20000; bw_iters=2000; ps_iters=5000; secs=2
if [ $quick = 1 ]; then lat_iters=2000; bw_iters=200; ps_iters=500; secs=1; fi

results=$out/samples.tsv   # pair <TAB> side <TAB> tool <TAB> value
: >"$results"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
record() { [ -n "$4" ] && printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }
jfield() { python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())[sys.argv[1]])' "$1"; }
have() { command -v "$1" >/dev/null 2>&1; }

# ucx_perftest: server in the background, client prints a "Final:" row; field 3 is the median
# latency (us), field 7 the overall bandwidth in MB/s (2^20 B).
ucx_run() {  # tls test size iters -> prints the figure
  local tls=$1 test=$2 size=$3 iters=$4 port
  port=$(free_port)
  UCX_TLS=$tls UCX_NET_DEVICES=lo timeout 60 ucx_perftest -p "$port" >/dev/null 2>&1 &
  local spid=$!
  sleep 0.3
  local line
  line=$(UCX_TLS=$tls UCX_NET_DEVICES=lo timeout 60 ucx_perftest 127.0.0.1 -p "$port" -t "$test" \
           -s "$size" -n "$iters" 2>/dev/null | grep '^Final:' || true)
  wait "$spid" 2>/dev/null || true
  [ -n "$line" ] || return 0
  case "$test" in
    *lat) echo "$line" | awk '{print $3}' ;;
    *) echo "$line" | awk '{printf "%.4f\n", $7 * 1048576 / 1e9}' ;;
  esac
}

# The UCX backend's latency against raw UCX on the same transport: posix shared memory with peer
# error handling allowed (as myelin's endpoints use it), both ranks pinned to CPUs 0 and 1.
ucx_posix_lat() {  # iters -> prints ucx_perftest's median one-way latency (us)
  local port
  port=$(free_port)
  UCX_TLS=posix,self UCX_POSIX_ERROR_HANDLING=y timeout 60 ucx_perftest -c 1 -p "$port" >/dev/null 2>&1 &
  local spid=$!
  sleep 0.3
  UCX_TLS=posix,self UCX_POSIX_ERROR_HANDLING=y timeout 60 ucx_perftest 127.0.0.1 -c 0 -p "$port" \
    -t ucp_am_lat -s 8 -n "$1" 2>/dev/null | awk '/^Final:/ {print $3}' || true
  wait "$spid" 2>/dev/null || true
}

sockperf_lat() {
  local port
  port=$(free_port)
  timeout $((secs + 10)) sockperf server --tcp -i 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  local spid=$!
  sleep 0.3
  timeout $((secs + 10)) sockperf ping-pong --tcp -i 127.0.0.1 -p "$port" -m 64 -t "$secs" 2>&1 |
    sed -n 's/.*percentile 50.000 = *\([0-9.]*\).*/\1/p'
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
}

iperf_bw() {
  local port
  port=$(free_port)
  iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
  local spid=$!
  sleep 0.3
  iperf3 -c 127.0.0.1 -p "$port" -t "$secs" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.4f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8e9))' || true
  wait "$spid" 2>/dev/null || true
}

nats_lat() {
  local port
  port=$(free_port)
  nats-server -a 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  local spid=$!
  pids+=("$spid")
  sleep 0.5
  "$nats_pp" lat "nats://127.0.0.1:$port" 64 "$ps_iters" $((ps_iters / 10)) | jfield p50_us || true
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
}

mb_json() { "$mb" "$@" --json 2>/dev/null | tail -1; }

for r in $(seq 1 "$repeats"); do
  echo "compare-peers.sh: round $r of $repeats" >&2
  # tcp latency
  if have sockperf; then record tcp_lat peer sockperf "$(sockperf_lat)"; fi
  if have ucx_perftest; then record tcp_lat peer ucx_perftest "$(ucx_run tcp,self ucp_am_lat 64 "$lat_iters")"; fi
  record tcp_lat myelin myelin-bench "$(mb_json lat -n 2 --transport tcp -s 64 --iters "$lat_iters" | jfield p50_us)"
  # tcp bandwidth
  if have iperf3; then record tcp_bw peer iperf3 "$(iperf_bw)"; fi
  if have ucx_perftest; then record tcp_bw peer ucx_perftest "$(ucx_run tcp,self ucp_am_bw 1048576 "$bw_iters")"; fi
  record tcp_bw myelin myelin-bench "$(mb_json bw -n 2 --transport tcp -s 1M --iters "$bw_iters" | jfield GBps)"
  # shm latency and bandwidth
  if have ucx_perftest; then record shm_lat peer ucx_perftest "$(ucx_run sm,self ucp_am_lat 64 "$lat_iters")"; fi
  record shm_lat myelin myelin-bench "$(mb_json lat -n 2 --transport shm -s 64 --iters "$lat_iters" | jfield p50_us)"
  if have ucx_perftest; then record shm_bw peer ucx_perftest "$(ucx_run sm,self ucp_am_bw 1048576 "$bw_iters")"; fi
  record shm_bw myelin myelin-bench "$(mb_json bw -n 2 --transport shm -s 1M --iters "$bw_iters" | jfield GBps)"
  # UCX backend latency (skipped where myelin was built without UCX: no figure is recorded)
  # (UCX may print warnings on stdout: the JSON line is picked by its brace.)
  if have ucx_perftest; then
    record ucx_lat peer ucx_perftest "$(ucx_posix_lat "$lat_iters")" || true
    # Busy polling, as ucx_perftest polls (auto would yield: each pinned rank sees one CPU).
    record ucx_lat myelin myelin-bench "$(UCX_TLS=posix,self UCX_POSIX_ERROR_HANDLING=y \
      "$mb" lat -n 2 --transport ucx -s 8 --iters "$lat_iters" --cpu 0,1 --progress busy --json 2>/dev/null |
      grep '^{' | tail -1 | jfield p50_us 2>/dev/null || true)" || true
  fi
  # broker pub/sub
  if have nats-server && [ -x "$nats_pp" ]; then record pubsub_lat peer nats "$(nats_lat)"; fi
  record pubsub_lat myelin myelin-bench "$(mb_json pubsub -n 2 -s 64 --iters "$ps_iters" | jfield p50_us)"
done

python3 - "$results" "$out" "$repeats" "$(hostname)" "$(nproc)" <<'EOF'
import collections, json, statistics, sys
path, out, repeats, host, cpus = sys.argv[1:6]
samples = collections.defaultdict(list)
for line in open(path):
    pair, side, tool, value = line.rstrip("\n").split("\t")
    try:
        samples[(pair, side, tool)].append(float(value))
    except ValueError:
        pass
what = {"tcp_lat": ("tcp 64 B one-way latency p50", "us", False),
        "tcp_bw": ("tcp 1 MiB bandwidth", "GB/s", True),
        "shm_lat": ("shm 64 B one-way latency p50", "us", False),
        "shm_bw": ("shm 1 MiB bandwidth", "GB/s", True),
        "ucx_lat": ("ucx (posix) 8 B one-way latency p50", "us", False),
        "pubsub_lat": ("pub/sub 64 B one-way latency p50", "us", False)}
rows = []
for pair, (label, unit, higher_better) in what.items():
    mine = samples.get((pair, "myelin", "myelin-bench"), [])
    if not mine:
        continue
    m = statistics.median(mine)
    peers = [(t, v) for (p, s, t), v in samples.items() if p == pair and s == "peer" and v]
    if not peers:
        rows.append({"test": label, "unit": unit, "myelin": m, "n": len(mine), "peer": None,
                     "peer_value": None, "ratio": None})
    for tool, vals in sorted(peers):
        pv = statistics.median(vals)
        ratio = (m / pv if higher_better else pv / m) if pv and m else None
        rows.append({"test": label, "unit": unit, "myelin": round(m, 4), "n": len(mine),
                     "peer": tool, "peer_value": round(pv, 4), "peer_n": len(vals),
                     "ratio": round(ratio, 3) if ratio else None})
md = ["| test | myelin | peer | peer value | ratio (>1: myelin ahead) |", "|---|---|---|---|---|"]
for r in rows:
    pv = "—" if r["peer"] is None else f'{r["peer_value"]:g} {r["unit"]}'
    ra = "—" if r["ratio"] is None else f'{r["ratio"]:.2f}'
    md.append(f'| {r["test"]} | {r["myelin"]:g} {r["unit"]} | {r["peer"] or "not installed"} | {pv} | {ra} |')
text = "\n".join(md)
meta = {"host": host, "cpus": int(cpus), "repeats": int(repeats), "statistic": "median", "rows": rows}
open(f"{out}/compare.md", "w").write(text + "\n")
open(f"{out}/compare.json", "w").write(json.dumps(meta, indent=1) + "\n")
print(text)
print(json.dumps(meta))
EOF
echo "compare-peers.sh: samples, compare.md and compare.json in $out" >&2
