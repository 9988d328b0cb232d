#!/usr/bin/env bash
# The Slurm launch test (ctest: slurm_launch): brings a real Slurm up on this machine — one node,
# then an emulated 4-node cluster (network namespaces, 1 Gbit/s links) — runs
# scripts/slurm/train.sbatch and bench-matrix.sbatch through sbatch, checks the results and the
# fault handling, and tears everything down (trap on exit).
#
#   scripts/slurm/test-slurm.sh --train T --broker B [--bench M] [--only single|multi]
#
# Exit status: 0 passed, 1 failed, 77 skipped (not root, Slurm or iproute2 missing, or a cluster
# of scripts/slurm/cluster.sh already running).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
train="" broker="" bench="" only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --train) train=$2; shift ;;
    --broker) broker=$2; shift ;;
    --bench) bench=$2; shift ;;
    --only) only=$2; shift ;;
    *) echo "test-slurm.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (slurmd, munged and network namespaces)"
for c in slurmctld slurmd sbatch munged ip tc nsenter; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || skip "$c not installed (scripts/setup.sh --with slurm)"
done
[ -x "$train" ] && [ -x "$broker" ] || { echo "test-slurm.sh: --train and --broker must be executables" >&2; exit 2; }
ip netns list 2>/dev/null | grep -qw simsw && skip "an emulated cluster (netns simsw) is already running"

