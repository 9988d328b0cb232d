#!/usr/bin/env bash
# Allreduce (f32 sum) of myelin against OpenMPI and Gloo on this host, interleaved and repeated;
# prints the median busbw (GB/s) and time of each, and myelin's ratios to the peers.
#
#   scripts/compare-collectives.sh [--build DIR] [--reps N] [--ranks "2 4"]
#                                  [--sizes "4096 1048576 67108864"] [--out FILE]
#                                  [--modes "busy block yield"] [--peers "mpi-tcp mpi-sm gloo"]
#                                  [--transports "tcp shm"] [--base DIR] [--hogs N]
#
# Contenders (each a fresh set of N processes per size and repetition; the order rotates with
# every repetition so that no contender always runs first or last, and every second repetition
# runs the one before it backwards, so that within the repetitions each contender runs right
# after both of its neighbours in the list equally often (with three contenders, after each of
# the others); the contender that ends an odd repetition also starts the next one, twice in a row):
#   myelin-tcp        myelin-bench allreduce --transport tcp --progress busy   (127.0.0.1)
#   myelin-tcp-block  the same with --progress block (spin 50 us, then sleep in the kernel)
#   myelin-tcp-yield  the same with --progress yield (poll, sched_yield between empty polls)
#   myelin-tcp-auto   --progress auto (yield when ranks outnumber CPUs, else busy)
#   myelin-shm[-MODE] --transport shm, the same modes
#   (--modes picks the progress modes, --transports the myelin transports, --peers the peers)
#   base-*      with --base DIR: another build's myelin-bench (DIR/bin/myelin-bench, loaded with
#               LD_LIBRARY_PATH=DIR/lib: copy a build's bench and its lib*.so.0 there first),
#               the same transports and modes, for before/after comparisons in the same rounds
#   mpi-tcp     mpirun ... --mca pml ob1 --mca btl tcp,self (loopback only)  compare_mpi_allreduce
#   mpi-sm      mpirun ... --mca pml ob1 --mca btl vader,self (4.1's shared-memory btl)
#   gloo-*      compare_gloo_allreduce: Gloo's TCP transport on 127.0.0.1, FileStore rendezvous,
#               algorithms ring, bcube, ring_chunked, halving_doubling; "gloo-best" is the best
#               median of them per size.
# Busy polling wins on idle cores; on a machine whose cores are shared with other work a polling
# rank burns the time slice its peer needs, and blocking wins: both are measured. (OpenMPI polls;
# Gloo's TCP transport sleeps in epoll.) With more ranks than cores a busy-polling rank starves
# the one it waits for; yield (and auto) hand the CPU on instead. Run it at high priority on a
# shared machine (autogroup nice -20, see docs/performance.md).
# --hogs N starts N busy loops (nice 0, at most 1 hour each) for the whole run and stops them at
# the end: a host loaded on purpose, to see which progress modes hold up there.
# Needs: a build with myelin-bench (MYELIN_BUILD_TOOLS) and the peer programs (built when
# scripts/setup.sh --with peers installed OpenMPI and Gloo). Missing peers are skipped, named.
set -euo pipefail
cd "$(dirname "$0")/.."

build=build/release
reps=5
ranks="2 4"
sizes="4096 1048576 67108864"
out=""
modes="busy block yield"
peers="mpi-tcp mpi-sm gloo"
transports="tcp shm"
base=""
hogs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift ;;
    --reps) reps=$2; shift ;;
    --ranks) ranks=$2; shift ;;
    --sizes) sizes=$2; shift ;;
    --out) out=$2; shift ;;
    --modes) modes=$2; shift ;;
    --peers) peers=$2; shift ;;
    --transports) transports=$2; shift ;;
    --base) base=$2; shift ;;
    --hogs) hogs=$2; shift ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "compare-collectives.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

