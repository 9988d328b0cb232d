#!/usr/bin/env bash
# Configures and builds one preset into build/<preset>: release (default), debug, asan, tsan.
#   scripts/build.sh [preset] [-DNAME=VALUE...] [--target T...]
# -D flags go to the configure step; --target restricts the build (default: everything).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-release}; shift || true
defs=(); targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --target) targets+=(--target "$2"); shift ;;
    -D*) defs+=("$1") ;;
    *) echo "build.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
cmake --preset "$preset" "${defs[@]}" >/dev/null
cmake --build --preset "$preset" "${targets[@]}"
