#!/usr/bin/env bash
# Configures and builds one preset into build/<preset>: release (default), debug, asan, tsan.
#   scripts/build.sh [preset] [extra cmake -D flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-release}; shift || true
cmake --preset "$preset" "$@" >/dev/null
cmake --build --preset "$preset"