bench=$build/tools/myelin-bench/myelin-bench
mpi=$build/bench/compare/collectives/compare_mpi_allreduce
gloo=$build/bench/compare/collectives/compare_gloo_allreduce
[ -x "$bench" ] || { echo "compare-collectives.sh: $bench not built" >&2; exit 2; }
have_mpi=0; have_gloo=0
if [ -x "$mpi" ] && command -v mpirun >/dev/null; then have_mpi=1; else
  echo "# OpenMPI comparison skipped: $mpi or mpirun missing (scripts/setup.sh --with peers)"; fi
if [ -x "$gloo" ]; then have_gloo=1; else
  echo "# Gloo comparison skipped: $gloo missing (scripts/setup.sh --with peers)"; fi

if [ -n "$base" ] && [ ! -x "$base/bin/myelin-bench" ]; then
  echo "compare-collectives.sh: --base $base: no $base/bin/myelin-bench" >&2; exit 2
fi
case $hogs in ''|*[!0-9]*) echo "compare-collectives.sh: --hogs '$hogs' is not a count" >&2; exit 2 ;; esac

results=$(mktemp /tmp/compare-collectives.XXXXXX)
hog_pids=()
stop_hogs() {
  [ ${#hog_pids[@]} -eq 0 ] || kill "${hog_pids[@]}" 2>/dev/null || true
  [ ${#hog_pids[@]} -eq 0 ] || wait "${hog_pids[@]}" 2>/dev/null || true
  hog_pids=()
}
trap 'stop_hogs; rm -f "$results"' EXIT
for _ in $(seq 1 "$hogs"); do
  nice -n 0 timeout 3600 sh -c 'while :; do :; done' &
  hog_pids+=($!)
done
cores=$(nproc)

# Small sizes take ~0.1 ms per call at 4 ranks: 2000 calls keep one rescheduling early in a run
# from deciding its figure (4-rank 4 KiB over TCP, myelin `auto`: 67-128 us in ten runs of 500
# calls, 65-88 us in eight of 2000). Every contender gets the same count.
iters_for() {  # timed iterations by size (warm-up: a tenth, at least 2)
  if [ "$1" -le 65536 ]; then echo 2000; elif [ "$1" -le 4194304 ]; then echo 100; else echo 10; fi
}

# myelin-bench --json line -> RESULT line.
run_myelin() {  # transport progress np bytes [base]
  local t=$1 progress=$2 np=$3 bytes=$4 who=${5:-myelin} it label cmd=("$bench")
  it=$(iters_for "$bytes")
  label=$who-$t$([ "$progress" = busy ] || echo "-$progress")
  [ "$who" = myelin ] || cmd=(env "LD_LIBRARY_PATH=$base/lib" "$base/bin/myelin-bench")
  "${cmd[@]}" allreduce -n "$np" --transport "$t" --progress "$progress" --size "$bytes" \
    --iters "$it" --warmup $(( it / 10 > 2 ? it / 10 : 2 )) --json 2>/dev/null |
    grep '"busbw_GBps"' | while read -r line; do
      field() { echo "$line" | sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }
      echo "RESULT impl=$label np=$np bytes=$(field size) time_us=$(field time_us)" \
           "busbw_GBps=$(field busbw_GBps) algo=$(field algo) wrong=$(field wrong)"
    done
}
run_mpi() {  # btl np bytes
  local btl=$1 np=$2 bytes=$3 label
  label=mpi-$([ "$btl" = tcp ] && echo tcp || echo sm)
  mpirun --allow-run-as-root --oversubscribe -np "$np" --mca pml ob1 --mca btl "$btl,self" \
    --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
    "$mpi" --label "$label" --sizes "$bytes" --iters "$(iters_for "$bytes")" 2>/dev/null |
    grep '^RESULT' || true
}
run_gloo() {  # np bytes
  "$gloo" -n "$1" --sizes "$2" --iters "$(iters_for "$2")" 2>/dev/null | grep '^RESULT' || true
}

label_of() { echo "myelin-$1$([ "$2" = busy ] || echo "-$2")"; }  # transport mode
contenders=()
myelin_impls=""
base_impls=""
for t in $transports; do
  for m in $modes; do
    contenders+=("myelin:$t:$m")
    myelin_impls+="$(label_of "$t" "$m") "
    [ -z "$base" ] || { contenders+=("base:$t:$m"); base_impls+="base-${t}$([ "$m" = busy ] || echo "-$m") "; }
  done
done
for p in $peers; do
  case $p in
    mpi-tcp|mpi-sm) [ $have_mpi = 1 ] && contenders+=("$p") ;;
    gloo) [ $have_gloo = 1 ] && contenders+=(gloo) ;;
    *) echo "compare-collectives.sh: unknown peer '$p' (mpi-tcp, mpi-sm, gloo)" >&2; exit 2 ;;
  esac
done
echo "# $(date -u +%FT%TZ) $(uname -n): $cores cores ($(grep -m1 'model name' /proc/cpuinfo |
  cut -d: -f2 | sed 's/^ //')), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# reps $reps, ranks {$ranks}, sizes {$sizes}: ${contenders[*]}"