munge_was_up=0
munge -n >/dev/null 2>&1 && munge_was_up=1
work=$(mktemp -d /tmp/myelin-slurm-test.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/bin"
ln -s "$(readlink -f "$train")" "$work/bin/myelin-train"
ln -s "$(readlink -f "$broker")" "$work/bin/myelin-broker"
[ -n "$bench" ] && ln -s "$(readlink -f "$bench")" "$work/bin/myelin-bench"
exes=("$(readlink -f "$train")" "$(readlink -f "$broker")")
[ -n "$bench" ] && exes+=("$(readlink -f "$bench")")

failures=0
cluster_dir=""
t0=$SECONDS
log() { echo "[$((SECONDS - t0))s] $*"; }
check() { # check "what" condition...
  local what=$1; shift
  if "$@"; then log "ok   $what"; else log "FAIL $what"; failures=$((failures + 1)); fi
}

# Our processes still alive: every process whose executable is one of the binaries under test.
strays() {
  local p e out=""
  for p in /proc/[0-9]*; do
    e=$(readlink "$p/exe" 2>/dev/null) || continue
    for x in "${exes[@]}"; do [ "$e" = "$x" ] && out="$out ${p#/proc/}"; done
  done
  echo "$out"
}
no_strays() {
  local s=""
  for _ in $(seq 50); do s=$(strays); [ -z "$s" ] && return 0; sleep 0.2; done
  s=${s# }
  echo "  stray processes: $s"; ps -o pid,args -p "${s// /,}" | sed 's/^/  /' | cut -c1-160
  return 1
}

cluster_down() {
  [ -n "$cluster_dir" ] && "$here/cluster.sh" down --dir "$cluster_dir" >/dev/null 2>&1
  cluster_dir=""
}
cleanup() {
  local s
  cluster_down
  s=$(strays)
  # shellcheck disable=SC2086
  [ -n "$s" ] && kill -KILL $s 2>/dev/null
  # munged: stopped only when this test started it (cluster.sh leaves it running).
  if [ $munge_was_up = 0 ] && [ -s /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null; fi
  if [ "${KEEP_RESULTS:-0}" = 1 ] || [ $failures -ne 0 ]; then
    echo "results kept in $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 1' TERM INT

sl() { "$here/cluster.sh" exec --dir "$cluster_dir" -- "$@"; }
results=""  # per cluster: job ids start again with each cluster

# Submits a batch script; prints the job id.
submit() {
  sl sbatch --parsable -D "$work" --output="$results/%j.out" \
    --export="ALL,MYELIN_BIN_DIR=$work/bin,MYELIN_RESULTS_DIR=$results${extra_env:-}" "$@" |
    cut -d';' -f1
}
# Waits (bounded) for the end of the job; prints the batch script's exit status (the last
# "exit N" of its job.log, or "none").
wait_job() {
  local id=$1 limit=$2
  # Done when the batch script logged its exit, or the job left the queue without doing so.
  for _ in $(seq $((limit * 5))); do
    grep -q 'exit [0-9]*$' "$results/$id/job.log" 2>/dev/null && break
    sl squeue -h -j "$id" 2>/dev/null | grep -q . || break
    sleep 0.2
  done
  local last
  last=$(grep -o 'exit [0-9]*$' "$results/$id/job.log" 2>/dev/null | tail -n 1 | cut -d' ' -f2)
  echo "${last:-none}"
}
# Waits until worker 0 of the job has printed a step line (the job is training).
wait_training() {
  local id=$1
  for _ in $(seq 300); do
    grep -q '"event":"step"' "$results/$id/worker-0.log" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
json() { grep -o "\"$2\":[^,}]*" "$1" 2>/dev/null | head -n 1 | cut -d: -f2- | tr -d '"'; }
show() { log "  job $1: $(tail -n 2 "$results/$1/job.log" 2>/dev/null | tr '\n' ' ')"; }

short="--params 20000 --steps 30 --check-every 10 --batch 32"
long="--params 20000 --steps 1000000 --check-every 20 --batch 32"
# Across the emulated nodes a step takes longer (UCX over the shaped links): fewer steps.
short4="--params 20000 --steps 12 --check-every 4 --batch 32"
long4="--params 20000 --steps 1000000 --check-every 2 --batch 32"

single() {
  log "== single node"
  cluster_dir=$work/c1 results=$work/results-c1
  mkdir -p "$results"
  "$here/cluster.sh" up --nodes 1 --dir "$cluster_dir" || { failures=$((failures + 1)); return; }

  local id rc
  extra_env=",MYELIN_TRAIN_ARGS=$short,MYELIN_TRAIN_TIMEOUT=20"
  id=$(submit -n 7 "$here/train.sbatch")
  rc=$(wait_job "$id" 60); show "$id"
  check "ps: broker + 2 servers + 4 workers exit 0" [ "$rc" = 0 ]
  check "ps: summary with 4 workers, ps mode" grep -q '"mode":"ps".*"workers":4' "$results/$id/summary.json"
  check "ps: 2 server logs, broker drained" \
    bash -c "[ -f '$results/$id/server-1.log' ] && grep -q 'myelin-broker: draining' '$results/$id/broker.log'"
  check "ps: job secret not left behind" [ ! -e "$results/$id/secret" ]

  extra_env=",MYELIN_TRAIN_MODE=allreduce,MYELIN_TRAIN_ARGS=$short,MYELIN_TRAIN_TIMEOUT=20"
  id=$(submit -n 5 "$here/train.sbatch")
  rc=$(wait_job "$id" 60); show "$id"
  check "allreduce: exit 0" [ "$rc" = 0 ]
  check "allreduce: transport is shm ($(json "$results/$id/summary.json" transport))" \
    grep -q '"transport":"shm' "$results/$id/summary.json"
  check "no stray processes" no_strays

  # A rank killed mid-job: the workers step fails, the job ends with a clear error.
  extra_env=",MYELIN_TRAIN_ARGS=$long,MYELIN_TRAIN_TIMEOUT=10,MYELIN_JOB_DEADLINE=120"
  id=$(submit -n 7 "$here/train.sbatch")
  if wait_training "$id"; then
    local step pid
    step=$(sl squeue -h -s -j "$id" -o '%i %j' | awk '$2 == "myelin-workers" {print $1}')
    pid=$(sl scontrol listpids "$step" 2>/dev/null | awk '$4 == 1 {print $1}' | head -n 1)
    log "  killing worker 1 (step $step, pid ${pid:-?})"
    [ -n "$pid" ] && kill -KILL "$pid"
    local t=$SECONDS
    rc=$(wait_job "$id" 60); show "$id"
    check "killed rank: job exits 1 in $((SECONDS - t)) s" [ "$rc" = 1 -a $((SECONDS - t)) -le 30 ]
    check "killed rank: job.log names the failed step" grep -q 'FAILED: step workers failed' "$results/$id/job.log"
    check "killed rank: no stray processes" no_strays
  else
    check "killed rank: job started training" false
  fi

  # scancel: every rank exits, the broker drains.
  id=$(submit -n 7 "$here/train.sbatch")
  if wait_training "$id"; then
    sl scancel "$id"
    local t=$SECONDS
    rc=$(wait_job "$id" 60); show "$id"
    check "scancel: job ended in $((SECONDS - t)) s" [ $((SECONDS - t)) -le 30 ]
    check "scancel: broker drained" grep -q 'myelin-broker: draining' "$results/$id/broker.log"
    check "scancel: batch script saw the cancel" grep -q 'cancelled' "$results/$id/job.log"
    check "scancel: no stray processes" no_strays
  else
    check "scancel: job started training" false
  fi
  cluster_down
}

multi() {
  log "== emulated 4 nodes, 1 Gbit/s links"
  cluster_dir=$work/c4 results=$work/results-c4
  mkdir -p "$results"
  "$here/cluster.sh" up --nodes 4 --rate 1gbit --dir "$cluster_dir" || { failures=$((failures + 1)); return; }
  local id rc

  # allreduce, 2 workers per node: rank 0's next peer (rank 1) shares its node, the others do not.
  extra_env=",MYELIN_DEVICE=eth0,MYELIN_TRAIN_MODE=allreduce,MYELIN_TRAIN_WORKERS=8,MYELIN_TRAIN_WORKERS_PER_NODE=2,MYELIN_TRAIN_ARGS=$short4,MYELIN_TRAIN_TIMEOUT=20"
  id=$(submit -N4 --exclusive "$here/train.sbatch")
  rc=$(wait_job "$id" 90); show "$id"
  local s=$results/$id/summary.json
  check "4 nodes allreduce: exit 0" [ "$rc" = 0 ]
  check "4 nodes allreduce: next peer (same node) is shm" grep -q '"transport":"shm' "$s"
  check "4 nodes allreduce: peers on other nodes use tcp or ucx" \
    bash -c "grep -o '\"peer_transports\":\[[^]]*\]' '$s' | grep -o '\"backend\":\"[a-z]*\"' | sort | uniq -c | tee /dev/stderr |
             awk '/shm/ {s=\$1} /tcp|ucx/ {n+=\$1} END {exit !(s == 1 && n == 6)}'"

  extra_env=",MYELIN_DEVICE=eth0,MYELIN_TRAIN_WORKERS=4,MYELIN_TRAIN_WORKERS_PER_NODE=1,MYELIN_TRAIN_ARGS=$short4,MYELIN_TRAIN_TIMEOUT=20"
  id=$(submit -N4 --exclusive "$here/train.sbatch")
  rc=$(wait_job "$id" 90); show "$id"
  check "4 nodes ps (broker n1, 2 servers, 4 workers): exit 0" [ "$rc" = 0 ]

  if [ -n "$bench" ]; then
    extra_env=",MYELIN_DEVICE=eth0,MYELIN_BENCH_TRANSPORT=tcp,MYELIN_BENCH_LAT_ITERS=500,MYELIN_BENCH_BW_ITERS=50,MYELIN_BENCH_ARGS=--progress block"
    id=$(submit -N4 --exclusive "$here/bench-matrix.sbatch")
    rc=$(wait_job "$id" 180); show "$id"
    check "bench matrix: every pair measured" [ "$rc" = 0 ]
    sed 's/^/  /' "$results/$id/matrix.txt" 2>/dev/null
    check "bench matrix: 6 pairs at the shaped 1 Gbit/s (0.06-0.13 GB/s)" \
      bash -c "grep -o '\"bw_GBps\":[0-9.]*' '$results/$id/matrix.json' | cut -d: -f2 |
               awk '{ n++; if (\$1 < 0.06 || \$1 > 0.13) bad++ } END {exit !(n == 6 && bad == 0)}'"
  fi

  # A node dies: its slurmd and everything in its namespace killed mid-job.
  extra_env=",MYELIN_DEVICE=eth0,MYELIN_TRAIN_MODE=allreduce,MYELIN_TRAIN_WORKERS=8,MYELIN_TRAIN_WORKERS_PER_NODE=2,MYELIN_TRAIN_ARGS=$long4,MYELIN_TRAIN_TIMEOUT=10,MYELIN_JOB_DEADLINE=120"
  id=$(submit -N4 --exclusive "$here/train.sbatch")
  if wait_training "$id"; then
    local pids
    pids="$(cat "$cluster_dir/slurmd-n3.pid") $(ip netns pids simn3 | tr '\n' ' ')"
    log "  killing node n3: slurmd and its processes ($pids)"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    local t=$SECONDS
    for _ in $(seq 300); do grep -q 'exit [0-9]*$' "$results/$id/job.log" && break; sleep 0.2; done
    show "$id"
    check "node killed: batch script exits 1 in $((SECONDS - t)) s" \
      bash -c "grep -q 'exit 1$' '$results/$id/job.log' && [ $((SECONDS - t)) -le 45 ]"
  else
    check "node killed: job started training" false
  fi
  cluster_down
  check "4 nodes: no stray processes" no_strays
  check "namespaces removed" bash -c "! ip netns list | grep -q 'simsw\|simn'"
}

[ "$only" != multi ] && single
[ "$only" != single ] && multi
log "$failures failure(s)"
[ $failures -eq 0 ]
