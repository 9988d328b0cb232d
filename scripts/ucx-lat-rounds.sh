#!/usr/bin/env bash
# ucx-lat-rounds.sh — the UCX posix small-message latency against its baselines, interleaved:
# each round runs `ucx_perftest -t ucp_am_lat`, myelin-bench lat over ucx (one or more builds) and
# the raw UCP ping-pong bench/compare/ucp_pingpong (plain, and with --work N per listed N), in an
# order that rotates from round to round. Each run is classed by its own figure: "near" below
# 0.4 us (the two vCPUs on sibling hardware threads), "far" above. Prints, per class, each
# variant's median and the median of its per-round ratio to am_lat (docs/performance.md,
# "Transport: UCX").
#
#   scripts/ucx-lat-rounds.sh [--build DIR]... [--rounds N] [--size B] [--work N]... [--out FILE]
#
# --build DIR: a build directory with tools/myelin-bench/myelin-bench (and, in the first one,
# bench/compare/ucp_pingpong); give it twice for an A/B (named myelin1:DIR, myelin2:DIR).
# Default build/release. --out FILE is overwritten. A run is paired with the am_lat run of its
# round only when both fall in the same class; the summary says how many were not. Run it under
# the measurement lock; about 1.5 s per round and variant.
set -euo pipefail
cd "$(dirname "$0")/.."
builds=()
works=()
rounds=20
size=8
out=""
usage() {
  echo "usage: scripts/ucx-lat-rounds.sh [--build DIR]... [--rounds N] [--size B] [--work N]... [--out FILE]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  if [ "$1" = "${1#--}" ] || [ $# -lt 2 ]; then usage; fi
  case "$1" in
    --build) builds+=("$2"); shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --work) works+=("$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "ucx-lat-rounds.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[ ${#builds[@]} -gt 0 ] || builds=(build/release)
[ -n "$out" ] || out=$(mktemp /tmp/ucx-lat-rounds.XXXXXX)
: >"$out"
command -v ucx_perftest >/dev/null || { echo "ucx-lat-rounds.sh: ucx_perftest not found" >&2; exit 2; }
raw=${builds[0]}/bench/compare/ucp_pingpong
[ -x "$raw" ] || { echo "ucx-lat-rounds.sh: $raw not built" >&2; exit 2; }
for b in "${builds[@]}"; do
  [ -x "$b/tools/myelin-bench/myelin-bench" ] || { echo "ucx-lat-rounds.sh: no myelin-bench in $b" >&2; exit 2; }
done
export UCX_TLS=posix,self UCX_POSIX_ERROR_HANDLING=y UCX_WARN_UNUSED_ENV_VARS=n

am_lat() {  # ucx_perftest's median one-way latency (field 3 of "Final:")
  local port=$((20000 + RANDOM % 20000)) server
  timeout 60 ucx_perftest -c 1 -p "$port" >/dev/null 2>&1 &
  server=$!
  sleep 0.3
  timeout 60 ucx_perftest 127.0.0.1 -c 0 -p "$port" -t ucp_am_lat -s "$size" -n 20000 -w 2000 \
    2>/dev/null | awk '/Final:/ {print $3}' || true
  # A client that could not connect leaves the server waiting: end it rather than its timeout.
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
myelin() {  # build dir -> p50_us of myelin-bench lat
  timeout 60 "$1/tools/myelin-bench/myelin-bench" lat -n 2 -t ucx -s "$size" -i 20000 -w 2000 \
    --cpu 0,1 --progress busy --json 2>/dev/null |
    sed -n 's/.*"p50_us":\([0-9.eE+-]*\).*/\1/p'
}

names=(am_lat)
cmds=(am_lat)
for k in "${!builds[@]}"; do
  b=${builds[$k]}
  if [ ${#builds[@]} -gt 1 ]; then names+=("myelin$((k + 1)):$b"); else names+=("myelin:$b"); fi
  cmds+=("myelin $b")
done
names+=(ucp_pingpong)
cmds+=("timeout 60 $raw -s $size --cpu 0,1 -e")
for w in "${works[@]}"; do
  names+=("ucp_pingpong--work$w")
  cmds+=("timeout 60 $raw -s $size --cpu 0,1 -e --work $w")
done

n=${#names[@]}
for ((r = 0; r < rounds; r++)); do
  load=$(cut -d' ' -f1 /proc/loadavg)
  for ((k = 0; k < n; k++)); do
    i=$(((k + r) % n))
    v=$(${cmds[$i]} 2>/dev/null | tail -1 || true)  # a failed run is recorded as NA
    echo "$r ${names[$i]} ${v:-NA} $load" >>"$out"
  done
done
echo "ucx-lat-rounds.sh: raw figures in $out (round, variant, one-way us, load)" >&2

python3 - "$out" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, name, value, _ = line.split()
    if value != "NA":
        runs[r][name] = float(value)
names = []
for d in runs.values():
    names += [k for k in d if k not in names]
for cls in ("near", "far"):
    print(f"{cls} (one-way us below 0.4)" if cls == "near" else f"{cls} (0.4 us and above)")
    for name in names:
        vals, ratios, unpaired = [], [], 0
        for d in runs.values():
            if name not in d or (d[name] < 0.4) != (cls == "near"):
                continue
            if "am_lat" in d and (d["am_lat"] < 0.4) == (cls == "near"):
                vals.append(d[name])
                ratios.append(d[name] / d["am_lat"])
            else:
                unpaired += 1  # am_lat of the round missing or in the other class
        if vals:
            print(f"  {name:28s} rounds {len(vals):4d}  median {statistics.median(vals):.4f} us"
                  f"  / am_lat {statistics.median(ratios):.3f}  (unpaired {unpaired})")
EOF