[ -z "$base" ] || echo "# base: $base/bin/myelin-bench with LD_LIBRARY_PATH=$base/lib"
[ "$hogs" -eq 0 ] || echo "# $hogs busy loops running throughout"
for rep in $(seq 1 "$reps"); do
  for np in $ranks; do
    for bytes in $sizes; do
      n=${#contenders[@]}
      for k in $(seq 0 $(( n - 1 ))); do
        # Odd repetitions rotate; even ones reverse the previous repetition's order (a run right
        # after another contender's can be slower, so none may always follow the same one).
        if [ $(( rep % 2 )) -eq 1 ]; then i=$(( (k + rep) % n ))
        else i=$(( (n - k + rep - 2) % n )); fi
        c=${contenders[$i]}
        case $c in
          myelin:*) IFS=: read -r _ t m <<<"$c"; run_myelin "$t" "$m" "$np" "$bytes" ;;
          base:*) IFS=: read -r _ t m <<<"$c"; run_myelin "$t" "$m" "$np" "$bytes" base ;;
          mpi-tcp) run_mpi tcp "$np" "$bytes" ;;
          mpi-sm) run_mpi vader "$np" "$bytes" ;;
          gloo) run_gloo "$np" "$bytes" ;;
        esac >>"$results" || echo "# $c np=$np bytes=$bytes failed (rep $rep)" >&2
      done
    done
  done
  echo "# repetition $rep done ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))" >&2
done
stop_hogs
[ -z "$out" ] || cp "$results" "$out"


if grep -q 'wrong=[1-9]' "$results"; then
  echo "compare-collectives.sh: myelin reported wrong results:" >&2
  grep 'wrong=[1-9]' "$results" >&2
  exit 1
fi

# Medians per (impl, np, bytes), then the table.
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
get() {  # impl np bytes field -> median
  { grep "impl=$1 np=$2 bytes=$3 " "$results" || true; } | sed -n "s/.* $4=\([^ ]*\).*/\1/p" | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "-"; else printf "%.2f", a / b }'; }
gloo_impls=$(sed -n 's/.*impl=\(gloo-[^ ]*\).*/\1/p' "$results" | sort -u)

