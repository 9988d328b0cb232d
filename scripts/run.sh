#!/usr/bin/env bash
# The main job on a local embedded default: builds myelin (release) and runs it on this machine.
#   scripts/run.sh [extra args for myelin-train]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
scripts/build.sh release
bin=build/release/tools
echo; echo "==== myelin-info"
"$bin/myelin-info/myelin-info"
if [ -x "$bin/myelin-train/myelin-train" ]; then
  echo; echo "==== myelin-train (4 local ranks over shared memory)"
  "$bin/myelin-train/myelin-train" "$@"
elif [ -x "$bin/myelin-bench/myelin-bench" ]; then
  echo; echo "==== myelin-bench lat (2 local ranks over shared memory)"
  "$bin/myelin-bench/myelin-bench" lat -n 2 --transport shm -b 8 -e 4096 -f 8 --iters 20000
fi
