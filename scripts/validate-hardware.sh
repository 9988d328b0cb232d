#!/usr/bin/env bash
# Validates myelin's verbs backend on a real RDMA device (InfiniBand or RoCE HCA).
#
#   scripts/validate-hardware.sh [--device mlx5_0] [--build-dir build/release] [--server HOST]
#
# 1. runs the verbs tests (tests/verbs) on the device, in both connection modes;
# 2. measures myelin-bench lat/bw --transport verbs beside perftest's ib_send_lat, ib_write_lat
#    and ib_write_bw (loopback on this host, or against --server HOST running this script with
#    --serve), and prints ratios against the goals:
#      latency <= 1.1 x ib_send_lat (8-64 B); bandwidth >= 0.95 x ib_write_bw (>= 64 KiB);
#      >= 10 M msgs/s per core (8 B, WR lists).
# Exit status: 0 all run steps passed and goals met; 1 a step failed or a goal was missed;
# 77 no ACTIVE RDMA port here. Steps whose tool is missing are reported as SKIPPED.
set -uo pipefail
cd "$(dirname "$0")/.."
device=""; build=build/release; server=""; serve=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --build-dir) build=$2; shift 2 ;;
    --server) server=$2; shift 2 ;;
    --serve) serve=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "validate-hardware: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

command -v ibv_devinfo >/dev/null || { echo "SKIPPED: ibv_devinfo missing (ibverbs-utils)"; exit 77; }
if ! ibv_devinfo ${device:+-d "$device"} 2>/dev/null | grep -q "PORT_ACTIVE"; then
  echo "SKIPPED: no ACTIVE RDMA port${device:+ on $device} (ibv_devinfo)"; exit 77
fi
[ -n "$device" ] || device=$(ibv_devinfo -l 2>/dev/null | sed -n '2{s/^[[:space:]]*//;p}')
export MYELIN_DEVICE=$device
echo "# device: $device"
ibv_devinfo -d "$device" | grep -E "hca_id|fw_ver|link_layer|active_mtu|state" | sed 's/^/#   /'

failed=0; report=()
step() { printf '\n==== %s\n' "$1"; }
note() { report+=("$1"); }

if [ "$serve" = 1 ]; then
  step "serving perftest and myelin-bench for a remote --server run (Ctrl-C to stop)"
  while true; do
    ib_send_lat -d "$device" -a -F >/dev/null 2>&1; ib_write_lat -d "$device" -a -F >/dev/null 2>&1
    ib_write_bw -d "$device" -a -F --report_gbits >/dev/null 2>&1
    [ -x "$build/tools/myelin-bench/myelin-bench" ] && "$build/tools/myelin-bench/myelin-bench" serve --transport verbs
  done
fi

# ---- 1. functional tests on the device --------------------------------------------------------
step "verbs tests on $device"
for t in verbs_backend_test verbs_qp_test verbs_multiprocess_test; do
  bin=$build/tests/verbs/$t
  if [ ! -x "$bin" ]; then note "SKIPPED $t: not built in $build"; continue; fi
  if "$bin" --gtest_brief=1; then note "PASSED  $t"; else note "FAILED  $t"; failed=1; fi
done
conf=$build/tests/transport/test_transport_conformance
if [ -x "$conf" ]; then
  for mode in exchange rdmacm; do
    if MYELIN_VERBS_CM=$mode "$conf" --gtest_filter='*Verbs*:*verbs*' --gtest_brief=1; then
      note "PASSED  conformance (verbs, $mode)"; else note "FAILED  conformance (verbs, $mode)"; failed=1; fi
  done
fi

# ---- 2. performance beside perftest ------------------------------------------------------------
peer=${server:-localhost}
median_lat() { # perftest latency table -> t_typical (usec) of the given size
  awk -v s="$2" '$1==s {print $5; exit}' <<<"$1"; }
bw_of() { awk -v s="$2" '$1==s {print $4; exit}' <<<"$1"; }   # BW average (Gb/s)
perf() { # tool args... : runs a loopback pair, prints the client's table
  local tool=$1; shift
  if [ -z "$server" ]; then "$tool" -d "$device" "$@" >/dev/null 2>&1 & local spid=$!; sleep 1; fi
  "$tool" -d "$device" "$@" "$peer" 2>/dev/null
  [ -z "$server" ] && wait "$spid" 2>/dev/null
}
bench=$build/tools/myelin-bench/myelin-bench
step "performance"
if ! command -v ib_send_lat >/dev/null; then
  note "SKIPPED performance: perftest is not installed (apt-get install perftest)"
elif [ ! -x "$bench" ]; then
  note "SKIPPED performance: myelin-bench is not built in $build"
else
  send_lat=$(perf ib_send_lat -a -F); write_lat=$(perf ib_write_lat -a -F)
  write_bw=$(perf ib_write_bw -a -F --report_gbits)
  my_lat=$("$bench" lat --transport verbs -b 8 -e 64 -f 2 ${server:+--server "$server"} --json)
  my_bw=$("$bench" bw --transport verbs -b 65536 -e 4194304 -f 4 ${server:+--server "$server"} --json)
  my_rate=$("$bench" rate --transport verbs -b 8 -e 8 ${server:+--server "$server"} --json)
  for s in 8 16 32 64; do
    ref=$(median_lat "$send_lat" $s); mine=$(jq -r ".results[] | select(.size==$s) | .p50_us" <<<"$my_lat" 2>/dev/null)
    ratio=$(awk -v a="$mine" -v b="$ref" 'BEGIN{ if (b>0 && a!="") printf "%.2f", a/b; else print "n/a" }')
    ok=$(awk -v r="$ratio" 'BEGIN{ print (r!="n/a" && r<=1.10) ? "ok" : "MISSED" }')
    [ "$ok" = ok ] || failed=1
    note "latency ${s} B: myelin ${mine:-?} us, ib_send_lat ${ref:-?} us (ib_write_lat $(median_lat "$write_lat" $s)) -> ${ratio}x [goal <= 1.10: $ok]"
  done
  for s in 65536 1048576 4194304; do
    ref=$(bw_of "$write_bw" $s); mine=$(jq -r ".results[] | select(.size==$s) | .gbits" <<<"$my_bw" 2>/dev/null)
    ratio=$(awk -v a="$mine" -v b="$ref" 'BEGIN{ if (b>0 && a!="") printf "%.3f", a/b; else print "n/a" }')
    ok=$(awk -v r="$ratio" 'BEGIN{ print (r!="n/a" && r>=0.95) ? "ok" : "MISSED" }')
    [ "$ok" = ok ] || failed=1
    note "bandwidth ${s} B: myelin ${mine:-?} Gb/s, ib_write_bw ${ref:-?} Gb/s -> ${ratio}x [goal >= 0.95: $ok]"
  done
  rate=$(jq -r '.results[0].msgs_per_s' <<<"$my_rate" 2>/dev/null)
  ok=$(awk -v r="$rate" 'BEGIN{ print (r!="" && r>=1e7) ? "ok" : "MISSED" }'); [ "$ok" = ok ] || failed=1
  note "message rate 8 B: myelin ${rate:-?} msgs/s per core [goal >= 10M: $ok]"
fi

step "summary ($device)"
printf '  %s\n' "${report[@]}"
exit $failed