echo
echo "# median busbw GB/s (median time us) over $reps repetitions; busbw = bytes/time * 2(n-1)/n"
printf '%-3s %9s' np bytes
for c in $myelin_impls $base_impls mpi-tcp mpi-sm gloo-best; do printf '  %-19s' "$c"; done
echo
for np in $ranks; do
  for bytes in $sizes; do
    best=nan; best_name=-; best_t=nan
    for g in $gloo_impls; do
      b=$(get "$g" "$np" "$bytes" busbw_GBps)
      if [ "$b" != nan ] && { [ "$best" = nan ] || awk -v a="$b" -v c="$best" 'BEGIN{exit !(a>c)}'; }; then
        best=$b; best_name=${g#gloo-}; best_t=$(get "$g" "$np" "$bytes" time_us)
      fi
    done
    printf '%-3s %9s' "$np" "$bytes"
    for c in $myelin_impls $base_impls mpi-tcp mpi-sm; do
      b=$(get "$c" "$np" "$bytes" busbw_GBps); t=$(get "$c" "$np" "$bytes" time_us)
      [ "$b" = nan ] && printf '  %-19s' - || printf '  %-19s' "$(printf '%.3f (%.1f)' "$b" "$t")"
    done
    [ "$best" = nan ] && printf '  -' || printf '  %.3f (%.1f) %s' "$best" "$best_t" "$best_name"
    echo
  done
done
echo
echo "# ratios of medians: busbw myelin/peer (>= 1: myelin moves more); at <= 64 KiB also time"
echo "# myelin/peer (<= 1: myelin is faster). Goals: tcp >= 1.5x gloo-best and >= 1.0x mpi-tcp at"
echo "# 1 MiB and 64 MiB; shm >= 1.0x mpi-sm; small-message time <= the peer's on the same transport."
for np in $ranks; do
  for bytes in $sizes; do
    best=nan
    for g in $gloo_impls; do
      b=$(get "$g" "$np" "$bytes" busbw_GBps)
      if [ "$b" != nan ] && { [ "$best" = nan ] || awk -v a="$b" -v c="$best" 'BEGIN{exit !(a>c)}'; }; then best=$b; fi
    done
    pt=$(get mpi-tcp "$np" "$bytes" busbw_GBps); ps=$(get mpi-sm "$np" "$bytes" busbw_GBps)
    ptt=$(get mpi-tcp "$np" "$bytes" time_us); pst=$(get mpi-sm "$np" "$bytes" time_us)
    line="np=$np bytes=$bytes"
    for m in $myelin_impls; do
      case $m in myelin-tcp*) ;; *) continue ;; esac
      b=$(get "$m" "$np" "$bytes" busbw_GBps); t=$(get "$m" "$np" "$bytes" time_us)
      line+="  $m: /gloo-best $(ratio "$b" "$best") /mpi-tcp $(ratio "$b" "$pt")"
      [ "$bytes" -gt 65536 ] || line+=" time/mpi-tcp $(ratio "$t" "$ptt")"
    done
    for m in $myelin_impls; do
      case $m in myelin-shm*) ;; *) continue ;; esac
      b=$(get "$m" "$np" "$bytes" busbw_GBps); t=$(get "$m" "$np" "$bytes" time_us)
      line+="  $m: /mpi-sm $(ratio "$b" "$ps")"
      [ "$bytes" -gt 65536 ] || line+=" time/mpi-sm $(ratio "$t" "$pst")"
    done
    for m in $myelin_impls; do  # time new/base (<= 1: this build is faster)
      [ -n "$base" ] || break
      line+="  $m time/base $(ratio "$(get "$m" "$np" "$bytes" time_us)" "$(get "base-${m#myelin-}" "$np" "$bytes" time_us)")"
    done
    echo "$line"
  done
done
echo
echo "# gloo per algorithm (median busbw GB/s)"
for np in $ranks; do
  for bytes in $sizes; do
    line="np=$np bytes=$bytes"
    for g in $gloo_impls; do line+=" ${g#gloo-}=$(get "$g" "$np" "$bytes" busbw_GBps)"; done
    echo "$line"
  done
done
echo "# myelin algorithms chosen: $(sed -n 's/.*impl=\(myelin-[a-z-]*\) np=\([0-9]*\) bytes=\([0-9]*\).* algo=\([a-z_]*\).*/\1:\2:\3=\4/p' "$results" | sort -u | tr '\n' ' ')"
